"""Large and chunked bodies under real gunicorn: bounded worker memory, 413 for what runs past the limit."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from flowlens_ingest.store.plan import decode_body
from flowlens_ingest.store.schema import webhook_deliveries

from .helpers import github_headers, load_payload, rows, wait_for
from .serving import Service, metric, running, workers

OPENED = load_payload("pull_request/opened.payload.json")
MIB = 1024 * 1024
# A worker's resident memory after thousands of deliveries is 56-70 MB (docs/benchmark.md,
# Performance); holding a 24 MiB body (and Werkzeug's copy of it) four threads at a
# time took it past 200 MB.
RSS_BOUND_MB = 150


def chunked(body: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    """`body` in pieces: requests sends an iterator with Transfer-Encoding: chunked."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


def signature_failures(service: Service) -> float:
    """flowlens_signature_failures_total over every reason."""
    reasons = ("missing", "unsupported_algorithm", "mismatch")
    return sum(metric(service, "flowlens_signature_failures_total", reason=r) or 0 for r in reasons)


@pytest.mark.slow
def test_a_burst_of_unsigned_24_mib_bodies_leaves_worker_memory_bounded(service, db):
    # 20 bodies just under GitHub's cap, with a signature that does not match: each is
    # read whole (the signature covers every byte), four at a time, over both workers.
    body = b'{"zen": "' + b"x" * (24 * MIB - 11) + b'"}'
    headers = github_headers(body, "ping")
    headers["X-Hub-Signature-256"] = "sha256=" + "0" * 64

    before_mb = [p.memory_info().rss / MIB for p in workers(service)]

    def post(_n: int) -> int:
        return requests.post(service.url + "/webhook", data=body, headers=headers, timeout=60).status_code

    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(post, range(20)))
    assert statuses == [401] * 20
    assert signature_failures(service) == 20

    rss_mb = [p.memory_info().rss / MIB for p in workers(service)]
    print(f"\nworker RSS {' '.join(f'{r:.0f}' for r in before_mb)} MB, after 20 unsigned 24 MiB bodies:", end=" ")
    print(" ".join(f"{r:.0f}" for r in rss_mb), "MB")
    assert len(rss_mb) == 2 and max(rss_mb) < RSS_BOUND_MB
    assert rows(db, webhook_deliveries) == []


@pytest.mark.slow
def test_chunked_and_cut_short_bodies_over_real_http(db, database_url, tmp_path):
    body = json.dumps(OPENED).encode()
    limit = len(body)
    with running(Service(database_url, tmp_path, env={"FLOWLENS_MAX_BODY_BYTES": str(limit)})) as service:
        # Exactly the limit, chunked: applied from its exact bytes.
        exact = requests.post(
            service.url + "/webhook", data=chunked(body), headers=github_headers(body, "pull_request"), timeout=10
        )
        assert (exact.status_code, exact.json()["outcome"]) == (200, "applied")

        # One byte over, signed and chunked: 413, and not a signature failure.
        before = signature_failures(service)
        over = body[:-1] + b" }"
        answer = requests.post(
            service.url + "/webhook", data=chunked(over), headers=github_headers(over, "pull_request"), timeout=10
        )
        assert answer.status_code == 413 and "error" in answer.json()
        assert signature_failures(service) == before
        assert len(rows(db, webhook_deliveries)) == 1

        # Signed, its Content-Length announced, and the connection ended ten bytes short: a 400,
        # neither a signature failure nor a delivery applied from what arrived.
        headers = github_headers(body, "pull_request") | {"Content-Length": str(len(body)), "Connection": "close"}
        head = "POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        with socket.create_connection(("127.0.0.1", service.port), timeout=10) as conn:
            conn.sendall(head.encode() + b"\r\n" + body[:-10])
            conn.shutdown(socket.SHUT_WR)
            reply = b"".join(iter(lambda: conn.recv(65536), b""))
        assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
        assert b"Content-Length" in reply
        assert signature_failures(service) == before
        assert len(rows(db, webhook_deliveries)) == 1


