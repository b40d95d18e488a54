"""The contribution ledger: each accepted group's credit to its node (pending, settled once its
group is past its checks, or voided when its node is caught), and the sums the dashboard shows."""

from __future__ import annotations

from sqlalchemy import Connection, case, func, select, update

from coordinator.store.database import Repository
from coordinator.store.records import ContributionBucket, ContributionTotals, GroupState, WorkTotals
from coordinator.store.statements import CONTRIBUTIONS, GROUPS, NODES


def void_unsettled(connection: Connection, node_id: str) -> int:
    return connection.execute(
        update(CONTRIBUTIONS)
        .where(
            CONTRIBUTIONS.c.node_id == node_id,
            CONTRIBUTIONS.c.settled.is_(False),
            CONTRIBUTIONS.c.voided.is_(False),
        )
        .values(voided=True)
    ).rowcount


class LedgerRepository(Repository):
    """The credit of the nodes' work."""

    def settle_contributions(self, before_ms: int) -> int:
        """Settle pending credit created before before_ms, of nodes not banned, whose group is not
        waiting for, or failed, a full check. Returns how many entries settled."""
        unsettled_states = [
            GroupState.PENDING_VALIDATION.value,
            GroupState.PROBATION.value,
            GroupState.QUARANTINED.value,
            GroupState.REJECTED.value,
        ]
        with self.database.write() as connection:
            return connection.execute(
                update(CONTRIBUTIONS)
                .where(
                    CONTRIBUTIONS.c.settled.is_(False),
                    CONTRIBUTIONS.c.voided.is_(False),
                    CONTRIBUTIONS.c.created_ms < before_ms,
                    CONTRIBUTIONS.c.node_id.in_(select(NODES.c.node_id).where(NODES.c.banned.is_(False))),
                    CONTRIBUTIONS.c.group_id.in_(
                        select(GROUPS.c.group_id).where(GROUPS.c.state.not_in(unsettled_states))
                    ),
                )
                .values(settled=True)
            ).rowcount

    def oldest_pending_ms(self, node_id: str) -> int | None:
        """When the node's oldest credit that is neither settled nor voided was made."""
        query = select(func.min(CONTRIBUTIONS.c.created_ms)).where(
            CONTRIBUTIONS.c.node_id == node_id,
            CONTRIBUTIONS.c.settled.is_(False),
            CONTRIBUTIONS.c.voided.is_(False),
        )
        with self.database.read() as connection:
            oldest: int | None = connection.execute(query).scalar_one()
            return oldest

    def contribution_totals(self, node_id: str | None = None) -> list[ContributionTotals]:
        """Settled, pending and voided work per node (one node, or all with any entry)."""
        bucket = case(
            (CONTRIBUTIONS.c.voided.is_(True), "voided"),
            (CONTRIBUTIONS.c.settled.is_(True), "settled"),
            else_="pending",
        )
        query = select(
            CONTRIBUTIONS.c.node_id,
            bucket.label("bucket"),
            func.count().label("num_entries"),
            func.sum(CONTRIBUTIONS.c.num_tokens).label("num_tokens"),
            func.sum(CONTRIBUTIONS.c.num_rollouts).label("num_rollouts"),
            func.sum(CONTRIBUTIONS.c.flops_estimate).label("flops_estimate"),
        ).group_by(CONTRIBUTIONS.c.node_id, bucket)
        if node_id is not None:
            query = query.where(CONTRIBUTIONS.c.node_id == node_id)
        buckets: dict[str, dict[str, WorkTotals]] = {}
        with self.database.read() as connection:
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
        bucket = (CONTRIBUTIONS.c.created_ms // bucket_ms).label("bucket")
        query = (
            select(
                bucket,
                func.count().label("num_entries"),
                func.sum(CONTRIBUTIONS.c.num_tokens).label("num_tokens"),
                func.sum(CONTRIBUTIONS.c.num_rollouts).label("num_rollouts"),
                func.sum(CONTRIBUTIONS.c.flops_estimate).label("flops_estimate"),
            )
            .where(CONTRIBUTIONS.c.node_id == node_id, CONTRIBUTIONS.c.voided.is_(False))
            .group_by(bucket)
            .order_by(bucket)
        )
        with self.database.read() as connection:
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
