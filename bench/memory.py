"""`python -m bench.memory`: what large signed deliveries cost the service in memory, and whether it comes back.

1. Creates a scratch database on the admin URL's server and starts `flowlens-ingest serve`
   on it (gunicorn, the service's default workers unless told), as `python -m bench` does.
2. Sends `--count` (default 48) signed push deliveries of about `--mb` MB each (default 20):
   GitHub's push payload with 2,048 commits (its cap) each listing a few hundred modified
   files, about 30 bytes a JSON element, as a large real push is. `--concurrency` at a
   time (default 16), each on its own connection.
3. Samples the service's memory every 0.1 s throughout: the PSS (proportional set size,
   psutil's memory_full_info().pss) of every gunicorn process, master and workers, summed.
   PSS counts pages shared between the forked workers once, so the sum is what the
   service costs the machine. Prints the figure before, the peak, and 30 s (`--settle`)
   after the last answer, and how many deliveries the journal holds by then (the warm-up's
   8 included; spooled ones count once the drainer has applied them).
4. Sends one signed body of 8.6 million `[]` (`--nested`; 0 skips), four at once: each must
   be answered 202 `failed` (journaled, bytes kept), with the peak memory while they are.

Prints one JSON line (progress on stderr); exit 1 when a delivery was not answered 2xx
or a bound (`--bound-mb`, `--returned-mb`) was not met.

    .venv/bin/python -m bench.memory
    .venv/bin/python -m bench.memory --count 8 --concurrency 4 --settle 10
"""

from __future__ import annotations

import argparse
import copy
import http.client
import json
import os
import secrets
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa

from flowlens_ingest.events.signature import sign
from flowlens_ingest.store.schema import webhook_deliveries

from .__main__ import DEFAULT_ADMIN_URL, Service, scratch_database

