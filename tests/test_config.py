"""Settings from the environment: what is refused at start, and how it is said."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowlens_ingest.config import (
    MIB,
    MIN_SECRET_BYTES,
    ConfigError,
    Settings,
    declarations,
    unknown_variables,
    writable_directory,
)
from flowlens_ingest.database_urls import database_location
from flowlens_ingest.web.app import create_app

from .fake_github import app_private_key_pem
from .helpers import PREVIOUS_SECRET, SECRET, free_port, make_settings

GOOD_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# Never reached: every command must refuse a bad setting before it connects.
UNREACHABLE_URL = "postgresql://nobody@127.0.0.1:1/none"
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


@pytest.mark.parametrize(
    ("url", "normalized"),
    [
        # libpq's own host list (what psql takes) is read as SQLAlchemy's query form, meaning what libpq means.
        (
            "postgresql://u:hunter2@db1:5432,db2:5433/flowlens?target_session_attrs=read-write",
            "postgresql+psycopg2://u:hunter2@/flowlens?host=db1,db2&port=5432,5433&target_session_attrs=read-write",
        ),
        # A host without a port gets libpq's default, not its neighbour's.
        ("postgres://u@db1,db2:5433/flowlens", "postgresql+psycopg2://u@/flowlens?host=db1,db2&port=,5433"),
        ("postgresql://yugabyte@t1,t2,t3/yugabyte", "postgresql+psycopg2://yugabyte@/yugabyte?host=t1,t2,t3"),
        ("postgresql://u@[::1]:5432,[fd00::2]/db", "postgresql+psycopg2://u@/db?host=::1,fd00::2&port=5432,"),
        # The query forms are left as written.
        (
            "postgresql://u@/db?host=db1:5432&host=db2:5432&target_session_attrs=read-write",
            "postgresql+psycopg2://u@/db?host=db1:5432&host=db2:5432&target_session_attrs=read-write",
        ),
        ("postgresql://u@/db?host=db1,db2&port=5432,5433", "postgresql+psycopg2://u@/db?host=db1,db2&port=5432,5433"),
    ],
)
def test_a_libpq_host_list_is_accepted_as_the_query_form(url, normalized):
    assert Settings.from_env({"DATABASE_URL": url}).database_url == normalized
    # And the driver is handed both hosts, each with its port.
    assert database_location(normalized).split("/")[0].count(",") >= 1


@pytest.mark.parametrize(
    ("url", "said"),
    [
        (
            "postgresql://u:hunter2@db1:5432,db2:54x2/db",
            (
                "a port that is not a number from 1 to 65535 (write the hosts in the query instead,"
                " like postgresql://USER@/DBNAME?host=db1:5432&host=db2:5432)"
            ),
        ),
        ("postgresql://u:hunter2@db1:5432,db2:99999/db", "?host=db1:5432&host=db2:5432)"),
        ("postgresql://u:hunter2@db1,,db2/db", "a host list that is not host:port,host:port"),
        ("postgresql://u:hunter2@db1,db2/db?host=db3", "names hosts both before its database name and in its query"),
        ("postgresql://u:hunter2@db1/db?host=db3", "names a host both before its database name and in ?host="),
        ("postgresql://u:hunter2@/db?host=db1:5432&host=db2:x", "?host= and ?port= values that do not pair up"),
        ("postgresql://u:hunter2@/db?host=db1,db2&port=1,2,3", "?host= and ?port= values that do not pair up"),
        # A typo would fail every connection once started: refused before, by name.
        (
            "postgresql://u:hunter2@db1,db2/db?target_session_attr=read-write",
            "libpq does not know (target_session_attr)",
        ),
        # The smart driver's option is not libpq's; libpq's own is named instead.
        ("postgresql://u:hunter2@t1:5433/yugabyte?load_balance=true", "&load_balance_hosts=random instead"),
    ],
)
def test_a_host_list_that_cannot_work_is_one_line_naming_the_form_to_use(url, said):
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"DATABASE_URL": url})
    message = str(refused.value)
    assert message.startswith("DATABASE_URL ") and "\n" not in message and said in message
    assert "hunter2" not in message


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
        "python:flowlens_ingest.web.gunicorn_conf",
        "--bind",
        f"127.0.0.1:{free_port()}",
        "flowlens_ingest.web.wsgi:app",
        cwd=tmp_path,
        **env,
    )
    assert result.returncode == 2
    # Refused in the master as it read its configuration, before any worker booted: one line.
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"flowlens-ingest: {message}")


# --- every setting's range ------------------------------------------------------------------------

# (variable, Settings attribute, values accepted (the bounds), values refused)
RANGES = [
    ("FLOWLENS_STATEMENT_TIMEOUT_MS", "statement_timeout_ms", ["100", "7000"], ["0", "-1", "99", "7001", "5s"]),
    ("FLOWLENS_MAX_BODY_BYTES", "max_body_bytes", ["1024", str(25 * MIB)], ["0", "-1", "1023", str(25 * MIB + 1)]),
    ("FLOWLENS_POOL_SIZE", "pool_size", ["1", "100"], ["0", "-3", "101", "five"]),
    (
        "FLOWLENS_SPOOL_MAX_BYTES",
        "spool_max_bytes",
        ["0", str(25 * MIB), str(10**12)],
        ["-1", "512", str(25 * MIB - 1)],
    ),
    ("FLOWLENS_WORKERS", "workers", ["1", "256"], ["0", "257", "abc"]),
    ("WEB_CONCURRENCY", "workers", ["1", "256"], ["0", "-2", "257"]),
    ("FLOWLENS_THREADS", "threads", ["1", "64"], ["0", "65"]),
    ("FLOWLENS_GRACEFUL_TIMEOUT", "graceful_timeout_s", ["10", "300"], ["0", "9", "301"]),
    ("FLOWLENS_RECYCLE_ABOVE_MB", "recycle_above_mb", ["1", "65536"], ["0", "-1", "65537", "1GB"]),
    ("FLOWLENS_ENRICH_RATE_RESERVE", "enrich_rate_reserve", ["0", "4999"], ["-1", "5000"]),
    ("FLOWLENS_ENRICH_LEASE_S", "enrich_lease_s", ["30", "3600"], ["0", "29", "3601"]),
    ("FLOWLENS_ENRICH_MAX_ATTEMPTS", "enrich_max_attempts", ["1", "20"], ["0", "21"]),
]


@pytest.mark.parametrize(
    ("name", "attribute", "value"),
    [(name, attribute, value) for name, attribute, accepted, _ in RANGES for value in accepted],
)
def test_each_bound_of_a_range_is_accepted(name, attribute, value):
    assert getattr(Settings.from_env({name: value}), attribute) == int(value)


@pytest.mark.parametrize(
    ("name", "value"),
    [(name, value) for name, _, _, refused in RANGES for value in refused],
)
def test_a_value_outside_its_range_is_one_line_naming_the_variable_and_its_range(name, value):
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({name: value})
    message = str(refused.value)
    assert message.startswith(f"{name} must be ") and message.endswith(f"got {value!r}") and "\n" not in message


def test_the_defaults_are_inside_their_ranges():
    settings = Settings.from_env({})
    assert (settings.statement_timeout_ms, settings.max_body_bytes, settings.spool_max_bytes) == (
        5000,
        25 * MIB,
        512 * MIB,
    )
    assert (settings.threads, settings.pool_size, settings.graceful_timeout_s) == (4, 5, 20)
    assert 1 <= settings.workers <= 256 and settings.bind == "0.0.0.0:8000"
    assert (settings.log_level, settings.log_format, settings.isolation_level) == ("INFO", "json", "READ COMMITTED")


def test_the_pool_follows_the_threads_unless_set():
    assert Settings.from_env({"FLOWLENS_THREADS": "8"}).pool_size == 9
    assert Settings.from_env({"FLOWLENS_THREADS": "8", "FLOWLENS_POOL_SIZE": "3"}).pool_size == 3


def test_flowlens_workers_wins_over_web_concurrency():
    assert Settings.from_env({"WEB_CONCURRENCY": "3"}).workers == 3
    assert Settings.from_env({"WEB_CONCURRENCY": "3", "FLOWLENS_WORKERS": "2"}).workers == 2


def test_the_port_and_the_bind():
    assert Settings.from_env({"PORT": "5123"}).bind == "0.0.0.0:5123"
    assert Settings.from_env({"PORT": "5123", "FLOWLENS_BIND": "127.0.0.1:9000"}).bind == "127.0.0.1:9000"
    for port in ("0", "65536", "http"):
        with pytest.raises(ConfigError, match=r"^PORT must be a whole number from 1 to 65535"):
            Settings.from_env({"PORT": port})


@pytest.mark.parametrize(
    ("name", "given", "read"),
    [
        ("FLOWLENS_LOG_LEVEL", "debug", "DEBUG"),
        ("FLOWLENS_LOG_LEVEL", " Warning ", "WARNING"),
        ("FLOWLENS_LOG_FORMAT", "TEXT", "text"),
        ("FLOWLENS_ISOLATION_LEVEL", "repeatable_read", "REPEATABLE READ"),
    ],
)
def test_a_choice_is_read_in_any_case(name, given, read):
    attribute = {"FLOWLENS_LOG_LEVEL": "log_level", "FLOWLENS_LOG_FORMAT": "log_format"}.get(name, "isolation_level")
    assert getattr(Settings.from_env({name: given}), attribute) == read


@pytest.mark.parametrize(
    ("name", "value", "accepted"),
    [
        ("FLOWLENS_LOG_LEVEL", "BOGUS", "DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ("FLOWLENS_LOG_LEVEL", "trace", "DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ("FLOWLENS_LOG_FORMAT", "yaml", "json, text"),
        ("FLOWLENS_ISOLATION_LEVEL", "SERIALIZABLE", "READ COMMITTED, REPEATABLE READ"),
    ],
)
def test_a_choice_outside_its_list_is_refused_with_the_list(name, value, accepted):
    with pytest.raises(ConfigError, match=f"^{name} must be one of {accepted}, got {value!r}$"):
        Settings.from_env({name: value})


@pytest.mark.parametrize(
    "name", ["FLOWLENS_JOURNAL_PAYLOADS", "FLOWLENS_JOURNAL_COMPRESSION", "FLOWLENS_PREPARED_STATEMENTS"]
)
def test_a_switch_is_true_or_false(name):
    attribute = {
        "FLOWLENS_JOURNAL_PAYLOADS": "store_payloads",
        "FLOWLENS_JOURNAL_COMPRESSION": "journal_compression",
        "FLOWLENS_PREPARED_STATEMENTS": "prepared_statements",
    }[name]
    assert getattr(Settings.from_env({name: "on"}), attribute) is True
    assert getattr(Settings.from_env({name: "No"}), attribute) is False
    with pytest.raises(ConfigError, match=f"^{name} must be true or false"):
        Settings.from_env({name: "2"})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GITHUB_API_URL", "api.github.com"),
        ("GITHUB_API_URL", "ftp://ghe.example/api/v3"),
        ("GITHUB_API_URL", "https://x-token:hunter2@"),
        ("GITHUB_API_URL", "https://[::1/api"),
        ("FLOWLENS_URL", "localhost:8000/webhook"),
    ],
)
def test_a_url_must_be_http_and_is_not_repeated(name, value):
    with pytest.raises(ConfigError, match=f"^{name} must be an http:// or https:// URL") as refused:
        Settings.from_env({name: value})
    assert value not in str(refused.value)


def test_urls_as_given():
    settings = Settings.from_env(
        {"GITHUB_API_URL": "https://ghe.example/api/v3/", "FLOWLENS_URL": "http://[::1]:8000/webhook"}
    )
    assert (settings.github_api_url, settings.send_url) == ("https://ghe.example/api/v3", "http://[::1]:8000/webhook")


def test_folders_are_made_at_start_or_named_in_one_line(tmp_path):
    made = tmp_path / "new" / "spool"
    writable_directory(made, "FLOWLENS_SPOOL_DIR")
    assert made.is_dir()
    (tmp_path / "a-file").write_text("")
    for path in (Path("/dev/null/spool"), tmp_path / "a-file", tmp_path / "a-file" / "spool"):
        with pytest.raises(ConfigError, match=rf"^FLOWLENS_SPOOL_DIR must be a folder this user can write; {path} "):
            writable_directory(path, "FLOWLENS_SPOOL_DIR")


def test_check_folders_names_the_variable_that_chose_each_folder(tmp_path):
    bad = {"FLOWLENS_DATA_DIR": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"^FLOWLENS_SPOOL_DIR "):
        Settings.from_env({**bad, "FLOWLENS_SPOOL_DIR": "/dev/null/spool"}).check_folders("0.0.0.0:8000")
    with pytest.raises(ConfigError, match=r"^PROMETHEUS_MULTIPROC_DIR "):
        Settings.from_env({**bad, "PROMETHEUS_MULTIPROC_DIR": "/dev/null/metrics"}).check_folders("0.0.0.0:8000")
    with pytest.raises(ConfigError, match=r"^FLOWLENS_DATA_DIR "):
        Settings.from_env({"FLOWLENS_DATA_DIR": "/dev/null/data"}).check_folders("0.0.0.0:8000")
    # No spool, nothing to make for it.
    Settings.from_env({**bad, "FLOWLENS_SPOOL_DIR": "/dev/null/spool", "FLOWLENS_SPOOL_MAX_BYTES": "0"}).check_folders(
        "0.0.0.0:8000"
    )
    assert (tmp_path / "metrics" / "8000").is_dir()


# --- what an operator sees: every entry point refuses before it starts anything ------------------

# The cases the attack scripts found: each started and printed "listening" before.
BAD_SETTINGS = {
    "statement-timeout-0": ("FLOWLENS_STATEMENT_TIMEOUT_MS", "0"),
    "statement-timeout-negative": ("FLOWLENS_STATEMENT_TIMEOUT_MS", "-1"),
    "body-limit-0": ("FLOWLENS_MAX_BODY_BYTES", "0"),
    "pool-negative": ("FLOWLENS_POOL_SIZE", "-3"),
    "pool-0": ("FLOWLENS_POOL_SIZE", "0"),
    "spool-size-negative": ("FLOWLENS_SPOOL_MAX_BYTES", "-1"),
    "log-level": ("FLOWLENS_LOG_LEVEL", "BOGUS"),
}
# Checked where the folder is used: by the service (`serve`, gunicorn), not by every command.
BAD_FOLDERS = {
    "spool-dir": ("FLOWLENS_SPOOL_DIR", "/dev/null/spool"),
    "metrics-dir": ("PROMETHEUS_MULTIPROC_DIR", "/dev/null/metrics"),
}
REPOSITORY = Path(__file__).resolve().parent.parent
GUNICORN = [str(Path(sys.executable).parent / "gunicorn"), "-c", "python:flowlens_ingest.web.gunicorn_conf"]


def entry_point(name: str) -> list[str]:
    """The command line of one entry point, as an operator or the Procfile runs it."""
    cli = [sys.executable, "-m", "flowlens_ingest.cli"]
    commands = {
        "serve": [*cli, "serve", "--port", str(free_port())],
        "db upgrade": [*cli, "db", "upgrade"],
        "enrich": [*cli, "enrich", "--once"],
        "deliveries": [*cli, "deliveries"],
        "gunicorn": [*GUNICORN, "--bind", f"127.0.0.1:{free_port()}", "flowlens_ingest.web.wsgi:app"],
        "status": [*cli, "status"],
        # `alembic upgrade head` from the repository's root (run there).
        "alembic": [str(Path(sys.executable).parent / "alembic"), "upgrade", "head"],
    }
    return commands[name]


def assert_refused_in_one_line(result: subprocess.CompletedProcess, name: str) -> None:
    """Exit 2, one stderr line naming the variable, no traceback, nothing served."""
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"flowlens-ingest: {name} must be ")
    assert "Traceback" not in result.stdout + result.stderr and "listening" not in result.stdout


@pytest.mark.parametrize("command", ["serve", "db upgrade", "enrich", "deliveries", "gunicorn"])
@pytest.mark.parametrize(("name", "value"), BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_every_entry_point_refuses_a_bad_setting_with_exit_2_and_one_line(command, name, value, tmp_path):
    # A database URL nothing listens on, a secret, a GitHub token: the setting is the only fault.
    env = {"DATABASE_URL": UNREACHABLE_URL, "GITHUB_WEBHOOK_SECRET": SECRET, "GITHUB_TOKEN": "t", name: value}
    if command == "serve":
        del env["DATABASE_URL"]  # embedded mode: nothing may be started either
    assert_refused_in_one_line(run(*entry_point(command), cwd=tmp_path, **env), name)
    assert not (tmp_path / ".flowlens" / "pgdata").exists()


@pytest.mark.parametrize("command", ["serve", "db upgrade", "enrich", "deliveries", "status", "gunicorn", "alembic"])
def test_every_entry_point_refuses_a_broken_host_list_with_exit_2_and_one_line(command, tmp_path):
    env = {"DATABASE_URL": "postgresql://nobody:hunter2@127.0.0.1:1,127.0.0.1:x/none", "GITHUB_WEBHOOK_SECRET": SECRET}
    result = run(*entry_point(command), cwd=REPOSITORY if command == "alembic" else tmp_path, **env)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("flowlens-ingest: DATABASE_URL has a host list with a port that is not a number")
    assert line.endswith("like postgresql://USER@/DBNAME?host=127.0.0.1:1&host=127.0.0.1:5432)")
    assert "Traceback" not in result.stdout + result.stderr and "hunter2" not in result.stdout + result.stderr


@pytest.mark.parametrize("command", ["serve", "gunicorn"])
@pytest.mark.parametrize(("name", "value"), BAD_FOLDERS.values(), ids=BAD_FOLDERS.keys())
def test_the_service_refuses_a_folder_it_cannot_write_with_exit_2_and_one_line(command, name, value, tmp_path):
    env = {"DATABASE_URL": UNREACHABLE_URL, "GITHUB_WEBHOOK_SECRET": SECRET, name: value}
    if command == "serve":
        del env["DATABASE_URL"]
    assert_refused_in_one_line(run(*entry_point(command), cwd=tmp_path, **env), name)
    assert not (tmp_path / ".flowlens" / "pgdata").exists()


def test_a_misspelled_variable_is_named_with_the_nearest_setting():
    assert unknown_variables({"FLOWLENS_WORKER": "3", "FLOWLENS_WORKERS": "2", "FLOWLENS_TEST_DATABASE_URL": "x"}) == [
        "FLOWLENS_WORKER is not a setting and is ignored (did you mean FLOWLENS_WORKERS?)"
    ]
    assert unknown_variables({"FLOWLENS_ZZZ": "1", "PATH": "/bin"}) == ["FLOWLENS_ZZZ is not a setting and is ignored"]


def test_a_command_warns_once_of_a_variable_that_is_no_setting():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWLENS_", "DATABASE_URL"))}
    result = subprocess.run(
        [sys.executable, "-m", "flowlens_ingest.cli", "nginx-conf"],
        env={**env, "FLOWLENS_WORKER": "3"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "flowlens-ingest: warning: FLOWLENS_WORKER is not a setting and is ignored (did you mean FLOWLENS_WORKERS?)"
    ]


def test_every_setting_is_declared_once_with_its_rows():
    """Each variable is read by one declaration, and each documented one has a row of the docs' tables."""
    names = [name for declared in declarations() for name in declared.names]
    assert len(names) == len(set(names))
    documented = " ".join(row.variable for declared in declarations() for row in declared.rows)
    assert [name for name in names if f"`{name}`" not in documented] == []


