"""The Flask app factory, and typed access to what it wires (settings, database, metrics, spool)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flask import Flask, Response, current_app, jsonify
from werkzeug.exceptions import HTTPException

from . import logs, metrics
from .config import ConfigError, Settings
from .database import Database
from .metrics import Metrics
from .spool import Spool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Services:
    """What one app holds for its requests and background threads."""

    settings: Settings
    database: Database
    metrics: Metrics
    spool: Spool | None


def services(app: Flask | None = None) -> Services:
    """The services of `app`, or of the current app."""
    found: Services = (app or current_app).extensions["flowlens"]
    return found


def create_app(config: Settings | None = None) -> Flask:
    """Build the app: settings from the environment unless given, one blueprint per concern."""
    settings = config if config is not None else Settings.from_env()
    if not settings.database_url:
        raise ConfigError("DATABASE_URL is not set (the `serve` command starts an embedded database)")
    if not settings.secrets:
        raise ConfigError("GITHUB_WEBHOOK_SECRET is not set: refusing to accept unsigned deliveries")
    logs.configure(settings)

    app = Flask(__name__)
    # Werkzeug refuses a larger body with 413 from its Content-Length, before reading it.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    spool = (
        Spool(settings.spool_dir, settings.spool_max_bytes) if settings.spool_dir and settings.spool_enabled else None
    )
    app.extensions["flowlens"] = Services(settings, Database(settings), metrics.instruments(), spool)

    from . import ops, webhook

    app.register_blueprint(webhook.bp)
    app.register_blueprint(ops.bp)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        return jsonify({"error": exc.description or exc.name}), exc.code or 500

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        # Never a stack trace in an answer; the log has it.
        log.exception("unexpected error")
        return jsonify({"error": "internal error"}), 500

    return app
