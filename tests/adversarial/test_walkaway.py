"""Walking away from work (issue 16): a node that releases a lease, or lets it expire, whenever its
draw looks bad and asks for work again. Its prompt set keeps its sampling seed and goes to another
node, never back to it; the walker is cooled down, then struck and banned; and no group of a set it
walked away from is trained on with any draw but the one it walked away from."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from protocol import convert
from protocol.types import RolloutBatch, WorkLease
from tests.adversarial.harness import MARGINS, Attacker, run, trainable_groups
from tests.integration.cluster import Cluster, checking_cluster

DEADLINE_S = 10
COOLDOWN_S = 2
# More than 1 walk-away among a node's last 4 closed leases: a cool-down; again within 4 leases of
# one: a strike; the second strike (validation.max_strikes) bans. Lease-level rules only, so the
# cluster skips full checks.
SETTINGS = (
    f"lease.deadline_s={DEADLINE_S}",
    "lease.max_open_per_node=2",
    "lease.walkaway_window=4",
    "lease.max_walkaway_fraction=0.25",
    f"lease.cooldown_s={COOLDOWN_S}",
    "run.prompts_per_lease=1",
    "run.group_size=2",
    "run.sampling.max_tokens=8",
    "validation.enabled=false",
)
MAX_LEASE_REQUESTS = 40


@pytest.fixture(scope="module")
def walkaway_cluster(tmp_path_factory, tiny_model):
    with checking_cluster(tmp_path_factory.mktemp("walkaway"), tiny_model, *SETTINGS) as cluster:
        yield cluster


def looks_bad(batch: RolloutBatch) -> bool:
    """The walker's rule: keep a draw only when most of its answers are right (no draw of the
    untrained tiny model is)."""
    rewards = [rollout.claimed_reward for group in batch.groups for rollout in group.rollouts]
    return sum(rewards) / len(rewards) < 0.5


def lease_number(cluster: Cluster, lease_id: str) -> int:
    return cluster.query("SELECT lease_number FROM leases WHERE lease_id = ?", lease_id)[0][0]


def tokens(batch: RolloutBatch) -> list[tuple[int, ...]]:
    return [rollout.token_ids for group in batch.groups for rollout in group.rollouts]


async def walk_away_until_banned(cluster: Cluster, walker: Attacker, release: bool):
    """Lease, draw, walk away from every bad draw (release it, or hold max_open_per_node leases and
    let them expire), and ask again, until the coordinator bans the walker. Returns the walked-away
    leases with their draws, the wait reasons it was given, and how many leases it got back of sets
    it had walked away from."""
    walked: dict[int, tuple[WorkLease, RolloutBatch]] = {}
    held: list[WorkLease] = []
    waits: list[str] = []
    num_own_sets_returned = 0
    for _ in range(MAX_LEASE_REQUESTS):
        try:
            reply = await walker.client.lease(walker.run_info.latest_policy_version)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
            return walked, waits, num_own_sets_returned, error.details()
        if not reply.HasField("lease"):
            waits.append(reply.wait_reason)
            await asyncio.sleep(reply.retry_after_ms / 1000)
            continue
        lease = convert.lease_from_proto(reply.lease)
        number = lease_number(cluster, lease.lease_id)
        num_own_sets_returned += number in walked
        draw = walker.generate(lease)
        assert looks_bad(draw)
        walked[number] = (lease, draw)
        if release:
            await walker.client.release(lease.lease_id)
            continue
        held.append(lease)
        if len(held) == 2:  # the cap: wait until both are past their deadline
            await asyncio.sleep(max(0.0, max(lease.deadline_ms for lease in held) / 1000 - time.time()) + 0.5)
            held.clear()
    raise AssertionError(f"the walker was not banned after {MAX_LEASE_REQUESTS} lease requests; waits: {waits}")


async def take_walked_sets(cluster: Cluster, taker: Attacker, walked: dict[int, tuple[WorkLease, RolloutBatch]]):
    """An honest node leases until it got every walked-away set: per set, whether its seed and its
    draw were the walker's."""
    outcomes: dict[int, tuple[bool, bool]] = {}
    for _ in range(len(walked) + MAX_LEASE_REQUESTS):
        if len(outcomes) == len(walked):
            return outcomes
        lease = await taker.lease()
        draw = taker.generate(lease)
        receipt = await taker.submit(draw)
        assert receipt.num_accepted == len(tokens(draw)), receipt
        number = lease_number(cluster, lease.lease_id)
        if number in walked:
            walked_lease, walked_draw = walked[number]
            assert lease.prompts == walked_lease.prompts
            outcomes[number] = (lease.sampling_seed == walked_lease.sampling_seed, tokens(draw) == tokens(walked_draw))
    raise AssertionError(f"the honest node got {len(outcomes)} of the {len(walked)} walked-away sets")


