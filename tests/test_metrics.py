"""/metrics under real gunicorn workers: one scrape shows the sum over all of them.

Each worker answers some deliveries; a scrape is answered by one worker. Only
prometheus_client's multiprocess mode makes that one answer the total, so every
test below spreads deliveries over several workers first and then checks that
each scrape shows the whole count.
"""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from flowlens_ingest import metrics as metrics_module
from flowlens_ingest.spool.folder import SUFFIX

from .helpers import free_port, github_headers, load_payload, wait_for
from .serving import ProcfileService, Service, log_entries, metric, running, sample, workers

OPENED = load_payload("pull_request/opened.payload.json")
PING = load_payload("ping/payload.json")

# The series docs/operating.md's Metrics section lists, with their types.
DOCUMENTED = {
    "flowlens_deliveries": "counter",
    "flowlens_delivery_duration_seconds": "histogram",
    "flowlens_db_retries": "counter",
    "flowlens_db_round_trips": "counter",
    "flowlens_signature_failures": "counter",
    "flowlens_spool_drained": "counter",
    "flowlens_spool_depth": "gauge",
    "flowlens_spool_size_bytes": "gauge",
    "flowlens_spool_limit_bytes": "gauge",
    "flowlens_spool_unusable_files": "gauge",
}


def opened(number: int) -> dict:
    """The sample `opened` delivery, re-aimed at PR `number`."""
    payload = json.loads(json.dumps(OPENED))
    payload["number"] = payload["pull_request"]["number"] = number
    return payload


def spread_deliveries(service: Service, batch: int = 24) -> dict[str, int]:
    """Post deliveries at once, in batches, until at least two workers answered some; return the counts."""
    counts = {"applied": 0, "ignored": 0}
    for round_ in range(10):

        def post(i: int, first: int = 1000 + round_ * batch) -> str:
            if i % 2:
                return service.post(PING, "ping").json()["outcome"]
            return service.post(opened(first + i), "pull_request").json()["outcome"]

        with ThreadPoolExecutor(8) as pool:
            for outcome in pool.map(post, range(batch)):
                counts[outcome] += 1
        total = sum(counts.values())
        lines = wait_for(
            lambda total=total: len(log_entries(service, "delivery")) >= total and log_entries(service, "delivery"),
            "a log line per delivery",
        )
        if len({entry["pid"] for entry in lines}) >= 2:
            return counts
    pytest.fail("every delivery went to one worker; cannot tell a sum from one worker's share")


def assert_every_scrape_shows_the_sum(service: Service, counts: dict[str, int], unsigned: int) -> None:
    """Scrape several times (each may reach any worker): every answer carries the totals."""
    for _ in range(8):
        text = requests.get(service.url + "/metrics", timeout=10).text
        assert sample(text, "flowlens_deliveries_total", event="pull_request", outcome="applied") == counts["applied"]
        assert sample(text, "flowlens_deliveries_total", event="ping", outcome="ignored") == counts["ignored"]
        assert sample(text, "flowlens_delivery_duration_seconds_count", event="pull_request") == counts["applied"]
        assert (sample(text, "flowlens_signature_failures_total", reason="missing") or 0) == unsigned


def post_unsigned(service: Service, n: int) -> None:
    """`n` requests without a signature (401 each)."""
    for _ in range(n):
        assert requests.post(service.url + "/webhook", data=b"{}", timeout=10).status_code == 401


@pytest.mark.slow
def test_metrics_are_summed_over_the_workers_of_serve(db, database_url, tmp_path):
    with running(Service(database_url, tmp_path, workers=3)) as service:
        counts = spread_deliveries(service)
        post_unsigned(service, 3)
        assert_every_scrape_shows_the_sum(service, counts, unsigned=3)
        # Where the sum came from: one file of samples per worker, in the data directory.
        assert len(list((tmp_path / "metrics" / str(service.port)).glob("counter_*.db"))) == 3
        assert service.stop() == 0


@pytest.mark.slow
def test_metrics_are_summed_over_the_workers_of_the_procfile_command(db, database_url, tmp_path):
    # No PROMETHEUS_MULTIPROC_DIR, no FLOWLENS_DATA_DIR: the Procfile command alone must set it up.
    with running(ProcfileService(database_url, tmp_path, workers=3)) as service:
        counts = spread_deliveries(service)
        post_unsigned(service, 2)
        assert_every_scrape_shows_the_sum(service, counts, unsigned=2)
        assert len(list((tmp_path / ".flowlens" / "metrics" / str(service.port)).glob("counter_*.db"))) == 3
        assert service.stop() == 0


@pytest.mark.slow
def test_a_new_run_starts_from_zero_and_a_dead_worker_still_counts(db, database_url, tmp_path):
    with running(Service(database_url, tmp_path)) as first:
        assert first.post(PING, "ping").status_code == 200
        assert first.stop() == 0

    with running(Service(database_url, tmp_path)) as service:
        # The previous run's files were removed at start: its ping is not counted again.
        assert metric(service, "flowlens_deliveries_total", event="ping", outcome="ignored") is None
        counts = spread_deliveries(service, batch=8)
        old_pids = {w.pid for w in workers(service)}
        for worker in workers(service):
            os.kill(worker.pid, signal.SIGKILL)
        wait_for(
            lambda: len(workers(service)) == 2 and not old_pids & {w.pid for w in workers(service)},
            "gunicorn to replace the killed workers",
        )
        # The killed workers' deliveries happened: counters keep them after the process is gone.
        assert_every_scrape_shows_the_sum(service, counts, unsigned=0)
        assert service.stop() == 0


