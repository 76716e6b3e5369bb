"""The WSGI entry point gunicorn loads: `flowlens_ingest.web.wsgi:app`."""

from flowlens_ingest.web.app import create_app

app = create_app()
