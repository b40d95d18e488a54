"""The coordinator's durable store: one implementation over SQLAlchemy Core for SQLite (the
embedded default: WAL, one file) and PostgreSQL (postgresql+psycopg://).

Every public method is one transaction, and the store is safe to call from many threads at
once (the service calls it from a thread pool). Times are Unix milliseconds passed in by the
caller. On SQLite a write transaction starts with BEGIN IMMEDIATE, so writers queue on the
busy timeout instead of failing on a lock upgrade; readers run beside them (WAL).

Group commit (SQLite): the two writes on every node's path, record_submission and
issue_lease, go to one writer thread that commits all the requests queued while its previous
transaction ran in one transaction, each applied as if alone and in arrival order; a caller
returns when the transaction holding its request has committed. Should that transaction fail,
each of its requests is committed alone, so one bad request fails only itself.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import itertools
import logging
import queue
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Row,
    Table,
    and_,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    make_url,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DataError, IntegrityError

from coordinator.store import schema
from coordinator.store.migrate import upgrade_to_head
from coordinator.store.records import (
    GROUP_STATE_SOURCES,
    ChunkStats,
    ChunkWindow,
    ConsumeOutcome,
    Consumption,
    ContributionBucket,
    ContributionTotals,
    DuplicateRolloutError,
    GroupState,
    LeaseCapError,
    LeaseCooldownError,
    LeaseRecord,
    LeaseState,
    MetricsRecord,
    NewSubmission,
    NewValidation,
    NodeKeyMismatchError,
    NodeRecord,
    PolicyVersionRecord,
    RejectionRecord,
    RejectionSource,
    RequeuedPrompts,
    RunCounters,
    StoredGroup,
    SubmissionOutcome,
    SubmissionRecord,
    TokenStats,
    TokenWindow,
    UnknownLeaseError,
    UnknownNodeError,
    ValidationOutcome,
    ValidationResult,
    VersionExistsError,
    WalkAwayLimit,
    WorkTotals,
    reputation,
)
from protocol.types import Codec, SamplingParams

log = logging.getLogger(__name__)

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

SQLITE_FILE_NAME = "coordinator.sqlite3"
SQLITE_BUSY_TIMEOUT_MS = 30_000
_WRITE_OPTION = "rollproof_write"
_ONE_STATEMENT_OPTION = "rollproof_one_statement"

_nodes = schema.Node.__table__
_counters = schema.Counter.__table__
_leases = schema.Lease.__table__
_requeued = schema.RequeuedPromptSet.__table__
_submissions = schema.Submission.__table__
_groups = schema.Group.__table__
_consumptions = schema.GroupConsumption.__table__
_verdicts = schema.Verdict.__table__
_rollout_hashes = schema.RolloutHash.__table__
_validations = schema.ValidationRecord.__table__
_versions = schema.PolicyVersion.__table__
_metrics = schema.TrainerMetrics.__table__
_contributions = schema.Contribution.__table__
_node_chunks = schema.NodeChunk.__table__
_secrets = schema.CoordinatorSecret.__table__
_node_tokens = schema.NodeTokens.__table__

# make_lease(lease_number, requeued_prompt_indices or None for a fresh draw) -> the lease to store
LeaseFactory = Callable[[int, tuple[int, ...] | None], LeaseRecord]

MAX_GROUP_COMMIT = 512  # requests in one group-commit transaction at most
REQUEUED_LOOKAHEAD = 64  # requeued sets looked at past one per lease request, for those a node may not take
SECRET_BYTES = 32
_OPEN_UNTIL_BUILT = 2**63 - 1  # the deadline a lease granted in this transaction counts with

# Statements on the hot path, built once.
_SELECT_RECEIPTS = select(_submissions.c.batch_hash, _submissions.c.receipt).where(
    _submissions.c.batch_hash.in_(bindparam("batch_hashes", expanding=True))
)
_SELECT_RECEIPT = select(_submissions.c.receipt).where(_submissions.c.batch_hash == bindparam("batch_hash"))
_SELECT_SEEN_HASHES = select(_rollout_hashes.c.content_hash).where(
    _rollout_hashes.c.content_hash.in_(bindparam("content_hashes", expanding=True))
)
_SELECT_LEASE = select(_leases).where(_leases.c.lease_id == bindparam("lease_id"))
_SELECT_NODE = select(_nodes).where(_nodes.c.node_id == bindparam("node_id"))
_SELECT_OPEN_LEASE_DEADLINES = select(_leases.c.node_id, _leases.c.deadline_ms).where(
    _leases.c.node_id.in_(bindparam("node_ids", expanding=True)), _leases.c.state == LeaseState.OPEN.value
)
_LOCK_NODES = (
    select(_nodes.c.node_id, _nodes.c.lease_cooldown_until_ms)
    .where(_nodes.c.node_id.in_(bindparam("node_ids", expanding=True)))
    .order_by(_nodes.c.node_id)
    .with_for_update()
)
_EXPIRE_LEASES = (
    update(_leases)
    .where(_leases.c.state == LeaseState.OPEN.value, _leases.c.deadline_ms <= bindparam("expire_at_ms"))
    .values(state=LeaseState.EXPIRED.value, closed_ms=bindparam("expire_at_ms"))
    .returning(*_leases.c)
)
_TAKE_LEASE_NUMBERS = (
    update(_counters)
    .where(_counters.c.name == schema.LEASE_COUNTER)
    .values(value=_counters.c.value + bindparam("num_taken"))
    .returning(_counters.c.value)
)
_SELECT_OLDEST_REQUEUED = (
    select(_requeued).order_by(_requeued.c.id).limit(bindparam("num_wanted")).with_for_update(skip_locked=True)
)
# The oldest requeued sets with the policy version of the lease they come from, unlocked: a
# transaction locks only those it takes (_LOCK_REQUEUED), so others take the rest meanwhile.
_SELECT_REQUEUED_CANDIDATES = (
    select(_requeued.c.id, _requeued.c.lease_number, _requeued.c.prompt_indices, _leases.c.policy_version)
    .join(_leases, _leases.c.lease_id == _requeued.c.source_lease_id)
    .order_by(_requeued.c.id)
    .limit(bindparam("num_wanted"))
)
_LOCK_REQUEUED = (
    select(_requeued.c.id)
    .where(_requeued.c.id.in_(bindparam("requeued_ids", expanding=True)))
    .with_for_update(skip_locked=True)
)
_SELECT_HELD_LEASE_NUMBERS = select(_leases.c.node_id, _leases.c.lease_number).where(
    _leases.c.node_id.in_(bindparam("node_ids", expanding=True)),
    _leases.c.lease_number.in_(bindparam("lease_numbers", expanding=True)),
)
_DELETE_REQUEUED = delete(_requeued).where(_requeued.c.id.in_(bindparam("requeued_ids", expanding=True)))
_COUNT_GROUPS_IN_STATES = select(func.count()).where(_groups.c.state.in_(bindparam("states", expanding=True)))
_INSERT_LEASES = insert(_leases)
_INSERT_SUBMISSIONS = insert(_submissions).returning(_submissions.c.id, sort_by_parameter_order=True)
_INSERT_GROUPS = insert(_groups)
_INSERT_CONTRIBUTIONS = insert(_contributions)
_INSERT_VERDICTS = insert(_verdicts)
_INSERT_ROLLOUT_HASHES = insert(_rollout_hashes)
_UPDATE_NODE_COUNTS = (
    update(_nodes)
    .where(_nodes.c.node_id == bindparam("counted_node_id"))
    .values(
        num_rollouts_accepted=_nodes.c.num_rollouts_accepted + bindparam("num_newly_accepted"),
        num_rollouts_rejected=_nodes.c.num_rollouts_rejected + bindparam("num_newly_rejected"),
    )
)
_CLOSE_SUBMITTED_LEASE = (
    update(_leases)
    .where(
        _leases.c.lease_id == bindparam("submitted_lease_id"),
        _leases.c.node_id == bindparam("submitter_id"),
        _leases.c.state == LeaseState.OPEN.value,
    )
    .values(state=LeaseState.SUBMITTED.value, closed_ms=bindparam("submitted_ms"))
)


@dataclass(frozen=True)
class _LeaseRequest:
    node_id: str
    now_ms: int
    max_open_per_node: int
    make_lease: LeaseFactory
    policy_version: int | None
    oldest_leasable_version: int
    walkaway_limit: WalkAwayLimit | None

    def takes_version(self, version: int) -> bool:
        """Whether this request may take a requeued set whose last lease was at version: only at
        that version while it may still be leased, else at any."""
        return self.policy_version is None or version == self.policy_version or version < self.oldest_leasable_version


# A write request and its answer: the outcome, or the exception the caller raises.
_Request = NewSubmission | _LeaseRequest
_Answer = SubmissionOutcome | LeaseRecord | Exception


def sqlite_url(data_dir: Path) -> str:
    """The URL of the embedded store: one SQLite file in the coordinator's data directory."""
    return f"sqlite:///{Path(data_dir).expanduser().resolve() / SQLITE_FILE_NAME}"


def open_store(url: str, pool_size: int = 8, sqlite_synchronous: str = "NORMAL") -> Store:
    """Open (creating if needed) the store at url and migrate its schema to the newest revision.

    sqlite_synchronous: NORMAL (default) keeps every commit across a crash or kill -9 of the
    process; FULL also across power loss or an OS crash, at one fsync per commit (from well
    under a millisecond to several on a busy disk)."""
    if sqlite_synchronous not in ("NORMAL", "FULL"):
        raise ValueError(f"sqlite_synchronous is NORMAL or FULL, got {sqlite_synchronous!r}")
    store = Store(_create_engine(url, pool_size, sqlite_synchronous))
    upgrade_to_head(store._write_engine)
    return store


