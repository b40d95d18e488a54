"""Reads across the aggregates for the dashboard and the admin status: a node's rejections (from
its submissions and its full checks) and the run's counters."""

from __future__ import annotations

from sqlalchemy import and_, func, select

from coordinator.store.database import Repository
from coordinator.store.groups import count_groups_by_state
from coordinator.store.records import GroupState, PolicyVersionRecord, RejectionRecord, RejectionSource, RunCounters
from coordinator.store.rows import version_record
from coordinator.store.statements import CONSUMPTIONS, GROUPS, METRICS, NODES, VALIDATIONS, VERDICTS, VERSIONS

# The states of groups whose node is trusted to have generated them at their policy version:
# every state but those of a failed full check or a caught node.
_TRUSTED_GROUP_STATES = tuple(
    state for state in GroupState if state not in (GroupState.REJECTED, GroupState.QUARANTINED)
)


class ReadRepository(Repository):
    """The dashboard's reads that span aggregates."""

    def list_versions_page(self, limit: int, before: int | None = None) -> list[PolicyVersionRecord]:
        """Up to limit published versions numbered below before (or the newest), newest first:
        one range read on the primary key, whatever the number of versions."""
        query = select(VERSIONS).order_by(VERSIONS.c.version.desc()).limit(limit)
        if before is not None:
            query = query.where(VERSIONS.c.version < before)
        with self.database.read() as connection:
            return [version_record(row) for row in connection.execute(query)]

    def version_numbers_after(self, version: int, limit: int) -> list[int]:
        """The numbers of up to limit published versions above version, oldest first."""
        query = select(VERSIONS.c.version).where(VERSIONS.c.version > version).order_by(VERSIONS.c.version).limit(limit)
        with self.database.read() as connection:
            return list(connection.execute(query).scalars())

    def num_nodes_generated(self, first_version: int, last_version: int) -> dict[int, int]:
        """Policy version (first..last) -> how many nodes had rollout groups generated at it
        accepted, not counting groups that failed a full check or were quarantined with their
        node. A node leases only at the version it holds, so each of them held that version."""
        query = (
            select(GROUPS.c.policy_version, func.count(GROUPS.c.node_id.distinct()))
            .where(
                GROUPS.c.state.in_(_TRUSTED_GROUP_STATES),
                GROUPS.c.policy_version.between(first_version, last_version),
            )
            .group_by(GROUPS.c.policy_version)
        )
        with self.database.read() as connection:
            return {version: count for version, count in connection.execute(query)}

    def list_rejections(self, node_id: str, limit: int) -> list[RejectionRecord]:
        """The node's newest rejections first: rejected rollouts and failed full checks."""
        with self.database.read() as connection:
            verdict_rows = connection.execute(
                select(VERDICTS)
                .where(VERDICTS.c.node_id == node_id, VERDICTS.c.accepted.is_(False))
                .order_by(VERDICTS.c.id.desc())
                .limit(limit)
            ).all()
            validation_rows = connection.execute(
                select(VALIDATIONS, GROUPS.c.prompt_index)
                .join(GROUPS, GROUPS.c.group_id == VALIDATIONS.c.group_id)
                .where(VALIDATIONS.c.node_id == node_id, VALIDATIONS.c.passed.is_(False))
                .order_by(VALIDATIONS.c.id.desc())
                .limit(limit)
            ).all()
        rejections = [
            RejectionRecord(
                node_id=node_id,
                source=RejectionSource.SUBMISSION,
                reason=(row.reason or "").lower(),  # stored as the enum's name; shown as full checks are
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

    def run_counters(self, online_since_ms: int) -> RunCounters:
        """Counters for the admin status and the dashboard; a node is online when it is not
        banned and was seen at or after online_since_ms."""
        with self.database.read() as connection:
            num_online, num_accepted, num_rejected = connection.execute(
                select(
                    func.count().filter(and_(NODES.c.last_seen_ms >= online_since_ms, NODES.c.banned.is_(False))),
                    func.coalesce(func.sum(NODES.c.num_rollouts_accepted), 0),
                    func.coalesce(func.sum(NODES.c.num_rollouts_rejected), 0),
                )
            ).one()
            last_consumed_step = connection.execute(
                select(func.coalesce(func.max(CONSUMPTIONS.c.trainer_step), 0))
            ).scalar_one()
            last_metrics_step = connection.execute(select(func.coalesce(func.max(METRICS.c.step), 0))).scalar_one()
            latest_version = connection.execute(select(func.coalesce(func.max(VERSIONS.c.version), 0))).scalar_one()
            return RunCounters(
                num_nodes_online=num_online,
                num_rollouts_accepted=int(num_accepted),
                num_rollouts_rejected=int(num_rejected),
                num_groups=count_groups_by_state(connection),
                trainer_step=max(last_consumed_step, last_metrics_step),
                latest_policy_version=latest_version,
            )
