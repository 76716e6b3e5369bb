"""The alerting rules (deploy/prometheus/): promtool checks them and runs their unit tests, and each has a runbook.

promtool comes with Prometheus (`apt-get install prometheus`, which .ci/run does): these
tests are skipped, saying so, only where it is not installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "flowlens-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "flowlens-alerts.test.yml"
RUNBOOK = ROOT / "docs" / "alerts.md"

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool is not installed (apt-get install prometheus)"
)


def alerts() -> list[dict]:
    """Every alerting rule in the shipped file."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


@needs_promtool
def test_promtool_finds_the_rules_valid():
    checked = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in checked.stdout


@needs_promtool
def test_the_sample_prometheus_configuration_is_valid_and_loads_the_rules():
    """deploy/prometheus/prometheus.yml, the one docs/alerts.md gives, loads the rules and scrapes the job they name."""
    sample = RULES.parent / "prometheus.yml"
    checked = subprocess.run(
        ["promtool", "check", "config", sample.name], cwd=sample.parent, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in checked.stdout
    jobs = {job["job_name"] for job in yaml.safe_load(sample.read_text())["scrape_configs"]}
    assert jobs == {"flowlens-ingest"}


@needs_promtool
def test_the_rules_unit_tests_pass():
    tested = subprocess.run(
        ["promtool", "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_is_unit_tested_firing_and_silent():
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    checks = [check for case in cases for check in case["alert_rule_test"]]
    fired = {check["alertname"] for check in checks if check["exp_alerts"]}
    silent = {check["alertname"] for check in checks if not check["exp_alerts"]}
    names = {rule["alert"] for rule in alerts()}
    assert names - fired == set(), "never shown firing"
    assert names - silent == set(), "never shown silent"


def test_every_alert_has_a_runbook_entry_that_its_annotation_names():
    text = RUNBOOK.read_text()
    headings = set(re.findall(r"^### (FlowLens\w+)$", text, flags=re.MULTILINE))
    for rule in alerts():
        name = rule["alert"]
        assert name in headings, f"{name} has no `### {name}` in docs/alerts.md"
        assert rule["annotations"]["runbook"] == f"docs/alerts.md#{name.lower()}"
        entry = text.split(f"### {name}\n", 1)[1].split("\n### ", 1)[0]
        # What it means, what to do, which command (or query) shows more.
        for part in ("**Means**", "**Do**", "**More**"):
            assert part in entry, f"{name}'s entry lacks {part}"
        assert rule["labels"]["severity"] in ("warning", "critical")


def test_the_rules_name_only_metrics_the_service_defines():
    """Every series a rule watches is one metrics.py makes (with Prometheus's suffixes), even those not yet seen live."""
    defined = set(re.findall(r'"(flowlens_[a-z0-9_]+)"', (ROOT / "flowlens_ingest" / "metrics.py").read_text()))
    watched = {name for rule in alerts() for name in re.findall(r"\bflowlens_[a-z0-9_]+", rule["expr"])}
    assert watched
    bases = {re.sub(r"_(total|bucket|count|sum|created)$", "", name) for name in watched}
    assert bases - defined == set()
