"""The SSRF guard: the refusal matrix at creation and at delivery, pinned addresses, TLS to a pinned IP, redirects."""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from consumers.ssrf import TargetPolicy, UnsafeTargetError, check_target
from consumers.store.database import migrate
from consumers.store.models import Subscription
from consumers.webhook_client import WebhookClient, WebhookTransportError
from schemas.deliveries import DeliveryStatus
from schemas.settings import Settings
from tests.apiclient import assert_problem, count_rows
from tests.delivery_stack import DeliveryStack, delivery_stack
from tests.receiver import Receiver, Reply, make_secret
from tests.test_webhook_delivery import attempts_at_least, finished, seed, stop_retrying, wait_until

# The loopback address the strict settings below allow, standing in for a public endpoint: no
# public address is reachable here. 127.0.0.1 stays refused.
ALLOWED_HOST = "127.0.0.2"
STRICT = {"allow_private_targets": False, "allowed_target_cidrs": (f"{ALLOWED_HOST}/32",)}

# (URL with {port}, what the refusal says). Every form that reaches 127.0.0.1 is aimed at a live
# receiver there, so a guard that let one through would show up in its ledger.
MATRIX = [
    ("http://127.0.0.1:{port}/hook", "127.0.0.1 is a loopback address"),
    ("http://[::1]:{port}/hook", "::1 is a loopback address"),
    ("http://10.20.30.40:{port}/hook", "10.20.30.40 is a private address"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a cloud metadata address"),
    ("http://[::ffff:127.0.0.1]:{port}/hook", "is an IPv4-mapped IPv6 address"),
    ("http://2130706433:{port}/hook", "127.0.0.1 is a loopback address"),  # decimal
    ("http://0x7f.1:{port}/hook", "127.0.0.1 is a loopback address"),  # inet_aton's hex and short forms
    ("http://0177.0.0.1:{port}/hook", "not a valid URL: Invalid IPv4 address"),  # octal: httpx refuses to parse it
    ("http://localhost:{port}/hook", "'localhost' resolves to a non-public address: 127.0.0.1 is a loopback"),
    ("http://100.64.0.7/hook", "100.64.0.7 is a CGNAT address"),
    ("http://224.0.0.251/hook", "224.0.0.251 is a multicast address"),
    ("http://0.0.0.0:{port}/hook", "0.0.0.0 is an unspecified address"),
    ("http://[fe80::1]/hook", "fe80::1 is a link-local address"),
    ("http://[fd00:ec2::254]/hook", "fd00:ec2::254 is a cloud metadata address"),
    ("http://[64:ff9b::a9fe:a9fe]/hook", "embedding 169.254.169.254, a cloud metadata address"),
    ("http://[2002:7f00:1::]/hook", "embedding 127.0.0.1, a loopback address"),
    ("http://192.168.1.1/hook", "192.168.1.1 is a private address"),
    ("ftp://93.184.216.34/hook", "only http and https URLs are allowed"),
    ("http://user:pw@93.184.216.34/hook", "credentials in URLs are not allowed"),
    ("http://93.184.216.34\\@127.0.0.1/hook", "credentials in URLs are not allowed"),
]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, list[str]], list[str]]:
    """Answer lookups of a made-up name from a script, one answer per call; returns the log of calls.

    The only stand-in in this module: no DNS server is reachable here. Every other name resolves
    for real.
    """
    real = socket.getaddrinfo
    calls: list[str] = []
    scripts: dict[str, list[str]] = {}

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in scripts:
            calls.append(host)
            answers = scripts[host]
            address = answers.pop(0) if len(answers) > 1 else answers[0]
            family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
            return [(family, socket.SOCK_STREAM, 6, "", (address, port))]
        return real(host, port, *args, **kwargs)

    def script(host: str, answers: list[str]) -> list[str]:
        scripts[host] = list(answers)
        return calls

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return script


# -- the guard itself -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "reason"), MATRIX)
def test_check_target_refuses_the_matrix(url: str, reason: str) -> None:
    """Each loopback, private, link-local, CGNAT, multicast, metadata, mapped or disguised target is refused."""
    with pytest.raises(UnsafeTargetError) as refused:
        check_target(url.format(port=8080), TargetPolicy())
    assert reason in str(refused.value)


def test_a_public_address_passes_with_the_address_to_connect_to() -> None:
    """A public IP needs no DNS; the target names the host, the default port and the address."""
    target = check_target("https://93.184.216.34/hooks", TargetPolicy())
    assert (target.host, target.port, target.addresses) == ("93.184.216.34", 443, ("93.184.216.34",))


def test_allowed_networks_lift_the_rule_only_for_themselves() -> None:
    """An allow-listed CIDR passes; the rest of private space stays refused; allow_private lifts everything."""
    policy = TargetPolicy(allowed_networks=(ipaddress.ip_network("10.1.0.0/16"),))
    assert check_target("http://10.1.2.3/hook", policy).addresses == ("10.1.2.3",)
    with pytest.raises(UnsafeTargetError, match=re.escape("10.2.0.1 is a private address")):
        check_target("http://10.2.0.1/hook", policy)
    assert check_target("http://localhost:9/hook", TargetPolicy(allow_private=True)).addresses[0] == "127.0.0.1"


