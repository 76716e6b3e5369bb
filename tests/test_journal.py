"""The delivery journal: every signed delivery recorded once, with its outcome, on a real database."""

from __future__ import annotations

import copy
import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from flowlens_ingest.config import Settings
from flowlens_ingest.events.delivery import Delivery
from flowlens_ingest.events.envelope import Envelope
from flowlens_ingest.ingest import ingest
from flowlens_ingest.store.database import MAX_ATTEMPTS, Database, make_engine
from flowlens_ingest.store.plan import decode_body
from flowlens_ingest.store.schema import metadata, pipeline_runs, pull_requests, repositories, webhook_deliveries
from flowlens_ingest.web.app import create_app
from flowlens_ingest.web.services import services

from .helpers import PAYLOADS, github_headers, load_payload, make_settings, rows

OPENED = load_payload("pull_request/opened.payload.json")
ALL_SAMPLES = sorted(p.relative_to(PAYLOADS).as_posix() for p in PAYLOADS.glob("*/*.json"))


def snapshot(engine: sa.Engine) -> dict[str, list[dict]]:
    """Every row of every table, journal included: `changes nothing` means this stays equal."""
    return {table.name: rows(engine, table) for table in metadata.sorted_tables}


def journal(engine: sa.Engine) -> list[dict]:
    return rows(engine, webhook_deliveries, "delivery_id", "hook_id", "event", "action", "outcome", "attempts")


def newer(payload: dict, seconds: int, **pr_fields: object) -> dict:
    """A copy of a pull_request payload whose PR snapshot is `seconds` newer."""
    out = copy.deepcopy(payload)
    out["pull_request"]["updated_at"] = f"2019-05-15T15:{20 + seconds // 60:02d}:{seconds % 60:02d}Z"
    out["pull_request"].update(pr_fields)
    return out


@pytest.mark.parametrize("sample", ALL_SAMPLES)
def test_every_signed_delivery_is_journaled_with_its_body(client, db, sample):
    body = (PAYLOADS / sample).read_bytes()
    event = sample.split("/")[0]
    response = client.post("/webhook", data=body, headers=github_headers(body, event, delivery="d-" + sample))
    assert response.status_code == 200, response.get_json()
    outcome = response.get_json()["outcome"]
    assert outcome in ("applied", "ignored")
    (entry,) = rows(db, webhook_deliveries)
    assert entry["delivery_id"] == "d-" + sample and entry["hook_id"] == 123456
    assert entry["event"] == event and entry["outcome"] == outcome
    assert entry["action"] == json.loads(body).get("action")
    # The exact bytes the signature covered, not a re-serialization.
    assert (bytes(entry["body"]), entry["body_encoding"]) == (body, "identity")
    assert entry["content_type"] == "application/json"
    assert entry["payload_sha256"] == hashlib.sha256(body).hexdigest()
    assert entry["attempts"] == 1 and entry["error"] is None
    assert entry["applied_at"] is not None


def test_missing_hook_id_is_journaled_as_zero(deliver, db):
    deliver(OPENED, "pull_request", delivery="no-hook", hook_id=None)
    assert [e["hook_id"] for e in journal(db)] == [0]


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(("pull_request", OPENED), id="applied"),
        pytest.param(("ping", load_payload("ping/payload.json")), id="ignored"),
        pytest.param(("check_run", load_payload("check_run/completed.payload.json")), id="check"),
        pytest.param(("pull_request_review", load_payload("pull_request_review/submitted.payload.json")), id="review"),
    ],
)
def test_redelivery_of_a_final_outcome_is_duplicate_and_changes_nothing(deliver, db, first):
    event, payload = first
    assert deliver(payload, event, delivery="same").status_code == 200
    # A poller acknowledged everything: a duplicate must not flag it for reprocessing.
    with db.begin() as conn:
        conn.execute(sa.update(pull_requests).values(processed=True))
        conn.execute(sa.update(pipeline_runs).values(processed=True))
    before = snapshot(db)
    for _ in range(3):
        response = deliver(payload, event, delivery="same")
        assert (response.status_code, response.get_json()["outcome"]) == (200, "duplicate")
    assert snapshot(db) == before


def test_redelivery_of_a_stale_delivery_is_duplicate(deliver, db):
    assert deliver(newer(OPENED, 60, title="later"), "pull_request").get_json()["outcome"] == "applied"
    response = deliver(OPENED, "pull_request", delivery="old")
    assert (response.status_code, response.get_json()["outcome"]) == (200, "stale")
    before = snapshot(db)
    response = deliver(OPENED, "pull_request", delivery="old")
    assert (response.status_code, response.get_json()["outcome"]) == (200, "duplicate")
    assert snapshot(db) == before
    assert rows(db, pull_requests, "title", "version") == [{"title": "later", "version": 1}]
    assert [e["outcome"] for e in journal(db) if e["delivery_id"] == "old"] == ["stale"]


