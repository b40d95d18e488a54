"""Full checks: storing their results with every consequence for the group and its node (verified
or rejected groups, probation, strikes, quarantine, voided credit, bans), and reading them back."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from coordinator.store.database import Repository
from coordinator.store.ledger import void_unsettled
from coordinator.store.nodes import fetch_node, set_node
from coordinator.store.records import (
    GROUP_STATE_SOURCES,
    GroupState,
    NewValidation,
    NodeRecord,
    ValidationOutcome,
    ValidationResult,
    reputation,
)
from coordinator.store.rows import AnyRow
from coordinator.store.statements import CONSUMPTIONS, GROUPS, VALIDATIONS


def _record_pass(
    connection: Connection,
    result: NewValidation,
    group: AnyRow,
    nodes: dict[str, NodeRecord],
    hold: bool,
    now_ms: int,
) -> ValidationOutcome:
    node = nodes[group.node_id]
    if result.suspect and not node.on_probation:
        if hold:
            connection.execute(
                update(GROUPS)
                .where(GROUPS.c.node_id == node.node_id, GROUPS.c.state == GroupState.READY.value)
                .values(state=GroupState.PROBATION.value, updated_ms=now_ms)
            )
        node = set_node(connection, node.node_id, on_probation=True, probation_start_tokens=node.num_checked_tokens)
    validation = insert_validation(
        connection,
        result.group_id,
        node.node_id,
        GroupState.PENDING_VALIDATION,
        True,
        result.check_name,
        result.evidence_json,
        now_ms,
        target=GroupState.PROBATION if node.on_probation and hold else GroupState.READY,
    )
    num_passed = node.num_full_checks_passed + 1
    node = set_node(
        connection,
        node.node_id,
        num_full_checks_passed=num_passed,
        num_checked_tokens=node.num_checked_tokens + group.num_tokens,
        reputation=reputation(num_passed, node.num_strikes),
    )
    nodes[node.node_id] = node
    return ValidationOutcome(validation, node)


def _record_failure(
    connection: Connection,
    result: NewValidation,
    group: AnyRow,
    nodes: dict[str, NodeRecord],
    max_strikes: int,
    now_ms: int,
) -> ValidationOutcome:
    node = nodes[group.node_id]
    failed_before = connection.execute(
        select(func.count())
        .select_from(VALIDATIONS)
        .join(GROUPS, GROUPS.c.group_id == VALIDATIONS.c.group_id)
        .where(GROUPS.c.submission_id == group.submission_id, VALIDATIONS.c.passed.is_(False))
    ).scalar_one()
    num_consumed = connection.execute(
        select(func.count())
        .select_from(CONSUMPTIONS)
        .join(GROUPS, GROUPS.c.group_id == CONSUMPTIONS.c.group_id)
        .where(GROUPS.c.node_id == node.node_id)
    ).scalar_one()
    validation = insert_validation(
        connection,
        result.group_id,
        node.node_id,
        GroupState.PENDING_VALIDATION,
        False,
        result.check_name,
        result.evidence_json,
        now_ms,
        num_groups_consumed=num_consumed,
    )
    # Verified groups go too: a statistical check (a pooled commitment, a node's window) passes
    # many groups of a node that deviates a little, and a cheater may mix in honest groups.
    quarantine_sources = [source.value for source in GROUP_STATE_SOURCES[GroupState.QUARANTINED]]
    num_quarantined = connection.execute(
        update(GROUPS)
        .where(GROUPS.c.node_id == node.node_id, GROUPS.c.state.in_(quarantine_sources))
        .values(state=GroupState.QUARANTINED.value, updated_ms=now_ms)
    ).rowcount
    num_voided = void_unsettled(connection, node.node_id)
    struck = failed_before == 0
    num_strikes = node.num_strikes + struck
    num_failed = node.num_full_checks_failed + 1
    banned_now = num_strikes >= max_strikes and not node.banned
    values: dict[str, Any] = {}
    if banned_now:
        values = {
            "banned": True,
            "ban_reason": f"{num_strikes} strikes ({num_failed} failed full checks); last failed check: "
            f"{result.check_name}",
        }
    node = set_node(
        connection,
        node.node_id,
        num_full_checks_failed=num_failed,
        num_strikes=num_strikes,
        reputation=reputation(node.num_full_checks_passed, num_strikes),
        on_probation=True,
        probation_start_tokens=node.num_checked_tokens,
        **values,
    )
    nodes[node.node_id] = node
    return ValidationOutcome(validation, node, struck, num_quarantined, num_voided, banned_now)


def insert_validation(
    connection: Connection,
    group_id: str,
    node_id: str,
    state: GroupState,
    passed: bool,
    check_name: str,
    evidence_json: str,
    now_ms: int,
    *,
    target: GroupState | None = None,
    num_groups_consumed: int | None = None,
) -> ValidationResult:
    connection.execute(
        insert(VALIDATIONS).values(
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
        update(GROUPS)
        .where(GROUPS.c.group_id == group_id)
        .values(state=new_state.value, verified=passed, updated_ms=now_ms)
    )
    return ValidationResult(group_id, node_id, passed, check_name, evidence_json, now_ms, num_groups_consumed)


class ValidationRepository(Repository):
    """The full checks' results."""

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
        with self.database.write() as connection:
            rows = connection.execute(
                select(
                    GROUPS.c.group_id, GROUPS.c.node_id, GROUPS.c.state, GROUPS.c.submission_id, GROUPS.c.num_tokens
                ).where(GROUPS.c.group_id.in_([result.group_id for result in results]))
            ).all()
            groups = {row.group_id: row for row in rows}
            first_listed = {result.group_id: i for i, result in reversed(list(enumerate(results)))}
            waiting = [
                i
                for i, result in enumerate(results)
                if first_listed[result.group_id] == i
                and result.group_id in groups
                and GroupState(groups[result.group_id].state) is GroupState.PENDING_VALIDATION
            ]
            order = sorted(
                waiting, key=lambda i: (groups[results[i].group_id].node_id, results[i].passed, results[i].group_id)
            )
            nodes: dict[str, NodeRecord] = {}
            for node_id in sorted({groups[results[i].group_id].node_id for i in waiting}):
                nodes[node_id] = fetch_node(connection, node_id, for_update=True)
            caught: set[str] = set()
            window_passed: dict[str, int] = {}  # node -> the result whose window verdict passed
            outcomes: dict[int, ValidationOutcome] = {}
            for index in order:
                result = results[index]
                group = groups[result.group_id]
                if group.node_id in caught:
                    continue  # quarantined by its node's failure just now
                if result.passed:
                    outcomes[index] = _record_pass(connection, result, group, nodes, probation_tokens > 0, now_ms)
                    if result.window_verdict:
                        window_passed[group.node_id] = index
                else:
                    caught.add(group.node_id)
                    outcomes[index] = _record_failure(connection, result, group, nodes, max_strikes, now_ms)
            for node_id, index in window_passed.items():
                node = nodes[node_id]
                if (
                    node_id in caught
                    or not node.on_probation
                    or node.num_checked_tokens - node.probation_start_tokens < probation_tokens
                ):
                    continue
                num_released = connection.execute(
                    update(GROUPS)
                    .where(GROUPS.c.node_id == node_id, GROUPS.c.state == GroupState.PROBATION.value)
                    .values(state=GroupState.READY.value, updated_ms=now_ms)
                ).rowcount
                nodes[node_id] = set_node(connection, node_id, on_probation=False)
                outcomes[index] = dataclasses.replace(
                    outcomes[index], node=nodes[node_id], probation_ended=num_released
                )
            return [outcomes.get(index) for index in range(len(results))]

    def list_validations(self, node_id: str, limit: int) -> list[ValidationResult]:
        """The node's newest full-check results first."""
        with self.database.read() as connection:
            rows = connection.execute(
                select(VALIDATIONS)
                .where(VALIDATIONS.c.node_id == node_id)
                .order_by(VALIDATIONS.c.id.desc())
                .limit(limit)
            )
            return [
                ValidationResult(
                    row.group_id,
                    row.node_id,
                    row.passed,
                    row.check_name,
                    row.evidence_json,
                    row.created_ms,
                    row.num_groups_consumed,
                )
                for row in rows
            ]
