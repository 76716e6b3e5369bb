"""Logs: one line per delivery with its id and outcome, never a secret or a payload; JSON or text."""

from __future__ import annotations

import json
import logging
import re
import sys

import pytest
import requests

from flowlens_ingest import logs
from flowlens_ingest.config import Settings

from .helpers import PREVIOUS_SECRET, SECRET, free_port, github_headers, load_payload, wait_for
from .serving import Service, log_entries, metric, running

OPENED = load_payload("pull_request/opened.payload.json")
PING = load_payload("ping/payload.json")
# Text that appears only inside the payload: finding it in a log means the payload leaked.
MARKER = "payload-text-that-must-never-reach-a-log"


def record(msg: str = "delivery", **extra: object) -> logging.LogRecord:
    """A log record as webhook.py makes one."""
    entry = logging.LogRecord("flowlens_ingest.web.webhook", logging.INFO, __file__, 1, msg, None, None)
    entry.__dict__.update(extra)
    return entry


def test_json_lines_carry_the_extras_as_fields():
    line = logs.JsonFormatter().format(record(delivery="abc", event="ping", outcome="ignored", duration_ms=1.5))
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["msg"] == "delivery" and entry["level"] == "info" and entry["logger"] == "flowlens_ingest.web.webhook"
    assert (entry["delivery"], entry["event"], entry["outcome"], entry["duration_ms"]) == (
        "abc",
        "ping",
        "ignored",
        1.5,
    )
    assert isinstance(entry["pid"], int) and entry["ts"].endswith("+00:00")


def test_json_keeps_an_exception_inside_its_one_line():
    try:
        raise ValueError("boom")
    except ValueError:
        entry = record("unexpected error")
        entry.exc_info = sys.exc_info()
    line = logs.JsonFormatter().format(entry)
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exc"]


def test_text_lines_read_as_key_value_pairs():
    line = logs.TextFormatter().format(record(delivery="abc-123", outcome="applied", reason="two words", action=None))
    assert re.match(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[\d+\] INFO    flowlens_ingest\.web\.webhook: delivery ", line
    )
    assert line.endswith('delivery=abc-123 outcome=applied reason="two words"')


def test_text_log_format_is_readable():
    record = logging.LogRecord("flowlens_ingest.web.webhook", logging.INFO, __file__, 1, "delivery", None, None)
    record.delivery, record.outcome = "abc-123", "applied"
    line = logs.TextFormatter().format(record)
    assert "INFO" in line and "flowlens_ingest.web.webhook: delivery" in line
    assert "delivery=abc-123" in line and "outcome=applied" in line


def test_configure_switches_the_format_in_place(tmp_path):
    logger = logging.getLogger("flowlens_ingest")
    try:
        logs.configure(Settings(log_format="text", log_level="DEBUG"))
        logs.configure(Settings(log_format="json"))
        ours = [h for h in logger.handlers if getattr(h, "_flowlens", False)]
        assert len(ours) == 1 and isinstance(ours[0].formatter, logs.JsonFormatter)
        assert logger.level == logging.INFO and logger.propagate is False
    finally:
        logs.configure(Settings(log_format="json"))


def post(service: Service, body: bytes, headers: dict[str, str]) -> requests.Response:
    """POST raw bytes with the given headers."""
    return requests.post(service.url + "/webhook", data=body, headers=headers, timeout=15)


def exercise(service: Service) -> dict[str, tuple[int, str]]:
    """Send one delivery of each kind; return delivery id -> (status, outcome expected in its log line)."""
    payload = json.loads(json.dumps(OPENED))
    payload["pull_request"]["body"] = MARKER
    body = json.dumps(payload).encode()
    expected: dict[str, tuple[int, str]] = {}

    def send(
        delivery: str, status: int, outcome: str, data: bytes = body, event: str = "pull_request", **kwargs: str
    ) -> None:
        answer = post(service, data, github_headers(data, event, delivery=delivery, **kwargs))
        assert answer.status_code == status, answer.text
        expected[delivery] = (status, outcome)

    send("log-applied", 200, "applied")
    answer = post(service, body, github_headers(body, "pull_request", delivery="log-applied"))
    assert answer.json()["outcome"] == "duplicate"
    send("log-rotated", 200, "ignored", data=json.dumps(PING).encode(), event="ping", secret=PREVIOUS_SECRET)
    send("log-415", 415, "rejected", content_type="text/plain")
    bad = b'{"pull_request": "' + MARKER.encode() + b'"'
    send("log-400", 400, "rejected", data=bad)
    broken = json.dumps(dict(payload, pull_request=[MARKER])).encode()
    send("log-failed", 202, "failed", data=broken)
    return expected