def _create_engine(url: str, pool_size: int, sqlite_synchronous: str) -> Engine:
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise ValueError(f"the store needs a SQLite file (sqlite:////path/to/{SQLITE_FILE_NAME}), got {url!r}")
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            pool_size=pool_size,
            max_overflow=2 * pool_size,
        )
        event.listen(engine, "connect", functools.partial(_configure_sqlite_connection, sqlite_synchronous))
        event.listen(engine, "begin", _begin_sqlite_transaction)
        return engine
    if backend == "postgresql":
        if parsed.get_driver_name() != "psycopg":
            raise ValueError(f"use the psycopg driver for PostgreSQL: postgresql+psycopg://..., got {url!r}")
        return create_engine(parsed, pool_size=pool_size, max_overflow=2 * pool_size, pool_pre_ping=True)
    raise ValueError(f"the store runs on SQLite or PostgreSQL, not {backend!r} ({url!r})")


def _configure_sqlite_connection(synchronous: str, dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy emits BEGIN itself (see _begin_sqlite_transaction), not the sqlite3 module.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA synchronous={synchronous}")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _begin_sqlite_transaction(connection: Connection) -> None:
    options = connection.get_execution_options()
    if options.get(_ONE_STATEMENT_OPTION, False):
        return  # a single statement is a transaction of its own
    connection.exec_driver_sql("BEGIN IMMEDIATE" if options.get(_WRITE_OPTION, False) else "BEGIN")


def _node_record(row: Row[Any]) -> NodeRecord:
    return NodeRecord(
        node_id=row.node_id,
        public_key=bytes(row.public_key),
        display_name=row.display_name,
        engine=row.engine,
        hardware=row.hardware,
        software_version=row.software_version,
        registered_ms=row.registered_ms,
        last_seen_ms=row.last_seen_ms,
        policy_version=row.policy_version,
        tokens_per_s=row.tokens_per_s,
        banned=row.banned,
        ban_reason=row.ban_reason,
        num_full_checks_passed=row.num_full_checks_passed,
        num_full_checks_failed=row.num_full_checks_failed,
        num_strikes=row.num_strikes,
        reputation=row.reputation,
        num_rollouts_accepted=row.num_rollouts_accepted,
        num_rollouts_rejected=row.num_rollouts_rejected,
        num_leases_released=row.num_leases_released,
        num_leases_expired=row.num_leases_expired,
        num_lease_cooldowns=row.num_lease_cooldowns,
        lease_cooldown_until_ms=row.lease_cooldown_until_ms,
        on_probation=row.on_probation,
        num_checked_tokens=row.num_checked_tokens,
        probation_start_tokens=row.probation_start_tokens,
    )


def _lease_record(row: Row[Any]) -> LeaseRecord:
    return LeaseRecord(
        lease_id=row.lease_id,
        node_id=row.node_id,
        lease_number=row.lease_number,
        prompt_indices=tuple(row.prompt_indices),
        group_size=row.group_size,
        sampling=SamplingParams(
            temperature=row.temperature, top_k=row.top_k, top_p=row.top_p, max_tokens=row.max_tokens
        ),
        sampling_seed=row.sampling_seed,
        policy_version=row.policy_version,
        created_ms=row.created_ms,
        deadline_ms=row.deadline_ms,
        state=LeaseState(row.state),
        closed_ms=row.closed_ms,
    )


def _lease_row(lease: LeaseRecord) -> dict[str, Any]:
    return {
        "lease_id": lease.lease_id,
        "node_id": lease.node_id,
        "lease_number": lease.lease_number,
        "prompt_indices": list(lease.prompt_indices),
        "group_size": lease.group_size,
        "temperature": lease.sampling.temperature,
        "top_k": lease.sampling.top_k,
        "top_p": lease.sampling.top_p,
        "max_tokens": lease.sampling.max_tokens,
        "sampling_seed": lease.sampling_seed,
        "policy_version": lease.policy_version,
        "created_ms": lease.created_ms,
        "deadline_ms": lease.deadline_ms,
        "state": lease.state.value,
        "closed_ms": None,
    }


def _group_record(row: Row[Any]) -> StoredGroup:
    return StoredGroup(
        group_id=row.group_id,
        lease_id=row.lease_id,
        node_id=row.node_id,
        prompt_index=row.prompt_index,
        policy_version=row.policy_version,
        group_bytes=bytes(row.group_bytes),
        num_tokens=row.num_tokens,
        num_rollouts=row.num_rollouts,
        state=GroupState(row.state),
        verified=row.verified,
        created_ms=row.created_ms,
    )


def _version_record(row: Row[Any]) -> PolicyVersionRecord:
    return PolicyVersionRecord(
        version=row.version,
        base_version=row.base_version,
        codec=Codec(row.codec),
        signed_manifest=bytes(row.signed_manifest),
        num_bytes=row.num_bytes,
        full_state_bytes=row.full_state_bytes,
        created_ms=row.created_ms,
    )


_GROUP_COLUMNS = (
    _groups.c.group_id,
    _groups.c.lease_id,
    _groups.c.node_id,
    _groups.c.prompt_index,
    _groups.c.policy_version,
    _groups.c.group_bytes,
    _groups.c.num_tokens,
    _groups.c.num_rollouts,
    _groups.c.state,
    _groups.c.verified,
    _groups.c.created_ms,
)


class Store:
    """The store's interface. Open it with open_store(url)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._write_engine = engine.execution_options(**{_WRITE_OPTION: True})
        self._one_statement_engine = engine.execution_options(**{_ONE_STATEMENT_OPTION: True})
        sqlite = engine.dialect.name == "sqlite"
        # SQLite takes one writer at a time and makes the others poll with sleeps (its busy
        # handler); queueing this process's writers on a lock instead wakes the next one at once.
        self._write_lock = threading.Lock() if sqlite else contextlib.nullcontext()
        self._requests: queue.SimpleQueue[tuple[_Request, Future[_Answer]] | None] | None = None
        self._requests_lock = threading.Lock()
        self._group_writer: threading.Thread | None = None
        if sqlite:
            self._requests = queue.SimpleQueue()
            self._group_writer = threading.Thread(target=self._write_groups, name="store-group-commit", daemon=True)
            self._group_writer.start()

    @property
    def backend(self) -> str:
        return self._engine.dialect.name

    def close(self) -> None:
        """Commit the requests already queued, then close."""
        with self._requests_lock:
            group_writer, self._group_writer = self._group_writer, None
            if group_writer is not None:
                assert self._requests is not None
                self._requests.put(None)
        if group_writer is not None:
            group_writer.join()
        self._engine.dispose()

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.begin() as connection:
            yield connection

    @contextmanager
    def _read_one(self) -> Iterator[Connection]:
        """For a read of one statement, which needs no BEGIN on SQLite."""
        with self._one_statement_engine.connect() as connection:
            yield connection

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._write_lock, self._write_engine.begin() as connection:
            yield connection

    # ---- group commit ----

    def _commit(self, request: _Request) -> SubmissionOutcome | LeaseRecord:
        """Commit one request: with the others queued beside it on SQLite, alone on PostgreSQL
        (whose writers run side by side). Returns after the commit."""
        if self._requests is None:
            answer = self._commit_alone(request)
        else:
            answered: Future[_Answer] = Future()
            with self._requests_lock:
                if self._group_writer is None:
                    raise RuntimeError("the store is closed")
                self._requests.put((request, answered))
            answer = answered.result()
        if isinstance(answer, Exception):
            raise answer
        return answer

    def _write_groups(self) -> None:
        """The group-commit thread: takes everything queued, commits it, answers, repeats."""
        assert self._requests is not None
        stopping = False
        while not stopping:
            first = self._requests.get()
            if first is None:
                return
            group = [first]
            while len(group) < MAX_GROUP_COMMIT:
                try:
                    queued = self._requests.get_nowait()
                except queue.Empty:
                    break
                if queued is None:
                    stopping = True
                    break
                group.append(queued)
            answers = self._commit_group([request for request, _ in group])
            for (_, answered), answer in zip(group, answers, strict=True):
                answered.set_result(answer)

    def _commit_group(self, requests: Sequence[_Request]) -> list[_Answer]:
        if len(requests) > 1:
            try:
                with self._write() as connection:
                    return self._apply(connection, requests)
            except Exception:
                # Each request is committed alone below, and one that fails gets its own error.
                log.warning("a group commit of %d requests failed; committing each alone", len(requests),
                            exc_info=True)
        return [self._commit_alone(request) for request in requests]

    def _commit_alone(self, request: _Request) -> _Answer:
        try:
            if isinstance(request, NewSubmission):
                return self._record_alone(request)
            with self._write() as connection:
                return self._apply(connection, [request])[0]
        except Exception as error:
            return error  # the caller raises it

    def _apply(self, connection: Connection, requests: Sequence[_Request]) -> list[_Answer]:
        """Answer requests in one transaction. Submissions go first: they close leases, which
        frees room under the lease cap for the lease requests beside them."""
        answers: list[_Answer | None] = [None] * len(requests)
        submissions = [index for index, request in enumerate(requests) if isinstance(request, NewSubmission)]
        lease_requests = [index for index, request in enumerate(requests) if isinstance(request, _LeaseRequest)]
        if submissions:
            outcomes = self._record_submissions(connection, [requests[index] for index in submissions])
            for index, outcome in zip(submissions, outcomes, strict=True):
                answers[index] = outcome
        if lease_requests:
            leases = self._issue_leases(connection, [requests[index] for index in lease_requests])
            for index, lease in zip(lease_requests, leases, strict=True):
                answers[index] = lease
        assert all(answer is not None for answer in answers), "a request was left without an answer"
        return answers  # type: ignore[return-value]

    # ---- nodes ----

    def register_node(
        self,
        node_id: str,
        public_key: bytes,
        display_name: str,
        engine: str,
        hardware: str,
        software_version: str,
        now_ms: int,
    ) -> NodeRecord:
        """Insert a node, or refresh the self-reported fields of a known one (same key)."""
        try:
            return self._register_node(node_id, public_key, display_name, engine, hardware, software_version, now_ms)
        except IntegrityError:
            # The node's first registration raced with another (PostgreSQL); now it is known.
            return self._register_node(node_id, public_key, display_name, engine, hardware, software_version, now_ms)

    def _register_node(
        self,
        node_id: str,
        public_key: bytes,
        display_name: str,
        engine: str,
        hardware: str,
        software_version: str,
        now_ms: int,
    ) -> NodeRecord:
        with self._write() as connection:
            existing = connection.execute(
                select(_nodes.c.public_key).where(_nodes.c.node_id == node_id).with_for_update()
            ).first()
            described = {
                "display_name": display_name,
                "engine": engine,
                "hardware": hardware,
                "software_version": software_version,
                "last_seen_ms": now_ms,
            }
            if existing is None:
                connection.execute(
                    insert(_nodes).values(
                        node_id=node_id,
                        public_key=public_key,
                        registered_ms=now_ms,
                        policy_version=0,
                        tokens_per_s=0.0,
                        banned=False,
                        ban_reason="",
                        num_full_checks_passed=0,
                        num_full_checks_failed=0,
                        num_strikes=0,
                        reputation=0.0,
                        num_rollouts_accepted=0,
                        num_rollouts_rejected=0,
                        on_probation=True,
                        **described,
                    )
                )
            elif bytes(existing.public_key) != public_key:
                raise NodeKeyMismatchError(f"node {node_id} is registered with a different public key")
            else:
                connection.execute(update(_nodes).where(_nodes.c.node_id == node_id).values(**described))
            return self._get_node(connection, node_id)

    def _get_node(self, connection: Connection, node_id: str, for_update: bool = False) -> NodeRecord:
        query = select(_nodes).where(_nodes.c.node_id == node_id)
        row = connection.execute(query.with_for_update() if for_update else query).first()
        if row is None:
            raise UnknownNodeError(f"node {node_id} is not registered")
        return _node_record(row)

    def get_node(self, node_id: str) -> NodeRecord | None:
        with self._read_one() as connection:
            row = connection.execute(_SELECT_NODE, {"node_id": node_id}).first()
            return None if row is None else _node_record(row)

    def list_nodes(self) -> list[NodeRecord]:
        with self._read() as connection:
            return [_node_record(row) for row in connection.execute(select(_nodes).order_by(_nodes.c.registered_ms))]

    def heartbeat(self, node_id: str, policy_version: int, tokens_per_s: float, now_ms: int) -> NodeRecord:
        with self._write() as connection:
            row = connection.execute(
                update(_nodes)
                .where(_nodes.c.node_id == node_id)
                .values(policy_version=policy_version, tokens_per_s=tokens_per_s, last_seen_ms=now_ms)
                .returning(*_nodes.c)
            ).first()
            if row is None:
                raise UnknownNodeError(f"node {node_id} is not registered; register before heartbeating")
            return _node_record(row)

    def record_heartbeats(self, beats: Sequence[tuple[str, int, float, int]]) -> None:
        """Many heartbeats in one transaction: (node_id, policy_version, tokens_per_s, last_seen_ms).
        A node's last_seen_ms never moves backwards; unknown nodes are ignored. When the database
        refuses a value (out of its range), the heartbeats are written one at a time and the
        refused ones dropped: one bad row holds up no other node's."""
        if not beats:
            return
        try:
            self._write_heartbeats(beats)
        except (OverflowError, DataError):
            for beat in beats:
                try:
                    self._write_heartbeats([beat])
                except (OverflowError, DataError) as error:
                    log.warning("dropped the heartbeat of %s: %s", beat[0], str(error)[:200])

    def _write_heartbeats(self, beats: Sequence[tuple[str, int, float, int]]) -> None:
        with self._write() as connection:
            connection.execute(
                update(_nodes)
                .where(_nodes.c.node_id == bindparam("beat_node_id"), _nodes.c.last_seen_ms <= bindparam("beat_seen_ms"))
                .values(
                    policy_version=bindparam("beat_version"),
                    tokens_per_s=bindparam("beat_tokens_per_s"),
                    last_seen_ms=bindparam("beat_seen_ms"),
                ),
                [
                    {"beat_node_id": node_id, "beat_version": version, "beat_tokens_per_s": rate, "beat_seen_ms": seen}
                    for node_id, version, rate, seen in beats
                ],
            )

    def ban_node(self, node_id: str, reason: str) -> NodeRecord:
        return self._update_node(node_id, banned=True, ban_reason=reason)

    def unban_node(self, node_id: str) -> NodeRecord:
        """Lift the ban; the node's window of checked chunks starts over, or the chunks it was
        banned on would fail its next group."""
        with self._write() as connection:
            node = self._set_node(connection, node_id, banned=False, ban_reason="")
            connection.execute(delete(_node_chunks).where(_node_chunks.c.node_id == node_id))
            connection.execute(delete(_node_tokens).where(_node_tokens.c.node_id == node_id))
            return node

    def _update_node(self, node_id: str, **values: Any) -> NodeRecord:
        with self._write() as connection:
            return self._set_node(connection, node_id, **values)

    def _set_node(self, connection: Connection, node_id: str, **values: Any) -> NodeRecord:
        row = connection.execute(
            update(_nodes).where(_nodes.c.node_id == node_id).values(**values).returning(*_nodes.c)
        ).first()
        if row is None:
            raise UnknownNodeError(f"node {node_id} is not registered")
        return _node_record(row)

    def record_full_check(self, node_id: str, passed: bool) -> NodeRecord:
        """Count a full check of the node: a pass raises its reputation, a failure is a strike.
        The caller bans the node when num_strikes reaches its limit."""
        with self._write() as connection:
            return self._count_full_check(connection, node_id, passed)

    def _count_full_check(self, connection: Connection, node_id: str, passed: bool) -> NodeRecord:
        node = self._get_node(connection, node_id, for_update=True)
        num_passed = node.num_full_checks_passed + passed
        num_failed = node.num_full_checks_failed + (not passed)
        num_strikes = node.num_strikes + (not passed)
        row = connection.execute(
            update(_nodes)
            .where(_nodes.c.node_id == node_id)
            .values(
                num_full_checks_passed=num_passed,
                num_full_checks_failed=num_failed,
                num_strikes=num_strikes,
                reputation=reputation(num_passed, num_strikes),
            )
            .returning(*_nodes.c)
        ).one()
        return _node_record(row)

    def num_nodes_holding(self, seen_since_ms: int) -> dict[int, int]:
        """Policy version -> number of unbanned nodes that reported holding it since seen_since_ms."""
        with self._read() as connection:
            rows = connection.execute(
                select(_nodes.c.policy_version, func.count())
                .where(_nodes.c.last_seen_ms >= seen_since_ms, _nodes.c.banned.is_(False))
                .group_by(_nodes.c.policy_version)
            )
            return {version: count for version, count in rows}

    # ---- leases ----

    def next_lease_number(self) -> int:
        """Atomically take the next lease number (0, 1, 2, ...; never repeats, survives restarts)."""
        with self._write() as connection:
            return self._take_lease_numbers(connection, 1)

    def _take_lease_numbers(self, connection: Connection, count: int) -> int:
        """Take count consecutive lease numbers; returns the first."""
        return connection.execute(_TAKE_LEASE_NUMBERS, {"num_taken": count}).scalar_one() - count

    def create_lease(self, lease: LeaseRecord) -> None:
        with self._write() as connection:
            connection.execute(insert(_leases).values(**_lease_row(lease)))

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
        return self._commit(
            _LeaseRequest(
                node_id, now_ms, max_open_per_node, make_lease, policy_version, oldest_leasable_version, walkaway_limit
            )
        )

    def _issue_leases(
        self, connection: Connection, requests: Sequence[_LeaseRequest]
    ) -> list[LeaseRecord | Exception]:
        """issue_lease for each request in turn, in one transaction: a lease or the refusal."""
        node_ids = sorted({request.node_id for request in requests})
        self._expire(connection, max(request.now_ms for request in requests), requests[0].walkaway_limit, node_ids)
        # Locks the nodes' rows on PostgreSQL, so concurrent requests of one node see each other.
        cooldowns = {node_id: until_ms for node_id, until_ms in connection.execute(_LOCK_NODES, {"node_ids": node_ids})}
        open_deadlines: dict[str, list[int]] = {node_id: [] for node_id in node_ids}
        for node_id, deadline_ms in connection.execute(_SELECT_OPEN_LEASE_DEADLINES, {"node_ids": node_ids}):
            open_deadlines[node_id].append(deadline_ms)
        results: list[LeaseRecord | Exception | None] = [None] * len(requests)
        granted: list[int] = []
        for index, request in enumerate(requests):
            if request.node_id not in cooldowns:
                results[index] = UnknownNodeError(
                    f"node {request.node_id} is not registered; register before leasing work"
                )
                continue
            if cooldowns[request.node_id] > request.now_ms:
                results[index] = LeaseCooldownError(
                    f"node {request.node_id} released or let expire too many of its recent leases; "
                    f"no leases for {(cooldowns[request.node_id] - request.now_ms + 999) // 1000} s",
                    cooldowns[request.node_id],
                )
                continue
            deadlines = open_deadlines[request.node_id]
            open_until = [deadline_ms for deadline_ms in deadlines if deadline_ms > request.now_ms]
            if len(open_until) >= request.max_open_per_node:
                results[index] = LeaseCapError(
                    f"node {request.node_id} holds {len(open_until)} open leases (the cap is "
                    f"{request.max_open_per_node}); submit or release one before asking for more",
                    min(open_until) - request.now_ms,
                )
                continue
            deadlines.append(_OPEN_UNTIL_BUILT)
            granted.append(index)
        requeued = self._take_requeued_for(connection, [requests[index] for index in granted])
        num_fresh = requeued.count(None)
        next_fresh = self._take_lease_numbers(connection, num_fresh) if num_fresh else 0
        leases = []
        for index, prompt_set in zip(granted, requeued, strict=True):
            request = requests[index]
            if prompt_set is None:
                lease = request.make_lease(next_fresh, None)
                next_fresh += 1
            else:
                lease = request.make_lease(prompt_set.lease_number, prompt_set.prompt_indices)
            assert lease.node_id == request.node_id, "make_lease built a foreign lease"
            assert lease.state is LeaseState.OPEN, "make_lease built a lease that is not open"
            leases.append(lease)
            results[index] = lease
        if leases:
            connection.execute(_INSERT_LEASES, [_lease_row(lease) for lease in leases])
        assert all(result is not None for result in results), "a lease request was left without an answer"
        return results  # type: ignore[return-value]

    def get_lease(self, lease_id: str) -> LeaseRecord | None:
        with self._read_one() as connection:
            row = connection.execute(_SELECT_LEASE, {"lease_id": lease_id}).first()
            return None if row is None else _lease_record(row)

    def count_open_leases(self, node_id: str, now_ms: int) -> int:
        with self._read() as connection:
            return connection.execute(
                select(func.count()).where(
                    _leases.c.node_id == node_id,
                    _leases.c.state == LeaseState.OPEN.value,
                    _leases.c.deadline_ms > now_ms,
                )
            ).scalar_one()

    def close_lease(
        self, lease_id: str, state: LeaseState, now_ms: int, walkaway_limit: WalkAwayLimit | None = None
    ) -> bool:
        """Close an open lease as submitted or released (a released lease's prompts are requeued,
        and the release counts as a walk-away of its node, judged by walkaway_limit). Returns
        False when the lease was not open any more."""
        if state not in (LeaseState.SUBMITTED, LeaseState.RELEASED):
            raise ValueError(f"a lease is closed as submitted or released, not {state}")
        with self._write() as connection:
            row = connection.execute(
                update(_leases)
                .where(_leases.c.lease_id == lease_id, _leases.c.state == LeaseState.OPEN.value)
                .values(state=state.value, closed_ms=now_ms)
                .returning(*_leases.c)
            ).first()
            if row is None:
                if connection.execute(select(_leases.c.lease_id).where(_leases.c.lease_id == lease_id)).first() is None:
                    raise UnknownLeaseError(f"lease {lease_id} does not exist")
                return False
            if state is LeaseState.RELEASED:
                released = [_lease_record(row)]
                self._requeue(connection, released, now_ms)
                self._count_walkaways(connection, released, now_ms, walkaway_limit)
            return True

    def extend_open_leases(self, min_deadline_ms: int) -> int:
        """Give every open lease at least until min_deadline_ms (after a coordinator restart, so
        work finished while it was down is not refused as late). Returns how many moved."""
        with self._write() as connection:
            return connection.execute(
                update(_leases)
                .where(_leases.c.state == LeaseState.OPEN.value, _leases.c.deadline_ms < min_deadline_ms)
                .values(deadline_ms=min_deadline_ms)
            ).rowcount

    def expire_leases(self, now_ms: int, walkaway_limit: WalkAwayLimit | None = None) -> list[LeaseRecord]:
        """Mark every open lease past its deadline expired and requeue its prompts; each counts as a
        walk-away of its node, judged by walkaway_limit."""
        with self._read() as connection:
            overdue = connection.execute(
                select(_leases.c.lease_id)
                .where(_leases.c.state == LeaseState.OPEN.value, _leases.c.deadline_ms <= now_ms)
                .limit(1)
            ).first()
        if overdue is None:
            return []
        with self._write() as connection:
            return self._expire(connection, now_ms, walkaway_limit)

    def _expire(
        self, connection: Connection, now_ms: int, walkaway_limit: WalkAwayLimit | None, node_ids: Sequence[str] = ()
    ) -> list[LeaseRecord]:
        """Expire the overdue leases; node_ids: the nodes the transaction writes next, locked in one
        sorted pass with those of the expired leases, so concurrent transactions cannot deadlock."""
        rows = connection.execute(_EXPIRE_LEASES, {"expire_at_ms": now_ms}).all()
        expired = sorted((_lease_record(row) for row in rows), key=lambda lease: lease.lease_number)
        if expired:
            locked = sorted({lease.node_id for lease in expired}.union(node_ids))
            connection.execute(_LOCK_NODES, {"node_ids": locked}).all()
        self._requeue(connection, expired, now_ms)
        self._count_walkaways(connection, expired, now_ms, walkaway_limit)
        return expired

    def _count_walkaways(
        self, connection: Connection, leases: Sequence[LeaseRecord], now_ms: int, limit: WalkAwayLimit | None
    ) -> None:
        """Count the released and expired leases on their nodes, then, given a limit, judge each
        node's recent leases by it."""
        by_node: dict[str, list[LeaseRecord]] = {}
        for lease in leases:
            by_node.setdefault(lease.node_id, []).append(lease)
        for node_id in sorted(by_node):
            num_released = sum(lease.state is LeaseState.RELEASED for lease in by_node[node_id])
            node = self._set_node(
                connection,
                node_id,
                num_leases_released=_nodes.c.num_leases_released + num_released,
                num_leases_expired=_nodes.c.num_leases_expired + len(by_node[node_id]) - num_released,
            )
            if limit is not None:
                self._judge_walkaways(connection, node, now_ms, limit)

    def _judge_walkaways(self, connection: Connection, node: NodeRecord, now_ms: int, limit: WalkAwayLimit) -> None:
        """Past the limit among the node's last leases closed since its last cool-down ended: a
        cool-down, and a strike (a ban at limit.max_strikes) when the node had one before and has
        not closed limit.window_leases leases since."""
        recent = connection.execute(
            select(_leases.c.state)
            .where(_leases.c.node_id == node.node_id, _leases.c.closed_ms >= node.lease_cooldown_until_ms)
            .order_by(_leases.c.closed_ms.desc())
            .limit(limit.window_leases)
        ).scalars().all()
        num_walkaways = sum(state != LeaseState.SUBMITTED.value for state in recent)
        if num_walkaways <= limit.max_walkaways:
            return
        values: dict[str, Any] = {
            "lease_cooldown_until_ms": now_ms + limit.cooldown_ms,
            "num_lease_cooldowns": node.num_lease_cooldowns + 1,
        }
        struck = node.num_lease_cooldowns > 0 and len(recent) < limit.window_leases
        if struck:
            num_strikes = node.num_strikes + 1
            values.update(num_strikes=num_strikes, reputation=reputation(node.num_full_checks_passed, num_strikes))
            if num_strikes >= limit.max_strikes and not node.banned:
                values.update(
                    banned=True,
                    ban_reason=f"walked away from {num_walkaways} of its last {len(recent)} leases after a cool-down",
                )
        self._set_node(connection, node.node_id, **values)
        log.warning(
            "node %s walked away from %d of its last %d leases: no leases for %d ms%s",
            node.node_id, num_walkaways, len(recent), limit.cooldown_ms, ", and a strike" if struck else "",
        )

    def _requeue(self, connection: Connection, leases: Sequence[LeaseRecord], now_ms: int) -> None:
        if leases:
            connection.execute(
                insert(_requeued),
                [
                    {
                        "lease_number": lease.lease_number,
                        "prompt_indices": list(lease.prompt_indices),
                        "source_lease_id": lease.lease_id,
                        "created_ms": now_ms,
                    }
                    for lease in leases
                ],
            )

    def take_requeued(self) -> RequeuedPrompts | None:
        """Remove and return the oldest requeued prompt set, or None when there is none."""
        with self._write() as connection:
            taken = self._take_requeued(connection, 1)
        return taken[0] if taken else None

    def _take_requeued_for(
        self, connection: Connection, requests: Sequence[_LeaseRequest]
    ) -> list[RequeuedPrompts | None]:
        """For each request in turn, remove and return the oldest requeued prompt set it may take
        (see issue_lease), or None; a set never goes back to a node that held its lease number."""
        if not requests:
            return []
        candidates = connection.execute(
            _SELECT_REQUEUED_CANDIDATES, {"num_wanted": len(requests) + REQUEUED_LOOKAHEAD}
        ).all()
        if not candidates:
            return [None] * len(requests)
        held = {
            (node_id, lease_number)
            for node_id, lease_number in connection.execute(
                _SELECT_HELD_LEASE_NUMBERS,
                {
                    "node_ids": sorted({request.node_id for request in requests}),
                    "lease_numbers": sorted({row.lease_number for row in candidates}),
                },
            )
        }
        unavailable: set[int] = set()  # taken by a concurrent transaction (PostgreSQL)
        while True:
            taken: list[Row[Any] | None] = []
            for request in requests:
                taken.append(
                    next(
                        (
                            row
                            for row in candidates
                            if row.id not in unavailable
                            and row not in taken
                            and (request.node_id, row.lease_number) not in held
                            and request.takes_version(row.policy_version)
                        ),
                        None,
                    )
                )
            wanted = {row.id for row in taken if row is not None}
            if not wanted:
                break
            locked = set(connection.execute(_LOCK_REQUEUED, {"requeued_ids": sorted(wanted)}).scalars())
            if locked == wanted:
                break
            unavailable |= wanted - locked
        if wanted:
            connection.execute(_DELETE_REQUEUED, {"requeued_ids": sorted(wanted)})
        return [None if row is None else RequeuedPrompts(row.lease_number, tuple(row.prompt_indices)) for row in taken]

    def list_leases(self, node_id: str, limit: int) -> list[LeaseRecord]:
        """The node's newest leases, newest first, with how each ended (state and closed_ms)."""
        with self._read() as connection:
            rows = connection.execute(
                select(_leases)
                .where(_leases.c.node_id == node_id)
                .order_by(_leases.c.created_ms.desc(), _leases.c.lease_number.desc())
                .limit(limit)
            )
            return [_lease_record(row) for row in rows]

    def secret(self, name: str) -> bytes:
        """The coordinator's secret called name: SECRET_BYTES random bytes made on first use, the
        same for every replica and after restarts. Never send it to a node."""
        query = select(_secrets.c.value).where(_secrets.c.name == name)
        with self._read_one() as connection:
            value = connection.execute(query).scalar_one_or_none()
        if value is None:
            try:
                with self._write() as connection:
                    connection.execute(insert(_secrets).values(name=name, value=secrets.token_bytes(SECRET_BYTES)))
            except IntegrityError:
                pass  # another replica made it first
            with self._read_one() as connection:
                value = connection.execute(query).scalar_one()
        return bytes(value)

    def _take_requeued(self, connection: Connection, limit: int) -> list[RequeuedPrompts]:
        """Remove and return up to limit requeued prompt sets, oldest first."""
        if not limit:
            return []
        rows = connection.execute(_SELECT_OLDEST_REQUEUED, {"num_wanted": limit}).all()
        if rows:
            connection.execute(_DELETE_REQUEUED, {"requeued_ids": [row.id for row in rows]})
        return [RequeuedPrompts(row.lease_number, tuple(row.prompt_indices)) for row in rows]

    def num_requeued(self) -> int:
        with self._read() as connection:
            return connection.execute(select(func.count()).select_from(_requeued)).scalar_one()

    # ---- submissions ----

    def record_submission(self, submission: NewSubmission) -> SubmissionOutcome:
        """Store a checked batch in one transaction: the submission and its receipt (which lists
        every verdict), its accepted groups with their (pending) credit, the verdicts of rejected
        rollouts (for the contributor's record), the accepted rollouts' content hashes,
        the node's counters, and the lease closed as submitted. Idempotent: a batch_hash stored
        before returns the stored receipt and changes nothing. Raises DuplicateRolloutError when a
        content hash is already stored (then nothing is written). Returns once committed."""
        if len(set(submission.rollout_hashes)) != len(submission.rollout_hashes):
            raise ValueError("a submission lists the same rollout content hash twice; reject the copies")
        return self._commit(submission)

    def _record_alone(self, submission: NewSubmission) -> SubmissionOutcome | Exception:
        try:
            with self._write() as connection:
                return self._record_submissions(connection, [submission])[0]
        except IntegrityError:
            # A concurrent transaction (PostgreSQL) stored the same batch or rollout first, or
            # the node is unknown.
            with self._read() as connection:
                node = connection.execute(select(_nodes.c.node_id).where(_nodes.c.node_id == submission.node_id))
                if node.first() is None:
                    raise UnknownNodeError(f"node {submission.node_id} is not registered") from None
                outcome = self._stored_before(connection, submission)
            if outcome is None:
                raise
            return outcome

    def _record_submissions(
        self, connection: Connection, submissions: Sequence[NewSubmission]
    ) -> list[SubmissionOutcome | DuplicateRolloutError]:
        """record_submission for each submission in turn, in one transaction: an outcome, or the
        DuplicateRolloutError of a submission that wrote nothing."""
        # Hashes before receipts, as in _stored_before: under READ COMMITTED a concurrent commit of
        # the same batch whose hashes this sees has made its receipt visible to the next statement.
        seen = self._seen_rollout_hashes(connection, [h for s in submissions for h in s.rollout_hashes])
        receipts = {
            bytes(batch_hash): bytes(receipt)
            for batch_hash, receipt in connection.execute(
                _SELECT_RECEIPTS, {"batch_hashes": [submission.batch_hash for submission in submissions]}
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
            self._insert_submissions(connection, new)
        return results

    def _stored_before(self, connection: Connection, submission: NewSubmission) -> SubmissionOutcome | None:
        """The stored receipt when this batch is stored; DuplicateRolloutError when some of its
        rollouts are; None when neither. Hashes are read before the receipt: under READ
        COMMITTED, a concurrent commit of this very batch that made the hashes visible has made
        its receipt visible too."""
        seen = self._seen_rollout_hashes(connection, submission.rollout_hashes)
        stored = self._receipt(connection, submission.batch_hash)
        if stored is not None:
            return SubmissionOutcome(receipt=stored, newly_stored=False)
        if seen:
            raise DuplicateRolloutError(frozenset(seen))
        return None

    def _insert_submissions(self, connection: Connection, submissions: Sequence[NewSubmission]) -> None:
        """Insert new submissions with everything they bring, a few statements for all of them."""
        num_accepted = [sum(verdict.accepted for verdict in submission.verdicts) for submission in submissions]
        inserted_ids = connection.execute(
            _INSERT_SUBMISSIONS,
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
                for submission, accepted in zip(submissions, num_accepted)
            ],
        ).scalars()
        submission_ids = {
            submission.batch_hash: submission_id
            for submission, submission_id in zip(submissions, inserted_ids, strict=True)
        }
        groups = [(submission, group) for submission in submissions for group in submission.groups]
        if groups:
            connection.execute(
                _INSERT_GROUPS,
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
                _INSERT_CONTRIBUTIONS,
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
            connection.execute(_INSERT_VERDICTS, verdicts)
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
            connection.execute(_INSERT_ROLLOUT_HASHES, rollout_hashes)
        counts: dict[str, tuple[int, int]] = {}
        for submission, accepted in zip(submissions, num_accepted):
            node_accepted, node_rejected = counts.get(submission.node_id, (0, 0))
            counts[submission.node_id] = (node_accepted + accepted, node_rejected + len(submission.verdicts) - accepted)
        connection.execute(
            _UPDATE_NODE_COUNTS,
            [
                {"counted_node_id": node_id, "num_newly_accepted": accepted, "num_newly_rejected": rejected}
                for node_id, (accepted, rejected) in counts.items()
            ],
        )
        connection.execute(
            _CLOSE_SUBMITTED_LEASE,
            [
                {
                    "submitted_lease_id": submission.lease_id,
                    "submitter_id": submission.node_id,
                    "submitted_ms": submission.created_ms,
                }
                for submission in submissions
            ],
        )

    def get_receipt(self, batch_hash: bytes) -> bytes | None:
        with self._read_one() as connection:
            return self._receipt(connection, batch_hash)

    def _receipt(self, connection: Connection, batch_hash: bytes) -> bytes | None:
        receipt = connection.execute(_SELECT_RECEIPT, {"batch_hash": batch_hash}).scalar_one_or_none()
        return None if receipt is None else bytes(receipt)

    def seen_rollout_hashes(self, hashes: Iterable[bytes]) -> set[bytes]:
        """Which of these rollout content hashes are already stored."""
        with self._read() as connection:
            return self._seen_rollout_hashes(connection, list(hashes))

    def _seen_rollout_hashes(self, connection: Connection, hashes: Sequence[bytes]) -> set[bytes]:
        if not hashes:
            return set()
        rows = connection.execute(_SELECT_SEEN_HASHES, {"content_hashes": list(hashes)})
        return {bytes(content_hash) for (content_hash,) in rows}

    def list_submissions(self, node_id: str, limit: int) -> list[SubmissionRecord]:
        """The node's newest submissions first."""
        with self._read() as connection:
            rows = connection.execute(
                select(_submissions)
                .where(_submissions.c.node_id == node_id)
                .order_by(_submissions.c.id.desc())
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

    def list_rejections(self, node_id: str, limit: int) -> list[RejectionRecord]:
        """The node's newest rejections first: rejected rollouts and failed full checks."""
        with self._read() as connection:
            verdict_rows = connection.execute(
                select(_verdicts)
                .where(_verdicts.c.node_id == node_id, _verdicts.c.accepted.is_(False))
                .order_by(_verdicts.c.id.desc())
                .limit(limit)
            ).all()
            validation_rows = connection.execute(
                select(_validations, _groups.c.prompt_index)
                .join(_groups, _groups.c.group_id == _validations.c.group_id)
                .where(_validations.c.node_id == node_id, _validations.c.passed.is_(False))
                .order_by(_validations.c.id.desc())
                .limit(limit)
            ).all()
        rejections = [
            RejectionRecord(
                node_id=node_id,
                source=RejectionSource.SUBMISSION,
                reason=row.reason or "",
                message=row.message,
                evidence_json=row.evidence_json,
                prompt_index=row.prompt_index,
                sample_index=row.sample_index,
                created_ms=row.created_ms,
            )
            for row in verdict_rows
        ] + [
            RejectionRecord(
                node_id=node_id,
                source=RejectionSource.VALIDATION,
                reason=row.check_name,
                message=f"full check {row.check_name} failed",
                evidence_json=row.evidence_json,
                prompt_index=row.prompt_index,
                sample_index=None,
                created_ms=row.created_ms,
            )
            for row in validation_rows
        ]
        rejections.sort(key=lambda rejection: rejection.created_ms, reverse=True)
        return rejections[:limit]

    # ---- groups ----

    def get_group(self, group_id: str) -> StoredGroup | None:
        with self._read() as connection:
            row = connection.execute(select(*_GROUP_COLUMNS).where(_groups.c.group_id == group_id)).first()
            return None if row is None else _group_record(row)

    def ready_groups(self, min_policy_version: int, limit: int) -> list[StoredGroup]:
        """Ready groups at min_policy_version or newer, of nodes not banned, oldest first."""
        with self._read() as connection:
            rows = connection.execute(
                select(*_GROUP_COLUMNS)
                .join(_nodes, _nodes.c.node_id == _groups.c.node_id)
                .where(
                    _groups.c.state == GroupState.READY.value,
                    _groups.c.policy_version >= min_policy_version,
                    _nodes.c.banned.is_(False),
                )
                .order_by(_groups.c.id)
                .limit(limit)
            )
            return [_group_record(row) for row in rows]

    def mark_consumed(self, group_ids: Sequence[str], trainer_step: int, now_ms: int) -> ConsumeOutcome:
        """Record that the trainer used these ready groups at trainer_step. A group used at an
        earlier step is refused and reported (the ledger's primary key forbids a second entry), as
        is one that is not ready; one used at this same step is a re-sent ack and counts as consumed."""
        unique_ids = list(dict.fromkeys(group_ids))
        with self._write() as connection:
            consumed = set(
                connection.execute(
                    update(_groups)
                    .where(_groups.c.group_id.in_(unique_ids), _groups.c.state == GroupState.READY.value)
                    .values(state=GroupState.CONSUMED.value, updated_ms=now_ms)
                    .returning(_groups.c.group_id)
                ).scalars()
            )
            if consumed:
                connection.execute(
                    insert(_consumptions),
                    [
                        {"group_id": group_id, "trainer_step": trainer_step, "consumed_ms": now_ms}
                        for group_id in consumed
                    ],
                )
            used_at = {
                group_id: step
                for group_id, step in connection.execute(
                    select(_consumptions.c.group_id, _consumptions.c.trainer_step).where(
                        _consumptions.c.group_id.in_([g for g in unique_ids if g not in consumed])
                    )
                )
            }
            # An ack re-sent after its reply was lost names groups this very step consumed.
            consumed |= {group_id for group_id, step in used_at.items() if step == trainer_step}
            already = used_at.keys() - consumed
        return ConsumeOutcome(
            consumed=tuple(g for g in unique_ids if g in consumed),
            already_consumed=tuple(g for g in unique_ids if g in already),
            refused=tuple(g for g in unique_ids if g not in consumed and g not in already),
        )

    def list_consumptions(self) -> list[Consumption]:
        """The consumption ledger, in step order."""
        with self._read() as connection:
            rows = connection.execute(
                select(_consumptions).order_by(_consumptions.c.trainer_step, _consumptions.c.group_id)
            )
            return [Consumption(row.group_id, row.trainer_step, row.consumed_ms) for row in rows]

    def mark_stale(self, group_ids: Sequence[str], now_ms: int) -> int:
        """Ready groups the trainer dropped as too old; returns how many changed."""
        return self.set_group_state(group_ids, GroupState.STALE, now_ms)

    def mark_stale_below(self, min_policy_version: int, now_ms: int) -> int:
        """Every ready group generated by a policy older than min_policy_version becomes stale."""
        with self._write() as connection:
            return connection.execute(
                update(_groups)
                .where(_groups.c.state == GroupState.READY.value, _groups.c.policy_version < min_policy_version)
                .values(state=GroupState.STALE.value, updated_ms=now_ms)
            ).rowcount

    def restore_consumed_after(self, trainer_step: int, now_ms: int) -> int:
        """A trainer resumed from its checkpoint at trainer_step: the weights trained on groups
        consumed at later steps are gone, so those groups become ready again and leave the
        ledger (a group is never recorded as consumed twice). Steps count from 1: at step 0 (no
        checkpoint) every consumed group is restored. Returns how many were restored."""
        with self._write() as connection:
            group_ids = list(
                connection.execute(
                    delete(_consumptions)
                    .where(_consumptions.c.trainer_step > trainer_step)
                    .returning(_consumptions.c.group_id)
                ).scalars()
            )
            if group_ids:
                connection.execute(
                    update(_groups)
                    .where(_groups.c.group_id.in_(group_ids), _groups.c.state == GroupState.CONSUMED.value)
                    .values(state=GroupState.READY.value, updated_ms=now_ms)
                )
            return len(group_ids)

    def set_group_state(self, group_ids: Sequence[str], state: GroupState, now_ms: int) -> int:
        """Move groups to state from the states GROUP_STATE_SOURCES allows (others are left as
        they are); returns how many changed. Consuming goes through mark_consumed."""
        if state is GroupState.CONSUMED or state not in GROUP_STATE_SOURCES:
            raise ValueError(f"groups cannot be set to {state} here; use mark_consumed for consumed")
        sources = [source.value for source in GROUP_STATE_SOURCES[state]]
        with self._write() as connection:
            return connection.execute(
                update(_groups)
                .where(_groups.c.group_id.in_(list(group_ids)), _groups.c.state.in_(sources))
                .values(state=state.value, updated_ms=now_ms)
            ).rowcount

    def quarantine_node_groups(self, node_id: str, now_ms: int) -> int:
        """Quarantine all the node's groups the trainer has not consumed, those that passed a full
        check too: a node caught once is trusted with none of its work."""
        sources = [source.value for source in GROUP_STATE_SOURCES[GroupState.QUARANTINED]]
        with self._write() as connection:
            return connection.execute(
                update(_groups)
                .where(_groups.c.node_id == node_id, _groups.c.state.in_(sources))
                .values(state=GroupState.QUARANTINED.value, updated_ms=now_ms)
            ).rowcount

    def group_counts(self) -> dict[GroupState, int]:
        with self._read() as connection:
            return self._group_counts(connection)

    def count_groups(self, states: Iterable[GroupState]) -> int:
        """How many groups are in any of these states: an index range, not the whole table."""
        with self._read_one() as connection:
            return connection.execute(
                _COUNT_GROUPS_IN_STATES, {"states": [state.value for state in states]}
            ).scalar_one()

    def _group_counts(self, connection: Connection) -> dict[GroupState, int]:
        counts = dict.fromkeys(GroupState, 0)
        for state, count in connection.execute(select(_groups.c.state, func.count()).group_by(_groups.c.state)):
            counts[GroupState(state)] = count
        return counts

    # ---- validation ----

    def pending_validation(self, limit: int) -> list[StoredGroup]:
        """Groups waiting for a full check, oldest first."""
        with self._read() as connection:
            rows = connection.execute(
                select(*_GROUP_COLUMNS)
                .where(_groups.c.state == GroupState.PENDING_VALIDATION.value)
                .order_by(_groups.c.id)
                .limit(limit)
            )
            return [_group_record(row) for row in rows]

    def record_validation(
        self, group_id: str, passed: bool, check_name: str, evidence_json: str, now_ms: int
    ) -> ValidationResult:
        """Store a full check's result. A pass marks the group verified (and ready, if it was
        pending); a failure rejects it. Node-wide consequences are the caller's separate calls."""
        with self._write() as connection:
            row = connection.execute(
                select(_groups.c.node_id, _groups.c.state).where(_groups.c.group_id == group_id)
            ).first()
            if row is None:
                raise ValueError(f"group {group_id} does not exist")
            return self._insert_validation(connection, group_id, row.node_id, GroupState(row.state),
                                           passed, check_name, evidence_json, now_ms)

    def record_validations(
        self, results: Sequence[NewValidation], now_ms: int, *, max_strikes: int, probation_tokens: int
    ) -> list[ValidationOutcome | None]:
        """Full checks' results and all their consequences, in one transaction, for the groups still
        pending validation; in input order, None for a group that no longer waits (decided already,
        quarantined, or unknown). A node's failures are applied before its passes.

        A pass marks the group verified: ready, or held (probation) while its node is on probation,
        and counts its tokens as the node's checked tokens. A suspect pass puts its node on
        probation (its unconsumed ready groups are held again). A passed window verdict ends the
        node's probation once it has probation_tokens checked tokens since it began: its held groups
        become ready at once. probation_tokens 0 holds nothing: a node on probation is then only
        checked fully (every submission) until its window passes.

        A failure rejects the group, is a strike unless another group of its submission failed
        before (one strike per submission, whatever the batching; a re-report changes nothing),
        quarantines every unconsumed group of the node, voids its unsettled credit, records how many
        of its groups the trainer had consumed, puts it on probation, and bans it at max_strikes.
        Nodes are locked in id order, so concurrent reporters cannot deadlock on PostgreSQL."""
        with self._write() as connection:
            rows = connection.execute(
                select(_groups.c.group_id, _groups.c.node_id, _groups.c.state, _groups.c.submission_id,
                       _groups.c.num_tokens)
                .where(_groups.c.group_id.in_([result.group_id for result in results]))
            ).all()
            groups = {row.group_id: row for row in rows}
            first_listed = {result.group_id: i for i, result in reversed(list(enumerate(results)))}
            waiting = [i for i, result in enumerate(results) if first_listed[result.group_id] == i
                       and result.group_id in groups
                       and GroupState(groups[result.group_id].state) is GroupState.PENDING_VALIDATION]
            order = sorted(waiting, key=lambda i: (groups[results[i].group_id].node_id, results[i].passed,
                                                   results[i].group_id))
            nodes: dict[str, NodeRecord] = {}
            for node_id in sorted({groups[results[i].group_id].node_id for i in waiting}):
                nodes[node_id] = self._get_node(connection, node_id, for_update=True)
            caught: set[str] = set()
            window_passed: dict[str, int] = {}  # node -> the result whose window verdict passed
            outcomes: dict[int, ValidationOutcome] = {}
            for index in order:
                result = results[index]
                group = groups[result.group_id]
                if group.node_id in caught:
                    continue  # quarantined by its node's failure just now
                if result.passed:
                    outcomes[index] = self._record_pass(connection, result, group, nodes, probation_tokens > 0,
                                                        now_ms)
                    if result.window_verdict:
                        window_passed[group.node_id] = index
                else:
                    caught.add(group.node_id)
                    outcomes[index] = self._record_failure(connection, result, group, nodes, max_strikes, now_ms)
            for node_id, index in window_passed.items():
                node = nodes[node_id]
                if (node_id in caught or not node.on_probation
                        or node.num_checked_tokens - node.probation_start_tokens < probation_tokens):
                    continue
                num_released = connection.execute(
                    update(_groups)
                    .where(_groups.c.node_id == node_id, _groups.c.state == GroupState.PROBATION.value)
                    .values(state=GroupState.READY.value, updated_ms=now_ms)
                ).rowcount
                nodes[node_id] = self._set_node(connection, node_id, on_probation=False)
                outcomes[index] = dataclasses.replace(outcomes[index], node=nodes[node_id],
                                                      probation_ended=num_released)
            return [outcomes.get(index) for index in range(len(results))]

    def _record_pass(self, connection: Connection, result: NewValidation, group: Row[Any],
                     nodes: dict[str, NodeRecord], hold: bool, now_ms: int) -> ValidationOutcome:
        node = nodes[group.node_id]
        if result.suspect and not node.on_probation:
            if hold:
                connection.execute(
                    update(_groups)
                    .where(_groups.c.node_id == node.node_id, _groups.c.state == GroupState.READY.value)
                    .values(state=GroupState.PROBATION.value, updated_ms=now_ms)
                )
            node = self._set_node(connection, node.node_id, on_probation=True,
                                  probation_start_tokens=node.num_checked_tokens)
        validation = self._insert_validation(
            connection, result.group_id, node.node_id, GroupState.PENDING_VALIDATION, True, result.check_name,
            result.evidence_json, now_ms,
            target=GroupState.PROBATION if node.on_probation and hold else GroupState.READY)
        num_passed = node.num_full_checks_passed + 1
        node = self._set_node(connection, node.node_id, num_full_checks_passed=num_passed,
                              num_checked_tokens=node.num_checked_tokens + group.num_tokens,
                              reputation=reputation(num_passed, node.num_strikes))
        nodes[node.node_id] = node
        return ValidationOutcome(validation, node)

    def _record_failure(self, connection: Connection, result: NewValidation, group: Row[Any],
                        nodes: dict[str, NodeRecord], max_strikes: int, now_ms: int) -> ValidationOutcome:
        node = nodes[group.node_id]
        failed_before = connection.execute(
            select(func.count()).select_from(_validations)
            .join(_groups, _groups.c.group_id == _validations.c.group_id)
            .where(_groups.c.submission_id == group.submission_id, _validations.c.passed.is_(False))
        ).scalar_one()
        num_consumed = connection.execute(
            select(func.count()).select_from(_consumptions)
            .join(_groups, _groups.c.group_id == _consumptions.c.group_id)
            .where(_groups.c.node_id == node.node_id)
        ).scalar_one()
        validation = self._insert_validation(
            connection, result.group_id, node.node_id, GroupState.PENDING_VALIDATION, False, result.check_name,
            result.evidence_json, now_ms, num_groups_consumed=num_consumed)
        # Verified groups go too: a statistical check (a pooled commitment, a node's window) passes
        # many groups of a node that deviates a little, and a cheater may mix in honest groups.
        quarantine_sources = [source.value for source in GROUP_STATE_SOURCES[GroupState.QUARANTINED]]
        num_quarantined = connection.execute(
            update(_groups)
            .where(_groups.c.node_id == node.node_id, _groups.c.state.in_(quarantine_sources))
            .values(state=GroupState.QUARANTINED.value, updated_ms=now_ms)
        ).rowcount
        num_voided = self._void_unsettled(connection, node.node_id)
        struck = failed_before == 0
        num_strikes = node.num_strikes + struck
        banned_now = num_strikes >= max_strikes and not node.banned
        values: dict[str, Any] = {}
        if banned_now:
            values = {"banned": True, "ban_reason": f"failed {num_strikes} full checks; last: {result.check_name}"}
        node = self._set_node(
            connection, node.node_id, num_full_checks_failed=node.num_full_checks_failed + 1,
            num_strikes=num_strikes, reputation=reputation(node.num_full_checks_passed, num_strikes),
            on_probation=True, probation_start_tokens=node.num_checked_tokens, **values)
        nodes[node.node_id] = node
        return ValidationOutcome(validation, node, struck, num_quarantined, num_voided, banned_now)

    def _groups_joining_window(
        self, connection: Connection, window: Table, group_ids: Sequence[str]
    ) -> dict[str, str]:
        """Of group_ids, those still pending validation whose statistics are not in the window table yet,
        with their nodes, whose rows are locked in id order: one writer per node's window, and a verdict
        reported again (or by a second validator) adds nothing."""
        rows = connection.execute(
            select(_groups.c.group_id, _groups.c.node_id, _groups.c.state).where(_groups.c.group_id.in_(group_ids))
        ).all()
        pending = {row.group_id: row.node_id for row in rows if GroupState(row.state) is GroupState.PENDING_VALIDATION}
        added = set(connection.execute(
            select(window.c.group_id).where(window.c.group_id.in_(list(pending))).distinct()
        ).scalars())
        joining = {group_id: node_id for group_id, node_id in pending.items() if group_id not in added}
        for node_id in sorted(set(joining.values())):
            self._get_node(connection, node_id, for_update=True)
        return joining

    def add_node_chunks(
        self, groups: Sequence[tuple[str, Sequence[ChunkStats]]], window_size: int
    ) -> list[ChunkWindow | None]:
        """Add the checked chunks of groups still pending validation to their nodes' windows, each
        node keeping its newest window_size chunks, in one transaction. Per group, in input order:
        its node's window right after the group's chunks joined it; None for a group that no longer
        waits, or whose chunks were added before (a verdict reported again adds nothing)."""
        with self._write() as connection:
            joining = self._groups_joining_window(connection, _node_chunks, [group_id for group_id, _ in groups])
            windows: list[ChunkWindow | None] = []
            for group_id, chunks in groups:
                node_id = joining.pop(group_id, None) if chunks else None
                if node_id is None:
                    windows.append(None)
                    continue
                connection.execute(insert(_node_chunks), [
                    {"node_id": node_id, "group_id": group_id, "exponent_mismatches": chunk.exponent_mismatches,
                     "mantissa_error_sum": chunk.mantissa_error_sum, "num_matched": chunk.num_matched}
                    for chunk in chunks
                ])
                oldest_kept = connection.execute(
                    select(_node_chunks.c.id).where(_node_chunks.c.node_id == node_id)
                    .order_by(_node_chunks.c.id.desc()).offset(window_size - 1).limit(1)
                ).scalar()
                if oldest_kept is not None:
                    connection.execute(
                        delete(_node_chunks).where(_node_chunks.c.node_id == node_id, _node_chunks.c.id < oldest_kept)
                    )
                sums = connection.execute(
                    select(func.count(), func.coalesce(func.sum(_node_chunks.c.exponent_mismatches), 0),
                           func.coalesce(func.sum(_node_chunks.c.mantissa_error_sum), 0.0),
                           func.coalesce(func.sum(_node_chunks.c.num_matched), 0))
                    .where(_node_chunks.c.node_id == node_id)
                ).one()
                windows.append(ChunkWindow(node_id, int(sums[0]), int(sums[1]), float(sums[2]), int(sums[3])))
            return windows

    # ---- node token windows ----

    def add_node_tokens(
        self, groups: Sequence[tuple[str, TokenStats]], window_tokens: int
    ) -> list[TokenWindow | None]:
        """Add the token statistics of groups still pending validation to their nodes' windows, each
        node keeping its newest groups that cover window_tokens tokens, in one transaction. Per group,
        in input order: its node's window right after the group joined it; None for a group that no
        longer waits, or that was added before (a verdict reported again adds nothing)."""
        with self._write() as connection:
            joining = self._groups_joining_window(connection, _node_tokens, [group_id for group_id, _ in groups])
            windows: list[TokenWindow | None] = []
            for group_id, stats in groups:
                node_id = joining.pop(group_id, None)
                if node_id is None:
                    windows.append(None)
                    continue
                connection.execute(insert(_node_tokens).values(
                    node_id=node_id, group_id=group_id, **dataclasses.asdict(stats)))
                newest = connection.execute(
                    select(_node_tokens.c.id, _node_tokens.c.num_tokens).where(_node_tokens.c.node_id == node_id)
                    .order_by(_node_tokens.c.id.desc())
                ).all()
                covered = list(itertools.accumulate(row.num_tokens for row in newest))
                num_kept = bisect.bisect_left(covered, window_tokens) + 1
                if num_kept < len(newest):
                    connection.execute(delete(_node_tokens).where(
                        _node_tokens.c.node_id == node_id, _node_tokens.c.id < newest[num_kept - 1].id))
                windows.append(self._token_window(connection, node_id))
            return windows

    def node_token_window(self, node_id: str) -> TokenWindow:
        """The sums over the node's window of fully checked groups (empty for a node without one)."""
        with self._read() as connection:
            return self._token_window(connection, node_id)

    def _token_window(self, connection: Connection, node_id: str) -> TokenWindow:
        fields = [getattr(_node_tokens.c, name) for name in TokenStats.__dataclass_fields__]
        sums = connection.execute(
            select(func.count(), *(func.coalesce(func.sum(column), 0) for column in fields))
            .where(_node_tokens.c.node_id == node_id)
        ).one()
        return TokenWindow(node_id, int(sums[0]), TokenStats(*(
            type(default)(value) for default, value in zip(dataclasses.astuple(TokenStats()), sums[1:]))))

    def _insert_validation(
        self, connection: Connection, group_id: str, node_id: str, state: GroupState, passed: bool,
        check_name: str, evidence_json: str, now_ms: int, *, target: GroupState | None = None,
        num_groups_consumed: int | None = None,
    ) -> ValidationResult:
        connection.execute(
            insert(_validations).values(
                group_id=group_id,
                node_id=node_id,
                passed=passed,
                check_name=check_name,
                evidence_json=evidence_json,
                created_ms=now_ms,
                num_groups_consumed=num_groups_consumed,
            )
        )
        target = target or (GroupState.READY if passed else GroupState.REJECTED)
        new_state = target if state in GROUP_STATE_SOURCES[target] else state
        connection.execute(
            update(_groups)
            .where(_groups.c.group_id == group_id)
            .values(state=new_state.value, verified=passed, updated_ms=now_ms)
        )
        return ValidationResult(group_id, node_id, passed, check_name, evidence_json, now_ms, num_groups_consumed)

    def list_validations(self, node_id: str, limit: int) -> list[ValidationResult]:
        """The node's newest full-check results first."""
        with self._read() as connection:
            rows = connection.execute(
                select(_validations)
                .where(_validations.c.node_id == node_id)
                .order_by(_validations.c.id.desc())
                .limit(limit)
            )
            return [
                ValidationResult(
                    row.group_id, row.node_id, row.passed, row.check_name, row.evidence_json, row.created_ms,
                    row.num_groups_consumed,
                )
                for row in rows
            ]

    # ---- policy versions ----

    def add_version(self, version: PolicyVersionRecord) -> None:
        try:
            with self._write() as connection:
                connection.execute(
                    insert(_versions).values(
                        version=version.version,
                        base_version=version.base_version,
                        codec=int(version.codec),
                        signed_manifest=version.signed_manifest,
                        num_bytes=version.num_bytes,
                        full_state_bytes=version.full_state_bytes,
                        created_ms=version.created_ms,
                    )
                )
        except IntegrityError:
            raise VersionExistsError(f"policy version {version.version} is already published") from None

    def get_version(self, version: int) -> PolicyVersionRecord | None:
        with self._read() as connection:
            row = connection.execute(select(_versions).where(_versions.c.version == version)).first()
            return None if row is None else _version_record(row)

    def latest_version(self) -> PolicyVersionRecord | None:
        with self._read() as connection:
            row = connection.execute(select(_versions).order_by(_versions.c.version.desc()).limit(1)).first()
            return None if row is None else _version_record(row)

    def list_versions(self) -> list[PolicyVersionRecord]:
        with self._read() as connection:
            return [_version_record(row) for row in connection.execute(select(_versions).order_by(_versions.c.version))]

    # ---- trainer metrics ----

    def add_metrics(self, step: int, metrics_json: str, now_ms: int) -> None:
        """The metrics of a trainer step; a step reported again (a trainer resumed from an earlier
        checkpoint trains it anew) replaces its record."""
        dialect_insert = postgresql_insert if self._write_engine.dialect.name == "postgresql" else sqlite_insert
        statement = dialect_insert(_metrics).values(step=step, metrics_json=metrics_json, created_ms=now_ms)
        with self._write() as connection:
            connection.execute(
                statement.on_conflict_do_update(
                    index_elements=[_metrics.c.step],
                    set_={"metrics_json": statement.excluded.metrics_json, "created_ms": statement.excluded.created_ms},
                )
            )

    def list_metrics(self, limit: int) -> list[MetricsRecord]:
        """The metrics records of the newest limit steps, by step."""
        with self._read() as connection:
            rows = connection.execute(select(_metrics).order_by(_metrics.c.step.desc()).limit(limit)).all()
            return [MetricsRecord(row.step, row.metrics_json, row.created_ms) for row in reversed(rows)]

    # ---- contribution ledger ----

    def settle_contributions(self, before_ms: int) -> int:
        """Settle pending credit created before before_ms, of nodes not banned, whose group is not
        waiting for, or failed, a full check. Returns how many entries settled."""
        unsettled_states = [
            GroupState.PENDING_VALIDATION.value,
            GroupState.PROBATION.value,
            GroupState.QUARANTINED.value,
            GroupState.REJECTED.value,
        ]
        with self._write() as connection:
            return connection.execute(
                update(_contributions)
                .where(
                    _contributions.c.settled.is_(False),
                    _contributions.c.voided.is_(False),
                    _contributions.c.created_ms < before_ms,
                    _contributions.c.node_id.in_(select(_nodes.c.node_id).where(_nodes.c.banned.is_(False))),
                    _contributions.c.group_id.in_(
                        select(_groups.c.group_id).where(_groups.c.state.not_in(unsettled_states))
                    ),
                )
                .values(settled=True)
            ).rowcount

    def void_unsettled(self, node_id: str) -> int:
        """Void all the node's pending credit; returns how many entries were voided."""
        with self._write() as connection:
            return self._void_unsettled(connection, node_id)

    def _void_unsettled(self, connection: Connection, node_id: str) -> int:
        return connection.execute(
            update(_contributions)
            .where(
                _contributions.c.node_id == node_id,
                _contributions.c.settled.is_(False),
                _contributions.c.voided.is_(False),
            )
            .values(voided=True)
        ).rowcount

    def contribution_totals(self, node_id: str | None = None) -> list[ContributionTotals]:
        """Settled, pending and voided work per node (one node, or all with any entry)."""
        bucket = case(
            (_contributions.c.voided.is_(True), "voided"),
            (_contributions.c.settled.is_(True), "settled"),
            else_="pending",
        )
        query = select(
            _contributions.c.node_id,
            bucket.label("bucket"),
            func.count().label("num_entries"),
            func.sum(_contributions.c.num_tokens).label("num_tokens"),
            func.sum(_contributions.c.num_rollouts).label("num_rollouts"),
            func.sum(_contributions.c.flops_estimate).label("flops_estimate"),
        ).group_by(_contributions.c.node_id, bucket)
        if node_id is not None:
            query = query.where(_contributions.c.node_id == node_id)
        buckets: dict[str, dict[str, WorkTotals]] = {}
        with self._read() as connection:
            for row in connection.execute(query):
                buckets.setdefault(row.node_id, {})[row.bucket] = WorkTotals(
                    num_entries=row.num_entries,
                    num_tokens=int(row.num_tokens),
                    num_rollouts=int(row.num_rollouts),
                    flops_estimate=float(row.flops_estimate),
                )
        return [
            ContributionTotals(
                node_id=node,
                settled=totals.get("settled", WorkTotals()),
                pending=totals.get("pending", WorkTotals()),
                voided=totals.get("voided", WorkTotals()),
            )
            for node, totals in sorted(buckets.items())
        ]

    def contribution_timeline(self, node_id: str, bucket_ms: int) -> list[ContributionBucket]:
        """The node's work that is not voided, summed per time bucket of bucket_ms (aligned to
        multiples of bucket_ms), oldest first; buckets without work are left out."""
        if bucket_ms < 1:
            raise ValueError(f"bucket_ms must be at least 1, got {bucket_ms}")
        bucket = (_contributions.c.created_ms // bucket_ms).label("bucket")
        query = (
            select(
                bucket,
                func.count().label("num_entries"),
                func.sum(_contributions.c.num_tokens).label("num_tokens"),
                func.sum(_contributions.c.num_rollouts).label("num_rollouts"),
                func.sum(_contributions.c.flops_estimate).label("flops_estimate"),
            )
            .where(_contributions.c.node_id == node_id, _contributions.c.voided.is_(False))
            .group_by(bucket)
            .order_by(bucket)
        )
        with self._read() as connection:
            return [
                ContributionBucket(
                    start_ms=int(row.bucket) * bucket_ms,
                    work=WorkTotals(
                        num_entries=row.num_entries,
                        num_tokens=int(row.num_tokens),
                        num_rollouts=int(row.num_rollouts),
                        flops_estimate=float(row.flops_estimate),
                    ),
                )
                for row in connection.execute(query)
            ]

    # ---- run status ----

    def run_counters(self, online_since_ms: int) -> RunCounters:
        """Counters for the admin status and the dashboard; a node is online when it is not
        banned and was seen at or after online_since_ms."""
        with self._read() as connection:
            num_online, num_accepted, num_rejected = connection.execute(
                select(
                    func.count().filter(and_(_nodes.c.last_seen_ms >= online_since_ms, _nodes.c.banned.is_(False))),
                    func.coalesce(func.sum(_nodes.c.num_rollouts_accepted), 0),
                    func.coalesce(func.sum(_nodes.c.num_rollouts_rejected), 0),
                )
            ).one()
            last_consumed_step = connection.execute(
                select(func.coalesce(func.max(_consumptions.c.trainer_step), 0))
            ).scalar_one()
            last_metrics_step = connection.execute(select(func.coalesce(func.max(_metrics.c.step), 0))).scalar_one()
            latest_version = connection.execute(
                select(func.coalesce(func.max(_versions.c.version), 0))
            ).scalar_one()
            return RunCounters(
                num_nodes_online=num_online,
                num_rollouts_accepted=int(num_accepted),
                num_rollouts_rejected=int(num_rejected),
                num_groups=self._group_counts(connection),
                trainer_step=max(last_consumed_step, last_metrics_step),
                latest_policy_version=latest_version,
            )
