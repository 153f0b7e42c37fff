"""The SSRF guard: webhook targets must be public http(s) addresses unless explicitly allowed."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

__all__ = ["UnsafeTargetError", "check_target", "check_url_shape"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Ranges the ipaddress flags miss: CGNAT, and cloud metadata served from unique-local space.
_EXTRA_BLOCKED = (
    ipaddress.ip_network("100.64.0.0/10"),
    ipaddress.ip_network("fd00:ec2::254/128"),
    ipaddress.ip_network("192.0.0.0/24"),
    ipaddress.ip_network("198.18.0.0/15"),
)


class UnsafeTargetError(ValueError):
    """The URL may not be called; the message says why (shown to the client in a 422)."""


def check_url_shape(url: str) -> tuple[str, int]:
    """Check scheme and form without DNS; returns (host, port)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeTargetError(f"not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise UnsafeTargetError("only http and https URLs are allowed")
    if parts.username is not None or parts.password is not None:
        raise UnsafeTargetError("credentials in URLs are not allowed")
    if not parts.hostname:
        raise UnsafeTargetError("the URL has no host")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def is_blocked(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return is_blocked(address.ipv4_mapped)
    return (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
        or address.is_reserved
        or any(address in net for net in _EXTRA_BLOCKED)
    )


def check_target(url: str, *, allow_private: bool) -> list[IPAddress]:
    """Resolve the URL's host and refuse it if any address is not public; returns the addresses.

    Every address must pass, since a client may connect to any of them. ``inet_aton``-style
    forms (``2130706433``, ``0177.0.0.1``) are resolved by getaddrinfo exactly as a client would.
    """
    host, port = check_url_shape(url)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeTargetError(f"the host {host!r} does not resolve") from exc
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos))
    if not allow_private:
        for address in addresses:
            if is_blocked(address):
                raise UnsafeTargetError(f"the host {host!r} resolves to a non-public address ({address})")
    return addresses