@pytest.mark.slow
def test_a_json_line_per_delivery_with_its_id_and_never_a_secret_or_payload(db, database_url, tmp_path):
    with running(Service(database_url, tmp_path)) as service:
        expected = exercise(service)
        wrong = github_headers(b"{}", "ping", delivery="log-401", secret="a guess")
        assert post(service, b"{}", wrong).status_code == 401
        lines = wait_for(
            lambda: len(log_entries(service, "delivery")) >= len(expected) + 1 and log_entries(service, "delivery"),
            "a log line per delivery",
        )
        assert service.stop() == 0

    by_delivery: dict[str, list[dict]] = {}
    for entry in lines:
        by_delivery.setdefault(entry["delivery"], []).append(entry)
    # The first `log-applied` and its duplicate are two deliveries with one id.
    assert [e["outcome"] for e in by_delivery.pop("log-applied")] == ["applied", "duplicate"]
    expected.pop("log-applied")
    for delivery, (status, outcome) in expected.items():
        (entry,) = by_delivery[delivery]
        assert (entry["status"], entry["outcome"]) == (status, outcome)
        assert entry["duration_ms"] >= 0 and isinstance(entry["pid"], int)
    assert by_delivery["log-failed"][0]["action"] == "opened"
    assert by_delivery["log-rotated"][0]["event"] == "ping"

    refused = log_entries(service, "signature refused")
    assert [(e["delivery"], e["reason"], e["level"]) for e in refused] == [("log-401", "mismatch", "warning")]

    text = service.logs()
    for secret in (SECRET, PREVIOUS_SECRET, json.dumps(SECRET)[1:-1]):
        assert secret not in text
    assert MARKER not in text
    # Every line but `serve`'s own banner is JSON, gunicorn's included.
    for line in text.splitlines():
        if not line.startswith("flowlens-ingest: "):
            json.loads(line)
    assert any(e["logger"] == "gunicorn.error" for e in log_entries(service))


@pytest.mark.slow
def test_one_json_log_line_per_delivery_with_its_id_and_no_secret(service, db):
    payload = json.loads(json.dumps(OPENED))
    payload["pull_request"]["title"] = "a title that must never reach the log"
    assert service.post(payload, "pull_request", delivery="log-me-1").status_code == 200
    assert requests.post(service.url + "/webhook", data=b"{}", timeout=10).status_code == 401

    wait_for(lambda: log_entries(service, "delivery"), "the delivery log line")
    (entry,) = log_entries(service, "delivery")
    assert entry["delivery"] == "log-me-1"
    assert (entry["event"], entry["action"], entry["outcome"]) == ("pull_request", "opened", "applied")
    assert entry["duration_ms"] > 0 and entry["level"] == "info"
    text = service.logs()
    assert SECRET not in text
    assert "a title that must never reach the log" not in text


@pytest.mark.slow
def test_text_format_for_development(db, database_url, tmp_path):
    with running(Service(database_url, tmp_path, env={"FLOWLENS_LOG_FORMAT": "text"})) as service:
        exercise(service)
        wait_for(lambda: "delivery=log-failed" in service.logs(), "the last delivery's line")
        assert service.stop() == 0
    text = service.logs()
    line = next(line for line in text.splitlines() if "delivery=log-415" in line)
    assert re.search(
        r"\[\d+\] WARNING flowlens_ingest\.web\.webhook: delivery delivery=log-415 event=pull_request "
        r"outcome=rejected status=415 duration_ms=[\d.]+$",
        line,
    ), line
    assert not any(line.startswith("{") for line in text.splitlines())
    assert SECRET not in text and MARKER not in text


