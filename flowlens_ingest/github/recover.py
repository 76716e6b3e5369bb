"""Recovering missed deliveries: each hook's delivery log on GitHub, compared with the journal.

GitHub never retries a failed delivery and keeps each hook's log for 3 days on github.com and GHE.com
(data residency), 7 on GHES:
https://docs.github.com/en/webhooks/using-webhooks/handling-failed-webhook-deliveries. A run
reads the logs newest first (cursor pages in `Link`), compares each page with the journal at once
(only what the journal lacks is kept, one entry per GUID), and brings in every `(GUID, hook)` it
lacks, once however many attempts it has: redelivered by GitHub (signed, same GUID, through
/webhook, so the journal keeps its exact bytes), or with `fetch` shown by the API and ingested
here, journaled with `body_from_api`. One request at a time, POSTs at most about one a second.

GitHub's limits are a wall (budget.py): a short wait is waited out (up to MAX_RATE_WAIT_S); a longer
one stops every request with that credential, and what it would have brought in is named as held
back, with the time GitHub gave (`Report.retry_at`). A run is bounded: pages read per hook, missing
deliveries held, requests sent, wall time (`Bounds`), and the lease it holds (`keep`); what a bound
left unread or unsent is said (`Report.cut`, `Report.held`), never skipped in silence. A log entry
GitHub's API would not send (a time without its UTC offset, an id that is no id) is skipped and
counted, never fatal. Every wait has a deadline, and no transaction is open across a call.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal
from urllib.parse import urlsplit

from flowlens_ingest.config import Settings
from flowlens_ingest.events import parse
from flowlens_ingest.events.delivery import Delivery
from flowlens_ingest.events.envelope import Caseless, Envelope
from flowlens_ingest.events.hooks import header_number
from flowlens_ingest.github.client import DEFAULT_API_URL, GitHubClient, JsonAnswer
from flowlens_ingest.github.errors import Forbidden, GitHubError, NotFound, NotSent, RateLimited, Unauthorized
from flowlens_ingest.github.hooks import Hook, LogEntry, hooks_to_read, journaled, log_entry
from flowlens_ingest.ingest import Disposition, ingest
from flowlens_ingest.metrics import Metrics
from flowlens_ingest.store.database import Database

log = logging.getLogger(__name__)

# How long GitHub keeps a hook's delivery log: 3 days on github.com and GitHub Enterprise Cloud,
# with data residency too (its API at api.SUBDOMAIN.ghe.com), 7 on GitHub Enterprise Server
# (github/docs, data/variables/webhooks.yml: `retention`, 3 for fpt and ghec, else 7).
RETENTION_GITHUB = timedelta(days=3)
RETENTION_GHES = timedelta(days=7)
GHE_COM = ".ghe.com"
# GitHub asks for at least a second between mutating requests (secondary rate limits):
# https://docs.github.com/en/rest/using-the-rest-api/best-practices-for-using-the-rest-api
PACE_S = 1.0
# A rate limit asking for a longer wait stops every request with that credential: the rest are named.
MAX_RATE_WAIT_S = 120.0
RATE_LIMITS_PER_REQUEST = 5
# How long redeliveries are waited for in the journal once requested, polled this often.
SETTLE_S = 60.0
POLL_S = 0.25
# 100 deliveries a page: 300 pages (30,000 attempts) is more than a busy hook logs in GitHub's 3 days.
MAX_LOG_PAGES = 300
# GitHub's largest page of a delivery log.
PER_PAGE = 100
# Missing deliveries held in memory at once (each a few hundred bytes): reading a hook stops there.
MAX_HELD = 20_000

Mode = Literal["redeliver", "fetch", "dry_run"]
__all__ = ["Bounds", "Hook", "Missing", "Mode", "Recoverer", "Report", "Resume", "hooks_to_read", "retention"]


def retention(api_url: str) -> timedelta:
    """How long GitHub keeps delivery logs at this API: 3 days on github.com and GHE.com, 7 on Enterprise Server."""
    host = (urlsplit(api_url).hostname or "").lower()
    cloud = api_url.rstrip("/") == DEFAULT_API_URL or (host.startswith("api.") and host.endswith(GHE_COM))
    return RETENTION_GITHUB if cloud else RETENTION_GHES


def permission_needed(hook: Hook) -> str:
    """The credential and permission that reads (and redelivers from) this hook's delivery log."""
    if hook.app:
        return "the GitHub App's own key (GITHUB_APP_ID and its private key): its JWT reads its webhook"
    kind, owner = hook.path.split("/")[:2]
    if kind == "orgs":
        return (
            f"GITHUB_TOKEN with the organization permission Webhooks (read and write) on {owner}"
            " (classic token: admin:org_hook, by an owner of the organization)"
        )
    repo = hook.path.split("/")[2]
    return (
        f"GITHUB_TOKEN with the repository permission Webhooks (read and write) on {owner}/{repo}"
        " (classic token: admin:repo_hook)"
    )


