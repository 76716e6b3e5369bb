"""memory.py: large bodies take turns, one at a time per process; small ones never wait."""

from __future__ import annotations

import threading

from flowlens_ingest import memory
from flowlens_ingest.memory import LARGE_BYTES, LargeBodies

from .helpers import wait_for


def test_a_small_body_needs_no_turn():
    turns = LargeBodies()
    assert turns.take(LARGE_BYTES, 0) is None
    assert turns.take_if_free(1000) is None


def test_one_large_body_at_a_time_the_next_after_it():
    turns = LargeBodies()
    assert turns.take(LARGE_BYTES + 1, 0) is True
    # Held: another large body waits its bounded time, then hears no.
    assert turns.take(LARGE_BYTES + 1, 0.01) is False
    assert turns.take_if_free(LARGE_BYTES + 1) is False
    turns.give_back()
    assert turns.take(LARGE_BYTES + 1, 0) is True
    turns.give_back()


def test_a_waiting_request_comes_before_the_drainer():
    turns = LargeBodies()
    assert turns.take(LARGE_BYTES + 1, 0) is True
    got: list[bool | None] = []
    waiter = threading.Thread(target=lambda: got.append(turns.take(LARGE_BYTES + 1, 60)))
    waiter.start()
    # While a request waits, the drainer never takes the turn, even as it is given back.
    wait_for(lambda: turns._waiting, "the request to wait for its turn")
    assert turns.take_if_free(LARGE_BYTES + 1) is False
    turns.give_back()
    waiter.join(10)
    assert got == [True]
    assert turns.take_if_free(LARGE_BYTES + 1) is False
    turns.give_back()
    assert turns.take_if_free(LARGE_BYTES + 1) is True
    turns.give_back()


def test_a_turn_ending_heavy_says_so_and_light_does_not():
    turns = LargeBodies()
    heavy: list[int] = []
    turns.when_heavy = lambda: heavy.append(1)
    turns.heavy_bytes = 1
    assert turns.take(LARGE_BYTES + 1, 0)
    turns.give_back()
    turns.heavy_bytes = 1 << 50
    assert turns.take(LARGE_BYTES + 1, 0)
    turns.give_back()
    assert heavy == [1]


def test_resident_memory_is_read():
    assert memory.resident_bytes() > 1024 * 1024
