"""The store's contract, one suite run against every backend: SQLite (a temporary file) and
PostgreSQL (marked postgres; a fresh schema per test on the local server, skipped when none
answers)."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from coordinator.store import (
    SQLITE_FILE_NAME,
    ChunkStats,
    ChunkWindow,
    Consumption,
    DuplicateRolloutError,
    GroupState,
    LeaseCapError,
    LeaseCooldownError,
    LeaseFactory,
    LeaseRecord,
    LeaseState,
    Liveness,
    NewGroup,
    NewSubmission,
    NewValidation,
    NewVerdict,
    NodeKeyMismatchError,
    PolicyVersionRecord,
    RejectionSource,
    Store,
    TokenStats,
    TokenWindow,
    UnknownLeaseError,
    UnknownNodeError,
    ValidationResult,
    VersionExistsError,
    WalkAwayLimit,
    open_store,
    reputation,
    sqlite_url,
)
from coordinator.store.database import SQLITE_BUSY_TIMEOUT_MS, Repository
from coordinator.store.leases import take_lease_numbers
from coordinator.store.ledger import void_unsettled
from coordinator.store.migrate import current_revision, head_revision, upgrade_to_head
from coordinator.store.schema import GroupConsumption, metadata
from coordinator.store.statements import CONSUMPTIONS, GROUPS
from coordinator.store.submissions import seen_rollout_hashes
from coordinator.store.validations import insert_validation
from coordinator.store.windows import token_window
from protocol.types import Codec, NodeState, RejectReason, SamplingParams
from tests.integration.cluster import postgres_admin

POSTGRES_SERVER_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
LIVENESS = Liveness(stale_after_ms=30_000, offline_after_ms=120_000)
T0 = 1_700_000_000_000


def _postgres_schema_url() -> Iterator[str]:
    admin = postgres_admin()
    schema_name = f"rollproof_test_{secrets.token_hex(6)}"
    with admin:
        admin.execute(f"CREATE SCHEMA {schema_name}")
        try:
            yield f"{POSTGRES_SERVER_URL}?options=-csearch_path%3D{schema_name}"
        finally:
            admin.execute(f"DROP SCHEMA {schema_name} CASCADE")


@pytest.fixture(params=[pytest.param("sqlite"), pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
    else:
        yield from _postgres_schema_url()


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    opened = open_store(store_url)
    yield opened
    opened.close()


def _register(store: Store, node_id: str = "node-a", now_ms: int = T0) -> None:
    store.register_node(node_id, node_id.encode().ljust(32, b"k"), f"{node_id} box", "torch", "cpu x2", "0.1.0", now_ms)


def _lease(
    node_id: str, lease_number: int, prompts: tuple[int, ...], now_ms: int = T0, deadline_ms: int = 60_000
) -> LeaseRecord:
    return LeaseRecord(
        lease_id=f"lease-{node_id}-{lease_number}-{secrets.token_hex(4)}",
        node_id=node_id,
        lease_number=lease_number,
        prompt_indices=prompts,
        group_size=2,
        sampling=SamplingParams(temperature=0.7, top_k=5, top_p=0.9, max_tokens=16),
        sampling_seed=(1 << 63) - 1,
        policy_version=3,
        created_ms=now_ms,
        deadline_ms=now_ms + deadline_ms,
    )


def _fresh_factory(
    node_id: str, prompts_per_lease: int = 2, deadline_ms: int = 60_000, now_ms: int = T0
) -> LeaseFactory:
    """Lease number n carries prompts n*k .. n*k+k-1 unless a requeued prompt set is given."""

    def make(lease_number: int, requeued: tuple[int, ...] | None, take_lease_number: Callable[[], int]) -> LeaseRecord:
        first = lease_number * prompts_per_lease
        prompts = requeued if requeued is not None else tuple(range(first, first + prompts_per_lease))
        return _lease(node_id, lease_number, prompts, now_ms, deadline_ms)

    return make


def _submission(
    lease: LeaseRecord,
    batch_hash: bytes,
    now_ms: int = T0 + 1_000,
    state: GroupState = GroupState.READY,
    policy_version: int = 3,
    hashes: tuple[bytes, ...] | None = None,
    num_rejected: int = 1,
) -> NewSubmission:
    groups = tuple(
        NewGroup(
            group_id=f"{lease.lease_id}/{prompt}",
            prompt_index=prompt,
            policy_version=policy_version,
            group_bytes=bytes([prompt % 256]) * 40,
            num_tokens=100,
            num_rollouts=2,
            state=state,
            flops_estimate=1.5e9,
        )
        for prompt in lease.prompt_indices
    )
    verdicts = tuple(
        NewVerdict(prompt, sample, True) for prompt in lease.prompt_indices for sample in range(2)
    ) + tuple(
        NewVerdict(
            lease.prompt_indices[0], 2 + i, False, RejectReason.REWARD_MISMATCH, "claimed 1.0, recomputed 0.0", "{}"
        )
        for i in range(num_rejected)
    )
    if hashes is None:
        hashes = tuple(
            batch_hash + bytes([prompt % 256, sample]) for prompt in lease.prompt_indices for sample in range(2)
        )
    return NewSubmission(
        batch_hash=batch_hash,
        lease_id=lease.lease_id,
        node_id=lease.node_id,
        created_ms=now_ms,
        receipt=b"receipt:" + batch_hash,
        groups=groups,
        verdicts=verdicts,
        rollout_hashes=hashes,
    )


def _leased_submission(store: Store, node_id: str, batch_hash: bytes, **kwargs) -> tuple[LeaseRecord, NewSubmission]:
    lease = store.issue_lease(node_id, T0, 100, _fresh_factory(node_id))
    return lease, _submission(lease, batch_hash, **kwargs)


# ---- what only these tests read or write, on the store's own connections ----


def _next_lease_number(store: Store) -> int:
    with store.database.write() as connection:
        return take_lease_numbers(connection, 1)


def _count_open_leases(store: Store, node_id: str, now_ms: int) -> int:
    leases = store.list_leases(node_id, limit=1_000)
    return sum(lease.state is LeaseState.OPEN and lease.deadline_ms > now_ms for lease in leases)


def _seen_rollout_hashes(store: Store, hashes: list[bytes] | tuple[bytes, ...]) -> set[bytes]:
    with store.database.read() as connection:
        return seen_rollout_hashes(connection, list(hashes))


def _group_counts(store: Store) -> dict[GroupState, int]:
    return store.run_counters(online_since_ms=0).num_groups


def _list_consumptions(store: Store) -> list[Consumption]:
    """The consumption ledger, in step order."""
    with store.database.read() as connection:
        rows = connection.execute(select(CONSUMPTIONS).order_by(CONSUMPTIONS.c.trainer_step, CONSUMPTIONS.c.group_id))
        return [Consumption(row.group_id, row.trainer_step, row.consumed_ms) for row in rows]


def _record_validation(
    store: Store, group_id: str, passed: bool, check_name: str, evidence_json: str, now_ms: int
) -> ValidationResult:
    """A full check's result alone, without its consequences for the node (record_validations has those)."""
    with store.database.write() as connection:
        row = connection.execute(select(GROUPS.c.node_id, GROUPS.c.state).where(GROUPS.c.group_id == group_id)).first()
        if row is None:
            raise ValueError(f"group {group_id} does not exist")
        return insert_validation(
            connection, group_id, row.node_id, GroupState(row.state), passed, check_name, evidence_json, now_ms
        )


def _void_unsettled(store: Store, node_id: str) -> int:
    with store.database.write() as connection:
        return void_unsettled(connection, node_id)


def _node_token_window(store: Store, node_id: str) -> TokenWindow:
    with store.database.read() as connection:
        return token_window(connection, node_id)


# ---- schema and migrations ----


def test_no_repository_hides_a_method_of_another():
    """Store is the union of its repositories: a name defined twice would leave one unreachable."""
    repositories = [cls for cls in Store.__mro__[1:] if issubclass(cls, Repository) and cls is not Repository]
    names = [name for cls in repositories for name in vars(cls) if not name.startswith("__")]
    assert len(repositories) == 10 and len(names) == len(set(names))


def test_migrations_create_exactly_the_models_tables(store: Store):
    with store.database.engine.connect() as connection:
        assert current_revision(connection) == head_revision()
        differences = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), metadata)
    assert differences == []


def test_migrations_run_twice_are_a_no_op(store_url: str):
    first = open_store(store_url)
    _register(first)
    first.close()
    second = open_store(store_url)
    upgrade_to_head(second.database.write_engine)
    with second.database.engine.connect() as connection:
        assert current_revision(connection) == head_revision()
    assert second.get_node("node-a") is not None
    assert _next_lease_number(second) == 0
    second.close()


