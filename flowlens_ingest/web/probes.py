"""Unsigned operational routes: liveness, readiness, metrics."""

from __future__ import annotations

from flask import Blueprint, Response

from flowlens_ingest import metrics
from flowlens_ingest.store import migrate
from flowlens_ingest.web.responses import answer
from flowlens_ingest.web.services import services

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """The process is alive and serving."""
    return answer({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    """Ready when the database answers and its schema is at this release's head or newer.

    Not ready, at once, while this worker knows the database to hang (store/hang.py).

    Newer happens in a rolling deploy: the release step has migrated for the next
    release while this VM still runs the previous one. Migrations are additive, so
    the old code keeps working and is not reported as broken.
    """
    database = services().database
    if database.hung:
        # Known hung (in this worker): said at once, the probe thread finds out when it is back.
        return answer({"status": "unavailable", "database": "hung"}, 503)
    try:
        with database.bounded():
            current, head = migrate.revisions(database.engine)
    except Exception:  # any failure to reach or read the database means "not ready"
        return answer({"status": "unavailable", "database": "unreachable"}, 503)
    if current == head:
        return answer({"status": "ready", "revision": current})
    if current is not None and not migrate.is_known(current):
        return answer({"status": "ready", "revision": current, "schema": "newer than this release"})
    reason = {"status": "unavailable", "database": "migrations pending", "fix": f"run `{migrate.UPGRADE_COMMAND}`"}
    return answer(reason, 503)


@bp.get("/metrics")
def prometheus() -> Response:
    """Prometheus text exposition."""
    body, content_type = metrics.render(services().settings.metrics_dir)
    return Response(body, content_type=content_type)
