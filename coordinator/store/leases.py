"""Leases: issuing them (in the writer's transactions), closing, expiring and extending them, the
prompt sets requeued from released and expired leases, and walk-aways (a node's released and
expired leases, judged by a WalkAwayLimit into cool-downs, strikes and bans)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from coordinator.store.database import Repository
from coordinator.store.nodes import set_node
from coordinator.store.records import (
    LeaseCapError,
    LeaseCooldownError,
    LeaseRecord,
    LeaseState,
    NodeRecord,
    RequeuedPrompts,
    UnknownLeaseError,
    UnknownNodeError,
    WalkAwayLimit,
    reputation,
)
from coordinator.store.rows import AnyRow, lease_record, lease_row
from coordinator.store.statements import (
    DELETE_REQUEUED,
    EXPIRE_LEASES,
    INSERT_LEASES,
    LEASES,
    LOCK_NODES,
    LOCK_REQUEUED,
    NODES,
    REQUEUED,
    SELECT_HELD_LEASE_NUMBERS,
    SELECT_LEASE,
    SELECT_OPEN_LEASE_DEADLINES,
    SELECT_REQUEUED_CANDIDATES,
    TAKE_LEASE_NUMBERS,
)

log = logging.getLogger(__name__)

# make_lease(lease_number, requeued_prompt_indices or None for a fresh draw, take_lease_number) -> the
# lease to store; take_lease_number() takes one more fresh lease number, for a fresh lease to draw from
LeaseFactory = Callable[[int, tuple[int, ...] | None, Callable[[], int]], LeaseRecord]

REQUEUED_LOOKAHEAD = 64  # requeued sets looked at past one per lease request, for those a node may not take
_OPEN_UNTIL_BUILT = 2**63 - 1  # the deadline a lease granted in this transaction counts with


@dataclass(frozen=True)
class LeaseRequest:
    """What Store.issue_lease was asked, queued for the writer."""

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


def issue_leases(connection: Connection, requests: Sequence[LeaseRequest]) -> list[LeaseRecord | Exception]:
    """Store.issue_lease for each request in turn, in one transaction: a lease or the refusal."""
    node_ids = sorted({request.node_id for request in requests})
    _expire(connection, max(request.now_ms for request in requests), requests[0].walkaway_limit, node_ids)
    # Locks the nodes' rows on PostgreSQL, so concurrent requests of one node see each other.
    cooldowns = {node_id: until_ms for node_id, until_ms in connection.execute(LOCK_NODES, {"node_ids": node_ids})}
    open_deadlines: dict[str, list[int]] = {node_id: [] for node_id in node_ids}
    for node_id, deadline_ms in connection.execute(SELECT_OPEN_LEASE_DEADLINES, {"node_ids": node_ids}):
        open_deadlines[node_id].append(deadline_ms)
    results: dict[int, LeaseRecord | Exception] = {}
    granted: list[int] = []
    for index, request in enumerate(requests):
        if request.node_id not in cooldowns:
            results[index] = UnknownNodeError(f"node {request.node_id} is not registered; register before leasing work")
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
    requeued = _take_requeued_for(connection, [requests[index] for index in granted])
    fresh_numbers = _FreshLeaseNumbers(connection, requeued.count(None))
    leases = []
    for index, prompt_set in zip(granted, requeued, strict=True):
        request = requests[index]
        if prompt_set is None:
            lease = request.make_lease(fresh_numbers.take(), None, fresh_numbers.take)
        else:
            lease = request.make_lease(prompt_set.lease_number, prompt_set.prompt_indices, fresh_numbers.take)
        assert lease.node_id == request.node_id, "make_lease built a foreign lease"
        assert lease.state is LeaseState.OPEN, "make_lease built a lease that is not open"
        leases.append(lease)
        results[index] = lease
    if leases:
        connection.execute(INSERT_LEASES, [lease_row(lease) for lease in leases])
    assert len(results) == len(requests), "a lease request was left without an answer"
    return [results[index] for index in range(len(requests))]


def take_lease_numbers(connection: Connection, count: int) -> int:
    """Take count consecutive lease numbers; returns the first."""
    last: int = connection.execute(TAKE_LEASE_NUMBERS, {"num_taken": count}).scalar_one()
    return last - count


class _FreshLeaseNumbers:
    """The fresh lease numbers of one transaction: a block of num_reserved taken at once, then one
    statement a number."""

    def __init__(self, connection: Connection, num_reserved: int) -> None:
        self._connection = connection
        self._next = take_lease_numbers(connection, num_reserved) if num_reserved else 0
        self._end = self._next + num_reserved

    def take(self) -> int:
        if self._next == self._end:
            self._next = take_lease_numbers(self._connection, 1)
            self._end = self._next + 1
        self._next += 1
        return self._next - 1


def _expire(
    connection: Connection, now_ms: int, walkaway_limit: WalkAwayLimit | None, node_ids: Sequence[str] = ()
) -> list[LeaseRecord]:
    """Expire the overdue leases; node_ids: the nodes the transaction writes next, locked in one
    sorted pass with those of the expired leases, so concurrent transactions cannot deadlock."""
    rows = connection.execute(EXPIRE_LEASES, {"expire_at_ms": now_ms}).all()
    expired = sorted((lease_record(row) for row in rows), key=lambda lease: lease.lease_number)
    if expired:
        locked = sorted({lease.node_id for lease in expired}.union(node_ids))
        connection.execute(LOCK_NODES, {"node_ids": locked}).all()
    _requeue(connection, expired, now_ms)
    _count_walkaways(connection, expired, now_ms, walkaway_limit)
    return expired


def _count_walkaways(
    connection: Connection, leases: Sequence[LeaseRecord], now_ms: int, limit: WalkAwayLimit | None
) -> None:
    """Count the released and expired leases on their nodes, then, given a limit, judge each
    node's recent leases by it."""
    by_node: dict[str, list[LeaseRecord]] = {}
    for lease in leases:
        by_node.setdefault(lease.node_id, []).append(lease)
    for node_id in sorted(by_node):
        num_released = sum(lease.state is LeaseState.RELEASED for lease in by_node[node_id])
        node = set_node(
            connection,
            node_id,
            num_leases_released=NODES.c.num_leases_released + num_released,
            num_leases_expired=NODES.c.num_leases_expired + len(by_node[node_id]) - num_released,
        )
        if limit is not None:
            _judge_walkaways(connection, node, now_ms, limit)


