"""`flowlens-ingest`: the command line (click); commands.py and serve.py do the work."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import datetime, timedelta

import click

from flowlens_ingest import __version__
from flowlens_ingest.cli import recovery
from flowlens_ingest.cli.arguments import DATABASE_HELP, Duration, HostPort, Seconds, Timestamp, duration_text
from flowlens_ingest.cli.commands import DEFAULT_URL, deliveries, enrich, prune, replay, send
from flowlens_ingest.cli.connect import NoDatabase, load_settings
from flowlens_ingest.cli.db import db_shell, db_upgrade
from flowlens_ingest.cli.output import NOT_DONE, fail
from flowlens_ingest.cli.serve import serve
from flowlens_ingest.cli.status import DEFAULT_DEADLINE_S as DEFAULT_STATUS_DEADLINE_S
from flowlens_ingest.cli.terminal import escaped_output
from flowlens_ingest.config import WORKERS, ConfigError, unknown_variables

# --- the command line -------------------------------------------------------------------------

# A prune window shorter than this needs --yes (see prune_command).
RECENT = timedelta(days=1)

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


@click.group(
    context_settings=CONTEXT,
    epilog="""\b
Environment (docs/operating.md, Configuration, has all of them):
  DATABASE_URL            PostgreSQL/YugabyteDB URL; unset: the embedded PostgreSQL
  GITHUB_WEBHOOK_SECRET   the webhook secret; unset: generated in FLOWLENS_DATA_DIR (embedded mode)
  FLOWLENS_DATA_DIR       embedded database, secret, spool, metrics, instances (default ./.flowlens)
  FLOWLENS_URL            where `send` posts

\b
Examples:
  flowlens-ingest serve                        # embedded database, http://127.0.0.1:8000/webhook
  flowlens-ingest send payload.json --event pull_request
  flowlens-ingest deliveries --failed
  flowlens-ingest replay --failed
  flowlens-ingest status                       # what needs action (exit 1 if anything does)
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
    type=click.IntRange(*WORKERS),
    default=None,
    show_default="FLOWLENS_WORKERS, else cores + 1",
    help="gunicorn worker processes.",
)
def serve_command(host: str, port: int, workers: int | None) -> int:
    """Run the service under gunicorn.

    With no DATABASE_URL: starts (and migrates) the embedded PostgreSQL in
    FLOWLENS_DATA_DIR and, with no GITHUB_WEBHOOK_SECRET, generates one there.
    With DATABASE_URL: uses it as is (migrate with `db upgrade`). Stops on
    TERM, INT or HUP (a closed terminal). While it runs, its URL is recorded in
    FLOWLENS_DATA_DIR/instances/PORT.json, where `send` finds it.
    """
    return serve(host, port, workers)


@cli.command(
    "enrich",
    epilog=DATABASE_HELP
    + """

\b
Credential and permissions:
  GitHub App (GITHUB_APP_ID + GITHUB_APP_PRIVATE_KEY or _FILE): a delivery's installation token;
  GITHUB_TOKEN: deliveries without an installation (repository webhooks).
  Repository permissions, read: Metadata, Pull requests, and Contents for private repositories.
  Classic token: repo (public ones: public_repo). GITHUB_API_URL for GitHub Enterprise Server.
\b
Exit status: 0 when stopped (TERM, INT) or, with --once, when no job is due; 1 on an unexpected
error; 2 for usage or credentials (none set). A failed job is no failure of the command: it is
retried, and --status shows it.
""",
)
@click.option("--once", is_flag=True, help="Work the due jobs, then exit.")
@click.option("--status", is_flag=True, help="Show the queue and recent errors, then exit.")
def enrich_command(once: bool, status: bool) -> int:
    """The files worker: fetch PR file lists from GitHub's API."""
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
    default=None,
    show_default="FLOWLENS_URL, else the longest running `serve` of FLOWLENS_DATA_DIR, else " + DEFAULT_URL,
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
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, help="At most this many (up to 100,000).")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of objects (for scripts) instead of text.")
def deliveries_command(failed: bool, limit: int, as_json: bool) -> int:
    """List recent deliveries from the journal, newest first (times in UTC)."""
    return deliveries(failed, limit, as_json)


@cli.command(
    "replay",
    epilog=DATABASE_HELP
    + """

\b
Examples:
  flowlens-ingest replay --failed
  flowlens-ingest replay --since 2026-11-28T10:00:00Z
  flowlens-ingest replay --failed --json
""",
)
@click.option("--failed", is_flag=True, help="Only deliveries that failed to apply.")
@click.option(
    "--since",
    type=Timestamp(),
    default=None,
    help="Only deliveries received at or after TIME (ISO 8601; UTC if no zone).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='One JSON object (for scripts) instead of text: {"replayed", "failed", "skipped_no_payload", "errors"}.',
)
def replay_command(failed: bool, since: datetime | None, as_json: bool) -> int:
    """Re-apply journaled deliveries (idempotent); all of them unless --failed or --since.

    Exit status: 0 when none failed; 1 when some did (the first ones named), or when the replay
    could not run or stopped (the database went away: run it again); 2 for a usage error.
    """
    if failed and since is not None:
        raise click.UsageError("--failed and --since cannot be used together")
    return replay(failed, since, as_json)


