"""A database that hangs (a partition: connections accepted, every byte held) costs no answer and no delivery.

The service reaches the test database through a TCP proxy on loopback
(bench/proxy.py); the proxy freezes under traffic, then heals. Once the database
is known hung (a probe started by a slow wait got no answer, or a call missed its
own deadline) deliveries go to the spool without waiting on it, until one probe
finds it answering (store/hang.py).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
import requests
import sqlalchemy as sa
from flask.testing import FlaskClient

from bench import openloop
from bench.proxy import FreezingProxy
from flowlens_ingest.store.hang import Hang
from flowlens_ingest.store.schema import pull_requests, repositories, webhook_deliveries
from flowlens_ingest.web.app import create_app
from flowlens_ingest.web.held import WIDE
from flowlens_ingest.web.services import services

from .helpers import github_headers, load_payload, make_settings, opened_pr, rows, wait_for
from .serving import Service

pytestmark = pytest.mark.slow

OPENED = load_payload("pull_request/opened.payload.json")
# GitHub marks a delivery failed, and never retries it, when no answer came within 10 s.
GITHUB_WAITS_S = 10.0


def pr(number: int) -> dict:
    return opened_pr(number)


def signed(number: int, delivery: str) -> openloop.Delivery:
    """The `opened` delivery of PR `number`, signed, ready for the open-loop sender."""
    body = json.dumps(pr(number)).encode()
    return openloop.Delivery(delivery, body, github_headers(body, "pull_request", delivery=delivery))


def post(client: FlaskClient, number: int, delivery: str) -> tuple[int, Any]:
    """POST PR `number`'s `opened` delivery through the app; its status and outcome."""
    body = json.dumps(pr(number)).encode()
    response = client.post("/webhook", data=body, headers=github_headers(body, "pull_request", delivery=delivery))
    return response.status_code, response.get_json()["outcome"]


def probes() -> list[threading.Thread]:
    """This process's live database probe threads."""
    return [t for t in threading.enumerate() if t.name == "flowlens-database-probe"]


def journaled_once_as_applied(db: sa.Engine, expected: set[str]) -> None:
    """Every delivery of `expected` is in the journal, applied at its first attempt, its PR at version 1."""
    entries = [
        (e["outcome"], e["attempts"])
        for e in rows(db, webhook_deliveries, "delivery_id", "outcome", "attempts")
        if e["delivery_id"] in expected
    ]
    assert entries == [("applied", 1)] * len(expected)
    versions = {p["version"] for p in rows(db, pull_requests, "pr_number", "version")}
    assert versions == {1}


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


def test_a_database_known_hung_is_not_waited_on_until_one_probe_finds_it_answering(db, proxied, tmp_path):
    proxy, url = proxied
    # A short statement timeout: the first call misses its deadline (timeout + 1 s) sooner.
    app = create_app(make_settings(url, tmp_path, statement_timeout_ms=500))
    client = app.test_client()
    database = services(app).database
    checkouts: list[object] = []
    sa.event.listen(database.engine, "checkout", lambda *_: checkouts.append(None))
    # Probe threads of other tests' databases in this process (ending, or probing a database
    # those tests left hung) are not this database's.
    others = set(probes())
    try:
        assert post(client, 1, "healthy-1") == (200, "applied")
        proxy.freeze()
        # The first delivery waits out its deadline, then the database is known hung.
        assert post(client, 2, "first-2") == (202, "spooled")
        assert database.hung
        checkouts.clear()
        # Known hung: deliveries go to the spool without a connection, /readyz says why at once,
        # and one thread probes, however many requests come.
        spooled = [post(client, n, f"known-{n}") for n in range(3, 23)]
        assert spooled == [(202, "spooled")] * 20
        ready = client.get("/readyz")
        assert (ready.status_code, ready.get_json()["database"]) == (503, "hung")
        assert checkouts == []
        assert len(set(probes()) - others) == 1

        proxy.heal()
        wait_for(lambda: not database.hung, what="the probe to find the database answering")
        assert client.get("/readyz").status_code == 200
        assert post(client, 23, "back-23") == (200, "applied")
        wait_for(lambda: not set(probes()) - others, what="the probe thread to end")
        assert len(list((tmp_path / "spool").glob("*.delivery"))) == 21
    finally:
        database.dispose()


