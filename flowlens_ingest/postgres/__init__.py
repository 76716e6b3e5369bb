"""PostgreSQL servers and programs this machine runs: the embedded default database and its keeper,
and the wheel's programs (initdb, pg_ctl, psql) run as a user who is not root.

Below the command line (which starts the embedded database for `serve` and the operator commands)
and beside web and github; imports only config. The tests start throwaway servers with it too.
"""
