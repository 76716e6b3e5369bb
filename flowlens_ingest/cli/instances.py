"""Where the running `serve`s are: one record per instance, for `send` to find a live one."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flowlens_ingest.config import instance_name

if TYPE_CHECKING:
    pass

# Each `serve` records where it listens in FLOWLENS_DATA_DIR/instances/PORT.json (one file per
# port, like its metrics folder) while it runs, so that `send` finds one without being told
# its port. A record is written whole or not at all, and removed by the `serve` that wrote it
# when it stops; a record left by one that died (kill -9, a crash, a reboot) names a pid that
# no longer runs, and is never used: `send` removes it.
INSTANCES = "instances"
# How long `send` waits for a recorded instance's /healthz before passing it over.
HEALTH_CHECK_S = 1.0


@dataclass(frozen=True)
class Instance:
    """A running `serve`, as its record says: its webhook URL, its pid, when it started."""

    url: str
    pid: int
    started: float


def instance_record(data_dir: Path, bind: str) -> Path:
    """The record of the `serve` listening on `bind` in this data directory."""
    return data_dir / INSTANCES / f"{instance_name(bind)}.json"


def record_instance(path: Path, url: str) -> Instance:
    """Record this process as the instance serving `url`: written aside, then renamed into place."""
    instance = Instance(url=url, pid=os.getpid(), started=time.time())
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{instance.pid}")  # not *.json: never read half written
    partial.write_text(json.dumps(vars(instance)) + "\n")
    os.replace(partial, path)
    return instance


def forget_instance(path: Path, instance: Instance) -> None:
    """Remove `instance`'s record, unless another instance on the same port has replaced it since."""
    _remove_if_unchanged(path, instance)


def _read_instance(path: Path) -> Instance | None:
    try:
        record = json.loads(path.read_text())
        return Instance(url=str(record["url"]), pid=int(record["pid"]), started=float(record["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remove_if_unchanged(path: Path, seen: Instance | None) -> None:
    try:
        if _read_instance(path) == seen:
            path.unlink()
    except OSError:
        pass  # gone already, or not ours to remove


# Linux's largest process id (PID_MAX_LIMIT): a record naming a larger one names no process.
PID_MAX = 4_194_304


def _running(pid: int) -> bool:
    """Whether process `pid` runs; a zombie (dead, not yet reaped by its parent) does not."""
    if not 0 < pid <= PID_MAX:  # kill(0) and kill(-1) would ask about whole groups; past it, no process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill's word stands
    return state != "Z"


def _answers(url: str) -> bool:
    """Whether the service whose webhook is `url` answers /healthz within HEALTH_CHECK_S."""
    import urllib.request

    if not url.startswith("http://"):
        return False
    health = url.removesuffix("/webhook") + "/healthz"
    # Straight to it: a proxy from the environment has no business with a local instance.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(health, timeout=HEALTH_CHECK_S) as response:
            return bool(response.status == 200)
    except (OSError, ValueError):
        return False


def live_instances(data_dir: Path) -> list[Instance]:
    """The `serve`s recorded in `data_dir` that run and answer, longest running first.

    The record of a `serve` that no longer runs is removed. One whose pid runs but whose
    address does not answer (stopping, or its pid reused since a reboot) is passed over.
    """
    live = []
    for path in sorted((data_dir / INSTANCES).glob("*.json")):
        instance = _read_instance(path)
        if instance is None or not _running(instance.pid):
            _remove_if_unchanged(path, instance)
            continue
        if _answers(instance.url):
            live.append(instance)
    return sorted(live, key=lambda i: (i.started, i.url))