def test_data_survives_close_and_reopen(store_url: str):
    first = open_store(store_url)
    _register(first)
    lease, submission = _leased_submission(first, "node-a", b"batch-1")
    first.record_submission(submission)
    first.add_version(PolicyVersionRecord(1, 0, Codec.KEYFRAME, b"manifest", 10, 20, T0))
    first.close()

    reopened = open_store(store_url)
    assert reopened.get_node("node-a").num_rollouts_accepted == 4
    assert reopened.get_lease(lease.lease_id).state is LeaseState.SUBMITTED
    assert reopened.get_receipt(b"batch-1") == b"receipt:batch-1"
    assert len(reopened.ready_groups(0, 10)) == 2
    assert reopened.latest_version().version == 1
    assert _next_lease_number(reopened) == 1
    reopened.close()


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path):
    store = open_store(sqlite_url(tmp_path))
    with store.database.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == SQLITE_BUSY_TIMEOUT_MS
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    store.close()
    assert [path.name for path in tmp_path.iterdir() if path.suffix == ".sqlite3"] == [SQLITE_FILE_NAME]
    with pytest.raises(ValueError, match="NORMAL or FULL"):
        open_store(sqlite_url(tmp_path), sqlite_synchronous="OFF")


def test_rejects_unusable_urls(tmp_path: Path):
    with pytest.raises(ValueError, match="SQLite file"):
        open_store("sqlite://")
    with pytest.raises(ValueError, match="psycopg"):
        open_store("postgresql+psycopg2://postgres@127.0.0.1/test")
    with pytest.raises(ValueError, match="SQLite or PostgreSQL"):
        open_store("mysql://localhost/test")


# ---- nodes ----


def test_register_heartbeat_and_states(store: Store):
    registered = store.register_node("node-a", b"k" * 32, "alice", "torch", "cpu x2", "0.1.0", T0)
    assert (registered.registered_ms, registered.last_seen_ms, registered.policy_version) == (T0, T0, 0)
    assert registered.state(T0 + 29_999, LIVENESS) is NodeState.ONLINE
    assert registered.state(T0 + 30_000, LIVENESS) is NodeState.STALE
    assert registered.state(T0 + 120_000, LIVENESS) is NodeState.OFFLINE

    beat = store.heartbeat("node-a", policy_version=4, tokens_per_s=12.5, now_ms=T0 + 50_000)
    assert (beat.policy_version, beat.tokens_per_s, beat.last_seen_ms) == (4, 12.5, T0 + 50_000)

    again = store.register_node("node-a", b"k" * 32, "alice-2", "vllm", "H200", "0.2.0", T0 + 60_000)
    assert (again.display_name, again.engine, again.registered_ms, again.policy_version) == ("alice-2", "vllm", T0, 4)
    with pytest.raises(NodeKeyMismatchError):
        store.register_node("node-a", b"x" * 32, "mallory", "torch", "cpu", "0.1.0", T0)
    with pytest.raises(UnknownNodeError):
        store.heartbeat("node-unknown", 1, 1.0, T0)
    assert [node.node_id for node in store.list_nodes()] == ["node-a"]
    assert store.get_node("node-unknown") is None


def test_heartbeats_are_recorded_in_batches(store: Store):
    _register(store, "node-a")
    _register(store, "node-b")
    store.record_heartbeats([("node-a", 3, 7.5, T0 + 100), ("node-b", 2, 1.0, T0 + 50), ("node-unknown", 1, 1.0, T0)])
    store.record_heartbeats([("node-a", 1, 0.0, T0 + 10)])  # older than what is stored: ignored
    a, b = store.get_node("node-a"), store.get_node("node-b")
    assert (a.policy_version, a.tokens_per_s, a.last_seen_ms) == (3, 7.5, T0 + 100)
    assert (b.policy_version, b.last_seen_ms) == (2, T0 + 50)
    store.record_heartbeats([])


def test_ban_unban_and_full_checks(store: Store):
    _register(store)
    banned = store.ban_node("node-a", "failed sampling check")
    assert banned.banned and banned.ban_reason == "failed sampling check"
    assert banned.state(T0, LIVENESS) is NodeState.BANNED
    assert not store.unban_node("node-a").banned
    with pytest.raises(UnknownNodeError):
        store.ban_node("node-unknown", "x")

    group_ids = []
    for batch_hash in (b"batch-1", b"batch-2"):
        _, submission = _leased_submission(store, "node-a", batch_hash, state=GroupState.PENDING_VALIDATION)
        store.record_submission(submission)
        group_ids += [group.group_id for group in submission.groups]
    passes = [NewValidation(group_id, True, "all", "{}") for group_id in group_ids[:3]]
    passed = store.record_validations(passes, T0, max_strikes=2, probation_tokens=0)[-1].node
    assert (passed.num_full_checks_passed, passed.num_strikes) == (3, 0)
    assert passed.reputation == reputation(3, 0) == 3 / 13
    failure = [NewValidation(group_ids[3], False, "sampling", "{}")]
    failed = store.record_validations(failure, T0, max_strikes=2, probation_tokens=0)[0].node
    assert (failed.num_full_checks_passed, failed.num_full_checks_failed, failed.num_strikes) == (3, 1, 1)
    assert failed.reputation == reputation(3, 1) < passed.reputation


def test_nodes_holding_each_version(store: Store):
    for node_id, version in [("node-a", 1), ("node-b", 2), ("node-c", 2), ("node-d", 2)]:
        _register(store, node_id)
        store.heartbeat(node_id, version, 1.0, T0 + 10)
    store.heartbeat("node-d", 2, 1.0, T0 - 10**6)
    store.ban_node("node-c", "x")
    assert store.num_nodes_holding(seen_since_ms=T0) == {1: 1, 2: 1}


# ---- leases ----


def test_lease_numbers_count_up_and_survive(store: Store):
    assert [_next_lease_number(store) for _ in range(3)] == [0, 1, 2]


def test_issue_lease_caps_open_leases_per_node(store: Store):
    _register(store)
    first = store.issue_lease("node-a", T0, 2, _fresh_factory("node-a"))
    second = store.issue_lease("node-a", T0, 2, _fresh_factory("node-a"))
    assert (first.lease_number, second.lease_number) == (0, 1)
    assert store.get_lease(first.lease_id) == first
    assert _count_open_leases(store, "node-a", T0) == 2
    with pytest.raises(LeaseCapError, match="cap is 2"):
        store.issue_lease("node-a", T0, 2, _fresh_factory("node-a"))
    # a refused request takes no lease number
    assert _next_lease_number(store) == 2
    with pytest.raises(UnknownNodeError):
        store.issue_lease("node-unknown", T0, 2, _fresh_factory("node-unknown"))
    store.close_lease(first.lease_id, LeaseState.SUBMITTED, T0 + 5)
    assert _count_open_leases(store, "node-a", T0 + 5) == 1
    # a lease past its deadline does not count, even before expire_leases ran
    assert _count_open_leases(store, "node-a", T0 + 60_000) == 0


def test_expired_and_released_leases_are_requeued_first(store: Store):
    _register(store)
    _register(store, "node-b")
    expiring = store.issue_lease("node-a", T0, 5, _fresh_factory("node-a", deadline_ms=1_000))
    released = store.issue_lease("node-a", T0, 5, _fresh_factory("node-a", deadline_ms=10_000))
    kept = store.issue_lease("node-a", T0, 5, _fresh_factory("node-a", deadline_ms=10_000))

    assert store.expire_leases(T0 + 999) == []
    expired = store.expire_leases(T0 + 1_000)
    assert [lease.lease_id for lease in expired] == [expiring.lease_id]
    assert expired[0].state is LeaseState.EXPIRED
    assert store.expire_leases(T0 + 1_000) == []
    assert store.close_lease(released.lease_id, LeaseState.RELEASED, T0 + 2_000)
    assert not store.close_lease(released.lease_id, LeaseState.SUBMITTED, T0 + 2_000)
    assert store.close_lease(kept.lease_id, LeaseState.SUBMITTED, T0 + 2_000)
    assert store.num_requeued() == 2

    again = store.issue_lease("node-b", T0 + 3_000, 5, _fresh_factory("node-b"))
    assert (again.lease_number, again.prompt_indices) == (expiring.lease_number, expiring.prompt_indices)
    taken = store.issue_lease("node-b", T0 + 3_000, 5, _fresh_factory("node-b"))
    assert (taken.lease_number, taken.prompt_indices) == (released.lease_number, released.prompt_indices)
    assert store.num_requeued() == 0
    assert store.issue_lease("node-b", T0 + 3_000, 5, _fresh_factory("node-b")).lease_number == 3

    with pytest.raises(UnknownLeaseError):
        store.close_lease("no-such-lease", LeaseState.SUBMITTED, T0)
    with pytest.raises(ValueError):
        store.close_lease(kept.lease_id, LeaseState.EXPIRED, T0)