def refusal(hook: Hook, exc: GitHubError) -> str:
    """Why a hook's log could not be read; when GitHub refused (403, 404), the permission it takes.

    A fine-grained token reaches the resources of one owner, and GitHub answers 404 for what it
    cannot see: https://docs.github.com/en/rest/authentication/permissions-required-for-fine-grained-personal-access-tokens
    """
    if not isinstance(exc, NotFound | Forbidden) or exc.reason == "no_credential":
        return str(exc)
    if hook.app:
        return f"{exc}: reading it needs {permission_needed(hook)}"
    owner = hook.path.split("/")[1]
    return (
        f"{exc}: GitHub would not show this hook's log (the hook may be gone); reading it needs"
        f" {permission_needed(hook)}. A fine-grained token reaches one owner's hooks: is {owner} its resource"
        " owner? Hooks of several owners need the GitHub App, or a classic token of an admin of each"
    )


@dataclass(frozen=True)
class Bounds:
    """What one run may do: log pages per hook (of `per_page`), missing deliveries held, redeliveries or fetches, wall time (s)."""

    pages: int = MAX_LOG_PAGES
    held: int = MAX_HELD
    per_page: int = PER_PAGE
    recoveries: int | None = None
    seconds: float | None = None


@dataclass(frozen=True)
class Missing:
    """A delivery GitHub logged for a hook that the journal lacks; `log_id` is its newest attempt."""

    guid: str
    hook: Hook
    hook_id: int
    log_id: int
    event: str
    delivered_at: datetime
    attempts: int

    @property
    def name(self) -> str:
        """How the delivery is named to an operator: GUID, hook and event."""
        return f"{self.guid} (hook {self.hook_id}, {self.event})"


@dataclass(frozen=True)
class Resume:
    """Where the last pass stopped reading a hook's log: its next page (`url`), having read what is `newer_than`."""

    url: str
    newer_than: datetime


@dataclass
class _Reading:
    """One hook's log as it is read: its id (once known), pages read, the missing deliveries kept."""

    hook: Hook
    hook_id: int | None = None
    pages: int = 0
    lacking: dict[str, tuple[LogEntry, int]] = field(default_factory=dict)
    # The pages' URLs asked for, so that a `next` link back to one of them ends the reading.
    urls: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.hook_id = self.hook.hook_id


class Interrupted(GitHubError):
    """The run must send nothing more: its wall time is spent, its lease lost, or it was stopped."""


