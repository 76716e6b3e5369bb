"""gunicorn settings shared by `flowlens-ingest serve` and the Procfile.

`gunicorn -c python:flowlens_ingest.gunicorn_conf flowlens_ingest.wsgi:app`.
Every value can be overridden by the environment (GUNICORN_CMD_ARGS too).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Metrics from every worker are summed through files in this folder; it has to be
# set before prometheus_client is first imported, in the master and so in every worker.
_metrics_dir = Path(
    os.environ.setdefault(
        "PROMETHEUS_MULTIPROC_DIR",
        str(Path(os.environ.get("FLOWLENS_DATA_DIR") or ".flowlens").resolve() / "metrics"),
    )
)

bind = os.environ.get("FLOWLENS_BIND") or f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("FLOWLENS_WORKERS") or os.environ.get("WEB_CONCURRENCY") or (os.cpu_count() or 1) + 1)
worker_class = "gthread"
threads = int(os.environ.get("FLOWLENS_THREADS") or 4)
# GitHub gives up after 10 s: a request still running then is already lost to it.
timeout = 10
graceful_timeout = 20
keepalive = 5
# No preload: each worker builds its app, engine and pool after the fork.
preload_app = False
accesslog = None
errorlog = "-"
loglevel = os.environ.get("FLOWLENS_LOG_LEVEL", "info").lower()
# Workers are small and long-lived; recycle them now and then to bound memory.
max_requests = 20000
max_requests_jitter = 2000


def on_starting(server) -> None:
    """Start every run with an empty metrics folder (stale worker files would be summed)."""
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    _metrics_dir.mkdir(parents=True, exist_ok=True)


def post_worker_init(worker) -> None:
    """Start the worker's spool drainer once its app exists."""
    from flowlens_ingest.background import start

    start(worker.wsgi)


def child_exit(server, worker) -> None:
    """Forget a dead worker's live gauges."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
