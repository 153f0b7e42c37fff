"""The reliability suite's harness: a whole hookgate, a real load, and the check every case ends with.

A case runs ``hookgate serve``, ``hookgate router`` and ``hookgate worker -Q webhooks`` as child
processes (``Stack``), two receivers subscribed to ``order.*`` and ``#``, drives events at them
through HTTP with clients that retry on a 503 or a refused connection, each event under its own
``Idempotency-Key`` (``Load``), breaks something mid-load, and finally calls ``check_drained``:
every event the gateway answered 202 for reached every matching receiver, the store recorded no
delivery as succeeding twice, no delivery is left open, and a summary is printed.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from kombu import Connection
from sqlalchemy import func, select

from consumers.announce import SOURCE as HOOKGATE_SOURCE
from consumers.store.database import make_engine, make_sessionmaker
from consumers.store.keys import create_api_key
from consumers.store.models import Attempt, Delivery, Event
from consumers.topics import topic_matches
from consumers.topology import declare_topology
from schemas import topology
from schemas.deliveries import OPEN_STATUSES, DeliveryStatus
from schemas.keys import Scope
from schemas.settings import Settings
from tests.receiver import Receiver, make_secret
from tests.workers import Hookgate, free_port, wait_until

__all__ = ["EVENT_TYPES", "Load", "Stack", "check_drained", "reliability_settings", "running_stack"]

EVENT_TYPES = ("order.created", "user.created")
# Receiver name -> the patterns of its subscription; events of either type reach "all".
PATTERNS = {"orders": ("order.*",), "all": ("#",)}
_RETRYABLE_STATUSES = {502, 503, 504}


def reliability_settings(broker_url: str, database_url: str, **overrides: object) -> Settings:
    """Settings for a case: short time limits (a killed worker's lease runs out soon), quick retries."""
    values: dict[str, object] = {
        "broker_url": broker_url,
        "database_url": database_url,
        "allow_private_targets": True,
        "port": free_port(),
        "router_batch_wait_s": 0.01,
        "webhook_timeout_s": 2.0,
        # Thirty quick attempts: a receiver down for seconds is retried until it is back.
        "retry_schedule": (0, 1, 1, 2, *(3,) * 26),
        # A receiver down opens its breaker; probe it again soon, so the case drains in seconds.
        "breaker_probe_interval_s": 1.0,
        "breaker_probe_interval_max_s": 2.0,
        # Past the soft limit a batch's unfinished sends count as failed; a cold worker on a busy machine
        # needs seconds for its first task (imports, TLS context). A case that kills a worker lowers
        # these: its deliveries stay leased for the hard limit plus 30 s.
        "task_soft_time_limit_s": 20,
        "task_time_limit_s": 25,
        "publish_timeout_s": 2.0,
        "broker_retry_after_s": 1,
        "log_format": "json",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@dataclass
class Stack:
    """The processes of one case, its admin key and its receivers (name -> receiver)."""

    settings: Settings
    logs: Path
    key: str
    gateway: Hookgate
    router: Hookgate
    workers: list[Hookgate]
    receivers: dict[str, Receiver]
    secrets: dict[str, str]
    # Receivers that were taken down (and replaced on the same port): their requests count too.
    retired: dict[str, list[Receiver]] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    def processes(self) -> list[Hookgate]:
        return [self.gateway, self.router, *self.workers]

    def take_down(self, name: str) -> int:
        """Stop receiver ``name``: its port refuses connections until ``bring_back``. Returns the port."""
        receiver = self.receivers.pop(name)
        receiver.__exit__(None, None, None)
        self.retired.setdefault(name, []).append(receiver)
        return int(receiver.base_url.rsplit(":", 1)[1])

    def bring_back(self, name: str, port: int) -> None:
        """A new receiver ``name`` on the old port, so the subscription's URL reaches it."""
        self.receivers[name] = Receiver(self.secrets[name], port=port).__enter__()

    def dump_logs(self) -> None:
        for process in self.processes():
            print(f"--- {process.log_path.name} (last 3000 characters) ---\n{process.log_text()[-3000:]}")


@contextlib.contextmanager
def running_stack(settings: Settings, logs: Path, *, workers: int = 1, concurrency: int = 2) -> Iterator[Stack]:
    """Gateway, router and ``workers`` webhook workers, and two subscribed receivers, on empty queues."""
    with Connection(settings.broker_url) as conn:
        declare_topology(conn)
        for queue in (topology.INGEST_QUEUE, topology.WEBHOOKS_QUEUE):
            conn.default_channel.queue_purge(queue)
    engine = make_engine(settings.database_url)
    try:
        _, key = create_api_key(make_sessionmaker(engine), "reliability", [Scope.ADMIN])
    finally:
        engine.dispose()
    gateway = Hookgate(settings, logs / "serve.log", "serve", "--port", str(settings.port))
    router = Hookgate(settings, logs / "router.log", "router")
    worker_processes = [
        Hookgate(settings, logs / f"worker-{n}.log", "worker", "-Q", topology.WEBHOOKS_QUEUE, "-c", str(concurrency),
                 "-n", f"webhooks-{n}-{uuid.uuid4().hex[:6]}@%h")
        for n in range(workers)
    ]
    secrets = {name: make_secret() for name in PATTERNS}
    state = Stack(settings, logs, key, gateway, router, worker_processes, {}, secrets)
    started: list[Hookgate] = []
    try:
        for name in PATTERNS:
            state.receivers[name] = Receiver(secrets[name]).__enter__()
        for process in state.processes():
            started.append(process.start())
        for name, patterns in PATTERNS.items():
            response = httpx.post(f"{state.base_url}/v1/subscriptions", headers={"Authorization": f"Bearer {key}"},
                                  json={"url": state.receivers[name].url, "secret": secrets[name],
                                        "event_types": list(patterns)})
            assert response.status_code == 201, response.text
        yield state
    except BaseException:
        state.dump_logs()
        raise
    finally:
        for process in started:
            process.stop()
        for receiver in [*state.receivers.values(), *itertools.chain(*state.retired.values())]:
            receiver.__exit__(None, None, None)


class Load:
    """``count`` events posted by ``clients`` threads at about ``rate_per_s``, each retried until it gets a 202.

    A client retries on a 502/503/504 or a transport error (the gateway down, the broker down), with
    the same ``Idempotency-Key``, so a retry is the same event. Anything else fails the load.
    """

    def __init__(self, stack: Stack, count: int, *, rate_per_s: float = 400.0, clients: int = 8,
                 give_up_s: float = 60.0) -> None:
        self._url = f"{stack.base_url}/v1/events"
        self._auth = {"Authorization": f"Bearer {stack.key}"}
        self.count = count
        self.clients = clients
        self._rate = rate_per_s
        self._give_up_s = give_up_s
        self._run = uuid.uuid4().hex[:8]
        self._next = itertools.count()
        self._lock = threading.Lock()
        self.accepted: dict[str, str] = {}  # event id -> type, from the 202s
        self.unavailable = 0  # 5xx answers that asked for a retry
        self.transport_errors = 0
        self.failures: list[str] = []
        self._threads = [threading.Thread(target=self._client, name=f"load-{n}", daemon=True) for n in range(clients)]
        self.started_at = 0.0
        self.finished_at = 0.0

    def start(self) -> Load:
        self.started_at = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def wait_accepted(self, count: int, timeout_s: float = 60.0) -> None:
        wait_until(lambda: len(self.accepted) >= count or bool(self.failures), f"{count} accepted events",
                   timeout_s)
        assert not self.failures, self.failures[:5]

    def join(self, timeout_s: float = 90.0) -> None:
        for thread in self._threads:
            thread.join(max(0.0, self.started_at + timeout_s - time.monotonic()))
            assert not thread.is_alive(), "the load did not finish"
        self.finished_at = time.monotonic()
        assert not self.failures, self.failures[:5]
        assert len(self.accepted) == self.count

    def _client(self) -> None:
        with httpx.Client(timeout=10) as client:
            while (n := next(self._next)) < self.count:
                delay = self.started_at + n / self._rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                event_type = EVENT_TYPES[n % len(EVENT_TYPES)]
                event_id = f"rel-{self._run}-{n}"
                try:
                    self._post(client, event_id, event_type)
                except Exception as exc:  # the thread must report, not die silently
                    with self._lock:
                        self.failures.append(f"{event_id}: {exc!r}")
                    return

    def _post(self, client: httpx.Client, event_id: str, event_type: str) -> None:
        give_up = time.monotonic() + self._give_up_s
        body = {"type": event_type, "source": "reliability", "data": {"key": event_id}}
        while True:
            try:
                response = client.post(self._url, json=body, headers={**self._auth, "Idempotency-Key": event_id})
            except httpx.TransportError:
                with self._lock:
                    self.transport_errors += 1
            else:
                if response.status_code == 202:
                    assert response.json()["id"] == event_id, response.text
                    with self._lock:
                        self.accepted[event_id] = event_type
                    return
                if response.status_code not in _RETRYABLE_STATUSES:
                    raise AssertionError(f"HTTP {response.status_code}: {response.text}")
                assert response.headers["content-type"] == "application/problem+json", response.headers
                with self._lock:
                    self.unavailable += 1
            if time.monotonic() > give_up:
                raise AssertionError(f"no 202 within {self._give_up_s} s")
            time.sleep(0.1)


def _expected(load: Load) -> dict[str, set[str]]:
    """Receiver name -> the event ids it must get: every accepted event whose type its patterns match."""
    return {
        name: {event_id for event_id, event_type in load.accepted.items()
               if any(topic_matches(pattern, event_type) for pattern in patterns)}
        for name, patterns in PATTERNS.items()
    }


def _received(stack: Stack, name: str) -> list[tuple[str | None, str]]:
    """(webhook-id, event key) of every load event receiver ``name`` answered with a 2xx, retired ones included.

    hookgate's own announcements (a breaker opening while a receiver is down) reach ``#`` too; they are
    not part of the load."""
    ledger = [r for receiver in [*stack.retired.get(name, []), stack.receivers[name]] for r in receiver.ledger]
    return [(r.webhook_id, r.json()["data"]["key"]) for r in ledger
            if 200 <= r.status < 300 and r.verified and not r.json()["type"].startswith("hookgate.")]


def check_drained(stack: Stack, load: Load, case: str, timeout_s: float = 90.0) -> None:
    """Wait until every accepted event reached every matching receiver; then check the store and print a summary."""
    expected = _expected(load)

    def delivered() -> bool:
        return all(expected[name] <= {key for _, key in _received(stack, name)} for name in PATTERNS)

    deadline = time.monotonic() + timeout_s
    while not delivered():
        if time.monotonic() > deadline:
            missing = {name: sorted(expected[name] - {key for _, key in _received(stack, name)}) for name in PATTERNS}
            stack.dump_logs()
            raise AssertionError(f"{case}: not every accepted event was delivered within {timeout_s} s: missing "
                                 f"{ {name: (len(keys), keys[:5]) for name, keys in missing.items()} }")
        time.sleep(0.1)
    drained_at = time.monotonic()

    engine = make_engine(stack.settings.database_url)
    try:
        sessions = make_sessionmaker(engine)

        def store_settled() -> bool:
            with sessions() as session:
                return not session.execute(
                    select(func.count()).select_from(Delivery).where(Delivery.status.in_(list(OPEN_STATUSES)))
                ).scalar_one()

        # The receivers answered; the workers record the outcome just after. A killed worker's sends that
        # reached a receiver but were never recorded are sent again once their lease has run out.
        lease_s = stack.settings.task_time_limit_s + stack.settings.lease_margin_s
        wait_until(store_settled, "no open delivery left in the store", timeout_s=lease_s + 30, interval_s=0.1)
        with sessions() as session:
            stored_events = set(session.execute(select(Event.id).where(Event.source != HOOKGATE_SOURCE)).scalars())
            statuses = Counter(session.execute(
                select(Delivery.status).join(Event).where(Event.source != HOOKGATE_SOURCE)
            ).scalars())
            double_successes = session.execute(
                select(Attempt.delivery_id, func.count())
                .where(Attempt.status_code >= 200, Attempt.status_code < 300)
                .group_by(Attempt.delivery_id)
                .having(func.count() > 1)
            ).all()
    finally:
        engine.dispose()

    received = {name: _received(stack, name) for name in PATTERNS}
    # Measured: the distinct webhook-ids the receivers answered, each one delivery.
    delivered = sum(len({webhook_id for webhook_id, _ in got}) for got in received.values())
    receiver_duplicates = sum(len(got) for got in received.values()) - delivered
    expected_deliveries = sum(len(ids) for ids in expected.values())
    print(f"\n[reliability] {case}: accepted {len(load.accepted)} events (clients were told to retry "
          f"{load.unavailable} times by a 5xx and {load.transport_errors} times by a refused connection), "
          f"delivered {delivered} deliveries of {expected_deliveries} expected, duplicates seen by the receivers "
          f"{receiver_duplicates}, "
          f"time to drain {drained_at - load.finished_at:.1f} s after the load ended "
          f"({drained_at - load.started_at:.1f} s after it began); store: {dict(statuses)}")

    # Every accepted event is stored once, and nothing the gateway did not accept got in.
    assert stored_events == set(load.accepted), (len(stored_events), len(load.accepted))
    # One delivery per matching (event, subscription), each succeeded exactly once in the store.
    assert statuses == Counter({DeliveryStatus.SUCCEEDED.value: expected_deliveries}), statuses
    assert not double_successes, f"deliveries recorded as succeeding more than once: {double_successes[:5]}"
    # Each webhook-id names one delivery: one event for one receiver, whatever the redeliveries.
    for name, got in received.items():
        keys_by_id: dict[str | None, set[str]] = {}
        for webhook_id, key in got:
            keys_by_id.setdefault(webhook_id, set()).add(key)
        assert None not in keys_by_id
        assert all(len(keys) == 1 for keys in keys_by_id.values())
        assert len(keys_by_id) == len(expected[name]), (name, len(keys_by_id), len(expected[name]))
