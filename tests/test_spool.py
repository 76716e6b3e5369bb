"""The local spool: what the service does while the database is unreachable, and how it catches up.

An app pointed at a port nobody listens on stands for a database that is down;
an app on the real scratch database, sharing the same spool folder, drains it.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import logging
import os
import socket
import stat
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import sqlalchemy as sa
from flask import Flask
from prometheus_client import REGISTRY

from flowlens_ingest.events.delivery import Delivery
from flowlens_ingest.events.enums import Outcome
from flowlens_ingest.events.envelope import Envelope
from flowlens_ingest.github.hooks import hooks_to_read
from flowlens_ingest.ingest import Disposition, Result, bug
from flowlens_ingest.spool.drainer import Drainer, spool_handler
from flowlens_ingest.spool.folder import (
    COPY_CHUNK_BYTES,
    PARTIAL_AT_START_S,
    PASSED_OVER_MAX_WAIT_S,
    PASSED_OVER_WAIT_S,
    SUFFIX,
    UNUSABLE_SUFFIX,
    Spool,
    Spooled,
)
from flowlens_ingest.store import migrate
from flowlens_ingest.store.schema import pull_requests, repositories, webhook_deliveries, webhook_hooks
from flowlens_ingest.web.app import create_app
from flowlens_ingest.web.services import services, start_drainer

from .databases import app_on_scratch_database, create_scratch_database, drop_database
from .helpers import free_port, github_headers, load_payload, make_settings, rows, wait_for

OPENED = load_payload("pull_request/opened.payload.json")
CLOSED = load_payload("pull_request/closed.payload.json")
PING = load_payload("ping/payload.json")


@pytest.fixture
def apps(db, database_url: str, tmp_path: Path) -> Iterator[Callable[..., Flask]]:
    """Build apps on the scratch database (`down=False`) or on a database that is down."""
    built: list[Flask] = []
    nowhere = f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/nowhere"

    def build(*, down: bool, spool_dir: Path | None = None, **overrides) -> Flask:
        overrides.setdefault("spool_dir", spool_dir or tmp_path / "spool")
        app = create_app(make_settings(nowhere if down else database_url, tmp_path, **overrides))
        built.append(app)
        return app

    yield build
    for app in built:
        services(app).database.dispose()


def post(app: Flask, payload: dict | bytes, event: str, **kwargs):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return app.test_client().post("/webhook", data=body, headers=github_headers(body, event, **kwargs))


def ping(delivery_id: str, hook_id: int = 0) -> Envelope:
    """The envelope of a ping delivery."""
    return Envelope(delivery_id, hook_id=hook_id, event="ping", content_type="application/json")


# What a handler says of a delivery it stored.
DONE = Result.stored(Outcome.APPLIED)


@pytest.fixture
def drain(apps) -> Iterator[Callable[[Flask], None]]:
    """Start an app's background drainer, as gunicorn's post_worker_init does; stopped afterwards."""
    drainers = []

    def start(app: Flask) -> None:
        drainer = start_drainer(app, interval=0.05)
        assert drainer is not None
        drainers.append(drainer)

    yield start
    for drainer in drainers:
        drainer.stop()


def journal(engine) -> dict[str, tuple[str, int]]:
    entries = rows(engine, webhook_deliveries, "delivery_id", "outcome", "attempts")
    return {e["delivery_id"]: (e["outcome"], e["attempts"]) for e in entries}


# --- the spool itself ------------------------------------------------------------------


def test_put_writes_one_private_file_per_delivery_in_arrival_order(tmp_path):
    spool = Spool(tmp_path / "spool", 1 << 20)
    for n in range(5):
        assert spool.put(ping(f"d-{n}", n), b'{"n": %d}' % n)
    files = sorted((tmp_path / "spool").glob("*" + SUFFIX))
    assert [Spool.read(p).envelope.delivery_id for p in files] == [f"d-{n}" for n in range(5)]
    assert Spool.read(files[3]).body == b'{"n": 3}' and Spool.read(files[3]).envelope.hook_id == 3
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert list((tmp_path / "spool").glob("*.tmp")) == []
    assert spool.depth() == 5 and spool.used_bytes() == sum(p.stat().st_size for p in files)


def test_a_body_given_as_a_file_is_copied_in_chunks_never_read_whole(tmp_path):
    # A large delivery spooled raw comes from its temporary file: the spool copies it a chunk at a
    # time, so a worker never holds it whole in memory.
    body = os.urandom(5 * COPY_CHUNK_BYTES + 123)
    reads: list[int] = []

    class Source(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            assert size is not None and 0 < size <= COPY_CHUNK_BYTES, "read whole"
            reads.append(size)
            return super().read(size)

    spool = Spool(tmp_path / "spool", 1 << 30)
    assert spool.put(ping("large"), Source(body))
    (path,) = (tmp_path / "spool").glob("*" + SUFFIX)
    assert Spool.read(path).body == body and Spool.read(path).envelope.delivery_id == "large"
    assert len(reads) >= 6 and spool.used_bytes() == path.stat().st_size


def test_put_refuses_what_would_go_over_the_size_bound(tmp_path):
    body = b"x" * 100
    probe = Spool(tmp_path / "probe", 10_000)
    assert probe.put(ping("d-0"), body)
    one = probe.used_bytes()  # one spooled delivery: its header line and its body
    spool = Spool(tmp_path / "spool", 2 * one + one // 2)
    accepted = [spool.put(ping(f"d-{n}"), body) for n in range(6)]
    assert accepted == [True, True, False, False, False, False]
    assert spool.used_bytes() <= 2 * one + one // 2
    assert list((tmp_path / "spool").glob(".*.tmp")) == []


def test_deliveries_set_aside_count_against_the_bound(tmp_path):
    body = b"x" * 100
    spool = Spool(tmp_path / "spool", 10_000)
    refused = Result(Disposition.SET_ASIDE, error="refused")
    # Set aside as fast as they come: their bytes stay on the disk, within the bound.
    for _ in range(200):  # four times the bound's worth
        if not spool.put(ping("d"), body):
            break
        assert spool.drain(lambda _item: refused) == (0, None)
        spool.refresh()
    else:
        pytest.fail("the spool kept taking deliveries while those set aside filled the disk past its bound")
    assert spool.depth() == 0 and spool.unusable > 0
    on_disk = sum(p.stat().st_size for p in (tmp_path / "spool").glob("*" + UNUSABLE_SUFFIX))
    assert on_disk <= 10_000 and spool.used_bytes() == on_disk == spool.estimate()


def test_concurrent_puts_of_one_worker_keep_the_bound(tmp_path):
    spool = Spool(tmp_path / "spool", 2000)
    results: list[bool] = []

    def fill(thread: int) -> None:
        results.extend(spool.put(ping(f"{thread}-{n}"), b"y" * 100) for n in range(20))

    threads = [threading.Thread(target=fill, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert 0 < spool.used_bytes() <= 2000
    assert results.count(True) == spool.depth()


def spooled_file(directory: Path, n: int, body: bytes, *, sized: bool = True) -> Path:
    """A spooled delivery written straight into `directory`, as a put would have (`sized=False`: as before sizes)."""
    data = json.dumps(
        {"delivery_id": f"earlier-{n}", "hook_id": 0, "event": "ping", "content_type": "application/json"}
    ).encode()
    data += b"\n" + body
    name = f"{1_000_000 + n:020d}-1-{n:08x}" + (f"-{len(data)}" if sized else "")
    path = directory / (name + SUFFIX)
    path.write_bytes(data)
    return path


def test_put_lists_and_stats_nothing_however_much_is_spooled(tmp_path, monkeypatch):
    folder = tmp_path / "spool"
    folder.mkdir()
    earlier = [spooled_file(folder, n, b"{}" * 50, sized=n % 2 == 0) for n in range(3000)]
    held = sum(p.stat().st_size for p in earlier)
    probe = Spool(tmp_path / "probe", 1 << 20)
    assert probe.put(ping("d-9"), b"{}" * 50)
    one = probe.used_bytes()  # one spooled delivery: its header line and its body
    spool = Spool(folder, held + 2 * one + one // 2)  # room for two more
    calls: Counter[str] = Counter()

    def counted(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return real(*args, **kwargs)

        return call

    for owner, name in [(os, "scandir"), (os, "listdir"), (os, "stat"), (os, "lstat"), (Path, "iterdir")]:
        monkeypatch.setattr(owner, name, counted(name, getattr(owner, name)))
    for owner, name in [(Path, "glob"), (Path, "stat"), (Path, "exists"), (Path, "is_dir")]:
        monkeypatch.setattr(owner, name, counted(name, getattr(owner, name)))
    accepted = [spool.put(ping(f"d-{n}"), b"{}" * 50) for n in range(4)]
    assert calls == Counter()
    monkeypatch.undo()
    # The earlier files count: full after two more, as a scan would say.
    assert accepted == [True, True, False, False]
    assert spool.depth() == 3002 and spool.used_bytes() == held + 2 * one


def test_two_workers_pass_the_bound_by_at_most_what_the_other_put_since_its_last_scan(tmp_path):
    folder = tmp_path / "spool"
    probe = Spool(tmp_path / "probe", 1 << 20)
    assert probe.put(ping("probe-0"), b"z" * 100)
    one = probe.used_bytes()
    first, second = Spool(folder, 10 * one), Spool(folder, 10 * one)
    ids = itertools.count()

    def put(spool: Spool, count: int) -> int:
        accepted = [spool.put(ping(f"d-{next(ids):05d}"), b"z" * 100) for _ in range(count)]
        return accepted.count(True)

    assert put(first, 6) == 6
    # Until its next scan the second worker knows only its own puts.
    assert put(second, 6) == 6
    assert first.used_bytes() == 12 * one <= 10 * one + 6 * one
    # The next tick of each worker's drainer (a scan) shows the folder full to both.
    assert first.refresh() == second.refresh() == 12
    assert put(first, 1) == put(second, 1) == 0
    # The drain makes room, and the next scan lets puts in again.
    assert first.drain(lambda item: DONE) == (12, None)
    second.refresh()
    assert put(second, 10) == 10 and put(second, 1) == 0


def test_the_drainer_tick_refreshes_the_estimate_while_the_database_is_down(tmp_path):
    folder = tmp_path / "spool"
    worker, other = Spool(folder, 1 << 20), Spool(folder, 1 << 20)
    assert other.put(ping("by-the-other-worker"), b"{}")
    assert worker.estimate() == 0

    def down(item: Spooled) -> Result:
        return Result(Disposition.RETRY_LATER, error="database unavailable (08006)")

    drainer = Drainer(worker, down, interval=0.05)
    drainer.start()
    try:
        wait_for(lambda: worker.estimate() == other.used_bytes(), what="the tick to count the other worker's file")
    finally:
        drainer.stop()
    assert worker.depth() == 1


def test_a_stopping_worker_ends_its_drain_after_the_delivery_under_way(tmp_path):
    # A backlog after an outage; the worker is asked to stop (a deploy): its drainer finishes the
    # delivery it is applying and stops there, well inside the wait of worker_exit, the rest kept.
    spool = Spool(tmp_path / "spool", 1 << 20)
    for n in range(200):
        assert spool.put(ping(f"backlog-{n:03d}"), b"{}")
    applied: list[str] = []
    first = threading.Event()

    def applying(item: Spooled) -> Result:
        applied.append(item.envelope.delivery_id)
        first.set()
        drainer.stopping.wait(30)  # the stop is asked while this one is under way
        return DONE

    drainer = Drainer(spool, applying, interval=0.01)
    drainer.start()
    assert first.wait(30), "the drain never began"
    drainer.stop(timeout=30)
    assert not drainer.is_alive()
    assert applied == ["backlog-000"] and spool.refresh() == 199


def test_files_named_before_sizes_were_still_count_and_drain_in_arrival_order(tmp_path):
    folder = tmp_path / "spool"
    folder.mkdir()
    legacy = spooled_file(folder, 1, b'{"old": true}', sized=False)
    spool = Spool(folder, 1 << 20)
    assert spool.estimate() == legacy.stat().st_size
    assert spool.put(ping("new"), b'{"new": true}')
    (new,) = [p for p in folder.glob("*" + SUFFIX) if p != legacy]
    assert int(new.name.removesuffix(SUFFIX).rsplit("-", 1)[1]) == new.stat().st_size
    assert spool.used_bytes() == legacy.stat().st_size + new.stat().st_size
    drained: list[bytes] = []

    def keep(item: Spooled) -> Result:
        drained.append(item.body)
        return DONE

    assert spool.drain(keep) == (2, None)
    assert drained == [b'{"old": true}', b'{"new": true}']


# --- while the database is down ---------------------------------------------------------


def test_unreachable_database_spools_the_delivery_and_readyz_says_503(apps, db):
    down = apps(down=True)
    response = post(down, OPENED, "pull_request", delivery="s-1")
    assert response.status_code == 202
    assert response.get_json() == {"delivery": "s-1", "event": "pull_request", "action": "opened", "outcome": "spooled"}
    (item,) = [Spool.read(p) for p in services(down).spool.directory.glob("*" + SUFFIX)]
    assert (item.envelope.delivery_id, item.envelope.hook_id, item.envelope.event) == ("s-1", 123456, "pull_request")
    assert json.loads(item.body) == OPENED
    ready = down.test_client().get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["status"] == "unavailable"
    assert down.test_client().get("/healthz").status_code == 200
    assert rows(db, webhook_deliveries) == []


@pytest.mark.parametrize("spool_max_bytes", [0, 200], ids=["disabled", "full"])
def test_no_room_in_the_spool_is_503_with_retry_after(apps, spool_max_bytes):
    down = apps(down=True, spool_max_bytes=spool_max_bytes)
    response = post(down, OPENED, "pull_request")
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) > 0
    assert set(response.get_json()) == {"error"}


def test_invalid_or_unsigned_deliveries_are_refused_without_touching_the_spool(apps):
    down = apps(down=True)
    assert post(down, b'{"a": NaN}', "ping").status_code == 400
    body = json.dumps(OPENED).encode()
    headers = github_headers(body, "pull_request", secret="wrong")
    assert down.test_client().post("/webhook", data=body, headers=headers).status_code == 401
    assert services(down).spool.depth() == 0


def test_a_database_without_the_schema_spools_deliveries_instead_of_failing(server_url, tmp_path):
    with app_on_scratch_database(server_url, tmp_path) as app:
        body = json.dumps(OPENED).encode()
        answer = app.test_client().post("/webhook", data=body, headers=github_headers(body, "pull_request"))
        assert (answer.status_code, answer.get_json()["outcome"]) == (202, "spooled")
        assert len(list((tmp_path / "spool").glob("*.delivery"))) == 1


# --- when it comes back ------------------------------------------------------------------


def test_drainer_applies_the_spool_in_arrival_order_exactly_once(apps, drain, db):
    down = apps(down=True)
    broken = dict(OPENED, pull_request={"number": "two"})
    form = urlencode({"payload": json.dumps(PING)}).encode()
    answers = [
        post(down, OPENED, "pull_request", delivery="opened"),
        post(down, CLOSED, "pull_request", delivery="closed"),
        post(down, broken, "pull_request", delivery="broken"),
        post(down, form, "ping", delivery="form", content_type="application/x-www-form-urlencoded"),
        # GitHub's redelivery of one we already spooled.
        post(down, OPENED, "pull_request", delivery="opened"),
    ]
    assert [a.status_code for a in answers] == [202] * 5
    up = apps(down=False)
    drain(up)
    wait_for(lambda: services(up).spool.depth() == 0, what="the spool to empty")
    # `closed` was not stale: `opened` was applied before it.
    assert journal(db) == {
        "opened": ("applied", 1),
        "closed": ("applied", 1),
        "broken": ("failed", 1),
        "form": ("ignored", 1),
    }
    assert rows(db, pull_requests, "state", "version") == [{"state": "closed", "version": 2}]
    # The form body is journaled byte for byte, with its content type.
    (entry,) = [e for e in rows(db, webhook_deliveries) if e["delivery_id"] == "form"]
    assert (bytes(entry["body"]), entry["content_type"]) == (form, "application/x-www-form-urlencoded")
    assert REGISTRY.get_sample_value("flowlens_spool_drained_total", {"outcome": "duplicate"}) >= 1


def test_a_delivery_spooled_while_the_database_is_down_is_journaled_with_its_hook_and_target(apps, drain, db, tmp_path):
    # No live delivery named these hooks: only the spooled ones can teach recovery their logs.
    # Hook ids of this test only: a process records a hook once (ingest.HOOKS), tests empty the tables.
    down = apps(down=True)
    org = dict(PING, organization={"login": "octo-org", "id": 9919})
    answers = [
        post(
            down, OPENED, "pull_request", delivery="from-repo-hook", hook_id="61001", target=("repository", "1296269")
        ),
        post(down, org, "ping", delivery="from-org-hook", hook_id="61002", target=("organization", "9919")),
        post(down, PING, "ping", delivery="from-app-hook", hook_id="61003", target=("integration", "31337")),
    ]
    assert [a.get_json()["outcome"] for a in answers] == ["spooled"] * 3
    up = apps(down=False)
    drain(up)
    wait_for(lambda: services(up).spool.depth() == 0, what="the spool to empty")
    entries = rows(db, webhook_deliveries, "delivery_id", "hook_id", "outcome", "received_at")
    assert {(e["delivery_id"], e["hook_id"]) for e in entries} == {
        ("from-repo-hook", 61001),
        ("from-org-hook", 61002),
        ("from-app-hook", 61003),
    }
    assert rows(db, webhook_hooks, "hook_id", "target_type", "target_id", "api_path") == [
        {
            "hook_id": 61001,
            "target_type": "repository",
            "target_id": 1296269,
            "api_path": "repos/Codertocat/Hello-World/hooks/61001",
        },
        {"hook_id": 61002, "target_type": "organization", "target_id": 9919, "api_path": "orgs/octo-org/hooks/61002"},
        {"hook_id": 61003, "target_type": "integration", "target_id": 31337, "api_path": "app/hook"},
    ]
    # So recovery reads these hooks' logs (a token reads repository and organization hooks).
    settings = make_settings("postgresql://unused", tmp_path, github_token="ghp_test")
    hooks, skipped = hooks_to_read(settings, services(up).database)
    assert {h.path for h in hooks} == {"repos/Codertocat/Hello-World/hooks/61001", "orgs/octo-org/hooks/61002"}
    assert skipped == []


# Spool files exactly as earlier versions wrote them: their header line (json.dumps with its
# default separators), a newline, the body; named `{ns:020d}-{pid}-{hex8}[-{size}].delivery`.
EARLIER_FORMATS = [
    # The first spool: arrival only in the name, no size in it.
    (
        b'{"delivery_id": "first", "hook_id": 0, "event": "ping", "content_type": "application/json"}',
        "01764982800000000000-4242-0a1b2c3d",
    ),
    # received_ns (the journal's received_at) added; still no size in the name.
    (
        (
            b'{"delivery_id": "received_ns", "hook_id": 123456, "event": "ping", "content_type": "application/json",'
            b' "received_ns": 1764982800100000000}'
        ),
        "01764982800100000000-4242-1a1b2c3d",
    ),
    # The size in the name (a flat-cost put), the line unchanged: the format before this codec.
    (
        (
            b'{"delivery_id": "sized", "hook_id": 123456, "event": "ping", "content_type": "application/json",'
            b' "received_ns": 1764982800200000000}'
        ),
        "01764982800200000000-4242-2a1b2c3d-{size}",
    ),
]


def test_spool_files_of_every_earlier_format_drain_into_the_journal(apps, drain, db):
    up = apps(down=False)
    folder = services(up).spool.directory
    folder.mkdir(parents=True, exist_ok=True)
    body = json.dumps(PING).encode()
    for header, name in EARLIER_FORMATS:
        data = header + b"\n" + body
        (folder / (name.format(size=len(data)) + SUFFIX)).write_bytes(data)
    assert services(up).spool.refresh() == 3
    drain(up)
    wait_for(lambda: services(up).spool.depth() == 0, what="the spool to empty")
    assert services(up).spool.unusable == 0
    entries = {
        e["delivery_id"]: e
        for e in rows(
            db, webhook_deliveries, "delivery_id", "hook_id", "outcome", "received_at", "body", "content_type"
        )
    }
    assert {k: (e["hook_id"], e["outcome"]) for k, e in entries.items()} == {
        "first": (0, "ignored"),
        "received_ns": (123456, "ignored"),
        "sized": (123456, "ignored"),
    }
    assert all((bytes(e["body"]), e["content_type"]) == (body, "application/json") for e in entries.values())
    # When each arrived, where the file said it.
    assert entries["received_ns"]["received_at"] == datetime(2025, 12, 6, 1, 0, 0, 100000, tzinfo=UTC)
    assert entries["sized"]["received_at"] == datetime(2025, 12, 6, 1, 0, 0, 200000, tzinfo=UTC)
    assert rows(db, webhook_hooks) == []


def test_two_hosts_draining_copies_of_the_same_deliveries_apply_each_once(apps, drain, db, tmp_path):
    deliveries = []
    for number in range(1, 31):
        payload = copy.deepcopy(OPENED)
        payload["number"] = payload["pull_request"]["number"] = number
        deliveries.append(payload)
    hosts = []
    for host in ("a", "b"):
        down = apps(down=True, spool_dir=tmp_path / f"spool-{host}")
        for n, payload in enumerate(deliveries):
            assert post(down, payload, "pull_request", delivery=f"pr-{n}").status_code == 202
        hosts.append(apps(down=False, spool_dir=tmp_path / f"spool-{host}"))
    for up in hosts:
        drain(up)
    for up in hosts:
        wait_for(lambda up=up: services(up).spool.depth() == 0, what="both spools to empty")
    assert journal(db) == {f"pr-{n}": ("applied", 1) for n in range(30)}
    assert rows(db, pull_requests, "pr_number", "version") == [{"pr_number": n, "version": 1} for n in range(1, 31)]


def test_a_file_that_can_never_apply_is_set_aside_and_the_rest_drains(apps, drain, db, tmp_path):
    down = apps(down=True)
    spool_dir = services(down).spool.directory
    spool_dir.mkdir(parents=True, exist_ok=True)
    # Older than anything spooled next, so the drain meets it first.
    (spool_dir / f"{0:020d}-1-garbage{SUFFIX}").write_bytes(b"not a header\n{}")
    (spool_dir / f"{1:020d}-1-badbody{SUFFIX}").write_bytes(
        json.dumps({"delivery_id": "b", "hook_id": 0, "event": "ping", "content_type": "application/json"}).encode()
        + b"\n\xff\xfe"
    )
    # JSON, but not a spooled delivery's line: these once raised what the drain did not set aside,
    # so it stopped at them on every tick.
    (spool_dir / f"{2:020d}-1-array{SUFFIX}").write_bytes(b"[1, 2]\n{}")
    (spool_dir / f"{3:020d}-1-farfuture{SUFFIX}").write_bytes(
        b'{"delivery_id": "f", "hook_id": 0, "event": "ping", "content_type": "", "received_ns": 10000000000000000000000000000}\n{}'
    )
    # Not readable at all (a directory by that name; a file without read permission or on a failing
    # disk reads the same way): it once stopped every drain, keeping the deliveries behind it.
    (spool_dir / f"{4:020d}-1-unreadable{SUFFIX}").mkdir()
    # A header JSON reads, holding what no header the view took does and no text column stores
    # (a NUL, a lone surrogate): quoting it raised, and the drain stopped there on every tick.
    for n, odd in ((5, "nul\\u0000id"), (6, "lone\\ud800id")):
        (spool_dir / f"{n:020d}-1-odd{n}{SUFFIX}").write_bytes(
            b'{"delivery_id": "' + odd.encode() + b'", "hook_id": 0, "event": "ping", "content_type": ""}\n{}'
        )
    assert post(down, OPENED, "pull_request", delivery="good").status_code == 202
    up = apps(down=False)
    drain(up)
    wait_for(lambda: services(up).spool.depth() == 0, what="the spool to empty")
    assert journal(db) == {"good": ("applied", 1)}
    assert sorted(p.name.split("-")[2] for p in spool_dir.glob("*" + UNUSABLE_SUFFIX)) == [
        "array" + SUFFIX + UNUSABLE_SUFFIX,
        "badbody" + SUFFIX + UNUSABLE_SUFFIX,
        "farfuture" + SUFFIX + UNUSABLE_SUFFIX,
        "garbage" + SUFFIX + UNUSABLE_SUFFIX,
        "odd5" + SUFFIX + UNUSABLE_SUFFIX,
        "odd6" + SUFFIX + UNUSABLE_SUFFIX,
        "unreadable" + SUFFIX + UNUSABLE_SUFFIX,
    ]


def timeout_retries() -> float:
    """Transactions retried after a lock or statement timeout, so far in this process."""
    return sum(
        REGISTRY.get_sample_value("flowlens_db_retries_total", {"reason": code}) or 0 for code in ("55P03", "57014")
    )


def test_a_lock_held_past_the_timeout_spools_at_once_instead_of_retrying(apps, drain, db):
    up = apps(down=False, statement_timeout_ms=300)
    assert post(up, OPENED, "pull_request", delivery="first").status_code == 200
    retries = timeout_retries()
    with db.connect() as holder, holder.begin():
        holder.execute(sa.select(repositories.c.id).with_for_update())
        response = post(up, CLOSED, "pull_request", delivery="blocked")
        assert (response.status_code, response.get_json()["outcome"]) == (202, "spooled")
    assert timeout_retries() == retries
    drain(up)
    wait_for(lambda: services(up).spool.depth() == 0, what="the spool to empty")
    assert journal(db) == {"first": ("applied", 1), "blocked": ("applied", 1)}
    assert rows(db, pull_requests, "state") == [{"state": "closed"}]


def cancelled_at_the_timeout(slow: set[str], seen: list[str]) -> Callable[[Spooled], Result]:
    """A handler the database cancels at its timeout for the delivery ids in `slow`; it applies the rest."""

    def handle(item: Spooled) -> Result:
        seen.append(item.envelope.delivery_id)
        if item.envelope.delivery_id in slow:
            return Result(Disposition.RETRY_LATER, error="database unavailable (57014)", may_pass_over=True)
        return DONE

    return handle


def test_a_delivery_cancelled_at_the_timeout_is_passed_over_and_tried_again_after_a_wait(tmp_path):
    now = [time.time()]
    spool = Spool(tmp_path / "spool", 1 << 20, clock=lambda: now[0])
    for name in ("slow", "next", "last"):
        assert spool.put(ping(name), b"{}")
    slow: set[str] = {"slow"}
    seen: list[str] = []
    handle = cancelled_at_the_timeout(slow, seen)

    # The deliveries behind the slow one are not held up by it.
    assert spool.drain(handle) == (2, None)
    assert seen == ["slow", "next", "last"] and spool.depth() == 1
    # Not tried again before its wait ends, by this Spool or another worker's on the same folder.
    other_worker = Spool(tmp_path / "spool", 1 << 20, clock=lambda: now[0])
    assert spool.drain(handle) == (0, None) and other_worker.drain(handle) == (0, None) and seen[3:] == []
    now[0] += PASSED_OVER_WAIT_S + 0.1
    assert other_worker.drain(handle) == (0, None) and seen[3:] == ["slow"]
    # Waits grow with its time in the spool, up to the cap, whatever the count of tries.
    for _ in range(2000):
        now[0] += PASSED_OVER_MAX_WAIT_S + 0.1
        assert spool.drain(handle) == (0, None)
    assert len(seen) == 4 + 2000
    now[0] += PASSED_OVER_MAX_WAIT_S - 1
    assert spool.drain(handle) == (0, None) and len(seen) == 4 + 2000
    now[0] += 1.1
    slow.clear()  # whatever held it is gone
    assert spool.drain(handle) == (1, None) and spool.depth() == 0


def test_a_delivery_our_code_fails_on_is_passed_over_and_the_rest_drain(tmp_path):
    # One delivery's content may be what trips a bug: kept for a fixed release, not in front of the rest.
    spool = Spool(tmp_path / "spool", 1 << 20)
    for name in ("trips-a-bug", "next", "last"):
        assert spool.put(ping(name), b"{}")
    seen: list[str] = []

    def handle(item: Spooled) -> Result:
        seen.append(item.envelope.delivery_id)
        if item.envelope.delivery_id == "trips-a-bug":
            try:
                raise ValueError("what our code did not foresee")
            except ValueError as exc:
                return bug(Delivery.parse(item.envelope, item.body), exc)
        return DONE

    assert spool.drain(handle) == (2, None)
    assert seen == ["trips-a-bug", "next", "last"] and spool.depth() == 1


def test_two_deliveries_cancelled_in_a_row_stop_the_drain(tmp_path):
    now = [time.time()]
    spool = Spool(tmp_path / "spool", 1 << 20, clock=lambda: now[0])
    for name in ("a", "b", "c", "d"):
        assert spool.put(ping(name), b"{}")
    seen: list[str] = []
    handle = cancelled_at_the_timeout({"a", "b"}, seen)
    cancelled = "database unavailable (57014)"

    # Two in a row, nothing applied between: the database, not one delivery. The drain stops at the
    # second, which stays first in line.
    assert spool.drain(handle) == (0, cancelled)
    assert seen == ["a", "b"] and spool.depth() == 4
    # The first waits now; the second is passed over in its turn, and the rest drain behind it.
    assert spool.drain(handle) == (2, None) and seen[2:] == ["b", "c", "d"]
    # Both due again and cancelled again, in a row: the drain stops there; the next goes on behind them.
    assert spool.put(ping("e"), b"{}")
    now[0] += PASSED_OVER_WAIT_S + 0.1
    assert spool.drain(handle) == (0, cancelled) and seen[5:] == ["a", "b"]
    assert spool.drain(handle) == (1, None) and seen[7:] == ["b", "e"]
    # A database gone (nothing cancelled) stops the drain at once.
    now[0] += PASSED_OVER_MAX_WAIT_S + 0.1
    seen.clear()
    gone = Result(Disposition.RETRY_LATER, error="database unavailable (disconnect)")
    assert spool.drain(lambda item: seen.append(item.envelope.delivery_id) or gone) == (0, gone.error)
    assert seen == ["a"]


def test_a_delivery_whose_rows_stay_locked_past_the_timeout_does_not_hold_up_the_spool(apps, drain, db):
    other = copy.deepcopy(OPENED)
    other["repository"].update(id=OPENED["repository"]["id"] + 1, full_name="octo/locked", name="locked")
    up = apps(down=False, statement_timeout_ms=300)
    assert post(up, other, "pull_request", delivery="first-of-locked").status_code == 200
    down = apps(down=True)
    for n in range(2):
        locked = copy.deepcopy(CLOSED) | {"repository": other["repository"]}
        locked["number"] = locked["pull_request"]["number"] = 3000 + n
        assert post(down, locked, "pull_request", delivery=f"locked-{n}").status_code == 202
    for n in range(3):
        payload = copy.deepcopy(OPENED)
        payload["number"] = payload["pull_request"]["number"] = 2000 + n
        assert post(down, payload, "pull_request", delivery=f"free-{n}").status_code == 202
    with db.connect() as holder, holder.begin():
        # A session that holds the first delivery's repository row (its lock) past the lock timeout.
        holder.execute(
            sa.select(repositories.c.id).where(repositories.c.github_id == other["repository"]["id"]).with_for_update()
        )
        drain(up)
        wait_for(lambda: services(up).spool.depth() == 2, what="the deliveries behind the locked ones to drain")
        assert {k: v for k, v in journal(db).items() if k.startswith("free")} == {
            f"free-{n}": ("applied", 1) for n in range(3)
        }
    # Once the lock is given up, the deliveries passed over are applied on a later tick.
    wait_for(lambda: services(up).spool.depth() == 0, what="the passed-over deliveries to apply")
    assert {k: v for k, v in journal(db).items() if k.startswith("locked")} == {
        f"locked-{n}": ("applied", 1) for n in range(2)
    }


@pytest.fixture
def disk_full(db) -> Iterator[str]:
    """A journal whose writes of one delivery id fail as a full disk does (53100): the database's trouble."""
    with db.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE FUNCTION test_disk_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                " IF NEW.delivery_id = 'full' THEN RAISE EXCEPTION 'could not extend file' USING ERRCODE = '53100';"
                " END IF; RETURN NEW; END $$"
            )
        )
        conn.execute(
            sa.text(
                "CREATE TRIGGER test_disk_full BEFORE INSERT ON webhook_deliveries"
                " FOR EACH ROW EXECUTE FUNCTION test_disk_full()"
            )
        )
    try:
        yield "full"
    finally:
        with db.begin() as conn:
            conn.execute(sa.text("DROP TRIGGER IF EXISTS test_disk_full ON webhook_deliveries"))
            conn.execute(sa.text("DROP FUNCTION IF EXISTS test_disk_full()"))


