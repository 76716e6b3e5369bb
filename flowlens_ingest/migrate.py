"""Alembic, driven from the installed package so it works from any working directory."""

from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Engine


def script_location() -> Path:
    """The migrations folder: installed as flowlens_ingest/migrations, or alembic/ in a checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "migrations", package.parent / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise RuntimeError("the migrations are missing from this installation")


def alembic_config(url: str) -> Config:
    """An alembic Config for `url`, independent of the current directory."""
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    # ConfigParser interpolation would eat the % of URL-encoded passwords.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` to `revision`."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Migrate the database at `url` down to `revision`."""
    command.downgrade(alembic_config(url), revision)


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config("postgresql://"))


def head() -> str | None:
    """The newest revision the package ships."""
    return _scripts().get_current_head()


def is_known(revision: str) -> bool:
    """Whether the package ships `revision` (a database migrated by a newer release is not)."""
    try:
        return _scripts().get_revision(revision) is not None
    except CommandError:  # what alembic raises for an id it does not know
        return False


def revisions(engine: Engine) -> tuple[str | None, str | None]:
    """(the database's revision, the package's head revision)."""
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    return current, head()


UPGRADE_COMMAND = "flowlens-ingest db upgrade"


def pending(engine: Engine) -> str | None:
    """Why the database is not ready for this release, naming the command that migrates it; None when it is."""
    current, newest = revisions(engine)
    if current == newest or (current is not None and not is_known(current)):
        return None  # at head, or migrated by a newer release (a rolling deploy)
    at = f"at revision {current}" if current else "not migrated"
    return f"the database is {at}, this release needs {newest}: run `{UPGRADE_COMMAND}`"
