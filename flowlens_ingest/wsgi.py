"""The WSGI entry point gunicorn loads: `flowlens_ingest.wsgi:app`."""

from .app import create_app

app = create_app()
