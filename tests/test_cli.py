"""`flowlens-ingest send` and `deliveries`, run as an operator would, against a real service."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import pytest
import sqlalchemy as sa

from flowlens_ingest import __version__
from flowlens_ingest.cli.arguments import Timestamp
from flowlens_ingest.cli.connect import read_answer
from flowlens_ingest.cli.instances import INSTANCES, live_instances
from flowlens_ingest.database_urls import database_location
from flowlens_ingest.store import migrate
from flowlens_ingest.store.schema import pull_requests, webhook_deliveries

from .databases import create_scratch_database, drop_database
from .helpers import PAYLOADS, SECRET, free_port, load_payload, loopback_http, rows, run_cli, wait_for

OPENED_FILE = PAYLOADS / "pull_request" / "opened.payload.json"


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    """Run `flowlens-ingest ARGS` with only the given FlowLens variables set."""
    return run_cli(*args, timeout=60, **env)


@pytest.mark.slow
def test_send_signs_and_posts_a_file_to_a_running_service(service, db, database_url, tmp_path):
    url = service.url + "/webhook"
    sent = cli(
        "send",
        str(OPENED_FILE),
        "--event",
        "pull_request",
        "--url",
        url,
        "--delivery",
        "cli-1",
        GITHUB_WEBHOOK_SECRET=SECRET,
    )
    assert sent.returncode == 0, sent.stderr
    status, body = sent.stdout.split(" ", 1)
    assert status == "200"
    assert json.loads(body) == {"delivery": "cli-1", "event": "pull_request", "action": "opened", "outcome": "applied"}
    assert [r["pr_number"] for r in rows(db, pull_requests, "pr_number")] == [2]

    # Sent again with the same id: GitHub's redelivery, not applied twice.
    again = cli(
        "send",
        str(OPENED_FILE),
        "--event",
        "pull_request",
        "--url",
        url,
        "--delivery",
        "cli-1",
        GITHUB_WEBHOOK_SECRET=SECRET,
    )
    assert again.returncode == 0 and json.loads(again.stdout.split(" ", 1)[1])["outcome"] == "duplicate"

    # No secret in the environment: the one `serve` keeps in the data directory signs it.
    (tmp_path / "webhook-secret").write_text(SECRET + "\n")
    from_file = cli(
        "send",
        str(PAYLOADS / "ping" / "payload.json"),
        "--event",
        "ping",
        "--url",
        url,
        FLOWLENS_DATA_DIR=str(tmp_path),
    )
    assert from_file.returncode == 0, from_file.stderr
    assert json.loads(from_file.stdout.split(" ", 1)[1])["outcome"] == "ignored"

    refused = cli(
        "send",
        str(OPENED_FILE),
        "--event",
        "pull_request",
        "--url",
        url,
        GITHUB_WEBHOOK_SECRET="not the service's secret",
    )
    assert refused.returncode == 1
    assert refused.stdout.startswith("401 ")

    # Every delivery above is in the journal, newest first.
    listed = cli("deliveries", DATABASE_URL=database_url, GITHUB_WEBHOOK_SECRET=SECRET)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 2 and "(2 deliveries)" in listed.stderr
    assert " ping " in lines[0] and "ignored" in lines[0]
    assert "cli-1 pull_request/opened applied" in lines[1]
    # Times carry their zone (UTC, the ISO 8601 form `replay --since` takes).
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", line) for line in lines), lines


@pytest.mark.slow
def test_send_posts_a_signed_sample_to_a_running_service(service, db):
    sent = cli(
        "send",
        str(OPENED_FILE),
        "--event",
        "pull_request",
        "--url",
        service.url + "/webhook",
        "--delivery",
        f"send-{uuid.uuid4()}",
        GITHUB_WEBHOOK_SECRET=SECRET,
    )
    assert sent.returncode == 0, sent.stderr
    # The service's answer as it came: its status, then its body as the service wrote it (compact JSON).
    assert sent.stdout.startswith("200 ") and '"outcome":"applied"' in sent.stdout
    assert len(rows(db, pull_requests)) == 1


@contextlib.contextmanager
def answering(how: str) -> Iterator[str]:
    """A loopback server answering every request 200 with a body that never ends: `endless` (as fast
    as it is read) or `trickle` (a byte at a time, a fifth of a second apart). Yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._answer()

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._answer()

        def _answer(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(1 << 30))
            self.end_headers()
            stop = time.monotonic() + 60  # bounded: the client hangs up long before
            with contextlib.suppress(OSError):
                while time.monotonic() < stop:
                    self.wfile.write(b"x" * 65536 if how == "endless" else b"x")
                    self.wfile.flush()
                    if how == "trickle":
                        time.sleep(0.2)

        def log_message(self, format: str, *args: object) -> None:
            pass

    with loopback_http(Handler) as url:
        yield url


