"""The fake GitHub's rate limits per credential: each token, App installation and the App its own budget.

GitHub keeps a budget per credential and answers a credential it told to wait with the limit again
(https://docs.github.com/en/rest/using-the-rest-api/rate-limits-for-the-rest-api): "continuing to make
requests while you are rate limited may result in the banning of your integration". Here every request
is counted by the credential it carries (`token`, `installation:<id>`, `app`, `none`), and a test can
tell one credential to wait:

    fake.budgets.limit_next("token", retry_after=600)   # the next request answers 403 + retry-after: 600
    ...
    assert fake.budgets.requests_while_limited("token") == 0

While a wait holds, that credential's requests are answered the limit again, and counted as a request
made while limited; the other credentials go on.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections import Counter, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from werkzeug.wrappers import Request, Response

if TYPE_CHECKING:
    from .fake_github import FakeGitHub

DOCS = "https://docs.github.com/rest/using-the-rest-api/rate-limits-for-the-rest-api"


@dataclass(frozen=True)
class Limit:
    """A wait to answer with: secondary (`retry-after`), primary (`x-ratelimit-remaining: 0` + reset), or
    unavailable (a 5xx with `retry-after`, HTTP's "come back then")."""

    kind: str
    seconds: int
    status: int


class CredentialBudgets:
    """Per credential: requests counted, and the wait GitHub asked for, answered as GitHub answers it."""

    def __init__(self, fake: FakeGitHub) -> None:
        self.fake = fake
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.while_limited: Counter[str] = Counter()
        self._until: dict[str, tuple[float, Limit]] = {}
        self._next: dict[str, deque[Limit | None]] = {}

    # -- programming ----------------------------------------------------------------------------

    def limit_next(
        self, key: str, *, retry_after: int = 600, kind: str = "secondary", status: int = 403, after: int = 0
    ) -> None:
        """Answer that credential's request (after `after` more go through) with a limit of `retry_after` seconds."""
        if kind not in ("secondary", "primary", "unavailable"):
            raise ValueError(f"unknown limit {kind!r}")
        with self._lock:
            queue = self._next.setdefault(key, deque())
            queue.extend([None] * after)
            queue.append(Limit(kind, retry_after, status))

    def requests(self, key: str) -> int:
        """Requests the fake received with that credential."""
        with self._lock:
            return self.counts[key]

    def requests_while_limited(self, key: str) -> int:
        """Requests with that credential received while its wait held (GitHub may ban for these)."""
        with self._lock:
            return self.while_limited[key]

    def limited_until(self, key: str) -> float | None:
        """Until when that credential is told to wait (the fake's clock), if it is."""
        with self._lock:
            held = self._until.get(key)
        return held[0] if held is not None and held[0] > self.fake.clock() else None

    # -- answering ------------------------------------------------------------------------------

    def key_of(self, request: Request) -> str:
        """The credential a request carries: `token`, `installation:<id>`, `app`, or `none`."""
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() not in ("bearer", "token") or not value:
            return "none"
        if self.fake.token is not None and secrets.compare_digest(value, self.fake.token):
            return "token"
        issued = self.fake.installation_of(value)
        if issued is not None:
            return f"installation:{issued}"
        return "app" if value.count(".") == 2 else "none"

    def gate(self, request: Request) -> Response | None:
        """Count the request; the limit when its credential is told to wait (or is to be now), else None."""
        key = self.key_of(request)
        now = self.fake.clock()
        with self._lock:
            self.counts[key] += 1
            held = self._until.get(key)
            if held is not None and now < held[0]:
                self.while_limited[key] += 1
                return _answer(held[1], held[0], now)
            queue = self._next.get(key)
            limit = queue.popleft() if queue else None
            if limit is None:
                return None
            self._until[key] = (now + limit.seconds, limit)
        return _answer(limit, now + limit.seconds, now)


def _answer(limit: Limit, until: float, now: float) -> Response:
    """GitHub's answer to a credential told to wait: 403/429 (or a 5xx) with `retry-after`, or the primary headers."""
    headers: dict[str, Any]
    if limit.kind == "primary":
        headers = {
            "x-ratelimit-limit": "5000",
            "x-ratelimit-remaining": "0",
            "x-ratelimit-reset": str(int(until)),
            "x-ratelimit-resource": "core",
        }
        message = "API rate limit exceeded."
    elif limit.kind == "unavailable":
        headers = {"retry-after": str(max(1, int(until - now)))}
        message = "Service Unavailable"
    else:
        headers = {"retry-after": str(max(1, int(until - now)))}
        message = "You have exceeded a secondary rate limit. Please wait a few minutes before you try again."
    body = json.dumps({"message": message, "documentation_url": DOCS})
    return Response(body, status=limit.status, headers=headers, content_type="application/json; charset=utf-8")
