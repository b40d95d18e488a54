"""What a node's owner can do about each rejection reason: shown beside the reason on the node's
page and by `rollproof node status`. Reasons are the receipts' codes in lower case and the full
checks' names."""

from __future__ import annotations

RUN_AS_RELEASED = "run the rollproof version the coordinator runs, unmodified"
REPLAY_FAILED = (
    "a full check could not replay the node's output: set engine.dtype to the precision the engine really "
    f"computes in, use the run's model directory, and {RUN_AS_RELEASED}"
)
REMEDIES = {
    "bad_envelope": "the request's signature or clock did not verify: sync the machine's clock (±60 s) and "
    + RUN_AS_RELEASED,
    "unknown_lease": "the lease is unknown to the coordinator: keep one node per state directory and key",
    "lease_not_owned": "the lease belongs to another key: keep one node per state directory and key",
    "lease_expired": "generation outlasted the lease deadline: lower engine.batch_size or use a faster device",
    "wrong_policy_version": "the node generated with another policy version than its lease: check that it can "
    "download policy updates (peers or the coordinator's HTTP port)",
    "duplicate": "a rollout was sent twice: harmless after a restart; otherwise two nodes share a state directory",
    "reward_mismatch": f"the node's verifier scored differently from the coordinator's: {RUN_AS_RELEASED}",
    "environment_mismatch": f"an environment turn is not what the task's environment answers: {RUN_AS_RELEASED}",
    "node_banned": "the node is banned (see its ban reason); an operator can lift the ban",
    "quarantined": "the group was held back when the node failed a full check",
}
PROTOCOL_REASONS = (
    "schema",
    "token_out_of_vocab",
    "too_long",
    "wrong_group_size",
    "finish_reason_inconsistent",
    "turn_limit",
    "sampled_mask",
)


def remedy(reason: str) -> str:
    """The advice for a rejection reason; every full check that failed to replay shares one."""
    if reason in REMEDIES:
        return REMEDIES[reason]
    if reason in PROTOCOL_REASONS:
        return f"the engine's output breaks the protocol's bounds: {RUN_AS_RELEASED}"
    return REPLAY_FAILED