def test_a_database_out_of_disk_keeps_the_delivery_spooled_not_set_aside(apps, drain, db, disk_full):
    up = apps(down=False)
    response = post(up, OPENED, "pull_request", delivery=disk_full)
    assert (response.status_code, response.get_json()["outcome"]) == (202, "spooled")
    drain(up)
    spool = services(up).spool
    # Several ticks: the drain stops at it each time, keeps it, sets nothing aside.
    ticks = REGISTRY.get_sample_value("flowlens_db_retries_total", {"reason": "53100"}) or 0
    wait_for(
        lambda: (REGISTRY.get_sample_value("flowlens_db_retries_total", {"reason": "53100"}) or 0) >= ticks + 3,
        what="three drains to meet the full disk",
    )
    assert spool.depth() == 1 and spool.unusable == 0
    with db.begin() as conn:
        conn.execute(sa.text("DROP TRIGGER test_disk_full ON webhook_deliveries"))
    wait_for(lambda: spool.depth() == 0, what="the delivery to apply once there is room")
    assert journal(db)[disk_full] == ("applied", 1)


def test_spooled_body_is_the_signed_bytes_as_received(apps, tmp_path):
    down = apps(down=True)
    body = b'{"zen":  "spaced \\u00e9",\n "hook_id": 1}'
    assert post(down, body, "ping", delivery="raw").status_code == 202
    (path,) = services(down).spool.directory.glob("*" + SUFFIX)
    assert Spool.read(path).body == body
    assert os.stat(path).st_size == len(path.read_bytes())


