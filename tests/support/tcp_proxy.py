"""A TCP proxy the test controls, to cut a connection the way the network does (no broker restart needed).

``TcpProxy(target_port)`` listens on 127.0.0.1 at ``proxy.port`` and forwards every connection to the target.
``cut()`` closes every open connection at once (both directions, like a firewall reset); ``cut_after(n)``
arms a one-shot cut that fires once ``n`` bytes have gone from client to server in total, so a test can cut
a producer half-way through a burst of publishes without timing anything; ``refuse()``/``accept()`` make new
connections fail or pass. Threads only; everything stops with ``close()``.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field


@dataclass
class _Pair:
    client: socket.socket
    server: socket.socket
    closed: threading.Event = field(default_factory=threading.Event)

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._pairs: list[_Pair] = []
        self._lock = threading.Lock()
        self._refusing = False
        self._cut_at: int | None = None
        self._upstream_bytes = 0
        self.cuts = 0
        self.connections = 0
        self._stopped = threading.Event()
        threading.Thread(target=self._accept_loop, name="tcp-proxy-accept", daemon=True).start()

    # --- control -------------------------------------------------------------------------------
    def cut(self) -> None:
        """Close every open connection now."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
            self.cuts += 1
        for pair in pairs:
            pair.close()

    def cut_after(self, upstream_bytes: int) -> None:
        """Cut every open connection once this many more bytes have gone from clients to the server."""
        with self._lock:
            self._cut_at = self._upstream_bytes + upstream_bytes

    def refuse(self) -> None:
        self._refusing = True

    def accept(self) -> None:
        self._refusing = False

    def close(self) -> None:
        self._stopped.set()
        self._listener.close()
        self.cut()

    # --- forwarding ------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._refusing:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            pair = _Pair(client, server)
            with self._lock:
                self._pairs.append(pair)
                self.connections += 1
            threading.Thread(target=self._pump, args=(pair, client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(pair, server, client, False), daemon=True).start()

    def _pump(self, pair: _Pair, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        try:
            while not pair.closed.is_set():
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
                if upstream and self._count(len(data)):
                    self.cut()
                    return
        except OSError:
            pass
        pair.close()

    def _count(self, size: int) -> bool:
        with self._lock:
            self._upstream_bytes += size
            if self._cut_at is not None and self._upstream_bytes >= self._cut_at:
                self._cut_at = None
                return True
            return False
