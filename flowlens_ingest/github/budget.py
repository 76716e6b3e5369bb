"""GitHub's rate limits as a wall: one budget per credential, and until when GitHub told each one to wait.

GitHub gives every credential its own budget: each App installation's token, a personal or
fine-grained token, the App itself (its JWT), and its secondary limits apply per credential too:
https://docs.github.com/en/rest/using-the-rest-api/rate-limits-for-the-rest-api. Once GitHub says
wait (primary: `x-ratelimit-remaining: 0` until `x-ratelimit-reset`; secondary: `retry-after`, or a
403/429 that names the limit), "continuing to make requests while you are rate limited may result in
the banning of your integration" (same page). `Budgets` is what the client asks before every request
(`check`: RateLimited at once, no request, while a wait holds) and tells after every answer
(`observe`, `hold`). A `SharedWaits` (the database, waits.py) carries each wait to the other
processes using the same credential: serve's files worker, an operator's `recover` or `backfill`.

Credentials are named by keys that hold no secret: `installation:<id>`, `app:<id>`, and
`token:<first 12 hex digits of the token's SHA-256>`.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from flowlens_ingest.github.answers import MAX_RATE_WAIT_S, SECONDARY_DEFAULT_WAIT, RateLimit
from flowlens_ingest.github.errors import RateLimited, Transient, WaitReason


def token_key(token: str) -> str:
    """The budget key of a plain token: a prefix of its SHA-256, enough to tell tokens apart, useless to anyone else."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def installation_key(installation_id: int) -> str:
    """The budget key of a GitHub App installation (its tokens, whichever is current)."""
    return f"installation:{int(installation_id)}"


def app_key(app_id: str) -> str:
    """The budget key of the GitHub App itself (requests signed with its JWT)."""
    return f"app:{app_id}"


@dataclass(frozen=True)
class Wait:
    """GitHub asked a credential to send nothing before `until` (epoch seconds), for this reason."""

    until: float
    reason: WaitReason


class SharedWaits(Protocol):
    """Where waits are shared with other processes (the database).

    `wait_of` raises (NotSent) when the store cannot be read: not knowing another process's
    wait is not knowing there is none, so nothing is sent. `record` says False when the store
    cannot take a wait: this process honours it anyway, and Budgets writes it again before its
    next request with that credential.

    In seconds from now, never in epoch times: the processes may run on hosts whose clocks differ,
    so the store measures each wait on one clock of its own (the database's).
    """

    def wait_of(self, key: str) -> tuple[float, WaitReason] | None:
        """How many seconds are left of the latest wait any process recorded for this credential, and why; None if none."""

    def record(self, key: str, seconds: float, reason: WaitReason) -> bool:
        """Record a wait of `seconds` from now for this credential (a later end than what is stored wins); False when it could not."""


