"""FlowLens Ingest: verified GitHub webhooks into YugabyteDB/PostgreSQL.

A delivery flows one way through the layers, each a package that imports only
those below it (import-linter checks it, see setup.cfg):

    cli       the `flowlens-ingest` command line
    web       /webhook, /readyz, /metrics: verify, parse, ingest, answer   | github  the REST API, the files worker
              | postgres  the embedded database and PostgreSQL's programs
    spool     deliveries kept on disk while the database is down
    ingest    one delivery: map -> plan -> run -> its disposition
    store     tables, statements, the batch on the wire, the database
    metrics, logs, memory, config, environment, names   the foundations (settings, their readers, GitHub's names)
    events    pure: signature, parse, delivery, mappers -> rows, rules

Importing this package loads nothing else, so the pure layer stays free of Flask
and the database driver.
"""

__version__ = "0.1.0"
