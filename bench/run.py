"""hookgate's benchmark: one command, every figure beside the baselines measured in the same run.

    .venv/bin/python -m bench.run [--seconds 10] [--connections 64] [--http-workers 1] [--e2e-rate 1000]
                                  [--only ceiling bare ingest batch e2e slow] [--receiver-delay 0.1]

Phases: the raw ceiling (aio-pika, confirmed persistent publishes, many in flight); bare
Starlette parsing a POST and answering 202; hookgate's durable ingest, single events and
batches (wrk, 1 KB events); end to end, accepted -> received by a local receiver, at a fixed
offered rate and flat out; and "slow", a receiver that answers after 100 ms, reached first the
way the Celery guide sends webhooks (bench/celery_guide.py) and then through hookgate.
Everything runs on this machine: the figures include the load
generator, RabbitMQ and the receiver sharing its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import httpx
import orjson

from bench import celery_guide
from consumers.store.database import make_engine, make_sessionmaker, migrate
from consumers.store.keys import create_api_key
from schemas.keys import Scope

ROOT = Path(__file__).resolve().parent.parent
# Every delivery of a phase goes to one endpoint, so the worker lifts the per-endpoint limit (64 by
# default). That limit counts a delivery from its claim to its recorded attempt, not only while the
# request is open, so at 64 one endpoint gets ~600 deliveries/s even from an instant receiver.
ONE_ENDPOINT_WORKER_ENV = {"HOOKGATE_ENDPOINT_MAX_IN_FLIGHT": "1024"}
PAYLOAD = {"order_id": "o-123456", "customer": {"id": "c-42", "email": "someone@example.com"},
           "lines": [{"sku": f"sku-{i}", "qty": i, "price_cents": 1999} for i in range(14)]}


@dataclass
class Result:
    name: str
    rate: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    note: str = ""
    # CPU time per event of the app's processes and of RabbitMQ: where the cores went.
    app_us: float | None = None
    broker_us: float | None = None


_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    # Fields after the command name, which may itself contain spaces and parentheses.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def tree_cpu_s(root: int) -> float:
    """CPU seconds used so far by a process and all of its living descendants."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(_stat(int(entry.name))[1])
            except (OSError, IndexError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        tree.update(children)
        frontier.extend(children)
    total = 0.0
    for pid in tree:
        try:
            fields = _stat(pid)
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) * _TICK_S
    return total


def broker_pid() -> int:
    return int(subprocess.run(["pgrep", "-o", "beam.smp"], capture_output=True, text=True, check=True).stdout)


@contextmanager
def cpu_meter(result_holder: list[Result], app_pids: list[int]) -> Iterator[None]:
    """Fill in the CPU per event of ``app_pids`` (trees) and RabbitMQ for the result appended inside the block."""
    broker = broker_pid()
    before_app, before_broker = sum(tree_cpu_s(p) for p in app_pids), tree_cpu_s(broker)
    started = time.perf_counter()
    yield
    elapsed = time.perf_counter() - started
    result = result_holder[-1]
    events = result.rate * elapsed
    if events:
        result.app_us = (sum(tree_cpu_s(p) for p in app_pids) - before_app) / events * 1e6
        result.broker_us = (tree_cpu_s(broker) - before_broker) / events * 1e6


