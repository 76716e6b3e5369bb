"""`flowlens-ingest serve`: gunicorn (and the files worker) on DATABASE_URL or the embedded database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from flowlens_ingest.cli.connect import github_client, load_settings
from flowlens_ingest.cli.instances import forget_instance, instance_record, record_instance
from flowlens_ingest.cli.output import fail
from flowlens_ingest.config import Settings, child_environment, unknown_names, writable_directory

GUNICORN_CONF = "python:flowlens_ingest.web.gunicorn_conf"
# The files worker stops after the job in hand (SIGTERM); past this it is killed, and the job's
# lease runs out for another worker to take it again.
FILES_WORKER_STOP_S = 30.0

# --- serve -------------------------------------------------------------------------------

# Signals an operator sends to `serve` that gunicorn's master understands: TERM and
# INT/QUIT stop it (TERM gracefully), TTIN/TTOU add or remove a worker, USR1 reopens
# the log files. HUP is a closed terminal here, so it stops gunicorn (TERM) rather
# than reloading it: gunicorn runs in its own process group, so the terminal's
# signals reach it only through `serve`.
FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
)
TRANSLATED: dict[int, int] = {signal.SIGHUP: signal.SIGTERM}


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn making a child get SIGTERM when `serve` dies, even by kill -9 (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: nothing to import after it
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def arm() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def _port_problem(host: str, port: int) -> str | None:
    """Why gunicorn could not bind host:port right now, or None."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve --host {host}: {exc.strerror}"
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # As gunicorn does: a port whose old connections linger in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
                return (
                    f"port {port} on {host} is already in use (another `flowlens-ingest serve`?):"
                    " stop it, or choose another --port"
                )
            return f"cannot listen on {host}:{port}: {exc.strerror}"
    return None


def _listening(host: str, port: int, child: subprocess.Popen[bytes], timeout: float = 60.0) -> bool:
    """Wait until gunicorn accepts connections on host:port; False if it exits or never does."""
    import socket

    target = _reachable(host)
    deadline = time.monotonic() + timeout
    while child.poll() is None and time.monotonic() < deadline:
        try:
            with socket.create_connection((target, port), 0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def _reachable(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104 (a wildcard bind is reached on loopback)


def _url_host(host: str) -> str:
    """The host of `host`'s URL: an IPv6 address in brackets."""
    reachable = _reachable(host)
    return f"[{reachable}]" if ":" in reachable else reachable


def _start_files_worker(settings: Settings, env: dict[str, str]) -> subprocess.Popen[bytes] | None:
    """Run `enrich` beside gunicorn when a GitHub credential is set; else say, once, that it is off."""
    if not settings.github_credentials:
        print(
            "flowlens-ingest: files enrichment off: no GitHub credential (set GITHUB_TOKEN, or GITHUB_APP_ID"
            " and GITHUB_APP_PRIVATE_KEY); pull requests keep files_status = pending",
            flush=True,
        )
        return None
    print(f"flowlens-ingest: files worker on, against {settings.github_api_url}", flush=True)
    # preexec_fn only calls prctl: no lock a thread could hold in the fork.
    command = [sys.executable, "-m", "flowlens_ingest.cli", "enrich"]
    return subprocess.Popen(command, env=env, preexec_fn=_die_with_parent())  # noqa: PLW1509


def serve(host: str, port: int, workers: int | None) -> int:
    """Run gunicorn with gunicorn_conf, on DATABASE_URL or else on the embedded database."""
    settings = load_settings()
    if settings.database_url and not settings.secrets:
        return fail("GITHUB_WEBHOOK_SECRET is not set; refusing to start with DATABASE_URL set")
    bind = f"{host}:{port}"
    # Every folder it writes, before anything starts (gunicorn_conf checks them again).
    writable_directory(settings.data_dir, "FLOWLENS_DATA_DIR")
    settings.check_folders(bind)
    if settings.github_credentials:
        # An unreadable App key stops `serve`, not only its files worker; this client sends nothing.
        github_client(settings, None).close()
    # Before anything starts: gunicorn would retry for 5 s, logging, then exit 1.
    problem = _port_problem(host, port)
    if problem:
        return fail(problem)

    child: subprocess.Popen[bytes] | None = None
    # Signals that came while starting. Acted on once the embedded server is up and
    # its keeper on duty: exiting in the middle of its start would leave the server
    # running with nobody to stop it.
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if child is None:
            pending.append(signum)
        else:
            child.send_signal(TRANSLATED.get(signum, signum))

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)

    # A variable that is no setting was named once, by main(): gunicorn and the files worker
    # would say it again, each, so their environment goes without it.
    unknown = set(unknown_names())
    env = {name: value for name, value in child_environment().items() if name not in unknown}
    server = None
    if not settings.database_url:
        from flowlens_ingest.postgres import embedded
        from flowlens_ingest.store import migrate

        server, url = embedded.start(settings.data_dir)
        migrate.release(url)
        env["DATABASE_URL"] = url
        print(f"flowlens-ingest: embedded PostgreSQL in {settings.data_dir / 'pgdata'} (migrated)", flush=True)
        if not settings.secrets:
            secret, created = embedded.load_or_create_secret(settings.data_dir)
            env["GITHUB_WEBHOOK_SECRET"] = secret
            where = settings.data_dir / "webhook-secret"
            # Printed once, when made, for pasting into GitHub; later runs name the file only.
            if created:
                print(f"flowlens-ingest: webhook secret (generated in {where}): {secret}", flush=True)
            else:
                print(f"flowlens-ingest: webhook secret from {where}", flush=True)
    env["FLOWLENS_DATA_DIR"] = str(settings.data_dir)
    # One metrics folder per instance (gunicorn_conf empties it at start): a second
    # instance in the same data directory, on another port, has its own. Set here for the
    # files worker, which writes its metrics there too.
    env["PROMETHEUS_MULTIPROC_DIR"] = str(settings.metrics_folder(bind))
    env["FLOWLENS_BIND"] = bind
    if workers:
        env["FLOWLENS_WORKERS"] = str(workers)
    if pending:
        return 128 + pending[0]
    command = [sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONF, "flowlens_ingest.web.wsgi:app"]
    # Its own process group: a terminal's signals reach it only through `serve` (see above).
    child = subprocess.Popen(command, env=env, process_group=0, preexec_fn=_die_with_parent())  # noqa: PLW1509
    if pending:  # arrived between the check above and the start of gunicorn
        child.send_signal(TRANSLATED.get(pending[0], pending[0]))
    worker = None
    record = instance_record(settings.data_dir, bind)
    instance = None
    webhook_url = f"http://{_url_host(host)}:{port}/webhook"
    try:
        # Said once gunicorn has bound the port, not before: a failed bind prints no URL.
        if _listening(host, port, child):
            print(f"flowlens-ingest: listening on {webhook_url}", flush=True)
            # For `send` (and people) to find this instance without being told its port.
            instance = record_instance(record, webhook_url)
            # After gunicorn is up: its start empties the metrics folder the worker writes to.
            worker = _start_files_worker(settings, env)
        code = child.wait()
    finally:
        if instance is not None:
            forget_instance(record, instance)
    if worker is not None:
        worker.terminate()
        try:
            worker.wait(FILES_WORKER_STOP_S)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    if server is not None:
        server.close()  # its keeper stops it once no other process uses it
    # A gunicorn killed by a signal: report it the way a shell would.
    return 128 - code if code < 0 else code
