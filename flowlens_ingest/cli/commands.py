"""What each `flowlens-ingest` command does (main.py is its command line): migrate, send, inspect, replay."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from flowlens_ingest.config import ConfigError, Settings, child_environment, instance_name

if TYPE_CHECKING:
    from flowlens_ingest.cli.admin import ReplayReport
    from flowlens_ingest.github.client import GitHubClient
    from flowlens_ingest.store.database import Database

GUNICORN_CONF = "python:flowlens_ingest.web.gunicorn_conf"
DEFAULT_URL = "http://127.0.0.1:8000/webhook"
# Outcomes after which GitHub would consider the delivery done; `send` exits 1 on any other.
SETTLED = frozenset({"applied", "ignored", "duplicate", "stale"})


def fail(message: str) -> int:
    """Say `message` on stderr as the command's one-line error; the exit code for it."""
    print(f"flowlens-ingest: {message}", file=sys.stderr)
    return 2


def counted(count: int, singular: str, plural: str) -> str:
    """`1 delivery`, `2 deliveries`, `0 deliveries`: a count with its noun agreeing."""
    return f"{count} {singular if count == 1 else plural}"


class NoDatabase(Exception):
    """An operator command found no usable database (none, unreachable, or not migrated)."""


def load_settings() -> Settings:
    """The environment's settings (ConfigError, one line and exit 2, for a value out of range)."""
    return Settings.from_env()


def github_client(settings: Settings) -> GitHubClient:
    """The files worker's GitHub client; ConfigError naming the variable when the App's key is unusable."""
    from flowlens_ingest.github.enrich import client_for

    try:
        return client_for(settings)
    except ValueError as exc:  # the key: Settings has checked everything else the client takes
        raise ConfigError(f"GITHUB_APP_PRIVATE_KEY (or _FILE): {exc}") from None


# --- operator commands ----------------------------------------------------------------------


def _require_embedded(settings: Settings) -> None:
    if not (settings.data_dir / "pgdata").is_dir():
        raise NoDatabase(
            f"no database: DATABASE_URL is not set and FLOWLENS_DATA_DIR ({settings.data_dir}) holds no"
            " embedded database (set FLOWLENS_DATA_DIR to the folder `serve` used)"
        )


def _database(settings: Settings) -> tuple[Database, object | None]:
    """The database of an operator command: DATABASE_URL, or the embedded database `serve` made.

    Never a new embedded database, and never a migration: run from the wrong folder,
    a new database would list an empty journal as if nothing had been received, and
    migrating is `db upgrade`'s job, not a side effect of reading.
    """
    import sqlalchemy as sa

    from flowlens_ingest.store import migrate
    from flowlens_ingest.store.database import Database

    server = None
    url = settings.database_url
    if not url:
        _require_embedded(settings)
        from flowlens_ingest.cli import embedded

        server, url = embedded.start(settings.data_dir, create=False)
    database = Database(settings, url, application_name="flowlens-ingest-admin")
    try:
        with database.bounded():
            problem = migrate.pending(database.engine)
    except sa.exc.SQLAlchemyError:
        raise NoDatabase("database unavailable") from None
    if problem:
        raise NoDatabase(problem)
    return database, server


def enrich(once: bool, status: bool) -> int:
    """The files worker: fetch queued PR file lists from GitHub until stopped (or, with --once, until idle)."""
    import threading

    from flowlens_ingest import logs
    from flowlens_ingest.github import jobs
    from flowlens_ingest.github.enrich import Enricher
    from flowlens_ingest.metrics import instruments

    settings = load_settings()
    if not status and not settings.github_credentials:
        return fail("no GitHub credential: set GITHUB_TOKEN, or GITHUB_APP_ID and GITHUB_APP_PRIVATE_KEY")
    database, _server = _database(settings)
    if status:
        queue = jobs.status(database)
        for label, count in sorted(queue.counts.items()):
            print(f"{label:<10} {count}")
        if queue.oldest_pending_s is not None:
            print(f"oldest pending job: {queue.oldest_pending_s:.0f} s")
        for row in jobs.recent_errors(database):
            print(f"{row.full_name}#{row.pr_number} {row.head_sha[:12]} {row.state}/{row.result}: {row.last_error}")
        return 0
    logs.configure(settings)
    enricher = Enricher(settings, database, github_client(settings), instruments())
    if once:
        while enricher.run_once():
            pass
        return 0
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    enricher.run(stop)
    return 0