def large_push(commits: int, files: int) -> bytes:
    """A real push payload with `commits` commits each modifying `files` files (GitHub lists at most 2,048 commits)."""
    payload = load_payload("push/with-new-branch.payload.json")
    template = payload["commits"][0]
    payload["commits"] = [
        dict(template, id=f"{n:040x}", modified=[f"src/module_{n % 97:02d}/component_{k:05d}.py" for k in range(files)])
        for n in range(commits)
    ]
    return json.dumps(payload).encode()


def journaled(db) -> dict[str, dict]:
    """The journal by delivery id: outcome, error, the exact bytes kept."""
    found = rows(db, webhook_deliveries, "delivery_id", "outcome", "error", "body", "body_encoding")
    return {row["delivery_id"]: row for row in found}


@pytest.mark.slow
def test_a_body_of_millions_of_empty_lists_is_journaled_failed_not_parsed(service, db):
    # 8.6 million `[]` (26 MB of text, under GitHub's 25 MiB body cap) once cost a worker
    # 1.4 GB to parse. Signed, so it is kept: failed, with its exact bytes, replayable.
    body = b'{"zen": "lists", "lists": [' + b"[]," * 8_599_999 + b"[]]}"
    assert len(body) < 25 * MIB
    answer = requests.post(
        service.url + "/webhook", data=body, headers=github_headers(body, "push", delivery="lists"), timeout=60
    )
    assert (answer.status_code, answer.json()["outcome"]) == (202, "failed")
    entry = journaled(db)["lists"]
    assert entry["outcome"] == "failed" and "more than the 2,000,000" in entry["error"]
    assert decode_body(entry["body"], entry["body_encoding"]) == body
    # Not built: the worker holds what a few copies of the bytes cost, not gigabytes.
    rss_mb = [p.memory_info().rss / MIB for p in workers(service)]
    print(f"\nworker RSS after the 8.6-million-[] body: {' '.join(f'{r:.0f}' for r in rss_mb)} MB")
    assert max(rss_mb) < 400


@pytest.mark.slow
def test_large_deliveries_take_turns_and_a_heavy_worker_is_recycled_without_losing_one(db, database_url, tmp_path):
    # One worker, recycled after every large delivery (FLOWLENS_RECYCLE_ABOVE_MB=1): each
    # large push is answered 2xx (applied in its turn, or spooled raw when its turn did
    # not come in time) and journaled once; small deliveries in between are never held.
    env = {"FLOWLENS_RECYCLE_ABOVE_MB": "1"}
    large = large_push(400, 200)
    assert len(large) > 2 * MIB
    small = json.dumps(load_payload("ping/payload.json")).encode()
    sent = [(f"large-{n}", large, "push") for n in range(4)] + [(f"small-{n}", small, "ping") for n in range(8)]
    with running(Service(database_url, tmp_path, workers=1, env=env)) as service:
        (first,) = workers(service)

        def post(item: tuple[str, bytes, str]) -> tuple[str, int, str]:
            delivery, body, event = item
            headers = github_headers(body, event, delivery=delivery)
            answer = requests.post(service.url + "/webhook", data=body, headers=headers, timeout=60)
            return delivery, answer.status_code, answer.json()["outcome"]

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(post, sent))
        for delivery, status, outcome in answers:
            expected = ("applied", "spooled") if delivery.startswith("large") else ("ignored",)
            assert status in (200, 202) and outcome in expected, (delivery, status, outcome)
        # Spooled ones are applied by the drainer, in a turn of their own.
        wait_for(lambda: len(journaled(db)) == len(sent), "every delivery in the journal")
        entries = journaled(db)
        assert {entries[d]["outcome"] for d, _, _ in sent} <= {"applied", "ignored"}
        wait_for(lambda: first.pid not in {w.pid for w in workers(service)}, "the heavy worker to be recycled")
        assert "worker recycled after a large delivery" in service.logs()
        # The replacement took the recycled worker's metric files and counts on from them.
        folder = tmp_path / "metrics" / str(service.port)
        assert sorted(p.name for p in folder.glob("counter_*.db")) == ["counter_worker0.db"]
        answered = sum(
            metric(service, "flowlens_deliveries_total", event=e, outcome=o) or 0
            for e, o in (("push", "applied"), ("push", "spooled"), ("ping", "ignored"))
        )
        assert answered == len(sent)
        assert service.stop() == 0
