"""Backfill: the current state of repositories that existed before the service, through the webhook path.

For each repository: the repository itself, its pull requests (the list gives GitHub's simple pull
request, so each is read in full), their reviews, and the check runs (paged inside
`{total_count, check_runs}`) and combined commit status of each head. Every object becomes the
payload of the webhook that would carry it (snapshots) and goes through `ingest`: the same
mappers, the same guards, the same processing contract, and a files job per head. Its journal id is
a digest of its content, so a snapshot landed before is a `duplicate` and a second run changes and
flags nothing; an older snapshot than what webhooks stored is `stale` and overwrites nothing.

One request at a time with the files worker's client; a rate limit is waited out, and the worker's
reserve (FLOWLENS_ENRICH_RATE_RESERVE) is left to it. Resumable: per repository and scope, the
highest pull request number landed (`backfill_progress`). A pull request GitHub will not show (its
GET answers 404 or 410: deleted, transferred; or 403) is named, counted and skipped: the rest of
the repository lands, progress moves past it, and the run ends incomplete (exit 1).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from flowlens_ingest.config import Settings
from flowlens_ingest.events.delivery import Delivery
from flowlens_ingest.events.enums import Outcome
from flowlens_ingest.events.envelope import Envelope
from flowlens_ingest.events.parse import BadPayload
from flowlens_ingest.github import snapshots
from flowlens_ingest.github.client import GitHubClient, JsonAnswer
from flowlens_ingest.github.errors import Forbidden, GitHubError, NotFound, RateLimited, Transient
from flowlens_ingest.github.hooks import parse_time
from flowlens_ingest.github.lease import Lease
from flowlens_ingest.ingest import Disposition, ingest
from flowlens_ingest.names import repository_name
from flowlens_ingest.store.database import Database
from flowlens_ingest.store.schema import backfill_progress

log = logging.getLogger(__name__)

MAX_PAGES = 1000
# One backfill of a repository at a time, across processes and VMs: a lease per repository, renewed
# while the run works and waits (every third of it); a run that dies frees it this long after.
LEASE_S = 120.0
# A rate limit is waited out up to GitHub's hour; `stop` (Ctrl-C) ends the wait, and a rerun resumes.
RATE_LIMITS_PER_REQUEST = 5

Say = Callable[[str], None]


class BackfillStopped(Exception):
    """The backfill cannot go on (the database went away, GitHub kept limiting, stopped): rerun to resume."""


class RepositoryBusy(Exception):
    """Another backfill holds this repository (its lease): nothing is read twice; the message names who."""


@dataclass(frozen=True)
class Target:
    """A repository to backfill, and the App installation to read it through (None: the token)."""

    full_name: str
    installation_id: int | None = None


@dataclass
class Tally:
    """What one backfill landed: snapshots by outcome, those that failed, and the pull requests it could not read, named."""

    outcomes: dict[str, int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    # Listings not read to the end (a page bound, a `next` link back to a page read before), named.
    cut: list[str] = field(default_factory=list)
    pulls: int = 0

    def summary(self) -> str:
        """One line: pull requests read (and skipped), listings cut, snapshots by outcome."""
        counts = ", ".join(f"{n} {o}" for o, n in sorted(self.outcomes.items())) or "nothing"
        skipped = f", {len(self.unreadable)} skipped (GitHub would not show them)" if self.unreadable else ""
        cut = f", {len(self.cut)} listings not read to the end" if self.cut else ""
        return f"backfill: {self.pulls} pull requests read{skipped}{cut}; snapshots: {counts}"


class Backfiller:
    """Reads repositories from GitHub and lands them as webhook-shaped snapshots."""

    def __init__(
        self,
        settings: Settings,
        database: Database,
        client: GitHubClient,
        *,
        say: Say = lambda _line: None,
        progress: Callable[[int, int, str], None] = lambda _done, _total, _what: None,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.database = database
        self.client = client
        self.say = say
        self.progress = progress
        self.stop = stop or threading.Event()
        self._clock = clock
        self.tally = Tally()
        # The lease of the repository being backfilled (None between repositories).
        self._lease: Lease | None = None

    # -- requests -------------------------------------------------------------------------------

    def _request(self, path: str, *, installation_id: int | None = None, app: bool = False) -> JsonAnswer:
        """GET with the client, waiting out rate limits, and pausing while the worker's reserve is reached.

        Limits are per credential (budget.py): while GitHub's wait for this one holds, the client
        sends nothing, so waiting here costs no request. Each wait is bounded (an hour at most).
        Once `stop` is set (Ctrl-C, SIGTERM), no request is sent: BackfillStopped, and a rerun resumes.
        """
        for _ in range(RATE_LIMITS_PER_REQUEST):
            if self.stop.is_set():
                raise BackfillStopped("stopped")
            self._keep_lease()
            reset = (
                None
                if app
                else self.client.reserve_exhausted(self.settings.enrich_rate_reserve, installation_id=installation_id)
            )
            if reset is not None:
                self._wait(reset, "rate-limit reserve reached")
            try:
                return self.client.request_json("GET", path, installation_id=installation_id, app=app)
            except RateLimited as exc:
                self._wait(exc.retry_at, f"{exc.reason} rate limit ({exc.credential or 'credential'})")
        raise BackfillStopped(f"GitHub kept rate limiting at {path}; run backfill again later to resume")

    def _wait(self, until: float, why: str) -> None:
        seconds = max(0.0, until - self._clock())
        self.say(f"{why}: waiting {seconds:.0f} s (Ctrl-C stops; running backfill again resumes)")
        ends = time.monotonic() + seconds
        while (left := ends - time.monotonic()) > 0:
            # Woken every third of the lease to renew it: a wait of up to an hour keeps the repository.
            if self.stop.wait(min(left, LEASE_S / 3)):
                raise BackfillStopped("stopped")
            self._keep_lease()

    def _keep_lease(self) -> None:
        if self._lease is not None and not self._lease.keep():
            raise BackfillStopped("another backfill took this repository over (this one's lease lapsed)")

    def _pages(
        self, path: str, *, inside: str | None = None, installation_id: int | None = None, app: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Every item of a listing, page after page (`Link: rel="next"`), `inside` the key of a wrapping object.

        Ends cut (named in the tally) at MAX_PAGES or at a `next` link back to a page it read; a page
        that is not a list (nor a wrapper holding one) is no end of the listing: GitHubError.
        """
        url: str | None = path
        read: set[str] = set()
        while url is not None:
            if len(read) >= MAX_PAGES:
                self.tally.cut.append(f"{path}: stopped after {MAX_PAGES} pages")
                return
            asked = self.client.url_of(url)
            if asked in read:
                self.tally.cut.append(f"{path}: GitHub's next page is one read before")
                return
            read.add(asked)
            answer = self._request(url, installation_id=installation_id, app=app)
            data = answer.data.get(inside) if inside and isinstance(answer.data, dict) else answer.data
            if not isinstance(data, list):
                raise GitHubError(f"GitHub's page of {path} was not a list", reason="bad_json")
            items = [item for item in data if isinstance(item, dict)]
            yield from items
            url = answer.next_url if items else None

    # -- which repositories ---------------------------------------------------------------------

    def targets(self, named: list[str]) -> list[Target]:
        """The named repositories (App mode: each through its installation), or every installation's."""
        app = self.settings.github_app_id is not None and self.settings.github_app_private_key is not None
        if named:
            if not app:
                return [Target(name) for name in named]
            return [Target(name, self._installation_of(name)) for name in named]
        found = []
        for installation in self._pages("app/installations?per_page=100", app=True):
            number = installation.get("id")
            if isinstance(number, int):
                repos = self._pages(
                    "installation/repositories?per_page=100", inside="repositories", installation_id=number
                )
                found += [Target(r["full_name"], number) for r in repos if repository_name(r.get("full_name"))]
        return found

    def _installation_of(self, full_name: str) -> int | None:
        answer = self._request(f"repos/{_path(full_name)}/installation", app=True)
        number = answer.data.get("id") if isinstance(answer.data, dict) else None
        return number if isinstance(number, int) else None

    # -- one repository -------------------------------------------------------------------------

    def repository(self, target: Target, state: str, since: datetime | None) -> None:
        """Land one repository's current state, resuming after the pull requests a previous run landed.

        RepositoryBusy, sending nothing, while another backfill holds the repository.
        """
        lease = Lease(
            self.database, f"backfill {target.full_name}", LEASE_S, name=f"backfill {target.full_name.lower()}"
        )
        if not lease.take():
            holder = lease.holder_now()
            raise RepositoryBusy(f"another backfill holds it ({holder.describe() if holder else 'until a moment ago'})")
        self._lease = lease
        try:
            self._repository(target, state, since)
        finally:
            self._lease = None
            lease.release()

    def _repository(self, target: Target, state: str, since: datetime | None) -> None:
        inst = target.installation_id
        base = f"repos/{_path(target.full_name)}"
        repo = self._request(base, installation_id=inst).data
        if not isinstance(repo, dict):
            raise GitHubError("GitHub's repository answer was not an object", reason="bad_json")
        self._land("repository", {"action": "edited", "repository": repo}, target)
        scope = f"{state}|{since.isoformat() if since else ''}"
        done = self._done_through(target.full_name, scope)
        listing = f"{base}/pulls?state={state}&sort=created&direction=asc&per_page=100"
        cuts = len(self.tally.cut)
        numbers = sorted(
            {
                pr["number"]
                for pr in self._pages(listing, installation_id=inst)
                if isinstance(pr.get("number"), int) and _since(pr, since)
            }
        )
        listed_whole = len(self.tally.cut) == cuts
        for index, number in enumerate(numbers, 1):
            if number > done:
                if self._readable_pull(base, repo, number, target):
                    self.tally.pulls += 1
                self._record(target.full_name, scope, number)
            else:
                self.tally.pulls += 1
            self.progress(index, len(numbers), target.full_name)
        if listed_whole:
            # A listing cut short keeps its progress: a rerun lands nothing twice.
            self._forget(target.full_name, scope)

    def _readable_pull(self, base: str, repo: dict[str, Any], number: int, target: Target) -> bool:
        """Land one pull request; False when GitHub will not show it (named in the tally, skipped)."""
        try:
            self._pull(base, repo, number, target)
        except (NotFound, Forbidden, Transient) as exc:
            if exc.reason == "no_credential" or (isinstance(exc, Transient) and exc.reason != "too_deep"):
                raise
            why = (
                "deleted or transferred"
                if isinstance(exc, NotFound)
                else "no access"
                if isinstance(exc, Forbidden)
                else "an answer nested too deep to store"
            )
            self.tally.unreadable.append(f"{target.full_name}#{number}: {exc} ({why}); skipped")
            log.warning("backfill: a pull request cannot be read", extra={"pull": f"{target.full_name}#{number}"})
            return False
        return True

    def _pull(self, base: str, repo: dict[str, Any], number: int, target: Target) -> None:
        inst = target.installation_id
        pr = self._request(f"{base}/pulls/{number}", installation_id=inst).data
        if not isinstance(pr, dict):
            raise GitHubError("GitHub's pull request answer was not an object", reason="bad_json")
        self._land("pull_request", snapshots.pull_request(repo, pr, inst), target)
        head_ref = pr.get("head")
        head = head_ref.get("sha") if isinstance(head_ref, dict) else None
        if not isinstance(head, str) or not head:
            return
        for rest in self._pages(f"{base}/pulls/{number}/reviews?per_page=100", installation_id=inst):
            shaped = snapshots.review(repo, number, head, rest, inst)
            if shaped is not None:
                self._land("pull_request_review", shaped, target)
        for run in self._pages(
            f"{base}/commits/{head}/check-runs?per_page=100", inside="check_runs", installation_id=inst
        ):
            self._land("check_run", snapshots.check_run(repo, run, inst), target)
        # The combined status holds the latest status of each context, 100 a page at most; past
        # 100 contexts it pages (`page`, `Link`) like any list:
        # https://docs.github.com/en/rest/commits/statuses#get-the-combined-status-for-a-specific-reference
        for rest in self._pages(f"{base}/commits/{head}/status?per_page=100", inside="statuses", installation_id=inst):
            self._land("status", snapshots.status(repo, head, rest, inst), target)

    def _land(self, event: str, payload: dict[str, Any], target: Target) -> None:
        """Ingest one snapshot as a delivery (journal id from its content, body marked as the API's JSON)."""
        body = snapshots.body_of(payload)
        try:
            delivery = Delivery.parse(
                Envelope.from_api(delivery_id=snapshots.delivery_id(event, body), event=event), body
            )
        except BadPayload as exc:
            # GitHub's answer is no payload a delivery may carry (nested too deep): named, not landed.
            self.tally.failed.append(f"{target.full_name} {event}: GitHub's answer cannot be stored ({exc})")
            return
        result = ingest(
            self.database,
            delivery,
            store_payload=self.settings.store_payloads,
            compress=self.settings.journal_compression,
        )
        if result.disposition is not Disposition.DONE:
            raise BackfillStopped(
                f"the database did not take a snapshot ({result.error}); run backfill again to resume"
            )
        outcome = (result.outcome or Outcome.FAILED).value
        self.tally.outcomes[outcome] = self.tally.outcomes.get(outcome, 0) + 1
        if result.outcome is Outcome.FAILED:
            self.tally.failed.append(f"{target.full_name} {event} {delivery.delivery_id}: {result.error}")

    # -- progress -------------------------------------------------------------------------------

    def _done_through(self, full_name: str, scope: str) -> int:
        t = backfill_progress
        row = self.database.first(sa.select(t.c.done_through).where(t.c.full_name == full_name, t.c.scope == scope))
        return int(row.done_through) if row is not None else 0

    def _record(self, full_name: str, scope: str, number: int) -> None:
        t = backfill_progress
        stmt = insert(t).values(full_name=full_name, scope=scope, done_through=number)
        self.database.execute(
            stmt.on_conflict_do_update(
                index_elements=[t.c.full_name, t.c.scope],
                set_={"done_through": stmt.excluded.done_through, "updated_at": sa.func.now()},
            )
        )

    def _forget(self, full_name: str, scope: str) -> None:
        t = backfill_progress
        self.database.execute(sa.delete(t).where(t.c.full_name == full_name, t.c.scope == scope))


def _path(full_name: str) -> str:
    named = repository_name(full_name)
    if named is None:
        raise ValueError(f"not an OWNER/REPO name: {full_name!r}")
    return f"{quote(named[0], safe='')}/{quote(named[1], safe='')}"


def _since(pr: dict[str, Any], since: datetime | None) -> bool:
    """The pull request changed at or after `since` (every one when None)."""
    if since is None:
        return True
    updated = parse_time(pr.get("updated_at"))
    return updated is None or updated >= since