@pytest.fixture
def poison_refused(db) -> Iterator[str]:
    """A journal that refuses one delivery id, even as failed: a delivery no retry will ever store."""
    with db.begin() as conn:
        conn.execute(
            sa.text("ALTER TABLE webhook_deliveries ADD CONSTRAINT test_poison CHECK (delivery_id <> 'poison')")
        )
    try:
        yield "poison"
    finally:
        with db.begin() as conn:
            conn.execute(sa.text("ALTER TABLE webhook_deliveries DROP CONSTRAINT test_poison"))


def test_a_delivery_that_can_never_be_stored_is_set_aside_and_the_rest_drain(apps, drain, db, poison_refused):
    down = apps(down=True)
    genuine = 300
    assert post(down, OPENED, "pull_request", delivery=poison_refused).status_code == 202
    for n in range(genuine):
        payload = copy.deepcopy(OPENED)
        payload["number"] = payload["pull_request"]["number"] = 1000 + n
        assert post(down, payload, "pull_request", delivery=f"genuine-{n}").status_code == 202
    before = REGISTRY.get_sample_value("flowlens_spool_set_aside_total") or 0
    up = apps(down=False)
    drain(up)
    wait_for(lambda: services(up).spool.depth() == 0, what="the spool to drain past the poison")
    entries = journal(db)
    assert entries == {f"genuine-{n}": ("applied", 1) for n in range(genuine)}
    assert len(rows(db, pull_requests, "pr_number")) == genuine
    (aside,) = services(up).spool.directory.glob("*" + UNUSABLE_SUFFIX)
    assert Spool.read(aside).envelope.delivery_id == poison_refused
    assert (REGISTRY.get_sample_value("flowlens_spool_set_aside_total") or 0) == before + 1