def test_open_leases_are_extended_after_a_restart(store: Store):
    _register(store)
    lease = store.issue_lease("node-a", T0, 10, _fresh_factory("node-a", deadline_ms=1_000))
    closed = store.issue_lease("node-a", T0, 10, _fresh_factory("node-a", deadline_ms=1_000))
    store.close_lease(closed.lease_id, LeaseState.RELEASED, T0 + 1)
    assert store.extend_open_leases(T0 + 50_000) == 1
    assert store.get_lease(lease.lease_id).deadline_ms == T0 + 50_000
    assert store.get_lease(closed.lease_id).deadline_ms == T0 + 1_000
    assert store.extend_open_leases(T0 + 10_000) == 0


def test_a_submission_closes_only_a_lease_of_its_own_node(store: Store):
    _register(store, "node-a")
    _register(store, "node-b")
    lease = store.issue_lease("node-a", T0, 10, _fresh_factory("node-a"))
    foreign = dataclasses.replace(_submission(lease, b"forged"), node_id="node-b", groups=(), rollout_hashes=())
    store.record_submission(foreign)
    assert store.get_lease(lease.lease_id).state is LeaseState.OPEN


def test_create_lease_stores_a_lease_as_given(store: Store):
    _register(store)
    lease = _lease("node-a", 7, (3, 1, 4))
    store.create_lease(lease)
    assert store.get_lease(lease.lease_id) == lease
    assert store.get_lease("missing") is None


# ---- submissions ----


def test_submission_is_stored_once_and_resends_get_the_same_receipt(store: Store):
    _register(store)
    lease, submission = _leased_submission(store, "node-a", b"batch-1")
    assert _seen_rollout_hashes(store, submission.rollout_hashes) == set()

    outcome = store.record_submission(submission)
    assert outcome.newly_stored and outcome.receipt == b"receipt:batch-1"
    assert store.get_lease(lease.lease_id).state is LeaseState.SUBMITTED
    assert _seen_rollout_hashes(store, [*submission.rollout_hashes, b"other"]) == set(submission.rollout_hashes)

    resent = store.record_submission(NewSubmission(**{**submission.__dict__, "receipt": b"a different receipt"}))
    assert not resent.newly_stored and resent.receipt == b"receipt:batch-1"
    node = store.get_node("node-a")
    assert (node.num_rollouts_accepted, node.num_rollouts_rejected) == (4, 1)
    assert _group_counts(store)[GroupState.READY] == 2
    assert len(store.list_submissions("node-a", 10)) == 1
    assert store.get_receipt(b"batch-unknown") is None


def test_a_copied_rollout_is_refused_and_nothing_is_written(store: Store):
    _register(store)
    _register(store, "node-b")
    _, original = _leased_submission(store, "node-a", b"batch-1")
    store.record_submission(original)
    _, copy = _leased_submission(store, "node-b", b"batch-2", hashes=(original.rollout_hashes[0], b"fresh"))
    with pytest.raises(DuplicateRolloutError) as raised:
        store.record_submission(copy)
    assert raised.value.hashes == {original.rollout_hashes[0]}
    assert store.get_receipt(b"batch-2") is None
    assert _seen_rollout_hashes(store, [b"fresh"]) == set()
    assert store.get_node("node-b").num_rollouts_accepted == 0
    lease, doubled = _leased_submission(store, "node-b", b"batch-3", hashes=(b"h", b"h"))
    with pytest.raises(ValueError, match="twice"):
        store.record_submission(doubled)
    assert store.get_lease(lease.lease_id).state is LeaseState.OPEN


def test_a_submission_of_an_unknown_node_is_refused(store: Store):
    _register(store)
    lease, submission = _leased_submission(store, "node-a", b"batch-1")
    with pytest.raises(UnknownNodeError):
        store.record_submission(NewSubmission(**{**submission.__dict__, "node_id": "node-unknown"}))
    assert store.get_receipt(b"batch-1") is None


def test_submissions_and_rejections_for_the_dashboard(store: Store):
    _register(store)
    _, first = _leased_submission(store, "node-a", b"batch-1", now_ms=T0 + 1_000, state=GroupState.PENDING_VALIDATION)
    _, second = _leased_submission(store, "node-a", b"batch-2", now_ms=T0 + 2_000, num_rejected=2)
    store.record_submission(first)
    store.record_submission(second)
    assert [s.batch_hash for s in store.list_submissions("node-a", 10)] == [b"batch-2", b"batch-1"]
    assert [(s.num_accepted, s.num_rejected) for s in store.list_submissions("node-a", 1)] == [(4, 2)]

    failed_group = first.groups[0].group_id
    _record_validation(store, failed_group, False, "sampling", '{"position": 7}', T0 + 3_000)
    rejections = store.list_rejections("node-a", 10)
    assert [r.source for r in rejections] == [RejectionSource.VALIDATION] + [RejectionSource.SUBMISSION] * 3
    assert rejections[0].reason == "sampling" and rejections[0].evidence_json == '{"position": 7}'
    assert rejections[1].reason == "reward_mismatch" and rejections[1].sample_index is not None
    assert len(store.list_rejections("node-a", 2)) == 2
    assert store.list_rejections("node-b", 10) == []


# ---- groups and the trainer ----


def _ids(groups) -> list[str]:
    return [group.group_id for group in groups]


def test_ready_groups_oldest_first_above_a_version_of_nodes_in_good_standing(store: Store):
    for node_id in ("node-a", "node-b"):
        _register(store, node_id)
    _, old = _leased_submission(store, "node-a", b"batch-1", policy_version=1)
    _, new = _leased_submission(store, "node-a", b"batch-2", policy_version=3)
    _, other = _leased_submission(store, "node-b", b"batch-3", policy_version=3)
    _, pending = _leased_submission(store, "node-a", b"batch-4", state=GroupState.PENDING_VALIDATION)
    for submission in (old, new, other, pending):
        store.record_submission(submission)
    assert _ids(store.ready_groups(0, 100)) == _ids(old.groups) + _ids(new.groups) + _ids(other.groups)
    assert _ids(store.ready_groups(2, 3)) == _ids(new.groups) + _ids(other.groups)[:1]
    store.ban_node("node-b", "x")
    assert _ids(store.ready_groups(2, 100)) == _ids(new.groups)
    stored = store.get_group(new.groups[0].group_id)
    assert (stored.group_bytes, stored.policy_version, stored.node_id, stored.state) == (
        new.groups[0].group_bytes,
        3,
        "node-a",
        GroupState.READY,
    )


def test_no_group_is_consumed_twice(store: Store):
    _register(store)
    _, submission = _leased_submission(store, "node-a", b"batch-1")
    _, pending = _leased_submission(store, "node-a", b"batch-2", state=GroupState.PENDING_VALIDATION)
    store.record_submission(submission)
    store.record_submission(pending)
    first, second = (group.group_id for group in submission.groups)

    outcome = store.mark_consumed([first, first], trainer_step=1, now_ms=T0 + 5)
    assert (outcome.consumed, outcome.already_consumed, outcome.refused) == ((first,), (), ())
    resent = store.mark_consumed([first], trainer_step=1, now_ms=T0 + 5)  # the same ack, its reply lost
    assert (resent.consumed, resent.already_consumed, resent.refused) == ((first,), (), ())
    outcome = store.mark_consumed([first, second, pending.groups[0].group_id, "unknown"], trainer_step=2, now_ms=T0 + 6)
    assert outcome.consumed == (second,)
    assert outcome.already_consumed == (first,)
    assert outcome.refused == (pending.groups[0].group_id, "unknown")
    assert [(c.group_id, c.trainer_step) for c in _list_consumptions(store)] == [(first, 1), (second, 2)]
    assert store.set_group_state([first], GroupState.QUARANTINED, T0 + 7) == 0
    assert store.get_group(first).state is GroupState.CONSUMED

    with pytest.raises(IntegrityError), store.database.write_engine.begin() as connection:
        connection.execute(insert(GroupConsumption).values(group_id=first, trainer_step=3, consumed_ms=T0))


def test_a_resumed_trainer_gets_back_the_groups_of_its_lost_steps(store: Store):
    _register(store)
    _, first = _leased_submission(store, "node-a", b"batch-1")
    _, second = _leased_submission(store, "node-a", b"batch-2")
    store.record_submission(first)
    store.record_submission(second)
    kept, lost = (g.group_id for g in first.groups), (g.group_id for g in second.groups)
    kept, lost = list(kept), list(lost)
    store.mark_consumed(kept, trainer_step=4, now_ms=T0)
    store.mark_consumed(lost, trainer_step=5, now_ms=T0)

    assert store.restore_consumed_after(4, T0 + 1) == 2
    assert [c.group_id for c in _list_consumptions(store)] == sorted(kept)
    assert all(store.get_group(g).state is GroupState.READY for g in lost)
    assert store.mark_consumed(lost, trainer_step=5, now_ms=T0 + 2).consumed == tuple(lost)
    assert sorted(c.trainer_step for c in _list_consumptions(store)) == [4, 4, 5, 5]
    assert store.restore_consumed_after(5, T0 + 3) == 0


