"""The database's own limit: a plain psycopg2 loop running a transaction shaped like a delivery.

Each of `clients` processes (processes, not threads: the loop must not wait on
one GIL) holds one connection and, for `seconds`, runs:

    BEGIN                                                  (sent by psycopg2)
    INSERT INTO repositories ... ON CONFLICT (github_id) DO UPDATE ... RETURNING id
    INSERT INTO pipeline_runs ... ON CONFLICT (repo_id, pr_number) DO UPDATE ...
    INSERT INTO webhook_deliveries ... (body: a real ~13 KB body, as its bytes)
    COMMIT

five round trips, over the same repositories and PRs shape as the service's
traffic, with no Python framework around it. With `batched=True` the three
statements travel as one multi-statement query opening the transaction, and
COMMIT follows: two round trips, as store/wire.py sends a delivery.

Plain SQL strings on purpose: this is the yardstick the service is compared
against, so it carries none of the service's code.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg2

REPOSITORY = """
INSERT INTO repositories (id, github_id, name, full_name, owner, github_updated_at)
VALUES (%(id)s, %(github_id)s, %(name)s, %(full_name)s, 'bench-org', now())
ON CONFLICT (github_id) DO UPDATE
SET name = EXCLUDED.name, full_name = EXCLUDED.full_name,
    github_updated_at = EXCLUDED.github_updated_at, updated_at = now()
RETURNING id"""

PIPELINE = """
INSERT INTO pipeline_runs (id, repo_id, pr_number, commit_sha, title, status_pr)
VALUES (%(id)s, {repo_id}, %(pr_number)s, %(sha)s, %(title)s, 'opened')
ON CONFLICT (repo_id, pr_number) DO UPDATE
SET commit_sha = EXCLUDED.commit_sha, title = EXCLUDED.title, status_pr = 'updated',
    processed = FALSE, version = pipeline_runs.version + 1, updated_at = now()"""

JOURNAL = """
INSERT INTO webhook_deliveries
    (delivery_id, hook_id, event, action, repository_github_id, body, content_type, payload_sha256, outcome,
     applied_at)
VALUES (%(delivery_id)s, 1, %(event)s, 'completed', %(github_id)s, %(payload)s, 'application/json', %(sha256)s,
        'applied', now())"""

REPO_ID_BASE = 800_000_000  # apart from the service phase's repositories


@dataclass(frozen=True)
class Limit:
    """What the loop achieved."""

    clients: int
    seconds: float
    transactions: int
    round_trips_per_tx: int
    p50_ms: float
    p99_ms: float

    @property
    def tx_per_s(self) -> float:
        """Committed transactions per second, all clients together."""
        return self.transactions / self.seconds


def _client(url: str, seconds: float, batched: bool, bodies: list[tuple[str, bytes]], seed: int, out: Any) -> None:
    try:
        out.put(_loop(url, seconds, batched, bodies, seed))
    except Exception as exc:  # reported to the parent, which fails the run at once
        out.put(f"limit client {seed}: {type(exc).__name__}: {exc}")


def _loop(url: str, seconds: float, batched: bool, bodies: list[tuple[str, bytes]], seed: int) -> list[float]:
    rng = random.Random(seed)
    conn = psycopg2.connect(url, application_name="flowlens-bench-limit")
    cur = conn.cursor()
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        event, body = bodies[n % len(bodies)]
        r = rng.randrange(200)
        params = {
            "id": str(uuid.uuid4()),
            "github_id": REPO_ID_BASE + r,
            "name": f"repo-{r}",
            "full_name": f"bench-org/repo-{r}",
            "pr_number": 1 + rng.randrange(15),
            "sha": hashlib.sha1(f"{seed}-{n}".encode()).hexdigest(),
            "title": f"Change {n}",
            "delivery_id": f"limit-{'b' if batched else 'p'}-{seed}-{n}",
            "event": event,
            "payload": body,
            "sha256": hashlib.sha256(body).hexdigest(),
        }
        started = time.perf_counter()
        if batched:
            # One query: the pipeline row finds the repository by github_id, as store/statements.py does.
            repo_id = "(SELECT id FROM repositories WHERE github_id = %(github_id)s)"
            parts = [
                b"BEGIN",
                cur.mogrify(REPOSITORY, params),
                cur.mogrify(PIPELINE.format(repo_id=repo_id), params),
                cur.mogrify(JOURNAL, params),
            ]
            conn.autocommit = True
            cur.execute(b";\n".join(parts))
            cur.execute("COMMIT")
            conn.autocommit = False
        else:
            cur.execute(REPOSITORY, params)
            (repo_uuid,) = cur.fetchone() or (None,)
            cur.execute(PIPELINE.format(repo_id="%(repo_id)s"), {**params, "repo_id": repo_uuid})
            cur.execute(JOURNAL, params)
            conn.commit()
        latencies.append(time.perf_counter() - started)
        n += 1
    conn.close()
    return latencies


def measure(
    url: str, bodies: list[tuple[str, bytes]], *, clients: int = 4, seconds: float = 20, batched: bool = False
) -> Limit:
    """Run the loop on `clients` processes for `seconds`; `url` is a libpq URL of the scratch database."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_client, args=(url, seconds, batched, bodies, seed, out)) for seed in range(clients)]
    for p in procs:
        p.start()
    # Bounded: every client stops at its deadline; the queue get times out otherwise.
    results = [out.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    errors = [r for r in results if isinstance(r, str)]
    if errors:
        raise RuntimeError("; ".join(errors))
    latencies = sorted(x for r in results for x in r)
    return Limit(
        clients,
        seconds,
        len(latencies),
        2 if batched else 5,
        percentile_ms(latencies, 0.50),
        percentile_ms(latencies, 0.99),
    )


def percentile_ms(sorted_seconds: list[float], q: float) -> float:
    """The q-quantile of sorted durations in seconds, in milliseconds."""
    if not sorted_seconds:
        return 0.0
    return round(sorted_seconds[min(len(sorted_seconds) - 1, int(q * len(sorted_seconds)))] * 1000, 2)
