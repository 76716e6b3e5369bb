"""The WSGI entry point gunicorn loads: `flowlens_ingest.wsgi:app`."""

from . import create_app

app = create_app()
