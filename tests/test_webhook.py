"""The HTTP contract of /webhook, through Flask's test client on a real database."""

import hashlib
import io
import json
import tempfile
from urllib.parse import urlencode

import pytest

from flowlens_ingest.events.signature import sign
from flowlens_ingest.memory import LARGE
from flowlens_ingest.store.schema import pull_requests, repositories, webhook_deliveries
from flowlens_ingest.web.app import create_app

from .helpers import PREVIOUS_SECRET, SECRET, github_headers, load_payload, make_settings, rows
from .serving import sample

OPENED = load_payload("pull_request/opened.payload.json")


def test_signed_pull_request_is_applied(deliver, db):
    response = deliver(OPENED, "pull_request", delivery="d-1")
    assert response.status_code == 200
    assert response.get_json() == {
        "delivery": "d-1",
        "event": "pull_request",
        "action": "opened",
        "outcome": "applied",
    }
    assert [r["title"] for r in rows(db, pull_requests, "title")] == ["Update the README with new information."]


def test_previous_secret_is_accepted_during_rotation(deliver, db):
    assert deliver(OPENED, "pull_request", secret=PREVIOUS_SECRET).status_code == 200


def test_ping_is_ignored_but_journaled(deliver, db):
    response = deliver(load_payload("ping/payload.json"), "ping", delivery="p-1")
    assert response.status_code == 200
    assert response.get_json()["outcome"] == "ignored"
    assert rows(db, webhook_deliveries, "delivery_id", "event", "outcome") == [
        {"delivery_id": "p-1", "event": "ping", "outcome": "ignored"}
    ]
    assert rows(db, repositories) == []


def test_unknown_event_is_ignored(deliver, db):
    response = deliver({"action": "created", "zen": "x"}, "sponsorship")
    assert (response.status_code, response.get_json()["outcome"]) == (200, "ignored")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h: h.pop("X-Hub-Signature-256"),
        lambda h: h.update({"X-Hub-Signature-256": sign(b"other body", SECRET.encode())}),
        lambda h: h.update({"X-Hub-Signature-256": "sha1=" + "0" * 40}),
        lambda h: h.update({"X-Hub-Signature-256": sign(b"{}", b"wrong secret")}),
    ],
    ids=["missing", "other-body", "sha1-only", "wrong-secret"],
)
def test_bad_signature_is_401_and_stores_nothing(client, db, mutate):
    body = json.dumps(OPENED).encode()
    headers = github_headers(body, "pull_request")
    mutate(headers)
    response = client.post("/webhook", data=body, headers=headers)
    assert response.status_code == 401
    assert "error" in response.get_json()
    assert rows(db, webhook_deliveries) == [] and rows(db, pull_requests) == []


@pytest.mark.parametrize("header", ["X-GitHub-Event", "X-GitHub-Delivery"])
def test_missing_github_header_is_400(client, db, header):
    body = json.dumps(OPENED).encode()
    headers = github_headers(body, "pull_request")
    del headers[header]
    assert client.post("/webhook", data=body, headers=headers).status_code == 400
    assert rows(db, webhook_deliveries) == []


def test_body_over_the_limit_is_413(db, database_url, tmp_path):
    app = create_app(make_settings(database_url, tmp_path, max_body_bytes=1024))
    body = json.dumps({"zen": "x" * 2048}).encode()
    response = app.test_client().post("/webhook", data=body, headers=github_headers(body, "ping"))
    assert response.status_code == 413
    assert rows(db, webhook_deliveries) == []


@pytest.mark.parametrize(
    "sent",
    [
        {"Content-Type": "text/plain"},
        # GitHub's Content-Type is ASCII: anything else would be journaled mangled from WSGI's latin-1.
        {"Content-Type": "application/json; charset=\u00e9\u00ff"},
        {"Content-Type": "application/json; x=\x1b[31m"},
        # GitHub sends no content coding: a gzip body is not "not UTF-8" (400), and a plain one so
        # labelled is not what it says.
        {"Content-Encoding": "gzip"},
        {"Content-Encoding": "br"},
    ],
    ids=["text-plain", "latin-1-parameter", "escape-in-parameter", "gzip", "br"],
)
def test_a_body_of_another_content_type_or_coding_is_415(client, db, sent):
    body = json.dumps(OPENED).encode()
    headers = github_headers(body, "pull_request") | sent
    response = client.post("/webhook", data=body, headers=headers)
    assert response.status_code == 415 and set(response.get_json()) == {"error"}
    assert rows(db, webhook_deliveries) == []


