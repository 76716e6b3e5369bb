"""The Flask app factory: settings, services (web/services.py) and one blueprint per concern."""

from __future__ import annotations

import logging

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from flowlens_ingest import logs, metrics
from flowlens_ingest.config import Settings
from flowlens_ingest.spool.folder import Spool
from flowlens_ingest.store.database import Database
from flowlens_ingest.store.readiness import Readiness
from flowlens_ingest.web.responses import error
from flowlens_ingest.web.services import Services, init_app

log = logging.getLogger(__name__)


def create_app(config: Settings | None = None) -> Flask:
    """Build the app: settings from the environment unless given, one blueprint per concern."""
    settings = config if config is not None else Settings.from_env()
    settings.check_service()
    logs.configure(settings)

    app = Flask(__name__)
    # Werkzeug refuses a larger body with 413 from its Content-Length, before reading it.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    spool = (
        Spool(settings.spool_dir, settings.spool_max_bytes) if settings.spool_dir and settings.spool_enabled else None
    )
    database = Database(settings)
    init_app(app, Services(settings, database, metrics.instruments(), spool, Readiness(database)))

    from flowlens_ingest.web import probes, webhook

    app.register_blueprint(webhook.bp)
    app.register_blueprint(probes.bp)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        response = error(exc.code or 500, exc.description or exc.name)
        # Keep the exception's own headers (405's Allow, a Retry-After), not its HTML type.
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        # Never a stack trace in an answer; the log has it.
        log.exception("unexpected error")
        return error(500, "internal error")

    return app
