"""CPU per webhook send: hookgate's pinned client beside the unpinned transport it replaced, in one run.

    .venv/bin/python -m bench.webhook_send [--sends 5000]

One thread sends POSTs one after another on keep-alive connections to a local receiver process
(bench/receiver.py), by the name ``localhost`` (resolved through /etc/hosts on every send, as the
SSRF guard does), over http and over https (a trustme certificate for ``localhost``). Designs:

- ``unpinned``: check the URL, then httpx.HTTPTransport resolves the name again to connect (the
  client before address pinning; the baseline);
- ``sni``: check, then send to ``https://<checked ip>`` with the ``Host`` header and TLS
  ``sni_hostname`` set to the name (its pool is keyed by IP, so names sharing an IP share connections);
- ``pinned``: hookgate's WebhookClient (httpcore pool keyed by name, a network backend that connects
  to the checked IP).
"""

from __future__ import annotations

import argparse
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import trustme

from bench.run import ROOT, free_port, process
from consumers.ssrf import TargetPolicy, check_target
from consumers.webhook_client import WebhookClient

POLICY = TargetPolicy(allow_private=True)
BODY = orjson.dumps({"type": "order.paid", "timestamp": "2026-11-25T12:00:00Z", "data": {"sent_ns": 0}})


def unpinned(transport: httpx.HTTPTransport) -> Callable[[str], int]:
    def send(url: str) -> int:
        check_target(url, POLICY)
        response = transport.handle_request(httpx.Request("POST", url, content=BODY))
        response.read()
        response.close()
        return response.status_code
    return send


def sni(transport: httpx.HTTPTransport) -> Callable[[str], int]:
    def send(url: str) -> int:
        target = check_target(url, POLICY)
        address = target.addresses[0]
        pinned_url = target.url.copy_with(host=address)
        request = httpx.Request("POST", pinned_url, content=BODY, headers={"host": target.url.netloc.decode()},
                                extensions={"sni_hostname": target.host})
        response = transport.handle_request(request)
        response.read()
        response.close()
        return response.status_code
    return send


def pinned(client: WebhookClient) -> Callable[[str], int]:
    return lambda url: client.post(url, BODY, {}).status_code


def measure(send: Callable[[str], int], url: str, sends: int) -> tuple[float, float]:
    """CPU and wall microseconds per send of this (single-threaded) process."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(sends):
        send(url)
    return (time.process_time() - cpu) / sends * 1e6, (time.perf_counter() - wall) / sends * 1e6


def compare(designs: dict[str, Callable[[str], int]], url: str, sends: int, rounds: int) -> dict[str, list[float]]:
    """Median CPU and wall per send of each design, measured in interleaved rounds (load on the machine drifts)."""
    for send in designs.values():
        for _ in range(200):
            assert send(url) == 200
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in designs}
    for _ in range(rounds):
        for name, send in designs.items():
            samples[name].append(measure(send, url, sends // rounds))
    return {name: [statistics.median(s[i] for s in runs) for i in (0, 1)] for name, runs in samples.items()}


def wait_port(port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sends", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    ca = trustme.CA()
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cert = ca.issue_cert("localhost")
        cert.cert_chain_pems[0].write_to_path(str(work / "cert.pem"))
        cert.private_key_pem.write_to_path(str(work / "key.pem"))
        http_port, https_port = free_port(), free_port()
        env = {"BENCH_LEDGER": str(work / "ledger"), "PATH": "", "PYTHONPATH": str(ROOT)}
        uvicorn = [sys.executable, "-m", "uvicorn", "bench.receiver:app", "--http", "httptools", "--no-access-log",
                   "--log-level", "warning"]
        tls = ["--ssl-certfile", str(work / "cert.pem"), "--ssl-keyfile", str(work / "key.pem")]
        with (process([*uvicorn, "--port", str(http_port)], env, work / "http.log"),
              process([*uvicorn, "--port", str(https_port), *tls], env, work / "https.log")):
            wait_port(http_port)
            wait_port(https_port)
            print(f"{'design':<10} {'scheme':<6} {'CPU us/send':>12} {'wall us/send':>13} {'CPU ratio':>10}")
            for scheme, port in (("http", http_port), ("https", https_port)):
                url = f"{scheme}://localhost:{port}/hook"
                transport = httpx.HTTPTransport(verify=context)
                client = WebhookClient(timeout_s=10, user_agent="bench", policy=POLICY, ssl_context=context)
                designs = {"unpinned": unpinned(transport), "sni": sni(transport), "pinned": pinned(client)}
                results = compare(designs, url, args.sends, args.rounds)
                baseline = results["unpinned"][0]
                for name, (cpu_us, wall_us) in results.items():
                    print(f"{name:<10} {scheme:<6} {cpu_us:>12.1f} {wall_us:>13.1f} {cpu_us / baseline:>10.2f}")
                transport.close()
                client.close()


if __name__ == "__main__":
    main()
