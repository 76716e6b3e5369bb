"""The fake GitHub's webhooks: hooks that really deliver signed bodies, and their delivery logs.

A hook delivers by POSTing to its URL over HTTP, signed with its secret, and logs each attempt
as GitHub does (`status_code` 0 and "failed to connect" when nobody listens). Its log is served
as GitHub's REST API serves it: `GET …/deliveries` newest first with an opaque `cursor` in the
`Link` header, `GET …/deliveries/{id}` with the request's headers and parsed payload, and
`POST …/deliveries/{id}/attempts` (202), which sends the same signed bytes with the same GUID
again, after answering. POSTs closer together than `min_post_interval` get a secondary rate limit
(429, `retry-after`). The App's webhook (`app/hook`) takes the App's JWT only.

The personal token can be made fine-grained (`token_owner`): like GitHub's, it reaches one
owner's resources, so a hook of another owner answers 404 as if it did not exist; and without the
*Webhooks* permission (`token_permissions` lacking `repository_hooks` or `organization_hooks`) a
hook of its own owner answers 403 with `X-Accepted-GitHub-Permissions` naming the one it needs.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import requests
from werkzeug.wrappers import Request, Response

from flowlens_ingest.events.signature import sign

if TYPE_CHECKING:
    from .fake_github import FakeGitHub

_ROUTE = re.compile(
    r"^/(?P<hook>app/hook|(?:repos/[^/]+/[^/]+|orgs/[^/]+)/hooks/\d+)/deliveries(?:/(?P<id>\d+)(?P<attempts>/attempts)?)?$"
)
DOCS = "https://docs.github.com/rest/webhooks"


@dataclass
class Attempt:
    """One logged attempt of a delivery: what was sent and what came back."""

    id: int
    guid: str
    event: str
    body: bytes
    headers: dict[str, str]
    delivered_at: float
    redelivery: bool
    status_code: int = 0
    status: str = "failed to connect"


@dataclass
class Hook:
    """A webhook: where it delivers, its secret, what it is installed on, and its log (oldest first)."""

    path: str
    hook_id: int
    url: str
    secret: str
    target_type: str
    target_id: int
    log: list[Attempt] = field(default_factory=list)
    # Raw log entries GitHub's API would not send (a time without offset, `id: true`), listed first.
    odd: list[dict[str, Any]] = field(default_factory=list)
    # A log whose pages never end, each bringing new GUIDs.
    endless: bool = False
    # Quirks of an odd day: this many list requests answered 200 with an object, not the list; every
    # page's `next` link pointing back at the first page.
    not_a_list: int = 0
    next_is_first: bool = False


class HookLogs:
    """Hooks and their delivery logs, served under the fake GitHub's API."""

    def __init__(self, fake: FakeGitHub) -> None:
        self.fake = fake
        self._lock = threading.Lock()
        self.hooks: dict[str, Hook] = {}
        self._ids = iter(range(80_000_001, 10**12))
        self.min_post_interval = 0.0
        self._last_post = -1e9
        self.rate_limited_posts = 0
        # GitHub keeps a hook's log 3 days (github.com): older attempts vanish from it.
        self.retention_s = 3 * 86400.0
        self._threads: list[threading.Thread] = []
        # None: a classic token, every owner; else a fine-grained token's resource owner.
        self.token_owner: str | None = None
        # None: every permission; else the fine-grained token's (`repository_hooks`, `organization_hooks`).
        self.token_permissions: set[str] | None = None

    # -- programming ----------------------------------------------------------------------------

    def add_hook(self, path: str, hook_id: int, url: str, secret: str, *, target_type: str, target_id: int) -> Hook:
        """A hook at API path `path` (`repos/O/R/hooks/ID`, `orgs/O/hooks/ID`, `app/hook`) delivering to `url`."""
        hook = Hook(path, hook_id, url, secret, target_type, target_id)
        with self._lock:
            self.hooks[path] = hook
        return hook

    def deliver(self, path: str, event: str, payload: dict[str, Any], *, guid: str | None = None) -> str:
        """Deliver `payload` as GitHub would (signed, over HTTP), logging the attempt; its GUID."""
        hook = self.hooks[path]
        body, headers = self._signed(hook, event, payload, guid or str(uuid.uuid4()))
        self._attempt(hook, headers["X-GitHub-Delivery"], event, body, headers, redelivery=False)
        return headers["X-GitHub-Delivery"]

    def log_only(self, path: str, event: str, payload: dict[str, Any], *, status_code: int = 200) -> str:
        """Log a delivery as answered `status_code` without sending it (2xx: the answer came from a VM since lost;
        0: nobody listened, as while the service was down)."""
        hook = self.hooks[path]
        body, headers = self._signed(hook, event, payload, str(uuid.uuid4()))
        guid = headers["X-GitHub-Delivery"]
        status = "failed to connect" if status_code == 0 else "OK"
        if status_code and not 200 <= status_code < 300:
            status = f"Invalid HTTP Response: {status_code}"
        with self._lock:
            hook.log.append(
                Attempt(next(self._ids), guid, event, body, headers, self.fake.clock(), False, status_code, status)
            )
        return guid

    @staticmethod
    def _signed(hook: Hook, event: str, payload: dict[str, Any], guid: str) -> tuple[bytes, dict[str, str]]:
        """The body GitHub sends for `payload`, and its headers, signed with the hook's secret."""
        body = json.dumps(payload).encode()
        headers = {
            "Accept": "*/*",
            "Content-Type": "application/json",
            "User-Agent": "GitHub-Hookshot/fake",
            "X-GitHub-Delivery": guid,
            "X-GitHub-Event": event,
            "X-GitHub-Hook-ID": str(hook.hook_id),
            "X-GitHub-Hook-Installation-Target-ID": str(hook.target_id),
            "X-GitHub-Hook-Installation-Target-Type": hook.target_type,
            "X-Hub-Signature-256": sign(body, hook.secret.encode()),
        }
        return body, headers

    def wait_redeliveries(self, timeout: float = 30) -> None:
        """Wait for the redeliveries requested so far to have been sent and logged."""
        with self._lock:
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(timeout)

    # -- delivering -----------------------------------------------------------------------------

    def _attempt(
        self, hook: Hook, guid: str, event: str, body: bytes, headers: dict[str, str], *, redelivery: bool
    ) -> None:
        attempt = Attempt(next(self._ids), guid, event, body, headers, self.fake.clock(), redelivery)
        # Logged as it is sent, its answer filled in once it came: whoever sees the delivery arrive
        # (a journal entry) finds the attempt in the log too, however slow this thread is.
        with self._lock:
            hook.log.append(attempt)
        try:
            answer = requests.post(hook.url, data=body, headers=headers, timeout=10)
            status_code = answer.status_code
            status = "OK" if 200 <= status_code < 300 else f"Invalid HTTP Response: {status_code}"
        except requests.RequestException:
            status_code, status = 0, "failed to connect"
        with self._lock:
            attempt.status_code, attempt.status = status_code, status

    # -- the REST routes ------------------------------------------------------------------------

    def route(self, request: Request, path: str) -> Response | None:
        """Answer a delivery-log request, or None when `path` is not one."""
        match = _ROUTE.match(path)
        if match is None:
            return None
        with self._lock:
            hook = self.hooks.get(match["hook"])
        if not self._allowed(request, match["hook"]):
            return _json(401, {"message": "Bad credentials", "documentation_url": DOCS})
        refused = self._token_refusal(request, match["hook"])
        if refused is not None:
            return refused
        if hook is None:
            return _json(404, {"message": "Not Found", "documentation_url": DOCS})
        if match["id"] is None and request.method == "GET":
            return self._list(request, hook)
        with self._lock:
            attempt = next((a for a in hook.log if a.id == int(match["id"] or 0)), None)
        if attempt is None:
            return _json(404, {"message": "Not Found", "documentation_url": DOCS})
        if match["attempts"] and request.method == "POST":
            return self._redeliver(hook, attempt)
        if not match["attempts"] and request.method == "GET":
            return _json(200, self._detail(attempt))
        return _json(404, {"message": "Not Found", "documentation_url": DOCS})

    def _allowed(self, request: Request, hook_path: str) -> bool:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if hook_path == "app/hook":
            # The App's JWT only: installation tokens and personal tokens are refused.
            return scheme.lower() == "bearer" and self.fake._jwt_valid(value)
        return self.fake._authorized(request)

    def _token_refusal(self, request: Request, hook_path: str) -> Response | None:
        """A fine-grained personal token's refusal: another owner's hook (404), or no *Webhooks* permission (403)."""
        _, _, value = request.headers.get("Authorization", "").partition(" ")
        if hook_path == "app/hook" or value != self.fake.token:
            return None
        kind, owner = hook_path.split("/")[:2]
        if self.token_owner is not None and owner.lower() != self.token_owner.lower():
            return _json(404, {"message": "Not Found", "documentation_url": DOCS})
        needed = "organization_hooks" if kind == "orgs" else "repository_hooks"
        if self.token_permissions is not None and needed not in self.token_permissions:
            message = "Resource not accessible by personal access token"
            headers = {"X-Accepted-GitHub-Permissions": f"{needed}=read"}
            return _json(403, {"message": message, "documentation_url": DOCS}, headers)
        return None

    def _list(self, request: Request, hook: Hook) -> Response:
        """Newest first, `per_page` at most, a keyset `cursor` (attempts older than the last one shown) in `Link`.

        Attempts older than `retention_s` are gone, as from GitHub's log. `hook.odd` entries (raw
        dicts, as a quirky log might hold) head the first page; an `endless` log never runs out.
        """
        per_page = min(100, max(1, int(request.args.get("per_page", "30"))))
        with self._lock:
            odd_answer, hook.not_a_list = hook.not_a_list > 0, max(hook.not_a_list - 1, 0)
        if odd_answer:
            return _json(200, {"message": "odd"})
        cursor = request.args.get("cursor")
        before = int(base64.urlsafe_b64decode(cursor.encode()).decode().removeprefix("v1_")) if cursor else None
        oldest = self.fake.clock() - self.retention_s
        with self._lock:
            kept = [a for a in reversed(hook.log) if a.delivered_at >= oldest and (before is None or a.id < before)]
        page = [self._summary(a) for a in kept[:per_page]]
        last = kept[per_page - 1].id if len(kept) > per_page else None
        if hook.endless and len(kept) <= per_page:
            # Fresh GUIDs on every page, for ever: a log that never ends.
            start = min([before or 79_999_999_999, *(a.id for a in kept)]) - 1
            fresh = [self._endless(start - i) for i in range(per_page - len(page))]
            page += fresh
            last = start - len(fresh) + 1
        if cursor is None:
            page = [*hook.odd, *page]
        headers = {}
        if last is not None:
            token = base64.urlsafe_b64encode(f"v1_{last}".encode()).decode()
            headers["Link"] = f'<{self.fake.url}/{hook.path}/deliveries?per_page={per_page}&cursor={token}>; rel="next"'
        if hook.next_is_first:
            headers["Link"] = f'<{self.fake.url}/{hook.path}/deliveries?per_page={per_page}>; rel="next"'
        return _json(200, page, headers)

    def _endless(self, log_id: int) -> dict[str, Any]:
        now = datetime.fromtimestamp(int(self.fake.clock()), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        guid = str(uuid.uuid5(uuid.NAMESPACE_OID, str(log_id)))
        return {"id": log_id, "guid": guid, "delivered_at": now, "event": "ping", "status_code": 0, "redelivery": False}

    def _summary(self, attempt: Attempt) -> dict[str, Any]:
        payload = json.loads(attempt.body)
        return {
            "id": attempt.id,
            "guid": attempt.guid,
            "delivered_at": datetime.fromtimestamp(int(attempt.delivered_at), UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "redelivery": attempt.redelivery,
            "duration": 0.05,
            "status": attempt.status,
            "status_code": attempt.status_code,
            "event": attempt.event,
            "action": payload.get("action"),
            "installation_id": (payload.get("installation") or {}).get("id"),
            "repository_id": (payload.get("repository") or {}).get("id"),
            "throttled_at": None,
        }

    def _detail(self, attempt: Attempt) -> dict[str, Any]:
        return {
            **self._summary(attempt),
            "url": "https://flowlens.example/webhook",
            "request": {"headers": attempt.headers, "payload": json.loads(attempt.body)},
            "response": {"headers": {}, "payload": None},
        }

    def _redeliver(self, hook: Hook, attempt: Attempt) -> Response:
        with self._lock:
            now = self.fake.clock()
            too_soon = now - self._last_post < self.min_post_interval
            self._last_post = now
            if too_soon:
                self.rate_limited_posts += 1
        if too_soon:
            message = "You have exceeded a secondary rate limit. Please wait a few minutes before you try again."
            return _json(429, {"message": message, "documentation_url": DOCS}, {"retry-after": "1"})
        # Answered first, sent after, as GitHub does: the same bytes, the same GUID.
        thread = threading.Thread(
            target=self._attempt,
            args=(hook, attempt.guid, attempt.event, attempt.body, attempt.headers),
            kwargs={"redelivery": True},
            daemon=True,
        )
        with self._lock:
            self._threads.append(thread)
        thread.start()
        return _json(202, {})


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body), status=status, headers=headers or {}, content_type="application/json; charset=utf-8"
    )