def test_send_gives_up_on_an_answer_that_never_ends():
    with answering("endless") as url:
        result = cli("send", str(OPENED_FILE), "--event", "pull_request", "--url", url, GITHUB_WEBHOOK_SECRET=SECRET)
    assert result.returncode == 1
    assert "an answer over 64 KiB, not the service's" in result.stderr and "Traceback" not in result.stderr


def test_send_to_something_that_does_not_speak_http_says_so_in_one_line():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

        answering_thread = threading.Thread(target=answer, daemon=True)
        answering_thread.start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/webhook"
        result = cli("send", str(OPENED_FILE), "--event", "pull_request", "--url", url, GITHUB_WEBHOOK_SECRET=SECRET)
        answering_thread.join(10)
    assert result.returncode == 1
    assert "no answer from" in result.stderr and "BadStatusLine" in result.stderr
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr


def test_an_answer_read_a_byte_at_a_time_is_given_up_at_the_deadline():
    with answering("trickle") as url, urllib.request.urlopen(url, timeout=5) as response:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            read_answer(response, 1024, 1.0)
        # Each socket wait is short (a byte every 0.2 s): only the deadline in all ends it.
        assert time.monotonic() - started < 5


def test_send_without_a_secret_says_so(tmp_path):
    result = cli("send", str(OPENED_FILE), "--event", "pull_request", FLOWLENS_DATA_DIR=str(tmp_path))
    assert result.returncode == 2
    assert "GITHUB_WEBHOOK_SECRET is not set" in result.stderr and "Traceback" not in result.stderr
    # Names the variable that says where it looked, and the folder it looked in.
    assert f"FLOWLENS_DATA_DIR ({tmp_path})" in result.stderr


def test_send_names_a_file_it_cannot_read(tmp_path):
    result = cli("send", str(tmp_path / "missing.json"), "--event", "ping", GITHUB_WEBHOOK_SECRET=SECRET)
    assert result.returncode == 2
    assert "cannot read" in result.stderr and "missing.json" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["fifo", "over-the-limit", "device"])
def test_send_reads_at_most_a_body_the_service_takes_and_never_waits_on_a_file(kind, tmp_path):
    # A FIFO nobody writes would block for ever, /dev/zero would be read until memory ran out.
    target = {"fifo": tmp_path / "payload.fifo", "over-the-limit": tmp_path / "big.json", "device": Path("/dev/zero")}[
        kind
    ]
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "over-the-limit":
        target.write_bytes(b"{}" + b" " * 2048)
    result = cli(
        "send",
        str(target),
        "--event",
        "ping",
        "--url",
        "http://127.0.0.1:9/webhook",
        GITHUB_WEBHOOK_SECRET=SECRET,
        FLOWLENS_MAX_BODY_BYTES="1024",
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    expected = "larger than FLOWLENS_MAX_BODY_BYTES (1024)" if kind == "over-the-limit" else "not a regular file"
    assert line.startswith(f"flowlens-ingest: cannot send {target}: ") and expected in line


@pytest.mark.parametrize("kind", ["directory", "not-text"])
def test_a_kept_webhook_secret_that_cannot_be_read_is_one_line(kind, tmp_path):
    kept = tmp_path / "webhook-secret"
    if kind == "directory":
        kept.mkdir()
    else:
        kept.write_bytes(b"\xff\xfe secret")
    result = cli("send", str(OPENED_FILE), "--event", "pull_request", FLOWLENS_DATA_DIR=str(tmp_path))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"flowlens-ingest: cannot read the webhook secret kept in {kept}: ")


