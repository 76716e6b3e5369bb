"""Helpers for tests of a running service: `serve` and the Procfile's commands, metrics, logs, processes, a bare /webhook."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import requests
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.serving import BaseWSGIServer, make_server

from flowlens_ingest.web.app import create_app
from flowlens_ingest.web.services import services

from .helpers import PREVIOUS_SECRET, SECRET, free_port, github_headers, make_settings, wait_for

PROCFILE = Path(__file__).resolve().parent.parent / "Procfile"


class Service:
    """`flowlens-ingest serve` running in a child process."""

    def __init__(
        self, database_url: str | None, data_dir: Path, *, workers: int = 2, env: dict[str, str] | None = None
    ) -> None:
        self.workers = workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        # One log per instance: several may share a data directory.
        self.log_path = data_dir / f"service-{self.port}.log"
        environment = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR")}
        environment.update(
            FLOWLENS_DATA_DIR=str(data_dir),
            GITHUB_WEBHOOK_SECRET=SECRET,
            GITHUB_WEBHOOK_SECRET_PREVIOUS=PREVIOUS_SECRET,
        )
        if database_url:
            environment["DATABASE_URL"] = database_url
        environment.update(env or {})
        self.log = open(self.log_path, "wb")  # noqa: SIM115 (closed when the service stops)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flowlens_ingest.cli", "serve", "--port", str(self.port), "--workers", str(workers)],
            env=environment,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        """Block until /healthz answers and every worker runs.

        One worker answering is not all of them: gunicorn forks and boots the others in its own
        time, and a test that counts workers, or wants each to serve, would race them.
        """

        def healthy() -> bool:
            try:
                return requests.get(self.url + "/healthz", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_up(self.process, healthy, "service", self.logs, timeout)
        wait_up(self.process, lambda: len(workers(self)) == self.workers, "every worker", self.logs, timeout)

    def post(self, payload: dict[str, Any] | bytes, event: str, **kwargs: Any) -> requests.Response:
        """Sign and POST a delivery over real HTTP."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        headers = github_headers(body, event, **kwargs)
        return requests.post(self.url + "/webhook", data=body, headers=headers, timeout=15)

    def stop(self) -> int:
        """SIGTERM the service (graceful) and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
        self.log.close()
        return self.process.returncode

    def logs(self) -> str:
        """Everything the service printed so far."""
        return self.log_path.read_text(errors="replace")


def wait_up(
    process: subprocess.Popen[bytes], probe: Callable[[], bool], what: str, logs: Callable[[], str], timeout: float
) -> None:
    """Block until `probe()` holds; RuntimeError with `logs()` if `process` exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited {process.returncode}:\n{logs()}")
        if probe():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready after {timeout} s:\n{logs()}")


def procfile() -> dict[str, str]:
    """The Procfile's process types and their commands."""
    entries = {}
    for line in PROCFILE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, command = line.split(":", 1)
            entries[name.strip()] = command.strip()
    return entries


def platform_env(database_url: str, **extra: str) -> dict[str, str]:
    """The environment a platform gives the Procfile's processes: the venv on PATH, no FlowLens defaults."""
    drop = ("PROMETHEUS_MULTIPROC_DIR", "FLOWLENS_DATA_DIR", "DATABASE_URL", "FLOWLENS_BIND", "FLOWLENS_WORKERS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        DATABASE_URL=database_url,
        GITHUB_WEBHOOK_SECRET=SECRET,
        GITHUB_WEBHOOK_SECRET_PREVIOUS=PREVIOUS_SECRET,
    )
    env.update(extra)
    return env


def run_release(database_url: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the Procfile's `release:` command as a platform would before a deploy."""
    return subprocess.run(
        procfile()["release"],
        shell=True,
        cwd=cwd,
        env=platform_env(database_url),
        capture_output=True,
        text=True,
        timeout=120,
    )


class ProcfileService(Service):
    """The Procfile's `web:` command, run from `directory` with PORT and WEB_CONCURRENCY like a platform."""

    def __init__(
        self, database_url: str, directory: Path, *, workers: int = 2, env: dict[str, str] | None = None
    ) -> None:
        self.workers = workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = directory / ".flowlens"
        self.log_path = directory / "web.log"
        environment = platform_env(database_url, PORT=str(self.port), WEB_CONCURRENCY=str(workers), **(env or {}))
        self.log = open(self.log_path, "wb")  # noqa: SIM115 (closed when the service stops)
        # `exec`: signals reach gunicorn itself, as under a process manager.
        self.process = subprocess.Popen(
            ["sh", "-c", "exec " + procfile()["web"]],
            cwd=directory,
            env=environment,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def metric(service: Service, name: str, **labels: str) -> float | None:
    """One sample of the service's /metrics (None when absent)."""
    text = requests.get(service.url + "/metrics", timeout=10).text
    return sample(text, name, **labels)


def sample(text: str, name: str, **labels: str) -> float | None:
    """One sample of a Prometheus text exposition (None when absent)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return None


def log_entries(service: Service, msg: str | None = None) -> list[dict[str, Any]]:
    """The service's JSON log lines so far (optionally only those with this `msg`)."""
    entries = []
    for line in service.logs().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if msg is None or entry.get("msg") == msg:
                entries.append(entry)
    return entries


def gunicorn_master(service: Service) -> psutil.Process:
    """The gunicorn master process of a service (`serve`'s child, or the Procfile's process)."""
    process = psutil.Process(service.process.pid)
    if _is_gunicorn(process):
        return process
    return wait_for(lambda: next((p for p in process.children() if _is_gunicorn(p)), None), "the gunicorn master")


def _is_gunicorn(process: psutil.Process) -> bool:
    try:
        return "gunicorn" in " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return False


def workers(service: Service) -> list[psutil.Process]:
    """The service's live gunicorn workers (a worker that exits while being listed is not live)."""
    return [p for p in gunicorn_master(service).children() if _alive(p)]


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextlib.contextmanager
def running(service: Service) -> Iterator[Service]:
    """Wait until `service` answers; stop it however the block ends (a test asserts the exit code itself)."""
    try:
        service.wait_ready()
        yield service
    finally:
        service.stop()


class Webhook:
    """The Flask app's /webhook under a real HTTP server (werkzeug's) on a fixed port, started and stopped at will.

    What a GitHub hook delivers to in the recovery tests: down, it refuses connections as a
    stopped service does; up again, on the same port.
    """

    def __init__(self, database_url: str, tmp_path: Path) -> None:
        self.app = create_app(make_settings(database_url, tmp_path))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/webhook"
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._server = make_server("127.0.0.1", self.port, self.app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def close(self) -> None:
        """Stop serving and close the app's database connections."""
        self.stop()
        services(self.app).database.dispose()
