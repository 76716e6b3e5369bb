"""The production front: the nginx configuration `flowlens-ingest nginx-conf` prints.

gunicorn's threads must never wait on a slow client: nginx reads each request whole
(headers within 5 s, each read of the body within 5 s, at most the body limit) and only
then hands it to gunicorn over a kept-alive local connection. See docs/deploying.md,
"The nginx front".
"""

from __future__ import annotations

import re

MIB = 1024 * 1024
# The upstream's name in nginx's http {} (one name per configuration).
UPSTREAM_NAME = "flowlens_ingest"
# gunicorn_conf.py closes an idle connection after 5 s (`keepalive`); nginx drops its idle
# ones sooner, so it never sends a delivery on a connection gunicorn is closing.
UPSTREAM_IDLE_S = 4
# What nginx itself waits for: a client's headers, each read of its body, each write of
# the answer. GitHub sends a delivery in well under a second.
CLIENT_TIMEOUT_S = 5
# GitHub gives up after 10 s; an answer later than that is useless, and gunicorn's own
# worker timeout (10 s) has ended the request by then anyway.
UPSTREAM_READ_TIMEOUT_S = 15
# Bodies up to this size stay in nginx's memory; larger ones go to its client_body_temp_path.
BODY_BUFFER = "1m"
ROUTES = ("/webhook", "/healthz", "/readyz")

_ADDRESS = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(?P<port>\d{1,5})")


class AddressError(ValueError):
    """Not a HOST:PORT nginx can listen on or connect to."""


def address(text: str) -> str:
    """Check a `HOST:PORT` (IPv6 as `[::1]:8000`) and return it as given."""
    match = _ADDRESS.fullmatch(text.strip())
    if not match or not 0 < int(match["port"]) < 65536:
        raise AddressError(f"use HOST:PORT, like 127.0.0.1:8000 or [::1]:8000, got {text!r}")
    return text.strip()


def nginx_size(size: int) -> str:
    """A byte count of at least 1 the way nginx writes sizes (`25m`, `512k`, or plain bytes)."""
    # nginx reads a client_max_body_size of 0 as "no limit": never printed. Settings keeps
    # FLOWLENS_MAX_BODY_BYTES at 1 KiB or more; this guards every other caller.
    if size < 1:
        raise ValueError(f"the body limit must be at least 1 byte, got {size} (nginx reads 0 as unlimited)")
    if size % MIB == 0:
        return f"{size // MIB}m"
    if size % 1024 == 0:
        return f"{size // 1024}k"
    return str(size)


def nginx_conf(*, listen: str, upstream: str, max_body_bytes: int) -> str:
    """The `upstream` and `server` blocks for nginx's `http {}` context."""
    listen, upstream = address(listen), address(upstream)
    routes = "\n".join(f"    location = {route} {{ proxy_pass http://{UPSTREAM_NAME}; }}" for route in ROUTES)
    return f"""\
# FlowLens Ingest behind nginx: include inside http {{}} (e.g. /etc/nginx/conf.d/flowlens.conf).
# `flowlens-ingest nginx-conf --listen {listen} --upstream {upstream}` printed it.
upstream {UPSTREAM_NAME} {{
    server {upstream};
    # Connections to gunicorn are kept open between requests (idle ones, per nginx worker).
    keepalive 16;
    # Below gunicorn's keepalive (5 s): nginx never reuses a connection gunicorn is closing.
    keepalive_timeout {UPSTREAM_IDLE_S}s;
}}

server {{
    listen {listen};
    server_name _;
    server_tokens off;

    # Slow clients wait here, never in a gunicorn thread: the whole header within
    # {CLIENT_TIMEOUT_S} s, then each read of the body within {CLIENT_TIMEOUT_S} s, else the connection is closed.
    client_header_timeout {CLIENT_TIMEOUT_S}s;
    client_body_timeout {CLIENT_TIMEOUT_S}s;
    send_timeout {CLIENT_TIMEOUT_S}s;
    keepalive_timeout 15s;
    # A timed-out connection is reset, so its memory is freed at once.
    reset_timedout_connection on;
    # FLOWLENS_MAX_BODY_BYTES (GitHub's 25 MiB cap by default): larger bodies, announced
    # or chunked, get 413 here and never reach gunicorn.
    client_max_body_size {nginx_size(max_body_bytes)};
    client_body_buffer_size {BODY_BUFFER};

    # The whole body is read before gunicorn is called (a chunked one is passed on with
    # its Content-Length).
    proxy_request_buffering on;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $host;
    proxy_set_header X-Real-IP $remote_addr;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_connect_timeout 2s;
    proxy_send_timeout 10s;
    proxy_read_timeout {UPSTREAM_READ_TIMEOUT_S}s;
    # A delivery is sent again only when a kept-alive connection failed before any answer
    # (never after a timeout): deliveries are idempotent (the journal answers `duplicate`).
    proxy_next_upstream error non_idempotent;
    proxy_next_upstream_tries 2;

{routes}
    # Prometheus scrapes from this host only.
    location = /metrics {{
        allow 127.0.0.1;
        allow ::1;
        deny all;
        proxy_pass http://{UPSTREAM_NAME};
    }}
    location / {{ return 404; }}
}}
"""
