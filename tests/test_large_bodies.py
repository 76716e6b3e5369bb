"""Large and chunked bodies under real gunicorn: bounded worker memory, 413 for what runs past the limit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from flowlens_ingest.store.schema import webhook_deliveries

from .helpers import github_headers, load_payload, rows
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
def test_chunked_bodies_against_the_limit_over_real_http(db, database_url, tmp_path):
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
