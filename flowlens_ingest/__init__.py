"""FlowLens Ingest: verified GitHub webhooks into YugabyteDB/PostgreSQL."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from . import db, logs, metrics
from .config import ConfigError, Settings

__all__ = ["create_app", "Settings", "ConfigError"]

log = logging.getLogger(__name__)


def create_app(config: Settings | None = None) -> Flask:
    """Build the app: settings from the environment unless given, one blueprint per concern."""
    settings = config if config is not None else Settings.from_env()
    if not settings.database_url:
        raise ConfigError("DATABASE_URL is not set (the `serve` command starts an embedded database)")
    if not settings.secrets:
        raise ConfigError("GITHUB_WEBHOOK_SECRET is not set: refusing to accept unsigned deliveries")
    logs.configure(settings)

    app = Flask(__name__)
    app.config["FLOWLENS"] = settings
    # Werkzeug refuses a larger body with 413 from its Content-Length, before reading it.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    db.init_app(app, settings)
    app.extensions["flowlens_metrics"] = metrics.instruments()
    if settings.spool_enabled:
        from .spool import Spool

        app.extensions["flowlens_spool"] = Spool(settings.spool_dir, settings.spool_max_bytes)

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
