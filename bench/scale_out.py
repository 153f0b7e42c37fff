"""Scale-out measurement: 2 gateways, 2 routers and 1, 2, 4 webhook workers side by side on PostgreSQL.

    .venv/bin/python -m bench.scale_out [--workers 1 2 4] [--seconds 10] [--rate 600] [--receiver-delay 0.02]

Every process is started as an operator would start it (``hookgate serve``, ``router``, ``worker -Q
webhooks -c 1 -n NAME``) against one PostgreSQL database and one RabbitMQ vhost, both made for the
run and removed after it. For each worker count the same load is driven through both gateways at
once; the receiver's ledger of ``webhook-id``s and the store then say how many events were lost
(accepted, never received), how many requests the receiver saw twice, and whether the store
recorded any delivery as succeeding twice. The rate is deliveries over the time from the first send
to the last receipt, and each process kind's CPU per delivery says where the two cores went.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import psycopg
from sqlalchemy import func, select

from bench.run import (
    Result,
    broker_pid,
    cpu_note,
    drive,
    e2e_result,
    free_port,
    group_cpu_s,
    process,
    rabbitmqctl,
    wait_http,
)
from consumers.store.database import make_engine, make_sessionmaker, migrate
from consumers.store.keys import create_api_key
from consumers.store.models import Attempt, Delivery
from schemas.keys import Scope

PG_ADMIN_URL = os.environ.get("HOOKGATE_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def read_ids(path: Path) -> list[tuple[bytes, int, int]]:
    """(webhook-id, sent ns, arrived ns) of every request the receiver logged."""
    rows = []
    for line in path.read_bytes().splitlines():
        webhook_id, sent, arrived = line.split()
        rows.append((webhook_id, int(sent), int(arrived)))
    return rows


def wait_distinct(path: Path, expected: int, timeout_s: float) -> list[tuple[bytes, int, int]]:
    """The ledger once it holds ``expected`` distinct webhook-ids, or whatever it holds at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = read_ids(path)
        if len({row[0] for row in rows}) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


async def drive_both(ports: list[int], key: str, seconds: float, connections: int,
                     rate: float | None) -> tuple[int, int]:
    """The same load through every gateway at once: each gets an equal share of connections and rate."""
    share = len(ports)
    results = await asyncio.gather(*(drive(port, key, seconds, connections // share,
                                           rate / share if rate else None) for port in ports))
    return sum(ok for ok, _ in results), sum(errors for _, errors in results)


def store_check(database_url: str, timeout_s: float = 60) -> tuple[Counter[str], int]:
    """Delivery statuses once none is open, and how many deliveries have more than one success recorded."""
    engine = make_engine(database_url)
    try:
        sessions = make_sessionmaker(engine)
        deadline = time.monotonic() + timeout_s
        while True:
            with sessions() as session:
                statuses = Counter(dict(session.execute(
                    select(Delivery.status, func.count()).group_by(Delivery.status)).tuples().all()))
                doubles = len(session.execute(
                    select(Attempt.delivery_id).where(Attempt.status_code >= 200, Attempt.status_code < 300)
                    .group_by(Attempt.delivery_id).having(func.count() > 1)).all())
            if set(statuses) <= {"succeeded"} or time.monotonic() > deadline:
                return statuses, doubles
            time.sleep(0.5)
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32, help="in all, shared by the gateways")
    parser.add_argument("--rate", type=float, default=None, help="events/s offered in all (default: flat out)")
    parser.add_argument("--receiver-delay", type=float, default=0.02, help="the receiver's answer time (s)")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()

    run_id = uuid.uuid4().hex[:8]
    vhost, database = f"hookgate-scale-{run_id}", f"hookgate_scale_{run_id}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    database_url = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{database}"
    work = Path(f"/tmp/hookgate-scale-{run_id}")
    work.mkdir()
    try:
        results = run(args, vhost, database_url, work)
    finally:
        rabbitmqctl("delete_vhost", vhost)
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    print(f"\n2 gateways, 2 routers, PostgreSQL store, receiver answering in {args.receiver_delay:.3f} s, "
          f"{args.seconds} s of load per round, {os.cpu_count()} cores; logs in {work}\n")
    print(f"{'webhook workers':16} {'delivered/s':>11} {'vs 1 worker':>11} {'p50 ms':>8} {'p99 ms':>8}  note")
    first = results[0][1].rate or 1.0
    for workers, result in results:
        print(f"{workers:16} {result.rate:11.0f} {result.rate / first:11.2f} {result.p50_ms or 0:8.0f} "
              f"{result.p99_ms or 0:8.0f}  {result.note}")


