"""`recover` and `backfill`: nothing missed, from GitHub's delivery logs and its REST API."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TextIO

import click

from flowlens_ingest.cli.arguments import DATABASE_HELP, Duration, Timestamp
from flowlens_ingest.cli.connect import github_client, load_settings, open_database
from flowlens_ingest.cli.output import NOT_DONE, fail, utc
from flowlens_ingest.names import repository_name

if TYPE_CHECKING:
    from flowlens_ingest.github.lease import Lease


def recover(since: timedelta, dry_run: bool, fetch: bool, wait: timedelta = timedelta(seconds=60)) -> int:
    """Compare GitHub's delivery logs with the journal and bring in what is missing (exit 0, 1 or 2)."""
    from flowlens_ingest.github.hooks import tried
    from flowlens_ingest.github.lease import Lease
    from flowlens_ingest.github.recover import Mode, Recoverer, hooks_to_read, retention
    from flowlens_ingest.github.recover_pass import PASS_LEASE_S

    settings = load_settings()
    if not settings.github_credentials:
        return fail(
            "no GitHub credential: set GITHUB_TOKEN (repository and organization hooks) or GITHUB_APP_ID and"
            " GITHUB_APP_PRIVATE_KEY (the App's webhook)"
        )
    database, _server = open_database(settings)
    hooks, skipped = hooks_to_read(settings, database)
    for reason in skipped:
        print(f"flowlens-ingest: skipped {reason}", file=sys.stderr)
    if not hooks and skipped:
        return fail("no hook this credential can read (the skipped ones above say what each needs)")
    if not hooks:
        from flowlens_ingest.github.hooks import no_hook_reason

        return fail(no_hook_reason(database))
    kept = retention(settings.github_api_url)
    if since > kept:
        print(
            f"flowlens-ingest: GitHub keeps delivery logs {kept.days} days: older deliveries are gone"
            " (`backfill` lands the current state)",
            file=sys.stderr,
        )
    mode: Mode = "dry_run" if dry_run else "fetch" if fetch else "redeliver"
    # One recoverer at a time across every VM: the scheduled pass's lease (a dry run changes nothing).
    lease = None if dry_run else Lease(database, "recover command", PASS_LEASE_S)
    if lease is not None and not _take(lease, wait):
        holder = lease.holder_now()
        who = holder.describe() if holder is not None else "another recoverer"
        return fail(
            f"recovery is running elsewhere: {who}; nothing was asked of GitHub."
            " Run recover again once it is done (or --wait longer)",
            NOT_DONE,
        )
    start = datetime.now(UTC) - since
    try:
        with github_client(settings, database) as client:
            recoverer = Recoverer(settings, database, client, keep=lease.keep if lease is not None else lambda: True)
            report = recoverer.run(lambda _hook: start, mode, hooks)
        # The command sets no checkpoint: hooks never checked that it read take their turn after the
        # others, so runs by hand go round them all (the scheduled pass moves only refused ones).
        tried(database, [hook.hook_id for hook in hooks if hook.hook_id is not None])
    finally:
        if lease is not None:
            lease.release()
    for path, why in report.unreadable:
        print(f"flowlens-ingest: cannot read {path}: {why}", file=sys.stderr)
    for path, why in report.cut:
        print(f"flowlens-ingest: log not read to the end: {path}: {why}", file=sys.stderr)
    if dry_run:
        for item in report.missing:
            print(
                f"{item.guid}  hook {item.hook_id}  {item.event:<20} {utc(item.delivered_at)}  {item.attempts} attempt(s)"
            )
    for name, why in report.failed:
        print(f"flowlens-ingest: not recovered: {name}: {why}", file=sys.stderr)
    for item, why in report.held:
        print(f"flowlens-ingest: held back: {item.name}: {why}", file=sys.stderr)
    if report.retry_at is not None:
        again = datetime.fromtimestamp(report.retry_at, UTC)
        print(f"flowlens-ingest: GitHub asked to wait: run recover again after {utc(again)}", file=sys.stderr)
    print(report.summary())
    if report.credential_refused and not report.hooks:
        return 2
    return 0 if report.complete else 1


def _take(lease: Lease, wait: timedelta) -> bool:
    """Take the lease, waiting for it up to `wait` (looking every 2 s); whether we hold it."""
    import time

    ends = time.monotonic() + wait.total_seconds()
    while not lease.take():
        left = ends - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(2.0, left))
    return True


