"""Ingest throughput benchmark: the service under wrk against the database's own limit.

Run from the repository root: `.venv/bin/python -m bench` (see `--help`).
"""
