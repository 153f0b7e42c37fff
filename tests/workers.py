"""Real hookgate processes for tests, started the way an operator starts them.

``Hookgate`` runs any ``hookgate`` command (``serve``, ``router``, ``worker -Q webhooks``) and can
SIGKILL and restart it; ``Worker`` runs a bare ``celery worker`` for tests of Celery itself.

Usage::

    with Worker(settings, tmp_path / "worker.log", queues=["webhooks"]) as worker:
        ...send tasks, wait for their effects...

The worker gets ``settings`` as ``HOOKGATE_*`` environment variables, runs in a process group of
its own, and is ready when it logs ``ready.``; leaving the block sends SIGTERM (a warm shutdown)
and kills the group if it lingers. When the block exits with an exception the worker's log is
printed, so pytest shows it with the failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType

import httpx
import orjson

from schemas.settings import Settings

__all__ = ["Hookgate", "Worker", "free_port", "settings_env", "wait_until"]

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 30.0, interval_s: float = 0.05) -> None:
    """Poll ``check`` until it is true; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``HOOKGATE_*`` variables that give another process exactly these settings."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            # pydantic-settings reads anything that is not a plain string as JSON.
            env[f"HOOKGATE_{name.upper()}"] = value if isinstance(value, str) else orjson.dumps(value).decode()
    return env


class Worker:
    """``celery -A consumers.celery_app:celery_app worker`` as a child process, with its log in a file."""

    def __init__(self, settings: Settings, log_path: Path, *, queues: Iterable[str] = ("webhooks",),
                 concurrency: int = 2, pool: str = "prefork", app: str = "consumers.celery_app:celery_app",
                 extra_args: Iterable[str] = (), extra_env: Mapping[str, str] | None = None) -> None:
        self.name = f"test-{uuid.uuid4().hex[:8]}"
        self.log_path = log_path
        self.command = [
            sys.executable, "-m", "celery", "-A", app, "worker",
            "-Q", ",".join(queues), "-P", pool, "-c", str(concurrency),
            "--without-gossip", "--without-mingle", "-n", f"{self.name}@%h", "-l", "INFO", *extra_args,
        ]
        self.env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("the worker is not running")
        return self._process.pid

    def log_text(self) -> str:
        """Everything the worker wrote so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the worker and wait until it consumes; raise with its log if it does not get there."""
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(self.command, cwd=REPO_ROOT, env=self.env, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while f"{self.name}@" not in self.log_text() or " ready." not in self.log_text():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Celery worker did not become ready; its log:\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM (finish running tasks, then exit); SIGKILL the whole group after ``timeout_s``."""
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                return process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        # Hung, or died on its own: its pool children share the group, and none may outlive the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.wait(timeout=timeout_s)

    def __enter__(self) -> Worker:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if exc_type is not None:
            print(f"--- log of Celery worker {self.name} ({self.log_path}) ---\n{self.log_text()}")


class Hookgate:
    """``hookgate ARGS`` as a child process in its own process group, its output appended to ``log_path``.

    ``start`` waits until the process is ready: ``serve`` answers ``/readyz``, ``router`` logs
    ``router_consuming``, ``worker`` logs Celery's ``ready.``. ``kill`` is a SIGKILL of the whole
    group (a worker's pool children too), as when a machine or container dies; ``start`` again
    restarts it with the same command.
    """

    _READY_LINES = {"router": "router_consuming", "worker": " ready."}

    def __init__(self, settings: Settings, log_path: Path, *args: str,
                 extra_env: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.args = args
        self.log_path = log_path
        self.command = [sys.executable, "-m", "gateway.cli", *args]
        self.env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError(f"hookgate {' '.join(self.args)} is not running")
        return self._process.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _ready(self) -> bool:
        if self.args[0] == "serve":
            port = self.args[self.args.index("--port") + 1] if "--port" in self.args else self.settings.port
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        line = self._READY_LINES.get(self.args[0])
        # Only what this start wrote counts: a restart must not pass on the previous run's line.
        return line is None or line in self.log_text()[self._log_offset:]

    def start(self, timeout_s: float = 30.0) -> Hookgate:
        self._log_offset = len(self.log_text())
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(self.command, cwd=REPO_ROOT, env=self.env, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"hookgate {' '.join(self.args)} did not get ready; its log:\n{self.log_text()}")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        """SIGKILL the process group at once: no shutdown, no acks, nothing flushed."""
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM (a graceful stop); SIGKILL the group after ``timeout_s`` or if the leader died alone."""
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.wait(timeout=timeout_s)