def node_row(cluster: Cluster, node_id: str) -> dict:
    columns = ("num_leases_released", "num_leases_expired", "num_lease_cooldowns", "num_strikes", "banned")
    (row,) = cluster.query(f"SELECT {', '.join(columns)} FROM nodes WHERE node_id = ?", node_id)
    return dict(zip(columns, row, strict=True))


@pytest.mark.parametrize("walk_away", ["release", pytest.param("expire", marks=pytest.mark.slow)])
def test_walking_away_from_bad_draws_buys_no_new_draw_and_ends_in_a_ban(walkaway_cluster, trusted, walk_away):
    cluster = walkaway_cluster
    model, tokenizer = trusted

    async def scenario():
        walker = await Attacker(cluster, model, tokenizer).start()
        taker = await Attacker(cluster, model, tokenizer).start()
        walked, waits, num_own_sets_returned, ban = await walk_away_until_banned(
            cluster, walker, release=walk_away == "release"
        )
        outcomes = await take_walked_sets(cluster, taker, walked)
        await walker.close()
        await taker.close()
        return walker, taker, walked, waits, num_own_sets_returned, ban, outcomes

    walker, taker, walked, waits, num_own_sets_returned, ban, outcomes = run(scenario())
    walker_row, taker_row = node_row(cluster, walker.node_id), node_row(cluster, taker.node_id)
    num_fresh_seeds = sum(not same_seed for same_seed, _ in outcomes.values())
    num_identical_draws = sum(same_draw for _, same_draw in outcomes.values())
    # groups of walked-away sets that reached the trainer's queue with a draw other than the walker's
    num_rerolled_trainable = sum(not same_draw for _, same_draw in outcomes.values())
    MARGINS[f"16-walk-away-{walk_away}"] = {
        "walked_away": len(walked),
        "returned_to_walker": num_own_sets_returned,
        "re_leased_with_fresh_seed": num_fresh_seeds,
        "re_leased_with_identical_draw": num_identical_draws,
        "rerolled_groups_trainable": num_rerolled_trainable,
        "cool_downs": walker_row["num_lease_cooldowns"],
        "strikes": walker_row["num_strikes"],
    }
    assert num_own_sets_returned == 0
    assert num_fresh_seeds == 0 and num_identical_draws == len(walked) == 6
    assert num_rerolled_trainable == 0 and trainable_groups(cluster, walker.node_id) == 0
    assert waits and all("released or let expire too many of its recent leases" in wait for wait in waits)
    walked_counts = (walker_row["num_leases_released"], walker_row["num_leases_expired"])
    assert walked_counts == ((6, 0) if walk_away == "release" else (0, 6))
    assert (walker_row["num_lease_cooldowns"], walker_row["num_strikes"], walker_row["banned"]) == (3, 2, 1)
    assert "walked away from 2 of its last 2 leases after a cool-down" in ban
    assert (taker_row["num_lease_cooldowns"], taker_row["num_strikes"], taker_row["banned"]) == (0, 0, 0)
