"""`python -m bench.inproc`: CPU per delivery measured in one process, for low-noise A/B of levers.

Sends signed ci-mix (or full-mix) bodies of bench/payloads.py straight through the
WSGI app (no HTTP server, no test client), one after another, against a scratch
database, and prints one JSON line: the process's CPU per delivery (time.process_time)
and that of its PostgreSQL backends (/proc of the backends of the scratch database);
then the same bodies through the floor's bare route (bench/floor.py) in the same harness,
and the service's CPU above it (`above_floor_ms`): the service's own work, without the
HTTP server's cost that `python -m bench` measures with it.
prometheus_client runs in multiprocess mode, as under gunicorn. The app's log lines
go to stderr: redirect it (`2>/dev/null`) as gunicorn's would go to a pipe.

    .venv/bin/python -m bench.inproc --count 3000 --warmup 1000 2>/dev/null
    .venv/bin/python -m bench.inproc --cprofile /tmp/prof.out 2>/dev/null

Serial, single-threaded: the database figures have no lock waits; judge database
levers in `python -m bench` as well.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _backend_cpu(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def _resolve(path: str) -> tuple[Any, str]:
    """The object holding the last name of a dotted path (a module, or a class in one), and that name."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:-1]:
            owner = getattr(owner, attribute)
        return owner, parts[-1]
    raise ValueError(f"cannot resolve {path}")


def _sender(wsgi: Any, statuses: dict[str, int]) -> Any:
    """`send(event, body, signature)`: one request through a WSGI app, its status counted in `statuses`."""

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        statuses[status] = statuses.get(status, 0) + 1
        return None

    def send(event: str, body: bytes, signature: str) -> None:
        environ = {
            "REQUEST_METHOD": "POST",
            "SCRIPT_NAME": "",
            "PATH_INFO": "/webhook",
            "QUERY_STRING": "",
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8000",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1",
            "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": str(len(body)),
            "HTTP_HOST": "127.0.0.1:8000",
            "HTTP_USER_AGENT": "GitHub-Hookshot/bench",
            "HTTP_X_GITHUB_EVENT": event,
            "HTTP_X_GITHUB_DELIVERY": str(uuid.uuid4()),
            "HTTP_X_GITHUB_HOOK_ID": "123456",
            "HTTP_X_HUB_SIGNATURE_256": signature,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
        }
        result = wsgi(environ, start_response)
        try:
            for _ in result:
                pass
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()

    return send


def _floor_cpu_ms(requests: list[Any], warmup: int) -> float:
    """CPU per request of the floor's bare route (bench/floor.py) through the same harness, same bodies."""
    from .floor import app

    statuses: dict[str, int] = {}
    send = _sender(app.wsgi_app, statuses)
    for item in requests[:warmup]:
        send(*item)
    started = time.process_time()
    for item in requests[warmup:]:
        send(*item)
    return 1000 * (time.process_time() - started) / (len(requests) - warmup)


def _alternate(args: argparse.Namespace, requests: list[Any], send: Any, pids: list[int]) -> dict[str, Any]:
    """Blocks of deliveries alternately as is (A) and with the --swap replacements (B), ABBA order."""
    swaps = []
    for item in args.swap:
        target, _, replacement = item.partition("=")
        owner, name = _resolve(target)
        source, other = _resolve(replacement)
        swaps.append((owner, name, getattr(owner, name), getattr(source, other)))
    totals = {"A": [0.0, 0.0, 0], "B": [0.0, 0.0, 0]}
    blocks = [requests[i : i + args.block] for i in range(0, len(requests), args.block)]
    for n, block in enumerate(blocks):
        side = "AB"[(n % 4) in (1, 2)]
        for owner, name, original, replacement in swaps:
            setattr(owner, name, replacement if side == "B" else original)
        pg0, cpu0 = _backend_cpu(pids), time.process_time()
        for item in block:
            send(*item)
        totals[side][0] += time.process_time() - cpu0
        totals[side][1] += _backend_cpu(pids) - pg0
        totals[side][2] += len(block)
    for owner, name, original, _ in swaps:
        setattr(owner, name, original)
    return {
        side: {
            "deliveries": count,
            "worker_cpu_ms": round(1000 * cpu / count, 3),
            "postgres_cpu_ms": round(1000 * pg / count, 3),
        }
        for side, (cpu, pg, count) in totals.items()
    } | {"swap": args.swap}