@pytest.mark.parametrize("coding", ["identity", ""])
def test_a_body_with_no_content_coding_named_is_applied(client, db, coding):
    body = json.dumps(OPENED).encode()
    headers = github_headers(body, "pull_request") | {
        "Content-Encoding": coding,
        "Content-Type": "application/json;\tcharset=utf-8",
    }
    assert client.post("/webhook", data=body, headers=headers).status_code == 200


def test_form_encoded_delivery_is_applied(client, db):
    body = urlencode({"payload": json.dumps(OPENED)}).encode()
    headers = github_headers(body, "pull_request", content_type="application/x-www-form-urlencoded")
    response = client.post("/webhook", data=body, headers=headers)
    assert (response.status_code, response.get_json()["outcome"]) == (200, "applied")
    assert len(rows(db, pull_requests)) == 1


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"n": NaN}', b'{"a": 1} {"b": 2}'])
def test_body_that_is_not_a_json_object_is_400(client, db, body):
    response = client.post("/webhook", data=body, headers=github_headers(body, "pull_request"))
    assert response.status_code == 400
    assert rows(db, webhook_deliveries) == []


def test_redelivery_is_a_duplicate_and_changes_nothing(deliver, db):
    assert deliver(OPENED, "pull_request", delivery="same").get_json()["outcome"] == "applied"
    before = rows(db, pull_requests, "version", "processed", "updated_at")
    response = deliver(OPENED, "pull_request", delivery="same")
    assert (response.status_code, response.get_json()["outcome"]) == (200, "duplicate")
    assert rows(db, pull_requests, "version", "processed", "updated_at") == before


def test_same_delivery_id_from_another_hook_is_applied(deliver, db):
    deliver(OPENED, "pull_request", delivery="same", hook_id="1")
    response = deliver(OPENED, "pull_request", delivery="same", hook_id="2")
    assert response.get_json()["outcome"] == "applied"
    assert len(rows(db, webhook_deliveries)) == 2


def test_older_snapshot_is_stale(deliver, db):
    deliver(load_payload("pull_request/closed.payload.json"), "pull_request")
    response = deliver(OPENED, "pull_request")
    assert (response.status_code, response.get_json()["outcome"]) == (200, "stale")
    assert rows(db, pull_requests, "state") == [{"state": "closed"}]


def test_payload_that_cannot_be_mapped_is_202_failed_and_journaled(deliver, db):
    broken = dict(OPENED, pull_request={"number": "two"})
    response = deliver(broken, "pull_request", delivery="bad-1")
    assert (response.status_code, response.get_json()["outcome"]) == (202, "failed")
    (entry,) = rows(db, webhook_deliveries, "delivery_id", "outcome", "error", "body")
    assert entry["outcome"] == "failed" and "pull_request" in entry["error"]
    assert json.loads(bytes(entry["body"])) == broken
    # The service keeps serving.
    assert deliver(OPENED, "pull_request").get_json()["outcome"] == "applied"


def test_errors_carry_no_stack_trace(client, db):
    response = client.post("/webhook", data=b"{}", headers={"X-Hub-Signature-256": "sha256=00"})
    assert response.status_code == 401
    assert "Traceback" not in response.get_data(as_text=True)


@pytest.mark.parametrize("hook_id", ["\u00b2", "1\u00b9", "12a", "-1", "1" * 19])
def test_a_hook_id_that_is_not_ascii_digits_is_400(client, db, hook_id):
    # "²".isdigit() is true and int("²") raises: this was a 500.
    body = json.dumps(OPENED).encode()
    response = client.post("/webhook", data=body, headers=github_headers(body, "pull_request", hook_id=hook_id))
    assert response.status_code == 400
    assert response.get_json() == {"error": "malformed X-GitHub-* header"}
    assert rows(db, webhook_deliveries) == []


