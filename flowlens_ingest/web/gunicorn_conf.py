"""gunicorn settings shared by `flowlens-ingest serve` and the Procfile.

`gunicorn -c python:flowlens_ingest.web.gunicorn_conf flowlens_ingest.web.wsgi:app`.
Everything comes from config.Settings (docs/operating.md, Configuration); GUNICORN_CMD_ARGS
overrides anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import IO, Any

from gunicorn import glogging

from flowlens_ingest.config import ConfigError, Settings, unknown_variables


def _checked_settings() -> Settings:
    """The settings, or one line on stderr and exit 2: gunicorn's master imports this before any worker exists.

    gunicorn turns an exception raised here into a traceback (or "Error:" and exit 1); a
    SystemExit passes through it untouched, so nothing binds, forks or logs after the line.
    """
    try:
        settings = Settings.from_env()
        settings.check_service()
        settings.check_folders(settings.bind)
    except ConfigError as exc:
        print(f"flowlens-ingest: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    for line in unknown_variables():
        print(f"flowlens-ingest: warning: {line}", file=sys.stderr, flush=True)
    return settings


settings = _checked_settings()
bind = settings.bind

# Metrics from every worker are summed through files in this folder. prometheus_client
# reads the variable once, when first imported: set it here, in the master, before any
# worker (which inherits it) creates a metric. flowlens_ingest imports it lazily for this.
# One folder per instance (its port): on_starting empties it, and two instances sharing
# one would wipe and sum each other's counters.
_metrics_dir = settings.metrics_folder(bind)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_dir)
_multiprocess: Any = None
# What the master said at start about the database (on_starting): its workers, forked after,
# inherit this module's state and so do not say it again, once each.
_said_at_start: str | None = None
_metrics_lock: IO[bytes] | None = None
if "prometheus_client.values" in sys.modules:
    # Too late: workers would inherit per-process values and /metrics would show
    # one worker's share. Refuse to start rather than serve wrong numbers.
    raise RuntimeError("prometheus_client was imported before gunicorn_conf set PROMETHEUS_MULTIPROC_DIR")

workers = settings.workers
# Threads overlap the database round trips of one worker.
worker_class = "gthread"
threads = settings.threads
# GitHub gives up after 10 s: a worker silent for that long is stuck, not busy
# (a delivery ends within its statement timeout, at most 7 s: FLOWLENS_STATEMENT_TIMEOUT_MS's range).
timeout = 10
# On SIGTERM a worker stops accepting and finishes what it holds; the longest
# delivery is one statement timeout plus a few retries, well inside this.
graceful_timeout = settings.graceful_timeout_s
# Idle keep-alive connections (nginx's, in production) are closed after 5 s; nginx-conf
# makes nginx drop its own idle ones after 4 s, so it never reuses one being closed here.
keepalive = 5
# No preload: each worker imports the app and builds its engine and pool after the fork.
preload_app = False
# The heartbeat file is touched every second per worker: keep it off disk where possible.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108 (gunicorn's advice)
# No recycling after a number of requests (max_requests): the workers hold no growing
# state. A worker is recycled after a large delivery that left it heavy (memory.py,
# post_worker_init below), gracefully; its replacement takes over its metric files
# (pre_fork), so recycling never grows what a scrape reads.
accesslog = None
errorlog = "-"


class Logger(glogging.Logger):  # type: ignore[misc]
    """gunicorn's logger, minus the access line's cost while no access log is kept.

    With a logging configuration (the JSON one below), gunicorn builds every request's
    access-log atoms (a dict of its headers, times, sizes) before handing them to the
    `gunicorn.access` logger, which is off (CRITICAL): ~4 % of a worker's CPU spent
    on a line nobody writes. Asked first here; an access log turned on (its level, or
    `--access-logfile` through GUNICORN_CMD_ARGS) is written as before.
    """

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        """Write the access line, if anything would keep it."""
        if self.access_log.isEnabledFor(logging.INFO) and (
            self.cfg.accesslog or self.access_log.handlers or self.access_log.propagate
        ):
            super().access(resp, req, environ, request_time)


logger_class = Logger
loglevel = settings.log_level.lower()
if settings.log_format == "json":
    # gunicorn's own lines (boot, signals, worker exits) as JSON on stderr too, like the
    # service's. gunicorn merges this over its defaults key by key. No access log: the
    # service writes one line per delivery itself.
    logconfig_dict = {
        "root": {"level": "WARNING", "handlers": ["error_console"]},
        "loggers": {
            "gunicorn.error": {"level": loglevel.upper(), "handlers": ["error_console"], "propagate": False},
            "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
        },
        "formatters": {"generic": {"()": "flowlens_ingest.logs.JsonFormatter"}},
    }


def on_starting(server: Any) -> None:
    """Start every run with an empty metrics folder and no half-written spool files (settings are checked above)."""
    if settings.spool_dir is not None and settings.spool_enabled:
        from flowlens_ingest.spool.folder import PARTIAL_AT_START_S, Spool

        # Half-written spool files of a process that crashed (never promised to anyone).
        Spool(settings.spool_dir, settings.spool_max_bytes).remove_partial_files(PARTIAL_AT_START_S)
    _claim_metrics_dir()
    # A previous run's metric files would be summed with this one's.
    # Only prometheus_client's files: the folder may be one an operator chose.
    for path in _metrics_dir.glob("*.db"):
        path.unlink(missing_ok=True)
    global _said_at_start
    problem = _schema_problem(settings.database_url, spooled=settings.spool_enabled)
    if problem:
        server.log.warning("flowlens-ingest: %s", problem)
        # Said once, here: the workers, forked after this, inherit it and do not repeat it.
        _said_at_start = problem
    # Imported now, in the master, not first in child_exit: that runs in a SIGCHLD
    # handler, and a second worker exiting mid-import re-entered the half-imported
    # package (ImportError, master exiting 1 at shutdown).
    global _multiprocess
    from prometheus_client import multiprocess as _multiprocess


def _claim_metrics_dir() -> None:
    """Hold a lock on the metrics folder for this instance's life; refuse to start if another holds it."""
    import fcntl

    global _metrics_lock
    lock = open(_metrics_dir / ".lock", "ab")  # noqa: SIM115 (held open, by the master and its workers, until exit)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise RuntimeError(
            f"flowlens-ingest: another instance is running with the metrics folder {_metrics_dir}"
            " (PROMETHEUS_MULTIPROC_DIR): stop it, or give this one another port or folder"
        ) from None
    _metrics_lock = lock


