import pytest

from flowlens_ingest.events.signature import SignatureError, sign, verify

# https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries#testing-the-webhook-payload-validation
GITHUB_VECTOR = {
    "secret": b"It's a Secret to Everybody",
    "body": b"Hello, World!",
    "signature": "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
}


def test_github_published_vector_signs_and_verifies():
    assert sign(GITHUB_VECTOR["body"], GITHUB_VECTOR["secret"]) == GITHUB_VECTOR["signature"]
    verify(GITHUB_VECTOR["body"], GITHUB_VECTOR["signature"], [GITHUB_VECTOR["secret"]])


def test_either_secret_of_a_rotation_is_accepted():
    body = b'{"zen": "Keep it logically awesome."}'
    verify(body, sign(body, b"old"), [b"new", b"old"])
    verify(body, sign(body, b"new"), [b"new", b"old"])


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing"),
        ("", "missing"),
        ("sha1=0123456789abcdef0123456789abcdef01234567", "unsupported_algorithm"),
        ("757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17", "unsupported_algorithm"),
        ("sha256=" + "0" * 64, "mismatch"),
        ("sha256=not-hex-\u00e9", "mismatch"),
    ],
)
def test_bad_signatures_are_refused_with_a_reason(header, reason):
    with pytest.raises(SignatureError) as caught:
        verify(GITHUB_VECTOR["body"], header, [GITHUB_VECTOR["secret"]])
    assert caught.value.reason == reason


def test_signature_covers_the_raw_bytes_not_the_json_value():
    signed = b'{"a": 1, "b": 2}'
    same_json_other_bytes = b'{"b": 2, "a": 1}'
    with pytest.raises(SignatureError):
        verify(same_json_other_bytes, sign(signed, b"s"), [b"s"])


def test_no_secret_configured_accepts_nothing():
    with pytest.raises(SignatureError):
        verify(b"x", sign(b"x", b""), [])
