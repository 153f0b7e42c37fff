"""The SSRF guard: webhook targets must be public http(s) addresses unless explicitly allowed.

``check_target`` parses a URL the way the webhook client does (httpx's parser, so the host checked
is the host connected to), resolves its host once, and refuses it if any address is not public.
The client then connects only to the addresses it returned: nothing resolves the name a second time.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import httpx

from schemas.settings import Settings

__all__ = ["IPAddress", "IPNetwork", "Target", "TargetPolicy", "UnsafeTargetError", "check_target",
           "check_url_shape"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_DEFAULT_PORTS = {"http": 80, "https": 443}
# Instance metadata services, named on their own so the refusal says what the address is. Most also
# fall in a range below (link-local, CGNAT, unique-local); the reason should still say "metadata".
_METADATA = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle
    "169.254.170.2",  # AWS ECS task metadata
    "fd00:ec2::254",  # AWS over IPv6
    "100.100.100.200",  # Alibaba Cloud
    "192.0.0.192",  # Oracle Cloud
))
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
# IPv6 prefixes that carry an IPv4 address a gateway will connect to: judge the embedded address.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Ranges the ipaddress flags miss in Python 3.11: the IETF protocol assignments and benchmarking.
_SPECIAL = (ipaddress.ip_network("192.0.0.0/24"), ipaddress.ip_network("198.18.0.0/15"))


class UnsafeTargetError(ValueError):
    """The URL may not be called; the message says why (shown to the client in a 422)."""


@dataclass(frozen=True, slots=True)
class Target:
    """A checked URL: its host as the client will name it, the port, and the addresses to connect to."""

    url: httpx.URL
    host: str
    port: int
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TargetPolicy:
    """Which addresses may be called: public ones, plus the allowed networks, or anything at all."""

    allow_private: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> TargetPolicy:
        return cls(settings.allow_private_targets, tuple(settings.allowed_target_cidrs))

    def refusal(self, address: IPAddress) -> str | None:
        """Why ``address`` may not be called, or None if it may."""
        if self.allow_private or any(address in net for net in self.allowed_networks):
            return None
        return _non_public(address)


def _non_public(address: IPAddress) -> str | None:
    if address in _METADATA:
        return "a cloud metadata address"
    if isinstance(address, ipaddress.IPv6Address):
        # A client may reach the IPv4 host behind these; a mapped address is refused outright, since no
        # public endpoint needs one and ranges written for IPv4 would not match it.
        if address.ipv4_mapped is not None:
            return "an IPv4-mapped IPv6 address"
        embedded = address.sixtofour or (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
                                         if address in _NAT64 else None)
        if embedded is not None and (reason := _non_public(embedded)):
            return f"an IPv6 address embedding {embedded}, {reason}"
    checks = (
        ("a loopback", address.is_loopback),
        ("a link-local", address.is_link_local),
        ("a multicast", address.is_multicast),
        ("an unspecified", address.is_unspecified),
        ("a CGNAT", address in _CGNAT),
        ("a private", address.is_private or any(address in net for net in _SPECIAL)),
        ("a reserved", address.is_reserved),
    )
    return next((f"{kind} address" for kind, hit in checks if hit), None)


def check_url_shape(url: str) -> tuple[httpx.URL, str, int]:
    """Check scheme and form without DNS; returns the parsed URL, its host and port."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise UnsafeTargetError(f"not a valid URL: {exc}") from exc
    if parsed.scheme not in _DEFAULT_PORTS:
        raise UnsafeTargetError("only http and https URLs are allowed")
    if parsed.userinfo:
        raise UnsafeTargetError("credentials in URLs are not allowed")
    if not parsed.raw_host:
        raise UnsafeTargetError("the URL has no host")
    # raw_host is what the connection pool hands the network backend (IDNA-encoded, IPv6 unbracketed).
    return parsed, parsed.raw_host.decode("ascii"), parsed.port or _DEFAULT_PORTS[parsed.scheme]


def check_target(url: str, policy: TargetPolicy) -> Target:
    """Resolve the URL's host once and refuse it if any address may not be called.

    Every address must pass, since a client may connect to any of them. ``inet_aton`` forms
    (``2130706433``, ``0x7f.1``) resolve through getaddrinfo exactly as a client's would. A
    ``socket.gaierror`` cause marks a name that did not resolve, which may pass.
    """
    parsed, host, port = check_url_shape(url)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeTargetError(f"the host {host!r} does not resolve") from exc
    addresses = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos))
    for address in addresses:
        if reason := policy.refusal(address):
            raise UnsafeTargetError(f"the host {host!r} resolves to a non-public address: {address} is {reason}")
    return Target(parsed, host, port, tuple(str(address) for address in addresses))