# How long the master waits, once at start, for the database to say where its schema is.
START_CHECK_S = 5.0


def _schema_problem(url: str | None, *, spooled: bool = True) -> str | None:
    """Say once, at start, what is wrong with the database: unreachable, or not migrated."""
    import sqlalchemy as sa

    from flowlens_ingest.store import migrate, reachable
    from flowlens_ingest.store.deadline import deadline, install_deadlines

    if not url:
        return None
    install_deadlines()
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with deadline(START_CHECK_S):
            return migrate.pending(engine)
    except sa.exc.SQLAlchemyError as exc:
        meanwhile = "deliveries are spooled" if spooled else "deliveries are answered 503 (the spool is off)"
        problem = reachable.unavailable(exc).line(reachable.where(url))
        return f"{problem}; {meanwhile} until it answers, and /readyz answers 503"
    finally:
        engine.dispose()


def pre_fork(server: Any, worker: Any) -> None:
    """Give the worker about to be forked the lowest metrics slot no live worker holds.

    A worker replacing a recycled or dead one takes its slot, and with it its sample
    files (metrics.FILES_ID): the folder holds one set per slot, not one per worker ever
    forked. Two live workers never share one (server.WORKERS are those not yet reaped).
    """
    taken = {getattr(other, "flowlens_slot", None) for other in server.WORKERS.values()}
    worker.flowlens_slot = next(n for n in range(len(taken) + 1) if n not in taken)


def post_fork(server: Any, worker: Any) -> None:
    """In the new worker, before its app, threads and metrics exist: its allocator, and its sample files' name."""
    from flowlens_ingest.memory import tune_allocator
    from flowlens_ingest.metrics import FILES_ID

    tune_allocator()
    os.environ[FILES_ID] = _files_id(worker)


def _files_id(worker: Any) -> str:
    return f"worker{worker.flowlens_slot}"


def post_worker_init(worker: Any) -> None:
    """Start the worker's spool drainer once its app exists; recycle it when a large delivery left it heavy."""
    from flowlens_ingest.memory import LARGE
    from flowlens_ingest.web.services import start_drainer

    worker.flowlens_drainer = start_drainer(worker.wsgi, said_at_start=_said_at_start)
    LARGE.heavy_bytes = settings.recycle_above_mb * 1024 * 1024
    LARGE.when_heavy = lambda: _recycle(worker)


# How long a recycled worker, no longer accepting, waits for the connections it accepted to
# send their request (a client sends at once; GitHub and nginx do) before it ends.
RECYCLE_DISPATCH_S = 2.0


def _recycle(worker: Any) -> None:
    """End this worker gracefully: it stops accepting, finishes what it holds, and the master forks another.

    Not max_requests' way (`alive = False` at once): a gthread worker waits for an accepted
    connection to be readable before a thread takes it, and ending then dropped those
    accepted but not yet read (the client saw a reset: a delivery lost). So first the
    listening sockets leave its poller; once every accepted connection has gone to a
    thread (or RECYCLE_DISPATCH_S passed), the worker ends as on SIGTERM, finishing them.
    """
    from flowlens_ingest.memory import resident_bytes

    if not worker.alive or getattr(worker, "flowlens_recycling", False):
        return
    worker.flowlens_recycling = True
    worker.log.info("flowlens-ingest: worker recycled after a large delivery (%d MB resident)", resident_bytes() >> 20)
    threading.Thread(target=_end_once_dispatched, args=(worker,), name="flowlens-recycle", daemon=True).start()


def _end_once_dispatched(worker: Any) -> None:
    if not hasattr(worker, "poller"):
        # Not a gthread worker (GUNICORN_CMD_ARGS chose another): it ends as max_requests ends it.
        worker.alive = False
        return
    with worker._lock:
        for listener in worker.sockets:
            with contextlib.suppress(KeyError, ValueError, OSError):
                worker.poller.unregister(listener)
    deadline = time.monotonic() + RECYCLE_DISPATCH_S
    while _undispatched(worker) and time.monotonic() < deadline:
        time.sleep(0.02)
    worker.alive = False


def _undispatched(worker: Any) -> bool:
    """Whether the worker's poller still holds a connection accepted but never handed to a thread."""
    with worker._lock:
        waiting = [key.data for key in worker.poller.get_map().values()]
    # gthread's poller entries: its listeners (partial(accept, address)), and connections
    # (partial(on_client_socket_readable, conn)); a kept-alive one has been handled before.
    return any(not getattr(entry.args[0], "initialized", True) for entry in waiting if entry.args)


def worker_exit(server: Any, worker: Any) -> None:
    """Let the drainer finish the spooled delivery it is applying before the worker goes."""
    drainer = getattr(worker, "flowlens_drainer", None)
    if drainer is not None:
        drainer.stop()


def child_exit(server: Any, worker: Any) -> None:
    """Drop a dead worker's live gauge samples (its counters still count, and its replacement counts on)."""
    _multiprocess.mark_process_dead(_files_id(worker))