def test_send_names_a_service_it_cannot_reach():
    url = f"http://127.0.0.1:{free_port()}/webhook"
    result = cli("send", str(OPENED_FILE), "--event", "pull_request", "--url", url, GITHUB_WEBHOOK_SECRET=SECRET)
    assert result.returncode == 1  # asked right, but not done
    assert f"cannot reach {url}" in result.stderr and "Traceback" not in result.stderr


def test_serve_refuses_a_database_url_without_a_secret(database_url, tmp_path):
    result = cli("serve", "--port", str(free_port()), DATABASE_URL=database_url, FLOWLENS_DATA_DIR=str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "flowlens-ingest: GITHUB_WEBHOOK_SECRET is not set; refusing to start with DATABASE_URL set"
    )
    assert not Path(tmp_path / "pgdata").exists()


@pytest.mark.parametrize("command", [["deliveries"], ["replay", "--failed"], ["prune", "--older-than", "30d"]])
def test_operator_commands_never_create_an_embedded_database(command, tmp_path):
    # Run from the wrong folder, a new empty database would pass for an empty journal.
    result = cli(*command, FLOWLENS_DATA_DIR=str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("flowlens-ingest: no database: DATABASE_URL is not set and ")
    assert "run `flowlens-ingest serve` first" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "pgdata").exists()


@pytest.mark.slow
def test_send_finds_the_running_service_and_fails_on_a_failed_delivery(service, db, tmp_path):
    # No --url: the URL the `serve` of this data directory recorded (not always port 8000).
    record = tmp_path / "instances" / f"{service.port}.json"
    wait_for(record.exists, "serve to record its URL")
    assert json.loads(record.read_text())["url"] == service.url + "/webhook"
    data_dir = {"FLOWLENS_DATA_DIR": str(tmp_path), "GITHUB_WEBHOOK_SECRET": SECRET}
    sent = cli("send", str(OPENED_FILE), "--event", "pull_request", **data_dir)
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout.split(" ", 1)[1])["outcome"] == "applied"

    # Accepted (202) but failed to apply: a script must not take it for done.
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(dict(load_payload("pull_request/opened.payload.json"), pull_request=[])))
    failed = cli("send", str(broken), "--event", "pull_request", **data_dir)
    assert failed.returncode == 1, failed.stderr
    assert failed.stdout.startswith("202 ") and json.loads(failed.stdout.split(" ", 1)[1])["outcome"] == "failed"

    # FLOWLENS_URL wins over the data directory's URL.
    elsewhere = f"http://127.0.0.1:{free_port()}/webhook"
    missed = cli("send", str(OPENED_FILE), "--event", "pull_request", FLOWLENS_URL=elsewhere, **data_dir)
    assert missed.returncode == 1 and f"cannot reach {elsewhere}" in missed.stderr


@pytest.mark.parametrize(
    ("fault", "said"),
    [
        ("port", "is unavailable (refused: Connection refused): check that the server runs and listens there"),
        ("database", 'is unavailable (database missing: database "flowlens_no_such_db" does not exist): create it'),
        ("role", 'is unavailable (authentication: role "flowlens_no_such_role" does not exist): check the user'),
    ],
)
@pytest.mark.parametrize("command", [["deliveries"], ["replay", "--failed"], ["db", "upgrade"]])
def test_a_database_that_cannot_be_used_is_named_with_its_cause_and_exit_1(server_url, command, fault, said):
    url = sa.engine.make_url(server_url)
    if fault == "port":
        # Nobody listens there (the embedded server listens on no TCP port at all).
        url = sa.engine.make_url(f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/flowlens")
    elif fault == "database":
        url = url.set(database="flowlens_no_such_db")
    else:
        url = url.set(username="flowlens_no_such_role", password=None)
    written = url.render_as_string(hide_password=False)
    result = cli(*command, DATABASE_URL=written, GITHUB_WEBHOOK_SECRET=SECRET)
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"flowlens-ingest: the database at {database_location(written)} (DATABASE_URL)"), line
    assert said in line
    assert "Traceback" not in result.stderr


