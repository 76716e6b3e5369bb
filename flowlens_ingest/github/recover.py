"""Recovering missed deliveries: each hook's delivery log on GitHub, compared with the journal.

GitHub never retries a failed delivery and keeps each hook's log for 3 days on github.com and GHE.com
(data residency), 7 on GHES:
https://docs.github.com/en/webhooks/using-webhooks/handling-failed-webhook-deliveries. A pass
reads the logs newest first (cursor pages in `Link`), groups attempts by GUID, and brings in every
`(GUID, hook)` the journal lacks, once however many attempts it has: redelivered by GitHub (signed,
same GUID, through /webhook, so the journal keeps its exact bytes), or with `fetch` shown by the API
and ingested here, journaled with `body_from_api`. One request at a time, POSTs at most about one
a second, `retry-after` obeyed; every wait has a deadline, and no transaction is open across a call.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

from flowlens_ingest.config import Settings
from flowlens_ingest.events import parse
from flowlens_ingest.events.delivery import Delivery
from flowlens_ingest.events.envelope import Envelope
from flowlens_ingest.github.client import DEFAULT_API_URL, GitHubClient, JsonAnswer
from flowlens_ingest.github.errors import Forbidden, GitHubError, NotFound, RateLimited, Unauthorized
from flowlens_ingest.github.hooks import Hook, hooks_to_read, journaled, parse_time, shown_header
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
# A rate limit asking for a longer wait ends the redeliveries: the rest are named, for the next run.
MAX_RATE_WAIT_S = 120.0
RATE_LIMITS_PER_REQUEST = 5
# How long redeliveries are waited for in the journal once requested, polled this often.
SETTLE_S = 60.0
POLL_S = 0.25
# 100 deliveries a page: 1,000 pages is far beyond what 3 days of one hook hold.
MAX_LOG_PAGES = 1000

Mode = Literal["redeliver", "fetch", "dry_run"]
__all__ = ["Hook", "Missing", "Mode", "Recoverer", "Report", "hooks_to_read", "retention"]


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


@dataclass
class Report:
    """What a pass found and did."""

    mode: Mode
    hooks: int = 0
    listed: int = 0
    missing: list[Missing] = field(default_factory=list)
    recovered: list[Missing] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    credential_refused: bool = False

    @property
    def complete(self) -> bool:
        """Nothing is left missing: every log read, every missing delivery brought in."""
        left = self.missing if self.mode == "dry_run" else [name for name, _ in self.failed]
        return not left and not self.unreadable

    def summary(self) -> str:
        """The one line a run ends with."""
        done = "redelivered" if self.mode == "redeliver" else "fetched"
        what = "left to recover" if self.mode == "dry_run" else f"{len(self.recovered)} {done}, {len(self.failed)} not"
        hooks = f"{self.hooks} hook{'' if self.hooks == 1 else 's'} read"
        unreadable = f", {len(self.unreadable)} unreadable" if self.unreadable else ""
        return f"recover: {hooks}{unreadable}, {self.listed} delivery attempts logged, {len(self.missing)} missing ({what})"


class Recoverer:
    """Compares hooks' delivery logs with the journal and brings in what is missing."""

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
    ) -> None:
        self.settings = settings
        self.database = database
        self.client = client
        self.metrics = metrics
        self.pace_s = pace_s
        self.settle_s = settle_s
        self.stop = stop or threading.Event()
        self._clock = clock
        self._last_post = 0.0
        # Learned while reading (the App hook's id): the scheduled pass records it.
        self.learned: dict[str, int] = {}

    def run(self, since_for: Callable[[Hook], datetime], mode: Mode, hooks: list[Hook]) -> Report:
        """Read each hook's log back to `since_for(hook)`, then redeliver, fetch, or only list what is missing."""
        report = Report(mode)
        for hook in hooks:
            try:
                report.missing += self.missing(hook, since_for(hook), report)
                report.hooks += 1
            except GitHubError as exc:
                report.unreadable.append((hook.path, refusal(hook, exc)))
                report.credential_refused |= isinstance(exc, Unauthorized) or (
                    isinstance(exc, Forbidden) and exc.reason == "no_credential"
                )
                log.warning("recover: cannot read a hook's delivery log", extra={"hook": hook.path, "error": str(exc)})
        if mode == "redeliver":
            self._redeliver(report)
        elif mode == "fetch":
            for item in report.missing:
                self._fetch(item, report)
        return report

    # -- reading a log ------------------------------------------------------------------------

    def missing(self, hook: Hook, since: datetime, report: Report) -> list[Missing]:
        """The deliveries of one hook's log since `since` that the journal lacks, one per GUID, oldest first."""
        newest: dict[str, tuple[dict[str, Any], datetime, int]] = {}
        url: str | None = f"{hook.path}/deliveries?per_page=100"
        for _ in range(MAX_LOG_PAGES):
            if url is None:
                break
            answer = self._call("GET", url, hook)
            page = answer.data if isinstance(answer.data, list) else []
            older = False
            for item in page:
                at = parse_time(item.get("delivered_at")) if isinstance(item, dict) else None
                if at is None or not isinstance(item.get("guid"), str) or not isinstance(item.get("id"), int):
                    continue
                if at < since:
                    older = True
                    continue
                report.listed += 1
                guid = item["guid"]
                first, first_at, count = newest.get(guid, (item, at, 0))
                # Newest first: the first attempt seen of a GUID is its latest.
                newest[guid] = (first, first_at, count + 1)
            url = None if older or not page else answer.next_url
        if not newest:
            return []
        hook_id = (
            hook.hook_id if hook.hook_id is not None else self._learn_hook_id(hook, next(iter(newest.values()))[0])
        )
        present = journaled(self.database, hook_id, newest)
        found = [
            Missing(guid, hook, hook_id, item["id"], str(item.get("event") or ""), at, count)
            for guid, (item, at, count) in newest.items()
            if guid not in present
        ]
        return sorted(found, key=lambda m: (m.delivered_at, m.guid))

    def _learn_hook_id(self, hook: Hook, item: dict[str, Any]) -> int:
        """The App hook's id, from one delivery's request headers (its log's entries do not carry it)."""
        detail = self._call("GET", f"{hook.path}/deliveries/{item['id']}", hook).data
        request = detail.get("request") if isinstance(detail, dict) else None
        raw = shown_header(request.get("headers") if isinstance(request, dict) else None, "X-GitHub-Hook-ID")
        if raw is None or not raw.isdigit():
            raise GitHubError("GitHub's delivery did not name its hook", reason="bad_json")
        self.learned[hook.path] = int(raw)
        return int(raw)

    # -- redelivering -------------------------------------------------------------------------

    def _redeliver(self, report: Report) -> None:
        """Ask GitHub to redeliver each missing delivery, paced; then wait for them in the journal."""
        requested: list[Missing] = []
        for item in report.missing:
            try:
                self._post_attempt(item)
            except GitHubError as exc:
                self._failed(report, item, refusal(item.hook, exc))
                continue
            requested.append(item)
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

    def _call(self, method: str, path: str, hook: Hook) -> JsonAnswer:
        """One request; a POST at least `pace_s` after the last one; short rate limits waited out."""
        for _ in range(RATE_LIMITS_PER_REQUEST):
            if method == "POST":
                if self.stop.wait(max(0.0, self._last_post + self.pace_s - time.monotonic())):
                    raise GitHubError("stopped", reason="stopped")
                self._last_post = time.monotonic()
            try:
                return self.client.request_json(method, path, app=hook.app)
            except RateLimited as exc:
                wait = exc.retry_at - self._clock()
                if wait > MAX_RATE_WAIT_S:
                    raise
                log.info("recover: rate limited, waiting", extra={"seconds": round(wait, 1), "limit": exc.reason})
                if self.stop.wait(wait):
                    raise GitHubError("stopped", reason="stopped") from None
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

    # -- fetching -----------------------------------------------------------------------------

    def _fetch(self, item: Missing, report: Report) -> None:
        """Ingest the payload GitHub shows for one delivery, journaled as the API's JSON."""
        try:
            delivery = self._shown(item)
        except (GitHubError, parse.BadPayload) as exc:
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
        return Delivery.parse(envelope, body)

    def _failed(self, report: Report, item: Missing, why: str) -> None:
        report.failed.append((item.name, why))
        if self.metrics is not None:
            self.metrics.recovery_failures.inc()
