"""GitHub App authentication: the App's private key, the JWTs it signs, and installation tokens minted and cached.

The REST client (client) holds one `GitHubApp` and asks it for an installation's token before each
request. Minting takes one POST to GitHub, which the client sends for it (`PostToApi`): the same
deadline, byte cap and transport errors as every other request, and no HTTP library imported here.
No secret (the key, a JWT, a token) goes into a log line, an exception message or a repr.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from flowlens_ingest.github.answers import Answer, json_of, raise_for
from flowlens_ingest.github.errors import Forbidden, Transient, Unauthorized

# Re-mint an installation token this long before GitHub says it expires, so a token never
# expires between our check and GitHub's.
TOKEN_REFRESH_MARGIN = 300.0
# Backdated against clock drift between us and GitHub; 540 s ahead keeps the whole JWT
# lifetime within GitHub's 10-minute limit.
JWT_BACKDATE = 60
JWT_LIFETIME = 540

# A thread waits at most this long for another thread's mint of the same installation's token.
MINT_WAIT_S = 120.0

# POST to a path of the API (e.g. "/app/installations/5/access_tokens") with these headers, and the answer.
PostToApi = Callable[[str, dict[str, str]], Answer]


@dataclass(frozen=True)
class _CachedToken:
    token: str
    expires_at: float


def _load_app_key(private_key: str) -> RSAPrivateKey:
    """The App's RSA key from its PEM text; a `ValueError` that never quotes the key when it is not one."""
    # Keys pasted into one-line environment variables often arrive with literal `\n`.
    if "\n" not in private_key.strip() and "\\n" in private_key:
        private_key = private_key.replace("\\n", "\n")
    try:
        key = load_pem_private_key(private_key.strip().encode(), password=None)
    except (ValueError, TypeError):
        # `from None`: whatever the parser says stays out of tracebacks next to the key.
        raise ValueError("the GitHub App private key is not a readable unencrypted PEM key") from None
    if isinstance(key, RSAPrivateKey):
        return key
    # GitHub Apps sign with RS256: an EC or Ed25519 key is a configuration mistake, not a type error.
    raise ValueError("the GitHub App private key is not an RSA key")


class GitHubApp:
    """A GitHub App's credentials: JWTs signed with its key, and installation tokens minted once and cached."""

    def __init__(self, app_id: int | str, private_key: str, *, post: PostToApi, clock: Callable[[], float]) -> None:
        self.app_id = str(app_id)
        self._key = _load_app_key(private_key)
        self._post = post
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[int, _CachedToken] = {}
        # One lock per installation, so a slow mint for one does not hold up the others,
        # and threads needing the same token mint it once.
        self._mint_locks: dict[int, threading.Lock] = {}
        # How long a thread waits for another's mint of the same token: a mint is one request
        # (its turn and its deadline, client.py) and two reads of the shared waits.
        self.mint_wait_s = MINT_WAIT_S

    def __repr__(self) -> str:
        return f"GitHubApp({self.app_id!r})"

    def installation_token(self, installation_id: int) -> str:
        """An installation access token, minted by the App and cached until 5 minutes before it expires."""
        with self._lock:
            mint_lock = self._mint_locks.setdefault(installation_id, threading.Lock())
        if not mint_lock.acquire(timeout=self.mint_wait_s):
            raise Transient(
                "busy", f"another thread's token mint held installation {installation_id} past {self.mint_wait_s:g} s"
            )
        try:
            with self._lock:
                cached = self._tokens.get(installation_id)
            if cached is not None and self._clock() < cached.expires_at - TOKEN_REFRESH_MARGIN:
                return cached.token
            fresh = self._mint(installation_id)
            with self._lock:
                self._tokens[installation_id] = fresh
            return fresh.token
        finally:
            mint_lock.release()

    def forget_token(self, installation_id: int, token: str) -> None:
        """Drop a token GitHub rejected, so the next `installation_token` mints a new one."""
        with self._lock:
            cached = self._tokens.get(installation_id)
            # Only the rejected token: another thread may already have minted a good one.
            if cached is not None and cached.token == token:
                del self._tokens[installation_id]

    def jwt(self) -> str:
        """A short-lived JWT identifying the App: for the App's own endpoints (`/app/...`), and to mint tokens."""
        now = int(self._clock())
        claims = {"iat": now - JWT_BACKDATE, "exp": now + JWT_LIFETIME, "iss": self.app_id}
        return jwt.encode(claims, self._key, algorithm="RS256")

    def _mint(self, installation_id: int) -> _CachedToken:
        path = f"/app/installations/{int(installation_id)}/access_tokens"
        answer = self._post(path, {"Authorization": f"Bearer {self.jwt()}"})
        # Not recorded in the client's `rate_limit`: App (JWT) requests draw on another budget than the installation's.
        if answer.status_code == 401:
            raise Unauthorized("GitHub rejected the App's JWT (wrong key, app id or clock)", status=401)
        if answer.status_code == 404:
            raise Forbidden("the GitHub App installation was not found", reason="no_installation", status=404)
        if answer.status_code not in (200, 201):
            raise_for(answer, self._clock())
        try:
            body = json_of(answer.body)
            token = body["token"]
            expiry = datetime.fromisoformat(body["expires_at"])
            # GitHub writes UTC ("…Z"); a stamp without zone is read as UTC too, never as local time.
            expires_at = (expiry if expiry.tzinfo else expiry.replace(tzinfo=UTC)).timestamp()
        except (ValueError, KeyError, TypeError):
            raise Transient("bad_json", "GitHub's installation token answer was unreadable", status=200) from None
        if not isinstance(token, str) or not token:
            raise Transient("bad_json", "GitHub's installation token answer had no token", status=200)
        return _CachedToken(token=token, expires_at=expires_at)
