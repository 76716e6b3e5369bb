"""A TCP proxy on loopback that can freeze: it keeps accepting, and holds every byte until healed.

What a partition or a hung database node looks like to a client: connections
open, writes succeed (the kernel takes them), and no answer ever comes. Used by
the hung-database tests and bench/hang.py, and safe on a shared server (unlike a
SIGSTOP of PostgreSQL, it hangs only the connections that go through it).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable

from sqlalchemy.engine import make_url


class FreezingProxy:
    """Forwards 127.0.0.1:`port` to `target`; `freeze()` holds all traffic, `heal()` lets it through.

    `answer_delay_s` holds each chunk the server sends that long: a database that far away,
    every round trip that much longer (the benchmark's `--db-delay-ms`).
    """

    def __init__(self, target: tuple[str, int] | str, answer_delay_s: float = 0.0) -> None:
        """`target`: a (host, port), or a Unix socket's path."""
        self.target = target
        self.answer_delay_s = answer_delay_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._query_count = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @classmethod
    def to(cls, url: str, answer_delay_s: float = 0.0) -> tuple[FreezingProxy, str]:
        """A proxy to the server of a database URL, and the URL that goes through it."""
        parsed = make_url(url)
        socket_dir = parsed.query.get("host")
        port = parsed.port or 5432
        if isinstance(socket_dir, str) and socket_dir.startswith("/"):
            proxy = cls(f"{socket_dir}/.s.PGSQL.{port}", answer_delay_s)
        else:
            proxy = cls((parsed.host or "127.0.0.1", port), answer_delay_s)
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
            frontend = _FrontendMessages(self._queried)
            threading.Thread(target=self._pump, args=(client, upstream, frontend.feed), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, None, self.answer_delay_s), daemon=True).start()

    def _connect(self) -> socket.socket:
        if isinstance(self.target, str):
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.target)
            return upstream
        return socket.create_connection(self.target)

    @property
    def queries(self) -> int:
        """The simple-protocol queries ('Q' messages) clients sent through so far: the database's round trips.

        Counted only on unencrypted connections (`sslmode=disable`): TLS hides the messages.
        """
        with self._lock:
            return self._query_count

    def _queried(self) -> None:
        with self._lock:
            self._query_count += 1

    def _pump(
        self,
        source: socket.socket,
        sink: socket.socket,
        watch: Callable[[bytes], None] | None = None,
        delay_s: float = 0.0,
    ) -> None:
        # Bytes read while frozen wait here until the heal: held, never dropped.
        try:
            while True:
                data = source.recv(65536)
                self._flowing.wait()
                if not data or self._closed.is_set():
                    break
                if watch is not None:
                    watch(data)
                if delay_s:
                    time.sleep(delay_s)
                sink.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


# The startup-phase requests a client may send before its StartupMessage (no type byte either).
_SSL_REQUEST, _GSSENC_REQUEST = 80877103, 80877104


class _FrontendMessages:
    """Reads a client's side of PostgreSQL's protocol and calls `on_query` for each simple query.

    https://www.postgresql.org/docs/current/protocol-message-formats.html: the startup
    packets are a length then a code; every later message is a type byte then a length.
    """

    def __init__(self, on_query: Callable[[], None]) -> None:
        self._on_query = on_query
        self._buffer = b""
        self._started = False

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while True:
            if not self._started:
                if len(self._buffer) < 8:
                    return
                length, code = struct.unpack("!ii", self._buffer[:8])
                if len(self._buffer) < length:
                    return
                self._buffer = self._buffer[length:]
                # After an SSL or GSS request the client sends its StartupMessage (when refused).
                self._started = code not in (_SSL_REQUEST, _GSSENC_REQUEST)
                continue
            if len(self._buffer) < 5:
                return
            kind, length = self._buffer[:1], struct.unpack("!i", self._buffer[1:5])[0]
            if len(self._buffer) < 1 + length:
                return
            self._buffer = self._buffer[1 + length :]
            if kind == b"Q":
                self._on_query()
