"""A process supervisor: runs commands as children, restarts those that die, stops them all on SIGINT or SIGTERM."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import FrameType

import structlog

__all__ = ["ChildSpec", "Supervisor"]

log = structlog.get_logger(__name__)

_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass(frozen=True)
class ChildSpec:
    """One supervised command: a name for the logs and the argv to run."""

    name: str
    argv: tuple[str, ...]


@dataclass
class _Child:
    spec: ChildSpec
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None


class _SignalPipe:
    """Turns signals into readable bytes (``signal.set_wakeup_fd``), so one ``select`` waits for all of them."""

    def __init__(self, signals: Iterable[signal.Signals]) -> None:
        self._signals = tuple(signals)
        self._previous: dict[signal.Signals, Callable[[int, FrameType | None], object] | int | None] = {}
        self._read_fd = self._write_fd = -1
        self._previous_wakeup_fd = -1

    def __enter__(self) -> _SignalPipe:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in self._signals:
            # A Python-level handler must exist for the wakeup byte to be written; this one replaces
            # the default actions (KeyboardInterrupt, termination) with "tell the loop".
            self._previous[signum] = signal.signal(signum, _ignore)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        os.close(self._read_fd)
        os.close(self._write_fd)

    def wait(self, timeout_s: float | None) -> set[int]:
        """Block until a signal arrives or the timeout passes; return the signal numbers received."""
        readable, _, _ = select.select([self._read_fd], [], [], timeout_s)
        received: set[int] = set()
        while readable:
            try:
                data = os.read(self._read_fd, 512)
            except BlockingIOError:
                break
            received.update(data)
        return received


def _ignore(_signum: int, _frame: FrameType | None) -> None:
    return None


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux send the child SIGTERM when the supervisor dies, even by SIGKILL.

    SIGTERM, not SIGKILL, so that each child still stops its own children (Celery's pool, uvicorn's
    workers). ``preexec_fn`` is unsafe only with other threads running, and the supervisor has none.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: the child only makes the call

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        # The supervisor may have died between fork and prctl, and then no signal would ever come.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


class Supervisor:
    """Runs each command as a child process and keeps it running until asked to stop.

    A child that exits is restarted after an exponential backoff (reset once it has run for
    ``stable_after_s``). SIGINT or SIGTERM stops every child with SIGTERM, waits up to
    ``stop_timeout_s`` (a second signal cuts the wait short), then SIGKILLs what is left.
    Children run in process groups of their own, so a terminal's Ctrl-C reaches only the
    supervisor and each child is signalled exactly once; on Linux they are also signalled when
    the supervisor dies, so none outlives it. `run` must be called from the main thread.
    """

    def __init__(
        self,
        specs: Sequence[ChildSpec],
        *,
        stop_timeout_s: float = 30.0,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
        stable_after_s: float = 60.0,
    ) -> None:
        self._children = [_Child(spec) for spec in specs]
        self._stop_timeout_s = stop_timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._stable_after_s = stable_after_s

    def run(self) -> int:
        """Start every child and supervise them until SIGINT or SIGTERM; return the exit code (0)."""
        with _SignalPipe((signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)) as signals:
            for child in self._children:
                self._start(child)
            while True:
                received = signals.wait(self._next_restart_in())
                if stop := received & _STOP_SIGNALS:
                    log.info("supervisor_stopping", signal=signal.Signals(min(stop)).name)
                    break
                self._reap()
                self._restart_due()
            self._stop_all(signals)
        log.info("supervisor_stopped")
        return 0

    def _start(self, child: _Child) -> None:
        child.restart_at = None
        child.started_at = time.monotonic()
        try:
            child.process = subprocess.Popen(
                child.spec.argv,
                stdin=subprocess.DEVNULL,
                process_group=0,
                preexec_fn=_die_with_parent(os.getpid()),
            )
        except (OSError, subprocess.SubprocessError) as exc:
            child.process = None
            self._schedule_restart(child, returncode=None, error=str(exc))
            return
        log.info("child_started", child=child.spec.name, child_pid=child.process.pid)

    def _reap(self) -> None:
        for child in self._children:
            if child.process is not None and (returncode := child.process.poll()) is not None:
                pid = child.process.pid
                child.process = None
                self._schedule_restart(child, returncode=returncode, child_pid=pid)

    def _schedule_restart(self, child: _Child, *, returncode: int | None, **fields: object) -> None:
        now = time.monotonic()
        if now - child.started_at >= self._stable_after_s:
            child.failures = 0
        delay_s = min(self._backoff_initial_s * 2**child.failures, self._backoff_max_s)
        child.failures += 1
        child.restart_at = now + delay_s
        log.warning("child_exited", child=child.spec.name, returncode=returncode, restart_in_s=delay_s, **fields)

    def _next_restart_in(self) -> float | None:
        due = [child.restart_at for child in self._children if child.restart_at is not None]
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _restart_due(self) -> None:
        now = time.monotonic()
        for child in self._children:
            if child.restart_at is not None and child.restart_at <= now:
                self._start(child)

    def _stop_all(self, signals: _SignalPipe) -> None:
        running = [(child.spec.name, child.process) for child in self._children if child.process is not None]
        for child in self._children:
            child.process = None
        for _name, process in running:
            process.terminate()
        deadline = time.monotonic() + self._stop_timeout_s
        while running := [(name, process) for name, process in running if not _exited(name, process)]:
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                break
            if signals.wait(left_s) & _STOP_SIGNALS:
                log.warning("supervisor_stop_hurried", children=[name for name, _ in running])
                break
        for name, process in running:
            log.warning("child_killed", child=name, child_pid=process.pid)
            process.kill()
            process.wait()
            _exited(name, process)


def _exited(name: str, process: subprocess.Popen[bytes]) -> bool:
    if (returncode := process.poll()) is None:
        return False
    log.info("child_stopped", child=name, child_pid=process.pid, returncode=returncode)
    return True