def test_same_content_under_a_new_delivery_id_changes_no_polled_row(deliver, db):
    deliver(OPENED, "pull_request", delivery="first")
    with db.begin() as conn:
        conn.execute(sa.update(pull_requests).values(processed=True))
        conn.execute(sa.update(pipeline_runs).values(processed=True))
    polled = rows(db, pull_requests), rows(db, pipeline_runs)
    response = deliver(OPENED, "pull_request", delivery="second")
    assert (response.status_code, response.get_json()["outcome"]) == (200, "applied")
    assert (rows(db, pull_requests), rows(db, pipeline_runs)) == polled
    assert [e["delivery_id"] for e in journal(db)] == ["first", "second"]


def test_unmappable_delivery_is_failed_until_it_maps_and_others_keep_working(deliver, db):
    broken = copy.deepcopy(OPENED)
    broken["pull_request"]["state"] = "half-open"
    response = deliver(broken, "pull_request", delivery="bad")
    assert (response.status_code, response.get_json()["outcome"]) == (202, "failed")
    response = deliver(broken, "pull_request", delivery="bad")
    assert (response.status_code, response.get_json()["outcome"]) == (202, "failed")
    (entry,) = rows(db, webhook_deliveries)
    assert entry["outcome"] == "failed" and entry["attempts"] == 2 and entry["applied_at"] is None
    assert entry["error"].startswith("MappingError: pull_request.state")
    assert json.loads(bytes(entry["body"])) == broken and entry["repository_github_id"] == OPENED["repository"]["id"]
    assert rows(db, pull_requests) == [] and rows(db, repositories) == []
    assert deliver(OPENED, "pull_request", delivery="good").status_code == 200
    assert len(rows(db, pull_requests)) == 1


def test_delivery_the_database_refuses_is_failed_then_applied_when_it_comes_again(deliver, db, refuse_title):
    payload = newer(OPENED, 0, title="refused")
    response = deliver(payload, "pull_request", delivery="x")
    assert (response.status_code, response.get_json()["outcome"]) == (202, "failed")
    (entry,) = rows(db, webhook_deliveries)
    assert entry["outcome"] == "failed" and "test_refuse" in entry["error"]
    # The whole transaction was undone: no repository row from its first statement.
    assert rows(db, repositories) == [] and rows(db, pull_requests) == []
    refuse_title()
    response = deliver(payload, "pull_request", delivery="x")
    assert (response.status_code, response.get_json()["outcome"]) == (200, "applied")
    (entry,) = rows(db, webhook_deliveries)
    assert (entry["outcome"], entry["error"], entry["attempts"]) == ("applied", None, 2)
    assert entry["applied_at"] is not None
    assert rows(db, pull_requests, "title", "version") == [{"title": "refused", "version": 1}]
    response = deliver(payload, "pull_request", delivery="x")
    assert (response.status_code, response.get_json()["outcome"]) == (200, "duplicate")


def test_journal_without_payloads_still_keeps_failed_ones(db, database_url, tmp_path):
    app = create_app(make_settings(database_url, tmp_path, store_payloads=False))
    client = app.test_client()
    try:
        for delivery, payload in (("ok", OPENED), ("bad", dict(OPENED, pull_request=[]))):
            body = json.dumps(payload).encode()
            client.post("/webhook", data=body, headers=github_headers(body, "pull_request", delivery=delivery))
    finally:
        services(app).database.dispose()
    stored = {e["delivery_id"]: (e["outcome"], e["body"]) for e in rows(db, webhook_deliveries)}
    assert stored["ok"] == ("applied", None)
    assert stored["bad"][0] == "failed" and json.loads(bytes(stored["bad"][1])) == dict(OPENED, pull_request=[])


