"""gunicorn's configuration for the floor: the service's own (flowlens_ingest/web/gunicorn_conf.py), every
setting the same, minus the hooks that start and stop the service's spool drainer (the floor has none).

    gunicorn -c python:bench.floor_conf bench.floor:app
"""

from __future__ import annotations

from typing import Any

from flowlens_ingest.web.gunicorn_conf import *  # noqa: F403 (every setting, as the service runs)


def post_worker_init(worker: Any) -> None:  # type: ignore[no-redef]
    """No spool drainer: the floor's app has no services."""


def worker_exit(server: Any, worker: Any) -> None:  # type: ignore[no-redef]
    """Nothing to let finish."""
