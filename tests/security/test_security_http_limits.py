"""Oversized and slow requests over real sockets against a live ``hookgate serve``.

The in-process tests (tests/test_api_ingest.py, tests/test_observability.py) check the 413 problem
bodies; these check what only a real server shows: the body is refused before it is all sent,
and a client trickling its headers or body (slow-loris) is answered 408 and cut off in time.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from consumers.store.database import make_engine, make_sessionmaker, migrate
from consumers.store.keys import create_api_key
from schemas.keys import Scope
from schemas.settings import Settings
from tests.workers import Hookgate, free_port

_MAX_BODY = 4096
_HEADER_TIMEOUT_S = 1.0
_BODY_TIMEOUT_S = 1.5


@dataclass(frozen=True)
class Live:
    port: int
    key: str

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def head(self, extra: str = "", length: int | None = None, path: str = "/v1/events") -> bytes:
        framing = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
        return (f"POST {path} HTTP/1.1\r\nHost: hookgate\r\nAuthorization: Bearer {self.key}\r\n"
                f"Content-Type: application/json\r\n{framing}{extra}\r\n").encode()


@pytest.fixture(scope="module")
def live(broker_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    directory: Path = tmp_path_factory.mktemp("limits")
    database_url = f"sqlite:///{directory / 'hookgate.db'}"
    migrate(database_url)
    engine = make_engine(database_url)
    try:
        key = create_api_key(make_sessionmaker(engine), "limits", [Scope.EVENTS_WRITE])[1]
    finally:
        engine.dispose()
    port = free_port()
    settings = Settings(broker_url=broker_url, database_url=database_url, port=port, max_body_bytes=_MAX_BODY,
                        http_header_timeout_s=_HEADER_TIMEOUT_S, http_body_timeout_s=_BODY_TIMEOUT_S,
                        log_format="json")
    gateway = Hookgate(settings, directory / "serve.log", "serve", "--port", str(port)).start()
    try:
        yield Live(port, key)
        assert gateway.running, "the gateway died"
    finally:
        gateway.stop()


def _read_response(sock: socket.socket, timeout_s: float = 10.0,
                   keep_alive: bool = False) -> tuple[int, dict[str, str], bytes, bool]:
    """Read one response; returns (status, headers, body, whether the server then closed the connection).

    With ``keep_alive`` the connection is left open for another request and reported not closed.
    """
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"the connection closed before a response: {data!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        body += sock.recv(65536)
    if keep_alive:
        return int(lines[0].split()[1]), headers, body, False
    try:
        closed = sock.recv(1) == b""
    except (ConnectionResetError, TimeoutError):
        closed = True
    return int(lines[0].split()[1]), headers, body, closed


def _assert_problem(status: int, headers: dict[str, str], body: bytes, expected: int) -> dict[str, object]:
    assert status == expected, body
    assert headers["content-type"] == "application/problem+json"
    problem = orjson.loads(body)
    assert problem["status"] == expected and problem["detail"]
    return problem


def _send_slowly(sock: socket.socket, data: bytes, interval_s: float, until_s: float) -> float:
    """Send ``data`` a byte at a time every ``interval_s``; stop when the server hangs up. Returns the time taken."""
    started = time.monotonic()
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        if time.monotonic() - started > until_s:
            break
        time.sleep(interval_s)
    return time.monotonic() - started


def test_a_declared_oversized_body_is_refused_before_it_is_sent(live: Live) -> None:
    """A 100 MB Content-Length gets its 413 problem at once, without the server waiting for the body."""
    with live.connect() as sock:
        started = time.monotonic()
        sock.sendall(live.head(length=100_000_000) + b'{"type": "a", ')
        status, headers, body, _ = _read_response(sock, keep_alive=True)
        assert time.monotonic() - started < 2
    assert "limit" in str(_assert_problem(status, headers, body, 413)["detail"])


def test_a_chunked_oversized_body_is_cut_off_at_the_limit(live: Live) -> None:
    """A chunked body is refused (413) once it passes the limit, long before its 64 MB have been sent."""
    chunk = b"x" * 1024
    sent = 0
    with live.connect() as sock:
        sock.sendall(live.head())
        try:
            while sent < 64 * 1024 * 1024:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                sock.setblocking(False)
                try:
                    if sock.recv(1, socket.MSG_PEEK):
                        break
                except BlockingIOError:
                    pass
                finally:
                    sock.setblocking(True)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, headers, body, _ = _read_response(sock)
    _assert_problem(status, headers, body, 413)
    assert sent < 4 * 1024 * 1024, f"the server let {sent} bytes in before refusing"


def test_slow_headers_are_answered_408_and_cut_off(live: Live) -> None:
    """Headers trickled a byte every 0.2 s: a 408 problem and a closed connection after the header timeout."""
    with live.connect() as sock:
        taken = _send_slowly(sock, live.head(length=10), interval_s=0.2, until_s=10)
        status, headers, body, closed = _read_response(sock)
    _assert_problem(status, headers, body, 408)
    assert closed
    assert _HEADER_TIMEOUT_S <= taken < _HEADER_TIMEOUT_S + 2


def test_a_connection_that_sends_nothing_is_closed(live: Live) -> None:
    """An idle new connection is not held open: 408 and closed after the header timeout."""
    with live.connect() as sock:
        started = time.monotonic()
        status, headers, body, closed = _read_response(sock)
        assert time.monotonic() - started < _HEADER_TIMEOUT_S + 2
    _assert_problem(status, headers, body, 408)
    assert closed


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_slow_body_is_answered_408_and_cut_off(live: Live, framing: str) -> None:
    """A body trickled a byte every 0.2 s: a 408 problem and a closed connection after the body timeout."""
    event = orjson.dumps({"type": "slow.loris", "source": "test", "data": "x" * 200})
    payload = event if framing == "content-length" else b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event)
    with live.connect() as sock:
        sock.sendall(live.head(length=len(event) if framing == "content-length" else None))
        taken = _send_slowly(sock, payload, interval_s=0.2, until_s=10)
        status, headers, body, closed = _read_response(sock)
    assert "did not arrive" in str(_assert_problem(status, headers, body, 408)["detail"])
    assert closed
    assert _BODY_TIMEOUT_S <= taken < _BODY_TIMEOUT_S + 2


def test_the_json_form_of_a_file_request_has_the_body_deadline(live: Live) -> None:
    """POST /v1/files without a query string (a JSON job request) is held to the ordinary body deadline: an
    upload's path has none, but only uploads (with ?kind=...) get the upload's limits."""
    request = orjson.dumps({"kind": "import", "format": "ndjson", "url": "https://example.com/" + "x" * 200})
    with live.connect() as sock:
        sock.sendall(live.head(length=len(request), path="/v1/files"))
        taken = _send_slowly(sock, request, interval_s=0.2, until_s=10)
        status, headers, body, closed = _read_response(sock)
    assert "did not arrive" in str(_assert_problem(status, headers, body, 408)["detail"])
    assert closed
    assert _BODY_TIMEOUT_S <= taken < _BODY_TIMEOUT_S + 2


def test_many_slow_clients_at_once_do_not_starve_others(live: Live) -> None:
    """Fifty slow-loris connections are all cut off, and a normal request meanwhile is served at once."""
    sockets = [live.connect() for _ in range(50)]
    try:
        for sock in sockets:
            sock.sendall(b"POST /v1/events HTTP/1.1\r\nHost: h\r\n")
        started = time.monotonic()
        response = httpx.get(f"http://127.0.0.1:{live.port}/healthz", timeout=5)
        assert response.status_code == 200
        assert time.monotonic() - started < 1
        for sock in sockets:
            status, _, _, closed = _read_response(sock)
            assert status == 408 and closed
    finally:
        for sock in sockets:
            sock.close()


def test_requests_in_time_still_get_in(live: Live) -> None:
    """The deadlines leave normal requests alone: a whole request on a kept-alive connection gets its answer."""
    event = orjson.dumps({"type": "on.time", "source": "test"})
    with live.connect() as sock:
        for _ in range(2):
            sock.sendall(live.head(length=len(event)) + event)
            status, _, body, _ = _read_response(sock, keep_alive=True)
            assert status == 202, body