def test_the_drain_stops_rather_than_set_aside_when_the_journal_is_missing(apps, drain, db, database_url):
    down = apps(down=True)
    assert post(down, OPENED, "pull_request", delivery="kept").status_code == 202
    with db.begin() as conn:
        conn.execute(sa.text("ALTER TABLE webhook_deliveries RENAME TO webhook_deliveries_away"))
    try:
        up = apps(down=False)
        svc = services(up)
        handle = spool_handler(svc.database, svc.settings, svc.metrics)
        (path,) = svc.spool.directory.glob("*" + SUFFIX)
        # An unmigrated (or moved) journal is the database's fault: the delivery stays spooled.
        assert handle(Spool.read(path)).disposition is Disposition.RETRY_LATER
    finally:
        with db.begin() as conn:
            conn.execute(sa.text("ALTER TABLE webhook_deliveries_away RENAME TO webhook_deliveries"))
    assert services(up).spool.depth() == 1


def test_partial_files_of_a_crashed_write_are_removed_but_a_live_one_is_not(tmp_path):
    spool = Spool(tmp_path / "spool", 1 << 20)
    assert spool.put(ping("kept"), b"{}")
    crashed, live = tmp_path / "spool" / ".1-crashed.tmp", tmp_path / "spool" / ".2-live.tmp"
    crashed.write_bytes(b'{"delivery_id": "half')
    live.write_bytes(b'{"delivery_id": "being written')
    old = time.time() - 3600
    os.utime(crashed, (old, old))
    spool.remove_partial_files(PARTIAL_AT_START_S)
    assert not crashed.exists() and live.exists() and spool.depth() == 1


