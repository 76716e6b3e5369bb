"""A real nginx in a child process, configured with what `flowlens-ingest nginx-conf` prints.

Everything nginx writes (pid, logs, request bodies it buffers) stays in the test's
folder. As root, its workers run as root too, so they can use that folder.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from .serving import wait_up

NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
)
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_conf_output(listen: str, upstream: str, **env: str) -> str:
    """What `flowlens-ingest nginx-conf` prints, run as an operator would."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWLENS_", "GITHUB_", "DATABASE_"))}
    environment.update(env)
    result = subprocess.run(
        [sys.executable, "-m", "flowlens_ingest.cli", "nginx-conf", "--listen", listen, "--upstream", upstream],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def main_conf(blocks: str, directory: Path) -> str:
    """A whole nginx.conf around `blocks` (the http {} content), with every path inside `directory`."""
    temp = "\n".join(f"    {name}_temp_path {directory / name};" for name in TEMP_PATHS)
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""\
{user}worker_processes 1;
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} info;
events {{ worker_connections 1024; }}
http {{
    access_log {directory / "access.log"};
{temp}
{blocks}
}}
"""


class Nginx:
    """nginx in the foreground (`daemon off`), listening on 127.0.0.1:`port`."""

    def __init__(self, blocks: str, directory: Path, port: int) -> None:
        if NGINX is None:
            raise RuntimeError("nginx is not installed")
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.conf = directory / "nginx.conf"
        self.conf.write_text(main_conf(blocks, directory))
        self.output = open(directory / "nginx.out", "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            # -e: the error log from the very start (before the configuration names one).
            [
                NGINX,
                "-p",
                str(directory),
                "-c",
                str(self.conf),
                "-e",
                str(directory / "error.log"),
                "-g",
                "daemon off;",
            ],
            stdout=self.output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 30) -> None:
        """Block until nginx accepts connections."""

        def listening() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False

        wait_up(self.process, listening, f"nginx on port {self.port}", self.logs, timeout)

    def logs(self) -> str:
        """nginx's own output and error log so far."""
        parts = [self.directory / "nginx.out", self.directory / "error.log"]
        return "\n".join(p.read_text(errors="replace") for p in parts if p.exists())

    def statuses(self) -> list[int]:
        """The status of every request in the access log so far (nginx's combined format)."""
        log = self.directory / "access.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        return [int(line.split('" ', 1)[1].split()[0]) for line in lines if '" ' in line]

    def stop(self) -> None:
        """Fast shutdown (TERM), and wait."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
        self.output.close()


def check(blocks: str, directory: Path) -> subprocess.CompletedProcess:
    """`nginx -t` on a whole configuration around `blocks`."""
    assert NGINX is not None
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(main_conf(blocks, directory))
    return subprocess.run(
        [NGINX, "-t", "-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log")],
        capture_output=True,
        text=True,
        timeout=60,
    )
