"""What an app wires for its requests and background threads, and typed access to it.

In a module of its own, as flaskr keeps its wiring in db.py: the blueprints reach
the services through here, never through the app factory that registers them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flask import Flask, current_app

from flowlens_ingest.config import Settings
from flowlens_ingest.metrics import Metrics
from flowlens_ingest.spool import drainer
from flowlens_ingest.spool.folder import Spool
from flowlens_ingest.store.database import Database
from flowlens_ingest.store.readiness import Readiness
from flowlens_ingest.web.held import HeldRepositories

EXTENSION = "flowlens"


@dataclass(frozen=True)
class Services:
    """What one app holds for its requests and background threads."""

    settings: Settings
    database: Database
    metrics: Metrics
    spool: Spool | None
    # The schema's state, kept current by the drainer (the request path, with the spool off).
    readiness: Readiness
    # Repositories whose last delivery timed out: their next ones are spooled at once (held.py).
    held: HeldRepositories = field(default_factory=HeldRepositories)


def init_app(app: Flask, services: Services) -> None:
    """Wire `services` into `app`."""
    app.extensions[EXTENSION] = services


def services(app: Flask | None = None) -> Services:
    """The services of `app`, or of the current app."""
    found: Services = (app or current_app).extensions[EXTENSION]
    return found


def start_drainer(
    app: Flask, interval: float = drainer.DRAIN_INTERVAL_S, *, said_at_start: str | None = None
) -> drainer.Drainer | None:
    """Start this worker's spool drainer (a daemon thread); None when the spool is off.

    `said_at_start`: what gunicorn's master has already said is wrong with the database. Until the
    drainer asks, the request path takes it as the schema's state: no statement is sent to a
    database known not ready.
    """
    svc = services(app)
    if said_at_start is not None:
        # With the spool off too: the request path then answers 503 without a statement sent.
        svc.readiness.assume(said_at_start)
    if svc.spool is None:
        return None
    handle = drainer.spool_handler(
        svc.database, svc.settings, svc.metrics, said_at_start=said_at_start is not None, readiness=svc.readiness
    )
    return drainer.start(svc.spool, handle, svc.metrics, interval)