def test_a_bug_of_ours_is_logged_as_one_and_the_delivery_kept_not_journaled_as_failed(apps, drain, db, monkeypatch):
    """A bug in the store path (here: the statement compiler raising) is not the delivery's fault.

    The view spools it (202), the journal does not call it failed, the drainer keeps its file
    (never `.unusable`) and applies it once the code works again; the log says `bug` once,
    naming where, and nothing of the payload.
    """
    from flowlens_ingest import ingest
    from flowlens_ingest.store import wire

    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger(ingest.__name__).addHandler(handler)
    monkeypatch.setattr(ingest, "_BUGS_SAID", set())

    def broken(*args, **kwargs):
        raise TypeError(f"a bug, holding {OPENED['pull_request']['title']!r}")

    up = apps(down=False)
    with monkeypatch.context() as patch:
        patch.setattr(wire, "form", broken)
        answers = [post(up, OPENED, "pull_request", delivery=f"bug-{n}") for n in range(2)]
        assert [(a.status_code, a.get_json()["outcome"]) for a in answers] == [(202, "spooled")] * 2
        assert journal(db) == {}
        # The drainer meets the same bug: the files stay, none is set aside.
        handle = spool_handler(services(up).database, services(up).settings, services(up).metrics)
        drained, stopped = services(up).spool.drain(handle)
        assert (drained, stopped is not None) == (0, True)
        assert services(up).spool.depth() == 2
        assert not list((services(up).settings.spool_dir).glob("*.unusable"))
    logging.getLogger(ingest.__name__).removeHandler(handler)
    bugs = [line for line in said if line.startswith("bug: ")]
    assert len(bugs) == 1 and "TypeError raised at" in bugs[0] and "test_spool.py" in bugs[0]
    assert not [line for line in said if OPENED["pull_request"]["title"] in line]
    # Fixed (the patch gone): the spool applies both, each once.
    drain(up)
    wait_for(lambda: services(up).spool.depth() == 0, what="the spool to empty")
    assert journal(db) == {"bug-0": ("applied", 1), "bug-1": ("applied", 1)}


