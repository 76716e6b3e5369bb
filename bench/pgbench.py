"""The database's own limit: pgbench (a C client) on the two-upsert transaction of the issue.

Two tables shaped like a repository row and a pipeline row; each transaction upserts
one of 50 repositories (RETURNING its id) and one of its 20 PRs, in 4 round trips.
This is the floor any ingestion service's cost is compared with.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg2

SCHEMA = """
DROP TABLE IF EXISTS pipes, repos;
CREATE TABLE repos (id bigserial PRIMARY KEY, github_id bigint UNIQUE, full_name text, updated_at timestamptz);
CREATE TABLE pipes (id bigserial PRIMARY KEY, repo_id bigint, pr_number int, status_build text, processed bool,
                    updated_at timestamptz, UNIQUE (repo_id, pr_number));
"""

SCRIPT = r"""\set r random(1, 50)
\set n random(1, 20)
BEGIN;
INSERT INTO repos (github_id, full_name, updated_at) VALUES (900000 + :r, 'acme/svc-' || :r, now())
  ON CONFLICT (github_id) DO UPDATE SET full_name = EXCLUDED.full_name, updated_at = now() RETURNING id \gset
INSERT INTO pipes (repo_id, pr_number, status_build, processed, updated_at) VALUES (:id, :n, 'passed', FALSE, now())
  ON CONFLICT (repo_id, pr_number) DO UPDATE SET status_build = EXCLUDED.status_build, processed = FALSE, updated_at = now();
COMMIT;
"""


@dataclass(frozen=True)
class PgbenchLimit:
    """What pgbench achieved, and what it and the server spent per transaction."""

    clients: int
    seconds: float
    tx_per_s: float
    pgbench_cpu_ms_per_tx: float
    postgres_cpu_ms_per_tx: float


def _machine_busy_s() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def measure(dsn: str, *, clients: int = 4, seconds: float = 10) -> PgbenchLimit:
    """Run pgbench for `seconds` with `clients` connections on its own two tables; then drop them."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(SCHEMA)
        with tempfile.NamedTemporaryFile("w", suffix=".sql") as script:
            script.write(SCRIPT)
            script.flush()
            before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
            busy_before = _machine_busy_s()
            done = subprocess.run(
                [
                    "pgbench",
                    "-n",
                    "-c",
                    str(clients),
                    "-j",
                    str(min(clients, 2)),
                    "-T",
                    str(int(seconds)),
                    "-f",
                    script.name,
                    dsn,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            busy = _machine_busy_s() - busy_before
            after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
        match = re.search(r"tps = ([0-9.]+)", done.stdout)
        count = re.search(r"number of transactions actually processed: (\d+)", done.stdout)
        if match is None or count is None:
            raise RuntimeError(f"unexpected pgbench output:\n{done.stdout}\n{done.stderr}")
        transactions = int(count.group(1))
        pgbench_cpu = (after_children.ru_utime - before_children.ru_utime) + (
            after_children.ru_stime - before_children.ru_stime
        )
        with conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS pipes, repos")
    finally:
        conn.close()
    return PgbenchLimit(
        clients=clients,
        seconds=seconds,
        tx_per_s=float(match.group(1)),
        pgbench_cpu_ms_per_tx=round(1000 * pgbench_cpu / transactions, 3),
        # The machine's busy time less pgbench's own: the server's (and the OS's) share.
        postgres_cpu_ms_per_tx=round(1000 * (busy - pgbench_cpu) / transactions, 3),
    )
