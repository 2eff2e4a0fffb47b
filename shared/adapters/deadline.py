"""Hard total deadlines for calls to outside systems over HTTP (Planner today, Exchange next).

A per-read timeout does not bound a call: a server that drips one byte a second never trips a 60 s read timeout,
and a call that waits for a 100 kB body that way takes a day. Here every call runs inside ``deadline(seconds,
what)``. A single watchdog thread watches all calls in flight; when one passes its deadline, the watchdog shuts
down the sockets that call uses, so the thread blocked in ``recv`` (or in a TLS handshake) gets an error at once,
and ``deadline`` raises ``DeadlineExceeded`` in the calling thread (decision 51 in docs/decisions.md).

The sockets are found without touching the HTTP library's internals beyond one documented extension point:
``guard_pools(pool_manager)`` (or the ``DeadlineAdapter`` requests adapter, or ``guard_adapter``) makes urllib3 use
connection classes that hand each socket to the call in flight on their thread, when the connection is made and
each time a request is sent on a kept-alive connection. The watchdog holds a duplicate of each descriptor for the
duration of the call, so it can never shut down a socket that was meanwhile closed and whose number was reused.

``in_flight()`` lists the calls running now, so health can show a call that outlived its deadline (one the
watchdog could not end, which would be a bug worth an alarm).
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.poolmanager import PoolManager


class DeadlineExceeded(TimeoutError):
    """The call did not finish within its total deadline; its connection was shut down."""


@dataclass(eq=False)
class Call:
    """One call under a deadline: what it is, when it started and must end (``time.monotonic()``)."""

    what: str
    started: float
    deadline: float
    expired: bool = False
    _sockets: list[socket.socket] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def guard(self, sock: Any) -> None:
        """Shut ``sock`` down when this call expires (at once, if it already has)."""
        try:
            duplicate = socket.socket(fileno=os.dup(sock.fileno()))
        except (OSError, ValueError, AttributeError):
            return  # already closed, or not a real socket: nothing to cut
        with self._lock:
            self._sockets.append(duplicate)
            expired = self.expired
        if expired:
            _shutdown(duplicate)

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)

    def release(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.close()
            except OSError:
                pass


@dataclass(frozen=True)
class CallInfo:
    """A call in flight, as health reports it."""

    what: str
    running_s: float
    deadline_s: float

    @property
    def overdue(self) -> bool:
        return self.running_s > self.deadline_s


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Watchdog:
    """One daemon thread that expires calls whose deadline passed."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int, Call]] = []
        self._calls: set[Call] = set()
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, call: Call) -> None:
        with self._condition:
            self._calls.add(call)
            heapq.heappush(self._heap, (call.deadline, next(self._order), call))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="call-deadline-watchdog", daemon=True)
                self._thread.start()
            self._condition.notify()

    def remove(self, call: Call) -> None:
        with self._condition:
            self._calls.discard(call)

    def calls(self) -> list[Call]:
        with self._condition:
            return list(self._calls)

    def _run(self) -> None:
        while True:
            due: list[Call] = []
            with self._condition:
                while self._heap and self._heap[0][2] not in self._calls:
                    heapq.heappop(self._heap)  # finished in time
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    call = heapq.heappop(self._heap)[2]
                    if call in self._calls:
                        due.append(call)
                if not due:
                    self._condition.wait(None if not self._heap else max(0.0, self._heap[0][0] - now))
            for call in due:
                call.expire()


_watchdog = _Watchdog()
_local = threading.local()


def current() -> Call | None:
    """The call under a deadline that this thread is making, if any."""
    call: Call | None = getattr(_local, "call", None)
    return call


def guard_socket(sock: Any) -> None:
    """Put ``sock`` under the deadline of this thread's call (nothing when there is none)."""
    call = current()
    if call is not None:
        call.guard(sock)


@contextmanager
def deadline(seconds: float, what: str) -> Iterator[Call]:
    """Run the block as one call that must end within ``seconds``; raise ``DeadlineExceeded`` when it did not."""
    started = time.monotonic()
    call = Call(what, started, started + seconds)
    previous = current()
    _local.call = call
    _watchdog.add(call)
    try:
        yield call
    except Exception as exc:
        if call.expired:
            raise DeadlineExceeded(f"{what}: no complete answer within its {seconds:g} s deadline") from exc
        raise
    finally:
        _watchdog.remove(call)
        _local.call = previous
        call.release()
    if call.expired:  # cut while the block still ran: what it read may have ended early without an error
        raise DeadlineExceeded(f"{what}: no complete answer within its {seconds:g} s deadline")


def in_flight() -> list[CallInfo]:
    """Every call under a deadline that is running now, longest first."""
    now = time.monotonic()
    calls = [CallInfo(call.what, now - call.started, call.deadline - call.started) for call in _watchdog.calls()]
    return sorted(calls, key=lambda info: info.running_s, reverse=True)


# --------------------------------------------------------------------------------------------- urllib3 / requests


class _GuardedHTTPConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        guard_socket(sock)  # before any TLS handshake: the handshake is under the deadline too
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        if self.sock is not None:
            guard_socket(self.sock)  # a kept-alive connection used by a new call
        super().request(*args, **kwargs)


class _GuardedHTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        guard_socket(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        if self.sock is not None:
            guard_socket(self.sock)
        super().request(*args, **kwargs)


class _GuardedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


def guard_pools(manager: PoolManager) -> PoolManager:
    """Make ``manager`` (a PoolManager or ProxyManager) open connections whose sockets deadlines can cut."""
    manager.pool_classes_by_scheme = {"http": _GuardedHTTPConnectionPool, "https": _GuardedHTTPSConnectionPool}
    return manager


class DeadlineAdapter(HTTPAdapter):
    """A requests adapter whose connections are under the deadline of the call in flight on their thread."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        guard_pools(self.poolmanager)

    def proxy_manager_for(self, *args: Any, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(*args, **kwargs)
        guard_pools(manager)
        return manager