def test_ready_groups_below_a_version_become_stale(store: Store):
    _register(store)
    _, old = _leased_submission(store, "node-a", b"batch-1", policy_version=2)
    _, new = _leased_submission(store, "node-a", b"batch-2", policy_version=4)
    store.record_submission(old)
    store.record_submission(new)
    assert store.mark_stale_below(3, T0 + 1) == 2
    assert {store.get_group(g.group_id).state for g in old.groups} == {GroupState.STALE}
    assert {store.get_group(g.group_id).state for g in new.groups} == {GroupState.READY}


def test_group_state_changes_follow_the_allowed_transitions(store: Store):
    _register(store)
    _, ready = _leased_submission(store, "node-a", b"batch-1")
    _, pending = _leased_submission(store, "node-a", b"batch-2", state=GroupState.PENDING_VALIDATION)
    store.record_submission(ready)
    store.record_submission(pending)
    ready_ids = [g.group_id for g in ready.groups]
    pending_ids = [g.group_id for g in pending.groups]

    assert store.mark_stale([ready_ids[0], pending_ids[0]], T0) == 2
    assert store.set_group_state(ready_ids, GroupState.READY, T0) == 0
    assert store.set_group_state(pending_ids[:1], GroupState.READY, T0) == 0
    assert store.set_group_state(pending_ids[1:], GroupState.READY, T0) == 1
    assert store.set_group_state([ready_ids[0]], GroupState.REJECTED, T0) == 0
    with pytest.raises(ValueError):
        store.set_group_state(ready_ids, GroupState.CONSUMED, T0)
    with pytest.raises(ValueError):
        store.set_group_state(ready_ids, GroupState.PENDING_VALIDATION, T0)
    counts = _group_counts(store)
    assert (counts[GroupState.STALE], counts[GroupState.READY], counts[GroupState.PENDING_VALIDATION]) == (2, 2, 0)
    assert counts[GroupState.CONSUMED] == counts[GroupState.QUARANTINED] == counts[GroupState.REJECTED] == 0
    assert store.count_groups([GroupState.READY, GroupState.PENDING_VALIDATION]) == 2
    assert store.count_groups([GroupState.STALE, GroupState.READY]) == 4
    assert store.count_groups([]) == 0


def test_quarantine_takes_the_nodes_unconsumed_groups_verified_or_not(store: Store):
    for node_id in ("node-a", "node-b"):
        _register(store, node_id)
    _, ready = _leased_submission(store, "node-a", b"batch-1")
    _, pending = _leased_submission(store, "node-a", b"batch-2", state=GroupState.PENDING_VALIDATION)
    _, other = _leased_submission(store, "node-b", b"batch-3")
    for submission in (ready, pending, other):
        store.record_submission(submission)
    consumed_id, unverified_id = (g.group_id for g in ready.groups)
    verified_id, pending_id = (g.group_id for g in pending.groups)
    store.mark_consumed([consumed_id], 1, T0)
    store.record_validations([NewValidation(verified_id, True, "all", "{}")], T0, max_strikes=2, probation_tokens=0)
    assert store.get_group(verified_id).state is GroupState.READY

    failure = [NewValidation(pending_id, False, "sampling", "{}")]
    assert store.record_validations(failure, T0 + 1, max_strikes=2, probation_tokens=0)[0].num_quarantined == 2
    states = {gid: store.get_group(gid).state for gid in (consumed_id, unverified_id, verified_id, pending_id)}
    assert states == {
        consumed_id: GroupState.CONSUMED,
        unverified_id: GroupState.QUARANTINED,
        verified_id: GroupState.QUARANTINED,
        pending_id: GroupState.REJECTED,
    }
    assert all(g.state is GroupState.READY for g in map(store.get_group, (g.group_id for g in other.groups)))


# ---- validation ----


def test_a_group_is_lent_to_one_validator_at_a_time_across_stores(store_url: str):
    """Two stores on one database (replicas): a pending group lent by one is not lent by the other
    until its loan runs out; ready groups are never lent."""
    first, second = open_store(store_url), open_store(store_url)
    try:
        _register(first)
        _, pending = _leased_submission(first, "node-a", b"batch-1", state=GroupState.PENDING_VALIDATION)
        _, ready = _leased_submission(first, "node-a", b"batch-2")
        first.record_submission(pending)
        first.record_submission(ready)
        group_ids = [g.group_id for g in pending.groups]
        assert len(group_ids) >= 2
        lent = first.lend_for_validation("validator-1", 1, T0, T0 + 1000)
        assert [g.group_id for g in lent] == group_ids[:1]
        rest = second.lend_for_validation("validator-2", 10, T0 + 1, T0 + 1000)
        assert [g.group_id for g in rest] == group_ids[1:]
        assert second.lend_for_validation("validator-2", 10, T0 + 999, T0 + 2000) == []
        again = second.lend_for_validation("validator-2", 10, T0 + 1000, T0 + 2000)
        assert [g.group_id for g in again] == group_ids, "loans that ran out are lent again"
        _record_validation(first, group_ids[0], True, "all", "{}", T0 + 1500)
        assert [g.group_id for g in first.lend_for_validation("v", 10, T0 + 5000, T0 + 6000)] == group_ids[1:]
    finally:
        first.close()
        second.close()


def test_validation_jobs_and_results(store: Store):
    _register(store)
    _, pending = _leased_submission(store, "node-a", b"batch-1", state=GroupState.PENDING_VALIDATION)
    _, ready = _leased_submission(store, "node-a", b"batch-2")
    store.record_submission(pending)
    store.record_submission(ready)
    jobs = store.pending_validation(10)
    assert [job.group_id for job in jobs] == [g.group_id for g in pending.groups]
    assert jobs[0].group_bytes == pending.groups[0].group_bytes and not jobs[0].verified

    passed = _record_validation(store, jobs[0].group_id, True, "all", '{"max_drift": 0.01}', T0 + 10)
    assert (passed.node_id, passed.passed) == ("node-a", True)
    _record_validation(store, jobs[1].group_id, False, "commitment", '{"mismatches": 40}', T0 + 11)
    _record_validation(store, ready.groups[0].group_id, True, "all", "{}", T0 + 12)
    assert store.get_group(jobs[0].group_id).state is GroupState.READY and store.get_group(jobs[0].group_id).verified
    assert store.get_group(jobs[1].group_id).state is GroupState.REJECTED
    assert store.get_group(ready.groups[0].group_id).verified
    assert store.pending_validation(10) == []
    assert [v.check_name for v in store.list_validations("node-a", 10)] == ["all", "commitment", "all"]
    with pytest.raises(ValueError):
        _record_validation(store, "unknown", True, "all", "{}", T0)


def test_record_validations_of_a_batch(store: Store):
    for node_id in ("node-a", "node-b"):
        _register(store, node_id)
    _, pending = _leased_submission(store, "node-a", b"batch-1", state=GroupState.PENDING_VALIDATION)
    _, ready = _leased_submission(store, "node-a", b"batch-2")
    _, other = _leased_submission(store, "node-b", b"batch-3", state=GroupState.PENDING_VALIDATION)
    for submission in (pending, ready, other):
        store.record_submission(submission)
    first, second = (g.group_id for g in pending.groups)
    failing, quarantined = (g.group_id for g in other.groups)
    outcomes = store.record_validations(
        [
            NewValidation(first, True, "all", "{}"),
            NewValidation(ready.groups[0].group_id, True, "all", "{}"),  # not pending validation: skipped
            NewValidation(quarantined, True, "all", "{}"),  # its node failed in this batch: quarantined first
            NewValidation(failing, False, "sampling", '{"position": 3}'),
            NewValidation("unknown", True, "all", "{}"),
            NewValidation(first, False, "all", "{}"),  # listed twice: recorded once, its pass (node-a's first)
            NewValidation(second, True, "all", "{}"),
        ],
        T0 + 10,
        max_strikes=2,
        probation_tokens=10_000,
    )
    assert [o is None for o in outcomes] == [False, True, True, False, True, True, False]
    passed, failed = outcomes[0], outcomes[3]
    assert (passed.result.group_id, passed.result.passed, failed.result.check_name) == (first, True, "sampling")
    assert failed.node.num_strikes == 1 and failed.struck and failed.num_quarantined == 1
    assert outcomes[6].node.num_full_checks_passed == 2 and outcomes[6].node.num_checked_tokens == 200
    # node-a is on probation (new): its passed groups are held, not ready
    assert {store.get_group(g).state for g in (first, second)} == {GroupState.PROBATION}
    assert store.get_group(first).verified
    assert store.get_group(failing).state is GroupState.REJECTED
    assert store.get_group(quarantined).state is GroupState.QUARANTINED
    assert store.get_node("node-b").num_full_checks_failed == 1
    assert sorted(v.check_name for v in store.list_validations("node-a", 10)) == ["all", "all"]
    assert store.record_validations([], T0, max_strikes=2, probation_tokens=0) == []


