"""PostgreSQL failover under traffic: a real primary and its streaming standby, both named in DATABASE_URL.

The primary is crashed (`pg_ctl stop -m immediate`) while a sender keeps posting signed
deliveries to a real gunicorn; the standby is promoted; every delivery must have been
answered 2xx (applied, or spooled while no server took writes) and, once the spool has
drained, be journaled exactly once on the promoted server.

Replication is synchronous here (`synchronous_standby_names = '*'`): a commit is
acknowledged only once the standby has it. With PostgreSQL's default asynchronous
replication the last commits before a crash may never reach the standby, and deliveries
answered `applied` by the old primary would be lost with it (docs/deploying.md says so).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from flowlens_ingest.store import migrate
from flowlens_ingest.store.schema import pull_requests, webhook_deliveries

from .databases import ThrowawayPostgres
from .helpers import free_port, load_payload, opened_pr, rows, run_cli, wait_for
from .serving import ProcfileService, Service, log_entries, running

pytestmark = pytest.mark.slow

OPENED = load_payload("pull_request/opened.payload.json")
# A few deliveries a second, as a steady trickle rather than a burst.
PACE_S = 0.2


def pr_payload(number: int) -> dict:
    return opened_pr(number, f"failover test {number}")


@dataclass
class Sender:
    """One thread posting a new PR every PACE_S, recording each answer with the phase it was sent in."""

    service: Service
    phase: str = "primary"
    # (number, phase, status, outcome, when it was sent: time.monotonic())
    answers: list[tuple[int, str, int | None, str | None, float]] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _run(self) -> None:
        number = 0
        # Bounded: a test that never reaches its conditions fails on their deadlines first.
        while not self.stopping.is_set() and number < 2000:
            number += 1
            phase, sent = self.phase, time.monotonic()
            try:
                response = self.service.post(pr_payload(number), "pull_request", delivery=f"failover-{number}")
                answer = response.status_code, response.json().get("outcome") if response.status_code < 500 else None
            except requests.RequestException:
                answer = None, None
            with self.lock:
                self.answers.append((number, phase, *answer, sent))
            self.stopping.wait(PACE_S)

    def count(self, phase: str, outcome: str) -> int:
        with self.lock:
            return sum(1 for _, p, _, o, _ in self.answers if p == phase and o == outcome)

    def __enter__(self) -> Sender:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(30)


@pytest.fixture
def pair() -> Iterator[tuple[ThrowawayPostgres, ThrowawayPostgres]]:
    """A migrated primary and its standby, streaming synchronously."""
    primary = ThrowawayPostgres()
    standby: ThrowawayPostgres | None = None
    try:
        primary.start()
        migrate.upgrade(primary.url)
        standby = ThrowawayPostgres(standby_of=primary)
        standby.start()
        engine = sa.create_engine(primary.url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            streaming = sa.text("SELECT sync_state FROM pg_stat_replication WHERE state = 'streaming'")
            wait_for(lambda: conn.execute(streaming).first() is not None, what="the standby to stream")
            # Set once the standby streams: before, every commit would wait for it.
            conn.execute(sa.text("ALTER SYSTEM SET synchronous_standby_names = '*'"))
            conn.execute(sa.text("SELECT pg_reload_conf()"))
            wait_for(lambda: conn.execute(streaming).scalar() == "sync", what="the standby to be synchronous")
        engine.dispose()
        yield primary, standby
    finally:
        for server in (standby, primary):
            if server is not None:
                server.remove()


def ready(service: Service) -> int:
    try:
        return requests.get(service.url + "/readyz", timeout=10).status_code
    except requests.RequestException:
        return 0


def command(database_url: str, data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """`flowlens-ingest ARGS` on DATABASE_URL, as an operator runs it."""
    return run_cli(*args, timeout=60, DATABASE_URL=database_url, FLOWLENS_DATA_DIR=str(data_dir))


def test_a_crashed_primary_under_traffic_fails_over_to_the_promoted_standby_and_loses_nothing(pair, tmp_path):
    primary, standby = pair
    # libpq's own host list, as psql takes it: the service must read it the same way.
    url = f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/postgres"
    url += "?target_session_attrs=read-write"
    (tmp_path / "service").mkdir()
    service = Service(url, tmp_path / "service", workers=2)
    spool = tmp_path / "service" / "spool"
    with running(service):
        wait_for(lambda: ready(service) == 200, what="/readyz 200 on the primary")
        with Sender(service) as sender:
            wait_for(lambda: sender.count("primary", "applied") >= 10, what="deliveries applied on the primary")
            sender.phase = "none"
            primary.stop("immediate")
            # The standby is up, but read-only: target_session_attrs=read-write passes it over.
            wait_for(lambda: sender.count("none", "spooled") >= 5, what="deliveries spooled with no primary")
            assert ready(service) == 503
            sender.phase = "promoted"
            standby.promote()
            promoted_at = time.monotonic()
            wait_for(lambda: sender.count("promoted", "applied") >= 10, what="deliveries applied on the promoted one")
        wait_for(lambda: ready(service) == 200, what="/readyz 200 on the promoted standby")
        wait_for(lambda: not list(spool.glob("*.delivery")), what="the spool to drain")

    answers = sender.answers
    assert [a for a in answers if a[2] not in (200, 202) or a[3] not in ("applied", "spooled")] == []
    sent = sorted(number for number, *_ in answers)
    engine = sa.create_engine(standby.url, poolclass=sa.pool.NullPool)
    try:
        journal = rows(engine, webhook_deliveries, "delivery_id", "outcome")
        # Each once: nothing answered 2xx was lost with the old primary, nothing applied twice.
        assert Counter(entry["delivery_id"] for entry in journal) == Counter(f"failover-{n}" for n in sent)
        assert {entry["outcome"] for entry in journal} == {"applied"}
        prs = rows(engine, pull_requests, "pr_number", "title", "version")
        assert sorted(pr["pr_number"] for pr in prs) == sent
        assert all(pr["version"] == 1 and pr["title"] == f"failover test {pr['pr_number']}" for pr in prs)
    finally:
        engine.dispose()

    # The operator's commands find the new primary through the same list, the dead host first.
    shell = command(url, tmp_path / "service", "db", "shell", "-At", "-c", "SELECT pg_is_in_recovery()")
    assert (shell.returncode, shell.stdout.strip()) == (0, "f"), shell.stderr
    done = command(url, tmp_path / "service", "status", "--json")
    assert done.returncode in (0, 1), done.stderr
    assert json.loads(done.stdout)["database"]["reachable"] is True
    upgraded = command(url, tmp_path / "service", "db", "upgrade")
    assert upgraded.returncode == 0 and "already at" in upgraded.stdout, upgraded.stderr
    # alembic's own env.py, from the repository's root, reads the list the same way.
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWLENS_", "DATABASE_URL"))}
    alembic = subprocess.run(
        [str(Path(sys.executable).parent / "alembic"), "current"],
        cwd=Path(__file__).resolve().parent.parent,
        env={**environment, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert alembic.returncode == 0 and "(head)" in alembic.stdout, alembic.stderr
    # A figure, not a promise: printed with -s, never asserted.
    again = min(a[4] for a in answers if a[1] == "promoted" and a[3] == "applied") - promoted_at
    print(
        f"\nfailover: {len(answers)} deliveries, {sender.count('none', 'spooled')} spooled with no primary,"
        f" {sum(a[3] == 'spooled' for a in answers)} spooled in all, applied again {max(again, 0):.2f} s after"
        " the promote, every one journaled once on the promoted standby"
    )


def test_the_procfile_gunicorn_names_every_host_of_a_list_nobody_answers_and_spools(tmp_path):
    first, second = free_port(), free_port()  # nobody listens on either
    url = f"postgresql://flowlens:not-this-password@127.0.0.1:{first},127.0.0.1:{second}/flowlens"
    with running(ProcfileService(url, tmp_path, workers=1)) as service:
        (said,) = [e["msg"] for e in log_entries(service) if "(DATABASE_URL)" in e["msg"]]
        assert said.startswith(
            f"flowlens-ingest: the database at 127.0.0.1:{first},127.0.0.1:{second}/flowlens (DATABASE_URL)"
            " is unavailable (refused: Connection refused)"
        ), said
        assert "not-this-password" not in service.logs()
        answer = service.post(OPENED, "pull_request")
        assert (answer.status_code, answer.json()["outcome"]) == (202, "spooled")
        assert ready(service) == 503