def test_help_shows_defaults_environment_and_examples():
    top = cli("--help")
    assert top.returncode == 0
    assert "Examples:" in top.stdout and "FLOWLENS_DATA_DIR" in top.stdout and "DATABASE_URL" in top.stdout
    version = cli("--version")
    assert version.returncode == 0 and __version__ in version.stdout

    expected = {
        "serve": ["default: 8000", "default: 127.0.0.1", "default: (FLOWLENS_WORKERS, else cores + 1)"],
        "send": ["default: (FLOWLENS_URL, else", "Examples:"],
        "deliveries": ["--failed", "Only deliveries that failed", "default: 50", "--json"],
        "replay": ["--since", "ISO 8601", "Only deliveries that failed", "--json", "Exit status"],
        "prune": ["--older-than", "30d", "--include-failed", "Examples:", "Under 1d needs --yes"],
        "nginx-conf": ["default: 0.0.0.0:80", "default: 127.0.0.1:8000"],
    }
    for command, texts in expected.items():
        shown = cli(command, "--help")
        assert shown.returncode == 0, shown.stderr
        flat = " ".join(shown.stdout.split())
        for text in texts:
            assert text in flat, (command, text, shown.stdout)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["deliveries", "--limit", "-1"], {}, "Invalid value for '--limit'"),
        (["deliveries", "--limit", "100000000000000000000"], {}, "Invalid value for '--limit'"),
        (["prune", "--older-than", "9999999d", "--yes"], {}, "at most 36500d"),
        (["serve"], {"FLOWLENS_WORKERS": "abc"}, "FLOWLENS_WORKERS must be a whole number from 1 to 256"),
        (["serve", "--workers", "257"], {}, "Invalid value for '--workers'"),
        (["send", "f.json", "--event", "ping"], {"FLOWLENS_URL": "localhost:8000"}, "FLOWLENS_URL must be an http"),
        (["prune", "--older-than", "thirty"], {}, "use a number and d, h, m or s"),
        (["prune", "--older-than", "12h"], {}, "--older-than 12h deletes entries of the last day too; add --yes"),
        (["replay", "--failed", "--since", "2026-01-01"], {}, "--failed and --since cannot be used together"),
        (["nosuchcommand"], {}, "No such command"),
    ],
    ids=[
        "negative-limit",
        "limit-past-bigint",
        "duration-past-a-century",
        "workers-env",
        "workers-option",
        "url-env",
        "duration",
        "prune-under-a-day",
        "replay-both",
        "unknown-command",
    ],
)
def test_bad_input_is_one_line_never_a_traceback(args, env, message, tmp_path):
    result = cli(*args, FLOWLENS_DATA_DIR=str(tmp_path), **env)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("flowlens-ingest: ") and message in line
    assert not (tmp_path / "pgdata").exists()


def test_db_upgrade_to_an_unknown_revision_is_one_line(database_url):
    result = cli("db", "upgrade", "zzz", DATABASE_URL=database_url)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "flowlens-ingest: cannot upgrade to 'zzz': Can't locate revision identified by 'zzz'"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("revision", ["", "@", "head+1", "0001-1"])
def test_db_upgrade_to_a_revision_naming_nothing_is_one_line(revision, database_url):
    # Alembic asserts on a target it resolves to an empty id: said as a bad argument, not "unexpected".
    result = cli("db", "upgrade", revision, DATABASE_URL=database_url)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"flowlens-ingest: cannot upgrade to {revision!r}: it names no revision (head, or an id from `alembic history`)"
    ]


@pytest.fixture
def unmigrated(server_url):
    url = create_scratch_database(server_url, prefix="flowlens_unmigrated")
    yield url
    drop_database(url)


def test_db_upgrade_says_from_which_revision_to_which(unmigrated):
    head = migrate.head()

    def upgrade(*revision: str) -> str:
        result = cli("db", "upgrade", *revision, DATABASE_URL=unmigrated)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert upgrade("0002") == "flowlens-ingest: DATABASE_URL upgraded from no revision (never migrated) to 0002"
    assert upgrade() == f"flowlens-ingest: DATABASE_URL upgraded from revision 0002 to {head} (head)"
    assert upgrade() == f"flowlens-ingest: DATABASE_URL already at {head} (head), nothing to do"
    # An older revision: nothing done, and said so, not "at 0002".
    assert upgrade("0002") == (
        f"flowlens-ingest: DATABASE_URL already at {head} (head), past 0002: nothing to do (db upgrade never downgrades)"
    )


