"""GitHub's webhook signature: HMAC-SHA256 over the raw body, `sha256=` prefix only.

https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

PREFIX = "sha256="


class SignatureError(Exception):
    """The delivery is not signed by a secret we hold; `reason` is a metric label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def sign(body: bytes, secret: bytes) -> str:
    """The `X-Hub-Signature-256` header value GitHub sends for this body and secret."""
    return PREFIX + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(body: bytes, header: str | None, secrets: Iterable[bytes]) -> None:
    """Raise SignatureError unless `header` signs `body` with one of `secrets`."""
    if not header:
        raise SignatureError("missing")
    if not header.startswith(PREFIX):
        # A sha1= signature alone is refused: SHA-1 HMAC is GitHub's legacy header.
        raise SignatureError("unsupported_algorithm")
    received = header[len(PREFIX) :].strip().lower().encode("ascii", "replace")
    matched = False
    for secret in secrets:
        expected = hmac.new(secret, body, hashlib.sha256).hexdigest().encode()
        # Compare against every secret so timing does not tell which one matched.
        matched |= hmac.compare_digest(expected, received)
    if not matched:
        raise SignatureError("mismatch")