@pytest.mark.parametrize("name", ["GITHUB_WEBHOOK_SECRET", "DATABASE_URL", "GITHUB_TOKEN"])
def test_a_variable_that_is_not_utf8_is_named(name):
    # The environment's undecodable bytes arrive as lone surrogates (Python's surrogateescape).
    with pytest.raises(ConfigError, match=f"{name} is not valid UTF-8 text"):
        Settings.from_env({name: "\udcff" * 40})


def test_a_private_key_file_that_is_not_text_is_named(tmp_path):
    key = tmp_path / "app.der"
    key.write_bytes(b"\x30\x82\x04\xa4\xff\xfe")
    with pytest.raises(ConfigError, match="GITHUB_APP_PRIVATE_KEY_FILE is not a text"):
        Settings.from_env({"GITHUB_APP_ID": "1", "GITHUB_APP_PRIVATE_KEY_FILE": str(key)})


@pytest.mark.parametrize("kind", ["fifo", "device", "huge"])
def test_a_private_key_file_is_never_waited_on_nor_read_without_end(kind, tmp_path):
    key = {"fifo": tmp_path / "key.fifo", "device": Path("/dev/zero"), "huge": tmp_path / "huge.pem"}[kind]
    if kind == "fifo":
        os.mkfifo(key)
    elif kind == "huge":
        key.write_bytes(b"-" * (1024 * 1024))
    why = "larger than" if kind == "huge" else "not a regular file"
    with pytest.raises(ConfigError, match=f"^GITHUB_APP_PRIVATE_KEY_FILE cannot be read: {why}"):
        Settings.from_env({"GITHUB_APP_ID": "1", "GITHUB_APP_PRIVATE_KEY_FILE": str(key)})