def test_allowed_cidrs_setting_reads_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """HOOKGATE_ALLOWED_TARGET_CIDRS takes comma-separated IPv4 and IPv6 networks; a host-bits CIDR is an error."""
    monkeypatch.setenv("HOOKGATE_ALLOWED_TARGET_CIDRS", "10.0.0.0/8, fd12::/16")
    policy = TargetPolicy.from_settings(Settings())
    assert policy.allowed_networks == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd12::/16"))
    monkeypatch.setenv("HOOKGATE_ALLOWED_TARGET_CIDRS", "10.0.0.1/8")
    with pytest.raises(ValueError, match="allowed_target_cidrs"):
        Settings()


def test_every_address_of_a_name_must_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name with one public and one private address is refused: a client may connect to either."""
    real = socket.getaddrinfo

    def two_answers(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "mixed.example.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", two_answers)
    with pytest.raises(UnsafeTargetError, match=re.escape("10.0.0.5 is a private address")):
        check_target("https://mixed.example.test/hook", TargetPolicy())


# -- the client connects to the checked address ---------------------------------------------------------------


def test_the_checked_address_is_the_one_connected_to(resolver: Callable[[str, list[str]], list[str]]) -> None:
    """A name rebound to loopback after the check is never looked up again: the request reaches the checked IP.

    The resolver answers the allowed address first and the loopback one after; two receivers share
    a port on both. A client that resolved again to connect would hit the second.
    """
    policy = TargetPolicy(allowed_networks=(ipaddress.ip_network(f"{ALLOWED_HOST}/32"),))
    secret = make_secret()
    with Receiver(secret, host=ALLOWED_HOST) as checked, Receiver(secret, port=checked.port) as rebound:
        calls = resolver("rebind.example.test", [ALLOWED_HOST, "127.0.0.1"])
        client = WebhookClient(timeout_s=5, user_agent="test", policy=policy)
        try:
            url = f"http://rebind.example.test:{checked.port}/hook"
            assert client.post(url, b"{}", {}).status_code == 200
            assert calls == ["rebind.example.test"]
            # The next send checks again, now sees loopback, and sends nothing.
            with pytest.raises(UnsafeTargetError, match=re.escape("127.0.0.1 is a loopback address")):
                client.post(url, b"{}", {})
        finally:
            client.close()
        assert [r.headers["host"] for r in checked.ledger] == [f"rebind.example.test:{checked.port}"]
        assert rebound.ledger == []


def test_keep_alive_connections_are_reused_per_host() -> None:
    """Three sends to one endpoint use one connection (the receiver sees one client port)."""
    with Receiver(make_secret()) as receiver:
        client = WebhookClient(timeout_s=5, user_agent="test", policy=TargetPolicy(allow_private=True))
        try:
            for _ in range(3):
                assert client.post(receiver.url, b"{}", {}).status_code == 200
        finally:
            client.close()
        assert len(receiver.ledger) == 3
        assert len({r.peer for r in receiver.ledger}) == 1


def _tls_receiver_files(ca: trustme.CA, tmp_path: Path, name: str) -> tuple[str, str]:
    cert = ca.issue_cert(name)
    certfile, keyfile = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    return str(certfile), str(keyfile)


def _client_trusting(ca: trustme.CA) -> WebhookClient:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return WebhookClient(timeout_s=5, user_agent="test", policy=TargetPolicy(allow_private=True), ssl_context=context)


def test_tls_verifies_the_host_name_while_connecting_to_the_pinned_ip(
    ca: trustme.CA, tmp_path: Path, resolver: Callable[[str, list[str]], list[str]]
) -> None:
    """HTTPS to a name pinned to 127.0.0.1 succeeds with a certificate for the name only (no IP in it)."""
    resolver("hooks.example.test", ["127.0.0.1"])
    files = _tls_receiver_files(ca, tmp_path, "hooks.example.test")
    with Receiver(make_secret(), tls=files, name="hooks.example.test") as receiver:
        client = _client_trusting(ca)
        try:
            assert client.post(receiver.url, b"{}", {}).status_code == 200
        finally:
            client.close()
        assert receiver.url.startswith("https://hooks.example.test:")
        assert [r.headers["host"] for r in receiver.ledger] == [f"hooks.example.test:{receiver.port}"]


def test_tls_refuses_a_certificate_for_another_name(ca: trustme.CA, tmp_path: Path) -> None:
    """The same pinned connection fails when the certificate names another host: nothing is delivered."""
    files = _tls_receiver_files(ca, tmp_path, "other.example.test")
    with Receiver(make_secret(), tls=files, name="localhost") as receiver:
        client = _client_trusting(ca)
        try:
            with pytest.raises(WebhookTransportError, match="CERTIFICATE_VERIFY_FAILED"):
                client.post(receiver.url, b"{}", {})
        finally:
            client.close()
        assert receiver.ledger == []


# -- at creation: 422 ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def stack(broker_url: str, ca: trustme.CA,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DeliveryStack]:
    """The gateway and a worker with the strict settings, on a SQLite store of their own; the worker trusts `ca`."""
    store = f"sqlite:///{tmp_path_factory.mktemp('store') / 'hookgate.db'}"
    migrate(store)
    settings = Settings(broker_url=broker_url, database_url=store, retry_schedule=(0, 1), webhook_timeout_s=5,
                        **STRICT)  # type: ignore[arg-type]
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with delivery_stack(settings, tmp_path_factory.mktemp("worker"), {"SSL_CERT_FILE": str(ca_file)}) as running:
        yield running


@pytest.mark.parametrize(("url", "reason"), MATRIX)
async def test_creation_refuses_the_matrix(stack: DeliveryStack, url: str, reason: str) -> None:
    """Each target of the matrix gets 422 with the reason on `url`, and no subscription is stored."""
    before = count_rows(stack.sessions, Subscription)
    response = await stack.client.post(
        "/v1/subscriptions", json={"event_types": ["order.*"], "url": url.format(port=8080)},
    )
    body = assert_problem(response, 422)
    assert [e["field"] for e in body["errors"]] == ["url"]
    assert reason in body["detail"]
    assert count_rows(stack.sessions, Subscription) == before


async def test_creation_accepts_an_allowed_network(stack: DeliveryStack) -> None:
    """A URL in HOOKGATE_ALLOWED_TARGET_CIDRS is accepted although it is loopback."""
    response = await stack.client.post(
        "/v1/subscriptions", json={"event_types": ["order.*"], "url": f"http://{ALLOWED_HOST}:8080/hook"},
    )
    assert response.status_code == 201, response.text


# -- at delivery: a real worker with the strict settings ------------------------------------------------------------


def test_delivery_refuses_the_matrix(stack: DeliveryStack) -> None:
    """Targets stored before the rule (or rebound since) end dead with the reason; the receiver behind sees nothing."""
    secret = make_secret()
    with Receiver(secret) as loopback:
        ids = [seed(stack.sessions, url.format(port=loopback.port), secret) for url, _ in MATRIX]
        for delivery_id in ids:
            stack.sender.send_task("tasks.deliver_webhook", args=[delivery_id], queue="webhooks")
        results = [wait_until(stack.sessions, delivery_id, finished(DeliveryStatus.DEAD)) for delivery_id in ids]
        assert loopback.ledger == []
    for (url, reason), (delivery, attempts) in zip(MATRIX, results, strict=True):
        assert reason in (delivery.last_error or ""), url
        assert [(a.status_code, a.error) for a in attempts] == [(None, delivery.last_error)]


def test_delivery_never_follows_a_redirect(stack: DeliveryStack) -> None:
    """An allowed endpoint answering 302 to a loopback receiver is a failed attempt; that receiver sees nothing."""
    secret = make_secret()
    with Receiver(secret) as inner, Receiver(secret, host=ALLOWED_HOST) as outer:
        outer.respond(Reply(302, headers={"location": inner.url}))
        delivery_id = seed(stack.sessions, outer.url, secret)
        stack.sender.send_task("tasks.deliver_webhook", args=[delivery_id], queue="webhooks")
        _, attempts = wait_until(stack.sessions, delivery_id, attempts_at_least(1))
        stop_retrying(stack.sessions, delivery_id)
        assert [(a.status_code, a.error) for a in attempts] == [(302, "HTTP 302")]
        assert inner.ledger == []
        assert [r.verified for r in outer.ledger] == [True]


def test_a_worker_verifies_tls_with_the_ca_of_ssl_cert_file(stack: DeliveryStack, ca: trustme.CA,
                                                            tmp_path: Path) -> None:
    """A worker started with SSL_CERT_FILE delivers over HTTPS to a certificate of that CA, and refuses another one."""
    secret = make_secret()
    trusted = _tls_receiver_files(ca, tmp_path, ALLOWED_HOST)
    # `connection: close`: the worker's kept-alive TLS connection would outlive the receiver's event loop.
    closing = Reply(200, headers={"connection": "close"})
    with Receiver(secret, host=ALLOWED_HOST, tls=trusted, default=closing) as receiver:
        delivery_id = seed(stack.sessions, receiver.url, secret)
        stack.sender.send_task("tasks.deliver_webhook", args=[delivery_id], queue="webhooks")
        wait_until(stack.sessions, delivery_id, finished(DeliveryStatus.SUCCEEDED))
        assert receiver.url.startswith("https://") and [r.verified for r in receiver.ledger] == [True]
    untrusted = _tls_receiver_files(trustme.CA(), tmp_path, ALLOWED_HOST)
    with Receiver(secret, host=ALLOWED_HOST, tls=untrusted) as receiver:
        delivery_id = seed(stack.sessions, receiver.url, secret)
        stack.sender.send_task("tasks.deliver_webhook", args=[delivery_id], queue="webhooks")
        _, attempts = wait_until(stack.sessions, delivery_id, attempts_at_least(1))
        stop_retrying(stack.sessions, delivery_id)
        assert receiver.ledger == []
    assert "CERTIFICATE_VERIFY_FAILED" in (attempts[0].error or "")