def test_racing_copies_of_one_delivery_apply_once(db, database_url, tmp_path: Path):
    """Redeliveries, two workers or two VMs: the journal lets exactly one copy apply."""
    engine = make_engine(Settings(database_url=database_url, pool_size=8))
    database = Database(Settings(), engine=engine)
    body = json.dumps(OPENED).encode()
    delivery = Delivery.parse(Envelope("race", hook_id=7, event="pull_request", content_type="application/json"), body)
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def run() -> None:
        start.wait()
        outcomes.append(ingest(database, delivery).outcome)

    threads = [threading.Thread(target=run) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        engine.dispose()
    assert sorted(outcomes) == ["applied"] + ["duplicate"] * 7
    assert rows(db, pull_requests, "version") == [{"version": 1}]
    assert journal(db) == [
        {
            "delivery_id": "race",
            "hook_id": 7,
            "event": "pull_request",
            "action": "opened",
            "outcome": "applied",
            "attempts": 1,
        }
    ]


class Conflicts:
    """Makes the next writes of a pull request fail with a SQLSTATE, as YugabyteDB's conflicts do."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def arm(self, code: str, n: int) -> None:
        """The next `n` attempts fail with `code`."""
        # A sequence, because nextval survives the rollback of the failing transaction.
        with self.engine.begin() as conn:
            conn.execute(sa.text("CREATE SEQUENCE test_attempts"))
            conn.execute(
                sa.text(f"""
                CREATE FUNCTION test_conflict() RETURNS trigger AS $$ BEGIN
                  IF nextval('test_attempts') <= {n} THEN
                    RAISE EXCEPTION 'simulated conflict' USING ERRCODE = '{code}';
                  END IF;
                  RETURN NEW;
                END $$ LANGUAGE plpgsql""")
            )
            conn.execute(
                sa.text(
                    "CREATE TRIGGER test_conflict BEFORE INSERT OR UPDATE ON pull_requests"
                    " FOR EACH ROW EXECUTE PROCEDURE test_conflict()"
                )
            )

    def attempts(self) -> int:
        """How many attempts reached the pull request write."""
        with self.engine.connect() as conn:
            return conn.execute(sa.text("SELECT last_value FROM test_attempts")).scalar()

    def disarm(self) -> None:
        """Remove the trigger, its function and its sequence."""
        with self.engine.begin() as conn:
            conn.execute(sa.text("DROP TRIGGER IF EXISTS test_conflict ON pull_requests"))
            conn.execute(sa.text("DROP FUNCTION IF EXISTS test_conflict()"))
            conn.execute(sa.text("DROP SEQUENCE IF EXISTS test_attempts"))


@pytest.fixture
def conflicts(db) -> Iterator[Conflicts]:
    armed = Conflicts(db)
    yield armed
    armed.disarm()


@pytest.mark.parametrize("code", ["40001", "40P01"])
def test_a_conflicting_transaction_is_retried_whole(deliver, db, conflicts, code):
    conflicts.arm(code, 2)
    response = deliver(OPENED, "pull_request", delivery="retried")
    assert (response.status_code, response.get_json()["outcome"]) == (200, "applied")
    assert conflicts.attempts() == 3
    # Each attempt re-ran every statement: one row each, written once.
    assert rows(db, pull_requests, "version") == [{"version": 1}]
    assert len(rows(db, repositories)) == 1
    assert [(e["outcome"], e["attempts"]) for e in journal(db)] == [("applied", 1)]


def test_conflicts_that_never_end_are_bounded_and_spooled(deliver, db, conflicts, tmp_path):
    conflicts.arm("40001", 1000)
    response = deliver(OPENED, "pull_request", delivery="hopeless")
    assert (response.status_code, response.get_json()["outcome"]) == (202, "spooled")
    # Bounded by MAX_ATTEMPTS, and by RETRY_BUDGET_S on a machine slow enough to reach it.
    assert 6 < conflicts.attempts() <= MAX_ATTEMPTS
    assert rows(db, webhook_deliveries) == [] and rows(db, pull_requests) == []
    assert len(list((tmp_path / "spool").glob("*.delivery"))) == 1


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        pytest.param(
            "application/json", b'{"q": "it\'s \'\'quoted\'\'", "b": "back\\\\slash \\\\\' end"}', id="quotes"
        ),
        pytest.param("application/json", '{"t": "caf\u00e9 \u2603 \U0001f600 \\u0000"}'.encode(), id="utf8"),
        pytest.param("application/json", b'{"e": "%s %(x)s %% $1"}', id="percent"),
        pytest.param(
            "application/x-www-form-urlencoded", b"other=a\x00b&payload=%7B%22zero%22%3A%22x%22%7D", id="nul-byte"
        ),
    ],
)
def test_the_journal_keeps_the_exact_bytes_whatever_they_hold(deliver, db, content_type, body):
    """The body travels as text where it can and as bytea where it cannot: it reads back byte for byte."""
    response = deliver(body, "ping", content_type=content_type)
    assert response.status_code == 200, response.get_json()
    (entry,) = rows(db, webhook_deliveries, "body", "body_encoding")
    assert (bytes(entry["body"]), entry["body_encoding"]) == (body, "identity")


def test_a_compressed_journal_body_reads_back_exactly(db, database_url, tmp_path):
    app = create_app(make_settings(database_url, tmp_path, journal_compression=True))
    body = json.dumps(OPENED).encode()
    response = app.test_client().post("/webhook", data=body, headers=github_headers(body, "pull_request"))
    services(app).database.dispose()
    assert response.status_code == 200
    (entry,) = rows(db, webhook_deliveries, "body", "body_encoding")
    assert entry["body_encoding"] == "gzip" and decode_body(bytes(entry["body"]), "gzip") == body


def test_journal_bodies_are_compressed_with_lz4_where_the_server_has_it(client, db):
    with db.connect() as conn:
        version = conn.exec_driver_sql("SHOW server_version_num").scalar_one()
        if int(version) < 140000:
            pytest.skip("lz4 TOAST compression needs PostgreSQL 14")
        try:
            conn.exec_driver_sql("SET default_toast_compression = 'lz4'")
        except sa.exc.DBAPIError:
            pytest.skip("this server was built without lz4")
    body = json.dumps({**OPENED, "padding": "x" * 20000}).encode()
    assert client.post("/webhook", data=body, headers=github_headers(body, "pull_request")).status_code == 200
    with db.connect() as conn:
        method = conn.exec_driver_sql("SELECT pg_column_compression(body) FROM webhook_deliveries").scalar_one()
    assert method == "lz4"