def group_cpu_s(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far by each group of process trees."""
    return {name: sum(tree_cpu_s(pid) for pid in pids) for name, pids in groups.items()}


def cpu_note(groups: dict[str, list[int]], before: dict[str, float], deliveries: int) -> str:
    """Where the two cores went, per delivered event, since ``before``: the profile behind a figure."""
    if not deliveries:
        return ""
    now = group_cpu_s(groups)
    return "; CPU µs/delivery: " + ", ".join(f"{g} {(now[g] - before[g]) / deliveries * 1e6:.0f}" for g in groups)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def event_body(extra: dict[str, object] | None = None, event_type: str = "order.paid") -> bytes:
    return orjson.dumps({"type": event_type, "source": "bench", "data": {**PAYLOAD, **(extra or {})}})


@contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_http(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 in {timeout_s} s")


_LATENCY_RE = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk(name: str, url: str, body: bytes, headers: dict[str, str], seconds: int, connections: int,
        events_per_request: int = 1) -> Result:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write('wrk.method = "POST"\n')
        script.write(f"wrk.body = {lua_string(body.decode())}\n")
        for key, value in headers.items():
            script.write(f'wrk.headers["{key}"] = "{value}"\n')
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script.name, url],
                         capture_output=True, text=True, check=True).stdout
    os.unlink(script.name)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    lat = {m.group(1): float(m.group(2)) * _UNIT_MS[m.group(3)] for m in _LATENCY_RE.finditer(out)}
    note = f"{events_per_request} events/request" if events_per_request > 1 else ""
    if socket_errors:
        note += f" socket errors: {socket_errors.group(1)}"
    return Result(name, rate * events_per_request, lat.get("50"), lat.get("99"),
                  int(errors.group(1)) if errors else 0, note.strip())


def lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def aio_pika_ceiling(url: str, seconds: float, in_flight: int = 256) -> Result:
    connection = await aio_pika.connect(url)
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    exchange = await channel.declare_exchange("bench.ceiling", aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(f"bench.ceiling.{uuid.uuid4().hex[:8]}", durable=True,
                                        arguments={"x-queue-type": "quorum"})
    await queue.bind(exchange, "#")
    body = event_body()
    sent = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal sent
        while time.perf_counter() < deadline:
            await exchange.publish(aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                                    message_id=str(sent)), routing_key="order.paid", timeout=10)
            sent += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - started
    await queue.delete(if_unused=False, if_empty=False)
    await exchange.delete()
    await connection.close()
    return Result("raw ceiling: aio-pika confirmed publish (quorum queue)", sent / elapsed,
                  note=f"{in_flight} in flight")


async def drive(port: int, key: str, seconds: float, connections: int, rate: float | None,
                event_type: str = "order.paid") -> tuple[int, int]:
    """POST events for ``seconds``, closed loop per connection or open loop at ``rate``/s; returns (ok, errors)."""
    ok = errors = 0
    deadline = time.perf_counter() + seconds
    interval = connections / rate if rate else 0.0

    async def connection_loop(offset: float) -> None:
        nonlocal ok, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        next_at = time.perf_counter() + offset
        while (now := time.perf_counter()) < deadline:
            if interval:
                if next_at > now:
                    await asyncio.sleep(next_at - now)
                next_at += interval
            body = event_body({"sent_ns": time.time_ns()}, event_type)
            writer.write(b"POST /v1/events HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (key.encode(), len(body), body))
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            if head.startswith(b"HTTP/1.1 202"):
                ok += 1
            else:
                errors += 1
        writer.close()

    await asyncio.gather(*(connection_loop(i * interval / connections) for i in range(connections)))
    return ok, errors


def read_ledger(path: Path) -> list[tuple[int, int]]:
    rows = []
    for line in path.read_bytes().splitlines():
        _, sent, arrived = line.split()
        rows.append((int(sent), int(arrived)))
    return rows


def wait_ledger(path: Path, expected: int, timeout_s: float) -> list[tuple[int, int]]:
    deadline = time.monotonic() + timeout_s
    rows: list[tuple[int, int]] = []
    while time.monotonic() < deadline:
        rows = read_ledger(path) if path.exists() else []
        if len(rows) >= expected:
            break
        time.sleep(0.5)
    return rows


def e2e_result(name: str, rows: list[tuple[int, int]], accepted: int, errors: int) -> Result:
    latencies = sorted((arrived - sent) / 1e6 for sent, arrived in rows)
    if not latencies:
        return Result(name, 0.0, errors=errors, note=f"nothing delivered of {accepted} accepted")
    first_sent = min(sent for sent, _ in rows)
    last_arrived = max(arrived for _, arrived in rows)
    rate = len(rows) / ((last_arrived - first_sent) / 1e9)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return Result(name, rate, statistics.median(latencies), p99, errors,
                  f"{len(rows)} delivered of {accepted} accepted")


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--http-workers", type=int, default=1)
    parser.add_argument("--webhook-concurrency", type=int, default=2)
    parser.add_argument("--e2e-rate", type=float, default=1000.0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--database-url", default="", help="default: a fresh SQLite file")
    parser.add_argument("--only", nargs="*", default=["ceiling", "bare", "ingest", "batch", "e2e", "slow"])
    parser.add_argument("--receiver-delay", type=float, default=0.1, help="the slow receiver's answer time (s)")
    parser.add_argument("--baseline-events", type=int, default=200, help="events the Celery-guide baseline sends")
    parser.add_argument("--slow-workers", type=int, default=4, help="worker processes (-c) in the slow phase")
    parser.add_argument("--slow-rate", type=float, default=None,
                        help="events/s offered in the slow phase (default: flat out)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, store) for a look")
    parser.add_argument("--log-level", default="WARNING", help="the processes' HOOKGATE_LOG_LEVEL (INFO costs CPU)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install -y wrk")

    work = Path(tempfile.mkdtemp(prefix="hookgate-bench-"))
    vhost = f"hookgate-bench-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    broker_url = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    database_url = args.database_url or f"sqlite:///{work / 'hookgate.db'}"
    migrate(database_url)
    engine = make_engine(database_url)
    _, key = create_api_key(make_sessionmaker(engine), "bench", [Scope.ADMIN])
    engine.dispose()
    env = {**os.environ, "HOOKGATE_BROKER_URL": broker_url, "HOOKGATE_DATABASE_URL": database_url,
           "HOOKGATE_ALLOW_PRIVATE_TARGETS": "true", "HOOKGATE_LOG_LEVEL": args.log_level,
           "HOOKGATE_LOG_FORMAT": "json", "HOOKGATE_STATE_DIR": str(work)}
    hookgate = [sys.executable, "-m", "gateway.cli"]
    results: list[Result] = []
    print(f"work dir {work}, vhost {vhost}, {os.cpu_count()} cores", flush=True)
    try:
        if "ceiling" in args.only:
            results.append(asyncio.run(aio_pika_ceiling(broker_url, args.seconds)))
            print(results[-1], flush=True)
        if "bare" in args.only:
            port = free_port()
            with process([sys.executable, "-m", "uvicorn", "bench.bare_app:app", "--port", str(port),
                          "--http", "httptools", "--loop", "uvloop", "--no-access-log", "--log-level", "warning"],
                         env, work / "bare.log"):
                time.sleep(1.5)
                results.append(wrk("bare Starlette POST + 202 (no publish)", f"http://127.0.0.1:{port}/v1/events",
                                   event_body(), {"Content-Type": "application/json"}, args.seconds,
                                   args.connections))
            print(results[-1], flush=True)
        port = free_port()
        auth = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        with process([*hookgate, "serve", "--port", str(port), "--workers", str(args.http_workers)],
                     env, work / "serve.log") as serve:
            wait_http(f"http://127.0.0.1:{port}/readyz")
            if "ingest" in args.only:
                with cpu_meter(results, [serve.pid]):
                    results.append(wrk("hookgate ingest, single events (202 after confirm)",
                                       f"http://127.0.0.1:{port}/v1/events", event_body(), auth, args.seconds,
                                       args.connections))
                print(results[-1], flush=True)
                rabbitmqctl("purge_queue", "-p", vhost, "hookgate.ingest")
            if "batch" in args.only:
                batch = b"[" + b",".join([event_body()] * args.batch_size) + b"]"
                with cpu_meter(results, [serve.pid]):
                        results.append(wrk("hookgate ingest, batches", f"http://127.0.0.1:{port}/v1/events/batch",
                                       batch, auth, args.seconds, args.connections, args.batch_size))
                print(results[-1], flush=True)
                rabbitmqctl("purge_queue", "-p", vhost, "hookgate.ingest")
            if "e2e" in args.only:
                results.extend(end_to_end(args, hookgate, env, work, port, key, serve.pid))
            if "slow" in args.only:
                results.extend(slow_receiver(args, hookgate, env, work, port, key, serve.pid))
        print_table(results, args)
    finally:
        rabbitmqctl("delete_vhost", vhost)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def end_to_end(args: argparse.Namespace, hookgate: list[str], env: dict[str, str], work: Path, port: int,
               key: str, serve_pid: int) -> list[Result]:
    results = []
    receiver_port = free_port()
    ledger = work / "ledger.txt"
    receiver_env = {**env, "BENCH_LEDGER": str(ledger)}
    with (
        process([sys.executable, "-m", "uvicorn", "bench.receiver:app", "--port", str(receiver_port), "--http",
                 "httptools", "--loop", "uvloop", "--no-access-log", "--log-level", "warning"],
                receiver_env, work / "receiver.log") as receiver,
        process([*hookgate, "router"], env, work / "router.log") as router,
        process([*hookgate, "worker", "-Q", "webhooks", "-c", str(args.webhook_concurrency)],
                {**env, **ONE_ENDPOINT_WORKER_ENV}, work / "worker.log") as worker,
    ):
        groups = {"gateway": [serve_pid], "router": [router.pid], "worker": [worker.pid], "receiver": [receiver.pid],
                  "rabbitmq": [broker_pid()]}
        time.sleep(2)
        created = httpx.post(f"http://127.0.0.1:{port}/v1/subscriptions", headers={"Authorization": f"Bearer {key}"},
                             json={"event_types": ["order.*"], "url": f"http://127.0.0.1:{receiver_port}/hook"})
        created.raise_for_status()
        time.sleep(2)  # the router's subscription cache
        for name, rate, connections in (
            ("end to end, flat out", None, args.connections),
            (f"end to end at {args.e2e_rate:.0f} events/s offered", args.e2e_rate, args.connections),
        ):
            # Truncate, not unlink: the receiver keeps the file open (O_APPEND).
            ledger.write_bytes(b"")
            before = group_cpu_s(groups)
            accepted, errors = asyncio.run(drive(port, key, args.seconds, connections, rate))
            rows = wait_ledger(ledger, accepted, timeout_s=max(60.0, accepted / 300))
            result = e2e_result(name, rows, accepted, errors)
            result.note += cpu_note(groups, before, len(rows))
            results.append(result)
            print(results[-1], flush=True)
    return results


def slow_receiver(args: argparse.Namespace, hookgate: list[str], env: dict[str, str], work: Path, port: int,
                  key: str, serve_pid: int) -> list[Result]:
    """A receiver answering after ``--receiver-delay``: the Celery guide's way, then hookgate, same events."""
    receiver_port = free_port()
    ledger = work / "slow-ledger.txt"
    url = f"http://127.0.0.1:{receiver_port}/hook"
    receiver_env = {**env, "BENCH_LEDGER": str(ledger), "BENCH_DELAY_S": str(args.receiver_delay)}
    results = []
    with process([sys.executable, "-m", "uvicorn", "bench.receiver:app", "--port", str(receiver_port), "--http",
                  "httptools", "--loop", "uvloop", "--no-access-log", "--log-level", "warning"],
                 receiver_env, work / "slow-receiver.log") as receiver:
        baseline_env = {**env, "BENCH_BROKER_URL": env["HOOKGATE_BROKER_URL"]}
        with process([sys.executable, "-m", "celery", "-A", "bench.celery_guide", "worker", "-l", "warning"],
                     baseline_env, work / "baseline-worker.log"):
            celery_guide.app.conf.broker_url = env["HOOKGATE_BROKER_URL"]
            time.sleep(3)
            ledger.write_bytes(b"")
            for _ in range(args.baseline_events):
                celery_guide.send_webhook.delay(url, {"type": "slow.created",
                                                      "data": {**PAYLOAD, "sent_ns": time.time_ns()}})
            rows = wait_ledger(ledger, args.baseline_events, timeout_s=args.baseline_events * args.receiver_delay + 60)
            results.append(e2e_result(f"Celery guide: delay() per event, blocking POST ({args.receiver_delay:.2f} s)",
                                      rows, args.baseline_events, 0))
            print(results[-1], flush=True)
        with (
            process([*hookgate, "router"], env, work / "slow-router.log") as router,
            process([*hookgate, "worker", "-Q", "webhooks", "-c", str(args.slow_workers)],
                    {**env, **ONE_ENDPOINT_WORKER_ENV}, work / "slow-worker.log") as worker,
        ):
            groups = {"gateway": [serve_pid], "router": [router.pid], "worker": [worker.pid],
                      "receiver": [receiver.pid], "rabbitmq": [broker_pid()]}
            time.sleep(2)
            created = httpx.post(f"http://127.0.0.1:{port}/v1/subscriptions", json={"event_types": ["slow.*"],
                                 "url": url}, headers={"Authorization": f"Bearer {key}"})
            created.raise_for_status()
            time.sleep(2)  # the router's subscription cache
            ledger.write_bytes(b"")
            before = group_cpu_s(groups)
            accepted, errors = asyncio.run(drive(port, key, args.seconds, args.connections, args.slow_rate,
                                                 "slow.created"))
            rows = wait_ledger(ledger, accepted, timeout_s=max(60.0, accepted / 200))
            results.append(e2e_result(f"hookgate, receiver answering in {args.receiver_delay:.2f} s", rows, accepted,
                                      errors))
            results[-1].note += cpu_note(groups, before, len(rows))
            baseline = results[0].rate
            if baseline:
                results[-1].note += f"; {results[-1].rate / baseline:.1f}x the Celery guide's way"
            print(results[-1], flush=True)
    return results


def print_table(results: list[Result], args: argparse.Namespace) -> None:
    ceiling = next((r.rate for r in results if r.name.startswith("raw ceiling")), None)
    print(f"\n{args.seconds} s per phase, {args.connections} connections, {args.http_workers} HTTP worker(s), "
          f"{os.cpu_count()} cores, 1 KB events\n")
    print(f"{'phase':58} {'per s':>9} {'vs ceiling':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
          f"{'app µs/ev':>9} {'mq µs/ev':>9}  note")

    def fmt(value: float | None) -> str:
        return f"{value:.1f}" if value is not None else "-"

    for r in results:
        ratio = f"{r.rate / ceiling:.2f}" if ceiling else "-"
        print(f"{r.name:58} {r.rate:9.0f} {ratio:>10} {fmt(r.p50_ms):>8} {fmt(r.p99_ms):>8} {r.errors:>7} "
              f"{fmt(r.app_us):>9} {fmt(r.broker_us):>9}  {r.note}")


if __name__ == "__main__":
    main()
