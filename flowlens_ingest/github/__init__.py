"""GitHub's REST API and the work done against it, apart from any webhook request.

client (the REST client: requests with deadlines and caps), auth (App JWTs and installation
tokens), answers (reading what GitHub answered, I/O-free), errors (the typed errors);
files (a pull request's file list, shaped), jobs (the durable files queue) and enrich
(the files worker); hooks (which delivery logs to read), recover (missed deliveries brought in)
and recover_pass (the worker's scheduled pass).

Imports ingest and below; never the web, spool or command-line code.
"""