@pytest.mark.parametrize(
    "header",
    [
        {"delivery": "livraison-\u00e9"},
        # What a WSGI server hands over for UTF-8 bytes: each byte as a latin-1 character.
        {"delivery": "livraison-\u00c3\u00a9"},
        {"event": "pull_r\u00e9quest"},
    ],
)
def test_a_github_header_that_is_not_ascii_is_400_not_stored_mangled(client, db, header):
    body = json.dumps(OPENED).encode()
    event = header.get("event", "pull_request")
    response = client.post("/webhook", data=body, headers=github_headers(body, event, delivery=header.get("delivery")))
    assert response.status_code == 400
    assert response.get_json() == {"error": "malformed X-GitHub-* header"}
    assert rows(db, webhook_deliveries) == []


def test_get_on_webhook_is_405_and_names_the_allowed_methods(client):
    response = client.get("/webhook")
    assert response.status_code == 405
    assert {method.strip() for method in response.headers["Allow"].split(",")} == {"POST", "OPTIONS"}
    assert response.is_json and "error" in response.get_json()


class CountingStream(io.BytesIO):
    """A request body that counts how often the app reads it."""

    reads = 0

    def read(self, size=-1, /):
        self.reads += 1
        return super().read(size)

    def readinto(self, buffer, /):
        self.reads += 1
        return super().readinto(buffer)


def test_a_request_without_a_signature_is_refused_before_its_body_is_read(client, db):
    body = json.dumps(OPENED).encode()
    headers = github_headers(body, "pull_request")
    del headers["X-Hub-Signature-256"]
    stream = CountingStream(body)
    response = client.post("/webhook", input_stream=stream, headers=headers)
    assert response.status_code == 401
    assert stream.reads == 0