def test_the_command_line_names_a_variable_that_is_not_utf8(tmp_path):
    env = {**os.environ, "FLOWLENS_DATA_DIR": str(tmp_path)}
    env_bytes = {k.encode(): v.encode() for k, v in env.items()}
    env_bytes[b"GITHUB_WEBHOOK_SECRET"] = b"\xff" * 40
    done = subprocess.run(
        [sys.executable, "-m", "flowlens_ingest.cli", "deliveries"],
        env=env_bytes,  # type: ignore[arg-type]
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "GITHUB_WEBHOOK_SECRET is not valid UTF-8 text" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "url",
    ["postgresql://us%00er:pw@h/db", "postgresql://u:p%00w@h/db", "postgresql://u@h/db?application_name=a%00b"],
    ids=["user", "password", "option"],
)
def test_a_database_url_holding_a_nul_is_refused_at_start(url):
    # libpq takes C strings: a NUL would fail every connection, each delivery taken for a bug.
    with pytest.raises(ConfigError, match="NUL character"):
        Settings.from_env({"DATABASE_URL": url})


@pytest.mark.parametrize("value", ["\u00b2", "12 34", "Iv23li\u00e9"])
def test_a_github_app_id_is_its_digits_or_client_id(value):
    # "²" passed str.isdigit() where the id was read as a number, and int() refused it: a traceback.
    with pytest.raises(ConfigError, match=f"^GITHUB_APP_ID must be the GitHub App's id .*, got {value!r}$"):
        Settings.from_env({"GITHUB_APP_ID": value})


@pytest.mark.parametrize("value", ["123456", "Iv23liAbCdEf.0_9-x"])
def test_a_github_app_id_or_client_id_is_taken(value):
    env = {"GITHUB_APP_ID": value, "GITHUB_APP_PRIVATE_KEY": app_private_key_pem()}
    assert Settings.from_env(env).github_app_id == value


@pytest.mark.parametrize("value", ["ghp_abc\rdef", "ghp_abc def", "ghp_abc\x00def", "ghp_\u00e9"])
def test_a_github_token_no_github_token_looks_like_is_refused_without_repeating_it(value):
    # Sent as a header, it would be refused by the HTTP library in a message quoting the header.
    with pytest.raises(ConfigError, match=r"^GITHUB_TOKEN holds a character no GitHub token has") as refused:
        Settings.from_env({"GITHUB_TOKEN": value})
    assert "abc" not in str(refused.value) and value not in str(refused.value)
