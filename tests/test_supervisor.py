"""The supervisor and `hookgate up`, with real processes: restarts, graceful stops, and no orphans."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from celery import Celery
from kombu import Connection

from consumers.celery_app import make_celery
from schemas.settings import Settings
from schemas.topology import INGEST_QUEUE

HOOKGATE = str(Path(sys.executable).with_name("hookgate"))

SLEEPER = "import time; time.sleep(120)"
CRASHER = "import sys; sys.exit(3)"
# Ignores SIGTERM, and says so only once it does, so the test never signals it too early.
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('stubborn ready', flush=True); " \
           "time.sleep(120)"

HARNESS = """
import json, sys
from consumers.logs import configure_logging
from gateway.supervisor import ChildSpec, Supervisor
configure_logging("harness", json=True)
config = json.loads(sys.argv[1])
specs = [ChildSpec(name, (sys.executable, "-c", code)) for name, code in config.pop("children").items()]
sys.exit(Supervisor(specs, **config).run())
"""


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (an exited child nobody has reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def descendants(root: int) -> set[int]:
    """Every living process below ``root``, found through /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1]


@dataclass
class Supervised:
    """A running supervisor process and the JSON log lines it and its children write."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def logs(self, event: str | None = None) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if event is None or record["event"] == event:
                    lines.append(record)
        return lines

    def pid_of(self, child: str) -> int:
        """The pid of the child's latest start."""
        return [line for line in self.logs("child_started") if line["child"] == child][-1]["child_pid"]

    def stop(self, signum: signal.Signals = signal.SIGTERM, timeout_s: float = 30) -> int:
        self.process.send_signal(signum)
        return self.process.wait(timeout=timeout_s)

    def kill_everything(self) -> None:
        for pid in {self.process.pid, *descendants(self.process.pid)}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def supervise(tmp_path: Path) -> Iterator[Callable[..., Supervised]]:
    """Start the supervisor on small Python children, in a session of its own like a terminal's job."""
    started: list[Supervised] = []

    def start(children: dict[str, str], **options: float) -> Supervised:
        log_path = tmp_path / f"supervisor-{len(started)}.log"
        config = json.dumps({"children": children, "backoff_initial_s": 0.1, "backoff_max_s": 0.4, **options})
        with log_path.open("wb") as log:
            process = subprocess.Popen([sys.executable, "-c", HARNESS, config], stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        supervised = Supervised(process, log_path)
        started.append(supervised)
        wait_until(lambda: len(supervised.logs("child_started")) >= len(children), 10, "the children to start")
        return supervised

    yield start
    for supervised in started:
        supervised.kill_everything()


def test_a_crashing_child_is_restarted_with_exponential_backoff(supervise: Callable[..., Supervised]) -> None:
    """A child that keeps exiting is restarted after doubling delays up to the cap, its sibling untouched."""
    supervised = supervise({"sleeper": SLEEPER, "crasher": CRASHER})
    sleeper = supervised.pid_of("sleeper")
    wait_until(lambda: len(supervised.logs("child_exited")) >= 5, 10, "five exits")
    exits = supervised.logs("child_exited")
    assert [e["restart_in_s"] for e in exits[:5]] == [0.1, 0.2, 0.4, 0.4, 0.4]
    assert all(e["child"] == "crasher" and e["returncode"] == 3 for e in exits)
    assert supervised.pid_of("sleeper") == sleeper and alive(sleeper)
    assert supervised.stop() == 0


def test_a_child_ignoring_sigterm_is_killed_after_the_stop_timeout(supervise: Callable[..., Supervised]) -> None:
    """A child still running when the stop timeout passes is SIGKILLed, and the supervisor still exits 0."""
    supervised = supervise({"stubborn": STUBBORN}, stop_timeout_s=1.0)
    child = supervised.pid_of("stubborn")
    wait_until(lambda: "stubborn ready" in supervised.log_path.read_text(), 10, "the child to ignore SIGTERM")
    started = time.monotonic()
    assert supervised.stop() == 0
    assert 1.0 <= time.monotonic() - started < 5
    assert [line["child"] for line in supervised.logs("child_killed")] == ["stubborn"]
    assert not alive(child)


def test_a_second_signal_cuts_the_stop_short(supervise: Callable[..., Supervised]) -> None:
    """A second Ctrl-C while children are stopping kills them at once instead of waiting out the timeout."""
    supervised = supervise({"stubborn": STUBBORN}, stop_timeout_s=60.0)
    child = supervised.pid_of("stubborn")
    wait_until(lambda: "stubborn ready" in supervised.log_path.read_text(), 10, "the child to ignore SIGTERM")
    supervised.process.send_signal(signal.SIGTERM)
    wait_until(lambda: supervised.logs("supervisor_stopping"), 5, "the stop to begin")
    started = time.monotonic()
    assert supervised.stop(signal.SIGINT, timeout_s=5) == 0
    assert time.monotonic() - started < 5
    assert not alive(child)


def test_a_terminal_ctrl_c_reaches_each_child_once_through_the_supervisor(
        supervise: Callable[..., Supervised]) -> None:
    """Children have process groups of their own: Ctrl-C to the job reaches only the supervisor, which sends SIGTERM."""
    supervised = supervise({"sleeper": SLEEPER})
    child = supervised.pid_of("sleeper")
    assert os.getpgid(child) == child != os.getpgid(supervised.process.pid)
    os.killpg(supervised.process.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
    assert supervised.process.wait(timeout=10) == 0
    (stopped,) = supervised.logs("child_stopped")
    assert stopped["returncode"] == -signal.SIGTERM


def test_children_die_when_the_supervisor_is_killed(supervise: Callable[..., Supervised]) -> None:
    """A SIGKILLed supervisor leaves no orphan: the kernel signals its children (PR_SET_PDEATHSIG)."""
    supervised = supervise({"one": SLEEPER, "two": SLEEPER})
    children = {supervised.pid_of("one"), supervised.pid_of("two")}
    supervised.process.kill()
    supervised.process.wait()
    wait_until(lambda: not any(alive(pid) for pid in children), 10, "the children to exit")


# `hookgate up`: the real processes, on this module's RabbitMQ vhost and a SQLite store.


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_pongs(app: Celery) -> list[str]:
    """The node names of the Celery workers answering a ping on the broker."""
    return [name for reply in app.control.ping(timeout=0.5) for name in reply]


def ingest_consumers(broker_url: str) -> int:
    with Connection(broker_url) as conn:
        return int(conn.default_channel.queue_declare(INGEST_QUEUE, passive=True).consumer_count)


def healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@dataclass
class Up(Supervised):
    port: int
    state_dir: Path

    def no_child_exited(self) -> bool:
        """True while every child still runs; a crash fails at once, with the log's tail, not after a timeout."""
        if exited := self.logs("child_exited"):
            tail = "\n".join(self.log_path.read_text().splitlines()[-30:])
            raise AssertionError(f"{exited[0]['child']} exited while `hookgate up` started:\n{tail}")
        return True


@pytest.fixture(scope="module")
def celery_control(broker_url: str) -> Iterator[Celery]:
    """A Celery app on this module's vhost, to ping workers as `celery inspect ping` does."""
    app = make_celery(Settings(broker_url=broker_url, result_backend="rpc://"))
    yield app
    # Closes the pooled broker connections too, which ``close`` alone leaves open.
    app.pool.force_close_all()
    app.close()


@pytest.fixture
def up(broker_url: str, celery_control: Celery, tmp_path: Path) -> Iterator[Up]:
    """`hookgate up` on a free port, once the gateway answers, the worker pongs and the router consumes."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOOKGATE_") or k.startswith("HOOKGATE_TEST_")}
    env.update(HOOKGATE_BROKER_URL=broker_url, HOOKGATE_DATABASE_URL=f"sqlite:///{tmp_path / 'hookgate.db'}",
               HOOKGATE_STATE_DIR=str(tmp_path / "state"), HOOKGATE_LOG_FORMAT="json",
               HOOKGATE_SHUTDOWN_TIMEOUT_S="10")
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([HOOKGATE, "up", "--port", str(port)], cwd=tmp_path, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    handle = Up(process, log_path, port, tmp_path / "state")
    try:
        for condition, what in ((lambda: healthy(port), "the gateway's /healthz"),
                                (lambda: worker_pongs(celery_control), "the worker to answer a ping"),
                                (lambda: ingest_consumers(broker_url) == 1, "the router to consume")):
            wait_until(lambda c=condition: handle.no_child_exited() and c(), 30, what)
        yield handle
    finally:
        handle.kill_everything()


def test_up_runs_every_process_with_the_operator_commands(up: Up, celery_control: Celery) -> None:
    """`hookgate up` runs the gateway, the router, a worker per queue and beat, as `python -m gateway.cli ...`."""
    names = ("gateway", "router", "worker-webhooks", "worker-email", "worker-heavy", "beat")
    commands = {name: cmdline(up.pid_of(name))[1:] for name in names}
    assert commands == {
        "gateway": ["-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--port", str(up.port)],
        "router": ["-m", "gateway.cli", "router"],
        "worker-webhooks": ["-m", "gateway.cli", "worker", "-Q", "webhooks"],
        "worker-email": ["-m", "gateway.cli", "worker", "-Q", "email"],
        "worker-heavy": ["-m", "gateway.cli", "worker", "-Q", "heavy"],
        "beat": ["-m", "gateway.cli", "beat"],
    }
    wait_until(lambda: len(worker_pongs(celery_control)) == 3, 30, "the three workers to answer a ping")
    assert sorted(name.split("@")[0] for name in worker_pongs(celery_control)) == ["email", "heavy", "webhooks"]
    # shelve picks the dbm flavour, and with it the file names: celerybeat-schedule, .db, or .dat and .dir.
    wait_until(lambda: list(up.state_dir.glob("celerybeat-schedule*")), 10, "beat's schedule in the state directory")
    assert alive(up.pid_of("beat"))
    assert {line["process"] for line in up.logs()} >= {"up", "gateway", "router", "worker", "beat"}


def test_up_restarts_a_killed_child(up: Up, broker_url: str) -> None:
    """A child killed with SIGKILL is logged and started again, and consumes again."""
    router = up.pid_of("router")
    os.kill(router, signal.SIGKILL)
    wait_until(lambda: up.pid_of("router") != router, 15, "the router to be restarted")
    (exited,) = up.logs("child_exited")
    assert exited["child"] == "router" and exited["returncode"] == -signal.SIGKILL
    wait_until(lambda: ingest_consumers(broker_url) == 1, 30, "the new router to consume")
    assert alive(up.pid_of("router"))


def test_sigterm_stops_everything_and_exits_0(up: Up) -> None:
    """SIGTERM to `hookgate up` stops every child and grandchild gracefully, in bounded time, with exit code 0."""
    tree = descendants(up.process.pid)
    assert len(tree) >= 6  # five children, and the workers' pools
    started = time.monotonic()
    assert up.stop(timeout_s=30) == 0
    assert time.monotonic() - started < 15
    assert not [pid for pid in tree if alive(pid)]
    assert up.logs("child_killed") == []


def test_sigkill_of_up_leaves_no_process_behind(up: Up) -> None:
    """Even when `hookgate up` is SIGKILLed, every process it started exits on its own."""
    tree = descendants(up.process.pid)
    up.process.kill()
    up.process.wait()
    wait_until(lambda: not [pid for pid in tree if alive(pid)], 20, "every descendant to exit")
