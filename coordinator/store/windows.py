"""Node windows: the statistics of each node's newest fully checked groups (checked chunks, token
statistics) that the coordinator judges a node by across validators and restarts."""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Sequence

from sqlalchemy import Connection, Table, delete, func, insert, select, update

from coordinator.store.database import Repository
from coordinator.store.nodes import fetch_node
from coordinator.store.records import ChunkStats, ChunkWindow, GroupState, TokenStats, TokenWindow
from coordinator.store.statements import GROUPS, NODE_CHUNKS, NODE_TOKEN_TOTALS, NODE_TOKENS


def _groups_joining_window(connection: Connection, window: Table, group_ids: Sequence[str]) -> dict[str, str]:
    """Of group_ids, those still pending validation whose statistics are not in the window table yet,
    with their nodes, whose rows are locked in id order: one writer per node's window, and a verdict
    reported again (or by a second validator) adds nothing."""
    rows = connection.execute(
        select(GROUPS.c.group_id, GROUPS.c.node_id, GROUPS.c.state).where(GROUPS.c.group_id.in_(group_ids))
    ).all()
    pending = {row.group_id: row.node_id for row in rows if GroupState(row.state) is GroupState.PENDING_VALIDATION}
    added = set(
        connection.execute(select(window.c.group_id).where(window.c.group_id.in_(list(pending))).distinct()).scalars()
    )
    joining = {group_id: node_id for group_id, node_id in pending.items() if group_id not in added}
    for node_id in sorted(set(joining.values())):
        fetch_node(connection, node_id, for_update=True)
    return joining


def _token_stats(values: Sequence[float]) -> TokenStats:
    return TokenStats(
        *(type(default)(value) for default, value in zip(dataclasses.astuple(TokenStats()), values, strict=True))
    )


def _token_totals(connection: Connection, node_id: str) -> TokenStats | None:
    fields = [getattr(NODE_TOKEN_TOTALS.c, name) for name in TokenStats.__dataclass_fields__]
    row = connection.execute(select(*fields).where(NODE_TOKEN_TOTALS.c.node_id == node_id)).one_or_none()
    return None if row is None else _token_stats(row)


def _add_to_token_totals(connection: Connection, node_id: str, stats: TokenStats) -> None:
    """Add one group's statistics to its node's lifetime sums (the node's row is locked)."""
    totals = _token_totals(connection, node_id)
    if totals is None:
        connection.execute(insert(NODE_TOKEN_TOTALS).values(node_id=node_id, num_groups=1, **dataclasses.asdict(stats)))
        return
    connection.execute(
        update(NODE_TOKEN_TOTALS)
        .where(NODE_TOKEN_TOTALS.c.node_id == node_id)
        .values(num_groups=NODE_TOKEN_TOTALS.c.num_groups + 1, **dataclasses.asdict(totals + stats))
    )


def token_window(connection: Connection, node_id: str) -> TokenWindow:
    fields = [getattr(NODE_TOKENS.c, name) for name in TokenStats.__dataclass_fields__]
    sums = connection.execute(
        select(func.count(), *(func.coalesce(func.sum(column), 0) for column in fields)).where(
            NODE_TOKENS.c.node_id == node_id
        )
    ).one()
    return TokenWindow(
        node_id, int(sums[0]), _token_stats(sums[1:]), _token_totals(connection, node_id) or TokenStats()
    )


class WindowRepository(Repository):
    """The nodes' windows."""

    def add_node_chunks(
        self, groups: Sequence[tuple[str, Sequence[ChunkStats]]], window_size: int
    ) -> list[ChunkWindow | None]:
        """Add the checked chunks of groups still pending validation to their nodes' windows, each
        node keeping its newest window_size chunks, in one transaction. Per group, in input order:
        its node's window right after the group's chunks joined it; None for a group that no longer
        waits, or whose chunks were added before (a verdict reported again adds nothing)."""
        with self.database.write() as connection:
            joining = _groups_joining_window(connection, NODE_CHUNKS, [group_id for group_id, _ in groups])
            windows: list[ChunkWindow | None] = []
            for group_id, chunks in groups:
                node_id = joining.pop(group_id, None) if chunks else None
                if node_id is None:
                    windows.append(None)
                    continue
                connection.execute(
                    insert(NODE_CHUNKS),
                    [
                        {
                            "node_id": node_id,
                            "group_id": group_id,
                            "exponent_mismatches": chunk.exponent_mismatches,
                            "mantissa_error_sum": chunk.mantissa_error_sum,
                            "num_matched": chunk.num_matched,
                        }
                        for chunk in chunks
                    ],
                )
                oldest_kept = connection.execute(
                    select(NODE_CHUNKS.c.id)
                    .where(NODE_CHUNKS.c.node_id == node_id)
                    .order_by(NODE_CHUNKS.c.id.desc())
                    .offset(window_size - 1)
                    .limit(1)
                ).scalar()
                if oldest_kept is not None:
                    connection.execute(
                        delete(NODE_CHUNKS).where(NODE_CHUNKS.c.node_id == node_id, NODE_CHUNKS.c.id < oldest_kept)
                    )
                sums = connection.execute(
                    select(
                        func.count(),
                        func.coalesce(func.sum(NODE_CHUNKS.c.exponent_mismatches), 0),
                        func.coalesce(func.sum(NODE_CHUNKS.c.mantissa_error_sum), 0.0),
                        func.coalesce(func.sum(NODE_CHUNKS.c.num_matched), 0),
                    ).where(NODE_CHUNKS.c.node_id == node_id)
                ).one()
                windows.append(ChunkWindow(node_id, int(sums[0]), int(sums[1]), float(sums[2]), int(sums[3])))
            return windows

    def add_node_tokens(self, groups: Sequence[tuple[str, TokenStats]], window_tokens: int) -> list[TokenWindow | None]:
        """Add the token statistics of groups still pending validation to their nodes' windows, each
        node keeping its newest groups that cover window_tokens tokens, in one transaction. Per group,
        in input order: its node's window right after the group joined it, with the node's lifetime
        sums; None for a group that no longer waits, or that was added before (a verdict reported
        again adds nothing)."""
        with self.database.write() as connection:
            joining = _groups_joining_window(connection, NODE_TOKENS, [group_id for group_id, _ in groups])
            windows: list[TokenWindow | None] = []
            for group_id, stats in groups:
                node_id = joining.pop(group_id, None)
                if node_id is None:
                    windows.append(None)
                    continue
                connection.execute(
                    insert(NODE_TOKENS).values(node_id=node_id, group_id=group_id, **dataclasses.asdict(stats))
                )
                newest = connection.execute(
                    select(NODE_TOKENS.c.id, NODE_TOKENS.c.num_tokens)
                    .where(NODE_TOKENS.c.node_id == node_id)
                    .order_by(NODE_TOKENS.c.id.desc())
                ).all()
                covered = list(itertools.accumulate(row.num_tokens for row in newest))
                num_kept = bisect.bisect_left(covered, window_tokens) + 1
                if num_kept < len(newest):
                    connection.execute(
                        delete(NODE_TOKENS).where(
                            NODE_TOKENS.c.node_id == node_id, NODE_TOKENS.c.id < newest[num_kept - 1].id
                        )
                    )
                _add_to_token_totals(connection, node_id, stats)
                windows.append(token_window(connection, node_id))
            return windows
