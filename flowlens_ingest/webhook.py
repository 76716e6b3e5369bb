"""The `/webhook` blueprint: verify, parse, hand over, answer. No SQL and no rules here."""

from __future__ import annotations

import logging
import time

from flask import Blueprint, Response, g, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from . import parse, signature
from .app import services
from .database import DatabaseUnavailable
from .delivery import Delivery
from .ingest import ingest
from .values import Outcome

log = logging.getLogger(__name__)

bp = Blueprint("webhook", __name__)


def error(status: int, message: str, **headers: str) -> Response:
    """A JSON error answer; never carries a stack trace or a payload."""
    response = jsonify({"error": message})
    response.status_code = status
    response.headers.update(headers)
    return response


@bp.before_request
def verify_signature() -> Response | None:
    """Refuse any request not signed with a secret we hold, before looking at it."""
    g.started = time.perf_counter()
    settings = services().settings
    # Flask refuses a body over MAX_CONTENT_LENGTH here (413) without reading it whole.
    try:
        body = request.get_data(cache=True)
    except RequestEntityTooLarge:
        log.warning(
            "body over the limit",
            extra={"delivery": request.headers.get("X-GitHub-Delivery", "")[:100], "bytes": request.content_length},
        )
        raise
    try:
        signature.verify(body, request.headers.get("X-Hub-Signature-256"), settings.secrets)
    except signature.SignatureError as exc:
        # The ids are unverified text: logged cut short, for matching GitHub's delivery page.
        log.warning(
            "signature refused",
            extra={
                "reason": exc.reason,
                "delivery": request.headers.get("X-GitHub-Delivery", "")[:100],
                "event": request.headers.get("X-GitHub-Event", "")[:100],
            },
        )
        services().metrics.signature_failure(exc.reason)
        return error(401, "invalid or missing X-Hub-Signature-256")
    return None


def _hook_id(raw: str | None) -> int | None:
    if not raw:
        return 0
    return int(raw) if raw.isdigit() and len(raw) < 19 else None


def _answer(outcome: Outcome, status: int, event: str, delivery_id: str, action: str | None = None) -> None:
    """Count and log one answered signed delivery: exactly one log line each, ids only."""
    elapsed = time.perf_counter() - g.started
    services().metrics.delivery(event, outcome, elapsed)
    log.log(
        logging.ERROR if status >= 500 else logging.WARNING if status >= 400 else logging.INFO,
        "delivery",
        extra={
            "delivery": delivery_id[:200],
            "event": event[:100],
            "action": action[:100] if action else action,
            "outcome": outcome.value,
            "status": status,
            "duration_ms": round(elapsed * 1000, 2),
        },
    )


@bp.post("/webhook")
def receive() -> tuple[Response, int] | Response:
    """Answer one signed GitHub delivery."""
    svc = services()
    event = request.headers.get("X-GitHub-Event", "").strip()
    delivery_id = request.headers.get("X-GitHub-Delivery", "").strip()
    hook_id = _hook_id(request.headers.get("X-GitHub-Hook-ID", "").strip())
    if not event or not delivery_id:
        _answer(Outcome.REJECTED, 400, event, delivery_id)
        return error(400, "X-GitHub-Event and X-GitHub-Delivery are required")
    if len(event) > 100 or len(delivery_id) > 200 or hook_id is None:
        _answer(Outcome.REJECTED, 400, event, delivery_id)
        return error(400, "malformed X-GitHub-* header")
    body = request.get_data(cache=True)
    try:
        delivery = Delivery.from_http(
            delivery_id=delivery_id, hook_id=hook_id, event=event, content_type=request.content_type, body=body
        )
    except parse.UnsupportedMediaType:
        _answer(Outcome.REJECTED, 415, event, delivery_id)
        return error(415, "use application/json or application/x-www-form-urlencoded")
    except parse.BadPayload as exc:
        _answer(Outcome.REJECTED, 400, event, delivery_id)
        return error(400, str(exc))
    try:
        outcome = ingest(
            svc.database,
            delivery,
            store_payload=svc.settings.store_payloads,
            compress=svc.settings.journal_compression,
            on_retry=svc.metrics.db_retry,
        ).outcome
    except DatabaseUnavailable:
        spool = svc.spool
        if spool is None or not spool.put(delivery_id, hook_id, event, request.content_type or "", body):
            _answer(Outcome.UNAVAILABLE, 503, event, delivery_id, delivery.action)
            return error(503, "database unavailable, retry later", **{"Retry-After": "30"})
        outcome = Outcome.SPOOLED
    status = 202 if outcome in (Outcome.FAILED, Outcome.SPOOLED) else 200
    _answer(outcome, status, event, delivery_id, delivery.action)
    answer = {"delivery": delivery_id, "event": event, "action": delivery.action, "outcome": outcome.value}
    return jsonify(answer), status
