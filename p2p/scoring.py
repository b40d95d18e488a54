"""Peer scores: what a peer did to us, summed; a peer below the ban threshold is cut off.

Scores only ever come from what this host observed itself (a blob whose hash did not match,
an announcement whose signature did not verify, a transfer that stalled), never from what
other peers claim about each other.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class PeerEvent(enum.Enum):
    BLOB_SERVED = "blob_served"  # a blob arrived and matched its hash
    BLOB_CORRUPT = "blob_corrupt"  # a blob did not match its hash or declared size
    JUNK_MESSAGE = "junk_message"  # a malformed frame or an announcement that does not verify
    TRANSFER_FAILED = "transfer_failed"  # a stream broke or stalled mid-transfer
    FALSE_HAVE = "false_have"  # claimed to hold a blob, then answered NOT_FOUND


SCORE_DELTAS: dict[PeerEvent, float] = {
    PeerEvent.BLOB_SERVED: 1.0,
    PeerEvent.BLOB_CORRUPT: -100.0,
    PeerEvent.JUNK_MESSAGE: -30.0,
    PeerEvent.TRANSFER_FAILED: -2.0,
    PeerEvent.FALSE_HAVE: -2.0,
}
MAX_SCORE = 20.0
BAN_THRESHOLD = -50.0


def next_score(score: float, event: PeerEvent) -> float:
    return min(MAX_SCORE, score + SCORE_DELTAS[event])


@dataclass
class PeerScores:
    """Scores of the peers this host has dealt with, and the set it has banned (for good)."""

    ban_threshold: float = BAN_THRESHOLD
    scores: dict[str, float] = field(default_factory=dict)
    banned: set[str] = field(default_factory=set)

    def record(self, peer_id: str, event: PeerEvent) -> bool:
        """Apply an event; True when it pushed the peer below the ban threshold just now."""
        score = next_score(self.scores.get(peer_id, 0.0), event)
        self.scores[peer_id] = score
        if score < self.ban_threshold and peer_id not in self.banned:
            self.banned.add(peer_id)
            return True
        return False

    def score(self, peer_id: str) -> float:
        return self.scores.get(peer_id, 0.0)

    def is_banned(self, peer_id: str) -> bool:
        return peer_id in self.banned


def peers_to_drop(connected: list[str], scores: PeerScores, max_peers: int, keep: set[str]) -> list[str]:
    """The lowest-scored connected peers beyond max_peers, never one in `keep` (the seeds)."""
    droppable = sorted((p for p in connected if p not in keep), key=lambda p: (scores.score(p), p))
    num_excess = len(droppable) - max_peers
    return droppable[:num_excess] if num_excess > 0 else []
