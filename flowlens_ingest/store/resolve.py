"""Database host names resolved within the caller's deadline, before libpq connects.

libpq looks a host name up itself (getaddrinfo) before any socket exists, so neither psycopg2's
wait callback (deadline.py) nor `connect_timeout` bounds that wait: a resolver that does not
answer held a delivery past GitHub's 10 s at every reconnect. Names are looked up here, on a
helper thread waited for at most the time left of the caller's deadline (RESOLVE_S at most), and
handed to libpq as `hostaddr` beside the name, which it still connects as (TLS verification, the
server's view). Every address a name has is passed, in order, as libpq would try them. An answer
is kept CACHE_S.

Only a `host` of names or addresses is handled: a socket folder (a path), or a `hostaddr`
already given, is left to libpq as it is.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from collections.abc import MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import psycopg2

from flowlens_ingest.store.deadline import remaining

# A lookup is given at most this long, or what is left of the caller's deadline if less.
RESOLVE_S = 3.0
# An answer is kept this long: the hang probe connects every second, and pooled sessions renew.
CACHE_S = 30.0
# Lookups a process runs at once; a resolver that hangs holds at most these threads.
WORKERS = 2

_lock = threading.Lock()
# This process's lookup threads, made at its first lookup: gunicorn's master looks names up at
# start, and its threads do not exist in the workers it forks (after_in_child forgets them).
_lookups: ThreadPoolExecutor | None = None
# (name, port) -> (until, addresses): a handful of entries, one per configured host.
_cache: dict[tuple[str, str], tuple[float, list[str]]] = {}


def _forget_in_child() -> None:
    global _lock, _lookups
    _lock = threading.Lock()
    _lookups = None


os.register_at_fork(after_in_child=_forget_in_child)


def _pool() -> ThreadPoolExecutor:
    global _lookups
    with _lock:
        if _lookups is None:
            _lookups = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="flowlens-resolve")
        return _lookups


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _addresses(name: str, port: str) -> list[str]:
    """Every address of `name`, in the resolver's order (what libpq would try), without repeats."""
    found = socket.getaddrinfo(name, port or None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(entry[4][0]) for entry in found))


def _lookup(name: str, port: str) -> list[str]:
    """The addresses of `name`, from the cache or a lookup within the deadline; OperationalError if none in time."""
    key = (name, port)
    with _lock:
        kept = _cache.get(key)
    if kept is not None and kept[0] > time.monotonic():
        return kept[1]
    left = remaining()
    wait = RESOLVE_S if left is None else max(0.0, min(RESOLVE_S, left))
    future: Future[list[str]] = _pool().submit(_addresses, name, port)
    try:
        addresses = future.result(timeout=wait)
    except FutureTimeout:
        future.cancel()  # not started yet (the workers are busy with a resolver that hangs): dropped
        raise psycopg2.OperationalError(f'could not resolve host name "{name}" within {wait:g} s') from None
    except OSError as exc:
        raise psycopg2.OperationalError(f'could not resolve host name "{name}": {exc}') from None
    with _lock:
        _cache[key] = (time.monotonic() + CACHE_S, addresses)
    return addresses


def with_addresses(params: MutableMapping[str, Any]) -> None:
    """Add `hostaddr` to psycopg2.connect keyword arguments whose `host` names hosts (in place)."""
    host = params.get("host")
    if not isinstance(host, str) or not host or "hostaddr" in params:
        return
    hosts = host.split(",")
    if any(not name or name.startswith("/") for name in hosts) or all(_is_address(name) for name in hosts):
        return
    port = params.get("port")
    ports = str(port).split(",") if port not in (None, "") else [""]
    if len(ports) == 1:
        ports = ports * len(hosts)
    if len(ports) != len(hosts):
        return  # libpq says what is wrong with the list
    names: list[str] = []
    addresses: list[str] = []
    for_ports: list[str] = []
    for name, each_port in zip(hosts, ports, strict=True):
        for address in [name] if _is_address(name) else _lookup(name, each_port):
            names.append(name)
            addresses.append(address)
            for_ports.append(each_port)
    params["host"] = ",".join(names)
    params["hostaddr"] = ",".join(addresses)
    if port not in (None, ""):
        params["port"] = ",".join(for_ports)