def test_a_database_that_takes_no_writes_keeps_deliveries_for_later_not_set_aside(server_url, tmp_path):
    # A primary demoted, a standby reached after a failover: every write is refused (25006). That is
    # the database's trouble, not the delivery's: kept in the spool, applied once writes come back.
    url = create_scratch_database(server_url, prefix="flowlens_read_only")
    migrate.upgrade(url)
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)

    def read_only(on: bool) -> None:
        setting = "SET default_transaction_read_only = on" if on else "RESET default_transaction_read_only"
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{sa.engine.make_url(url).database}" {setting}'))

    read_only(True)
    app = create_app(make_settings(url, tmp_path))
    svc = services(app)
    try:
        response = post(app, OPENED, "pull_request", delivery="while-read-only")
        assert (response.status_code, response.get_json()["outcome"]) == (202, "spooled")
        assert svc.spool is not None
        handle = spool_handler(svc.database, svc.settings, svc.metrics, readiness=svc.readiness)
        assert svc.spool.drain(handle)[0] == 0
        assert svc.spool.refresh() == 1 and list(svc.spool.directory.glob("*" + UNUSABLE_SUFFIX)) == []
        read_only(False)
        # At once: no pooled session keeps the read-only default it was opened with (25006 retired it).
        assert svc.spool.drain(handle) == (1, None)
        response = post(app, CLOSED, "pull_request", delivery="writes-are-back")
        assert (response.status_code, response.get_json()["outcome"]) == (200, "applied")
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        assert sorted(r["delivery_id"] for r in rows(engine, webhook_deliveries, "delivery_id")) == [
            "while-read-only",
            "writes-are-back",
        ]
        engine.dispose()
    finally:
        svc.database.dispose()
        admin.dispose()
        drop_database(url)


