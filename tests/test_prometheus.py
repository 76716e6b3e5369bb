"""A real Prometheus scrapes a real `flowlens-ingest serve` (3 gunicorn workers and the files worker).

It loads the shipped alerting rules, and every series a rule watches must be there:
a rule on a misspelled name would never fire, and nothing else would say so. The
Prometheus is the apt package's (.ci/run installs it); the test is skipped, saying so,
only where it is not installed.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from .fake_github import FakeGitHub, make_files, serve_fake_github
from .helpers import free_port, load_payload, wait_for
from .serving import Service, running, wait_up

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None, reason="prometheus is not installed (apt-get install prometheus)"
    ),
]

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "flowlens-alerts.yml"
OPENED = load_payload("pull_request/opened.payload.json")
REPOSITORY = OPENED["repository"]["full_name"]
# Series a rule watches that exist only once something happened: this gauge appears when a
# scheduled recovery pass completes (github/recover_pass.py; absent, not 0, before that, so
# an installation without recovery does not fire FlowLensRecoveryBehind). Its name is checked
# against metrics.py instead (test_the_rules_name_only_metrics_the_service_defines).
NOT_YET_EXPORTED = {"flowlens_recovery_last_success_timestamp_seconds"}


class Prometheus:
    """The `prometheus` server on a loopback port, scraping one target every second, with the shipped rules."""

    def __init__(self, directory: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            # The job name the rules expect (FlowLensInstanceDown).
            "scrape_configs": [{"job_name": "flowlens-ingest", "static_configs": [{"targets": [target]}]}],
        }
        # JSON is YAML: no YAML writer needed for a generated configuration.
        (directory / "prometheus.yml").write_text(json.dumps(config))
        self.log_path = directory / "prometheus.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> None:
        """Block until Prometheus says it is ready."""

        def ready() -> bool:
            try:
                return requests.get(self.url + "/-/ready", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_up(self.process, ready, "prometheus", lambda: self.log_path.read_text(errors="replace"), 60)

    def api(self, path: str, **params: str) -> dict:
        """The `data` of one answer of the HTTP API."""
        answer = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10).json()
        assert answer["status"] == "success", answer
        return answer["data"]

    def value(self, query: str) -> float | None:
        """A query's single value (None when it has no result)."""
        result = self.api("query", query=query)["result"]
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        """Stop Prometheus and wait for it."""
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture
def github() -> Iterator[FakeGitHub]:
    with serve_fake_github() as fake:
        yield fake


def opened(number: int) -> dict:
    """The sample `opened` delivery, re-aimed at PR `number`."""
    payload = copy.deepcopy(OPENED)
    payload["number"] = payload["pull_request"]["number"] = number
    return payload


def watched_series(rules: list[dict]) -> set[str]:
    """Every metric name the alerting rules' expressions use."""
    names: set[str] = set()
    for rule in rules:
        names |= set(re.findall(r"\bflowlens_[a-z0-9_]+", rule["query"]))
        names |= {"up"} if re.search(r"\bup\{", rule["query"]) else set()
    return names


def test_prometheus_scrapes_serve_loads_every_rule_and_finds_every_series_they_watch(
    db, database_url, github, tmp_path
):
    for number in range(1, 7):
        github.set_files(REPOSITORY, number, make_files(3))
    env = {"GITHUB_API_URL": github.url, "GITHUB_TOKEN": github.token}
    (tmp_path / "prometheus").mkdir()
    with running(Service(database_url, tmp_path, workers=3, env=env)) as service:
        prometheus = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{service.port}")
        try:
            prometheus.wait_ready()
            for number in range(1, 7):
                assert service.post(opened(number), "pull_request").json()["outcome"] == "applied"
            assert requests.post(service.url + "/webhook", data=b"{}", timeout=10).status_code == 401

            # Waited on through Prometheus itself: the sum over the 3 workers, and the files worker's gauges.
            wait_for(
                lambda: prometheus.value('sum(flowlens_deliveries_total{outcome="applied"})') == 6,
                "Prometheus to see the 6 applied deliveries summed over the workers",
            )
            wait_for(
                lambda: (
                    prometheus.value("flowlens_github_rate_limit_remaining") is not None
                    and prometheus.value("flowlens_files_oldest_pending_seconds") is not None
                ),
                "the files worker's series",
            )
            assert prometheus.value('up{job="flowlens-ingest"}') == 1
            assert prometheus.value('sum(flowlens_signature_failures_total{reason="missing"})') == 1
            assert prometheus.value("flowlens_spool_limit_bytes") == 512 * 1024 * 1024

            groups = prometheus.api("rules", type="alert")["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            assert {rule["health"] for rule in rules} == {"ok"}, [r for r in rules if r["health"] != "ok"]
            assert len(rules) == RULES.read_text().count("- alert:")

            present = set(prometheus.api("label/__name__/values"))
            watched = watched_series(rules)
            assert watched >= NOT_YET_EXPORTED, "an exemption no rule needs any more: drop it"
            assert watched - NOT_YET_EXPORTED - present == set(), "rules watch series that do not exist"
            # Nothing fires on a healthy service (recovery's alerts have no series yet).
            firing = prometheus.api("alerts")["alerts"]
            assert [a["labels"]["alertname"] for a in firing if a["state"] == "firing"] == []
        finally:
            prometheus.stop()
        assert service.stop() == 0
