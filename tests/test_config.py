"""Settings from the environment: what is refused at start, and how it is said."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowlens_ingest.app import create_app
from flowlens_ingest.config import MIN_SECRET_BYTES, ConfigError, Settings

from .helpers import PREVIOUS_SECRET, SECRET, free_port, make_settings

GOOD_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BAD_URLS = [
    "foo",
    "postgresql://:notaport/x",
    "postgresql://u:hunter2@host:99999/db",
    "mysql://u@host/db",
    "http://host/db",
    "postgresql+asyncpg://host/db",
]


def run(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run a command with only the given FlowLens variables set."""
    drop = ("DATABASE_URL", "GITHUB_WEBHOOK_SECRET", "GITHUB_WEBHOOK_SECRET_PREVIOUS", "PROMETHEUS_MULTIPROC_DIR")
    environment = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("FLOWLENS_")}
    environment.update(env)
    return subprocess.run(args, cwd=cwd, env=environment, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("url", "normalized"),
    [
        ("postgres://u:p@db.example:5432/flowlens", "postgresql+psycopg2://u:p@db.example:5432/flowlens"),
        ("postgresql://u@[::1]:5433/yugabyte", "postgresql+psycopg2://u@[::1]:5433/yugabyte"),
        ("postgresql+psycopg2:///flowlens?host=/tmp", "postgresql+psycopg2:///flowlens?host=/tmp"),
    ],
)
def test_database_urls_are_normalized_for_psycopg2(url, normalized):
    assert Settings.from_env({"DATABASE_URL": url}).database_url == normalized


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_malformed_database_url_is_refused_without_echoing_it(url):
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"DATABASE_URL": url})
    message = str(refused.value)
    assert message.startswith("DATABASE_URL ") and "\n" not in message
    # The URL may hold a password: it is never repeated.
    assert url not in message and "hunter2" not in message


@pytest.mark.parametrize("url", ["foo", "postgresql://:notaport/x"])
def test_create_app_refuses_a_malformed_database_url(url, tmp_path):
    with pytest.raises(ConfigError, match=r"^DATABASE_URL "):
        create_app(make_settings(url, tmp_path))


def test_a_webhook_secret_shorter_than_16_bytes_is_refused():
    short = "x" * (MIN_SECRET_BYTES - 1)
    with pytest.raises(ConfigError, match=f"GITHUB_WEBHOOK_SECRET is shorter than {MIN_SECRET_BYTES} bytes"):
        Settings.from_env({"GITHUB_WEBHOOK_SECRET": short})
    # Bytes, not characters: 15 characters of which one takes two bytes in UTF-8 are 16 bytes.
    fifteen_chars = "x" * 14 + "\u00e9"
    assert Settings.from_env({"GITHUB_WEBHOOK_SECRET": fifteen_chars}).secrets == (fifteen_chars.encode(),)
    assert len(SECRET.encode()) >= MIN_SECRET_BYTES and len(PREVIOUS_SECRET.encode()) >= MIN_SECRET_BYTES


def test_a_short_previous_secret_is_accepted_for_rotating_away_from_it():
    settings = Settings.from_env({"GITHUB_WEBHOOK_SECRET": SECRET, "GITHUB_WEBHOOK_SECRET_PREVIOUS": "old"})
    assert settings.secrets == (SECRET.encode(), b"old")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DATABASE_URL": "foo", "GITHUB_WEBHOOK_SECRET": SECRET}, "DATABASE_URL is not a database URL"),
        (
            {"DATABASE_URL": "postgresql://:notaport/x", "GITHUB_WEBHOOK_SECRET": SECRET},
            "DATABASE_URL has a port that is not a number",
        ),
        ({"DATABASE_URL": GOOD_URL, "GITHUB_WEBHOOK_SECRET": "short"}, "GITHUB_WEBHOOK_SECRET is shorter than 16"),
        # The embedded mode generates a long secret only when none is set: a short one is refused.
        ({"GITHUB_WEBHOOK_SECRET": "short"}, "GITHUB_WEBHOOK_SECRET is shorter than 16"),
    ],
    ids=["not-a-url", "port", "short-secret", "short-secret-embedded"],
)
def test_serve_refuses_to_start_with_one_clear_line(env, message, tmp_path):
    result = run(sys.executable, "-m", "flowlens_ingest.cli", "serve", "--port", str(free_port()), cwd=tmp_path, **env)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("flowlens-ingest: ") and message in line
    # Nothing was started: no gunicorn output, no embedded database.
    assert "listening" not in result.stdout and not (tmp_path / ".flowlens").exists()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DATABASE_URL": "foo", "GITHUB_WEBHOOK_SECRET": SECRET}, "DATABASE_URL is not a database URL"),
        ({"DATABASE_URL": GOOD_URL, "GITHUB_WEBHOOK_SECRET": "short"}, "GITHUB_WEBHOOK_SECRET is shorter than 16"),
        ({"DATABASE_URL": GOOD_URL}, "GITHUB_WEBHOOK_SECRET is not set"),
    ],
    ids=["not-a-url", "short-secret", "no-secret"],
)
def test_gunicorn_as_the_procfile_runs_it_refuses_to_start_with_one_clear_line(env, message, tmp_path):
    gunicorn = Path(sys.executable).parent / "gunicorn"
    result = run(
        str(gunicorn),
        "-c",
        "python:flowlens_ingest.gunicorn_conf",
        "--bind",
        f"127.0.0.1:{free_port()}",
        "flowlens_ingest.wsgi:app",
        cwd=tmp_path,
        **env,
    )
    assert result.returncode != 0
    assert f"Error: flowlens-ingest: {message}" in result.stderr
    # Refused in the master, before any worker booted: no traceback, no "Booting worker".
    assert "Traceback" not in result.stderr and "Booting worker" not in result.stderr
