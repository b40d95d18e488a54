"""Submissions: storing checked batches (in the writer's transactions) with everything they bring
(receipt, accepted groups and their pending credit, bounded verdicts of rejected rollouts,
rollout content hashes, node counters, the lease closed as submitted), and reading them back."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, select
from sqlalchemy.exc import IntegrityError

from coordinator.store.database import Database, Repository
from coordinator.store.records import (
    DuplicateRolloutError,
    NewSubmission,
    SubmissionOutcome,
    SubmissionRecord,
    UnknownNodeError,
)
from coordinator.store.statements import (
    CLOSE_SUBMITTED_LEASE,
    INSERT_CONTRIBUTIONS,
    INSERT_GROUPS,
    INSERT_ROLLOUT_HASHES,
    INSERT_SUBMISSIONS,
    INSERT_VERDICTS,
    NODES,
    SELECT_RECEIPT,
    SELECT_RECEIPTS,
    SELECT_SEEN_HASHES,
    SUBMISSIONS,
    UPDATE_NODE_COUNTS,
)

# What one submission leaves in the verdicts table is bounded whatever the batch holds: the counts
# of accepted and rejected rollouts stay exact, the rows of rejected ones (the contributor's
# record) are the first few, with their message and evidence capped.
MAX_STORED_REJECTIONS_PER_SUBMISSION = 4
MAX_STORED_MESSAGE_CHARS = 256
MAX_STORED_EVIDENCE_CHARS = 4096


def _bounded_evidence(evidence_json: str) -> str:
    """The evidence, or a JSON note of its size when it is longer than MAX_STORED_EVIDENCE_CHARS."""
    if len(evidence_json) <= MAX_STORED_EVIDENCE_CHARS:
        return evidence_json
    return f'{{"truncated": true, "num_chars": {len(evidence_json)}}}'


def record_alone(database: Database, submission: NewSubmission) -> SubmissionOutcome | DuplicateRolloutError:
    """record_submissions for one submission, in a transaction of its own."""
    try:
        with database.write() as connection:
            return record_submissions(connection, [submission])[0]
    except IntegrityError:
        # A concurrent transaction (PostgreSQL) stored the same batch or rollout first, or
        # the node is unknown.
        with database.read() as connection:
            node = connection.execute(select(NODES.c.node_id).where(NODES.c.node_id == submission.node_id))
            if node.first() is None:
                raise UnknownNodeError(f"node {submission.node_id} is not registered") from None
            outcome = _stored_before(connection, submission)
        if outcome is None:
            raise
        return outcome


def record_submissions(
    connection: Connection, submissions: Sequence[NewSubmission]
) -> list[SubmissionOutcome | DuplicateRolloutError]:
    """Store.record_submission for each submission in turn, in one transaction: an outcome, or the
    DuplicateRolloutError of a submission that wrote nothing."""
    # Hashes before receipts, as in _stored_before: under READ COMMITTED a concurrent commit of
    # the same batch whose hashes this sees has made its receipt visible to the next statement.
    seen = seen_rollout_hashes(connection, [h for s in submissions for h in s.rollout_hashes])
    receipts = {
        bytes(batch_hash): bytes(receipt)
        for batch_hash, receipt in connection.execute(
            SELECT_RECEIPTS, {"batch_hashes": [submission.batch_hash for submission in submissions]}
        )
    }
    results: list[SubmissionOutcome | DuplicateRolloutError] = []
    new = []
    for submission in submissions:
        stored = receipts.get(submission.batch_hash)
        if stored is not None:
            results.append(SubmissionOutcome(receipt=stored, newly_stored=False))
            continue
        copied = seen.intersection(submission.rollout_hashes)
        if copied:
            results.append(DuplicateRolloutError(frozenset(copied)))
            continue
        receipts[submission.batch_hash] = submission.receipt
        seen.update(submission.rollout_hashes)
        new.append(submission)
        results.append(SubmissionOutcome(receipt=submission.receipt, newly_stored=True))
    if new:
        _insert_submissions(connection, new)
    return results


def _stored_before(connection: Connection, submission: NewSubmission) -> SubmissionOutcome | None:
    """The stored receipt when this batch is stored; DuplicateRolloutError when some of its
    rollouts are; None when neither. Hashes are read before the receipt: under READ
    COMMITTED, a concurrent commit of this very batch that made the hashes visible has made
    its receipt visible too."""
    seen = seen_rollout_hashes(connection, submission.rollout_hashes)
    stored = stored_receipt(connection, submission.batch_hash)
    if stored is not None:
        return SubmissionOutcome(receipt=stored, newly_stored=False)
    if seen:
        raise DuplicateRolloutError(frozenset(seen))
    return None


def _insert_submissions(connection: Connection, submissions: Sequence[NewSubmission]) -> None:
    """Insert new submissions with everything they bring, a few statements for all of them."""
    num_accepted = [sum(verdict.accepted for verdict in submission.verdicts) for submission in submissions]
    inserted_ids = connection.execute(
        INSERT_SUBMISSIONS,
        [
            {
                "batch_hash": submission.batch_hash,
                "lease_id": submission.lease_id,
                "node_id": submission.node_id,
                "created_ms": submission.created_ms,
                "receipt": submission.receipt,
                "num_accepted": accepted,
                "num_rejected": len(submission.verdicts) - accepted,
            }
            for submission, accepted in zip(submissions, num_accepted, strict=True)
        ],
    ).scalars()
    submission_ids = {
        submission.batch_hash: submission_id
        for submission, submission_id in zip(submissions, inserted_ids, strict=True)
    }
    groups = [(submission, group) for submission in submissions for group in submission.groups]
    if groups:
        connection.execute(
            INSERT_GROUPS,
            [
                {
                    "group_id": group.group_id,
                    "submission_id": submission_ids[submission.batch_hash],
                    "lease_id": submission.lease_id,
                    "node_id": submission.node_id,
                    "prompt_index": group.prompt_index,
                    "policy_version": group.policy_version,
                    "group_bytes": group.group_bytes,
                    "num_tokens": group.num_tokens,
                    "num_rollouts": group.num_rollouts,
                    "state": group.state.value,
                    "verified": False,
                    "created_ms": submission.created_ms,
                    "updated_ms": submission.created_ms,
                }
                for submission, group in groups
            ],
        )
        connection.execute(
            INSERT_CONTRIBUTIONS,
            [
                {
                    "node_id": submission.node_id,
                    "group_id": group.group_id,
                    "num_tokens": group.num_tokens,
                    "num_rollouts": group.num_rollouts,
                    "flops_estimate": group.flops_estimate,
                    "created_ms": submission.created_ms,
                    "settled": False,
                    "voided": False,
                }
                for submission, group in groups
            ],
        )
    verdicts = [
        {
            "submission_id": submission_ids[submission.batch_hash],
            "node_id": submission.node_id,
            "prompt_index": verdict.prompt_index,
            "sample_index": verdict.sample_index,
            "accepted": verdict.accepted,
            "reason": None if verdict.reason is None else verdict.reason.name,
            "message": verdict.message[:MAX_STORED_MESSAGE_CHARS],
            "evidence_json": _bounded_evidence(verdict.evidence_json),
            "created_ms": submission.created_ms,
        }
        for submission in submissions
        for verdict in [v for v in submission.verdicts if not v.accepted][:MAX_STORED_REJECTIONS_PER_SUBMISSION]
    ]
    if verdicts:
        connection.execute(INSERT_VERDICTS, verdicts)
    rollout_hashes = [
        {
            "content_hash": content_hash,
            "submission_id": submission_ids[submission.batch_hash],
            "created_ms": submission.created_ms,
        }
        for submission in submissions
        for content_hash in submission.rollout_hashes
    ]
    if rollout_hashes:
        connection.execute(INSERT_ROLLOUT_HASHES, rollout_hashes)
    counts: dict[str, tuple[int, int]] = {}
    for submission, accepted in zip(submissions, num_accepted, strict=True):
        node_accepted, node_rejected = counts.get(submission.node_id, (0, 0))
        counts[submission.node_id] = (node_accepted + accepted, node_rejected + len(submission.verdicts) - accepted)
    connection.execute(
        UPDATE_NODE_COUNTS,
        [
            {"counted_node_id": node_id, "num_newly_accepted": accepted, "num_newly_rejected": rejected}
            for node_id, (accepted, rejected) in sorted(counts.items())  # rows locked in one order
        ],
    )
    connection.execute(
        CLOSE_SUBMITTED_LEASE,
        [
            {
                "submitted_lease_id": submission.lease_id,
                "submitter_id": submission.node_id,
                "submitted_ms": submission.created_ms,
            }
            for submission in submissions
        ],
    )


def stored_receipt(connection: Connection, batch_hash: bytes) -> bytes | None:
    receipt = connection.execute(SELECT_RECEIPT, {"batch_hash": batch_hash}).scalar_one_or_none()
    return None if receipt is None else bytes(receipt)


def seen_rollout_hashes(connection: Connection, hashes: Sequence[bytes]) -> set[bytes]:
    if not hashes:
        return set()
    rows = connection.execute(SELECT_SEEN_HASHES, {"content_hashes": list(hashes)})
    return {bytes(content_hash) for (content_hash,) in rows}


class SubmissionRepository(Repository):
    """The stored submissions."""

    def get_receipt(self, batch_hash: bytes) -> bytes | None:
        with self.database.read_one() as connection:
            return stored_receipt(connection, batch_hash)

    def list_submissions(self, node_id: str, limit: int) -> list[SubmissionRecord]:
        """The node's newest submissions first."""
        with self.database.read() as connection:
            rows = connection.execute(
                select(SUBMISSIONS)
                .where(SUBMISSIONS.c.node_id == node_id)
                .order_by(SUBMISSIONS.c.id.desc())
                .limit(limit)
            )
            return [
                SubmissionRecord(
                    batch_hash=bytes(row.batch_hash),
                    lease_id=row.lease_id,
                    node_id=row.node_id,
                    created_ms=row.created_ms,
                    num_accepted=row.num_accepted,
                    num_rejected=row.num_rejected,
                )
                for row in rows
            ]
