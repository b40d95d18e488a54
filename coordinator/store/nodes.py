"""Nodes: registration, heartbeats, bans and the per-node counters, and the connection-level reads
and writes of a node row that the other repositories share (fetch_node, set_node)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import DataError, IntegrityError

from coordinator.store.database import Repository
from coordinator.store.records import NodeKeyMismatchError, NodeRecord, UnknownNodeError
from coordinator.store.rows import node_record
from coordinator.store.statements import NODE_CHUNKS, NODE_TOKEN_TOTALS, NODE_TOKENS, NODES, SELECT_NODE

log = logging.getLogger(__name__)


def fetch_node(connection: Connection, node_id: str, for_update: bool = False) -> NodeRecord:
    """The node's row in this transaction (locked for its end when for_update, on PostgreSQL)."""
    query = select(NODES).where(NODES.c.node_id == node_id)
    row = connection.execute(query.with_for_update() if for_update else query).first()
    if row is None:
        raise UnknownNodeError(f"node {node_id} is not registered")
    return node_record(row)


def set_node(connection: Connection, node_id: str, **values: Any) -> NodeRecord:
    """Update the node's row with values (columns, or expressions over them); returns the node after."""
    row = connection.execute(
        update(NODES).where(NODES.c.node_id == node_id).values(**values).returning(*NODES.c)
    ).first()
    if row is None:
        raise UnknownNodeError(f"node {node_id} is not registered")
    return node_record(row)


class NodeRepository(Repository):
    """The nodes' registry."""

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
        with self.database.write() as connection:
            existing = connection.execute(
                select(NODES.c.public_key).where(NODES.c.node_id == node_id).with_for_update()
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
                    insert(NODES).values(
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
                connection.execute(update(NODES).where(NODES.c.node_id == node_id).values(**described))
            return fetch_node(connection, node_id)

    def get_node(self, node_id: str) -> NodeRecord | None:
        with self.database.read_one() as connection:
            row = connection.execute(SELECT_NODE, {"node_id": node_id}).first()
            return None if row is None else node_record(row)

    def list_nodes(self) -> list[NodeRecord]:
        with self.database.read() as connection:
            return [node_record(row) for row in connection.execute(select(NODES).order_by(NODES.c.registered_ms))]

    def heartbeat(self, node_id: str, policy_version: int, tokens_per_s: float, now_ms: int) -> NodeRecord:
        with self.database.write() as connection:
            row = connection.execute(
                update(NODES)
                .where(NODES.c.node_id == node_id)
                .values(policy_version=policy_version, tokens_per_s=tokens_per_s, last_seen_ms=now_ms)
                .returning(*NODES.c)
            ).first()
            if row is None:
                raise UnknownNodeError(f"node {node_id} is not registered; register before heartbeating")
            return node_record(row)

    def record_heartbeats(self, beats: Sequence[tuple[str, int, float, int]]) -> None:
        """Many heartbeats in one transaction: (node_id, policy_version, tokens_per_s, last_seen_ms).
        A node's last_seen_ms never moves backwards; unknown nodes are ignored. When the database
        refuses a value (out of its range), the heartbeats are written one at a time and the
        refused ones dropped: one bad row holds up no other node's."""
        if not beats:
            return
        beats = sorted(beats)  # rows locked in one order by every replica's transactions: no deadlock
        try:
            self._write_heartbeats(beats)
        except (OverflowError, DataError):
            for beat in beats:
                try:
                    self._write_heartbeats([beat])
                except (OverflowError, DataError) as error:
                    log.warning("dropped the heartbeat of %s: %s", beat[0], str(error)[:200])

    def _write_heartbeats(self, beats: Sequence[tuple[str, int, float, int]]) -> None:
        with self.database.write() as connection:
            connection.execute(
                update(NODES)
                .where(NODES.c.node_id == bindparam("beat_node_id"), NODES.c.last_seen_ms <= bindparam("beat_seen_ms"))
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
        with self.database.write() as connection:
            return set_node(connection, node_id, banned=True, ban_reason=reason)

    def unban_node(self, node_id: str) -> NodeRecord:
        """Lift the ban; the node's windows and lifetime statistics start over, or what it was banned
        on would fail its next group."""
        with self.database.write() as connection:
            node = set_node(connection, node_id, banned=False, ban_reason="")
            for table in (NODE_CHUNKS, NODE_TOKENS, NODE_TOKEN_TOTALS):
                connection.execute(delete(table).where(table.c.node_id == node_id))
            return node

    def num_nodes_holding(self, seen_since_ms: int) -> dict[int, int]:
        """Policy version -> number of unbanned nodes that reported holding it since seen_since_ms."""
        with self.database.read() as connection:
            rows = connection.execute(
                select(NODES.c.policy_version, func.count())
                .where(NODES.c.last_seen_ms >= seen_since_ms, NODES.c.banned.is_(False))
                .group_by(NODES.c.policy_version)
            )
            return {version: count for version, count in rows}
