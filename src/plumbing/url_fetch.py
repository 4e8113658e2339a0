"""Bounded HTTP(S) downloads of job URLs, connecting only to addresses the guard checked.

A job URL is untrusted input. Invariants:
- SSRF: every hop, the job's URL and each redirect, goes through `url_guard.resolve_checked`
  before any connection, so no URL, nor a redirect, reaches the metadata service, loopback
  or the worker's network.
- DNS rebinding: the connection goes to the addresses that check returned, never to the name
  again; the `Host` header and the TLS certificate are still checked against the name.
- Bounded time and memory: a size cap (refused on Content-Length before the body, else cut
  as the stream passes it), a connect timeout, an idle timeout for each wait on the next
  bytes, and a total timeout for the whole download, redirects included, that holds even for
  a server trickling a byte at a time (every socket read waits at most what is left of it).
- Nothing is decompressed (`Accept-Encoding: identity`), so Content-Length counts the bytes
  that arrive; http.client reads no proxy settings, so no proxy is ever used.
- Every failure is a `FetchError` or `url_guard.UrlRefused` (`InputError`s, `<key>: <reason>`)
  showing the URL as `url_guard.shown` does: no query string, no user info.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator
from urllib.parse import quote, urljoin

from src.job.schema import InputError
from src.plumbing.url_guard import AddressPolicy, CheckedTarget, resolve_checked, shown

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# The setting the connect timeout comes from, named in timeout errors (src/plumbing/config.py).
CONNECT_TIMEOUT_SETTING = "FETCH_CONNECT_TIMEOUT_S"
FETCH_BYTES_CHUNK = 1 << 16
USER_AGENT = "qwen-image-edit-worker"
# Characters a request target may carry as they are (RFC 3986's reserved and unreserved,
# and "%" so existing escapes stay); `quote` encodes the rest.
URL_SAFE_CHARACTERS = "!#$%&'()*+,/:;=?@[]~"


@dataclass(frozen=True)
class FetchLimits:
    """How much one download may take."""

    max_bytes: int
    max_bytes_setting: str  # the env var named in the error, e.g. "MAX_IMAGE_BYTES"
    connect_timeout_s: float
    total_timeout_s: float | None  # the whole download, redirects included; None: no total bound
    idle_timeout_s: float  # the longest wait for the next bytes
    max_redirects: int = 3
    total_timeout_setting: str = "FETCH_TIMEOUT_S"  # the env var named in a total-timeout error


class FetchError(InputError):
    """A download that failed or was cut; the message is `<key>: <reason>`."""


def fetch_bytes(url: str, key: str, policy: AddressPolicy, limits: FetchLimits) -> bytes:
    """The body of `url`, at most `limits.max_bytes` of it, following redirects."""
    return b"".join(iter_chunks(url, key, policy, limits, FETCH_BYTES_CHUNK))


def iter_chunks(url: str, key: str, policy: AddressPolicy, limits: FetchLimits,
                chunk_bytes: int) -> Iterator[bytes]:
    """The body of `url` in chunks of at most `chunk_bytes`, following redirects; raises
    FetchError once more than `limits.max_bytes` would have arrived."""
    clock = _Clock(limits)
    hop, connection, response = _open_following_redirects(_Hop(key, url, url), policy, limits, clock)
    try:
        with _failures_named(hop, clock, connecting=False):
            yield from _body(response, hop, limits, chunk_bytes)
    finally:
        response.close()
        connection.close()


@dataclass(frozen=True)
class _Hop:
    """One request of a download: the URL asked for now and the job's own URL."""

    key: str
    url: str
    first_url: str

    def shown(self) -> str:
        text = repr(shown(self.url))
        if self.url != self.first_url:
            text += f" (redirected from {shown(self.first_url)!r})"
        return text

    def failed(self, reason: str) -> FetchError:
        return FetchError(f"{self.key}: downloading {self.shown()} failed: {reason}")

    def guard_key(self) -> str:
        """The prefix of the guard's refusal: a redirect's target is named as one."""
        if self.url == self.first_url:
            return self.key
        return f"{self.key}: {shown(self.first_url)!r} redirects to {shown(self.url)!r}"


