"""Outages, end to end: a real gunicorn, a throwaway PostgreSQL stopped and started under traffic,
and a worker killed in the middle of a delivery.

The figures these tests measure (deliveries answered during the outage, their
latency, how long the drain took) are printed; run with `-s` to see them.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field

import psutil
import pytest
import requests
import sqlalchemy as sa

from flowlens_ingest.store.schema import pipeline_runs, pull_requests, webhook_deliveries, webhook_hooks

from .helpers import load_payload, opened_pr, rows, wait_for
from .serving import Service

pytestmark = pytest.mark.slow

OPENED = load_payload("pull_request/opened.payload.json")
CLOSED = load_payload("pull_request/closed.payload.json")


def pr_payload(number: int) -> dict:
    return opened_pr(number, f"outage test {number}")


@dataclass
class Answer:
    number: int
    phase: str
    status: int | None
    outcome: str | None
    seconds: float


@dataclass
class Traffic:
    """Senders posting one new PR each delivery, recording every answer with the phase it fell in."""

    service: Service
    senders: int = 2
    max_deliveries: int = 3000
    phase: str = "before"
    answers: list[Answer] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    _next: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _number(self) -> int | None:
        with self._lock:
            if self._next >= self.max_deliveries:
                return None
            self._next += 1
            return self._next

    def _send(self) -> None:
        while not self.stopping.is_set():
            number = self._number()
            if number is None:
                return
            phase, started = self.phase, time.monotonic()
            try:
                response = self.service.post(pr_payload(number), "pull_request", delivery=f"outage-{number}")
                status, outcome = (
                    response.status_code,
                    (response.json() if response.status_code < 500 else {}).get("outcome"),
                )
            except requests.RequestException:
                status, outcome = None, None
            with self._lock:
                self.answers.append(Answer(number, phase, status, outcome, time.monotonic() - started))
            time.sleep(0.01)

    def count(self, phase: str, outcome: str | None = None) -> int:
        with self._lock:
            return sum(1 for a in self.answers if a.phase == phase and (outcome is None or a.outcome == outcome))

    def __enter__(self) -> Traffic:
        self.threads = [threading.Thread(target=self._send, daemon=True) for _ in range(self.senders)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)


def delivered_rows(engine: sa.Engine) -> dict[str, list[dict]]:
    """What a pull_request delivery writes: its pull request, its pipeline row, its journal entry."""
    return {t.name: rows(engine, t) for t in (pull_requests, pipeline_runs, webhook_deliveries)}


def ready(service: Service) -> int:
    try:
        return requests.get(service.url + "/readyz", timeout=10).status_code
    except requests.RequestException:
        return 0


def test_database_outage_under_traffic_loses_nothing_and_applies_everything_once(throwaway, tmp_path):
    (tmp_path / "service").mkdir()
    service = Service(throwaway.url, tmp_path / "service", workers=2)
    engine = sa.create_engine(throwaway.url, poolclass=sa.pool.NullPool)
    spool_dir = tmp_path / "service" / "spool"
    try:
        service.wait_ready()
        wait_for(lambda: ready(service) == 200, what="/readyz 200")
        with Traffic(service) as traffic:
            wait_for(lambda: traffic.count("before", "applied") >= 30, what="traffic to flow")
            traffic.phase = "down"
            stopped_at = time.monotonic()
            throwaway.stop()
            wait_for(lambda: ready(service) == 503, what="/readyz 503 while the database is down")
            wait_for(
                lambda: traffic.count("down", "spooled") >= 100 and time.monotonic() - stopped_at > 5,
                what="deliveries spooled during the outage",
            )
            traffic.phase = "back"
            outage_s = time.monotonic() - stopped_at
            throwaway.start()
            started_at = time.monotonic()
            wait_for(lambda: not list(spool_dir.glob("*.delivery")), what="the spool to drain")
            drain_s = time.monotonic() - started_at
            wait_for(lambda: traffic.count("back", "applied") >= 30, what="traffic applied again")
        wait_for(lambda: ready(service) == 200, what="/readyz 200 once the database is back")
        wait_for(lambda: not list(spool_dir.glob("*.delivery")), what="the spool to drain")

        answers = traffic.answers
        # Every delivery was answered, and every answer was a success.
        assert [a for a in answers if a.status not in (200, 202)] == []
        assert {a.outcome for a in answers} <= {"applied", "spooled"}
        promised = sorted(a.number for a in answers)
        journal = rows(engine, webhook_deliveries, "delivery_id", "outcome", "attempts")
        assert sorted(int(e["delivery_id"].split("-")[1]) for e in journal) == promised
        assert {(e["outcome"], e["attempts"]) for e in journal} == {("applied", 1)}
        prs = rows(engine, pull_requests, "pr_number", "title", "version")
        assert sorted(p["pr_number"] for p in prs) == promised
        assert all(p["version"] == 1 and p["title"] == f"outage test {p['pr_number']}" for p in prs)
        assert len(rows(engine, pipeline_runs, "pr_number")) == len(promised)

        down = [a for a in answers if a.phase == "down"]
        print(
            f"\noutage: {len(answers)} deliveries in all, {len(down)} during a {outage_s:.1f} s outage"
            f" ({sum(a.outcome == 'spooled' for a in down)} spooled),"
            f" slowest answer during the outage {max(a.seconds for a in down) * 1000:.0f} ms,"
            f" spool drained {drain_s:.1f} s after the database was back,"
            f" {sum(a.outcome == 'spooled' for a in answers)} spooled in all, every one applied once"
        )
    finally:
        service.stop()
        engine.dispose()


def test_a_delivery_spooled_during_an_outage_is_journaled_with_its_hook_and_target(throwaway, tmp_path):
    """The spool keeps GitHub's hook headers: recovery learns the hook from the spooled delivery alone."""
    (tmp_path / "service").mkdir()
    service = Service(throwaway.url, tmp_path / "service", workers=2)
    engine = sa.create_engine(throwaway.url, poolclass=sa.pool.NullPool)
    spool_dir = tmp_path / "service" / "spool"
    try:
        service.wait_ready()
        throwaway.stop()
        wait_for(lambda: ready(service) == 503, what="/readyz 503 while the database is down")
        response = service.post(
            OPENED, "pull_request", delivery="spooled", hook_id="4242", target=("repository", "1296269")
        )
        assert (response.status_code, response.json()["outcome"]) == (202, "spooled")
        assert len(list(spool_dir.glob("*.delivery"))) == 1
        throwaway.start()
        wait_for(lambda: not list(spool_dir.glob("*.delivery")), what="the spool to drain")
        assert rows(engine, webhook_deliveries, "delivery_id", "hook_id", "outcome") == [
            {"delivery_id": "spooled", "hook_id": 4242, "outcome": "applied"}
        ]
        assert rows(engine, webhook_hooks, "hook_id", "target_type", "target_id", "api_path") == [
            {
                "hook_id": 4242,
                "target_type": "repository",
                "target_id": 1296269,
                "api_path": "repos/Codertocat/Hello-World/hooks/4242",
            }
        ]
    finally:
        service.stop()
        engine.dispose()