def test_odd_files_in_the_spool_folder_are_set_aside_or_left_and_the_rest_drains(tmp_path):
    # What an operator's tools, a disk check or a bad copy may leave in the folder: none of it may
    # stop a worker from starting, or the drain in front of the deliveries behind it.
    folder = tmp_path / "spool"
    folder.mkdir()
    os.mkfifo(folder / f"00000000000000000001-1-fifo0000-10{SUFFIX}")  # read would wait for a writer
    (folder / f"00000000000000000002-1-deep0000-0{SUFFIX}").write_bytes(b"[" * 100_000 + b"\n{}")
    os.symlink(f"loop-b{SUFFIX}", folder / f"loop-a{SUFFIX}")  # a name without its size, that no stat follows
    os.symlink(f"loop-a{SUFFIX}", folder / f"loop-b{SUFFIX}")
    (folder / f"0-1-a-\u00b2{SUFFIX}").write_bytes(b"not a delivery")  # digits only Unicode calls digits
    listening = socket.socket(socket.AF_UNIX)  # a socket by that name: opening it is ENXIO
    short = tempfile.mkdtemp(prefix="s", dir="/tmp")  # a socket's path is short; bound there, then moved
    listening.bind(f"{short}/s")
    os.rename(f"{short}/s", folder / f"00000000000000000003-1-sock0000-0{SUFFIX}")
    os.rmdir(short)
    stale = folder / ".left-by-a-tool.tmp"
    stale.mkdir()
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    spool = Spool(folder, 1 << 20)
    assert spool.put(ping("behind-them"), b"{}")
    applied: list[str] = []

    def apply(item: Spooled) -> Result:
        applied.append(item.envelope.delivery_id)
        return DONE

    spool.refresh()
    assert spool.drain(apply) == (1, None)
    assert applied == ["behind-them"]
    assert sorted(p.name for p in folder.glob("*" + UNUSABLE_SUFFIX)) == sorted(
        [
            f"00000000000000000001-1-fifo0000-10{SUFFIX}{UNUSABLE_SUFFIX}",
            f"00000000000000000002-1-deep0000-0{SUFFIX}{UNUSABLE_SUFFIX}",
            f"00000000000000000003-1-sock0000-0{SUFFIX}{UNUSABLE_SUFFIX}",
            f"0-1-a-\u00b2{SUFFIX}{UNUSABLE_SUFFIX}",
            f"loop-a{SUFFIX}{UNUSABLE_SUFFIX}",
            f"loop-b{SUFFIX}{UNUSABLE_SUFFIX}",
        ]
    )
    assert stale.is_dir()
    listening.close()