def _judge_walkaways(connection: Connection, node: NodeRecord, now_ms: int, limit: WalkAwayLimit) -> None:
    """Past the limit among the node's last leases closed since its last cool-down ended: a
    cool-down, and a strike (a ban at limit.max_strikes) when the node had one before and has
    not closed limit.window_leases leases since."""
    recent = (
        connection.execute(
            select(LEASES.c.state)
            .where(LEASES.c.node_id == node.node_id, LEASES.c.closed_ms >= node.lease_cooldown_until_ms)
            .order_by(LEASES.c.closed_ms.desc())
            .limit(limit.window_leases)
        )
        .scalars()
        .all()
    )
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
    set_node(connection, node.node_id, **values)
    log.warning(
        "node %s walked away from %d of its last %d leases: no leases for %d ms%s",
        node.node_id,
        num_walkaways,
        len(recent),
        limit.cooldown_ms,
        ", and a strike" if struck else "",
    )


def _requeue(connection: Connection, leases: Sequence[LeaseRecord], now_ms: int) -> None:
    if leases:
        connection.execute(
            insert(REQUEUED),
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


def _take_requeued_for(connection: Connection, requests: Sequence[LeaseRequest]) -> list[RequeuedPrompts | None]:
    """For each request in turn, remove and return the oldest requeued prompt set it may take
    (see issue_lease), or None; a set never goes back to a node that held its lease number."""
    if not requests:
        return []
    candidates = connection.execute(
        SELECT_REQUEUED_CANDIDATES, {"num_wanted": len(requests) + REQUEUED_LOOKAHEAD}
    ).all()
    if not candidates:
        return [None] * len(requests)
    held = {
        (node_id, lease_number)
        for node_id, lease_number in connection.execute(
            SELECT_HELD_LEASE_NUMBERS,
            {
                "node_ids": sorted({request.node_id for request in requests}),
                "lease_numbers": sorted({row.lease_number for row in candidates}),
            },
        )
    }
    unavailable: set[int] = set()  # taken by a concurrent transaction (PostgreSQL)
    while True:
        taken: list[AnyRow | None] = []
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
        locked = set(connection.execute(LOCK_REQUEUED, {"requeued_ids": sorted(wanted)}).scalars())
        if locked == wanted:
            break
        unavailable |= wanted - locked
    if wanted:
        connection.execute(DELETE_REQUEUED, {"requeued_ids": sorted(wanted)})
    return [None if row is None else RequeuedPrompts(row.lease_number, tuple(row.prompt_indices)) for row in taken]


class LeaseRepository(Repository):
    """The leases and the requeued prompt sets."""

    def create_lease(self, lease: LeaseRecord) -> None:
        with self.database.write() as connection:
            connection.execute(insert(LEASES).values(**lease_row(lease)))

    def get_lease(self, lease_id: str) -> LeaseRecord | None:
        with self.database.read_one() as connection:
            row = connection.execute(SELECT_LEASE, {"lease_id": lease_id}).first()
            return None if row is None else lease_record(row)

    def close_lease(
        self, lease_id: str, state: LeaseState, now_ms: int, walkaway_limit: WalkAwayLimit | None = None
    ) -> bool:
        """Close an open lease as submitted or released (a released lease's prompts are requeued,
        and the release counts as a walk-away of its node, judged by walkaway_limit). Returns
        False when the lease was not open any more."""
        if state not in (LeaseState.SUBMITTED, LeaseState.RELEASED):
            raise ValueError(f"a lease is closed as submitted or released, not {state}")
        with self.database.write() as connection:
            row = connection.execute(
                update(LEASES)
                .where(LEASES.c.lease_id == lease_id, LEASES.c.state == LeaseState.OPEN.value)
                .values(state=state.value, closed_ms=now_ms)
                .returning(*LEASES.c)
            ).first()
            if row is None:
                if connection.execute(select(LEASES.c.lease_id).where(LEASES.c.lease_id == lease_id)).first() is None:
                    raise UnknownLeaseError(f"lease {lease_id} does not exist")
                return False
            if state is LeaseState.RELEASED:
                released = [lease_record(row)]
                _requeue(connection, released, now_ms)
                _count_walkaways(connection, released, now_ms, walkaway_limit)
            return True

    def extend_open_leases(self, min_deadline_ms: int) -> int:
        """Give every open lease at least until min_deadline_ms (after a coordinator restart, so
        work finished while it was down is not refused as late). Returns how many moved."""
        with self.database.write() as connection:
            return connection.execute(
                update(LEASES)
                .where(LEASES.c.state == LeaseState.OPEN.value, LEASES.c.deadline_ms < min_deadline_ms)
                .values(deadline_ms=min_deadline_ms)
            ).rowcount

    def expire_leases(self, now_ms: int, walkaway_limit: WalkAwayLimit | None = None) -> list[LeaseRecord]:
        """Mark every open lease past its deadline expired and requeue its prompts; each counts as a
        walk-away of its node, judged by walkaway_limit."""
        with self.database.read() as connection:
            overdue = connection.execute(
                select(LEASES.c.lease_id)
                .where(LEASES.c.state == LeaseState.OPEN.value, LEASES.c.deadline_ms <= now_ms)
                .limit(1)
            ).first()
        if overdue is None:
            return []
        with self.database.write() as connection:
            return _expire(connection, now_ms, walkaway_limit)

    def list_leases(self, node_id: str, limit: int) -> list[LeaseRecord]:
        """The node's newest leases, newest first, with how each ended (state and closed_ms)."""
        with self.database.read() as connection:
            rows = connection.execute(
                select(LEASES)
                .where(LEASES.c.node_id == node_id)
                .order_by(LEASES.c.created_ms.desc(), LEASES.c.lease_number.desc())
                .limit(limit)
            )
            return [lease_record(row) for row in rows]

    def num_requeued(self) -> int:
        with self.database.read() as connection:
            return connection.execute(select(func.count()).select_from(REQUEUED)).scalar_one()
