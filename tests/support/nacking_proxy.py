"""A TCP proxy in front of RabbitMQ whose first confirm-mode channel of every connection is nacked, every publish.

What RabbitMQ 3.10 does to a channel that first publishes to a quorum queue while the queue's leader is dead and no
new one is elected (decision 82 in docs/decisions.md): that channel keeps the dead leader and the broker nacks every
publish on it, while a channel opened afterwards on the same connection publishes at once. On one node the leader
cannot die, so this proxy makes the client see the same: it reads the AMQP frames going each way, takes the first
channel of each connection that selects confirm mode (``Confirm.Select``) as the stuck one, and turns each
``Basic.Ack`` the broker sends on that channel into a ``Basic.Nack`` (the same frame with another method id: both
carry a delivery tag and one octet of flags, whose first bit is ``multiple``). Every other channel, and everything
else on the stuck one (deliveries, the client's acks), passes unchanged.

Unlike the real fault, the broker did take the messages whose acks are turned into nacks, so a client that
publishes them again doubles them (harmless, decision 6); tests count distinct messages.
"""

from __future__ import annotations

import socket
import struct
import threading

from tests.support.tcp_proxy import TcpProxy, _Pair

PROTOCOL_HEADER = 8  # b"AMQP\x00\x00\x09\x01", sent once by the client before its first frame
METHOD_FRAME = 1
CONFIRM_SELECT = (85, 10)
BASIC_ACK = (60, 80)
BASIC_NACK = (60, 120)


class _Frames:
    """Cuts a byte stream into whole AMQP frames (type, channel, size, payload, frame-end), keeping the rest."""

    def __init__(self, skip: int = 0) -> None:
        self._skip = skip
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytearray]:
        self._buffer += data
        if self._skip:
            taken = min(self._skip, len(self._buffer))
            del self._buffer[:taken]
            self._skip -= taken
        frames = []
        while len(self._buffer) >= 7:
            size = struct.unpack_from(">I", self._buffer, 3)[0]
            end = 7 + size + 1
            if len(self._buffer) < end:
                break
            frames.append(self._buffer[:end])
            del self._buffer[:end]
        return frames


def _method(frame: bytearray) -> tuple[int, int, int] | None:
    """(channel, class id, method id) of a method frame, else None."""
    if frame[0] != METHOD_FRAME or len(frame) < 11:
        return None
    channel = struct.unpack_from(">H", frame, 1)[0]
    class_id, method_id = struct.unpack_from(">HH", frame, 7)
    return channel, class_id, method_id


class NackingProxy(TcpProxy):
    """``TcpProxy`` to the broker; the first channel of each connection to select confirm mode has every ack nacked."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self._stuck: dict[int, int] = {}  # id(pair) -> the channel number whose acks become nacks
        self._state_lock = threading.Lock()
        self.nacked = 0  # ack frames turned into nack frames so far (one may confirm several publishes)
        super().__init__(target_port, target_host)

    def _pump(self, pair: _Pair, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        frames = _Frames(skip=PROTOCOL_HEADER if upstream else 0)
        try:
            while not pair.closed.is_set():
                data = source.recv(65536)
                if not data:
                    break
                if upstream:  # the client's frames pass as they are; a first Confirm.Select marks its channel
                    for frame in frames.feed(data):
                        method = _method(frame)
                        if method is not None and method[1:] == CONFIRM_SELECT:
                            with self._state_lock:
                                self._stuck.setdefault(id(pair), method[0])
                    sink.sendall(data)
                    continue
                out = bytearray()
                for frame in frames.feed(data):
                    method = _method(frame)
                    if method is not None and method[1:] == BASIC_ACK:
                        with self._state_lock:
                            stuck = self._stuck.get(id(pair))
                        if method[0] == stuck:
                            struct.pack_into(">H", frame, 9, BASIC_NACK[1])
                            with self._state_lock:
                                self.nacked += 1
                    out += frame
                if out:
                    sink.sendall(bytes(out))
        except OSError:
            pass
        with self._state_lock:
            self._stuck.pop(id(pair), None)
        pair.close()