def main(argv: list[str] | None = None) -> int:
    """Measure; print one JSON line."""
    p = argparse.ArgumentParser(prog="python -m bench.inproc")
    p.add_argument("--count", type=int, default=3000)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--mix", choices=("ci", "full"), default="ci")
    p.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--cprofile", type=Path, help="write a cProfile of the measured phase here")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument(
        "--swap",
        action="append",
        default=[],
        metavar="MODULE.NAME=MODULE.OTHER",
        help="A/B in one process: alternate blocks of deliveries with MODULE.NAME as is and replaced by OTHER",
    )
    p.add_argument("--block", type=int, default=200, help="deliveries per block with --swap (default 200)")
    args = p.parse_args(argv)
    for item in args.env:
        name, _, value = item.partition("=")
        os.environ[name] = value

    metrics_dir = tempfile.mkdtemp(prefix="flowlens-inproc-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir

    import sqlalchemy as sa

    from flowlens_ingest.config import Settings
    from flowlens_ingest.events.signature import sign
    from flowlens_ingest.web.app import create_app
    from flowlens_ingest.web.services import services

    from .__main__ import scratch_database
    from .payloads import MIXES, Generator, Shape, bodies, default_payload_dir, load_templates

    secret = b"inproc-benchmark-secret-0123456789"
    generator = Generator(load_templates(default_payload_dir()), Shape(), seed=1, mix=MIXES[args.mix])
    total = args.warmup + args.count
    requests = []
    for event, body in bodies(generator, 0, total):
        requests.append((event, body, sign(body, secret)))

    with scratch_database(args.admin_url, keep=False) as url, tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            database_url=url,
            secrets=(secret,),
            data_dir=Path(tmp),
            spool_dir=Path(tmp) / "spool",
            isolation_level=os.environ.get("FLOWLENS_ISOLATION_LEVEL", "READ COMMITTED"),
        )
        app = create_app(settings)
        statuses: dict[str, int] = {}
        send = _sender(app.wsgi_app, statuses)

        for item in requests[: args.warmup]:
            send(*item)
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            pids = [
                int(r[0])
                for r in conn.execute(
                    sa.text(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                )
            ]
        engine.dispose()
        profiler = None
        if args.cprofile:
            import cProfile

            profiler = cProfile.Profile(time.process_time)
        statuses.clear()
        if args.swap:
            print(json.dumps(_alternate(args, requests[args.warmup :], send, pids)), flush=True)
            services(app).database.dispose()
            return 0
        pg0, cpu0, wall0 = _backend_cpu(pids), time.process_time(), time.perf_counter()
        if profiler:
            profiler.enable()
        for item in requests[args.warmup :]:
            send(*item)
        if profiler:
            profiler.disable()
        cpu1, wall1, pg1 = time.process_time(), time.perf_counter(), _backend_cpu(pids)
        if profiler:
            profiler.dump_stats(str(args.cprofile))
        services(app).database.dispose()
    worker_ms = 1000 * (cpu1 - cpu0) / args.count
    floor_ms = _floor_cpu_ms(requests, args.warmup)
    print(
        json.dumps(
            {
                "mix": args.mix,
                "count": args.count,
                "worker_cpu_ms": round(worker_ms, 3),
                # The bare route through this same harness: what Flask alone costs a request here.
                "floor_cpu_ms": round(floor_ms, 3),
                "above_floor_ms": round(worker_ms - floor_ms, 3),
                "postgres_cpu_ms": round(1000 * (pg1 - pg0) / args.count, 3),
                "wall_ms": round(1000 * (wall1 - wall0) / args.count, 3),
                "statuses": statuses,
                "backends": len(pids),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
