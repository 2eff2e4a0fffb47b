"""GetStreamingEvents: one long chunked HTTP response, each chunk a complete SOAP envelope.

Notifications go out as soon as the store changes (a Condition wakes the stream); idle streams get keep-alive
envelopes; after ConnectionTimeout "minutes" (scaled by ``minute_seconds``) a ConnectionStatus=Closed envelope
ends the response. Stream faults (expire, silent, cut) are applied here.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from io import BufferedIOBase

import structlog

from .faults import Fault
from .operations import render_notification
from .soap import Element, envelope, m, response, sub
from .state import SimState
from .subscriptions import Event, Subscription, SubscriptionError

log = structlog.get_logger()


class ChunkWriter:
    """HTTP/1.1 chunked transfer encoding on a handler's output stream."""

    def __init__(self, out: BufferedIOBase, connection: socket.socket) -> None:
        self.out = out
        self.connection = connection

    def chunk(self, data: bytes) -> None:
        self.out.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.out.flush()

    def end(self) -> None:
        self.out.write(b"0\r\n\r\n")
        self.out.flush()

    def cut(self, data: bytes) -> None:
        """Announce a whole chunk, send half of it, and drop the connection."""
        self.out.write(f"{len(data):X}\r\n".encode() + data[: len(data) // 2])
        self.out.flush()
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _message(status: str, code: str = "NoError", failed: list[str] | None = None) -> tuple[Element, Element]:
    root, msgs = response("GetStreamingEvents")
    msg = sub(msgs, m("GetStreamingEventsResponseMessage"), ResponseClass="Success" if code == "NoError" else "Error")
    if code != "NoError":
        sub(msg, m("MessageText"), f"{code}: the subscription is no longer available.")
    sub(msg, m("ResponseCode"), code)
    if failed:
        ids_elem = sub(msg, m("ErrorSubscriptionIds"))
        for sid in failed:
            sub(ids_elem, m("SubscriptionId"), sid)
    return root, msg


def _status(msg: Element, status: str) -> None:
    sub(msg, m("ConnectionStatus"), status)


def error_envelope(code: str, failed: list[str]) -> bytes:
    root, msg = _message("Closed", code, failed)
    _status(msg, "Closed")
    return envelope(root)


def _notifications(batch: list[tuple[Subscription, list[Event]]], status: str) -> bytes:
    root, msg = _message(status)
    if batch:
        notes = sub(msg, m("Notifications"))
        for subscription, events in batch:
            render_notification(notes, subscription, events[0].seq - 1, events, False, status_if_empty=False)
    _status(msg, status)
    return envelope(root)


def serve_stream(state: SimState, writer: ChunkWriter, subscription_ids: list[str], timeout_minutes: int,
                 stream_fault: Fault | None, start_response: Callable[[], None]) -> None:
    """Run one GetStreamingEvents response to its end (Closed, error, fault, or simulator stop)."""
    subs: list[Subscription] = []
    failed: list[str] = []
    code = "ErrorSubscriptionNotFound"
    for sid in subscription_ids:
        try:
            subs.append(state.subs.get(sid))
        except SubscriptionError as exc:
            failed.append(sid)
            code = exc.code
    start_response()
    if failed:
        writer.chunk(error_envelope(code, failed))
        writer.end()
        return
    began = time.monotonic()
    deadline = began + timeout_minutes * state.settings.minute_seconds
    fault_at = began + stream_fault.after_seconds if stream_fault else None
    keepalive = state.settings.keepalive_seconds
    next_keepalive = began + keepalive
    store = state.store
    log.info("exchange_sim_stream_opened", subscriptions=len(subs), minutes=timeout_minutes)
    while True:
        with store.lock:
            gone = [s for s in subs if s.gone or state.subs.by_id.get(s.id) is not s]
            batch = [(s, ev) for s in subs if s.events and (ev := state.subs.take_for_stream(s))]   # most have none
            now = time.monotonic()
            if not gone and not batch and not state.stopping.is_set():
                wake = min(x for x in (deadline, next_keepalive, fault_at) if x is not None)
                if wake > now:
                    store.changed.wait(wake - now)
                    continue
        now = time.monotonic()
        if batch:
            writer.chunk(_notifications(batch, "OK"))
            next_keepalive = now + keepalive
        if gone:
            writer.chunk(error_envelope(gone[0].gone or "ErrorSubscriptionNotFound", [s.id for s in gone]))
            writer.end()
            return
        if state.stopping.is_set() or now >= deadline:
            writer.chunk(_notifications([], "Closed"))
            writer.end()
            log.info("exchange_sim_stream_closed", subscriptions=len(subs))
            return
        if stream_fault is not None and fault_at is not None and now >= fault_at:
            _apply_fault(state, writer, subs, stream_fault, deadline)
            return
        if now >= next_keepalive:
            writer.chunk(_notifications([], "OK"))
            next_keepalive = now + keepalive


def _apply_fault(state: SimState, writer: ChunkWriter, subs: list[Subscription], fault: Fault, deadline: float) -> None:
    log.info("exchange_sim_stream_fault", kind=fault.kind)
    if fault.kind == "stream_expire":
        code = fault.code or "ErrorSubscriptionNotFound"
        for s in subs:
            state.subs.expire(s.id, code)
        writer.chunk(error_envelope(code, [s.id for s in subs]))
        writer.end()
    elif fault.kind == "stream_silent":
        # Nothing more is sent; the connection stays open until the client gives up or the simulator stops.
        state.stopping.wait(max(0.0, deadline - time.monotonic()) + 60 * state.settings.minute_seconds)
        try:
            writer.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    elif fault.kind == "stream_cut":
        writer.cut(_notifications([], "OK"))