@dataclass
class Report:
    """What a run found and did, and what it left: held back (named), logs not read to the end, entries skipped."""

    mode: Mode
    hooks: int = 0
    listed: int = 0
    missing: list[Missing] = field(default_factory=list)
    recovered: list[Missing] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    # Missing deliveries not asked for: a credential GitHub told to wait, a bound reached.
    held: list[tuple[Missing, str]] = field(default_factory=list)
    # Hooks whose log was not read back to where it should have been, and why.
    cut: list[tuple[str, str]] = field(default_factory=list)
    malformed: int = 0
    # Per hook in `cut`: the next page's URL, where the next pass goes on.
    resume: dict[str, str] = field(default_factory=dict)
    credential_refused: bool = False
    # The earliest time a credential GitHub told to wait may be used again (epoch seconds).
    retry_at: float | None = None

    @property
    def complete(self) -> bool:
        """Nothing is left missing: every log read, every missing delivery brought in."""
        left = self.missing if self.mode == "dry_run" else [name for name, _ in self.failed]
        return not left and not self.unreadable and not self.held and not self.cut

    def limited(self, exc: RateLimited) -> None:
        """Remember the time GitHub gave a credential that stopped this run."""
        self.retry_at = exc.retry_at if self.retry_at is None else min(self.retry_at, exc.retry_at)

    def summary(self) -> str:
        """The one line a run ends with."""
        done = "redelivered" if self.mode == "redeliver" else "fetched"
        what = "left to recover" if self.mode == "dry_run" else f"{len(self.recovered)} {done}, {len(self.failed)} not"
        hooks = f"{self.hooks} hook{'' if self.hooks == 1 else 's'} read"
        unreadable = f", {len(self.unreadable)} unreadable" if self.unreadable else ""
        cut = f", {len(self.cut)} not read to the end" if self.cut else ""
        held = f", {len(self.held)} held back for the next run" if self.held else ""
        malformed = f", {self.malformed} malformed log entries skipped" if self.malformed else ""
        return (
            f"recover: {hooks}{unreadable}{cut}, {self.listed} delivery attempts logged{malformed},"
            f" {len(self.missing)} missing ({what}{held})"
        )


