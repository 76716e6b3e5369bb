"""The production front: `nginx-conf`'s output, and a real nginx running it before a real service."""

from __future__ import annotations

import itertools
import json
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pytest
import requests

from flowlens_ingest.cli.nginx import nginx_conf, nginx_size
from flowlens_ingest.store.schema import webhook_deliveries

from .helpers import free_port, github_headers, load_payload, rows
from .nginx import NGINX, Nginx, check, nginx_conf_output

needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx; .ci/run does)")

OPENED = load_payload("pull_request/opened.payload.json")
LIMIT = 25 * 1024 * 1024
# nginx-conf's client_header_timeout and client_body_timeout.
CLIENT_TIMEOUT_S = 5


def test_nginx_conf_prints_the_upstream_and_server_blocks():
    text = nginx_conf_output("0.0.0.0:8080", "127.0.0.1:9000")
    assert "upstream flowlens_ingest {\n    server 127.0.0.1:9000;" in text
    for directive in (
        "listen 0.0.0.0:8080;",
        "keepalive 16;",
        f"client_header_timeout {CLIENT_TIMEOUT_S}s;",
        f"client_body_timeout {CLIENT_TIMEOUT_S}s;",
        "client_max_body_size 25m;",
        "proxy_request_buffering on;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Real-IP $remote_addr;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        "proxy_read_timeout 15s;",
    ):
        assert f"    {directive}\n" in text, directive
    proxied = [line.split()[2] for line in text.splitlines() if line.strip().startswith("location = ")]
    assert proxied == ["/webhook", "/healthz", "/readyz", "/metrics"]


def test_the_body_limit_follows_flowlens_max_body_bytes():
    assert "client_max_body_size 1m;" in nginx_conf_output(
        "0.0.0.0:80", "127.0.0.1:8000", FLOWLENS_MAX_BODY_BYTES="1048576"
    )
    assert "client_max_body_size 1500;" in nginx_conf_output(
        "0.0.0.0:80", "127.0.0.1:8000", FLOWLENS_MAX_BODY_BYTES="1500"
    )