def test_node_chunk_windows_keep_each_nodes_newest_chunks_once(store: Store):
    """A node's window sums its newest window_size chunks, in the order groups were added; a group
    adds its chunks only while it waits for validation, and only once."""
    for node_id in ("node-a", "node-b"):
        _register(store, node_id)
    groups_a: list[str] = []
    for i in range(3):
        _, submission = _leased_submission(store, "node-a", f"a-{i}".encode(), state=GroupState.PENDING_VALIDATION)
        store.record_submission(submission)
        groups_a += [g.group_id for g in submission.groups]
    _, other = _leased_submission(store, "node-b", b"b-0", state=GroupState.PENDING_VALIDATION)
    _, ready = _leased_submission(store, "node-a", b"a-ready")
    store.record_submission(other)
    store.record_submission(ready)
    group_b = other.groups[0].group_id
    rng = random.Random(7)

    def chunks(num_chunks: int) -> list[ChunkStats]:  # sums of quarters add up exactly in any order
        return [ChunkStats(rng.randrange(3), rng.randrange(400) / 4, rng.randrange(20, 40)) for _ in range(num_chunks)]

    def window_of(added: list[ChunkStats], node_id: str = "node-a") -> ChunkWindow:
        newest = added[-5:]
        return ChunkWindow(
            node_id,
            len(newest),
            sum(c.exponent_mismatches for c in newest),
            sum(c.mantissa_error_sum for c in newest),
            sum(c.num_matched for c in newest),
        )

    stats = {group_id: chunks(n) for group_id, n in zip(groups_a, (2, 3, 1, 4, 2, 0), strict=True)}
    stats_b = chunks(3)
    assert store.add_node_chunks(
        [(groups_a[0], stats[groups_a[0]]), (group_b, stats_b), (groups_a[1], stats[groups_a[1]])], window_size=5
    ) == [
        window_of(stats[groups_a[0]]),
        window_of(stats_b, "node-b"),
        window_of(stats[groups_a[0]] + stats[groups_a[1]]),
    ]
    _record_validation(store, groups_a[3], True, "all", "{}", T0)
    assert store.add_node_chunks(
        [
            (groups_a[0], stats[groups_a[0]]),  # added before
            (ready.groups[0].group_id, chunks(2)),  # never waited for validation
            ("unknown", chunks(2)),
            (groups_a[3], stats[groups_a[3]]),  # decided already
            (groups_a[5], stats[groups_a[5]]),  # no chunks
            (groups_a[2], stats[groups_a[2]]),
            (groups_a[4], stats[groups_a[4]]),
        ],
        window_size=5,
    ) == [
        None,
        None,
        None,
        None,
        None,
        window_of(stats[groups_a[0]] + stats[groups_a[1]] + stats[groups_a[2]]),
        window_of(stats[groups_a[0]] + stats[groups_a[1]] + stats[groups_a[2]] + stats[groups_a[4]]),
    ]
    assert store.add_node_chunks([], window_size=5) == []
    store.ban_node("node-a", "window")
    store.unban_node("node-a")  # the window starts over
    stats[groups_a[5]] = chunks(2)
    assert store.add_node_chunks([(groups_a[5], stats[groups_a[5]])], window_size=5) == [window_of(stats[groups_a[5]])]


# ---- policy versions and metrics ----


def test_policy_versions(store: Store):
    assert store.latest_version() is None
    keyframe = PolicyVersionRecord(0, 0, Codec.KEYFRAME, b"\x00signed-0", 1_000, 2_000, T0)
    delta = PolicyVersionRecord(1, 0, Codec.DELTA, b"\x00signed-1", 20, 2_000, T0 + 1)
    store.add_version(delta)
    store.add_version(keyframe)
    assert store.list_versions() == [keyframe, delta]
    assert store.get_version(1) == delta and store.get_version(2) is None
    assert store.latest_version() == delta
    with pytest.raises(VersionExistsError):
        store.add_version(delta)


def test_trainer_metrics(store: Store):
    for step in range(5):
        store.add_metrics(step, f'{{"reward": {step / 10}}}', T0 + step)
    assert [(m.step, m.metrics_json) for m in store.list_metrics(2)] == [(3, '{"reward": 0.3}'), (4, '{"reward": 0.4}')]
    assert [m.step for m in store.list_metrics_between(1, 3, max_rows=10)] == [1, 2, 3]
    # more steps than max_rows in the range: every k-th from the first, k = ceil(5 / 2)
    assert [m.step for m in store.list_metrics_between(0, 10, max_rows=2)] == [0, 3]


# ---- contribution ledger ----


def test_contributions_settle_after_the_window_and_are_voided_on_failure(store: Store):
    for node_id in ("node-a", "node-b", "node-c"):
        _register(store, node_id)
    _, early = _leased_submission(store, "node-a", b"batch-1", now_ms=T0 + 1_000)
    _, waiting = _leased_submission(store, "node-a", b"batch-2", now_ms=T0 + 1_000, state=GroupState.PENDING_VALIDATION)
    _, late = _leased_submission(store, "node-a", b"batch-3", now_ms=T0 + 9_000)
    _, cheat = _leased_submission(store, "node-b", b"batch-4", now_ms=T0 + 1_000)
    _, banned = _leased_submission(store, "node-c", b"batch-5", now_ms=T0 + 1_000)
    for submission in (early, waiting, late, cheat, banned):
        store.record_submission(submission)
    store.ban_node("node-c", "x")
    assert _void_unsettled(store, "node-b") == 2

    assert store.settle_contributions(before_ms=T0 + 5_000) == 2
    assert store.settle_contributions(before_ms=T0 + 5_000) == 0
    totals = {t.node_id: t for t in store.contribution_totals()}
    assert (totals["node-a"].settled.num_entries, totals["node-a"].settled.num_tokens) == (2, 200)
    assert totals["node-a"].settled.num_rollouts == 4 and totals["node-a"].settled.flops_estimate == 3e9
    assert totals["node-a"].pending.num_entries == 4
    assert totals["node-a"].voided.num_entries == 0
    assert (totals["node-b"].voided.num_entries, totals["node-b"].pending.num_entries) == (2, 0)
    assert totals["node-c"].pending.num_entries == 2
    assert [t.node_id for t in store.contribution_totals("node-b")] == ["node-b"]
    # node-a's pending entries: the group waiting for a check (T0 + 1 s) and the late batch
    assert store.oldest_pending_ms("node-a") == T0 + 1_000
    assert store.oldest_pending_ms("node-b") is None  # voided
    assert _void_unsettled(store, "node-a") == 4
    assert store.contribution_totals("node-a")[0].settled.num_entries == 2


def test_contribution_timeline_sums_unvoided_work_per_bucket(store: Store):
    for node_id in ("node-a", "node-b"):
        _register(store, node_id)
    for batch_hash, now_ms in ((b"batch-1", T0 + 1_000), (b"batch-2", T0 + 4_000), (b"batch-3", T0 + 12_000)):
        _, submission = _leased_submission(store, "node-a", batch_hash, now_ms=now_ms)
        store.record_submission(submission)
    _, voided = _leased_submission(store, "node-b", b"batch-4", now_ms=T0 + 1_000)
    store.record_submission(voided)
    _void_unsettled(store, "node-b")
    store.settle_contributions(before_ms=T0 + 2_000)

    timeline = store.contribution_timeline("node-a", bucket_ms=10_000)
    assert [bucket.start_ms for bucket in timeline] == [T0, T0 + 10_000]
    assert [(b.work.num_entries, b.work.num_tokens, b.work.num_rollouts) for b in timeline] == [
        (4, 400, 8),
        (2, 200, 4),
    ]
    assert timeline[0].work.flops_estimate == 6e9
    assert store.contribution_timeline("node-b", bucket_ms=10_000) == []
    with pytest.raises(ValueError):
        store.contribution_timeline("node-a", bucket_ms=0)


# ---- run status ----


