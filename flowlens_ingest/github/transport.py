"""Every socket wait of a request to GitHub within the request's deadline, headers included.

httpx's timeouts are per socket operation, and httpx checks nothing between the operations that
read a status line and headers: a server that sends `100 Continue` lines, or its headers a byte at
a time, never trips a 10 s read timeout and holds the request for as long as it likes. The client
checks its deadline on every chunk of a body itself (client.py), but nothing of the headers'
reads reaches it.

So the socket operations themselves are bounded: `bound_requests` wraps the network backend of
each connection pool of an httpx client (the direct one and those of the proxies it found in the
environment) so that each connect, read and write waits at most until the deadline of the request
this thread is making (`within(deadline)`), and past it raises httpcore's own timeout, which httpx
turns into the `httpx.TimeoutException` the client already handles. The pools' backends are not
a setting of httpx (httpcore takes one, httpx does not pass it on): if a release of httpx stops
holding them where this looks, `bound_requests` raises (TypeError), and every client fails to start, rather
than the bound going away unnoticed.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any

import httpcore
import httpx

# The time.monotonic() by which the request this thread is making must be over; None: no deadline.
_ENDS: ContextVar[float | None] = ContextVar("flowlens_github_request_deadline", default=None)


@contextlib.contextmanager
def within(ends: float) -> Iterator[None]:
    """Every socket wait of this thread's requests inside the block ends by `ends` (a time.monotonic() value)."""
    token = _ENDS.set(ends)
    try:
        yield
    finally:
        _ENDS.reset(token)


def _bounded(timeout: float | None, timed_out: type[Exception]) -> float | None:
    """`timeout` cut to what is left of the request's deadline; `timed_out` once nothing is left."""
    ends = _ENDS.get()
    if ends is None:
        return timeout
    left = ends - time.monotonic()
    if left <= 0:
        raise timed_out("the request's deadline passed")
    return left if timeout is None else min(timeout, left)


class _Stream(httpcore.NetworkStream):
    """A connection whose every read and write ends by the current request's deadline."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        return _Stream(self._stream.start_tls(ssl_context, server_hostname, _bounded(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    """Connections opened by the current request's deadline, each bounded by it while it serves a request."""

    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        bounded = _bounded(timeout, httpcore.ConnectTimeout)
        return _Stream(self._backend.connect_tcp(host, port, bounded, local_address, socket_options))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        bounded = _bounded(timeout, httpcore.ConnectTimeout)
        return _Stream(self._backend.connect_unix_socket(path, bounded, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def bound_requests(client: httpx.Client) -> None:
    """Make every socket wait of `client`'s requests end by the deadline `within` sets; TypeError if httpx hides them."""
    transports = [client._transport, *client._mounts.values()]
    for transport in transports:
        if transport is None:
            continue  # a proxy pattern the environment excludes: sent directly, by the transport above
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if not isinstance(backend, httpcore.NetworkBackend):
            raise TypeError(f"cannot bound the socket waits of {type(transport).__name__}: httpx changed")
        if not isinstance(backend, _Backend):
            pool._network_backend = _Backend(backend)  # type: ignore[union-attr]
