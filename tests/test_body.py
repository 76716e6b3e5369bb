"""web/signed_body.py: the body read in chunks through the signature check agrees with signature.verify, byte for byte."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowlens_ingest.events import signature
from flowlens_ingest.events.signature import StreamingVerifier
from flowlens_ingest.web.signed_body import CHUNK_BYTES, MEMORY_BYTES, read_signed, size_of

from .helpers import examples

# GitHub's published example: https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries
VECTOR_SECRET = b"It's a Secret to Everybody"
VECTOR_BODY = b"Hello, World!"
VECTOR_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def reason(check) -> str | None:
    """The SignatureError reason `check()` raises, or None when it passes."""
    try:
        check()
    except signature.SignatureError as exc:
        return exc.reason
    return None


def streamed(body: bytes, header: str | None, secrets: list[bytes], size: int) -> None:
    """Verify `body` fed in pieces of `size` bytes."""
    verifier = StreamingVerifier(header, secrets)
    for start in range(0, len(body), size):
        verifier.update(body[start : start + size])
    verifier.verify()


@pytest.mark.parametrize("size", [1, 5, 13, CHUNK_BYTES])
def test_githubs_published_vector_passes_in_any_chunking(size):
    streamed(VECTOR_BODY, VECTOR_SIGNATURE, [VECTOR_SECRET], size)
    assert reason(lambda: streamed(VECTOR_BODY + b" ", VECTOR_SIGNATURE, [VECTOR_SECRET], size)) == "mismatch"


def test_read_signed_returns_githubs_vector_body():
    with read_signed(io.BytesIO(VECTOR_BODY).read, VECTOR_SIGNATURE, [b"other secret", VECTOR_SECRET]) as spooled:
        assert spooled.read() == VECTOR_BODY


def header_for(body: bytes, secret: bytes) -> st.SearchStrategy[str | None]:
    """Headers a sender might send for `body`: right, wrong, malformed, absent, sha1."""
    right = signature.sign(body, secret)
    return st.sampled_from(
        [
            right,
            right.upper().replace("SHA256=", "sha256="),
            right + " ",
            right[:-1],
            signature.sign(body + b"x", secret),
            "sha1=" + "0" * 40,
            "sha256=",
            "sha256=zz\u00e9",
            "",
            None,
        ]
    )


@settings(max_examples=examples(500))
@given(
    body=st.binary(max_size=3000),
    secrets=st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=3),
    signer=st.integers(0, 2),
    size=st.integers(1, 700),
    data=st.data(),
)
def test_streaming_agrees_with_signature_verify(body, secrets, signer, size, data):
    secret = secrets[signer % len(secrets)] if signer < 2 else b"a secret nobody holds"
    header = data.draw(header_for(body, secret))
    expected = reason(lambda: signature.verify(body, header, secrets))
    assert reason(lambda: streamed(body, header, secrets, size)) == expected
    assert reason(lambda: read_signed(io.BytesIO(body).read, header, secrets).close()) == expected


@pytest.mark.parametrize(("header", "expected"), [(None, "missing"), ("sha1=" + "0" * 40, "unsupported_algorithm")])
def test_a_missing_or_unsupported_header_is_refused_before_reading(header, expected):
    def read(_size: int) -> bytes:
        raise AssertionError("the body was read")

    assert reason(lambda: read_signed(read, header, [VECTOR_SECRET])) == expected


def test_a_signed_body_larger_than_the_memory_part_comes_back_exact():
    body = bytes(range(256)) * (3 * MEMORY_BYTES // 256 + 7)
    spooled = read_signed(io.BytesIO(body).read, signature.sign(body, VECTOR_SECRET), [VECTOR_SECRET])
    with spooled:
        assert spooled.read() == body


def test_what_the_reader_raises_goes_through():
    class TooLarge(Exception):
        pass

    pieces = [b"{", b"}"]

    def read(_size: int) -> bytes:
        if pieces:
            return pieces.pop(0)
        raise TooLarge  # as Werkzeug's stream does past the limit

    with pytest.raises(TooLarge):
        read_signed(read, signature.sign(b"{}", VECTOR_SECRET), [VECTOR_SECRET])


@pytest.mark.parametrize("length", [0, 13, MEMORY_BYTES, MEMORY_BYTES + 1, 3 * MEMORY_BYTES])
def test_the_size_of_a_signed_body_is_known_without_reading_it_back(length):
    # What decides whether a delivery needs a large body's turn (memory.py) before it is read.
    body = b"x" * length
    spooled = read_signed(io.BytesIO(body).read, signature.sign(body, b"s"), [b"s"])
    try:
        assert size_of(spooled) == length
        # Left rewound: the view then reads exactly the signed bytes.
        assert spooled.read() == body
        # On disk past MEMORY_BYTES: a large body waits for its turn there, not in memory.
        assert spooled._rolled is (length > MEMORY_BYTES)  # type: ignore[attr-defined]
    finally:
        spooled.close()
