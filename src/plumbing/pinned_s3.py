"""A botocore client whose connections go only to addresses already checked.

A job's own bucket endpoint is untrusted: src/plumbing/url_guard.py resolves its host once and
checks every address. `pin_connections` then makes the client connect to those addresses
and nowhere else. There is no second DNS lookup, so an answer that changes after the
check (DNS rebinding) cannot send the client to loopback or the metadata service. The
host name stays everywhere else: in the URL, so in the Host header and the SigV4
signature; in TLS SNI and certificate verification; in presigned URLs.

Invariants: anything not of the expected shape raises at construction, and a socket opened
some other way fails closed (closed before any request); the client takes no proxy. The same
classes carry `s3_deadline.Watched`; `watch_connections` gives an unpinned client (the worker's
own bucket) that alone. It relies on four internals of botocore 1.44.8 and urllib3 2.8.0 (pinned
exactly in requirements.txt), listed with what was not chosen in docs/upstream-register.md,
"Internals relied on"; tests/plumbing/test_storage_pinning.py fails if any stops holding.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from botocore.awsrequest import (AWSHTTPConnection, AWSHTTPConnectionPool, AWSHTTPSConnection,
                                 AWSHTTPSConnectionPool)
from botocore.config import Config
from botocore.httpsession import URLLib3Session
from urllib3 import PoolManager
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util.connection import create_connection

from src.plumbing.s3_deadline import Watched

log = logging.getLogger(__name__)

# Merged into a pinned client's Config: no proxy from the environment or anywhere else.
NO_PROXIES = Config(proxies={})


class PinBroken(RuntimeError):
    """The client's HTTP stack is not the shape this module pins; raised at construction."""


class _Pinned:
    """Mixin for botocore's connection classes: the socket goes to `pinned_addresses`."""

    pinned_addresses: tuple[str, ...] = ()

    def _new_conn(self) -> socket.socket:
        # As urllib3's own `_new_conn`, with the checked addresses tried in their resolved
        # order in place of a lookup of the host name.
        error: Exception | None = None
        for address in self.pinned_addresses:
            try:
                return create_connection((address, self.port), self.timeout, source_address=self.source_address,
                                         socket_options=self.socket_options)
            except TimeoutError:  # socket.timeout; before OSError, which it is a kind of
                error = ConnectTimeoutError(
                    self, f"Connection to {self.host} ({address}) timed out. (connect timeout={self.timeout})")
            except OSError as exc:
                error = NewConnectionError(self, f"Failed to establish a new connection to {address}: {exc}")
        raise error or NewConnectionError(self, "no checked address to connect to")

    def connect(self) -> None:
        super().connect()
        peer = ipaddress.ip_address(self.sock.getpeername()[0])
        if peer not in {ipaddress.ip_address(address) for address in self.pinned_addresses}:
            self.close()
            log.error("connection to %s went to %s, not to a checked address %s; urllib3 no longer opens "
                      "sockets in _new_conn (src/plumbing/pinned_s3.py)", self.host, peer, self.pinned_addresses)
            raise NewConnectionError(self, f"connected to {peer}, which is not a checked address of {self.host}")


def pinned_pool_classes(addresses: tuple[str, ...]) -> dict[str, type]:
    """botocore's pool classes, with connections that open only to `addresses` (and
    are watched by their operation's deadline)."""
    if not addresses:
        raise ValueError("pinned_pool_classes: no addresses")

    class PinnedHTTPConnection(_Pinned, Watched, AWSHTTPConnection):
        pinned_addresses = addresses

    class PinnedHTTPSConnection(_Pinned, Watched, AWSHTTPSConnection):
        pinned_addresses = addresses

    class PinnedHTTPConnectionPool(AWSHTTPConnectionPool):
        ConnectionCls = PinnedHTTPConnection

    class PinnedHTTPSConnectionPool(AWSHTTPSConnectionPool):
        ConnectionCls = PinnedHTTPSConnection

    return {"http": PinnedHTTPConnectionPool, "https": PinnedHTTPSConnectionPool}


class WatchedHTTPConnection(Watched, AWSHTTPConnection):
    pass


class WatchedHTTPSConnection(Watched, AWSHTTPSConnection):
    pass


class WatchedHTTPConnectionPool(AWSHTTPConnectionPool):
    ConnectionCls = WatchedHTTPConnection


class WatchedHTTPSConnectionPool(AWSHTTPSConnectionPool):
    ConnectionCls = WatchedHTTPSConnection


def pin_connections(client, addresses: tuple[str, ...]) -> None:
    """Make every connection of a freshly built botocore `client` go to `addresses`.

    The client must have been built with `NO_PROXIES` merged into its Config and must not
    have sent a request yet."""
    if client.meta.config.proxies != {}:
        raise PinBroken("a pinned client must be built with src.plumbing.pinned_s3.NO_PROXIES in its Config")
    _pool_manager(client).pool_classes_by_scheme = pinned_pool_classes(addresses)


def watch_connections(client) -> None:
    """Make the direct connections of a freshly built botocore `client` end by their
    operation's deadline (src/plumbing/s3_deadline.py). A proxy from the environment,
    which botocore reaches through a pool manager of its own, is not watched."""
    _pool_manager(client).pool_classes_by_scheme = {"http": WatchedHTTPConnectionPool,
                                                    "https": WatchedHTTPSConnectionPool}


def _pool_manager(client) -> PoolManager:
    """The urllib3 pool manager of a client that has not connected yet (step 1 above)."""
    session = getattr(getattr(client, "_endpoint", None), "http_session", None)
    manager = getattr(session, "_manager", None)
    if not isinstance(session, URLLib3Session) or not isinstance(manager, PoolManager):
        raise PinBroken(f"botocore {type(session).__name__} is not the URLLib3Session with a PoolManager that "
                        "src/plumbing/pinned_s3.py pins; check it against this botocore version")
    if len(manager.pools):
        raise PinBroken("a pinned client must not have connected before it is pinned")
    return manager
