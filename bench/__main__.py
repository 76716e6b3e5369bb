"""`python -m bench`: how fast the real service ingests, against what the database itself can do.

1. Creates a scratch database on the admin URL's server and migrates it.
2. Measures the database limit (bench/dblimit.py): 4 psycopg2 processes looping
   a delivery-shaped transaction.
3. Starts `flowlens-ingest serve` (gunicorn, default workers unless told) on it,
   warms it up, then drives it with wrk and bench/deliveries.lua: signed real
   payloads in a weighted mix (bench/payloads.py), 16 connections.
4. Prints one JSON line: deliveries/s, latency, non-2xx, SQL round trips per
   delivery (the service's flowlens_db_round_trips_total over its deliveries),
   the database limit, their ratio, worker memory and CPU, the machine.
5. Drops the scratch database.

`--runs 3` repeats it all and prints a last line with each figure's median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from flowlens_ingest.database_urls import normalize_database_url
from flowlens_ingest.store import migrate
from flowlens_ingest.store.schema import metadata

from . import dblimit, pgbench
from .payloads import MIXES, Generator, Shape, bodies, default_payload_dir, load_templates, write_requests
from .proxy import FreezingProxy

HERE = Path(__file__).resolve().parent
LUA = HERE / "deliveries.lua"
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries only the JSON summary."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --- scratch database ---------------------------------------------------------------------


@contextmanager
def scratch_database(admin_url: str, keep: bool) -> Iterator[str]:
    """A new, migrated database on the admin URL's server, dropped afterwards."""
    admin_url = normalize_database_url(admin_url)
    name = f"flowlens_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        migrate.upgrade(url)
        yield url
    finally:
        if keep:
            log(f"kept scratch database {name}")
        else:
            with admin.connect() as conn:
                conn.execute(
                    sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
                    {"d": name},
                )
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def libpq_url(url: str) -> str:
    """The SQLAlchemy URL as psycopg2.connect() takes it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def empty_tables(url: str) -> None:
    """Remove the limit loop's rows so the service starts on empty tables."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {', '.join(t.name for t in metadata.sorted_tables)} CASCADE"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE"))
    engine.dispose()


def analyze_tables(url: str) -> None:
    """ANALYZE the tables the warm-up filled, as autovacuum would in time.

    The service's prepared statements are planned on tables that were empty when the
    run began; without fresh statistics their cached plans keep scanning tables that
    have grown by thousands of rows since (autovacuum looks once a minute), and
    PostgreSQL's CPU per delivery then depends on whether it happened to look during
    the measured phase. ANALYZE invalidates those plans: the measured phase runs on
    plans made for tables of that size, as a service in production does.
    """
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("ANALYZE"))
    engine.dispose()


def server_version(url: str) -> str:
    """The PostgreSQL server's version."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        version = str(conn.execute(sa.text("SHOW server_version")).scalar_one())
    engine.dispose()
    return version


# --- processes ------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after it.
    return text[text.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    """Direct children of a process."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and int(fields[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time these processes have used so far."""
    return sum(cpu_times(pids))


def cpu_times(pids: list[int]) -> tuple[float, float]:
    """User and system CPU time these processes have used so far."""
    user = system = 0
    for pid in pids:
        fields = _stat(pid)
        if fields:
            user += int(fields[11])
            system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def worker_costs(pids: list[int]) -> tuple[float, float, int]:
    """User CPU seconds, system CPU seconds and context switches of these processes so far."""
    return (*cpu_times(pids), context_switches(pids))


def costs_per_request(
    before: tuple[float, float, int], after: tuple[float, float, int], requests: float
) -> dict[str, Any]:
    """What the workers spent a request between two worker_costs(): CPU (ms), of it in the kernel (ms), switches."""
    if not requests:
        return {"cpu_ms": None, "system_ms": None, "context_switches": None}
    user, system, switches = (a - b for a, b in zip(after, before, strict=True))
    return {
        "cpu_ms": round(1000 * (user + system) / requests, 3),
        "system_ms": round(1000 * system / requests, 3),
        "context_switches": round(switches / requests, 1),
    }


def context_switches(pids: list[int]) -> int:
    """Context switches so far, voluntary (a wait: a socket, a lock, the GIL) and not, of every thread of these processes."""
    total = 0
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                lines = (task / "status").read_text().splitlines()
            except OSError:
                continue
            total += sum(int(line.split()[1]) for line in lines if "ctxt_switches:" in line)
    return total


