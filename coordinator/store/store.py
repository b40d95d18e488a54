"""The coordinator's durable store: Store, one interface over SQLite and PostgreSQL, made of a
repository per aggregate (nodes, leases, submissions, groups, validations, windows, ledger, run,
reads) over one Database, with a Writer that group-commits the node path's writes.

Every public method is one transaction, and the store is safe to call from many threads at once
(the service calls it from a thread pool). Times are Unix milliseconds passed in by the caller."""

from __future__ import annotations

from coordinator.store.database import Database, create_database
from coordinator.store.groups import GroupRepository
from coordinator.store.leadership import HousekeepingLock
from coordinator.store.leases import LeaseFactory, LeaseRepository, LeaseRequest
from coordinator.store.ledger import LedgerRepository
from coordinator.store.migrate import upgrade_to_head
from coordinator.store.nodes import NodeRepository
from coordinator.store.nonces import NonceRepository
from coordinator.store.reads import ReadRepository
from coordinator.store.records import LeaseRecord, NewSubmission, SubmissionOutcome, WalkAwayLimit
from coordinator.store.run import RunRepository
from coordinator.store.submissions import SubmissionRepository
from coordinator.store.validations import ValidationRepository
from coordinator.store.windows import WindowRepository
from coordinator.store.writer import Writer


def open_store(url: str, pool_size: int = 8, sqlite_synchronous: str = "NORMAL") -> Store:
    """Open (creating if needed) the store at url and migrate its schema to the newest revision.

    sqlite_synchronous: NORMAL (default) keeps every commit across a crash or kill -9 of the
    process; FULL also across power loss or an OS crash, at one fsync per commit (from well
    under a millisecond to several on a busy disk)."""
    if sqlite_synchronous not in ("NORMAL", "FULL"):
        raise ValueError(f"sqlite_synchronous is NORMAL or FULL, got {sqlite_synchronous!r}")
    database = create_database(url, pool_size, sqlite_synchronous)
    upgrade_to_head(database.write_engine)
    return Store(database)


class Store(
    NodeRepository,
    LeaseRepository,
    SubmissionRepository,
    GroupRepository,
    ValidationRepository,
    WindowRepository,
    LedgerRepository,
    NonceRepository,
    RunRepository,
    ReadRepository,
):
    """The store's interface: the repositories' methods, and the two writes that go through the
    writer. Open it with open_store(url)."""

    def __init__(self, database: Database) -> None:
        super().__init__(database)
        self._writer = Writer(database)
        self.housekeeping_lock = HousekeepingLock(database)

    @property
    def backend(self) -> str:
        return self.database.backend

    def close(self) -> None:
        """Commit the requests already queued, then close."""
        self._writer.close()
        self.housekeeping_lock.release()
        self.database.dispose()

    def issue_lease(
        self,
        node_id: str,
        now_ms: int,
        max_open_per_node: int,
        make_lease: LeaseFactory,
        *,
        policy_version: int | None = None,
        oldest_leasable_version: int = 0,
        walkaway_limit: WalkAwayLimit | None = None,
    ) -> LeaseRecord:
        """In one transaction: expire the leases past their deadline at now_ms (their prompts are
        requeued, and each counts as a walk-away of its node, judged by walkaway_limit), refuse if
        the node is cooling down (LeaseCooldownError) or holds max_open_per_node live leases, take
        the oldest requeued prompt set the node may take (keeping its lease number) or else the
        next lease number, build the lease with make_lease(lease_number, requeued prompts or None)
        and store it. A node may never take a set whose lease number it held before, and, when
        policy_version is given, a set only at the version of its last lease while that version is
        at least oldest_leasable_version."""
        return self._writer.commit(
            LeaseRequest(
                node_id, now_ms, max_open_per_node, make_lease, policy_version, oldest_leasable_version, walkaway_limit
            )
        )

    def record_submission(self, submission: NewSubmission) -> SubmissionOutcome:
        """Store a checked batch in one transaction: the submission and its receipt (which lists
        every verdict), its accepted groups with their (pending) credit, the verdicts of rejected
        rollouts (for the contributor's record), the accepted rollouts' content hashes,
        the node's counters, and the lease closed as submitted. Idempotent: a batch_hash stored
        before returns the stored receipt and changes nothing. Raises DuplicateRolloutError when a
        content hash is already stored (then nothing is written). Returns once committed."""
        if len(set(submission.rollout_hashes)) != len(submission.rollout_hashes):
            raise ValueError("a submission lists the same rollout content hash twice; reject the copies")
        return self._writer.commit(submission)