# The open-loop load: GitHub keeps sending, whatever the answers. 40 deliveries/s, healthy for 3 s,
# then a 15 s hang, then 5 s after the heal.
RATE = 40
HEALTHY_S, HUNG_S, HEALED_S = 3, 15, 5


def test_steady_traffic_through_a_hang_is_answered_in_time_and_applied_once_after(db, proxied, tmp_path):
    proxy, url = proxied
    count = RATE * (HEALTHY_S + HUNG_S + HEALED_S)
    deliveries = [signed(1000 + n, f"steady-{n}") for n in range(count)]
    schedule = openloop.Schedule(
        deliveries, RATE, before={RATE * HEALTHY_S: proxy.freeze, RATE * (HEALTHY_S + HUNG_S): proxy.heal}
    )
    service = Service(url, tmp_path, workers=2)
    try:
        service.wait_ready()
        answers = openloop.run("127.0.0.1", service.port, schedule, timeout_s=30)

        # The contract's promise, measured from when each delivery was due: a correctness bound.
        late = [a for a in answers if a.took_s is None or a.took_s >= GITHUB_WAITS_S]
        assert late == [], f"{len(late)} answered too late or not at all, e.g. {late[:5]}"
        assert {(a.status, a.outcome) for a in answers} <= {(200, "applied"), (202, "spooled")}
        spooled = [a for a in answers if a.outcome == "spooled"]
        assert spooled, "the hang spooled nothing: it did not happen"

        # After the heal deliveries are applied again: once each worker's probe found the database.
        expected = {d.delivery_id for d in deliveries}
        extra = iter(range(count, count + 1000))

        def applied_directly() -> bool:
            n = next(extra)
            response = service.post(pr(1000 + n), "pull_request", delivery=f"steady-{n}")
            expected.add(f"steady-{n}")
            return response.json()["outcome"] == "applied"

        wait_for(applied_directly, what="a delivery applied again after the heal")

        def journaled() -> set[str]:
            return {e["delivery_id"] for e in rows(db, webhook_deliveries, "delivery_id")} & expected

        wait_for(lambda: journaled() == expected, what="every delivery journaled after the heal", timeout=180)
        wait_for(lambda: not list((tmp_path / "spool").glob("*.delivery")), what="the spool to drain")
        journaled_once_as_applied(db, expected)
        numbers = sorted(p["pr_number"] for p in rows(db, pull_requests, "pr_number"))
        assert numbers == sorted(1000 + int(d.split("-")[1]) for d in expected)
        print(f"\nsteady traffic through a hang: {openloop.summary(answers)}, {len(spooled)} spooled")
    finally:
        service.stop()


def test_a_slow_statement_on_a_database_that_answers_is_no_hang(db, database_url, tmp_path):
    app = create_app(make_settings(database_url, tmp_path))
    client = app.test_client()
    database = services(app).database
    try:
        assert post(client, 1, "first-1") == (200, "applied")
        answers: list[tuple[int, Any]] = []
        with db.connect() as holder:
            # The repository row every delivery of it locks: the next one waits on the lock, long
            # past the 1 s that starts a probe, and the probe finds the database answering.
            holder.execute(
                sa.text("SELECT 1 FROM repositories WHERE github_id = :id FOR UPDATE"),
                {"id": OPENED["repository"]["id"]},
            )
            waiting = threading.Thread(target=lambda: answers.append(post(client, 2, "waits-2")))
            waiting.start()
            wait_for(
                lambda: holder.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND datname = current_database() AND clock_timestamp() - query_start > interval '2.5 seconds'"
                    )
                ).scalar_one(),
                what="the delivery to wait on the lock past the slow-wait probe",
            )
            assert not database.hung
            holder.rollback()
        waiting.join(30)
        assert answers == [(200, "applied")]
        assert not database.hung
    finally:
        database.dispose()


