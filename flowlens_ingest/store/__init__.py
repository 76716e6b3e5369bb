"""The store: a delivery's rows as one transaction in PostgreSQL/YugabyteDB.

schema (the tables, one MetaData) -> expressions and statements (the guarded
upserts), derived (the pipeline statuses in SQL), journal (the journal upsert) ->
plan (a delivery's bound statements) -> wire (how a batch travels: PREPARE,
EXECUTE, BEGIN ... COMMIT) -> database (the one owner of transactions: the pool,
the deadlines, the retry loop). migrate drives alembic.

Imports the event layer and the foundations (config, metrics), never the web,
spool, GitHub or command-line code.
"""
