"""docs/recovering.md's local trial, run as written: a real `serve`, the standalone fake GitHub, and the commands.

The command lines are parsed out of the page's "Trying it locally" section, so the page cannot
go stale: each `flowlens-ingest` line runs in a subprocess, and the comment under it (its last
line of output, and `exit status N` when not 0) is checked. Only the ports change: the page's
8000 (serve) and 8900 (the fake) become free ones.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from flowlens_ingest.store.schema import pipeline_runs, webhook_hooks

from .helpers import SECRET, free_port, rows
from .serving import Service, wait_up

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "recovering.md"
SECTION = "## Trying it locally"
EXPECTED = re.compile(r"^# (?P<line>.*?)(?:\s{2,}exit status (?P<status>\d+))?$")


@dataclass
class Step:
    """One command line of the page, what it must print last and its exit status."""

    argv: list[str]
    last_line: str | None = None
    status: int = 0


@dataclass
class Trial:
    """What the page's section asks to run."""

    serve: list[str]
    fake: list[str]
    exports: dict[str, str]
    steps: list[Step]


def shell_lines(page: str) -> list[str]:
    """The lines of the section's ```sh blocks, continuations joined."""
    section = page.split(SECTION, 1)[1].split("\n## ", 1)[0]
    lines: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S):
        lines += block.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip()]


def parse(page: str) -> Trial:
    """The trial's processes, environment and steps, as the page writes them."""
    trial = Trial(serve=[], fake=[], exports={}, steps=[])
    for line in shell_lines(page):
        if line.startswith("#"):
            match = EXPECTED.match(line)
            assert match is not None and trial.steps, f"a comment with no command above it: {line!r}"
            trial.steps[-1].last_line = match["line"].strip()
            trial.steps[-1].status = int(match["status"] or 0)
        elif line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            trial.exports[name] = value
        else:
            argv = shlex.split(line)
            if argv[:2] == [".venv/bin/flowlens-ingest", "serve"]:
                trial.serve = argv
            elif argv[:3] == [".venv/bin/python", "-m", "tests.fake_github"]:
                trial.fake = argv
            else:
                assert argv[0] == ".venv/bin/flowlens-ingest", f"a command the test cannot run: {line!r}"
                trial.steps.append(Step(argv))
    return trial


def test_the_page_names_the_processes_and_expectations():
    trial = parse(PAGE.read_text())
    assert trial.serve == [".venv/bin/flowlens-ingest", "serve"]
    assert "--trial" in trial.fake and "http://127.0.0.1:8000/webhook" in trial.fake
    assert [s.argv[1] for s in trial.steps][:3] == ["recover", "recover", "recover"]
    assert "backfill" in [s.argv[1] for s in trial.steps]
    assert trial.steps[0].status == 1 and all(s.last_line for s in trial.steps[:-1])


@pytest.fixture
def service(db: Engine, database_url: str, tmp_path: Path) -> Iterator[Service]:
    running = Service(database_url, tmp_path, workers=1)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def test_the_local_trial_runs_as_the_page_writes_it(db, service, database_url, tmp_path):
    trial = parse(PAGE.read_text())
    fake_port = free_port()

    def local(text: str) -> str:
        if text == "8900":  # --port 8900
            return str(fake_port)
        return text.replace("127.0.0.1:8000", f"127.0.0.1:{service.port}").replace(":8900", f":{fake_port}")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "FLOWLENS_", "DATABASE_URL"))}
    env.update(DATABASE_URL=database_url, FLOWLENS_DATA_DIR=str(tmp_path), GITHUB_WEBHOOK_SECRET=SECRET)
    fake_log = tmp_path / "fake.log"
    with open(fake_log, "wb") as out:
        fake = subprocess.Popen(
            [sys.executable, *[local(arg) for arg in trial.fake[1:]]],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_up(fake, lambda: "trial: octo/legacy" in fake_log.read_text(), "fake GitHub", fake_log.read_text, 60)
        assert fake_log.read_text().splitlines()[0] == f"http://127.0.0.1:{fake_port}"
        env.update({name: local(value) for name, value in trial.exports.items()})
        for step in trial.steps:
            argv = [sys.executable, "-m", "flowlens_ingest.cli", *step.argv[1:]]
            done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
            said = f"{shlex.join(step.argv)}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
            assert done.returncode == step.status, said
            if step.last_line is not None:
                assert done.stdout.splitlines()[-1] == step.last_line, said
    finally:
        fake.terminate()
        fake.wait(timeout=30)

    # What the page says happened: the hook is recorded, the legacy pull requests have statuses.
    assert [r["api_path"] for r in rows(db, webhook_hooks, "api_path")] == ["repos/octo/trial/hooks/4201"]
    with db.connect() as conn:
        builds = conn.execute(sa.select(pipeline_runs.c.status_build).order_by(pipeline_runs.c.pr_number)).all()
    assert len(builds) == 5  # octo/trial's two (recovered) and octo/legacy's three (backfilled)
