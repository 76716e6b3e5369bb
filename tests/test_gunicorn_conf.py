"""gunicorn_conf, loaded the way gunicorn loads it: in a fresh interpreter, from the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import SECRET

# gunicorn_conf refuses to load without what the service needs (config.Settings.check_service).
SERVICE = {"DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/postgres", "GITHUB_WEBHOOK_SECRET": SECRET}


def load(cwd: Path, prelude: str = "", **env: str) -> subprocess.CompletedProcess:
    """Import gunicorn_conf in a new interpreter; print the settings a test looks at, as JSON."""
    code = prelude + (
        "import json, os, sys; import flowlens_ingest.web.gunicorn_conf as c;"
        "print(json.dumps({'workers': c.workers, 'threads': c.threads, 'bind': c.bind,"
        " 'graceful_timeout': c.graceful_timeout, 'timeout': c.timeout,"
        " 'pool': c.settings.pool_size, 'metrics_dir': os.environ['PROMETHEUS_MULTIPROC_DIR'],"
        " 'prometheus_imported': 'prometheus_client' in sys.modules, 'json_logs': hasattr(c, 'logconfig_dict')}))"
    )
    drop = (
        "PROMETHEUS_MULTIPROC_DIR",
        "FLOWLENS_DATA_DIR",
        "FLOWLENS_POOL_SIZE",
        "FLOWLENS_THREADS",
        "FLOWLENS_WORKERS",
        "WEB_CONCURRENCY",
        "PORT",
        "FLOWLENS_BIND",
        "FLOWLENS_LOG_FORMAT",
    )
    environment = {k: v for k, v in os.environ.items() if k not in drop}
    environment.update(SERVICE)
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=environment, capture_output=True, text=True, timeout=60
    )


def settings(cwd: Path, **env: str) -> dict:
    """The settings gunicorn would read."""
    result = load(cwd, **env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_defaults_follow_the_platform(tmp_path):
    found = settings(tmp_path, PORT="5123", WEB_CONCURRENCY="3")
    assert (found["bind"], found["workers"], found["threads"]) == ("0.0.0.0:5123", 3, 4)
    # Inside GitHub's 10 s, and long enough to finish a delivery in flight.
    assert found["timeout"] <= 10 and found["graceful_timeout"] >= 10
    # One metrics folder per instance (its port): a second instance must not empty the first's.
    assert found["metrics_dir"] == str(tmp_path.resolve() / ".flowlens" / "metrics" / "5123")
    # The metrics mode is chosen at prometheus_client's import: not before the workers'.
    assert found["prometheus_imported"] is False
    assert found["json_logs"] is True


def test_the_pool_holds_a_connection_per_thread_and_one_for_the_drainer(tmp_path):
    assert settings(tmp_path)["pool"] == 5
    assert settings(tmp_path, FLOWLENS_THREADS="8")["pool"] == 9
    # An operator's own choice stands.
    assert settings(tmp_path, FLOWLENS_THREADS="8", FLOWLENS_POOL_SIZE="3")["pool"] == 3


def test_the_data_directory_and_text_logs(tmp_path):
    found = settings(
        tmp_path,
        FLOWLENS_DATA_DIR=str(tmp_path / "data"),
        FLOWLENS_LOG_FORMAT="text",
        FLOWLENS_BIND="127.0.0.1:9000",
        FLOWLENS_WORKERS="2",
    )
    assert found["metrics_dir"] == str(tmp_path / "data" / "metrics" / "9000")
    assert (found["bind"], found["workers"], found["json_logs"]) == ("127.0.0.1:9000", 2, False)


def test_refuses_to_start_after_prometheus_client_was_imported(tmp_path):
    # The failure this guards against is silent (each worker counting alone), so it is loud.
    result = load(tmp_path, prelude="import prometheus_client;")
    assert result.returncode != 0
    assert "prometheus_client was imported before gunicorn_conf set PROMETHEUS_MULTIPROC_DIR" in result.stderr


@pytest.mark.parametrize(
    ("name", "value", "accepted"),
    [
        ("FLOWLENS_WORKERS", "abc", "from 1 to 256 (worker processes)"),
        ("WEB_CONCURRENCY", "0", "from 1 to 256 (worker processes)"),
        ("FLOWLENS_THREADS", "0", "from 1 to 64 (threads)"),
        ("FLOWLENS_GRACEFUL_TIMEOUT", "1", "from 10 to 300 (seconds)"),
        ("PORT", "65536", "from 1 to 65535 (a TCP port)"),
    ],
)
def test_a_bad_number_is_one_line_and_exit_2_not_a_traceback(tmp_path, name, value, accepted):
    # What gunicorn itself does with the Procfile's command: import this file, which exits.
    result = load(tmp_path, **{name: value})
    assert result.returncode == 2
    assert result.stderr.strip() == f"flowlens-ingest: {name} must be a whole number {accepted}, got {value!r}"
    # Refused before anything was written: not even the metrics folder.
    assert not (tmp_path / ".flowlens").exists()


ACCESS_PROBE = """
import json, sys
from gunicorn.config import Config
import flowlens_ingest.web.gunicorn_conf as c
cfg = Config()
for name in ("logconfig_dict", "accesslog", "errorlog", "loglevel"):
    if hasattr(c, name):
        cfg.set(name, getattr(c, name))
for arg in sys.argv[1:]:
    cfg.set(*arg.split("=", 1))
logger = c.logger_class(cfg)
built = []
logger.atoms = lambda *args: built.append(1) or {}
logger.access(None, None, {}, None)
print(json.dumps(bool(built)))
"""


def access_line_built(cwd: Path, *settings: str, **env: str) -> bool:
    result = subprocess.run(
        [sys.executable, "-c", ACCESS_PROBE, *settings],
        cwd=cwd,
        env={**{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}, **SERVICE, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return bool(json.loads(result.stdout))


def test_no_access_line_is_built_while_no_access_log_is_kept(tmp_path):
    assert not access_line_built(tmp_path, FLOWLENS_LOG_FORMAT="json")
    assert not access_line_built(tmp_path, FLOWLENS_LOG_FORMAT="text")
    # An access log asked for is still written.
    assert access_line_built(tmp_path, f"accesslog={tmp_path / 'access.log'}", FLOWLENS_LOG_FORMAT="text")
