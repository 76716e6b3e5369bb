"""`python -m bench.spool`: what the outage path costs, by how much the spool already holds.

1. Put latency: for each depth (`--depths`, default 0, 2,000 and 20,000 deliveries
   already spooled), `--puts` calls of Spool.put with a real ~13 KB delivery body,
   one after another, in this process; their p50, p99 and max. The files already
   there are written directly, in the spool's own format, as earlier writes of any
   worker would have left them; writing them through put would make an O(n) put
   (as it was before the estimate) take minutes to set up 20,000.
2. The drainer's tick at the deepest depth: one Spool.depth() (a listing of the folder)
   and one Spool.used_bytes() (the listing and every file's size: the tick's scan).
3. Drain rate, spool side: one Spool.drain of the deepest folder with a handler that
   does nothing (read, unlink, in arrival order).
4. Drain rate against a real database: `--drain` signed deliveries of the ci mix
   (bench/payloads.py) put into an empty spool, then one Spool.drain with the
   service's own handler (spool.drainer.spool_handler) on a scratch database.

Prints one JSON line (progress on stderr). The spool folder is a temporary one under
`--dir` (default: the system's), so its file system decides what an fsync costs.

    .venv/bin/python -m bench.spool
    .venv/bin/python -m bench.spool --depths 0 20000 --puts 500 --no-database
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from flowlens_ingest.events.enums import Outcome
from flowlens_ingest.events.envelope import Envelope
from flowlens_ingest.events.hooks import HookTarget
from flowlens_ingest.ingest import Result
from flowlens_ingest.spool.folder import SUFFIX, Spool

from .payloads import MIXES, Generator, Shape, bodies, default_payload_dir, load_templates

# A repository hook's delivery, as GitHub's headers name it.
TARGET = HookTarget("repository", 1296269)


def envelope(delivery_id: str, event: str = "check_run") -> Envelope:
    """The envelope of a bench delivery from a repository hook."""
    return Envelope(
        delivery_id=delivery_id, hook_id=123456, event=event, content_type="application/json", hook_target=TARGET
    )


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries only the JSON summary."""
    print(f"bench.spool: {message}", file=sys.stderr, flush=True)


def prefill(directory: Path, count: int, body: bytes) -> None:
    """`count` spooled deliveries written straight into `directory`, in the spool's file format."""
    directory.mkdir(parents=True, exist_ok=True)
    start = time.time_ns() - 10**12
    for n in range(count):
        header = envelope(f"prefill-{n}").spool_header(start + n)
        data = header + b"\n" + body
        name = f"{start + n:020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{len(data)}{SUFFIX}"
        (directory / name).write_bytes(data)


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0-100) of `samples`, nearest rank, in milliseconds rounded to 0.01."""
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))
    return round(ordered[rank] * 1000, 2)


def put_latency(root: Path, depth: int, puts: int, body: bytes) -> dict[str, Any]:
    """Time `puts` puts into a spool that already holds `depth` deliveries."""
    directory = root / f"depth-{depth}"
    prefill(directory, depth, body)
    spool = Spool(directory, 1 << 40)
    samples = []
    for n in range(puts):
        began = time.perf_counter()
        accepted = spool.put(envelope(f"bench-{depth}-{n}"), body)
        samples.append(time.perf_counter() - began)
        if not accepted:
            raise SystemExit(f"bench.spool: put refused at depth {depth}")
    return {
        "depth": depth,
        "p50_ms": percentile(samples, 50),
        "p99_ms": percentile(samples, 99),
        "max_ms": round(max(samples) * 1000, 2),
        "mean_ms": round(statistics.fmean(samples) * 1000, 2),
    }


def spool_side(root: Path, depth: int) -> dict[str, Any]:
    """A listing (depth), a scan (used_bytes) and a drain that applies nothing, on the folder of `depth`."""
    spool = Spool(root / f"depth-{depth}", 1 << 40)
    began = time.perf_counter()
    held = spool.depth()
    listing = time.perf_counter() - began
    began = time.perf_counter()
    spool.used_bytes()
    scan = time.perf_counter() - began
    began = time.perf_counter()
    drained, _ = spool.drain(lambda item: Result.stored(Outcome.APPLIED))
    elapsed = time.perf_counter() - began
    return {
        "depth": held,
        "listing_ms": round(listing * 1000, 2),
        "scan_ms": round(scan * 1000, 2),
        "drained": drained,
        "per_s": round(drained / elapsed),
    }


def against_database(admin_url: str, root: Path, count: int) -> dict[str, Any]:
    """Spool `count` real deliveries, then drain them into a scratch database with the service's handler."""
    from flowlens_ingest.config import Settings
    from flowlens_ingest.spool.drainer import spool_handler
    from flowlens_ingest.web.app import create_app
    from flowlens_ingest.web.services import services

    from .__main__ import scratch_database

    generator = Generator(load_templates(default_payload_dir()), Shape(), seed=1, mix=MIXES["ci"])
    spool = Spool(root / "drain", 1 << 40)
    for event, body in bodies(generator, 0, count):
        spool.put(envelope(str(uuid.uuid4()), event), body)
    with scratch_database(admin_url, keep=False) as url:
        settings = Settings(database_url=url, secrets=(b"bench-spool-secret-0123456789",), data_dir=root)
        app = create_app(settings)
        # A line per applied delivery would drown the progress lines.
        logging.getLogger("flowlens_ingest").setLevel(logging.WARNING)
        svc = services(app)
        handle = spool_handler(svc.database, svc.settings, svc.metrics)
        began = time.perf_counter()
        drained, _ = spool.drain(handle)
        elapsed = time.perf_counter() - began
        services(app).database.dispose()
    return {"spooled": count, "drained": drained, "per_s": round(drained / elapsed), "left": spool.depth()}


def main(argv: list[str] | None = None) -> int:
    """Measure; print one JSON line."""
    p = argparse.ArgumentParser(prog="python -m bench.spool")
    p.add_argument("--depths", type=int, nargs="+", default=[0, 2000, 20000])
    p.add_argument("--puts", type=int, default=300, help="puts timed at each depth (default 300)")
    p.add_argument("--drain", type=int, default=2000, help="deliveries drained into the database (default 2000)")
    p.add_argument("--no-database", action="store_true", help="skip the drain into a real database")
    p.add_argument(
        "--admin-url",
        default=os.environ.get("FLOWLENS_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    p.add_argument("--dir", type=Path, default=None, help="where the temporary spool folders go")
    args = p.parse_args(argv)

    generator = Generator(load_templates(default_payload_dir()), Shape(), seed=2, mix=MIXES["ci"])
    # One body of the usual size (~13 KB, see docs/benchmark.md) for every put.
    body = min((b for _, b in bodies(generator, 0, 50)), key=lambda b: abs(len(b) - 13_000))
    result: dict[str, Any] = {"body_bytes": len(body)}
    with tempfile.TemporaryDirectory(prefix="flowlens-bench-spool-", dir=args.dir) as tmp:
        root = Path(tmp)
        puts = []
        for depth in args.depths:
            log(f"put latency at depth {depth}")
            puts.append(put_latency(root, depth, args.puts, body))
        result["put"] = puts
        log(f"spool-side drain at depth {max(args.depths)}")
        result["spool_side"] = spool_side(root, max(args.depths))
        if not args.no_database:
            log(f"drain of {args.drain} deliveries into a scratch database")
            result["drain_to_database"] = against_database(args.admin_url, root, args.drain)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
