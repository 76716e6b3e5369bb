"""The HTTP contract of /webhook, through Flask's test client on a real database."""

import json
from urllib.parse import urlencode

import pytest

from flowlens_ingest.app import create_app
from flowlens_ingest.schema import pull_requests, repositories, webhook_deliveries
from flowlens_ingest.signature import sign

from .helpers import PREVIOUS_SECRET, SECRET, github_headers, load_payload, make_settings, rows

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


def test_other_content_type_is_415(client, db):
    body = json.dumps(OPENED).encode()
    headers = github_headers(body, "pull_request", content_type="text/plain")
    assert client.post("/webhook", data=body, headers=headers).status_code == 415


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