def postgres_cpu() -> dict[int, float]:
    """CPU seconds used so far by every PostgreSQL server process on the machine, by pid.

    Compared before and after the measured phase (new pids count whole): the service's
    backends may be replaced during a run (a recycled pool, a new sync worker), so a
    list of backend pids taken at the start would miss them.
    """
    found: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        if text[text.index("(") + 1 : text.rindex(")")] != "postgres":
            continue
        fields = text[text.rindex(")") + 2 :].split()
        found[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return found


def postgres_cpu_since(before: dict[int, float]) -> float:
    """PostgreSQL CPU seconds used since `before` was taken (processes that exited meanwhile are lost)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in postgres_cpu().items())


def database_backends(url: str) -> list[int]:
    """The pids of the server processes serving `url`'s database (the service's backends)."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        pids = conn.execute(
            sa.text("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
        ).scalars()
        found = sorted(int(pid) for pid in pids)
    engine.dispose()
    return found


def backend_cpu(pids: list[int]) -> dict[int, float]:
    """CPU seconds used so far by these server processes, by pid."""
    return {pid: cpu_seconds([pid]) for pid in pids}


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLK_TCK


def rss_mb(pid: int) -> float:
    """Resident memory of a process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version()}


# --- the service ------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Service:
    """`flowlens-ingest serve` on the scratch database, in its own process group.

    `floor`: instead, gunicorn with the service's own configuration serving bench/floor.py's bare route.
    """

    def __init__(
        self, database_url: str, secret: str, workdir: Path, env: dict[str, str], *, floor: bool = False
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.floor = floor
        name = "floor" if floor else "service"
        self.log_path = workdir / f"{name}.log"
        environment = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", "WEB_CONCURRENCY")}
        environment.update(
            DATABASE_URL=database_url,
            GITHUB_WEBHOOK_SECRET=secret,
            FLOWLENS_DATA_DIR=str(workdir / f"{name}-data"),
            **env,
        )
        self._log = self.log_path.open("wb")
        if floor:
            environment["FLOWLENS_BIND"] = f"127.0.0.1:{self.port}"
            command = [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                "python:bench.floor_conf",
                "bench.floor:app",
            ]
        else:
            command = [
                sys.executable,
                "-m",
                "flowlens_ingest.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ]
        self.process = subprocess.Popen(
            command,
            env=environment,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=HERE.parent,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        """Block until /readyz answers 200 and every worker is up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited early:\n{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as answer:
                    if answer.status == 200 and self.workers():
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("service not ready in time")

    def master(self) -> int | None:
        """The gunicorn master (the child of `flowlens-ingest serve`, or the floor's process itself)."""
        if self.floor:
            return self.process.pid
        found = children(self.process.pid)
        return found[0] if found else None

    def workers(self) -> list[int]:
        """The gunicorn worker processes."""
        master = self.master()
        return children(master) if master else []

    def metrics(self) -> dict[str, float]:
        """The service's counters, summed across workers: deliveries by outcome, round trips."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as answer:
            text = answer.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            match = re.match(r'flowlens_deliveries_total\{event="([^"]*)",outcome="([^"]*)"\} (\S+)', line)
            if match:
                key = f"outcome:{match[2]}"
                values[key] = values.get(key, 0) + float(match[3])
                values["deliveries"] = values.get("deliveries", 0) + float(match[3])
            elif line.startswith("flowlens_db_round_trips_total "):
                values["round_trips"] = float(line.split()[1])
        return values

    def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL of the group if it lingers."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._log.close()


# --- load ---------------------------------------------------------------------------------------


def write_records(generator: Generator, start: int, count: int, prefix: Path, threads: int, secret: bytes) -> int:
    """Split deliveries start..start+count-1 round-robin into one records file per wrk thread."""
    streams: list[list[tuple[str, bytes]]] = [[] for _ in range(threads)]
    for i, item in enumerate(bodies(generator, start, count)):
        streams[i % threads].append(item)
    size = 0
    for n, stream in enumerate(streams, start=1):
        size += write_requests(Path(f"{prefix}.{n}"), iter(stream), secret)[1]
    return size


def run_wrk(
    url: str, prefix: Path, tag: str, *, seconds: float, connections: int, threads: int, think_ms: float = 0
) -> dict[str, Any]:
    """One wrk run; its summary as printed by deliveries.lua's done()."""
    command = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{int(seconds)}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        url,
        "--",
        str(prefix),
        tag,
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "BENCH_THINK_MS": str(think_ms)}
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=seconds + 60, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(line[len("WRK_JSON ") :])
    result["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def start_profiles(
    pids: list[int], seconds: float, directory: Path, fmt: str, mode: str
) -> list[subprocess.Popen[bytes]]:
    """py-spy record of every worker for the measured phase.

    `cpu` samples only the thread holding the GIL: where the worker's CPU goes
    (a thread waiting on PostgreSQL has released it). `wall` samples every
    thread, waiting or not: where a request's time goes.
    """
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    directory.mkdir(parents=True, exist_ok=True)
    extension = {"speedscope": "speedscope.json", "raw": "txt", "flamegraph": "svg"}[fmt]
    procs = []
    for pid in pids:
        command = [
            py_spy,
            "record",
            "--nonblocking",
            "-p",
            str(pid),
            "-d",
            str(int(seconds)),
            "-r",
            "200",
            "-f",
            fmt,
            "-o",
            str(directory / f"worker-{pid}.{extension}"),
        ]
        command.append("--gil" if mode == "cpu" else "--idle")
        procs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


