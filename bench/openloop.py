"""An open-loop load: deliveries sent on a fixed schedule, whatever the answers, as GitHub sends them.

A closed loop (wrk, a pool of clients that each wait for their answer) slows down
with the service and hides a queue growing in front of it. Here request `i` is due
at `start + i / rate` and is sent then, on its own connection, however many are
still waiting for their answer; its time is counted from when it was due, so a
sender that falls behind counts against the service, never for it.

One asyncio loop in one thread holds every connection (hundreds at once during a
hang cost no thread each). Used by tests/test_hung_database.py and bench/hang.py.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# The service's answers are a few hundred bytes of JSON; anything longer is not read further.
MAX_ANSWER_BYTES = 65536


@dataclass(frozen=True)
class Delivery:
    """One signed delivery to send: its id, body and headers (`X-GitHub-*`, signature, content type)."""

    delivery_id: str
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class Answer:
    """What became of one scheduled delivery."""

    delivery_id: str
    # Seconds after the load's start at which it was due, at which the sender got to it (late
    # when the sender itself is starved of CPU), and at which its answer was complete (None:
    # no answer within the timeout, or the connection failed).
    due_s: float
    sent_s: float
    answered_s: float | None
    status: int | None
    outcome: str | None

    @property
    def took_s(self) -> float | None:
        """Seconds from when it was due to its whole answer (None when it got none)."""
        return None if self.answered_s is None else self.answered_s - self.due_s


@dataclass
class Schedule:
    """What to send, how fast, and what to do (a fault) just before a given request is due."""

    deliveries: Sequence[Delivery]
    rate: float
    # Called in the sending loop just before delivery `index` is sent (freeze, heal): quick calls only.
    before: dict[int, Callable[[], None]] = field(default_factory=dict)


def run(host: str, port: int, schedule: Schedule, *, timeout_s: float = 30.0) -> list[Answer]:
    """Send every delivery of `schedule` on time to http://host:port/webhook; their answers, in order sent.

    Each request has `timeout_s` for its whole exchange; the call returns once every
    one is answered or timed out (at most the schedule's length plus `timeout_s`).
    """
    return asyncio.run(_run(host, port, schedule, timeout_s))


async def _run(host: str, port: int, schedule: Schedule, timeout_s: float) -> list[Answer]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for index, delivery in enumerate(schedule.deliveries):
        due = index / schedule.rate
        wait = start + due - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        action = schedule.before.get(index)
        if action is not None:
            action()
        tasks.append(asyncio.create_task(_one(host, port, delivery, start, due, timeout_s)))
    return list(await asyncio.gather(*tasks))


async def _one(host: str, port: int, delivery: Delivery, start: float, due: float, timeout_s: float) -> Answer:
    loop = asyncio.get_running_loop()
    sent = loop.time() - start
    head = ["POST /webhook HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(delivery.body)}"]
    head += [f"{name}: {value}" for name, value in delivery.headers.items()]
    request = ("\r\n".join([*head, "Connection: close", "", ""])).encode("latin-1") + delivery.body
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(request)
                await writer.drain()
                # Connection: close: the whole answer is what arrives before the server closes.
                response = b""
                while len(response) <= MAX_ANSWER_BYTES:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    response += chunk
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return Answer(delivery.delivery_id, due, sent, None, None, None)
    answered = loop.time() - start
    status, outcome = _parse(response)
    return Answer(delivery.delivery_id, due, sent, answered if status is not None else None, status, outcome)


def _parse(response: bytes) -> tuple[int | None, str | None]:
    """The status code and the JSON `outcome` of a whole HTTP/1.1 answer (None for what is not there)."""
    head, _, body = response.partition(b"\r\n\r\n")
    words = head.split(b"\r\n", 1)[0].split()
    if len(words) < 2 or not words[1].isdigit():
        return None, None
    try:
        answer = json.loads(body)
    except ValueError:
        return int(words[1]), None
    outcome = answer.get("outcome") if isinstance(answer, dict) else None
    return int(words[1]), outcome if isinstance(outcome, str) else None


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of `values` (fraction 0.5: the median; 0.99: p99); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summary(answers: Sequence[Answer]) -> dict[str, float | int]:
    """How many were answered 2xx, their answer times (from when due): p50, p99, max, and the sender's worst lag."""
    times = [a.took_s for a in answers if a.took_s is not None and a.status is not None and 200 <= a.status < 300]
    return {
        "sent": len(answers),
        "answered_2xx": len(times),
        "p50_s": round(percentile(times, 0.5), 3),
        "p99_s": round(percentile(times, 0.99), 3),
        "max_s": round(max(times), 3) if times else math.nan,
        "sender_lag_max_s": round(max((a.sent_s - a.due_s for a in answers), default=0.0), 3),
    }