@pytest.fixture
def role_without_create(unmigrated, server_url):
    """A login role that may connect to `unmigrated` but create nothing in its schema; its URL."""
    role = f"flowlens_nocreate_{uuid.uuid4().hex[:8]}"
    for url, statement in [
        (server_url, f'CREATE ROLE "{role}" LOGIN'),
        # Servers before 15 let every role create in public.
        (unmigrated, "REVOKE CREATE ON SCHEMA public FROM PUBLIC"),
    ]:
        with sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool).connect() as conn:
            conn.execute(sa.text(statement))
    yield sa.make_url(unmigrated).set(username=role, password=None).render_as_string(hide_password=False)
    drop_database(unmigrated)
    with sa.create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool).connect() as conn:
        conn.execute(sa.text(f'DROP ROLE "{role}"'))


def test_db_upgrade_by_a_role_that_may_not_create_tables_says_so_in_one_line(role_without_create):
    role = sa.make_url(role_without_create).username
    result = cli("db", "upgrade", DATABASE_URL=role_without_create)
    assert result.returncode == 1
    # Asked before trying: one line naming the fix, and no refused CREATE TABLE in the server's log.
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        f"flowlens-ingest: the database at {database_location(role_without_create)} (DATABASE_URL) cannot be migrated:"
        f' role "{role}" may not create tables in schema "public"; run `flowlens-ingest db upgrade` as the'
        f' schema\'s owner, or have it run: GRANT CREATE ON SCHEMA "public" TO "{role}";'
    )
    assert migrate.revision_of(role_without_create) is None


@pytest.mark.parametrize("command", [["deliveries"], ["replay", "--failed"], ["prune", "--older-than", "30d"]])
def test_operator_commands_never_migrate_and_say_what_does(command, unmigrated):
    result = cli(*command, DATABASE_URL=unmigrated)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("flowlens-ingest: the database is not migrated") and "`flowlens-ingest db upgrade`" in line
    engine = sa.create_engine(unmigrated, poolclass=sa.pool.NullPool)
    try:
        assert migrate.revisions(engine)[0] is None
    finally:
        engine.dispose()


def test_prune_shows_its_progress(deliver, db, database_url):
    for number in range(3):
        deliver(load_payload("ping/payload.json"), "ping", delivery=f"old-{number}")
    with db.begin() as conn:
        conn.execute(sa.update(webhook_deliveries).values(received_at=sa.func.now() - timedelta(days=40)))
    pruned = cli("prune", "--older-than", "30d", DATABASE_URL=database_url)
    assert pruned.returncode == 0, pruned.stderr
    assert "flowlens-ingest: pruned 3 so far" in pruned.stderr.splitlines()[-1]
    assert pruned.stdout.strip() == "flowlens-ingest: pruned 3 journal entries"


def test_counts_agree_with_their_nouns(deliver, db, database_url):
    deliver(load_payload("ping/payload.json"), "ping", delivery="only-one")
    listed = cli("deliveries", DATABASE_URL=database_url)
    assert listed.returncode == 0, listed.stderr
    assert listed.stderr.strip() == "(1 delivery)"
    with db.begin() as conn:
        conn.execute(sa.update(webhook_deliveries).values(received_at=sa.func.now() - timedelta(days=40)))
    pruned = cli("prune", "--older-than", "30d", DATABASE_URL=database_url)
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.strip() == "flowlens-ingest: pruned 1 journal entry"
    none = cli("deliveries", DATABASE_URL=database_url)
    assert none.returncode == 0 and none.stderr.strip() == "(0 deliveries)"