def test_a_hang_found_as_a_refused_probe_ends_is_probed_until_the_database_answers():
    # The probe is refused (the server restarting) just as a call misses its own deadline: that
    # call starts no probe (one runs), so the running one must not end while the hang is known.
    answers = iter(["refused", "refused", "answer"])
    probes: list[str] = []

    def probe() -> None:
        outcome = next(answers, "answer")
        probes.append(outcome)
        if len(probes) == 1:
            hang.missed()  # the call's deadline, as this probe is being refused
        if outcome == "refused":
            raise psycopg2.OperationalError("connection refused")

    hang = Hang(probe, interval=0.05)
    hang.slow()
    wait_for(lambda: not hang.known and probes[-1:] == ["answer"], "the probe to find the database answering")
    assert probes == ["refused", "refused", "answer"]


def test_a_lock_on_the_whole_table_holds_every_repository_once_several_are_cancelled(db, database_url, tmp_path):
    # A lock on all of `repositories` (an ALTER TABLE queued behind a long transaction): every
    # repository's delivery would wait out its timeout, a thread each, and answers queue past 10 s.
    # Once WIDE repositories are held at once, the others are spooled without a connection too.
    app = create_app(make_settings(database_url, tmp_path, statement_timeout_ms=300))
    client = app.test_client()
    database = services(app).database

    def post_to(repository: int, delivery: str) -> tuple[int, str]:
        payload = pr(repository)
        payload["repository"] = {**payload["repository"], "id": 7_000 + repository, "full_name": f"octo/r{repository}"}
        body = json.dumps(payload).encode()
        response = client.post("/webhook", data=body, headers=github_headers(body, "pull_request", delivery=delivery))
        return response.status_code, response.get_json()["outcome"]

    assert post_to(9, "before") == (200, "applied")
    holder = db.connect()
    locked = holder.begin()
    holder.execute(sa.text("LOCK TABLE repositories IN ACCESS EXCLUSIVE MODE"))
    checkouts: list[object] = []
    sa.event.listen(database.engine, "checkout", lambda *_: checkouts.append(None))
    try:
        assert [post_to(n, f"cancelled-{n}") for n in range(1, WIDE + 1)] == [(202, "spooled")] * WIDE
        checkouts.clear()
        assert post_to(9, "after") == (202, "spooled")
        assert checkouts == []
    finally:
        locked.rollback()
        holder.close()
        database.dispose()


def test_a_repository_whose_delivery_the_database_cancelled_is_spooled_at_once_for_a_while(db, database_url, tmp_path):
    # A session holds the repository's row: its next delivery waits out the lock timeout and is
    # cancelled. The ones after it are spooled without a connection, not each a thread held for the
    # same timeout while requests queue; other repositories are applied as ever.
    app = create_app(make_settings(database_url, tmp_path, statement_timeout_ms=300))
    client = app.test_client()
    database = services(app).database
    assert post(client, 1, "before") == (200, "applied")
    repository_id = pr(1)["repository"]["id"]
    holder = db.connect()
    held = holder.begin()
    holder.execute(sa.select(repositories.c.id).where(repositories.c.github_id == repository_id).with_for_update())
    checkouts: list[object] = []
    sa.event.listen(database.engine, "checkout", lambda *_: checkouts.append(None))
    try:
        assert post(client, 2, "cancelled") == (202, "spooled")
        checkouts.clear()
        assert [post(client, n, f"held-{n}") for n in (3, 4)] == [(202, "spooled")] * 2
        assert checkouts == []
        other = pr(5)
        other["repository"] = {**other["repository"], "id": repository_id + 1, "full_name": "octo/other"}
        body = json.dumps(other).encode()
        response = client.post("/webhook", data=body, headers=github_headers(body, "pull_request", delivery="other"))
        assert (response.status_code, response.get_json()["outcome"]) == (200, "applied")
    finally:
        held.rollback()
        holder.close()
        database.dispose()