def db_upgrade(revision: str) -> int:
    """alembic upgrade on DATABASE_URL, or on the embedded database."""
    import sqlalchemy as sa
    from alembic.util import CommandError

    from flowlens_ingest.store import migrate

    settings = load_settings()
    url = settings.database_url
    server = None
    where = "DATABASE_URL"
    if not url:
        from flowlens_ingest.cli import embedded

        # Run from the wrong folder, this must not make a new database: `serve` makes it.
        _require_embedded(settings)
        server, url = embedded.start(settings.data_dir)
        where = f"the embedded database in {settings.data_dir / 'pgdata'}"
    try:
        before = _revision(url)
        command = migrate.release(url, revision)
        after = _revision(url)
    except CommandError as exc:
        return fail(f"cannot upgrade to {revision!r}: {exc}")
    except sa.exc.OperationalError:
        return fail(f"database unavailable ({where}); nothing migrated")
    if server is not None:
        server.close()
    print(f"flowlens-ingest: {where} {_upgraded(revision, before, after)}")
    if command is not None:
        print(
            "flowlens-ingest: this role may not keep its failing statements' text (payload values) out of"
            f" the server log; have an administrator run:\n  {command}",
            file=sys.stderr,
        )
    return 0


def _revision(url: str) -> str | None:
    """The database's alembic revision (None: never migrated)."""
    import sqlalchemy as sa

    from flowlens_ingest.store import migrate

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        return migrate.revisions(engine)[0]
    finally:
        engine.dispose()


def _upgraded(asked: str, before: str | None, after: str | None) -> str:
    """What `db upgrade` did, from the revisions before and after it."""
    from flowlens_ingest.store import migrate

    def name(revision: str | None) -> str:
        return f"{revision} (head)" if revision is not None and revision == migrate.head() else str(revision)

    if before != after:
        start = f"revision {before}" if before is not None else "no revision (never migrated)"
        return f"upgraded from {start} to {name(after)}"
    if asked not in ("head", "heads", after):
        # Asked for an older revision: upgrade never goes down (alembic does nothing).
        return f"already at {name(after)}, past {asked}: nothing to do (db upgrade never downgrades)"
    return f"already at {name(after)}, nothing to do"


def _libpq(url: str) -> tuple[str, dict[str, str]]:
    """A SQLAlchemy URL as a libpq one for psql, its password moved to PGPASSWORD (not in `ps`)."""
    import sqlalchemy as sa

    parsed = sa.engine.make_url(url)
    env = {"PGPASSWORD": parsed.password} if parsed.password else {}
    plain = parsed.set(drivername="postgresql", password=None)
    return plain.render_as_string(hide_password=False), env


def db_shell(arguments: Sequence[str]) -> int:
    """psql on DATABASE_URL, or on the embedded database with the psql bundled with it."""
    import shutil

    settings = load_settings()
    server = None
    if settings.database_url:
        url = settings.database_url
        psql = shutil.which("psql")
        if psql is None:
            try:
                from flowlens_ingest.cli import embedded

                psql = str(embedded.psql_path())
            except ConfigError:
                return fail("psql not found: install PostgreSQL's client (e.g. apt install postgresql-client)")
    else:
        _require_embedded(settings)
        from flowlens_ingest.cli import embedded

        server, url = embedded.start(settings.data_dir, create=False)
        psql = str(embedded.psql_path())
    dsn, extra = _libpq(url)
    # Ctrl-C belongs to psql (it cancels the query), not to us.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = subprocess.call([psql, dsn, *arguments], env=child_environment(**extra))
    finally:
        signal.signal(signal.SIGINT, previous)
    if server is not None:
        server.close()
    return code


# --- where the running `serve`s are -------------------------------------------------------------

# Each `serve` records where it listens in FLOWLENS_DATA_DIR/instances/PORT.json (one file per
# port, like its metrics folder) while it runs, so that `send` finds one without being told
# its port. A record is written whole or not at all, and removed by the `serve` that wrote it
# when it stops; a record left by one that died (kill -9, a crash, a reboot) names a pid that
# no longer runs, and is never used: `send` removes it.
INSTANCES = "instances"
# How long `send` waits for a recorded instance's /healthz before passing it over.
HEALTH_CHECK_S = 1.0


@dataclass(frozen=True)
class Instance:
    """A running `serve`, as its record says: its webhook URL, its pid, when it started."""

    url: str
    pid: int
    started: float


def instance_record(data_dir: Path, bind: str) -> Path:
    """The record of the `serve` listening on `bind` in this data directory."""
    return data_dir / INSTANCES / f"{instance_name(bind)}.json"