# --- the run ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (every default is the service's own configuration)."""
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--admin-url",
        default=os.environ.get("FLOWLENS_BENCH_ADMIN_URL", DEFAULT_ADMIN_URL),
        help="a PostgreSQL URL allowed to CREATE DATABASE (env FLOWLENS_BENCH_ADMIN_URL)",
    )
    p.add_argument("--seconds", type=float, default=20, help="measured load duration (default 20)")
    p.add_argument("--warmup", type=float, default=5, help="warm-up load before measuring (default 5)")
    p.add_argument("--db-seconds", type=float, default=20, help="database limit loop duration (default 20; 0 skips)")
    p.add_argument(
        "--db-batched", action="store_true", help="also measure the limit with the transaction sent in two round trips"
    )
    p.add_argument(
        "--mix",
        nargs="+",
        choices=sorted(MIXES),
        default=["ci", "full"],
        help="the delivery mixes to measure, one service run each (default: ci full)",
    )
    p.add_argument("--pgbench-seconds", type=float, default=10, help="pgbench limit duration (default 10; 0 skips)")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--db-clients", type=int, default=4)
    p.add_argument(
        "--rate",
        type=float,
        default=0,
        help="pace each connection to offer about this many deliveries/s in all "
        "(a pause of connections/rate s before each request); default: as fast as it answers",
    )
    p.add_argument(
        "--db-delay-ms",
        type=float,
        default=0,
        help="hold each answer of the database this long (a proxy on loopback): a database that far away",
    )
    p.add_argument(
        "--wrk-threads", type=int, default=1, help="wrk threads (1 is plenty and leaves the CPU to the service)"
    )
    p.add_argument("--repositories", type=int, default=200)
    p.add_argument("--prs", type=int, default=15, help="open PRs per repository")
    p.add_argument("--workers", type=int, help="FLOWLENS_WORKERS (default: the service's own default)")
    p.add_argument("--threads", type=int, help="FLOWLENS_THREADS")
    p.add_argument("--pool-size", type=int, help="FLOWLENS_POOL_SIZE")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="more service environment")
    p.add_argument("--profile", type=Path, metavar="DIR", help="py-spy record every worker while measuring")
    p.add_argument("--profile-format", choices=("speedscope", "raw", "flamegraph"), default="speedscope")
    p.add_argument(
        "--profile-mode",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: the GIL holder only (default); wall: every thread, waiting or not",
    )
    p.add_argument("--keep-db", action="store_true", help="do not drop the scratch database")
    p.add_argument(
        "--no-floor",
        action="store_true",
        help="skip the floor: a bare Flask route (bench/floor.py) under the same gunicorn configuration, "
        "measured on the same bodies and connections right after the service",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=1,
        help="repeat the whole measurement; with more than one, a last line gives each figure's median",
    )
    return p.parse_args(argv)


def service_env(args: argparse.Namespace) -> dict[str, str]:
    """The knobs this run sets on the service (none by default)."""
    env: dict[str, str] = {}
    if args.workers:
        env["FLOWLENS_WORKERS"] = str(args.workers)
    if args.threads:
        env["FLOWLENS_THREADS"] = str(args.threads)
    if args.pool_size:
        env["FLOWLENS_POOL_SIZE"] = str(args.pool_size)
    for item in args.env:
        name, _, value = item.partition("=")
        env[name] = value
    return env


