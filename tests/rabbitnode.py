"""A private RabbitMQ node for tests that stop or kill the broker, so the shared one is never touched.

Usage::

    with RabbitNode(tmp_path / "rabbit") as node:   # started; ~6 s on 2 cores
        settings = Settings(broker_url=node.url)
        node.stop()                                    # `rabbitmqctl stop`: a clean broker shutdown
        node.start()                                   # same data directory: durable queues come back
        node.kill()                                    # SIGKILL of the Erlang VM

The node runs the machine's ``rabbitmq-server`` as a child process under a node name, ports,
data and log directories and an Erlang cookie of its own (in a private ``HOME``), with no
plugins and no config file, listening on 127.0.0.1 only. Leaving the block kills it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from tests.workers import free_port

__all__ = ["RabbitNode"]

# The Debian package's /usr/sbin wrappers switch to the rabbitmq user when run as root, which
# could not write our directories; the scripts they wrap take the environment as it is.
_SCRIPTS = Path("/usr/lib/rabbitmq/bin")


def _script(name: str) -> str:
    path = _SCRIPTS / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed: the reliability tests need RabbitMQ (run scripts/setup.sh)")
    return found


class RabbitNode:
    """One RabbitMQ node of our own; ``url`` is its AMQP URL (user guest, vhost ``/``)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.name = f"hookgate-rel-{secrets.token_hex(4)}@localhost"
        self.port = free_port()
        home = base / "home"
        for directory in (home, base / "mnesia", base / "log"):
            directory.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        cookie.chmod(0o400)
        (base / "enabled_plugins").write_text("[].\n")
        self.env = {
            **os.environ,
            "HOME": str(home),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            # Names of files that do not exist: the machine's own config and env files stay out.
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
        }
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def ctl(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([_script("rabbitmqctl"), "-n", self.name, *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout_s)

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the node (again, on the same data) and wait until it accepts connections."""
        with (self.base / "server.out").open("ab") as out:
            self._process = subprocess.Popen([_script("rabbitmq-server")], env=self.env, stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        # await_startup fails at once while the node has not registered with epmd yet: ask again.
        while self.ctl("await_startup", "--timeout", "5", timeout_s=30).returncode != 0:
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"RabbitMQ node {self.name} did not start; its output:\n{self.output()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """A clean broker shutdown (``rabbitmqctl stop``), as an operator's restart does."""
        result = self.ctl("stop")
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl stop failed: {result.stderr or result.stdout}")
        if self._process is not None:
            self._process.wait(timeout=60)
            self._process = None

    def kill(self) -> None:
        """SIGKILL the node's process group: the broker vanishes mid-flight."""
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)

    def output(self) -> str:
        path = self.base / "server.out"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def __enter__(self) -> RabbitNode:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()
