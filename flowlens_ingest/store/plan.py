"""A delivery's changes as the bound statements of its one transaction, journal last.

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
from flowlens_ingest.events.rows import Changes, digest
from flowlens_ingest.store import statements as s
from flowlens_ingest.store.bytea import Bytea
from flowlens_ingest.store.derived import pipeline_if_missing
from flowlens_ingest.store.expressions import Builder, StaleTest
from flowlens_ingest.store.journal import bucket_of, journal
from flowlens_ingest.store.wire import Statement, compiled, params


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
        rid = {"p_repo_github_id": repo.github_id}
        self.statements.append(
            compiled(s.repository_upsert, repo.deleted).bind(params(repo, id=uuid.uuid4(), digest=digest(repo)))
        )
        refreshes: dict[tuple[str, tuple[tuple[str, Any], ...]], tuple[Builder, dict[str, Any]]] = {}
        for row in changes.rows:
            kind = s.KINDS[type(row)]
            values = params(row, id=uuid.uuid4(), repo_github_id=repo.github_id, digest=digest(row))
            self.statements.append(compiled(kind.upsert, *kind.variant(row)).bind(values))
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
                compiled(pipeline_if_missing).bind(
                    {"p_id": str(uuid.uuid4()), "p_pr_number": number, "p_commit_sha": sha, **rid}
                )
            )
        for _, (builder, key) in sorted(refreshes.items()):
            self.statements.append(compiled(builder).bind({**{f"p_{k}": v for k, v in key.items()}, **rid}))
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
        outcome = Outcome.FAILED if error is not None else self.outcome
        body, encoding = None, BodyEncoding.IDENTITY
        if store_payload or outcome is Outcome.FAILED:
            body, encoding = encode_body(delivery.body, compress)
        stale = None if error is not None else self.stale
        return compiled(journal, stale, replay).bind(
            {
                **(self.stale_params if stale is not None else {}),
                "p_outcome": outcome.value,
                "p_delivery_id": delivery.delivery_id,
                "p_bucket": bucket_of(delivery.delivery_id),
                "p_hook_id": delivery.hook_id,
                "p_event": delivery.event,
                "p_action": delivery.action,
                "p_repository_github_id": delivery.repository_github_id,
                "p_payload_sha256": delivery.payload_sha256,
                "p_body": None if body is None else Bytea(body),
                "p_body_encoding": encoding.value,
                "p_content_type": delivery.content_type,
                "p_body_from_api": delivery.body_from_api,
                "p_received_at": delivery.received_at,
                "p_error": error,
                "p_applied": outcome is not Outcome.FAILED,
            }
        )


FAILURE = Plan(Changes())


def encode_body(body: bytes, compress: bool) -> tuple[bytes, BodyEncoding]:
    """The journal's form of a body: as is, or gzip-compressed (FLOWLENS_JOURNAL_COMPRESSION)."""
    if compress:
        return gzip.compress(body, compresslevel=1, mtime=0), BodyEncoding.GZIP
    return body, BodyEncoding.IDENTITY


def decode_body(stored: bytes, encoding: str) -> bytes:
    """The exact bytes a journal entry holds."""
    return gzip.decompress(stored) if encoding == BodyEncoding.GZIP else stored
