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


class StreamingVerifier:
    """The signature check, fed the body chunk by chunk (the view never holds an unsigned body whole)."""

    def __init__(self, header: str | None, secrets: Iterable[bytes]) -> None:
        """Refuse a missing or non-`sha256=` header at once, before any byte of the body is read."""
        if not header:
            raise SignatureError("missing")
        if not header.startswith(PREFIX):
            # A sha1= signature alone is refused: SHA-1 HMAC is GitHub's legacy header.
            raise SignatureError("unsupported_algorithm")
        self._received = header[len(PREFIX) :].strip().lower().encode("ascii", "replace")
        self._macs = [hmac.new(secret, digestmod=hashlib.sha256) for secret in secrets]

    def update(self, chunk: bytes) -> None:
        """Feed the next bytes of the body."""
        for mac in self._macs:
            mac.update(chunk)

    def verify(self) -> None:
        """Raise SignatureError unless the bytes fed so far are signed with one of the secrets."""
        matched = False
        for mac in self._macs:
            # Compare against every secret so timing does not tell which one matched.
            matched |= hmac.compare_digest(mac.hexdigest().encode(), self._received)
        if not matched:
            raise SignatureError("mismatch")


def verify(body: bytes, header: str | None, secrets: Iterable[bytes]) -> None:
    """Raise SignatureError unless `header` signs `body` with one of `secrets`."""
    verifier = StreamingVerifier(header, secrets)
    verifier.update(body)
    verifier.verify()