class _Clock:
    """How long the next wait may last: the connect or idle timeout, never past the
    whole download's deadline. Remembers whether that deadline cut the last wait short,
    so a timeout is reported against the right setting."""

    def __init__(self, limits: FetchLimits):
        self.limits = limits
        self.deadline = None if limits.total_timeout_s is None else time.monotonic() + limits.total_timeout_s
        self.total_bound = False

    def connect_wait_s(self) -> float:
        return self._bounded(self.limits.connect_timeout_s)

    def read_wait_s(self) -> float:
        return self._bounded(self.limits.idle_timeout_s)

    def _bounded(self, wait_s: float) -> float:
        if self.deadline is None:
            return wait_s
        left_s = self.deadline - time.monotonic()
        self.total_bound = left_s <= wait_s
        if left_s <= 0:
            raise TimeoutError("the download's total time is up")
        return min(wait_s, left_s)


class _PacedSocket(socket.socket):
    """A TCP socket whose every read waits at most what the clock allows. http.client
    reads headers and chunk sizes a line at a time, several reads per call: pacing each
    read is what bounds a server that trickles them."""

    clock: _Clock

    def recv_into(self, buffer, nbytes=0, flags=0):
        self.settimeout(self.clock.read_wait_s())
        return super().recv_into(buffer, nbytes, flags)


class _PacedSSLSocket(ssl.SSLSocket):
    """The TLS form of `_PacedSocket` (set as the context's `sslsocket_class`)."""

    clock: _Clock

    def recv_into(self, buffer, nbytes=None, flags=0):
        self.settimeout(self.clock.read_wait_s())
        return super().recv_into(buffer, nbytes, flags)


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to the checked addresses; `Host` still names the URL's host."""

    def __init__(self, target: CheckedTarget, clock: _Clock):
        super().__init__(target.host, target.port)
        self.target, self.clock = target, clock

    def connect(self) -> None:
        plain = _connect_to_checked(self.target, self.clock)
        self.sock = _PacedSocket(fileno=plain.detach())
        self.sock.clock = self.clock
        self.sock.settimeout(self.clock.connect_wait_s())  # for sending the request


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to the checked addresses, the certificate verified against the URL's host."""

    def __init__(self, target: CheckedTarget, clock: _Clock):
        context = ssl.create_default_context()
        context.sslsocket_class = _PacedSSLSocket
        super().__init__(target.host, target.port, context=context)
        self.target, self.clock = target, clock

    def connect(self) -> None:
        plain = _connect_to_checked(self.target, self.clock)
        self.sock = self._context.wrap_socket(plain, server_hostname=self.target.host)
        self.sock.clock = self.clock


def _connect_to_checked(target: CheckedTarget, clock: _Clock) -> socket.socket:
    """A TCP connection to the first checked address that takes one, tried in order."""
    failure: OSError | None = None
    for address in target.addresses:
        try:
            return socket.create_connection((address, target.port), timeout=clock.connect_wait_s())
        except OSError as exc:
            failure = exc
    raise failure


def _open_following_redirects(hop: _Hop, policy: AddressPolicy, limits: FetchLimits, clock: _Clock):
    """(the last hop, its connection, its 200 response), each hop checked before connecting."""
    for _ in range(limits.max_redirects + 1):
        target = resolve_checked(hop.url, hop.guard_key(), policy)
        connection, response = _get(target, hop, clock)
        if response.status == 200:
            return hop, connection, response
        location = response.getheader("Location")
        response.close()
        connection.close()
        if response.status not in REDIRECT_STATUSES:
            raise hop.failed(f"HTTP {response.status}")
        if not location:
            raise hop.failed(f"HTTP {response.status} redirect without a Location header")
        hop = replace(hop, url=urljoin(hop.url, location))
    raise replace(hop, url=hop.first_url).failed(f"more than {limits.max_redirects} redirects")


