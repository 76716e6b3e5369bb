"""`python -m bench.hang`: answer times through a hung database, under steady open-loop traffic.

1. Creates a scratch database (as `python -m bench` does) and starts `flowlens-ingest
   serve` on it through a TCP proxy on loopback (bench/proxy.py) that can freeze:
   accept every connection and hold every byte, as a partition or a stopped node does.
   Only the connections through the proxy hang: safe on a server others use.
2. Sends signed deliveries of the full mix (bench/payloads.py) open loop
   (bench/openloop.py): `--rate` a second, each on its own connection when due,
   whatever the answers. Healthy for `--healthy` s, frozen for `--hang` s, then
   `--after` s after the heal.
3. Waits (bounded) until the spool is empty and counts what the journal holds.
4. Prints one JSON line: per phase (by when a delivery was due: healthy, hung,
   healed) the answer time from when it was due, p50 / p99 / max, the non-2xx,
   and the outcomes; the seconds from the heal to an empty spool; deliveries
   sent and journaled.

    .venv/bin/python -m bench.hang --rate 40
    .venv/bin/python -m bench.hang --rate 200 --workers 2 --threads 4
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from flowlens_ingest.events.signature import sign
from flowlens_ingest.spool.folder import SUFFIX
from flowlens_ingest.store.schema import webhook_deliveries

from . import openloop
from .__main__ import DEFAULT_ADMIN_URL, Service, machine, scratch_database
from .payloads import Generator, Shape, bodies, default_payload_dir, load_templates
from .proxy import FreezingProxy

# How long the spool may take to drain after the load before the run gives up waiting.
DRAIN_LIMIT_S = 300.0
# How often the spool's files are counted.
WATCH_S = 0.2


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries only the JSON summary."""
    print(f"bench.hang: {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.hang", description=__doc__.split("\n")[0])
    parser.add_argument("--admin-url", default=os.environ.get("FLOWLENS_BENCH_ADMIN_URL", DEFAULT_ADMIN_URL))
    parser.add_argument("--rate", type=float, default=40.0, help="deliveries a second (default 40)")
    parser.add_argument("--healthy", type=float, default=5.0, help="seconds before the hang (default 5)")
    parser.add_argument("--hang", type=float, default=15.0, help="seconds the database hangs (default 15)")
    parser.add_argument("--after", type=float, default=10.0, help="seconds sent after the heal (default 10)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    parser.add_argument("--threads", type=int, default=4, help="threads per worker (default 4)")
    parser.add_argument("--timeout", type=float, default=60.0, help="a request's limit, seconds (default 60)")
    parser.add_argument("--keep-db", action="store_true", help="keep the scratch database")
    return parser.parse_args(argv)


def signed_deliveries(count: int, secret: str) -> list[openloop.Delivery]:
    """`count` signed deliveries of the full mix, each with its own GUID."""
    generator = Generator(load_templates(default_payload_dir()), Shape())
    deliveries = []
    for event, body in bodies(generator, 0, count):
        delivery_id = str(uuid.uuid4())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "GitHub-Hookshot/bench",
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": delivery_id,
            "X-GitHub-Hook-ID": "123456",
            "X-Hub-Signature-256": sign(body, secret.encode()),
        }
        deliveries.append(openloop.Delivery(delivery_id, body, headers))
    return deliveries


def phase(answers: list[openloop.Answer]) -> dict[str, Any]:
    """Answer times and outcomes of some deliveries."""
    figures: dict[str, Any] = dict(openloop.summary(answers))
    figures["non_2xx"] = sum(1 for a in answers if a.status is None or not 200 <= a.status < 300)
    figures["outcomes"] = dict(Counter(a.outcome or str(a.status) for a in answers))
    return figures


class SpoolWatch(threading.Thread):
    """Counts the spool's files every WATCH_S: the deepest it got, and when it was empty again after the heal."""

    def __init__(self, folder: Path, healed_at: float) -> None:
        super().__init__(name="spool-watch", daemon=True)
        self.folder = folder
        self.healed_at = healed_at
        self.deepest = 0
        self.left = 0
        self.empty_s_after_heal: float | None = None
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        """Sample until the spool is empty after the heal (or wait_empty gives up)."""
        while not self.done.wait(WATCH_S):
            self.left = sum(1 for _ in self.folder.glob(f"*{SUFFIX}")) if self.folder.is_dir() else 0
            self.deepest = max(self.deepest, self.left)
            now = time.monotonic()
            if now > self.healed_at and self.left == 0:
                self.empty_s_after_heal = round(now - self.healed_at, 1)
                return

    def wait_empty(self, limit_s: float) -> None:
        """Wait up to `limit_s` for the spool to be empty after the heal."""
        self.join(limit_s)
        self.done.set()


def main(argv: list[str] | None = None) -> int:
    """Run the measurement; print one JSON summary line on stdout."""
    args = parse_args(argv)
    secret = secrets.token_hex(20)
    healthy, hung, after = (round(args.rate * s) for s in (args.healthy, args.hang, args.after))
    log(f"signing {healthy + hung + after} deliveries")
    deliveries = signed_deliveries(healthy + hung + after, secret)
    env = {"FLOWLENS_WORKERS": str(args.workers), "FLOWLENS_THREADS": str(args.threads)}
    with scratch_database(args.admin_url, args.keep_db) as url, tempfile.TemporaryDirectory() as workdir:
        proxy, proxied = FreezingProxy.to(url)
        service = Service(proxied, secret, Path(workdir), env)
        try:
            service.wait_ready()
            schedule = openloop.Schedule(
                deliveries, args.rate, before={healthy: proxy.freeze, healthy + hung: proxy.heal}
            )
            log(f"{args.rate:g}/s open loop: {args.healthy:g} s healthy, {args.hang:g} s hung, {args.after:g} s healed")
            spool = SpoolWatch(
                Path(workdir) / "data" / "spool", healed_at=time.monotonic() + (healthy + hung) / args.rate
            )
            answers = openloop.run("127.0.0.1", service.port, schedule, timeout_s=args.timeout)
            spool.wait_empty(DRAIN_LIMIT_S)
        finally:
            service.stop()
            proxy.close()
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            journaled = conn.execute(sa.select(sa.func.count()).select_from(webhook_deliveries)).scalar_one()
        engine.dispose()
    result = {
        "rate": args.rate,
        "workers": args.workers,
        "threads": args.threads,
        "seconds": {"healthy": args.healthy, "hung": args.hang, "healed": args.after},
        "healthy": phase(answers[:healthy]),
        "hung": phase(answers[healthy : healthy + hung]),
        "healed": phase(answers[healthy + hung :]),
        "all": phase(answers),
        "spool_deepest": spool.deepest,
        "spool_left": spool.left,
        "spool_empty_s_after_heal": spool.empty_s_after_heal,
        "sent": len(deliveries),
        "journaled": journaled,
        "machine": machine(),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