def record_instance(path: Path, url: str) -> Instance:
    """Record this process as the instance serving `url`: written aside, then renamed into place."""
    instance = Instance(url=url, pid=os.getpid(), started=time.time())
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{instance.pid}")  # not *.json: never read half written
    partial.write_text(json.dumps(vars(instance)) + "\n")
    os.replace(partial, path)
    return instance


def forget_instance(path: Path, instance: Instance) -> None:
    """Remove `instance`'s record, unless another instance on the same port has replaced it since."""
    _remove_if_unchanged(path, instance)


def _read_instance(path: Path) -> Instance | None:
    try:
        record = json.loads(path.read_text())
        return Instance(url=str(record["url"]), pid=int(record["pid"]), started=float(record["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remove_if_unchanged(path: Path, seen: Instance | None) -> None:
    try:
        if _read_instance(path) == seen:
            path.unlink()
    except OSError:
        pass  # gone already, or not ours to remove


def _running(pid: int) -> bool:
    """Whether process `pid` runs; a zombie (dead, not yet reaped by its parent) does not."""
    if pid <= 0:  # kill(0) and kill(-1) would ask about whole groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill's word stands
    return state != "Z"


def _answers(url: str) -> bool:
    """Whether the service whose webhook is `url` answers /healthz within HEALTH_CHECK_S."""
    import urllib.request

    if not url.startswith("http://"):
        return False
    health = url.removesuffix("/webhook") + "/healthz"
    # Straight to it: a proxy from the environment has no business with a local instance.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(health, timeout=HEALTH_CHECK_S) as response:
            return bool(response.status == 200)
    except (OSError, ValueError):
        return False


def live_instances(data_dir: Path) -> list[Instance]:
    """The `serve`s recorded in `data_dir` that run and answer, longest running first.

    The record of a `serve` that no longer runs is removed. One whose pid runs but whose
    address does not answer (stopping, or its pid reused since a reboot) is passed over.
    """
    live = []
    for path in sorted((data_dir / INSTANCES).glob("*.json")):
        instance = _read_instance(path)
        if instance is None or not _running(instance.pid):
            _remove_if_unchanged(path, instance)
            continue
        if _answers(instance.url):
            live.append(instance)
    return sorted(live, key=lambda i: (i.started, i.url))


def _default_url(settings: Settings) -> str:
    """Where `send` posts: the longest running live `serve` of the data directory, else port 8000."""
    live = live_instances(settings.data_dir)
    if not live:
        return DEFAULT_URL
    chosen, *others = live
    if others:
        print(
            f"flowlens-ingest: {counted(len(live), 'instance', 'instances')} serve FLOWLENS_DATA_DIR"
            f" ({settings.data_dir}): sending to {chosen.url}, the longest running"
            f" (--url for another: {', '.join(i.url for i in others)})",
            file=sys.stderr,
        )
    return chosen.url


def send(file: str, event: str, url: str | None, delivery: str | None) -> int:
    """Sign a payload file with the service's secret and POST it like GitHub; 0 on a 2xx that settled it."""
    import urllib.error
    import urllib.request

    from flowlens_ingest.events.signature import sign

    settings = load_settings()
    secret = settings.secrets[0] if settings.secrets else None
    if secret is None:
        path = settings.data_dir / "webhook-secret"
        if not path.exists():
            return fail(
                f"GITHUB_WEBHOOK_SECRET is not set and FLOWLENS_DATA_DIR ({settings.data_dir}) holds no"
                " webhook-secret: set one, or FLOWLENS_DATA_DIR to the folder `serve` used"
            )
        secret = path.read_text().strip().encode()
    url = url or settings.send_url or _default_url(settings)
    if not url.startswith(("http://", "https://")):
        return fail(f"--url must be an http:// or https:// URL, got {url!r}")
    try:
        body = Path(file).read_bytes()
    except OSError as exc:
        return fail(f"cannot read {file}: {exc.strerror}")
    request = urllib.request.Request(  # noqa: S310 (the scheme is checked above)
        url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "GitHub-Hookshot/flowlens-send",
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
            "X-Hub-Signature-256": sign(body, secret),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=15) as response:  # noqa: S310
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    except urllib.error.URLError as exc:
        return fail(f"cannot reach {url}: {exc.reason}")
    except OSError as exc:  # a timeout or a reset connection while reading the answer
        return fail(f"no answer from {url}: {exc}")
    print(f"{status} {text.strip()}")
    try:
        outcome = json.loads(text).get("outcome")
    except (ValueError, AttributeError):
        outcome = None
    # A 202 `failed` or `spooled` is accepted, not applied: a script must not take it for done.
    return 0 if 200 <= status < 300 and outcome in SETTLED else 1


def _utc(moment: datetime) -> str:
    """UTC, ISO 8601 with its zone: the form `replay --since` takes."""
    return f"{moment.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"


def deliveries(failed: bool, limit: int, as_json: bool = False) -> int:
    """List the journal, newest first: a line each, or (as_json) one JSON array."""
    import sqlalchemy as sa

    from flowlens_ingest.cli.admin import list_deliveries

    database, _server = _database(load_settings())
    try:
        rows = list_deliveries(database, failed_only=failed, limit=limit)
    except sa.exc.OperationalError:
        return fail("database unavailable")
    if as_json:
        entries = [dict(row._mapping, received_at=_utc(row.received_at)) for row in rows]
        print(json.dumps(entries))
        return 0
    for row in rows:
        line = f"{_utc(row.received_at)} {row.delivery_id} {row.event}"
        line += f"/{row.action}" if row.action else ""
        line += f" {row.outcome} attempts={row.attempts}"
        line += f" error={row.error}" if row.error else ""
        print(line)
    print(f"({counted(len(rows), 'delivery', 'deliveries')})", file=sys.stderr)
    return 0


def replay(failed: bool, since: datetime | None, as_json: bool = False) -> int:
    """Re-apply journaled deliveries; a summary (or, as_json, one JSON object); exit 1 if any failed."""
    import sqlalchemy as sa

    from flowlens_ingest.cli.admin import ReplayReport
    from flowlens_ingest.cli.admin import replay as replay_journal
    from flowlens_ingest.store.database import DatabaseUnavailable

    database, _server = _database(load_settings())
    try:
        report = replay_journal(database, failed_only=failed, since=since)
    except (DatabaseUnavailable, sa.exc.OperationalError):
        report = ReplayReport(stopped="database unavailable")
    if report.stopped is not None:
        # Every delivery replayed so far is committed, and replaying again is idempotent.
        return fail(f"{report.stopped}; run the replay again once it is back")
    if as_json:
        print(json.dumps({k: v for k, v in vars(report).items() if k != "stopped"}))
    else:
        print(_replay_summary(report))
    return 0 if report.failed == 0 else 1


def _replay_summary(report: ReplayReport) -> str:
    """What a replay did, in a line, then a line per delivery that failed (the first ones)."""
    line = f"flowlens-ingest: replayed {counted(report.replayed, 'delivery', 'deliveries')}, {report.failed} failed"
    if report.skipped_no_payload:
        line += f", {report.skipped_no_payload} skipped (journaled without a payload)"
    lines = [line, *(f"  failed {error}" for error in report.errors)]
    if report.failed > len(report.errors):
        lines.append(
            f"  and {report.failed - len(report.errors)} more: `flowlens-ingest deliveries --failed` lists them"
        )
    return "\n".join(lines)


def prune(older_than: timedelta, include_failed: bool) -> int:
    """Delete old journal entries, showing progress on stderr."""
    import sqlalchemy as sa

    from flowlens_ingest.cli.admin import prune as prune_journal
    from flowlens_ingest.store.database import TIMEOUT_SQLSTATES, DatabaseUnavailable

    settings = load_settings()
    database, _server = _database(settings)
    interactive = sys.stderr.isatty()

    def progress(removed: int) -> None:
        # On a terminal one line rewritten in place; in a log, a line per batch.
        line = f"flowlens-ingest: pruned {removed} so far"
        if interactive:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    try:
        removed = prune_journal(database, older_than, include_failed=include_failed, progress=progress)
    except DatabaseUnavailable as exc:
        # The reason is the SQLSTATE: a batch that outlived the statement (or lock) timeout
        # is not an outage, and the operator's fix for it is not to wait for the database.
        if str(exc) in TIMEOUT_SQLSTATES:
            return fail(
                f"the database's statement timeout ({settings.statement_timeout_ms} ms) cut a prune batch;"
                " what is pruned so far stays pruned; retry, or raise FLOWLENS_STATEMENT_TIMEOUT_MS"
            )
        return fail("database unavailable; what is pruned so far stays pruned, run it again")
    except sa.exc.OperationalError:
        return fail("database unavailable; what is pruned so far stays pruned, run it again")
    finally:
        if interactive:
            print(file=sys.stderr)
    print(f"flowlens-ingest: pruned {counted(removed, 'journal entry', 'journal entries')}")
    return 0


def recover(since: timedelta, dry_run: bool, fetch: bool) -> int:
    """Compare GitHub's delivery logs with the journal and bring in what is missing (exit 0, 1 or 2)."""
    from flowlens_ingest.github.recover import Mode, Recoverer, hooks_to_read, retention

    settings = load_settings()
    if not settings.github_credentials:
        return fail(
            "no GitHub credential: set GITHUB_TOKEN (repository and organization hooks) or GITHUB_APP_ID and"
            " GITHUB_APP_PRIVATE_KEY (the App's webhook)"
        )
    database, _server = _database(settings)
    hooks, skipped = hooks_to_read(settings, database)
    for reason in skipped:
        print(f"flowlens-ingest: skipped {reason}", file=sys.stderr)
    if not hooks:
        return fail("no hook to read: none has delivered yet; list them in GITHUB_WEBHOOKS (repos/OWNER/REPO/hooks/ID)")
    kept = retention(settings.github_api_url)
    if since > kept:
        print(
            f"flowlens-ingest: GitHub keeps delivery logs {kept.days} days: older deliveries are gone"
            " (`backfill` lands the current state)",
            file=sys.stderr,
        )
    start = datetime.now(UTC) - since
    mode: Mode = "dry_run" if dry_run else "fetch" if fetch else "redeliver"
    with github_client(settings) as client:
        report = Recoverer(settings, database, client).run(lambda _hook: start, mode, hooks)
    for path, why in report.unreadable:
        print(f"flowlens-ingest: cannot read {path}: {why}", file=sys.stderr)
    if dry_run:
        for item in report.missing:
            print(
                f"{item.guid}  hook {item.hook_id}  {item.event:<20} {_utc(item.delivered_at)}  {item.attempts} attempt(s)"
            )
    for name, why in report.failed:
        print(f"flowlens-ingest: not recovered: {name}: {why}", file=sys.stderr)
    print(report.summary())
    if report.credential_refused and not report.hooks:
        return 2
    return 0 if report.complete else 1


def _progress(stream: TextIO) -> Callable[[int, int, str], None]:
    """Progress of a backfill on `stream`: a bar redrawn in place on a terminal, else a line every tenth."""
    terminal = stream.isatty()

    def show(done: int, total: int, what: str) -> None:
        if terminal:
            filled = 30 * done // max(total, 1)
            end = "\n" if done == total else ""
            stream.write(f"\r{what} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} pull requests{end}")
            stream.flush()
        elif done == total or done % max(total // 10, 1) == 0:
            print(f"flowlens-ingest: {what}: {done}/{total} pull requests", file=stream)

    return show


def backfill(repos: Sequence[str], state: str, since: datetime | None) -> int:
    """Land the current state of repositories through the webhook path (exit 0, 1 or 2)."""
    import threading

    from flowlens_ingest.github.backfill import Backfiller, BackfillStopped
    from flowlens_ingest.github.errors import GitHubError

    settings = load_settings()
    if not settings.github_credentials:
        return fail("no GitHub credential: set GITHUB_TOKEN, or GITHUB_APP_ID and GITHUB_APP_PRIVATE_KEY")
    if not repos and not (settings.github_app_id and settings.github_app_private_key):
        return fail("name the repositories (OWNER/REPO ...): only a GitHub App can list its installations' own")
    database, _server = _database(settings)
    stop = threading.Event()
    previous = {signum: signal.signal(signum, lambda _s, _f: stop.set()) for signum in (signal.SIGINT, signal.SIGTERM)}
    problems: list[str] = []
    try:
        with github_client(settings) as client:
            filler = Backfiller(
                settings,
                database,
                client,
                say=lambda line: print(f"flowlens-ingest: {line}", file=sys.stderr),
                progress=_progress(sys.stderr),
                stop=stop,
            )
            try:
                targets = filler.targets(list(repos))
            except GitHubError as exc:
                return fail(f"cannot list the repositories to backfill: {exc}")
            for target in targets:
                try:
                    filler.repository(target, state, since)
                except GitHubError as exc:
                    problems.append(f"{target.full_name}: {exc}")
    except BackfillStopped as exc:
        print(f"flowlens-ingest: backfill stopped: {exc}", file=sys.stderr)
        print(filler.tally.summary())
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for problem in problems + filler.tally.failed:
        print(f"flowlens-ingest: not landed: {problem}", file=sys.stderr)
    print(filler.tally.summary())
    return 1 if problems or filler.tally.failed else 0
