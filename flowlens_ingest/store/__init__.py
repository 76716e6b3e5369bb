"""The store: a delivery's rows as one transaction in PostgreSQL/YugabyteDB.

schema (the tables, one MetaData) -> expressions and statements (the guarded
upserts), derived (the pipeline statuses in SQL), journal (the journal upsert) ->
plan (a delivery's statements, as batch.Statement data) -> database (the one owner
of transactions: the pool, the deadlines, the retry loop; run(batch) is the way
in) -> wire (how a batch travels: compiled once by SQLAlchemy, PREPARE, EXECUTE,
one query a transaction). migrate drives alembic.

Imports the event layer and the foundations (config, metrics), never the web,
spool, GitHub or command-line code.
"""
