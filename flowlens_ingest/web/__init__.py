"""The web layer: the Flask app gunicorn serves.

app (the factory and the services it wires) -> webhook (the /webhook blueprint:
verify, parse, ingest, answer) reading the body through signed_body; probes
(/healthz, /readyz, /metrics); wsgi and gunicorn_conf (how gunicorn runs it).

Imports the spool, ingest and below; never GitHub or command-line code.
"""