def measured_wrk(
    args: argparse.Namespace,
    url: str,
    workdir: Path,
    tag: str,
    *,
    think_ms: float | None = None,
    seconds: float | None = None,
) -> dict[str, Any]:
    """The measured load: the run's records at `url`, as many connections and as paced as asked.

    `think_ms` and `seconds` replace the pause `--rate` asks for and `--seconds`.
    """
    if think_ms is None:
        think_ms = 1000 * args.connections / args.rate if args.rate else 0
    return run_wrk(
        url,
        workdir / "run",
        tag,
        seconds=seconds or args.seconds,
        connections=args.connections,
        threads=args.wrk_threads,
        think_ms=think_ms,
    )


def measure_floor(
    args: argparse.Namespace, url: str, workdir: Path, secret: str, env: dict[str, str], service_rate: float
) -> dict[str, Any]:
    """The bare route under the service's gunicorn configuration, driven with the service's own records.

    Measured twice: loaded as the service was (`--rate`, or as fast as it answers), and paced to the
    rate the service reached. A server's CPU per request falls as its rate rises (one wake-up serves
    more requests), and unpaced the bare route answers several times the service's rate: the paced
    figure is the floor at the service's own load.
    """
    floor = Service(url, secret, workdir, env, floor=True)
    try:
        floor.wait_ready()
        run_wrk(
            floor.url,
            workdir / "warmup",
            "floor-warm",
            seconds=min(args.warmup, 3),
            connections=args.connections,
            threads=args.wrk_threads,
        )
        workers = floor.workers()
        loaded = _floor_run(args, floor.url, workdir, workers, "floor")
        paced = None
        if not args.rate and service_rate > 0:
            # wrk paces by a pause before each request: the rate reached is connections / (pause +
            # latency). A short run at the bare pause learns the latency; the measured run leaves it out.
            pause_ms = 1000 * args.connections / service_rate
            probe = _floor_run(args, floor.url, workdir, workers, "floor-probe", think_ms=pause_ms, seconds=3)
            reached = probe["requests_per_s"]
            latency_ms = max(0.0, 1000 * args.connections / reached - pause_ms) if reached else 0.0
            think_ms = max(0.0, pause_ms - latency_ms)
            paced = _floor_run(args, floor.url, workdir, workers, "floor-paced", think_ms=think_ms)
    finally:
        floor.stop()
    return loaded | {"workers": len(workers), "at_service_rate": paced}


def _floor_run(
    args: argparse.Namespace,
    url: str,
    workdir: Path,
    workers: list[int],
    tag: str,
    *,
    think_ms: float | None = None,
    seconds: float | None = None,
) -> dict[str, Any]:
    """One measured run at the floor: its rate, latency and the workers' CPU and context switches per request."""
    before = worker_costs(workers)
    run = measured_wrk(args, url, workdir, tag, think_ms=think_ms, seconds=seconds)
    costs = costs_per_request(before, worker_costs(workers), run["requests"])
    elapsed = run["duration_us"] / 1e6
    return {
        "requests_per_s": round(run["requests"] / elapsed, 1),
        "p50_ms": round(run["latency_us"]["p50"] / 1000, 2),
        "p99_ms": round(run["latency_us"]["p99"] / 1000, 2),
        "cpu_ms_per_request": costs["cpu_ms"],
        "system_ms_per_request": costs["system_ms"],
        "context_switches_per_request": costs["context_switches"],
    }