def run(args: argparse.Namespace, vhost: str, database_url: str, work: Path) -> list[tuple[int, Result]]:
    migrate(database_url)
    engine = make_engine(database_url)
    _, key = create_api_key(make_sessionmaker(engine), "scale-out", [Scope.ADMIN])
    engine.dispose()
    env = {**os.environ, "HOOKGATE_BROKER_URL": f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
           "HOOKGATE_DATABASE_URL": database_url, "HOOKGATE_ALLOW_PRIVATE_TARGETS": "true",
           "HOOKGATE_LOG_LEVEL": args.log_level, "HOOKGATE_LOG_FORMAT": "json", "HOOKGATE_STATE_DIR": str(work),
           "HOOKGATE_ENDPOINT_MAX_IN_FLIGHT": "1024"}
    hookgate = [sys.executable, "-m", "gateway.cli"]
    ledger = work / "ledger.txt"
    receiver_port, ports = free_port(), [free_port(), free_port()]
    results: list[tuple[int, Result]] = []
    with contextlib.ExitStack() as stack:
        receiver = stack.enter_context(process(
            [sys.executable, "-m", "uvicorn", "bench.receiver:app", "--port", str(receiver_port), "--http",
             "httptools", "--loop", "uvloop", "--no-access-log", "--log-level", "warning"],
            {**env, "BENCH_LEDGER": str(ledger), "BENCH_DELAY_S": str(args.receiver_delay)}, work / "receiver.log"))
        gateways = [stack.enter_context(process([*hookgate, "serve", "--port", str(port)], env,
                                                work / f"serve-{i}.log")) for i, port in enumerate(ports)]
        routers = [stack.enter_context(process([*hookgate, "router"], env, work / f"router-{i}.log"))
                   for i in range(2)]
        for port in ports:
            wait_http(f"http://127.0.0.1:{port}/readyz")
        created = httpx.post(f"http://127.0.0.1:{ports[0]}/v1/subscriptions",
                             headers={"Authorization": f"Bearer {key}"},
                             json={"event_types": ["order.*"], "url": f"http://127.0.0.1:{receiver_port}/hook"})
        created.raise_for_status()
        time.sleep(2)  # the routers' subscription caches
        for count in args.workers:
            with contextlib.ExitStack() as round_stack:
                workers = [round_stack.enter_context(process(
                    [*hookgate, "worker", "-Q", "webhooks", "-c", "1", "-n", f"scale-{count}-{i}@%h"], env,
                    work / f"worker-{count}-{i}.log")) for i in range(count)]
                # Warm up: the workers' first tasks (imports, connections) are not part of the figure.
                ledger.write_bytes(b"")
                warm, _ = asyncio.run(drive_both(ports, key, 1, 4, 50))
                wait_distinct(ledger, warm, timeout_s=60)
                groups = {"gateways": [g.pid for g in gateways], "routers": [r.pid for r in routers],
                          "workers": [w.pid for w in workers], "receiver": [receiver.pid], "rabbitmq": [broker_pid()]}
                ledger.write_bytes(b"")
                before = group_cpu_s(groups)
                accepted, errors = asyncio.run(drive_both(ports, key, args.seconds, args.connections, args.rate))
                rows = wait_distinct(ledger, accepted, timeout_s=max(60.0, accepted / 100))
                statuses, doubles = store_check(database_url)
                first_receipts = {webhook_id: (sent, arrived) for webhook_id, sent, arrived in reversed(rows)}
                result = e2e_result(f"{count} worker(s)", list(first_receipts.values()), accepted, errors)
                result.note = (f"accepted {accepted}, received {len(first_receipts)}, "
                               f"lost {accepted - len(first_receipts)}, "
                               f"requests the receiver saw twice {len(rows) - len(first_receipts)}, "
                               f"deliveries with two successes in the store {doubles}, "
                               f"open deliveries {sum(n for status, n in statuses.items() if status != 'succeeded')}"
                               + cpu_note(groups, before, len(first_receipts)))
                results.append((count, result))
                print(count, result, flush=True)
    return results


if __name__ == "__main__":
    main()
