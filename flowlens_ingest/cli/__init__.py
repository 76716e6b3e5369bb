"""The `flowlens-ingest` command line, over everything else.

main (the click commands and their help) calls commands (what each does); serve
(gunicorn and the files worker as children), embedded (the pip-installed
PostgreSQL of the default setup), nginx (the production front's configuration),
admin (list, replay and prune the journal).

The top layer: nothing else imports it.
"""