class Budgets:
    """Per credential: the latest primary rate-limit headers, and the wait GitHub asked for (here or in another process)."""

    def __init__(self, clock: Callable[[], float], shared: SharedWaits | None = None) -> None:
        self._clock = clock
        self.shared = shared
        self._lock = threading.Lock()
        self._waits: dict[str, Wait] = {}
        self._limits: dict[str, RateLimit] = {}
        # Secondary limits in a row per credential, since its last answer that was not one.
        self._strikes: dict[str, int] = {}
        # Per credential, held while this process sends a request with it (`turn`).
        self._turns: dict[str, threading.Lock] = {}
        # Credentials whose latest wait could not be shared (the store failed): shared again before
        # anything else is done with them, so another process, or this one restarted, still knows it.
        self._unshared: set[str] = set()
        self.latest = RateLimit(remaining=None, reset=None, limit=None)

    def _own_wait(self, key: str, now: float) -> Wait | None:
        """The wait this process knows for the credential, while it holds at `now`."""
        with self._lock:
            own = self._waits.get(key)
        return own if own is not None and own.until > now else None

    def own_wait(self, key: str) -> Wait | None:
        """The wait this process was told for the credential, while it holds (the shared ones not read)."""
        return self._own_wait(key, self._clock())

    def wait_of(self, key: str) -> Wait | None:
        """The wait that still holds for this credential (this process's or a shared one), or None."""
        now = self._clock()
        own = self._own_wait(key, now)
        if own is not None:
            if key in self._unshared:
                self._share(key, own, now)
            return own
        shared = self.shared.wait_of(key) if self.shared is not None else None
        if shared is not None and shared[0] > 0:
            wait = Wait(now + shared[0], shared[1])
            with self._lock:
                # A longer wait this process was told meanwhile (hold, another thread) is kept.
                current = self._waits.get(key)
                if current is not None and current.until >= wait.until:
                    return current
                self._waits[key] = wait
            return wait
        return None

    def check(self, key: str) -> None:
        """Raise RateLimited (`sent=False`) while GitHub's wait for this credential holds; the request is not made."""
        wait = self.wait_of(key)
        if wait is not None:
            raise RateLimited(wait.until, wait.reason, credential=key, sent=False)

    @contextlib.contextmanager
    def turn(self, key: str, timeout: float) -> Iterator[None]:
        """This process's one request at a time with this credential; Transient when the turn does not come within `timeout`.

        "Make requests for a single user or client ID serially" (GitHub's advice against secondary
        limits): the files worker and the recovery thread of one process take turns. Inside the
        turn every wait is read again, this process's and the shared ones (RateLimited,
        `sent=False`): no request goes out behind one that GitHub has just answered with a limit,
        here or in another process, however long this one queued (or minted its token) before.
        """
        with self._lock:
            lock = self._turns.setdefault(key, threading.Lock())
        if not lock.acquire(timeout=timeout):
            raise Transient("busy", f"another request with {key} held its turn past {timeout:g} s")
        try:
            self.check(key)
            yield
        finally:
            lock.release()

    def hold(self, key: str, until: float, reason: WaitReason) -> None:
        """GitHub asked this credential to wait until `until`: remember it, and share it.

        A secondary limit that follows another with no answer between waits at least twice as long
        as the one before (a minute, two, four, up to an hour): "if your request continues to fail
        due to a secondary rate limit, wait for an exponentially increasing amount of time between
        retries" (GitHub's rate-limit docs).
        """
        now = self._clock()
        if reason == "secondary":
            with self._lock:
                strikes = self._strikes[key] = self._strikes.get(key, 0) + 1
            if strikes > 1:
                until = max(until, now + SECONDARY_DEFAULT_WAIT * 2 ** min(strikes - 1, 6))
        until = min(until, now + MAX_RATE_WAIT_S)
        with self._lock:
            current = self._waits.get(key)
            if current is not None and current.until >= until:
                return
            self._waits[key] = Wait(until, reason)
        self._share(key, Wait(until, reason), now)

    def _share(self, key: str, wait: Wait, now: float) -> None:
        """Tell the other processes of this wait; remembered as unshared until the store has taken it."""
        if self.shared is None:
            return
        with self._lock:
            # Marked first: a store that fails in any way, even by raising, leaves it to be shared again.
            self._unshared.add(key)
        if not self.shared.record(key, wait.until - now, wait.reason):
            return
        with self._lock:
            current = self._waits.get(key)
            if current is None or current.until <= wait.until:
                # Only a write of the wait that holds now (not of an older, shorter one) clears the mark.
                self._unshared.discard(key)

    def answered(self, key: str) -> None:
        """An answer of this credential that was no rate limit: the next secondary limit waits its minute again."""
        if key in self._strikes:
            with self._lock:
                self._strikes.pop(key, None)

    def observe(self, key: str, observed: RateLimit | None) -> None:
        """An answer's primary headers: kept per credential; none left before a future reset is a wait too."""
        if observed is None:
            # An answer that says nothing of the budget (a bare 502 from a proxy): keep what GitHub last told us.
            return
        with self._lock:
            self._limits[key] = observed
            self.latest = observed
        if observed.remaining == 0 and observed.reset is not None and observed.reset > self._clock():
            self.hold(key, observed.reset, "primary")

    def rate_limit(self, key: str) -> RateLimit:
        """The primary rate-limit headers of this credential's latest answer (None where unknown)."""
        with self._lock:
            return self._limits.get(key, RateLimit(remaining=None, reset=None, limit=None))

    def reserve_exhausted(self, key: str, reserve: int) -> float | None:
        """The reset time (at most an hour ahead) when this credential has fewer than `reserve` requests left; else None."""
        limit = self.rate_limit(key)
        if limit.remaining is None or limit.reset is None:
            return None
        now = self._clock()
        if limit.remaining < reserve and limit.reset > now:
            return min(limit.reset, now + MAX_RATE_WAIT_S)
        return None
