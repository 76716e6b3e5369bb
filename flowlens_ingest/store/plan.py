"""A delivery's changes as the statements of its one transaction, journal last. Plain data, no driver.

Generic over the row kinds statements.KINDS declares: the repository first (the
per-repository lock), each row's upsert, the pipeline rows an event names, each
distinct refresh once, then the journal, whose RETURNING is the outcome.
"""

from __future__ import annotations

import gzip
import uuid
from typing import Any

from flowlens_ingest.events.delivery import Delivery
from flowlens_ingest.events.enums import BodyEncoding, Outcome
from flowlens_ingest.events.rows import Changes, digest, field_names
from flowlens_ingest.store import statements as s
from flowlens_ingest.store.batch import Statement
from flowlens_ingest.store.derived import pipeline_if_missing
from flowlens_ingest.store.expressions import Builder, StaleTest
from flowlens_ingest.store.journal import bucket_of, journal


def row_values(row: Any, **extra: Any) -> dict[str, Any]:
    """A row dataclass's fields (and `extra`) as a statement's values."""
    # Shallow on purpose: dataclasses.asdict deep-copies every label and file list.
    values = {name: getattr(row, name) for name in field_names(type(row))}
    if extra:
        values.update(extra)
    return values


class Plan:
    """The statements that apply one delivery's changes, and how its journal entry decides stale."""

    def __init__(self, changes: Changes) -> None:
        self.statements: list[Statement] = []
        self.stale: StaleTest | None = None
        self.stale_params: dict[str, Any] = {}
        repo = changes.repository
        if repo is None:
            self.outcome = Outcome.IGNORED
            return
        self.outcome = Outcome.APPLIED
        rid = {"repo_github_id": repo.github_id}
        self.statements.append(
            Statement(s.repository_upsert, row_values(repo, id=uuid.uuid4(), digest=digest(repo)), (repo.deleted,))
        )
        refreshes: dict[tuple[str, tuple[tuple[str, Any], ...]], tuple[Builder, dict[str, Any]]] = {}
        for row in changes.rows:
            kind = s.KINDS[type(row)]
            values = row_values(row, id=uuid.uuid4(), repo_github_id=repo.github_id, digest=digest(row))
            self.statements.append(Statement(kind.upsert, values, kind.variant(row)))
            if kind.stale is not None and self.stale is None:
                # The first row with a stale test speaks for the delivery.
                self.stale, self.stale_params = kind.stale, values
            if kind.refresh is not None:
                builder, key = kind.refresh(row)
                refreshes[(builder.__name__, tuple(sorted(key.items())))] = builder, key
        # Rows first, then missing pipeline rows (born with the right statuses), then
        # the existing rows they touch, in a fixed order.
        for number, sha in sorted(set(changes.pr_heads)):
            self.statements.append(
                Statement(pipeline_if_missing, {"id": uuid.uuid4(), "pr_number": number, "commit_sha": sha, **rid})
            )
        for _, (builder, key) in sorted(refreshes.items()):
            self.statements.append(Statement(builder, {**key, **rid}))
        self.stale_params = {**self.stale_params, **rid}

    def journal(
        self,
        delivery: Delivery,
        *,
        error: str | None = None,
        store_payload: bool = True,
        replay: bool = False,
        compress: bool = False,
    ) -> Statement:
        """The journal upsert of the delivery; its RETURNING gives the final outcome."""
        stale = None if error is not None else self.stale
        return journal_entry(
            delivery,
            Outcome.FAILED if error is not None else self.outcome,
            stale=stale,
            stale_params=self.stale_params if stale is not None else {},
            error=error,
            store_payload=store_payload,
            replay=replay,
            compress=compress,
        )


def failed_journal_entry(delivery: Delivery, error: str, *, compress: bool = False) -> Statement:
    """The journal upsert of a delivery that could not be applied: outcome failed, body kept for a replay."""
    return journal_entry(delivery, Outcome.FAILED, error=error, compress=compress)


def journal_entry(
    delivery: Delivery,
    outcome: Outcome,
    *,
    stale: StaleTest | None = None,
    stale_params: dict[str, Any] | None = None,
    error: str | None = None,
    store_payload: bool = True,
    replay: bool = False,
    compress: bool = False,
) -> Statement:
    """The journal upsert of a delivery with this outcome, unless `stale` (with its values) says stale."""
    body, encoding = None, BodyEncoding.IDENTITY
    if store_payload or outcome is Outcome.FAILED:
        body, encoding = encode_body(delivery.body, compress)
    return Statement(
        journal,
        {
            **(stale_params or {}),
            "outcome": outcome.value,
            "delivery_id": delivery.delivery_id,
            "bucket": bucket_of(delivery.delivery_id),
            "hook_id": delivery.hook_id,
            "event": delivery.event,
            "action": delivery.action,
            "repository_github_id": delivery.repository_github_id,
            "payload_sha256": delivery.payload_sha256,
            "body": body,
            "body_encoding": encoding.value,
            "content_type": delivery.content_type,
            "body_from_api": delivery.body_from_api,
            "received_at": delivery.received_at,
            "error": error,
            "applied": outcome is not Outcome.FAILED,
        },
        (stale, replay),
    )


def encode_body(body: bytes, compress: bool) -> tuple[bytes, BodyEncoding]:
    """The journal's form of a body: as is, or gzip-compressed (FLOWLENS_JOURNAL_COMPRESSION)."""
    if compress:
        return gzip.compress(body, compresslevel=1, mtime=0), BodyEncoding.GZIP
    return body, BodyEncoding.IDENTITY


def decode_body(stored: bytes, encoding: str) -> bytes:
    """The exact bytes a journal entry holds."""
    return gzip.decompress(stored) if encoding == BodyEncoding.GZIP else stored
