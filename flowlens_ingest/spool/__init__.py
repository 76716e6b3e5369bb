"""The spool: where a delivery waits on local disk while the database is down.

folder (one fsynced file per delivery, a flat-cost put) and drainer (the
per-worker thread that applies them, oldest first, once the database is back).

Imports ingest and below; never the web, GitHub or command-line code.
"""
