"""A TCP proxy on loopback that can freeze: it keeps accepting, and holds every byte until healed.

What a partition or a hung database node looks like to a client: connections
open, writes succeed (the kernel takes them), and no answer ever comes. Used by
the hung-database tests and bench/hang.py, and safe on a shared server (unlike a
SIGSTOP of PostgreSQL, it hangs only the connections that go through it).
"""

from __future__ import annotations

import contextlib
import socket
import threading

from sqlalchemy.engine import make_url


class FreezingProxy:
    """Forwards 127.0.0.1:`port` to `target`; `freeze()` holds all traffic, `heal()` lets it through."""

    def __init__(self, target: tuple[str, int] | str) -> None:
        """`target`: a (host, port), or a Unix socket's path."""
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @classmethod
    def to(cls, url: str) -> tuple[FreezingProxy, str]:
        """A proxy to the server of a database URL, and the URL that goes through it."""
        parsed = make_url(url)
        socket_dir = parsed.query.get("host")
        port = parsed.port or 5432
        if isinstance(socket_dir, str) and socket_dir.startswith("/"):
            proxy = cls(f"{socket_dir}/.s.PGSQL.{port}")
        else:
            proxy = cls((parsed.host or "127.0.0.1", port))
        through = parsed.set(host="127.0.0.1", port=proxy.port, query={})
        return proxy, through.render_as_string(hide_password=False)

    def freeze(self) -> None:
        """From now on nothing passes in either direction; new connections are accepted and held."""
        self._flowing.clear()

    def heal(self) -> None:
        """Let everything held, and everything after, through."""
        self._flowing.set()

    def close(self) -> None:
        """Stop listening and drop every connection."""
        self._closed.set()
        self._flowing.set()
        with self._lock:
            for sock in [self._listener, *self._sockets]:
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = self._connect()
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _connect(self) -> socket.socket:
        if isinstance(self.target, str):
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.target)
            return upstream
        return socket.create_connection(self.target)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        # Bytes read while frozen wait here until the heal: held, never dropped.
        try:
            while True:
                data = source.recv(65536)
                self._flowing.wait()
                if not data or self._closed.is_set():
                    break
                sink.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
