"""A total deadline for a bucket's requests, however slowly the server answers.

botocore bounds each wait on a socket (its connect and read timeouts), not a request: a
server that sends a byte just inside the read timeout holds the request, and the GPU
worker that bills by the second, for as long as it likes. Inside `within(seconds)`,
every request that a bucket client sends from this thread ends by the deadline: a timer
shuts down the sockets of those requests when the time is up, so a blocked read returns
at once. The block then raises `TimedOut`, whatever botocore made of the closed
connection: an error, or a "success" read from a cut answer (http.client takes the end
of the stream for the end of the headers).

Invariants: it works through `Watched`, mixed into the connection classes
src/plumbing/pinned_s3.py installs in a client, and relies on three behaviours of urllib3 2.8.0
(pinned in requirements.txt; listed in docs/upstream-register.md, "Internals relied on"). A
connection used outside any `within` block is not watched. Blocks do not nest.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

_local = threading.local()
# The shortest wait a connection opened near the deadline is given: a socket timeout of
# 0 would make it non-blocking rather than quick.
_MIN_WAIT_S = 0.001


class TimedOut(Exception):
    """The operation ran out of time; its sockets were shut."""

    def __init__(self, seconds: float):
        super().__init__(f"timed out after {seconds:g} s")
        self.seconds = seconds


class _TooLate(TimeoutError):
    """A request started after its deadline (urllib3 takes it for a timeout)."""


class Deadline:
    """The end of one outbound operation, and the connections it watches."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.ends_at = time.monotonic() + seconds
        self.expired = False  # set when the time ran out, before any socket is shut
        self._watched: set = set()
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def left_s(self) -> float:
        return self.ends_at - time.monotonic()

    def watch(self, connection) -> None:
        """Shut `connection`'s socket down when the time is up, if it still serves this operation."""
        with self._lock:
            if self.expired:
                raise _TooLate(f"the operation's {self.seconds:g} s are up")
            connection._deadline = self
            self._watched.add(connection)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for connection in self._watched:
                sock = connection.sock
                # A connection handed on to another operation since is that one's to end.
                if getattr(connection, "_deadline", None) is self and sock is not None:
                    try:
                        # socket.socket's own shutdown: on a TLS socket, ssl's would also
                        # drop its state under the read in progress.
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)
                    except OSError:  # already closed
                        pass

    def _end(self) -> None:
        self._timer.cancel()
        with self._lock:
            for connection in self._watched:
                if getattr(connection, "_deadline", None) is self:
                    connection._deadline = None
            self._watched.clear()


@contextmanager
def within(seconds: float) -> Iterator[Deadline]:
    """Every request of a watched client from this thread, in this block, ends within
    `seconds`; the block raises TimedOut if they ran out, in place of what it raised or
    returned."""
    deadline = Deadline(seconds)
    _local.deadline = deadline
    deadline._timer.start()
    try:
        yield deadline
    except Exception as exc:
        if deadline.expired:
            raise TimedOut(seconds) from exc
        raise
    finally:
        _local.deadline = None
        deadline._end()
    if deadline.expired:
        raise TimedOut(seconds)


def current() -> Deadline | None:
    """The deadline of this thread's operation, if one is running."""
    return getattr(_local, "deadline", None)


class Watched:
    """Mixin for botocore's connection classes: the connection serves the deadline of
    the operation that opens or uses it, and opens no slower than what is left of it."""

    def connect(self) -> None:
        deadline = current()
        if deadline is not None:
            deadline.watch(self)
            if isinstance(self.timeout, (int, float)):
                self.timeout = max(_MIN_WAIT_S, min(self.timeout, deadline.left_s()))
        super().connect()

    def request(self, *args, **kwargs):
        deadline = current()
        if deadline is not None:
            deadline.watch(self)
        return super().request(*args, **kwargs)