def measure_mix(
    args: argparse.Namespace,
    url: str,
    workdir: Path,
    templates: dict[str, list[dict[str, Any]]],
    mix_name: str,
    secret: str,
    env: dict[str, str],
    limit: Any,
    batched: Any,
    load_start: tuple[float, float, float],
) -> dict[str, Any]:
    """Run the service on one mix of deliveries; its summary."""
    generator = Generator(templates, Shape(args.repositories, args.prs), seed=1, mix=MIXES[mix_name])
    workdir = workdir / mix_name
    workdir.mkdir()
    warm_count = max(2000, int(args.warmup * 800))
    log(f"writing {warm_count} warm-up deliveries")
    write_records(generator, 0, warm_count, workdir / "warmup", args.wrk_threads, secret.encode())

    # A database that far away: the service's connections go through a proxy that holds each answer.
    proxy, service_url = FreezingProxy.to(url, args.db_delay_ms / 1000) if args.db_delay_ms else (None, url)
    service = Service(service_url, secret, workdir, env)
    try:
        service.wait_ready()
        workers = service.workers()
        log(f"service up: {len(workers)} workers, env {env or 'defaults'}")
        warm = run_wrk(
            service.url,
            workdir / "warmup",
            "warm",
            seconds=args.warmup,
            connections=args.connections,
            threads=args.wrk_threads,
        )
        warm_rate = warm["requests"] / (warm["duration_us"] / 1e6)
        analyze_tables(url)
        count = int(warm_rate * args.seconds * 1.4) + 1000
        log(f"warm-up: {warm_rate:.0f} deliveries/s; writing {count} measured deliveries")
        size = write_records(generator, warm_count, count, workdir / "run", args.wrk_threads, secret.encode())

        workers = service.workers()
        before_metrics = service.metrics()
        pg_before = postgres_cpu()
        backends_before = backend_cpu(database_backends(url))
        workers_before = worker_costs(workers)
        before_cpu = {
            "postgres": 0.0,
            "machine": machine_busy_seconds(),
        }
        profiles = (
            start_profiles(workers, args.seconds, args.profile, args.profile_format, args.profile_mode)
            if args.profile
            else []
        )
        log(f"measuring: {args.connections} connections for {args.seconds:.0f} s")
        run = measured_wrk(args, service.url, workdir, "run")
        workers_after = worker_costs(workers)
        after_cpu = {
            "postgres": postgres_cpu_since(pg_before),
            # Only the scratch database's backends: not other clients of the server (a test
            # suite running meanwhile), nor its shared processes (WAL writer, checkpointer).
            "backends": sum(
                cpu - backends_before.get(pid, 0.0)
                for pid, cpu in backend_cpu(sorted({*backends_before, *database_backends(url)})).items()
            ),
            "machine": machine_busy_seconds(),
        }
        after_metrics = service.metrics()
        rss = [rss_mb(pid) for pid in workers]
        master = service.master()
        master_rss = rss_mb(master) if master else None
        for proc in profiles:
            proc.wait(timeout=60)
    finally:
        service.stop()
        if proxy is not None:
            proxy.close()
    seconds = run["duration_us"] / 1e6
    rate = run["requests"] / seconds
    floor = None if args.no_floor else measure_floor(args, url, workdir, secret, env, rate)
    delivered = after_metrics.get("deliveries", 0) - before_metrics.get("deliveries", 0)
    served = costs_per_request(workers_before, workers_after, delivered)
    worker_seconds = sum(workers_after[:2]) - sum(workers_before[:2])
    trips = after_metrics.get("round_trips", 0) - before_metrics.get("round_trips", 0)
    outcomes = {
        k.split(":", 1)[1]: int(after_metrics[k] - before_metrics.get(k, 0))
        for k in after_metrics
        if k.startswith("outcome:") and after_metrics[k] - before_metrics.get(k, 0)
    }
    return {
        "deliveries_per_s": round(rate, 1),
        "p50_ms": round(run["latency_us"]["p50"] / 1000, 2),
        "p99_ms": round(run["latency_us"]["p99"] / 1000, 2),
        "non_2xx": run["non_2xx"] + sum(run["errors"].values()) - run["errors"]["status"],
        "round_trips_per_delivery": round(trips / delivered, 2) if delivered else None,
        "db_limit_tx_per_s": round(limit.tx_per_s, 1) if limit else None,
        "ratio": round(rate / limit.tx_per_s, 3) if limit else None,
        "worker_rss_mb": rss,
        "duration_s": round(seconds, 1),
        "latency_ms": {k: round(v / 1000, 2) for k, v in run["latency_us"].items()},
        "requests": run["requests"],
        "statuses": run["statuses"],
        "wrk_errors": run["errors"],
        "outcomes": outcomes,
        "resent_fraction": round(run["resent"] / run["sent"], 3) if run["sent"] else 0.0,
        "db_limit": {
            "clients": limit.clients,
            "round_trips_per_tx": limit.round_trips_per_tx,
            "p50_ms": limit.p50_ms,
            "p99_ms": limit.p99_ms,
            "seconds": limit.seconds,
            "statements": "BEGIN; repositories upsert RETURNING id; pipeline_runs upsert; "
            "webhook_deliveries insert (JSONB payload); COMMIT",
        }
        if limit
        else None,
        "db_limit_two_round_trips_tx_per_s": round(batched.tx_per_s, 1) if batched else None,
        "floor": floor,
        "service": {
            "workers": len(workers),
            "env": env,
            # Inherited by the service and the floor alike (a worker model under test); None when unset.
            "gunicorn_cmd_args": os.environ.get("GUNICORN_CMD_ARGS"),
            "master_rss_mb": master_rss,
            "cpu_cores_used": round(worker_seconds / seconds, 2),
            # Per delivery, so that it holds however busy the machine was.
            "cpu_ms_per_delivery": round(1000 * worker_seconds / delivered, 2) if delivered else None,
            # Of it in the kernel, and the threads' context switches: where serving costs more than the floor.
            "system_ms_per_delivery": served["system_ms"],
            "context_switches_per_delivery": served["context_switches"],
        },
        "load": {
            "connections": args.connections,
            "wrk_threads": args.wrk_threads,
            "paced_rate": args.rate or None,
            "db_delay_ms": args.db_delay_ms or None,
            "wrk_cpu_cores_used": round(run["cpu_s"] / seconds, 2),
            "postgres_cpu_cores_used": round((after_cpu["postgres"] - before_cpu["postgres"]) / seconds, 2),
            "postgres_backends_cpu_ms_per_delivery": round(1000 * after_cpu["backends"] / delivered, 2)
            if delivered
            else None,
            "postgres_cpu_ms_per_delivery": round(
                1000 * (after_cpu["postgres"] - before_cpu["postgres"]) / delivered, 2
            )
            if delivered
            else None,
            "machine_cpu_cores_busy": round((after_cpu["machine"] - before_cpu["machine"]) / seconds, 2),
            "mix": MIXES[mix_name],
            "repositories": args.repositories,
            "prs_per_repository": args.prs,
            "mean_body_bytes": round(size / count),
            "warmup_s": args.warmup,
        },
        "machine": {
            **machine(),
            "postgres": server_version(url),
            "loadavg_before": [round(x, 2) for x in load_start],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print one JSON summary line on stdout."""
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print(
            "bench: wrk is not installed. Install it with:\n"
            "  apt-get update && apt-get install -y wrk      (Debian/Ubuntu)\n"
            "  brew install wrk                              (macOS)",
            file=sys.stderr,
        )
        return 2
    if args.profile and not (shutil.which("py-spy") or Path(sys.executable).with_name("py-spy").exists()):
        print("bench: --profile needs py-spy: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    templates = load_templates(default_payload_dir())
    secret = secrets.token_hex(20)
    env = service_env(args)
    if os.environ.get("GUNICORN_CMD_ARGS"):
        log(f"GUNICORN_CMD_ARGS={os.environ['GUNICORN_CMD_ARGS']!r} applies to the service and its floor")
    runs = []
    for number in range(1, args.runs + 1):
        if args.runs > 1:
            log(f"run {number} of {args.runs}")
        runs.append(one_run(args, templates, secret, env))
        print(json.dumps(runs[-1]), flush=True)
    if len(runs) > 1:
        print(json.dumps(medians(runs)), flush=True)
    return 0


def one_run(args: argparse.Namespace, templates: Any, secret: str, env: dict[str, str]) -> dict[str, Any]:
    """The database limits, then the service once per mix, on a scratch database of its own."""
    load_start = os.getloadavg()
    summary: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="flowlens-bench-") as tmp,
        scratch_database(args.admin_url, args.keep_db) as url,
    ):
        workdir = Path(tmp)
        limit = batched = None
        if args.db_seconds > 0:
            log(f"database limit: {args.db_clients} psycopg2 clients for {args.db_seconds:.0f} s")
            sample = list(bodies(Generator(templates, Shape(args.repositories, args.prs), seed=2), 0, 200))
            limit = dblimit.measure(libpq_url(url), sample, clients=args.db_clients, seconds=args.db_seconds)
            log(f"database limit: {limit.tx_per_s:.0f} tx/s (p50 {limit.p50_ms} ms)")
            if args.db_batched:
                batched = dblimit.measure(
                    libpq_url(url), sample, clients=args.db_clients, seconds=args.db_seconds, batched=True
                )
                log(f"database limit, two round trips: {batched.tx_per_s:.0f} tx/s")
            empty_tables(url)

        pg = None
        if args.pgbench_seconds > 0 and shutil.which("pgbench"):
            log(f"database limit: pgbench, {args.db_clients} clients for {args.pgbench_seconds:.0f} s")
            pg = pgbench.measure(libpq_url(url), clients=args.db_clients, seconds=args.pgbench_seconds)
            log(f"pgbench: {pg.tx_per_s:.0f} tx/s")
            summary["pgbench_limit"] = vars(pg) | {"transaction": "BEGIN; 2 upserts (RETURNING id); COMMIT"}
        summary["mixes"] = {}
        for mix_name in args.mix:
            empty_tables(url)
            log(f"mix {mix_name}")
            result = measure_mix(args, url, workdir, templates, mix_name, secret, env, limit, batched, load_start)
            worker_ms = result["service"]["cpu_ms_per_delivery"]
            postgres_ms = result["load"]["postgres_cpu_ms_per_delivery"]
            result["cpu_ms_per_delivery"] = {
                "workers": worker_ms,
                "postgres": postgres_ms,
                "postgres_backends": result["load"]["postgres_backends_cpu_ms_per_delivery"],
                "total": round(worker_ms + postgres_ms, 2) if worker_ms and postgres_ms else None,
                "floor": _figure(result, ("floor", "cpu_ms_per_request")),
                "floor_at_service_rate": _figure(result, ("floor", "at_service_rate", "cpu_ms_per_request")),
            }
            # The goal of docs/benchmark.md: the worker's CPU per delivery as a multiple of the floor's,
            # loaded as the service was, and paced to the service's rate.
            result["ratio_to_floor"] = _ratio(worker_ms, result["cpu_ms_per_delivery"]["floor"])
            result["ratio_to_floor_at_service_rate"] = _ratio(
                worker_ms, result["cpu_ms_per_delivery"]["floor_at_service_rate"]
            )
            if pg is not None:
                result["ratio_to_pgbench"] = round(result["deliveries_per_s"] / pg.tx_per_s, 3)
            summary["mixes"][mix_name] = result
            log(
                f"{mix_name}: {result['deliveries_per_s']:.0f} deliveries/s, p50 {result['p50_ms']} ms,"
                f" p99 {result['p99_ms']} ms, ratio to pgbench {result.get('ratio_to_pgbench')},"
                f" CPU/delivery {result['cpu_ms_per_delivery']}, worker CPU {result['ratio_to_floor']}x the floor's"
                f" ({result['ratio_to_floor_at_service_rate']}x at the service's rate)"
            )
    return summary


# The figures the targets in docs/benchmark.md are about, as paths into one run's summary.
MEDIAN_FIGURES = (
    ("deliveries_per_s",),
    ("p50_ms",),
    ("p99_ms",),
    ("non_2xx",),
    ("round_trips_per_delivery",),
    ("ratio_to_pgbench",),
    ("cpu_ms_per_delivery", "workers"),
    ("cpu_ms_per_delivery", "postgres"),
    ("cpu_ms_per_delivery", "postgres_backends"),
    ("cpu_ms_per_delivery", "total"),
    ("cpu_ms_per_delivery", "floor"),
    ("cpu_ms_per_delivery", "floor_at_service_rate"),
    ("ratio_to_floor",),
    ("ratio_to_floor_at_service_rate",),
    ("service", "system_ms_per_delivery"),
    ("service", "context_switches_per_delivery"),
    ("floor", "at_service_rate", "system_ms_per_request"),
    ("floor", "at_service_rate", "context_switches_per_request"),
)


def _ratio(worker_ms: float | None, floor_ms: float | None) -> float | None:
    return round(worker_ms / floor_ms, 2) if worker_ms and floor_ms else None


def _figure(result: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = result
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the runs (a run missing it does not count)."""
    out: dict[str, Any] = {"median_of_runs": len(runs), "mixes": {}}
    limits = [r["pgbench_limit"]["tx_per_s"] for r in runs if "pgbench_limit" in r]
    if limits:
        out["pgbench_tx_per_s"] = round(statistics.median(limits))
    for mix in runs[0]["mixes"]:
        figures = {}
        for path in MEDIAN_FIGURES:
            values = [v for r in runs if (v := _figure(r["mixes"].get(mix, {}), path)) is not None]
            if values:
                figures[".".join(path)] = round(statistics.median(values), 3)
        out["mixes"][mix] = figures
    return out


if __name__ == "__main__":
    sys.exit(main())