def test_db_shell_runs_psql_on_the_database(db, database_url):
    result = cli("db", "shell", "-At", "-c", "SELECT count(*) FROM webhook_deliveries", DATABASE_URL=database_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"


@pytest.mark.slow
def test_db_shell_gives_up_on_a_server_that_never_answers(tmp_path):
    # A listener that accepts and says nothing (a proxy whose database is gone): psql stops trying.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/postgres"
        started = time.monotonic()
        result = cli("db", "shell", "-At", "-c", "SELECT 1", DATABASE_URL=url, FLOWLENS_DATA_DIR=str(tmp_path))
    assert result.returncode != 0 and "timeout" in result.stderr.lower()
    assert time.monotonic() - started < 45


def with_a_dead_host_first(database_url: str) -> str:
    """The same database as SQLAlchemy's multi-host query form, behind a host nobody listens on."""
    parsed = sa.engine.make_url(database_url)
    args = parsed.get_dialect()().create_connect_args(parsed)[1]
    user = f"{parsed.username}:{parsed.password}" if parsed.password else parsed.username
    hosts = f"host=127.0.0.1:{free_port()}&host={args.get('host', '127.0.0.1')}:{args.get('port', 5432)}"
    return f"postgresql://{user}@/{parsed.database}?{hosts}&target_session_attrs=read-write"


def test_commands_and_psql_take_the_multi_host_query_form(deliver, db, database_url):
    url = with_a_dead_host_first(database_url)
    deliver(load_payload("ping/payload.json"), "ping", delivery="multi-host")
    listed = cli("deliveries", DATABASE_URL=url)
    assert listed.returncode == 0, listed.stderr
    assert "multi-host" in listed.stdout
    # Passed to psql as a libpq URI, the repeated ?host= would be one host named `127.0.0.1:PORT`.
    shell = cli("db", "shell", "-At", "-c", "SELECT count(*) FROM webhook_deliveries", DATABASE_URL=url)
    assert (shell.returncode, shell.stdout.strip()) == (0, "1"), shell.stderr


# Characters a terminal acts on instead of showing (cli/terminal.py escapes them all).
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def test_values_from_outside_reach_no_terminal_raw(deliver, db, database_url):
    # ESC ] 0 ; … BEL sets a terminal's title; ESC [ 2 J clears it. The delivery and event
    # headers are ASCII, so they pass the header rules and reach the journal as sent.
    guid = "guid-\x1b]0;owned\x07-\x7f-end"
    assert deliver(load_payload("ping/payload.json"), "ping", delivery=guid).status_code == 200
    broken = json.dumps(dict(load_payload("pull_request/opened.payload.json"), pull_request=[1])).encode()
    assert deliver(broken, "pull_request", delivery="failed-\x1b[2J").status_code == 202

    shown = [
        cli("deliveries", DATABASE_URL=database_url),
        cli("deliveries", "--failed", DATABASE_URL=database_url),
        cli("replay", "--failed", DATABASE_URL=database_url),
        cli("status", DATABASE_URL=database_url),
    ]
    for result in shown:
        assert not RAW_CONTROL.search(result.stdout + result.stderr), (result.args, result.stdout, result.stderr)
    listed, failed, replayed, status = (r.stdout for r in shown)
    assert "guid-\\x1b]0;owned\\x07-\\x7f-end" in listed and "failed-\\x1b[2J" in listed
    assert "failed-\\x1b[2J" in failed and "failed-\\x1b[2J" in replayed + shown[2].stderr
    assert shown[3].returncode in (0, 1) and status


@pytest.mark.parametrize(
    "args",
    [
        ["--url", "http://a b/webhook"],
        ["--url", "http://[::1/webhook"],
        ["--url", "http://h:abc/webhook"],
        ["--delivery", "two\nlines"],
        ["--delivery", "caf\u00e9"],
        ["--url", "http://h/w\u00e9bhook"],
    ],
    ids=["space", "bracket", "port", "newline", "non_ascii", "non_ascii_url"],
)
def test_send_refuses_what_it_cannot_send_as_a_usage_error(args):
    result = cli("send", str(OPENED_FILE), "--event", "pull_request", *args, GITHUB_WEBHOOK_SECRET=SECRET)
    assert result.returncode == 2, result.stderr
    assert "unexpected" not in result.stderr and "Traceback" not in result.stderr


def test_status_refuses_a_deadline_that_is_no_number():
    result = cli("status", "--deadline", "nan")
    assert result.returncode == 2 and "is not a number of seconds" in result.stderr


def test_a_time_with_an_offset_postgresql_would_refuse_is_read_as_utc():
    assert Timestamp().convert("2026-01-01T00:00:00+23:59", None, None) == datetime(2025, 12, 31, 0, 1, tzinfo=UTC)
    with pytest.raises(click.BadParameter, match="out of range"):
        Timestamp().convert("0001-01-01T00:00:00+01:00", None, None)


def test_an_instance_record_naming_an_impossible_pid_is_no_instance(tmp_path):
    folder = tmp_path / INSTANCES
    folder.mkdir()
    (folder / "8000.json").write_text(json.dumps({"url": "http://127.0.0.1:8000", "pid": 10**30, "started": 0}))
    assert live_instances(tmp_path) == []
