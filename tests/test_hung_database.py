"""A database that hangs (a partition: connections accepted, every byte held) costs no answer and no delivery.

A real gunicorn reaches the test database through a TCP proxy on loopback; the
proxy freezes under traffic, then heals.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from flowlens_ingest.store.schema import pull_requests, webhook_deliveries

from .helpers import load_payload, rows, wait_for
from .proxy import FreezingProxy
from .serving import Service

pytestmark = pytest.mark.slow

OPENED = load_payload("pull_request/opened.payload.json")
# GitHub marks a delivery failed, and never retries it, when no answer came within 10 s.
GITHUB_WAITS_S = 10.0


def pr(number: int) -> dict:
    payload = copy.deepcopy(OPENED)
    payload["number"] = payload["pull_request"]["number"] = number
    return payload


@pytest.fixture
def proxied(database_url: str) -> Iterator[tuple[FreezingProxy, str]]:
    proxy, url = FreezingProxy.to(database_url)
    yield proxy, url
    proxy.close()


def test_a_hung_database_gets_every_delivery_answered_in_time_and_applied_once_after(db, proxied, tmp_path):
    proxy, url = proxied
    service = Service(url, tmp_path, workers=2)
    try:
        service.wait_ready()
        # Every worker has pooled connections before the freeze.
        for number in range(1, 9):
            assert service.post(pr(number), "pull_request", delivery=f"before-{number}").status_code == 200

        proxy.freeze()
        # More deliveries at once than the service has threads (2 workers x 4): the later
        # ones queue behind requests already waiting on the hung database.
        answers: dict[int, tuple[int | None, str | None, float]] = {}

        def send(number: int) -> None:
            started = time.monotonic()
            try:
                response = service.post(pr(number), "pull_request", delivery=f"hung-{number}")
                answer = (response.status_code, response.json().get("outcome"))
            except requests.RequestException:
                answer = (None, None)
            answers[number] = (*answer, time.monotonic() - started)

        senders = [threading.Thread(target=send, args=(n,)) for n in range(100, 121)]
        for sender in senders:
            sender.start()
        ready_started = time.monotonic()
        ready = requests.get(service.url + "/readyz", timeout=30).status_code
        ready_s = time.monotonic() - ready_started
        for sender in senders:
            sender.join(60)

        late = {n: a for n, a in answers.items() if a[0] is None or a[2] >= GITHUB_WAITS_S}
        assert late == {}, f"answered too late or not at all: {late}"
        assert {(status, outcome) for status, outcome, _ in answers.values()} == {(202, "spooled")}
        assert ready == 503 and ready_s < GITHUB_WAITS_S

        proxy.heal()
        expected = {f"hung-{n}" for n in range(100, 121)}

        def journaled() -> set[str]:
            return {e["delivery_id"] for e in rows(db, webhook_deliveries, "delivery_id")} & expected

        wait_for(lambda: journaled() == expected, what="every spooled delivery applied after the heal")
        wait_for(lambda: not list((tmp_path / "spool").glob("*.delivery")), what="the spool to drain")
        entries = [
            e
            for e in rows(db, webhook_deliveries, "delivery_id", "outcome", "attempts")
            if e["delivery_id"] in expected
        ]
        assert sorted((e["outcome"], e["attempts"]) for e in entries) == [("applied", 1)] * len(expected)
        held = [p for p in rows(db, pull_requests, "pr_number", "version") if p["pr_number"] >= 100]
        assert sorted(held, key=lambda p: p["pr_number"]) == [{"pr_number": n, "version": 1} for n in range(100, 121)]
        slowest = max(a[2] for a in answers.values())
        print(f"\nhung database: 21 deliveries answered 202 within {slowest:.1f} s, /readyz in {ready_s:.1f} s")
    finally:
        service.stop()