@cli.command(
    "prune",
    epilog=DATABASE_HELP
    + """

\b
Examples:
  flowlens-ingest prune --older-than 30d
  flowlens-ingest prune --older-than 7d --include-failed
  flowlens-ingest prune --older-than 12h --yes  (a window under 1d is asked for)
  flowlens-ingest prune --older-than 0d --yes   (the whole journal)
""",
)
@click.option(
    "--older-than",
    type=Duration(),
    required=True,
    help="Delete entries received before now minus this (30d, 12h, 90m, 3600s). Under 1d needs --yes.",
)
@click.option(
    "--include-failed", is_flag=True, help="Delete failed entries too (kept by default: they can be replayed)."
)
@click.option(
    "--yes",
    is_flag=True,
    help="Confirm an --older-than under 1d, which deletes recent entries too (0: every entry).",
)
def prune_command(older_than: timedelta, include_failed: bool, yes: bool) -> int:
    """Delete old journal entries, in short batches (progress on stderr).

    A window under a day needs --yes: the last day's entries are the ones a replay
    after a fix still needs, and such a window is more often a slip (30m for 30d)
    than a wish.
    """
    if not yes:
        if not older_than:
            raise click.UsageError("--older-than 0 deletes the whole journal; add --yes to do that")
        if older_than < RECENT:
            raise click.UsageError(
                f"--older-than {duration_text(older_than)} deletes entries of the last day too; add --yes to do that"
            )
    return prune(older_than, include_failed)


@cli.command(
    "status",
    epilog=DATABASE_HELP
    + """

\b
Exit status: 0 when nothing needs action, 1 when something does (the lines under NEEDS ACTION
say what, and which command shows more), 2 for a usage or configuration error.
What each threshold means and what to do: docs/alerts.md.
\b
Examples:
  flowlens-ingest status
  flowlens-ingest status --json | jq .needs_action
  flowlens-ingest status --deadline 5 || page-someone   # cron, or a deploy gate
""",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object (for scripts) instead of text.")
@click.option(
    "--deadline",
    type=Seconds(1, 300),
    default=DEFAULT_STATUS_DEADLINE_S,
    help="Seconds to answer in, whatever the database does (a database that has not answered by then is reported).",
)
def status_command(as_json: bool, deadline: float) -> int:
    """One screen for someone on call: database, deliveries, failed ones, spool, files queue, GitHub, recovery.

    Reads; never migrates, never creates a database, never changes anything.
    """
    from flowlens_ingest.cli.status_screen import status

    return status(load_settings(), json_output=as_json, deadline_s=deadline)


cli.add_command(recovery.recover_command)
cli.add_command(recovery.backfill_command)


@cli.command("nginx-conf")
@click.option("--listen", type=HostPort(), default="0.0.0.0:80", help="Where nginx listens.")
@click.option("--upstream", type=HostPort(), default="127.0.0.1:8000", help="Where gunicorn listens.")
def nginx_conf_command(listen: str, upstream: str) -> int:
    """Print the nginx upstream and server blocks that front the service (for nginx's http {})."""
    from flowlens_ingest.cli.nginx import nginx_conf

    print(nginx_conf(listen=listen, upstream=upstream, max_body_bytes=load_settings().max_body_bytes), end="")
    return 0


def _debugging() -> bool:
    """FLOWLENS_LOG_LEVEL is DEBUG: an unexpected error shows its traceback."""
    try:
        return load_settings().log_level == "DEBUG"
    except ConfigError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `flowlens-ingest` console script: an exit status, never a traceback."""
    args = list(argv) if argv is not None else sys.argv[1:]
    # Values from outside (GUIDs, names, GitHub's answers) reach no terminal raw.
    with escaped_output():
        for line in unknown_variables():
            print(f"flowlens-ingest: warning: {line}", file=sys.stderr)
        return _run(args)


def _run(args: list[str]) -> int:
    """Run the command line on `args`; an exit status, never a traceback."""
    try:
        result = cli.main(args=args, prog_name="flowlens-ingest", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        print(exc.format_message(), file=sys.stderr)
        return 2
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "flowlens-ingest"
        return fail(f"{exc.format_message()} (see `{where} --help`)")
    except click.ClickException as exc:
        fail(exc.format_message())
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        return 130
    except ConfigError as exc:
        return fail(str(exc))
    except NoDatabase as exc:
        return fail(str(exc), NOT_DONE)
    except Exception as exc:  # a bug or an environment we did not foresee: one line, not a traceback
        if _debugging():
            raise
        fail(f"unexpected {type(exc).__name__}: {exc} (FLOWLENS_LOG_LEVEL=DEBUG shows the traceback)")
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