def _get(target: CheckedTarget, hop: _Hop, clock: _Clock):
    """(the connection, its response's status and headers), the body not yet read."""
    connection_cls = _PinnedHTTPSConnection if target.url.scheme == "https" else _PinnedHTTPConnection
    connection = None
    try:
        with _failures_named(hop, clock, connecting=True):
            connection = connection_cls(target, clock)
            connection.connect()
        with _failures_named(hop, clock, connecting=False):
            connection.request("GET", _request_target(target), headers={
                "Accept-Encoding": "identity", "User-Agent": USER_AGENT, "Connection": "close"})
            return connection, connection.getresponse()
    except BaseException:
        if connection is not None:
            connection.close()
        raise


def _request_target(target: CheckedTarget) -> str:
    """Path and query as sent: spaces and non-ASCII characters percent-encoded, as
    browsers do (http.client would refuse them), existing escapes kept."""
    path = target.url.path or "/"
    if target.url.query:
        path += f"?{target.url.query}"
    return quote(path, safe=URL_SAFE_CHARACTERS)


def _body(response: http.client.HTTPResponse, hop: _Hop, limits: FetchLimits, chunk_bytes: int) -> Iterator[bytes]:
    declared = response.length  # None: chunked, or until the server closes the connection
    if declared is not None and declared > limits.max_bytes:
        raise FetchError(f"{hop.key}: {hop.shown()} is {declared} bytes (Content-Length), larger than "
                         f"{limits.max_bytes} bytes ({limits.max_bytes_setting})")
    received = 0
    while True:
        # Never more than one byte past the cap: a body of unknown length is cut as it passes it.
        chunk = response.read1(min(chunk_bytes, limits.max_bytes - received + 1))
        if not chunk:
            break
        received += len(chunk)
        if received > limits.max_bytes:
            raise FetchError(f"{hop.key}: {hop.shown()} is larger than {limits.max_bytes} bytes "
                             f"({limits.max_bytes_setting}); cut after {received} bytes")
        yield chunk
    if declared is not None and received < declared:
        # http.client returns a short body as if complete.
        raise hop.failed(f"the connection closed after {received} of {declared} bytes")


@contextmanager
def _failures_named(hop: _Hop, clock: _Clock, connecting: bool):
    """Socket, TLS and HTTP failures as FetchErrors saying what went wrong."""
    limits = clock.limits
    try:
        yield
    except TimeoutError:
        if clock.total_bound:
            reason = f"timed out after {limits.total_timeout_s:g} s ({limits.total_timeout_setting})"
        elif connecting:
            reason = f"no connection within {limits.connect_timeout_s:g} s ({CONNECT_TIMEOUT_SETTING})"
        else:
            reason = f"timed out: no data for {limits.idle_timeout_s:g} s"
        raise hop.failed(reason) from None
    except ConnectionRefusedError:
        raise hop.failed("connection refused") from None
    except ssl.SSLCertVerificationError as exc:
        raise hop.failed(f"TLS certificate not accepted ({exc.verify_message})") from None
    except ssl.SSLError as exc:
        raise hop.failed(f"TLS failed ({exc.reason or type(exc).__name__})") from None
    except http.client.RemoteDisconnected:
        raise hop.failed("the server closed the connection without a response") from None
    except http.client.IncompleteRead:
        raise hop.failed("the connection closed before the body was complete") from None
    except http.client.InvalidURL:
        raise hop.failed("the URL's path or host has characters HTTP does not allow") from None
    except http.client.HTTPException as exc:
        raise hop.failed(f"not a valid HTTP response ({type(exc).__name__})") from None
    except OSError as exc:
        raise hop.failed(f"connection failed ({exc.strerror or type(exc).__name__})") from None