def test_run_counters(store: Store):
    empty = store.run_counters(online_since_ms=T0)
    assert (empty.num_nodes_online, empty.num_rollouts_accepted) == (0, 0)
    assert (empty.trainer_step, empty.latest_policy_version) == (0, 0)
    for node_id in ("node-a", "node-b", "node-c"):
        _register(store, node_id)
    store.heartbeat("node-c", 0, 0.0, T0 - 100_000)
    _, submission = _leased_submission(store, "node-a", b"batch-1")
    store.record_submission(submission)
    store.mark_consumed([submission.groups[0].group_id], trainer_step=6, now_ms=T0)
    store.mark_stale([submission.groups[1].group_id], T0)
    store.add_metrics(7, "{}", T0)
    store.add_version(PolicyVersionRecord(7, 6, Codec.DELTA, b"m", 1, 2, T0))
    counters = store.run_counters(online_since_ms=T0 - 30_000)
    assert (counters.num_nodes_online, counters.num_rollouts_accepted, counters.num_rollouts_rejected) == (2, 4, 1)
    assert (counters.num_groups[GroupState.CONSUMED], counters.num_groups[GroupState.STALE]) == (1, 1)
    assert (counters.trainer_step, counters.latest_policy_version) == (7, 7)


# ---- concurrency ----

NUM_THREADS = 8


def _run_in_threads(function: Callable[[int], object], num_calls: int) -> list:
    start = threading.Barrier(NUM_THREADS)

    def call(index: int) -> object:
        if index < NUM_THREADS:
            start.wait()
        return function(index)

    with ThreadPoolExecutor(NUM_THREADS) as pool:
        return list(pool.map(call, range(num_calls)))


def test_lease_numbers_are_unique_under_concurrency(store: Store):
    numbers = _run_in_threads(lambda _: _next_lease_number(store), 80)
    assert sorted(numbers) == list(range(80))


def test_concurrent_first_registrations_of_a_node(store: Store):
    def register(index: int):
        return store.register_node("node-a", b"k" * 32, f"box {index}", "torch", "cpu", "0.1.0", T0 + index)

    nodes = _run_in_threads(register, 16)
    assert len({node.registered_ms for node in nodes}) == 1
    assert len(store.list_nodes()) == 1


def test_concurrent_resends_store_a_batch_once(store: Store):
    _register(store)
    _, submission = _leased_submission(store, "node-a", b"batch-1")
    outcomes = _run_in_threads(lambda _: store.record_submission(submission), 16)
    assert sum(outcome.newly_stored for outcome in outcomes) == 1
    assert {outcome.receipt for outcome in outcomes} == {submission.receipt}
    assert store.get_node("node-a").num_rollouts_accepted == 4


def test_concurrent_acks_consume_each_group_once(store: Store):
    _register(store)
    group_ids = []
    for index in range(4):
        _, submission = _leased_submission(store, "node-a", f"batch-{index}".encode())
        store.record_submission(submission)
        group_ids += [group.group_id for group in submission.groups]
    outcomes = _run_in_threads(lambda step: store.mark_consumed(group_ids, step, T0), 16)
    consumed = [group_id for outcome in outcomes for group_id in outcome.consumed]
    assert sorted(consumed) == sorted(group_ids)
    assert len(_list_consumptions(store)) == len(group_ids)


def test_concurrent_lease_requests_respect_the_cap_and_the_requeue(store: Store):
    _register(store)
    _register(store, "node-b")
    for _ in range(3):
        store.issue_lease("node-b", T0, 10, _fresh_factory("node-b", deadline_ms=10))
    store.expire_leases(T0 + 10)

    def request(_: int) -> LeaseRecord | None:
        try:
            return store.issue_lease("node-a", T0 + 20, 5, _fresh_factory("node-a", now_ms=T0 + 20))
        except LeaseCapError:
            return None

    leases = [lease for lease in _run_in_threads(request, 16) if lease is not None]
    assert len(leases) == 5
    assert sorted(lease.lease_number for lease in leases) == [0, 1, 2, 3, 4]
    assert store.num_requeued() == 0


