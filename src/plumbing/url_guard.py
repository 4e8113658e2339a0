"""Which addresses a job's URLs may reach: the SSRF guard.

A URL in a job (an image URL, a LoRA URL, the job's own bucket endpoint) is untrusted:
it may name the worker's own network, such as the cloud metadata service at
169.254.169.254 or a service on loopback. `resolve_checked` resolves its host once and
refuses it, before any connection, when any address it resolves to is not globally
routable. Callers then connect to the addresses it returned, never to the name again,
so a second DNS answer cannot differ from the checked one (DNS rebinding).

`AddressPolicy` says what may be reached: ALLOW_PRIVATE_URLS=true lifts the check
(tests and local runs); ALLOWED_PRIVATE_NETWORKS lets a deployment reach only its own
private networks, such as an image store inside its VPC.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from src.job.schema import InputError

ALLOWED_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
# IPv6 prefixes that carry an IPv4 address inside: NAT64 (64:ff9b::/96) passes the
# embedded address on, so it is checked as that address.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# 100.64.0.0/10, carrier-grade NAT: neither private nor global in Python's tables.
_SHARED = ipaddress.ip_network("100.64.0.0/10")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class UrlRefused(InputError):
    """A job URL that the worker will not fetch; the message is `<key>: <reason>`."""


@dataclass(frozen=True)
class AddressPolicy:
    """Which non-global addresses a job URL may reach: all (`allow_private`), those in
    `allowed_networks`, or none (the default)."""

    allow_private: bool = False
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def refusal(self, address: Address) -> str | None:
        """Why `address` may not be reached ('a loopback', ...), or None if it may."""
        if self.allow_private or any(address in network for network in self.allowed_networks
                                     if network.version == address.version):
            return None
        return non_global_category(address)


@dataclass(frozen=True)
class CheckedTarget:
    """A URL's parts and the addresses its host resolved to, all of them checked."""

    url: SplitResult
    host: str
    port: int
    addresses: tuple[str, ...]


def shown(url: str) -> str:
    """A URL as it may appear in logs and errors: no user info, no query string (presigned
    URLs carry credentials there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if _port_or_none(parts) is not None else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def resolve_checked(url: str, key: str, policy: AddressPolicy) -> CheckedTarget:
    """Resolve `url`'s host and check every address, or raise UrlRefused naming `key`."""
    parts = urlsplit(url)
    if parts.scheme not in ALLOWED_SCHEMES:
        raise UrlRefused(f"{key}: {shown(url)!r}: only http and https URLs are allowed")
    host = parts.hostname
    if not host:
        raise UrlRefused(f"{key}: {shown(url)!r} has no host")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise UrlRefused(f"{key}: {shown(url)!r} has an invalid port (1 to 65535)") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise UrlRefused(f"{key}: host {host!r} does not resolve") from None
    addresses = tuple(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:
        category = policy.refusal(ipaddress.ip_address(address.split("%", 1)[0]))
        if category:
            raise UrlRefused(f"{key}: host {host!r} resolves to {address}, {category} address; "
                             "set ALLOW_PRIVATE_URLS=true to allow it")
    return CheckedTarget(url=parts, host=host, port=port, addresses=addresses)


def non_global_category(address: Address) -> str | None:
    """'a loopback', 'a private', ... for an address a job may not reach; None for a
    globally routable one. IPv6 forms that embed an IPv4 address are judged by it."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return non_global_category(embedded)
    if address.is_unspecified:
        return "an unspecified"
    if address.is_loopback:
        return "a loopback"
    if address.is_link_local:
        return "a link-local"
    if address.is_multicast:
        return "a multicast"
    if address in _SHARED:
        return "a shared (carrier-grade NAT)"
    if address.is_reserved:
        return "a reserved"
    if not address.is_global:
        return "a private"
    return None


def _port_or_none(parts: SplitResult) -> int | None:
    try:
        return parts.port
    except ValueError:
        return None