def test_a_worker_killed_mid_delivery_lands_it_whole_and_its_redelivery_is_a_duplicate(throwaway, tmp_path):
    # One worker, so the one serving the request is known; the longest timeout allowed,
    # so the database does not give up on the blocked delivery before the kill.
    env = {"FLOWLENS_STATEMENT_TIMEOUT_MS": "7000"}
    (tmp_path / "service").mkdir()
    service = Service(throwaway.url, tmp_path / "service", workers=1, env=env)
    engine = sa.create_engine(throwaway.url, poolclass=sa.pool.NullPool)
    try:
        service.wait_ready()
        assert service.post(OPENED, "pull_request", delivery="opened").json()["outcome"] == "applied"
        with engine.begin() as conn:
            conn.execute(sa.update(pull_requests).values(processed=True))
            conn.execute(sa.update(pipeline_runs).values(processed=True))
        before = delivered_rows(engine)

        # `serve` runs the gunicorn master, whose one child is the worker.
        (master,) = psutil.Process(service.process.pid).children()
        (worker,) = master.children()
        answered: list[object] = []
        with engine.connect() as holder:
            transaction = holder.begin()
            # The delivery's batch upserts the repository and the pull request, then
            # waits here, on the pipeline row, with half of its work done.
            holder.execute(sa.select(pipeline_runs.c.id).with_for_update())

            def send() -> None:
                try:
                    answered.append(service.post(CLOSED, "pull_request", delivery="closed").status_code)
                except requests.RequestException as exc:
                    answered.append(exc)

            sender = threading.Thread(target=send)
            sender.start()
            waiting = sa.text(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'flowlens-ingest'"
                " AND wait_event_type = 'Lock'"
            )
            # Watched from autocommit sessions: within one transaction pg_stat_activity
            # is read once and cached, and would never show the delivery arriving.
            watch = engine.execution_options(isolation_level="AUTOCOMMIT")
            with watch.connect() as watcher:
                wait_for(lambda: watcher.execute(waiting).first() is not None, what="the delivery to block mid-way")
                (backend,) = watcher.execute(waiting).scalars().all()
            worker.send_signal(signal.SIGKILL)
            sender.join(30)
            # Released after the kill: the blocked batch runs to its end as the one
            # transaction it is, which the server commits whole, whoever waits for the answer.
            transaction.rollback()
        assert len(answered) == 1 and not isinstance(answered[0], int)  # no answer came
        gone = sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
        with engine.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
            wait_for(
                lambda: conn.execute(gone, {"pid": backend}).scalar() == 0, what="the dead worker's session to end"
            )
        # All of it: the pull request closed and flagged, the delivery journaled as applied.
        assert rows(engine, pull_requests, "state", "version", "processed") == [
            {"state": "closed", "version": 2, "processed": False}
        ]
        outcomes = {e["delivery_id"]: (e["outcome"], e["attempts"]) for e in rows(engine, webhook_deliveries)}
        assert outcomes == {"opened": ("applied", 1), "closed": ("applied", 1)}
        with engine.begin() as conn:
            conn.execute(sa.update(pull_requests).values(processed=True))
            conn.execute(sa.update(pipeline_runs).values(processed=True))
        landed = delivered_rows(engine)
        assert landed != before

        service.stop()
        service = Service(throwaway.url, tmp_path / "service", workers=1, env=env)
        service.wait_ready()
        # GitHub's "Redeliver" of the delivery that got no answer: already applied, it changes nothing.
        response = service.post(CLOSED, "pull_request", delivery="closed")
        assert (response.status_code, response.json()["outcome"]) == (200, "duplicate")
        assert delivered_rows(engine) == landed
    finally:
        service.stop()
        engine.dispose()