def test_concurrent_submissions_keep_the_rules_of_one_at_a_time(store: Store):
    """Submissions written together (on SQLite in one group-commit transaction) behave as if
    written one by one: a resend gets the stored receipt, and of two submissions sharing a
    rollout exactly one is stored while the other is refused whole."""
    _register(store)
    originals = [_leased_submission(store, "node-a", f"batch-{index}".encode())[1] for index in range(NUM_THREADS)]
    # each odd submission copies the first rollout of the even one before it
    submissions = [
        submission
        if index % 2 == 0
        else dataclasses.replace(
            submission, rollout_hashes=(originals[index - 1].rollout_hashes[0], *submission.rollout_hashes[1:])
        )
        for index, submission in enumerate(originals)
    ]

    def submit(index: int) -> object:
        try:
            return store.record_submission(submissions[index % NUM_THREADS])
        except DuplicateRolloutError as refused:
            return refused

    answers = _run_in_threads(submit, 2 * NUM_THREADS)
    stored = []
    for index, submission in enumerate(submissions):
        own = [answers[index], answers[index + NUM_THREADS]]
        if store.get_receipt(submission.batch_hash) is None:
            assert all(isinstance(answer, DuplicateRolloutError) for answer in own)
            continue
        stored.append(submission)
        assert sorted(answer.newly_stored for answer in own) == [False, True]
        assert {answer.receipt for answer in own} == {submission.receipt}
    assert sorted(index // 2 for index, s in enumerate(submissions) if s in stored) == list(range(NUM_THREADS // 2))
    assert store.get_node("node-a").num_rollouts_accepted == 4 * len(stored)
    assert len(store.list_submissions("node-a", 100)) == len(stored)
    all_hashes = [h for submission in submissions for h in submission.rollout_hashes]
    assert _seen_rollout_hashes(store, all_hashes) == {h for submission in stored for h in submission.rollout_hashes}


def test_a_failing_request_among_concurrent_ones_fails_alone(store: Store):
    _register(store)
    leased = [_leased_submission(store, "node-a", f"batch-{index}".encode()) for index in range(NUM_THREADS)]

    def request(index: int) -> object:
        try:
            if index % 4 == 0:
                return store.record_submission(dataclasses.replace(leased[index][1], node_id="node-unknown"))
            if index % 4 == 1:
                return store.issue_lease("node-unknown", T0, 100, _fresh_factory("node-unknown"))
            if index % 4 == 2:
                return store.record_submission(leased[index][1])
            return store.issue_lease("node-a", T0, 100, _fresh_factory("node-a"))
        except UnknownNodeError as refused:
            return refused

    answers = _run_in_threads(request, NUM_THREADS)
    for index, answer in enumerate(answers):
        if index % 4 in (0, 1):
            assert isinstance(answer, UnknownNodeError)
        elif index % 4 == 2:
            assert answer.newly_stored and store.get_lease(leased[index][0].lease_id).state is LeaseState.SUBMITTED
        else:
            assert store.get_lease(answer.lease_id) == answer
    assert {s.batch_hash for s in store.list_submissions("node-a", 100)} == {
        leased[index][1].batch_hash for index in range(NUM_THREADS) if index % 4 == 2
    }


# ---- exactly-once resume (issue 17) ----


def test_a_step_reported_again_replaces_its_metrics(store: Store):
    for step in (1, 2, 3):
        store.add_metrics(step, f'{{"run": "first", "step": {step}}}', T0 + step)
    store.add_metrics(2, '{"run": "resumed", "step": 2}', T0 + 10)
    store.add_metrics(2, '{"run": "resumed", "step": 2}', T0 + 11)
    assert [(m.step, m.metrics_json, m.created_ms) for m in store.list_metrics(10)] == [
        (1, '{"run": "first", "step": 1}', T0 + 1),
        (2, '{"run": "resumed", "step": 2}', T0 + 11),
        (3, '{"run": "first", "step": 3}', T0 + 3),
    ]


def test_a_trainer_resumed_at_step_zero_gets_back_every_consumed_group(store: Store):
    _register(store)
    _, first = _leased_submission(store, "node-a", b"batch-1")
    _, second = _leased_submission(store, "node-a", b"batch-2")
    store.record_submission(first)
    store.record_submission(second)
    group_ids = [g.group_id for g in first.groups + second.groups]
    store.mark_consumed(group_ids[:2], trainer_step=1, now_ms=T0)
    store.mark_consumed(group_ids[2:], trainer_step=2, now_ms=T0)

    assert store.restore_consumed_after(0, T0 + 1) == len(group_ids)
    assert _list_consumptions(store) == []
    assert all(store.get_group(g).state is GroupState.READY for g in group_ids)
    assert store.restore_consumed_after(0, T0 + 2) == 0


def test_the_migration_keeps_the_last_report_of_a_step_reported_twice(store_url: str):
    from alembic import command
    from sqlalchemy import create_engine

    from coordinator.store.migrate import alembic_config
    from coordinator.store.schema import TrainerMetrics

    engine = create_engine(store_url)
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0002")
        connection.execute(
            insert(TrainerMetrics.__table__),
            [
                {"step": step, "metrics_json": json, "created_ms": T0}
                for step, json in [(1, '{"a": 1}'), (2, '{"a": 2}'), (2, '{"b": 2}'), (3, '{"a": 3}'), (2, '{"c": 2}')]
            ],
        )
    engine.dispose()
    upgraded = open_store(store_url)
    assert [(m.step, m.metrics_json) for m in upgraded.list_metrics(10)] == [
        (1, '{"a": 1}'),
        (2, '{"c": 2}'),
        (3, '{"a": 3}'),
    ]
    upgraded.close()


# ---- verdicts: probation, one strike per submission, consequences in the verdict's transaction ----


def _pending_submissions(store: Store, node_id: str, count: int, tag: str = "") -> list[list[str]]:
    """count stored submissions of the node, two groups each, pending validation: their group ids."""
    submissions = []
    for i in range(count):
        _, submission = _leased_submission(
            store, node_id, f"{node_id}-{tag}{i}".encode(), state=GroupState.PENDING_VALIDATION
        )
        store.record_submission(submission)
        submissions.append([g.group_id for g in submission.groups])
    return submissions


def _record(
    store: Store, *results: NewValidation, now_ms: int = T0 + 10, max_strikes: int = 2, probation_tokens: int = 300
):
    return store.record_validations(list(results), now_ms, max_strikes=max_strikes, probation_tokens=probation_tokens)


def test_probation_holds_a_new_nodes_groups_until_a_passed_window_verdict_after_enough_tokens(store: Store):
    _register(store)
    assert store.get_node("node-a").on_probation  # a new node
    (a1, a2), (b1, b2) = _pending_submissions(store, "node-a", 2)  # 100 tokens a group
    _record(store, NewValidation(a1, True, "all", "{}", window_verdict=True))
    assert store.get_group(a1).state is GroupState.PROBATION  # 100 tokens < 300: held
    assert store.ready_groups(0, 10) == []
    _record(store, NewValidation(a2, True, "all", "{}"), NewValidation(b1, True, "all", "{}"))
    assert store.get_node("node-a").num_checked_tokens == 300
    assert store.ready_groups(0, 10) == []  # enough tokens, but no node-level verdict yet
    (outcome,) = _record(store, NewValidation(b2, True, "all", "{}", window_verdict=True))
    assert outcome.probation_ended == 4 and not outcome.node.on_probation
    assert {g.group_id for g in store.ready_groups(0, 10)} == {a1, a2, b1, b2}  # all at once
    ((c1, _),) = _pending_submissions(store, "node-a", 1, tag="after")
    _record(store, NewValidation(c1, True, "all", "{}"))
    assert store.get_group(c1).state is GroupState.READY  # trusted now


def test_probation_tokens_0_holds_nothing(store: Store):
    _register(store)
    ((a1, a2),) = _pending_submissions(store, "node-a", 1)
    _record(store, NewValidation(a1, True, "all", "{}"), probation_tokens=0)
    assert store.get_group(a1).state is GroupState.READY and store.get_node("node-a").on_probation
    (outcome,) = _record(store, NewValidation(a2, True, "all", "{}", window_verdict=True), probation_tokens=0)
    assert outcome.probation_ended == 0 and not outcome.node.on_probation


def test_a_doubting_pass_puts_a_trusted_node_back_on_probation_and_holds_its_ready_groups(store: Store):
    _register(store)
    (a1, a2), (b1, b2) = _pending_submissions(store, "node-a", 2)
    _record(
        store,
        NewValidation(a1, True, "all", "{}"),
        NewValidation(a2, True, "all", "{}"),
        NewValidation(b1, True, "all", "{}", window_verdict=True),
        probation_tokens=0,
    )
    assert not store.get_node("node-a").on_probation
    store.mark_consumed([a1], 1, T0)
    (outcome,) = _record(store, NewValidation(b2, True, "commitment_pooled_doubt", "{}", suspect=True))
    assert outcome.result.passed and outcome.node.on_probation and outcome.node.num_strikes == 0
    assert outcome.node.probation_start_tokens == 300
    states = {g: store.get_group(g).state for g in (a1, a2, b1, b2)}
    assert states == {
        a1: GroupState.CONSUMED,
        a2: GroupState.PROBATION,
        b1: GroupState.PROBATION,
        b2: GroupState.PROBATION,
    }
    assert store.settle_contributions(T0 + 10**9) == 1  # only the consumed group's credit settles


def test_a_node_caught_on_probation_has_none_of_its_groups_consumed(store: Store):
    _register(store)
    (a1, a2), (b1, b2) = _pending_submissions(store, "node-a", 2)
    _record(store, NewValidation(a1, True, "all", "{}"), NewValidation(a2, True, "all", "{}"))
    (outcome,) = _record(store, NewValidation(b1, False, "commitment_node_pooled", "{}"))
    assert outcome.result.num_groups_consumed == 0 and outcome.num_quarantined == 3
    assert store.list_validations("node-a", 1)[0].num_groups_consumed == 0
    assert {store.get_group(g).state for g in (a1, a2, b2)} == {GroupState.QUARANTINED}
    assert _list_consumptions(store) == []


def test_one_strike_per_failing_submission_whatever_the_batching_and_on_re_reports(store: Store):
    for node_id in ("node-a", "node-b", "node-c"):
        _register(store, node_id)
    ((a1, a2),) = _pending_submissions(store, "node-a", 1)
    ((b1, b2),) = _pending_submissions(store, "node-b", 1)
    ((c1, c2),) = _pending_submissions(store, "node-c", 1)
    # node-a: both bad groups in one report
    outcomes = _record(store, NewValidation(a1, False, "sampling", "{}"), NewValidation(a2, False, "sampling", "{}"))
    assert sum(o is not None and o.struck for o in outcomes) == 1
    # node-b: one report each, the second again later (a re-report)
    _record(store, NewValidation(b1, False, "sampling", "{}"))
    for _ in range(2):
        assert _record(store, NewValidation(b2, False, "sampling", "{}"), NewValidation(b1, False, "x", "{}")) == [
            None,
            None,
        ]
    # node-c: a failure recorded without its consequences leaves a sibling pending: still one strike
    _record_validation(store, c1, False, "sampling", "{}", T0)
    (outcome,) = _record(store, NewValidation(c2, False, "sampling", "{}"))
    assert not outcome.struck and outcome.node.num_full_checks_failed == 1
    assert [store.get_node(n).num_strikes for n in ("node-a", "node-b", "node-c")] == [1, 1, 0]
    assert not any(store.get_node(n).banned for n in ("node-a", "node-b", "node-c"))


def test_ban_quarantine_and_voided_credit_are_written_with_the_verdict(store: Store):
    _register(store)
    (a1, _), (b1, b2), (c1, c2) = _pending_submissions(store, "node-a", 3)
    _, ready = _leased_submission(store, "node-a", b"ready")
    store.record_submission(ready)
    (first,) = _record(store, NewValidation(a1, False, "sampling", "{}"))
    assert first.struck and not first.banned_now and first.node.num_strikes == 1
    assert first.num_quarantined == 7 and first.num_voided == 8  # every other group; all credit
    assert {store.get_group(g).state for g in (b1, b2, c1, c2)} == {GroupState.QUARANTINED}
    _, later = _leased_submission(store, "node-a", b"later", state=GroupState.PENDING_VALIDATION)
    store.record_submission(later)
    (second,) = _record(store, NewValidation(later.groups[0].group_id, False, "commitment", "{}"))
    assert second.struck and second.banned_now and second.num_quarantined == 1 and second.num_voided == 2
    node = store.get_node("node-a")
    assert node.banned and node.num_strikes == 2
    assert node.ban_reason == "2 strikes (2 failed full checks); last failed check: commitment"
    totals = store.contribution_totals("node-a")[0]
    assert totals.pending.num_entries == 0 and totals.settled.num_entries == 0


# ---- walking away from leases ----

WALKAWAY_LIMIT = WalkAwayLimit(window_leases=4, max_walkaways=1, cooldown_ms=10_000, max_strikes=2)


def test_a_requeued_set_never_goes_back_to_a_node_that_held_it(store: Store):
    for node_id in ("node-a", "node-b", "node-c"):
        _register(store, node_id)
    released = store.issue_lease("node-a", T0, 5, _fresh_factory("node-a", deadline_ms=1_000))
    assert store.close_lease(released.lease_id, LeaseState.RELEASED, T0 + 1)
    assert store.issue_lease("node-a", T0 + 2, 5, _fresh_factory("node-a")).lease_number == 1
    expiring = store.issue_lease("node-b", T0 + 2, 5, _fresh_factory("node-b", deadline_ms=1_000, now_ms=T0 + 2))
    assert expiring.prompt_indices == released.prompt_indices
    for node_id in ("node-a", "node-b"):  # node-b let it expire: neither of them gets it again
        assert store.issue_lease(node_id, T0 + 5_000, 5, _fresh_factory(node_id)).lease_number != 0
    assert store.issue_lease("node-c", T0 + 5_000, 5, _fresh_factory("node-c")).lease_number == 0
    assert store.num_requeued() == 0


def test_a_requeued_set_keeps_its_version_while_that_may_be_leased(store: Store):
    for node_id in ("node-a", "node-b"):
        _register(store, node_id)
    released = store.issue_lease("node-a", T0, 5, _fresh_factory("node-a"))  # at version 3
    store.close_lease(released.lease_id, LeaseState.RELEASED, T0 + 1)
    at_4 = store.issue_lease("node-b", T0 + 2, 5, _fresh_factory("node-b"), policy_version=4, oldest_leasable_version=3)
    assert at_4.lease_number == 1
    at_3 = store.issue_lease("node-b", T0 + 2, 5, _fresh_factory("node-b"), policy_version=3, oldest_leasable_version=3)
    assert at_3.lease_number == 0


def test_walkaways_are_counted_cooled_down_struck_and_banned(store: Store):
    _register(store)
    for index, now in enumerate((T0, T0 + 20_000)):
        for step in range(2):
            lease = store.issue_lease(
                "node-a", now + step, 5, _fresh_factory("node-a", now_ms=now + step), walkaway_limit=WALKAWAY_LIMIT
            )
            store.close_lease(lease.lease_id, LeaseState.RELEASED, now + step, WALKAWAY_LIMIT)
        node = store.get_node("node-a")
        assert (node.num_leases_released, node.num_lease_cooldowns) == (2 * index + 2, index + 1)
        assert node.lease_cooldown_until_ms == now + 1 + 10_000
        with pytest.raises(LeaseCooldownError) as refused:
            store.issue_lease("node-a", now + 2, 5, _fresh_factory("node-a"), walkaway_limit=WALKAWAY_LIMIT)
        assert refused.value.until_ms == now + 10_001
    assert store.get_node("node-a").num_strikes == 1  # the second cool-down came within 4 leases of the first
    for step in range(2):
        now = T0 + 40_000 + step
        store.issue_lease(
            "node-a", now, 5, _fresh_factory("node-a", deadline_ms=5_000, now_ms=now), walkaway_limit=WALKAWAY_LIMIT
        )
    store.expire_leases(T0 + 50_000, WALKAWAY_LIMIT)
    node = store.get_node("node-a")
    assert (node.num_leases_expired, node.num_strikes, node.banned) == (2, 2, True)
    assert node.reputation == 0.0 and "walked away" in node.ban_reason
    outcomes = [(lease.state, lease.closed_ms) for lease in store.list_leases("node-a", 3)]
    assert outcomes == [(LeaseState.EXPIRED, T0 + 50_000)] * 2 + [(LeaseState.RELEASED, T0 + 20_001)]


def test_the_coordinator_secret_is_made_once_and_shared(store_url: str):
    first, second = open_store(store_url), open_store(store_url)
    made = _run_in_threads(lambda index: (first if index % 2 else second).secret("seed-key"), 8)
    assert len(set(made)) == 1 and len(made[0]) == 32
    first.close()
    second.close()
    reopened = open_store(store_url)
    assert reopened.secret("seed-key") == made[0]
    reopened.close()


def test_concurrent_requests_take_each_requeued_set_once_and_never_their_own(store: Store):
    for node_id in ("node-a", "node-b", "node-c"):
        _register(store, node_id)
    for _ in range(4):
        store.issue_lease("node-a", T0, 10, _fresh_factory("node-a", deadline_ms=10))
    store.expire_leases(T0 + 10)
    leases = _run_in_threads(
        lambda index: store.issue_lease(
            ("node-a", "node-b", "node-c")[index % 3],
            T0 + 20,
            10,
            _fresh_factory(("node-a", "node-b", "node-c")[index % 3]),
        ),
        12,
    )
    requeued = [lease for lease in leases if lease.lease_number < 4]
    assert sorted(lease.lease_number for lease in requeued) == [0, 1, 2, 3]
    assert all(lease.node_id != "node-a" for lease in requeued)
    assert store.num_requeued() == 0


def test_node_token_windows_keep_the_newest_groups_that_cover_the_window_once(store: Store):
    """A node's token window sums its newest groups that together cover window_tokens tokens; a group
    joins only while it waits for validation, and only once; an unban starts the window over."""
    for node_id in ("node-a", "node-b"):
        _register(store, node_id)
    groups_a: list[str] = []
    for i in range(2):
        _, submission = _leased_submission(store, "node-a", f"ta-{i}".encode(), state=GroupState.PENDING_VALIDATION)
        store.record_submission(submission)
        groups_a += [g.group_id for g in submission.groups]
    _, other = _leased_submission(store, "node-b", b"tb-0", state=GroupState.PENDING_VALIDATION)
    store.record_submission(other)
    group_b = other.groups[0].group_id

    def stats(num_tokens: int) -> TokenStats:  # quarters: sums are exact in any order
        return TokenStats(
            num_tokens,
            num_tokens // 50,
            num_tokens // 60,
            num_tokens // 120,
            num_tokens // 100,
            num_tokens / 200,
            num_tokens / 400,
            -num_tokens / 4,
            num_tokens / 8,
        )

    assert store.add_node_tokens(
        [(groups_a[0], stats(100)), (group_b, stats(70)), (groups_a[1], stats(200))], window_tokens=450
    ) == [
        TokenWindow("node-a", 1, stats(100), stats(100)),
        TokenWindow("node-b", 1, stats(70), stats(70)),
        TokenWindow("node-a", 2, stats(100) + stats(200), stats(100) + stats(200)),
    ]
    _record_validation(store, groups_a[3], True, "all", "{}", T0)
    lifetime = stats(100) + stats(200) + stats(300)  # every group the node passed, the window's oldest too
    assert store.add_node_tokens(
        [
            (groups_a[0], stats(100)),  # added before
            ("unknown", stats(10)),
            (groups_a[3], stats(50)),  # decided already
            (groups_a[2], stats(300)),  # 300 + 200 cover 450: the oldest group leaves
        ],
        window_tokens=450,
    ) == [None, None, None, TokenWindow("node-a", 2, stats(200) + stats(300), lifetime)]
    assert _node_token_window(store, "node-a") == TokenWindow("node-a", 2, stats(200) + stats(300), lifetime)
    assert store.add_node_tokens([], window_tokens=450) == []
    store.ban_node("node-a", "window")
    store.unban_node("node-a")  # the window and the lifetime sums start over
    assert _node_token_window(store, "node-a") == TokenWindow("node-a", 0, TokenStats(), TokenStats())
    assert _node_token_window(store, "node-b") == TokenWindow("node-b", 1, stats(70), stats(70))


def test_a_nonce_is_taken_once_across_stores_until_it_expires(store_url: str):
    first, second = open_store(store_url), open_store(store_url)  # two replicas on one store
    try:
        signer, nonce = bytes(range(32)), bytes(16)
        assert first.take_nonce(signer, nonce, T0 + 60_000)
        assert not second.take_nonce(signer, nonce, T0 + 60_000)
        assert second.take_nonce(bytes(32), nonce, T0 + 60_000), "another signer's nonce is its own"
        assert second.take_nonce(signer, bytes(15) + b"\x01", T0 + 30_000)
        assert first.forget_nonces(T0 + 30_000) == 0, "none had expired"
        assert first.forget_nonces(T0 + 30_001) == 1
        assert not first.take_nonce(signer, nonce, T0 + 60_000), "still remembered until it expires"
        assert second.forget_nonces(T0 + 60_001) == 2
        assert first.take_nonce(signer, nonce, T0 + 120_000)
    finally:
        first.close()
        second.close()


def test_one_store_at_a_time_holds_the_housekeeping_lock(store_url: str):
    """Its key follows the store's schema, so tests running at once in schemas of their own (as runs
    may share a database) each take their own."""
    from coordinator.store.leadership import HousekeepingLock

    first, second = open_store(store_url), open_store(store_url)
    try:
        first_lock, second_lock = HousekeepingLock(first.database), HousekeepingLock(second.database)
        assert first_lock.held()
        if first.database.is_sqlite:
            assert second_lock.held(), "on SQLite the one process that owns the store holds it"
            return
        assert not second_lock.held()
        assert first_lock.held(), "held until released"
        first_lock.release()
        assert second_lock.held(), "taken over once its holder let go"
        assert not first_lock.held()
        second_lock.release()
        with contextlib.ExitStack() as stack:
            other_schema = open_store(stack.enter_context(contextlib.contextmanager(_postgres_schema_url)()))
            stack.callback(other_schema.close)
            assert first_lock.held() and HousekeepingLock(other_schema.database).held(), "another schema's own lock"
    finally:
        first.close()
        second.close()
