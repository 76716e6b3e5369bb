"""Unsigned operational routes: liveness, readiness, metrics."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from . import metrics, migrate
from .db import get_db

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """The process is alive and serving."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """Ready when the database answers and its schema is at the migrations' head."""
    try:
        current, head = migrate.revisions(get_db().engine)
    except Exception:  # any failure to reach or read the database means "not ready"
        return jsonify({"status": "unavailable", "database": "unreachable"}), 503
    if current != head:
        return jsonify({"status": "unavailable", "database": "migrations pending"}), 503
    return jsonify({"status": "ready", "revision": current}), 200


@bp.get("/metrics")
def prometheus() -> Response:
    """Prometheus text exposition."""
    body, content_type = metrics.render()
    return Response(body, content_type=content_type)