class Recoverer:
    """Compares hooks' delivery logs with the journal and brings in what is missing, within its bounds."""

    def __init__(
        self,
        settings: Settings,
        database: Database,
        client: GitHubClient,
        *,
        metrics: Metrics | None = None,
        pace_s: float = PACE_S,
        settle_s: float = SETTLE_S,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.time,
        bounds: Bounds = Bounds(),
        keep: Callable[[], bool] = lambda: True,
    ) -> None:
        self.settings = settings
        self.database = database
        self.client = client
        self.metrics = metrics
        self.pace_s = pace_s
        self.settle_s = settle_s
        self.stop = stop or threading.Event()
        self._clock = clock
        self.bounds = bounds
        # Renews the lease the run holds; False once another recoverer holds it: send nothing more.
        self.keep = keep
        self._ends = None if bounds.seconds is None else time.monotonic() + bounds.seconds
        self._last_post = 0.0
        # Learned while reading (the App hook's id): the scheduled pass records it.
        self.learned: dict[str, int] = {}
        # Credentials GitHub told to wait longer than we wait, or whose waits could not be read:
        # nothing more is sent with them this run.
        self._walled: dict[str, RateLimited | NotSent] = {}

    def run(
        self,
        since_for: Callable[[Hook], datetime],
        mode: Mode,
        hooks: list[Hook],
        resume_for: Callable[[Hook], Resume | None] = lambda _hook: None,
    ) -> Report:
        """Read each hook's log back to `since_for(hook)` (going on at `resume_for(hook)`), then redeliver, fetch, or only list what is missing."""
        report = Report(mode)
        for hook in hooks:
            try:
                report.missing += self.missing(hook, since_for(hook), report, resume_for(hook))
                report.hooks += 1
            except GitHubError as exc:
                if isinstance(exc, RateLimited):
                    report.limited(exc)
                report.unreadable.append((hook.path, refusal(hook, exc)))
                report.credential_refused |= isinstance(exc, Unauthorized) or (
                    isinstance(exc, Forbidden) and exc.reason == "no_credential"
                )
                log.warning("recover: cannot read a hook's delivery log", extra={"hook": hook.path, "error": str(exc)})
        report.missing.sort(key=lambda m: (m.delivered_at, m.guid))
        if mode != "dry_run":
            self._recover(report, mode)
        if self.metrics is not None:
            if report.malformed:
                self.metrics.recovery_skipped.labels("malformed").inc(report.malformed)
            if report.held:
                self.metrics.recovery_skipped.labels("held").inc(len(report.held))
            if report.cut:
                self.metrics.recovery_skipped.labels("log_unread").inc(len(report.cut))
        for path, why in report.cut:
            log.warning("recover: a hook's log was not read to the end", extra={"hook": path, "why": why})
        if report.held:
            log.warning(
                "recover: missing deliveries held back for the next run",
                extra={"count": len(report.held), "why": report.held[0][1]},
            )
        return report

    # -- reading a log ------------------------------------------------------------------------

    def missing(self, hook: Hook, since: datetime, report: Report, resume: Resume | None = None) -> list[Missing]:
        """The deliveries of one hook's log since `since` that the journal lacks, one per GUID.

        Each page is compared with the journal as it is read: only what the journal lacks is
        kept, so memory holds at most `bounds.held` deliveries, whatever the log's length. With
        `resume` (a pass stopped at its bound last time), the newer part is read down to where
        that pass started, then the older part from where it stopped. A log not read to the end
        is in `report.cut`, and where to go on in `report.resume`.
        """
        reading = _Reading(hook)
        newest = f"{hook.path}/deliveries?per_page={self.bounds.per_page}"
        if resume is None:
            stopped = self._read(reading, newest, since, report)
        else:
            stopped = self._read(reading, newest, resume.newer_than, report)
            if stopped is None:
                stopped = self._go_on(reading, resume.url, since, report)
        if stopped is not None:
            report.resume[hook.path] = stopped
        if reading.hook_id is None:
            return []
        return [
            Missing(e.guid, hook, reading.hook_id, e.log_id, e.event, e.delivered_at, count)
            for e, count in reading.lacking.values()
        ]

    def _read(self, reading: _Reading, url: str | None, down_to: datetime, report: Report) -> str | None:
        """Read pages from `url` until an entry older than `down_to` or the log's end; the next page's URL if a bound stopped it."""
        hook = reading.hook
        while url is not None:
            if reading.pages >= self.bounds.pages:
                report.cut.append(
                    (hook.path, f"stopped after {reading.pages} pages; older deliveries are read next time")
                )
                return url
            # Every hook's missing deliveries of this run count against one bound: those of the hooks
            # read before this one, and this one's so far.
            held = len(report.missing) + len(reading.lacking)
            if held >= self.bounds.held:
                report.cut.append((hook.path, f"{held} missing deliveries held: the rest are read next time"))
                return url
            asked = self.client.url_of(url)
            if asked in reading.urls:
                # GitHub's next page is one this reading has had: going on would read it again and again.
                report.cut.append((hook.path, "GitHub's next page is one read before: read anew next time"))
                return None
            reading.urls.add(asked)
            answer = self._call("GET", url, hook)
            reading.pages += 1
            if not isinstance(answer.data, list):
                # Not the log's end: what it holds is unknown, so the hook is unreadable this time and
                # its checkpoint stays where it was.
                raise GitHubError("GitHub's delivery log page was not a list", reason="bad_json")
            page = answer.data
            entries: list[LogEntry] = []
            older = False
            for item in page:
                entry = log_entry(item)
                if entry is None:
                    report.malformed += 1
                    continue
                if entry.delivered_at < down_to:
                    older = True
                    continue
                report.listed += 1
                entries.append(entry)
            self._compare(reading, entries)
            url = None if older or not page else answer.next_url
        return None

    def _go_on(self, reading: _Reading, url: str, since: datetime, report: Report) -> str | None:
        """Read the older part of a log from where the last pass stopped; a cursor GitHub no longer takes restarts it."""
        try:
            return self._read(reading, url, since, report)
        except (RateLimited, NotSent, Interrupted):
            raise
        except GitHubError as exc:
            # Without `report.resume`, the next pass reads this log from its newest entry again.
            report.cut.append((reading.hook.path, f"the last pass's cursor was refused ({exc}): read anew next time"))
            return None

    def _compare(self, reading: _Reading, entries: list[LogEntry]) -> None:
        """Keep the entries of a page the journal lacks, one per GUID (its newest attempt) with its attempts counted."""
        if not entries:
            return
        if reading.hook_id is None or (reading.hook.app and reading.hook.path not in self.learned):
            # The App hook's id is learned from GitHub once a run, whatever is recorded: a row recorded
            # from a delivery's headers (which the signature does not cover) could name another id,
            # and every delivery in the log would then look missing and be redelivered.
            recorded = reading.hook_id
            reading.hook_id = self._learn_hook_id(reading.hook, entries[0])
            if recorded is not None and recorded != reading.hook_id:
                log.warning(
                    "recover: the App hook's recorded id is not GitHub's; GitHub's is used",
                    extra={"recorded": recorded, "hook_id": reading.hook_id},
                )
        lacking = reading.lacking
        fresh = {e.guid for e in entries if e.guid not in lacking}
        present = journaled(self.database, reading.hook_id, fresh) if fresh else set()
        for entry in entries:
            if entry.guid in present:
                continue
            # Newest first: the first attempt seen of a GUID is its latest.
            first, count = lacking.get(entry.guid, (entry, 0))
            lacking[entry.guid] = (first, count + 1)

    def _learn_hook_id(self, hook: Hook, entry: LogEntry) -> int:
        """The App hook's id, from one delivery's request headers (its log's entries do not carry it)."""
        detail = self._call("GET", f"{hook.path}/deliveries/{entry.log_id}", hook).data
        request = detail.get("request") if isinstance(detail, dict) else None
        raw = Caseless(request.get("headers") if isinstance(request, dict) else None).get("X-GitHub-Hook-ID")
        hook_id = header_number(raw.strip()) if raw is not None else None
        if hook_id is None:
            raise GitHubError("GitHub's delivery did not name its hook", reason="bad_json")
        self.learned[hook.path] = hook_id
        return hook_id

    # -- redelivering or fetching -------------------------------------------------------------

    def _recover(self, report: Report, mode: Mode) -> None:
        """Redeliver or fetch each missing delivery, oldest first, within the bounds; the rest are held back, named."""
        requested: list[Missing] = []
        limit = self.bounds.recoveries
        asked = 0
        for item in report.missing:
            key = self.client.credential_key(app=item.hook.app)
            walled = self._walled.get(key)
            if walled is not None:
                report.held.append((item, f"{walled}: not asked"))
                continue
            if limit is not None and asked >= limit:
                report.held.append((item, f"over this run's {limit} recoveries"))
                continue
            asked += 1
            try:
                if mode == "redeliver":
                    self._post_attempt(item)
                    requested.append(item)
                else:
                    self._fetch(item, report)
            except RateLimited as exc:
                # A wall for this credential: nothing more is sent with it this run (budget.py).
                self._walled[key] = exc
                report.limited(exc)
                report.held.append((item, f"{exc}: not asked"))
            except NotSent as exc:
                # Whether GitHub said wait is unknown: the rest are held back for the next run, not failed.
                self._walled[key] = exc
                report.held.append((item, f"{exc}: not asked"))
            except Interrupted as exc:
                report.held.append((item, str(exc)))
            except GitHubError as exc:
                self._failed(report, item, refusal(item.hook, exc))
        if mode == "redeliver":
            self._settled(report, requested)

    def _settled(self, report: Report, requested: list[Missing]) -> None:
        pending = self._settle(requested)
        for item in requested:
            if item in pending:
                why = f"redelivery requested, not in the journal after {self.settle_s:g} s (can GitHub reach /webhook?)"
                self._failed(report, item, why)
            else:
                report.recovered.append(item)
                if self.metrics is not None:
                    self.metrics.recovered.labels("redelivered").inc()

    def _post_attempt(self, item: Missing) -> None:
        """POST …/attempts for one delivery (GitHub answers 202 and redelivers)."""
        self._call("POST", f"{item.hook.path}/deliveries/{item.log_id}/attempts", item.hook)

    def _may_send(self) -> None:
        """Interrupted when the run must send nothing more: stopped, out of wall time, or its lease lost."""
        if self.stop.is_set():
            raise Interrupted("stopped", reason="stopped")
        if self._ends is not None and time.monotonic() >= self._ends:
            raise Interrupted(f"the run's {self.bounds.seconds:g} s are spent: left for the next run", reason="time")
        if not self.keep():
            raise Interrupted("another recoverer took the lease: left to it", reason="lease_lost")

    def _call(self, method: str, path: str, hook: Hook) -> JsonAnswer:
        """One request; a POST at least `pace_s` after the last one; short rate limits waited out, long ones raised."""
        for _ in range(RATE_LIMITS_PER_REQUEST):
            self._may_send()
            if method == "POST":
                if self.stop.wait(max(0.0, self._last_post + self.pace_s - time.monotonic())):
                    raise Interrupted("stopped", reason="stopped")
                self._last_post = time.monotonic()
            try:
                return self.client.request_json(method, path, app=hook.app)
            except RateLimited as exc:
                wait = exc.retry_at - self._clock()
                if wait > MAX_RATE_WAIT_S or (self._ends is not None and time.monotonic() + wait >= self._ends):
                    raise
                log.info("recover: rate limited, waiting", extra={"seconds": round(wait, 1), "limit": exc.reason})
                # The client sends nothing with this credential before `retry_at`, whatever happens here.
                if self.stop.wait(max(0.0, wait)):
                    raise Interrupted("stopped", reason="stopped") from None
        raise GitHubError("still rate limited after waiting", reason="rate_limited")

    def _settle(self, requested: list[Missing]) -> set[Missing]:
        """Those of `requested` still not in the journal once they arrived or `settle_s` passed."""
        pending = set(requested)
        ends = time.monotonic() + self.settle_s
        while pending:
            by_hook: dict[int, list[Missing]] = {}
            for item in pending:
                by_hook.setdefault(item.hook_id, []).append(item)
            for hook_id, items in by_hook.items():
                present = journaled(self.database, hook_id, (m.guid for m in items))
                pending -= {m for m in items if m.guid in present}
            left = ends - time.monotonic()
            if not pending or left <= 0 or self.stop.wait(min(POLL_S, left)):
                break
        return pending

    def _fetch(self, item: Missing, report: Report) -> None:
        """Ingest the payload GitHub shows for one delivery, journaled as the API's JSON."""
        try:
            delivery = self._shown(item)
        except parse.BadPayload as exc:
            self._failed(report, item, str(exc))
            return
        result = ingest(
            self.database,
            delivery,
            store_payload=self.settings.store_payloads,
            compress=self.settings.journal_compression,
        )
        if result.disposition is not Disposition.DONE:
            self._failed(report, item, f"not stored: {result.error}")
            return
        report.recovered.append(item)
        if self.metrics is not None:
            self.metrics.recovered.labels("fetched").inc()

    def _shown(self, item: Missing) -> Delivery:
        """The delivery as GitHub's API shows it: its request headers and parsed payload."""
        detail = self._call("GET", f"{item.hook.path}/deliveries/{item.log_id}", item.hook).data
        request = detail.get("request") if isinstance(detail, dict) else None
        headers = request.get("headers") if isinstance(request, dict) else None
        payload = request.get("payload") if isinstance(request, dict) else None
        if not isinstance(payload, dict):
            raise GitHubError("GitHub showed no payload for this delivery", reason="no_payload")
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        envelope = Envelope.from_shown(headers, delivery_id=item.guid, hook_id=item.hook_id, event=item.event)
        try:
            return Delivery.parse(envelope, body)
        except parse.BadPayload as exc:
            # Nested past what a delivery may be: GitHub would not have delivered it either.
            raise GitHubError(f"GitHub showed a payload no delivery may carry ({exc})", reason="bad_payload") from None

    def _failed(self, report: Report, item: Missing, why: str) -> None:
        report.failed.append((item.name, why))
        if self.metrics is not None:
            self.metrics.recovery_failures.inc()