@pytest.mark.slow
def test_a_delivery_refused_in_an_outage_is_an_error_line_and_counted(db, tmp_path):
    # Nobody listens at the database's address and the spool is off: 503, for GitHub to retry.
    dead = f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/none"
    with running(Service(dead, tmp_path, env={"FLOWLENS_SPOOL_MAX_BYTES": "0"})) as service:
        answer = service.post(OPENED, "pull_request", delivery="log-503")
        assert (answer.status_code, answer.headers["Retry-After"]) == (503, "30")
        (entry,) = wait_for(lambda: log_entries(service, "delivery"), "the delivery's log line")
        assert (entry["delivery"], entry["level"], entry["outcome"], entry["status"]) == (
            "log-503",
            "error",
            "unavailable",
            503,
        )
        assert metric(service, "flowlens_deliveries_total", event="pull_request", outcome="unavailable") == 1
        assert service.stop() == 0


# --- no raw control character in the text log ---------------------------------------------

# What a terminal acts on: ESC (here a colour change), BEL, DEL, a C1 CSI, a newline that
# would forge a line, and the bidi override that reverses what follows.
CONTROLS = "\x1b[31m\x07\x7f\x9b\n\u202e"
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain-id", "plain-id"),
        ("\x1b[2J\x07", "\\x1b[2J\\x07"),
        ("a\x7fb\x9bc", "a\\x7fb\\x9bc"),
        ("two\nlines\r", "two\\x0alines\\x0d"),
        ("txt.exe\u202egnp", "txt.exe\\u202egnp"),
        ("caf\u00e9 \u2603", "caf\u00e9 \u2603"),
    ],
)
def test_printable_escapes_what_a_terminal_acts_on(text, shown):
    assert logs.printable(text) == shown


def test_printable_keeps_the_controls_asked_for():
    assert logs.printable("a\nb\x1b\tc", keep="\n\t") == "a\nb\\x1b\tc"


def test_a_text_line_writes_no_raw_control_from_a_value_or_the_message():
    entry = record("delivery %s failed", delivery="id" + CONTROLS, event="push\x07")
    entry.args = ("id" + CONTROLS,)
    line = logs.TextFormatter().format(entry)
    assert not RAW.search(line) and "\n" not in line
    assert "delivery id\\x1b[31m\\x07\\x7f\\x9b\\x0a\\u202e failed" in line
    assert "event=push\\x07" in line


def test_a_json_line_writes_no_raw_control_either():
    line = logs.JsonFormatter().format(record(delivery="id" + CONTROLS))
    assert not RAW.search(line) and "\n" not in line
    assert json.loads(line)["delivery"] == "id" + CONTROLS


def test_a_text_traceback_keeps_its_lines_and_escapes_the_rest():
    try:
        raise ValueError("bad id \x1b]0;owned\x07")
    except ValueError:
        entry = record("unexpected error")
        entry.exc_info = sys.exc_info()
    text = logs.TextFormatter().format(entry)
    assert not RAW.search(text) and text.count("\n") >= 2
    assert "ValueError: bad id \\x1b]0;owned\\x07" in text


@pytest.mark.slow
def test_control_bytes_in_the_headers_never_reach_the_text_log_raw(db, database_url, tmp_path):
    # The delivery and event headers are unauthenticated text: anyone who reaches
    # /webhook chooses them. ESC, BEL and DEL are ASCII, so they pass the header rules.
    body = json.dumps(PING).encode()
    delivery = "guid-\x1b[31m-\x07-\x7f-end"
    with running(Service(database_url, tmp_path, env={"FLOWLENS_LOG_FORMAT": "text"})) as service:
        # Signed: journaled and logged with its id. Unsigned: refused and logged too.
        signed = post(service, body, github_headers(body, "ping", delivery=delivery))
        unsigned = post(service, body, github_headers(body, "ping\x1b[2J", delivery=delivery, secret="a guess"))
        wrong_event = post(service, body, github_headers(body, "pi\x07ng", delivery="guid-event"))
        assert (signed.status_code, unsigned.status_code) == (200, 401)
        assert wrong_event.status_code == 200 and wrong_event.json()["outcome"] == "ignored"
        wait_for(lambda: service.logs().count("guid-") >= 3, "the three deliveries' lines")
        assert service.stop() == 0
    raw = service.log_path.read_bytes()
    for byte in (b"\x1b", b"\x07", b"\x7f"):
        assert byte not in raw
    text = service.logs()
    assert "delivery=guid-\\x1b[31m-\\x07-\\x7f-end event=ping outcome=ignored status=200" in text
    assert "signature refused reason=mismatch delivery=guid-\\x1b[31m-\\x07-\\x7f-end event=ping\\x1b[2J" in text
    assert "delivery=guid-event event=pi\\x07ng" in text
