"""The typed errors of a call to GitHub: what failed, as a class, and a short `reason` label for metrics and logs.

Raised by the REST client (client), the App's token mint (auth) and the reading of answers (answers).
A message never holds a secret (token, JWT, private key): it may be logged as it is.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

# Why GitHub asked a credential to wait: its primary budget is spent, a secondary limit, or it is
# unavailable (a 5xx with `retry-after`, HTTP's "come back then").
WaitReason = Literal["primary", "secondary", "unavailable"]


_WAIT_REASONS: dict[str, WaitReason] = {"primary": "primary", "secondary": "secondary", "unavailable": "unavailable"}


def wait_reason(value: str) -> WaitReason:
    """A stored or raised reason as a `WaitReason`; anything unknown is a secondary limit."""
    return _WAIT_REASONS.get(value, "secondary")


class GitHubError(Exception):
    """A failed call to GitHub; `reason` is a short, bounded label for metrics and logs."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.status = status


class RateLimited(GitHubError):
    """GitHub asked us to wait: retry no earlier than `retry_at` (epoch seconds).

    `credential` names the budget it applies to (`installation:<id>`, `token:<hash prefix>`,
    `app:<id>`: never a secret), once the client knows it; `sent` is False when the client refused
    the request itself, without asking GitHub, because that credential was still told to wait.
    """

    def __init__(
        self,
        retry_at: float,
        reason: WaitReason,
        *,
        status: int | None = None,
        credential: str | None = None,
        sent: bool = True,
    ) -> None:
        until = datetime.fromtimestamp(retry_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        who = f" for {credential}" if credential else ""
        if reason == "unavailable":
            what = f"GitHub unavailable ({status})" if status is not None else "GitHub unavailable"
        else:
            what = f"GitHub {reason} rate limit"
        super().__init__(f"{what}{who}: retry at {until}", reason=reason, status=status)
        self.retry_at = retry_at
        self.credential = credential
        self.sent = sent


class NotFound(GitHubError):
    """The repository or pull request does not exist, or is gone (404, 410)."""

    reason = "not_found"


class Forbidden(GitHubError):
    """No access: GitHub refused (403 without a rate-limit sign) or we hold no credential for the repository."""

    reason = "forbidden"


class Transient(GitHubError):
    """A failure worth retrying later: 5xx, timeout, connection error, unreadable answer."""

    def __init__(self, reason: str, message: str | None = None, *, status: int | None = None) -> None:
        super().__init__(message or f"GitHub request failed: {reason}", reason=reason, status=status)


class NotSent(Transient):
    """Nothing was sent, and no request counted: whether GitHub told this credential to wait could not be
    known (`waits_unreadable`), or the work it was for is no longer this worker's (`lease_lost`)."""

    def __init__(self, message: str, *, reason: str = "waits_unreadable", credential: str | None = None) -> None:
        super().__init__(reason, message)
        self.credential = credential


class Unauthorized(GitHubError):
    """GitHub rejected our credential (a bad token, or an installation token refused even after a re-mint)."""

    reason = "unauthorized"