@pytest.mark.parametrize("size", ["0", "-1", "1023", str(LIMIT + 1)])
def test_nginx_conf_never_prints_a_body_limit_outside_the_checked_range(size):
    # client_max_body_size 0 is "unlimited" to nginx: refused with the setting, nothing printed.
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWLENS_", "GITHUB_", "DATABASE_"))}
    result = subprocess.run(
        [sys.executable, "-m", "flowlens_ingest.cli", "nginx-conf"],
        env={**environment, "FLOWLENS_MAX_BODY_BYTES": size},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("flowlens-ingest: FLOWLENS_MAX_BODY_BYTES must be a whole number from 1024 to ")


@pytest.mark.parametrize(("size", "written"), [(1, "1"), (1024, "1k"), (1536, "1536"), (LIMIT, "25m")])
def test_nginx_sizes_are_what_nginx_reads(size, written):
    assert nginx_size(size) == written


@pytest.mark.parametrize("size", [0, -1])
def test_a_body_limit_nginx_would_read_as_unlimited_is_never_written(size):
    with pytest.raises(ValueError, match="at least 1 byte"):
        nginx_conf(listen="0.0.0.0:80", upstream="127.0.0.1:8000", max_body_bytes=size)


@needs_nginx
def test_nginx_accepts_the_printed_configuration(tmp_path):
    result = check(nginx_conf_output(f"127.0.0.1:{free_port()}", "[::1]:8000"), tmp_path / "nginx")
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def _private_nginx_steps() -> str:
    """The shell block of docs/deploying.md that sets up an nginx of one's own."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "deploying.md").read_text()
    after = doc.split("<!-- private-nginx:", 1)[1]
    return after.split("```sh\n", 1)[1].split("\n```", 1)[0]


@needs_nginx
def test_the_documented_private_nginx_runs_as_written(tmp_path):
    """docs/deploying.md's nginx of one's own: its block, run by bash, gives a running front on another port."""
    port = free_port()
    steps = _private_nginx_steps().replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    front = tmp_path / "flowlens-nginx"
    path = os.pathsep.join([str(Path(sys.executable).parent), str(Path(str(NGINX)).parent), os.environ["PATH"]])
    env = {**os.environ, "HOME": str(tmp_path), "PATH": path}
    ran = subprocess.run(["bash", "-euc", steps], env=env, capture_output=True, text=True, timeout=60)
    try:
        assert ran.returncode == 0, ran.stdout + ran.stderr
        # Its own answer for a path the service does not serve; the upstream is not even running.
        answer = requests.get(f"http://127.0.0.1:{port}/admin", timeout=10)
        assert answer.status_code == 404
        assert (front / "nginx.pid").is_file()
    finally:
        conf = ["-p", str(front), "-c", str(front / "nginx.conf"), "-e", str(front / "logs" / "error.log")]
        subprocess.run([str(NGINX), *conf, "-s", "quit"], capture_output=True, timeout=30, check=False)
    deadline = time.monotonic() + 30
    while (front / "nginx.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (front / "nginx.pid").exists(), "nginx -s quit stops it"


@pytest.fixture
def front(service, tmp_path) -> Iterator[Nginx]:
    """A real nginx, configured by `nginx-conf`, before the real service (gunicorn, 2 workers)."""
    port = free_port()
    blocks = nginx_conf_output(f"127.0.0.1:{port}", f"127.0.0.1:{service.port}")
    nginx = Nginx(blocks, tmp_path / "nginx", port)
    try:
        nginx.wait_ready()
        yield nginx
    finally:
        nginx.stop()


@dataclass
class SlowConnection:
    """A connection that never finishes its request."""

    sock: socket.socket
    pending: bytes  # what it still trickles, one byte a second (empty: it just waits)
    opened: float = field(default_factory=time.monotonic)
    closed_at: float | None = None  # when nginx closed it


class SlowClients:
    """Slowloris connections (headers one byte a second) and bodies shorter than their Content-Length."""

    def __init__(self, port: int, slowloris: int, short_bodies: int) -> None:
        self.connections: list[SlowConnection] = []
        self.selector = selectors.DefaultSelector()
        for n in range(slowloris + short_bodies):
            sock = socket.create_connection(("127.0.0.1", port))
            if n < slowloris:
                # Headers that never end: no blank line will ever come.
                head = b"POST /webhook HTTP/1.1\r\nHost: flowlens\r\nX-Slow: "
                sock.sendall(head)
                connection = SlowConnection(sock, b"a" * 3600)
            else:
                head = b"POST /webhook HTTP/1.1\r\nHost: flowlens\r\nContent-Type: application/json\r\n"
                sock.sendall(head + b"Content-Length: 10000\r\n\r\n" + b'{"zen": "x')  # 10 bytes of 10000
                connection = SlowConnection(sock, b"")
            self.connections.append(connection)
            self.selector.register(sock, selectors.EVENT_READ, connection)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SlowClients:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join()
        for connection in self.connections:
            connection.sock.close()
        self.selector.close()

    @property
    def open(self) -> int:
        """Connections nginx has not closed yet."""
        return sum(c.closed_at is None for c in self.connections)

    def _run(self) -> None:
        next_byte = time.monotonic() + 1
        while not self.stop.is_set() and self.open:
            for key, _events in self.selector.select(timeout=max(0.0, next_byte - time.monotonic())):
                self._closed_by_nginx(key.data)
            if time.monotonic() >= next_byte:
                next_byte += 1
                for connection in self.connections:
                    if connection.closed_at is None and connection.pending:
                        try:
                            connection.sock.send(connection.pending[:1])
                        except OSError:
                            self._closed_by_nginx(connection)
                            continue
                        connection.pending = connection.pending[1:]

    def _closed_by_nginx(self, connection: SlowConnection) -> None:
        """nginx answered or closed: read to the end (or a reset) and record when."""
        try:
            while connection.sock.recv(65536):
                pass
        except OSError:
            pass
        if connection.closed_at is None:
            connection.closed_at = time.monotonic()
            self.selector.unregister(connection.sock)


@dataclass
class Answer:
    status: int
    seconds: float
    outcome: str | None


def genuine_deliveries(url: str, stop: threading.Event, numbers: Iterator[int], answers: list[Answer]) -> None:
    """Signed deliveries, one after another, each on a new connection (as GitHub sends them)."""
    while not stop.is_set():
        delivery = str(uuid.uuid4())
        number = next(numbers)  # a pull request of its own: each delivery is `applied`
        payload = dict(OPENED, number=number, pull_request=dict(OPENED["pull_request"], number=number))
        body = json.dumps(payload).encode()
        started = time.monotonic()
        try:
            response = requests.post(
                url + "/webhook", data=body, headers=github_headers(body, "pull_request", delivery=delivery), timeout=10
            )
            answer = Answer(response.status_code, time.monotonic() - started, response.json().get("outcome"))
        except requests.RequestException:
            answer = Answer(0, time.monotonic() - started, None)
        answers.append(answer)


@pytest.mark.slow
@needs_nginx
def test_slow_clients_never_delay_genuine_deliveries(front, db):
    answers: list[Answer] = []
    stop = threading.Event()
    # 200 slowloris connections and 50 bodies that stop at 10 of their 10,000 bytes: far
    # more than gunicorn's 2 x 4 threads, which would all be stuck without nginx.
    with SlowClients(front.port, slowloris=200, short_bodies=50) as slow:
        numbers = itertools.count(1000)
        senders = [
            threading.Thread(target=genuine_deliveries, args=(front.url, stop, numbers, answers)) for _ in range(2)
        ]
        for sender in senders:
            sender.start()
        try:
            # nginx closes every slow connection after its timeouts; deliveries flow meanwhile.
            deadline = time.monotonic() + 4 * CLIENT_TIMEOUT_S
            while slow.open and time.monotonic() < deadline:
                stop.wait(0.1)
            still_open = slow.open
        finally:
            stop.set()
            for sender in senders:
                sender.join()
        lifetimes = [c.closed_at - c.opened for c in slow.connections if c.closed_at is not None]

    assert still_open == 0, f"{still_open} slow connections still open after {4 * CLIENT_TIMEOUT_S} s"
    # Closed by nginx's timeouts: the whole header, or the next piece of the body, within 5 s.
    assert min(lifetimes) > CLIENT_TIMEOUT_S - 0.5 and max(lifetimes) < CLIENT_TIMEOUT_S + 2, (
        min(lifetimes),
        max(lifetimes),
    )
    # Each one ended as a 408 in nginx's log, none reached the service.
    assert front.statuses().count(408) == 250
    assert len(answers) >= 20
    assert [a for a in answers if a.status != 200 or a.outcome != "applied"] == []
    slowest = max(a.seconds for a in answers)
    assert slowest < 1.0, f"slowest genuine delivery took {slowest:.3f} s"
    assert len(rows(db, webhook_deliveries, "delivery_id")) == len(answers)
    print(f"\n{len(answers)} genuine deliveries during the slow connections, slowest {slowest * 1000:.0f} ms")


def raw_exchange(port: int, head: bytes, chunks: Iterable[bytes] = (), source: str = "127.0.0.1") -> bytes:
    """Send `head`, then `chunks` until nginx answers; return the answer's bytes (headers and body)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    with sock, selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        sock.sendall(head)
        for chunk in chunks:
            if selector.select(timeout=0):
                break  # nginx has answered: stop sending
            try:
                sock.sendall(chunk)
            except OSError:
                break
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
                if b"\r\n\r\n" in answer and b"</html>" in answer:
                    break
        except OSError:
            pass
        return answer


def over_limit_chunks(size: int = 64 * 1024) -> Iterator[bytes]:
    """Chunked transfer coding of a body that never ends before the limit is well passed."""
    sent = 0
    while sent < 2 * LIMIT:
        yield b"%x\r\n" % size + b"x" * size + b"\r\n"
        sent += size
    yield b"0\r\n\r\n"


@pytest.mark.slow
@needs_nginx
def test_bodies_over_25_mib_get_413_from_nginx_announced_or_chunked(front, db):
    headers = github_headers(b"{}", "ping")
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    start = f"POST /webhook HTTP/1.1\r\nHost: flowlens\r\n{lines}"

    announced = raw_exchange(front.port, f"{start}Content-Length: {LIMIT + 1}\r\n\r\n".encode())
    assert announced.startswith(b"HTTP/1.1 413 "), announced[:200]

    chunked = raw_exchange(front.port, f"{start}Transfer-Encoding: chunked\r\n\r\n".encode(), over_limit_chunks())
    assert chunked.startswith(b"HTTP/1.1 413 "), chunked[:200]
    # nginx's own answers: the service never saw either body.
    assert b"Server: nginx" in announced and b"Server: nginx" in chunked
    assert rows(db, webhook_deliveries) == []


@pytest.mark.slow
@needs_nginx
def test_only_the_services_routes_are_proxied_and_metrics_stay_local(front, db):
    body = json.dumps(OPENED).encode()
    headers = github_headers(body, "pull_request")
    # A chunked delivery: nginx reads it whole and hands it on with its length.
    applied = requests.post(front.url + "/webhook", data=iter([body[:100], body[100:]]), headers=headers, timeout=10)
    assert (applied.status_code, applied.json()["outcome"]) == (200, "applied")
    assert requests.get(front.url + "/healthz", timeout=10).status_code == 200
    assert requests.get(front.url + "/readyz", timeout=10).status_code == 200
    wrong_method = requests.get(front.url + "/webhook", timeout=10)
    assert wrong_method.status_code == 405 and "POST" in wrong_method.headers["Allow"]
    assert requests.get(front.url + "/", timeout=10).status_code == 404
    assert requests.get(front.url + "/admin", timeout=10).status_code == 404

    assert requests.get(front.url + "/metrics", timeout=10).status_code == 200
    # Another address (any 127.0.0.0/8 address reaches loopback) is refused.
    elsewhere = raw_exchange(front.port, b"GET /metrics HTTP/1.1\r\nHost: flowlens\r\n\r\n", source="127.0.0.2")
    assert elsewhere.startswith(b"HTTP/1.1 403 "), elsewhere[:200]


class DyingUpstream:
    """A stand-in for gunicorn that answers on kept-alive connections, but drops one request unanswered.

    That is what nginx meets when gunicorn closes an idle connection just as nginx reuses
    it, or a worker dies mid-request.
    """

    def __init__(self, drop: int) -> None:
        self.drop = drop  # the request number (from 1) that gets no answer
        self.requests: list[int] = []  # the connection number of each request received
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        for number in itertools.count(1):
            try:
                connection, _address = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection, number), daemon=True).start()

    def _serve(self, connection: socket.socket, number: int) -> None:
        with connection, connection.makefile("rb") as stream:
            while head := self._head(stream):
                length = next((int(h.split(b":")[1]) for h in head if h.lower().startswith(b"content-length:")), 0)
                stream.read(length)
                self.requests.append(number)
                if len(self.requests) == self.drop:
                    return  # closed without an answer
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok")

    @staticmethod
    def _head(stream: BinaryIO) -> list[bytes]:
        """A request's header lines; empty once nginx closed the connection."""
        lines = []
        while (line := stream.readline()) not in (b"\r\n", b""):
            lines.append(line)
        return lines if line else []

    def close(self) -> None:
        self.server.close()


@needs_nginx
def test_a_delivery_lost_on_a_kept_alive_connection_is_sent_once_more(tmp_path):
    upstream = DyingUpstream(drop=2)
    port = free_port()
    nginx = Nginx(nginx_conf_output(f"127.0.0.1:{port}", f"127.0.0.1:{upstream.port}"), tmp_path / "nginx", port)
    try:
        nginx.wait_ready()
        first = requests.post(nginx.url + "/webhook", data=b"{}", timeout=10)
        second = requests.post(nginx.url + "/webhook", data=b"{}", timeout=10)
    finally:
        nginx.stop()
        upstream.close()
    # The second went on the first's kept-alive connection, died there, and was sent
    # again on a new one: the sender sees 200, not 502 (the journal makes a repeat harmless).
    assert (first.status_code, second.status_code) == (200, 200)
    assert upstream.requests == [1, 1, 2]