def post_chunked(client, body: bytes, headers: dict[str, str]):
    """POST a body of unknown length, as gunicorn passes a chunked one (`wsgi.input_terminated`)."""
    return client.post(
        "/webhook",
        input_stream=io.BytesIO(body),
        headers={**headers, "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )


def signature_failures(client) -> float:
    """flowlens_signature_failures_total, every reason summed."""
    text = client.get("/metrics").get_data(as_text=True)
    reasons = ("missing", "unsupported_algorithm", "mismatch")
    return sum(sample(text, "flowlens_signature_failures_total", reason=r) or 0 for r in reasons)


def test_a_signed_chunked_body_over_the_limit_is_413_not_a_signature_failure(db, database_url, tmp_path):
    body = json.dumps(OPENED).encode()
    app = create_app(make_settings(database_url, tmp_path, max_body_bytes=len(body) - 1))
    client = app.test_client()
    failures = signature_failures(client)
    response = post_chunked(client, body, github_headers(body, "pull_request"))
    assert response.status_code == 413 and response.is_json
    assert signature_failures(client) == failures
    assert rows(db, webhook_deliveries) == []


def test_a_signed_chunked_body_of_exactly_the_limit_is_applied(db, database_url, tmp_path):
    body = json.dumps(OPENED).encode()
    app = create_app(make_settings(database_url, tmp_path, max_body_bytes=len(body)))
    response = post_chunked(app.test_client(), body, github_headers(body, "pull_request"))
    assert (response.status_code, response.get_json()["outcome"]) == (200, "applied")


def test_a_signed_chunked_body_is_applied_from_its_exact_bytes(client, db):
    # Spread over many of the verifier's chunks, and beyond what it keeps in memory.
    body = json.dumps(dict(OPENED, padding="\u00e9" * 1_500_000)).encode()
    response = post_chunked(client, body, github_headers(body, "pull_request", delivery="big-1"))
    assert (response.status_code, response.get_json()["outcome"]) == (200, "applied")
    (entry,) = rows(db, webhook_deliveries, "payload_sha256")
    assert entry["payload_sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("signed", [True, False])
def test_a_body_the_temporary_folder_cannot_take_is_a_503_in_one_line(
    client, db, tmp_path, monkeypatch, caplog, signed
):
    # Past 1 MiB a body goes through a temporary file; TMPDIR gone (full, failing) is this server's
    # trouble: a 503 GitHub retries, one log line, no traceback, and the service goes on.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
    payload = load_payload("pull_request/opened.payload.json")
    payload["pull_request"]["body"] = "x" * (2 * 1024 * 1024)
    body = json.dumps(payload).encode()
    headers = github_headers(body, "pull_request")
    if not signed:
        headers["X-Hub-Signature-256"] = "sha256=" + "0" * 64
    response = client.post("/webhook", data=body, headers=headers)
    assert (response.status_code, response.headers.get("Retry-After")) == (503, "30")
    (line,) = [r for r in caplog.records if r.getMessage() == "request body not kept"]
    assert line.exc_info is None and "FileNotFoundError" in line.__dict__["error"]
    assert rows(db, webhook_deliveries) == []
    monkeypatch.undo()
    assert client.post("/webhook", data=body, headers=github_headers(body, "pull_request")).status_code == 200


def test_options_on_webhook_names_the_methods_and_is_no_signature_failure(client):
    # The 405's Allow names OPTIONS: asking it is no unsigned delivery (and no alert's worth).
    failures = signature_failures(client)
    response = client.options("/webhook")
    assert response.status_code == 200
    assert {method.strip() for method in response.headers["Allow"].split(",")} == {"POST", "OPTIONS"}
    assert signature_failures(client) == failures


@pytest.mark.parametrize(
    "header",
    [{"event": "pull_request,pull_request"}, {"delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958,second"}],
    ids=["event-twice", "delivery-twice"],
)
def test_a_github_header_sent_twice_is_400_not_applied_as_another_event(client, db, header):
    # gunicorn joins a repeated header's values with a comma, which no event name or GUID holds.
    body = json.dumps(OPENED).encode()
    headers = github_headers(body, header.get("event", "pull_request"), delivery=header.get("delivery"))
    response = client.post("/webhook", data=body, headers=headers)
    assert response.status_code == 400
    assert response.get_json() == {"error": "malformed X-GitHub-* header"}
    assert rows(db, webhook_deliveries) == []


@pytest.mark.parametrize("sent", [100, -10], ids=["broke-off-mid-body", "ten-bytes-short"])
def test_a_body_shorter_than_its_content_length_is_400_not_a_signature_failure(client, db, sent):
    # gunicorn ends the body where the connection ended (`wsgi.input_terminated`): a body cut short
    # is the connection's trouble, neither a forged delivery (the alerts' signature failures) nor,
    # signed though it is, a complete message.
    body = json.dumps(OPENED).encode()
    headers = github_headers(body, "pull_request")
    failures = signature_failures(client)
    response = client.post(
        "/webhook",
        input_stream=io.BytesIO(body[:sent] if sent > 0 else body),
        headers=headers,
        # As gunicorn passes it: the Content-Length the client announced (the test client would count the stream).
        environ_overrides={
            "wsgi.input_terminated": True,
            "CONTENT_LENGTH": str(len(body) if sent > 0 else len(body) - sent),
        },
    )
    assert response.status_code == 400 and response.is_json
    assert "Content-Length" in response.get_json()["error"]
    assert signature_failures(client) == failures
    assert rows(db, webhook_deliveries) == []


def test_a_large_body_of_another_content_type_is_415_even_while_it_would_wait_its_turn(
    client, db, tmp_path, monkeypatch
):
    # Past its turn's wait a large body is spooled raw, unparsed: its content type, known from the
    # headers, is checked before that, not found by the drainer after a 202 (then set aside).
    monkeypatch.setattr("flowlens_ingest.web.webhook.LARGE_TURN_S", 0.0)
    body = json.dumps(dict(OPENED, padding="x" * (2 * 1024 * 1024))).encode()
    assert LARGE.take(len(body), 0.0)
    try:
        response = client.post(
            "/webhook", data=body, headers=github_headers(body, "pull_request", content_type="text/plain")
        )
    finally:
        LARGE.give_back()
    assert response.status_code == 415
    assert not list((tmp_path / "spool").glob("*.delivery"))
    assert rows(db, webhook_deliveries) == []