def _progress(stream: TextIO) -> Callable[[int, int, str], None]:
    """Progress of a backfill on `stream`: a bar redrawn in place on a terminal, else a line every tenth."""
    terminal = stream.isatty()

    def show(done: int, total: int, what: str) -> None:
        if terminal:
            filled = 30 * done // max(total, 1)
            end = "\n" if done == total else ""
            # The carriage return alone: cli/terminal.py escapes one inside a line.
            stream.write("\r")
            stream.write(f"{what} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} pull requests{end}")
            stream.flush()
        elif done == total or done % max(total // 10, 1) == 0:
            print(f"flowlens-ingest: {what}: {done}/{total} pull requests", file=stream)

    return show


def backfill(repos: Sequence[str], state: str, since: datetime | None) -> int:
    """Land the current state of repositories through the webhook path (exit 0, 1 or 2)."""
    import threading

    from flowlens_ingest.github.backfill import Backfiller, BackfillStopped, RepositoryBusy
    from flowlens_ingest.github.errors import GitHubError

    settings = load_settings()
    if not settings.github_credentials:
        return fail("no GitHub credential: set GITHUB_TOKEN, or GITHUB_APP_ID and GITHUB_APP_PRIVATE_KEY")
    if not repos and not (settings.github_app_id and settings.github_app_private_key):
        return fail("name the repositories (OWNER/REPO ...): only a GitHub App can list its installations' own")
    database, _server = open_database(settings)
    stop = threading.Event()
    previous = {signum: signal.signal(signum, lambda _s, _f: stop.set()) for signum in (signal.SIGINT, signal.SIGTERM)}
    problems: list[str] = []
    try:
        # With the database: the waits GitHub gave the files worker or a recoverer hold here too.
        with github_client(settings, database) as client:
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
                except (GitHubError, RepositoryBusy) as exc:
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
    for pull in filler.tally.unreadable:
        print(f"flowlens-ingest: cannot read {pull}", file=sys.stderr)
    for listing in filler.tally.cut:
        print(f"flowlens-ingest: not read to the end: {listing}; what follows it was not landed", file=sys.stderr)
    print(filler.tally.summary())
    tally = filler.tally
    return 1 if problems or tally.failed or tally.unreadable or tally.cut else 0


# --- the commands (main.py adds them to `flowlens-ingest`) ------------------------------------


@click.command(
    "recover",
    epilog=DATABASE_HELP
    + """

\b
Credential and permissions:
  GitHub App (GITHUB_APP_ID + GITHUB_APP_PRIVATE_KEY or _FILE): the App's own webhook, read and
    redelivered with the App's JWT; no permission to grant.
  GITHUB_TOKEN: every repository or organization hook the journal has seen, and those listed in
    GITHUB_WEBHOOKS. Repository hooks need the repository permission Webhooks (read and write:
    a redelivery is a write); organization hooks the organization permission Webhooks (read and
    write). Classic token: admin:repo_hook, admin:org_hook. A fine-grained token reaches one
    owner's hooks: hooks of several owners need the App (or a classic token of an admin of each).
\b
One recoverer at a time: recover takes the scheduled pass's lease (waiting up to --wait), or says
who holds it and since when, and exits 1. GitHub's rate limits are a wall: a short wait (up to
2 minutes) is waited out; after a longer one nothing more is sent with that credential, and the
deliveries left are named ("held back") with the time to run again.
\b
Exit status: 0 when nothing is left missing; 1 when some could not be recovered or were held back
(named, a refusal with the permission GitHub wanted), when a log was not read to the end, when
another recoverer holds the lease, or, with --dry-run, when some are missing; 2 for usage or
credentials (none set, no hook known, the credential refused).
\b
Examples:
  flowlens-ingest recover --dry-run
  flowlens-ingest recover --since 24h
  flowlens-ingest recover --fetch          # GitHub cannot reach the service: ingest what its API shows
""",
)
@click.option(
    "--since",
    type=Duration(),
    default="72h",
    help="How far back to read the logs (github.com and GHE.com keep 3 days; GHES 7).",
)
@click.option("--dry-run", is_flag=True, help="List the missing deliveries (GUIDs); change nothing.")
@click.option(
    "--fetch",
    is_flag=True,
    help="Ingest the payload GitHub's API shows (journaled as the API's JSON) instead of asking for a redelivery.",
)
@click.option(
    "--wait",
    type=Duration(),
    default="60s",
    help="How long to wait for the recovery lease when another recoverer (a scheduled pass) holds it.",
)
def recover_command(since: timedelta, dry_run: bool, fetch: bool, wait: timedelta) -> int:
    """Bring in every delivery GitHub logged that the journal lacks, once each.

    Default: ask GitHub to redeliver each (signed, same GUID, through /webhook), one a
    second, obeying its rate limits, then wait for them in the journal. Ends with a summary line.
    """
    if dry_run and fetch:
        raise click.UsageError("--dry-run and --fetch cannot be used together")
    return recover(since, dry_run, fetch, wait)


def _repositories(_ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    for name in value:
        if repository_name(name) is None:
            raise click.BadParameter(f"{name!r}: use OWNER/REPO, like octo/app")
    return value


@click.command(
    "backfill",
    epilog=DATABASE_HELP
    + """

\b
Every snapshot goes through the webhook path (same mappers, same guards): newer webhook state is
never overwritten, and running it again changes and flags nothing. Progress on stderr; an
interrupted run resumes where it stopped.
\b
Credential and permissions:
  GitHub App (GITHUB_APP_ID + GITHUB_APP_PRIVATE_KEY or _FILE): each repository read with its
    installation's token; with no repository named, every installation's repositories.
  GITHUB_TOKEN: the repositories named.
  Repository permissions, read: Metadata, Pull requests, Checks, Commit statuses, and Contents
  for private repositories (the files jobs). Classic token: repo (public ones: public_repo).
\b
Exit status: 0 when everything landed; 1 when something did not, or a pull request GitHub would
not show (404, 410, 403) was skipped (each named: owner/repo#N and why); 2 for usage or credentials.
\b
Examples:
  flowlens-ingest backfill octo/app octo/lib
  flowlens-ingest backfill --state all --since 2026-01-01 octo/app
  flowlens-ingest backfill                  # GitHub App: every repository of every installation
""",
)
@click.argument("repositories", nargs=-1, metavar="[OWNER/REPO]...", callback=_repositories)
@click.option(
    "--state", type=click.Choice(["open", "all"]), default="open", help="Open pull requests, or closed ones too."
)
@click.option(
    "--since",
    type=Timestamp(),
    default=None,
    help="Only pull requests updated at or after TIME (ISO 8601; UTC if no zone).",
)
def backfill_command(repositories: tuple[str, ...], state: str, since: datetime | None) -> int:
    """Land the current state of repositories: pull requests, reviews, checks, statuses, and a files job per head.

    With no repository named, in GitHub App mode: every repository of every installation.
    """
    return backfill(repositories, state, since)
