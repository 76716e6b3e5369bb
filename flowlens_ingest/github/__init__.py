"""GitHub's REST API and the work done against it, apart from any webhook request.

client (the REST client: requests with deadlines and caps, typed errors) and auth
(App JWTs and installation tokens); files (a pull request's file list, shaped),
jobs (the durable files queue) and enrich (the files worker).

Imports ingest and below; never the web, spool or command-line code.
"""
