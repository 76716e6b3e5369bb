"""The `/webhook` blueprint: verify, parse, hand over, answer. No SQL and no rules here."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import IO

from flask import Blueprint, Response, g, request
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from flowlens_ingest.events import parse, signature
from flowlens_ingest.events.delivery import Delivery
from flowlens_ingest.events.enums import Outcome
from flowlens_ingest.events.envelope import BadHeaders, Envelope
from flowlens_ingest.ingest import ingest
from flowlens_ingest.memory import LARGE
from flowlens_ingest.store.deadline import deadline
from flowlens_ingest.web.responses import answer, error
from flowlens_ingest.web.services import services
from flowlens_ingest.web.signed_body import BodyNotKept, read_signed, size_of

log = logging.getLogger(__name__)

bp = Blueprint("webhook", __name__)

# GitHub gives up on an answer after 10 s. A delivery's database work (pool checkout,
# connect, the batch, its retries, a failure record) ends this long after the request
# began, whatever the database does; the delivery is then spooled (202) or refused (503).
DATABASE_DEADLINE_S = 8.0
# A large body waits for its turn (memory.LargeBodies) until this long after the
# request began; past it, it is spooled raw for the drainer: parsed later, answered now.
LARGE_TURN_S = 5.0


@bp.before_request
def verify_signature() -> Response | None:
    """Refuse any request not signed with a secret we hold, before looking at it.

    The body is read once, in chunks, through the HMACs into a spooled file (signed_body.py):
    a worker never holds an unsigned body whole. The view reads it back once signed.
    """
    if request.method == "OPTIONS":
        # Flask's own answer, naming the methods as a 405 does: no delivery, nothing to verify.
        return None
    g.started = time.perf_counter()
    settings = services().settings
    try:
        # Werkzeug refuses a Content-Length over MAX_CONTENT_LENGTH here (413), reading
        # nothing, before the signature is looked at; a chunked body, once it runs past the limit.
        read = _bounded_read()
        g.body = read_signed(read, request.headers.get("X-Hub-Signature-256"), settings.secrets)
    except RequestEntityTooLarge:
        # Not a signature failure: a body cut at the limit cannot be verified at all.
        log.warning(
            "body over the limit",
            extra={"delivery": request.headers.get("X-GitHub-Delivery", "")[:100], "bytes": request.content_length},
        )
        raise
    except ClientDisconnected:
        # The connection ended before the body did: neither a forged delivery nor a whole one.
        log.warning(
            "body broke off",
            extra={"delivery": request.headers.get("X-GitHub-Delivery", "")[:100], "bytes": request.content_length},
        )
        raise
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
    except BodyNotKept as exc:
        # The temporary file a large body goes through could not be written (TMPDIR full, an I/O
        # error): this server's trouble, not the sender's. One line, no traceback; GitHub's log keeps
        # the delivery for a redelivery.
        log.error(  # noqa: TRY400 (one line by design: the error is named, no traceback)
            "request body not kept",
            extra={
                "error": f"{type(exc.__cause__ or exc).__name__}: {exc.strerror or exc}",
                "delivery": request.headers.get("X-GitHub-Delivery", "")[:100],
            },
        )
        return error(503, "cannot take the body now, retry later", **{"Retry-After": "30"})
    return None


def _bounded_read() -> Callable[[int], bytes]:
    """`read(n)` over the request body, raising RequestEntityTooLarge past MAX_CONTENT_LENGTH and
    ClientDisconnected when the body ends before its Content-Length."""
    stream = request.stream
    # gunicorn ends a body where its connection ended (`wsgi.input_terminated`), and Werkzeug then
    # reads to that end: a body cut short is found here. A chunked one (no length) Werkzeug refuses.
    expected = request.content_length
    got = 0

    def read(size: int) -> bytes:
        nonlocal got
        try:
            chunk = stream.read(size)
        except RequestEntityTooLarge:
            # Werkzeug refuses any read of a chunked body once it gave the limit's worth,
            # though that body may end right there: a body of exactly the limit is allowed.
            if request.environ["wsgi.input"].read(1):
                raise
            return b""
        if not chunk and expected is not None and got < expected:
            raise ClientDisconnected(f"the body ended after {got} of its Content-Length's {expected} bytes")
        got += len(chunk)
        return chunk

    return read


@bp.teardown_request
def close_body(_exc: BaseException | None) -> None:
    """Drop the spooled body (and its temporary file) once the request is over, and end its turn."""
    if g.pop("turn", None):
        LARGE.give_back()
    spooled = g.pop("body", None)
    if spooled is not None:
        spooled.close()


def signed_file() -> IO[bytes]:
    """The temporary file verify_signature read the signed bytes into, rewound."""
    spooled: IO[bytes] = g.body
    spooled.seek(0)
    return spooled


def signed_body() -> bytes:
    """The exact bytes verify_signature found signed."""
    return signed_file().read()


def _answer(outcome: Outcome, status: int, event: str, delivery_id: str, action: str | None = None) -> None:
    """Count and log one answered signed delivery: exactly one log line each, ids only."""
    elapsed = time.perf_counter() - g.started
    services().metrics.delivery(event, outcome, elapsed)
    log.log(
        logging.ERROR
        if status >= 500
        else logging.WARNING
        if status >= 400 or outcome is Outcome.FAILED
        else logging.INFO,
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
def receive() -> Response:
    """Answer one signed GitHub delivery."""
    svc = services()
    try:
        envelope = Envelope.from_headers(request.headers)
    except BadHeaders as exc:
        _answer(Outcome.REJECTED, 400, exc.event, exc.delivery_id)
        return error(400, str(exc))
    event, delivery_id = envelope.event, envelope.delivery_id
    if not parse.supported(envelope.content_type, request.headers.get("Content-Encoding")):
        # Known from the headers: said now, also of a large body that would be spooled unparsed.
        _answer(Outcome.REJECTED, 415, event, delivery_id)
        return error(415, "use application/json or application/x-www-form-urlencoded, with no Content-Encoding")
    g.turn = LARGE.take(size_of(g.body), LARGE_TURN_S - (time.perf_counter() - g.started))
    if g.turn is False:
        # Other large deliveries held this worker past the wait: kept raw, never parsed here,
        # copied from its temporary file (never read whole into memory).
        return _keep(envelope, signed_file(), None)
    body = signed_body()
    try:
        delivery = Delivery.parse(envelope, body)
    except parse.BadPayload as exc:
        _answer(Outcome.REJECTED, 400, event, delivery_id)
        return error(400, str(exc))
    with deadline(DATABASE_DEADLINE_S - (time.perf_counter() - g.started)):
        if svc.held.held(delivery.repository_github_id):
            # This repository's last delivery waited out its timeout (its row held, the server too slow
            # for it): kept for the drainer now, rather than a thread waiting out the same timeout.
            return _keep(envelope, body, delivery.action)
        readiness = svc.readiness
        if readiness.problem is not None and (svc.spool is not None or readiness.current() is not None):
            # The schema is known not ready: every statement would be refused. Kept for the drainer,
            # which applies it once the schema is migrated (the spool off: a 503, and GitHub's log
            # keeps it for a redelivery); nothing sent meanwhile.
            return _keep(envelope, body, delivery.action)
        result = ingest(
            svc.database,
            delivery,
            store_payload=svc.settings.store_payloads,
            compress=svc.settings.journal_compression,
            on_retry=svc.metrics.db_retry,
        )
    if result.outcome is None:
        # Not stored (retry later, or refused even as failed).
        if result.timed_out and not g.turn:
            # A delivery of ordinary size (a large one may time out for its own weight).
            svc.held.cancelled(delivery.repository_github_id)
        return _keep(envelope, body, delivery.action)
    return _answered(result.outcome, event, delivery_id, delivery.action)


def _keep(envelope: Envelope, body: bytes | IO[bytes], action: str | None) -> Response:
    """Spool a signed delivery for the drainer, which applies it or sets it aside; without the spool, a 503."""
    spool = services().spool
    if spool is None or not spool.put(envelope, body):
        _answer(Outcome.UNAVAILABLE, 503, envelope.event, envelope.delivery_id, action)
        return error(503, "database unavailable, retry later", **{"Retry-After": "30"})
    return _answered(Outcome.SPOOLED, envelope.event, envelope.delivery_id, action)


def _answered(outcome: Outcome, event: str, delivery_id: str, action: str | None) -> Response:
    """The answer to a delivery stored with `outcome`: 202 for failed or spooled, else 200."""
    status = 202 if outcome in (Outcome.FAILED, Outcome.SPOOLED) else 200
    _answer(outcome, status, event, delivery_id, action)
    return answer({"delivery": delivery_id, "event": event, "action": action, "outcome": outcome.value}, status)