@pytest.mark.slow
def test_spool_depth_counts_live_workers_only(db, tmp_path):
    # A database nobody listens on: every delivery is spooled.
    dead = f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/none"
    with running(Service(dead, tmp_path)) as service:
        for n in range(3):
            answer = service.post(opened(n), "pull_request")
            assert (answer.status_code, answer.json()["outcome"]) == (202, "spooled")
        wait_for(lambda: metric(service, "flowlens_spool_depth") == 3, "the drainers to report 3 spooled")
        assert metric(service, "flowlens_deliveries_total", event="pull_request", outcome="spooled") == 3

        # Workers that last saw 3 die; the spool then empties. Their last sample must
        # not outlive them, or the gauge would read 3 for ever.
        killed = {w.pid for w in workers(service)}
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        for path in (tmp_path / "spool").glob("*" + SUFFIX):
            path.unlink()
        wait_for(
            lambda: len(workers(service)) == 2 and not killed & {w.pid for w in workers(service)},
            "gunicorn to replace the killed workers",
        )
        wait_for(lambda: metric(service, "flowlens_spool_depth") == 0, "the spool depth to read 0")
        assert service.stop() == 0


@pytest.mark.slow
def test_metrics_are_summed_across_workers_and_count_one_round_trip_per_delivery(db, database_url, tmp_path):
    with running(Service(database_url, tmp_path, workers=3)) as service:

        def cold_workers() -> set[int]:
            # Those that have not yet served a delivery: each one's first opens its connection
            # (SQLAlchemy's first-connect queries) and PREPAREs the statements, round trips the
            # count below is not about. A connection alone says less: /readyz opens one too.
            served = {entry["pid"] for entry in log_entries(service, "delivery")}
            return {worker.pid for worker in workers(service)} - served

        sent = 0
        while cold_workers() and sent < 300:
            assert service.post(opened(1000 + sent), "pull_request").status_code == 200
            sent += 1
        assert not cold_workers()
        # Each worker writes its own sample file.
        assert len(list((tmp_path / "metrics" / str(service.port)).glob("counter_*.db"))) == 3
        post_unsigned(service, 2)

        wait_for(
            lambda: "flowlens_spool_depth" in requests.get(service.url + "/metrics", timeout=10).text,
            "the spool depth gauge",
        )
        # Whichever worker answers /metrics, the totals are the sum over all workers.
        for _ in range(6):
            text = requests.get(service.url + "/metrics", timeout=10).text
            assert sample(text, "flowlens_deliveries_total", event="pull_request", outcome="applied") == sent
            assert sample(text, "flowlens_delivery_duration_seconds_count", event="pull_request") == sent
            assert sample(text, "flowlens_signature_failures_total", reason="missing") == 2
            # The drainers report the spool depth (empty) once a second.
            assert "flowlens_spool_depth 0.0" in text

        # One round trip per delivery (the batch, committed by the server), now that every
        # worker has served a delivery of this kind.
        before = metric(service, "flowlens_db_round_trips_total")
        for number in range(10):
            assert service.post(opened(2000 + number), "pull_request").status_code == 200
        after = metric(service, "flowlens_db_round_trips_total")
        assert before is not None and after is not None
        assert after - before == 10
        assert service.stop() == 0


def test_metrics_name_every_instrument_the_readme_lists(client, deliver):
    """In one process (the Flask test client): every documented series exists with its type."""
    assert deliver(PING, "ping").status_code == 200
    unsigned = client.post("/webhook", data=b"{}", headers={"Content-Type": "application/json"})
    assert unsigned.status_code == 401
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.content_type.startswith("text/plain; version=")
    text = answer.get_data(as_text=True)
    families = {family.name: family.type for family in text_string_to_metric_families(text)}
    assert families | DOCUMENTED == families
    assert (sample(text, "flowlens_deliveries_total", event="ping", outcome="ignored") or 0) >= 1


def test_unknown_event_names_do_not_become_label_values(client):
    body = json.dumps({"zen": "x"}).encode()
    invented = "made-up-event-" + os.urandom(4).hex()
    assert client.post("/webhook", data=body, headers=github_headers(body, invented)).status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    assert invented not in text
    assert metrics_module.event_label(invented) == "other"
    assert (sample(text, "flowlens_deliveries_total", event="other", outcome="ignored") or 0) >= 1


def test_a_metrics_file_a_starting_process_has_not_sized_yet_does_not_break_the_scrape(tmp_path):
    # A replacement worker creates its file empty and sizes it a moment later; a scrape in
    # between made prometheus_client raise struct.error and /metrics answer 500.
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    live = MmapedDict(str(tmp_path / "counter_4242.db"))
    live.write_value(mmap_key("flowlens_probe", "flowlens_probe_total", [], [], "a live process's counter"), 3.0, 0.0)
    live.close()
    (tmp_path / "counter_4343.db").write_bytes(b"")
    body, _content_type = metrics_module.render(tmp_path)
    assert "flowlens_probe_total 3.0" in body.decode()