MB = 1_000_000
PUSH = Path(__file__).resolve().parent.parent / "tests" / "payloads" / "push" / "with-new-branch.payload.json"
# GitHub lists at most 2,048 commits in a push payload.
COMMITS = 2048


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries only the JSON summary."""
    print(f"bench.memory: {message}", file=sys.stderr, flush=True)


def large_push(size: int) -> bytes:
    """A push payload of about `size` bytes: 2,048 commits, each modifying enough files to get there."""
    payload = json.loads(PUSH.read_text())
    template = payload["commits"][0]
    per_commit = max(size // COMMITS, 600)
    files_per_commit = max((per_commit - len(json.dumps(template))) // 36, 1)
    commits = []
    for n in range(COMMITS):
        commit = copy.deepcopy(template)
        commit["id"] = f"{n:040x}"
        commit["message"] = f"Change {n}: update the modules"
        commit["modified"] = [f"src/module_{n % 97:02d}/component_{k:05d}.py" for k in range(files_per_commit)]
        commits.append(commit)
    payload["commits"] = commits
    payload["head_commit"] = commits[-1]
    return json.dumps(payload).encode()


def nested_lists(count: int) -> bytes:
    """A JSON object holding one list of `count` empty lists: tiny text, a huge parse."""
    return b'{"zen": "lists", "lists": [' + b"[]," * (count - 1) + b"[]]}"


def post(url: str, body: bytes, event: str, signature: str) -> tuple[int, str]:
    """One signed delivery on its own connection: its status and outcome."""
    target = url.removeprefix("http://")
    conn = http.client.HTTPConnection(target, timeout=60)
    try:
        conn.request(
            "POST",
            "/webhook",
            body=body,
            headers={
                "Content-Type": "application/json",
                "X-GitHub-Event": event,
                "X-GitHub-Delivery": str(uuid.uuid4()),
                "X-GitHub-Hook-ID": "123456",
                "X-Hub-Signature-256": signature,
            },
        )
        answer = conn.getresponse()
        data = answer.read()
    finally:
        conn.close()
    try:
        answered = json.loads(data)
        outcome = answered.get("outcome") or answered.get("error", "")
    except ValueError:
        outcome = data[:100].decode(errors="replace")
    return answer.status, str(outcome)


def service_pss(service: Service) -> float:
    """The PSS of the gunicorn master and its workers, in MB (processes gone meanwhile count 0)."""
    master = service.master()
    total = 0
    for pid in [master, *service.workers()] if master else []:
        try:
            total += psutil.Process(pid).memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total / MB


class Sampler(threading.Thread):
    """Samples a figure every `interval` s until stopped; keeps the highest."""

    def __init__(self, measure: Callable[[], float], interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.measure = measure
        self.interval = interval
        self.peak = 0.0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.peak = max(self.peak, self.measure())
            self.stopping.wait(self.interval)

    def stop(self) -> float:
        """Stop sampling; the peak seen."""
        self.stopping.set()
        self.join(timeout=10)
        return round(self.peak, 1)


def burst(service: Service, bodies: list[tuple[bytes, str]], concurrency: int, secret: str) -> dict[str, Any]:
    """Send every body, `concurrency` at a time; the answers by status and outcome, and the peak PSS."""
    signatures = {id(body): sign(body, secret.encode()) for body, _ in bodies}
    sampler = Sampler(lambda: service_pss(service))
    sampler.start()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(lambda item: post(service.url, item[0], item[1], signatures[id(item[0])]), bodies))
    peak = sampler.stop()
    tally: dict[str, int] = {}
    for status, outcome in answers:
        tally[f"{status} {outcome}"] = tally.get(f"{status} {outcome}", 0) + 1
    return {"answers": tally, "peak_mb": peak, "all_2xx": all(200 <= s < 300 for s, _ in answers)}


def journaled(url: str) -> int:
    """How many deliveries the journal holds (the spooled ones count once the drainer applied them)."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(webhook_deliveries)).scalar_one())
    finally:
        engine.dispose()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m bench.memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--admin-url",
        default=os.environ.get("FLOWLENS_BENCH_ADMIN_URL", DEFAULT_ADMIN_URL),
        help="a PostgreSQL URL allowed to CREATE DATABASE (env FLOWLENS_BENCH_ADMIN_URL)",
    )
    p.add_argument("--count", type=int, default=48, help="large deliveries (default 48)")
    p.add_argument("--mb", type=float, default=20, help="size of each, in MB (default 20)")
    p.add_argument("--concurrency", type=int, default=16, help="at once (default 16)")
    p.add_argument("--settle", type=float, default=30, help="seconds after the burst to measure again (default 30)")
    p.add_argument("--nested", type=int, default=8_600_000, help="empty lists in the absurd body (0 skips)")
    p.add_argument("--workers", type=int, help="FLOWLENS_WORKERS (default: the service's own default)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="more service environment")
    p.add_argument("--log", type=Path, help="keep the service's log here")
    p.add_argument("--bound-mb", type=float, default=1200, help="the peak PSS bound to check (default 1200)")
    p.add_argument(
        "--returned-mb", type=float, default=400, help="at most this above the start, --settle s after (default 400)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the measurement; print one JSON line."""
    args = parse_args(argv)
    env = dict(item.partition("=")[::2] for item in args.env)
    if args.workers:
        env["FLOWLENS_WORKERS"] = str(args.workers)
    secret = secrets.token_hex(16)
    log(f"building a {args.mb:g} MB push payload")
    body = large_push(int(args.mb * MB))
    result: dict[str, Any] = {
        "bench": "memory",
        "deliveries": args.count,
        "body_mb": round(len(body) / MB, 1),
        "concurrency": args.concurrency,
    }
    with scratch_database(args.admin_url, keep=False) as url, tempfile.TemporaryDirectory() as tmp:
        service = Service(url, secret, Path(tmp), env)
        try:
            service.wait_ready()
            result["workers"] = len(service.workers())
            # One small delivery each way first: every worker has imported and connected.
            burst(service, [(json.dumps(json.loads(PUSH.read_text())).encode(), "push")] * 8, 4, secret)
            result["start_mb"] = round(service_pss(service), 1)
            log(f"start: {result['start_mb']} MB; sending {args.count} x {result['body_mb']} MB")
            began = time.monotonic()
            large = burst(service, [(body, "push")] * args.count, args.concurrency, secret)
            result["large"] = large | {"seconds": round(time.monotonic() - began, 1)}
            log(f"large: {large}; settling {args.settle:g} s")
            time.sleep(args.settle)
            result["after_mb"] = round(service_pss(service), 1)
            result["journaled_after"] = journaled(url)
            if args.nested:
                log(f"sending 4 bodies of {args.nested:,} empty lists")
                nested = nested_lists(args.nested)
                result["nested"] = burst(service, [(nested, "push")] * 4, 4, secret) | {
                    "body_mb": round(len(nested) / MB, 1)
                }
                result["nested_after_mb"] = round(service_pss(service), 1)
        finally:
            service.stop()
            if args.log:
                args.log.write_bytes(service.log_path.read_bytes())
    ok = (
        large["all_2xx"]
        and large["peak_mb"] < args.bound_mb
        and result["after_mb"] - result["start_mb"] < args.returned_mb
        and (not args.nested or result["nested"]["answers"] == {"202 failed": 4})
    )
    result["within_bounds"] = ok
    print(json.dumps(result), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
