"""The framework's floor: a bare Flask route under the service's own gunicorn configuration.

`python -m bench` runs it beside the service, on the same bodies and connections, and reports the
service's worker CPU per delivery as a multiple of this floor's per request: what the service does
above what gunicorn and Flask cost to receive a body and answer a small JSON object.

    gunicorn -c python:bench.floor_conf bench.floor:app
"""

from __future__ import annotations

from flask import Flask, Response, request

app = Flask(__name__)


@app.post("/webhook")
def webhook() -> Response:
    """Read the whole body, as the service does, and answer as small an object as it does."""
    request.get_data()
    return Response('{"outcome":"applied"}', status=200, mimetype="application/json")


@app.get("/readyz")
def readyz() -> Response:
    """Ready as soon as a worker serves (the benchmark waits on it)."""
    return Response('{"status":"ready"}', status=200, mimetype="application/json")
