"""What the dashboard shows, read from the store: one typed model per page, returned as is by
the JSON API and rendered by the HTML pages. Nothing here writes."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from coordinator.core import Coordinator
from coordinator.remedies import remedy
from coordinator.store import (
    ContributionTotals,
    GroupState,
    MetricsRecord,
    NodeRecord,
    RejectionRecord,
    WorkTotals,
)
from protocol.identity import key_id
from protocol.types import Codec, NodeState

NUM_TRAINING_POINTS = 500  # the charts' points over the whole run
MAX_TRAINING_POINTS = 2000  # the most the API returns
MIN_TRAINING_POINTS = 10  # per stretch of a downsampled run: 4 extremes of 2 series, 2 evenly spaced
MAX_SMOOTHING = 0.99  # the largest smoothing weight on the past (TensorBoard's slider stops there too)
MAX_SCANNED_METRICS_ROWS = 20_000  # past this a long run is read every k-th step (store.list_metrics_between)
LAST_STEP = 2**63 - 1
NUM_RECENT_SUBMISSIONS = 25
NUM_RECENT_REJECTIONS = 25
NUM_RECENT_LEASES = 25
NUM_CONTRIBUTION_BUCKETS = 60
MIN_CONTRIBUTION_BUCKET_MS = 10_000
MAX_EVIDENCE_CHARS = 4000
NUM_VERSIONS_PER_PAGE = 50
MAX_VERSIONS_PER_PAGE = 500


class UnknownNodePageError(ValueError):
    """No node with this id is registered."""


class RunView(BaseModel):
    run_id: str
    task: str
    model_name: str
    trainer_key_fingerprint: str
    group_size: int
    max_staleness: int


class OverviewView(BaseModel):
    run: RunView
    trainer_step: int
    policy_version: int
    num_nodes: int
    num_nodes_online: int
    num_rollouts_accepted: int
    num_rollouts_rejected: int
    num_groups_pending_validation: int
    num_groups: dict[str, int]
    node_tokens_per_second: float
    trainer_tokens_per_second: float | None
    reward_mean: float | None
    eval_reward: float | None
    updated_ms: int


class TrainingPoint(BaseModel):
    step: int
    created_ms: int
    policy_version: int | None
    reward_mean: float | None
    eval_reward: float | None
    tokens_per_second: float | None
    loss: float | None
    skipped: bool
    reward_mean_smoothed: float | None = Field(
        None, description="reward_mean smoothed over the steps before it (downsampled: on evenly spaced steps only)"
    )
    tokens_per_second_smoothed: float | None = Field(
        None, description="tokens_per_second smoothed likewise (skipped steps have none)"
    )


class WorkView(BaseModel):
    num_entries: int
    num_tokens: int
    num_rollouts: int
    flops_estimate: float


class NodeRow(BaseModel):
    rank: int
    node_id: str
    display_name: str
    engine: str
    hardware: str
    software_version: str
    state: str
    banned: bool
    ban_reason: str
    last_seen_ms: int
    policy_version: int
    tokens_per_second: float
    num_rollouts_accepted: int
    num_rollouts_rejected: int
    acceptance_rate: float | None
    reputation: float
    settled: WorkView
    pending: WorkView


class SubmissionView(BaseModel):
    batch_hash: str
    lease_id: str
    created_ms: int
    num_accepted: int
    num_rejected: int
    status: str


class RejectionView(BaseModel):
    source: str
    reason: str
    message: str
    remedy: str = Field(description="what the node's owner can do about it")
    evidence: Any
    prompt_index: int
    sample_index: int | None
    created_ms: int


class LeaseView(BaseModel):
    """How one of the node's leases ended: open, submitted, released or expired."""

    lease_id: str
    lease_number: int
    policy_version: int
    created_ms: int
    closed_ms: int | None
    state: str


class ContributionPoint(BaseModel):
    start_ms: int
    end_ms: int
    num_tokens: int
    cumulative_tokens: int


class NodeDetailView(BaseModel):
    node: NodeRow
    public_key: str
    key_id: str
    registered_ms: int
    num_full_checks_passed: int
    num_full_checks_failed: int
    num_strikes: int
    on_probation: bool = Field(description="its groups are held (not trained on) until its next node-level verdict")
    num_checked_tokens: int
    num_groups_consumed_when_caught: int | None = Field(
        description="at its newest failed full check: how many of its groups the trainer had used (0 on probation)"
    )
    num_leases_released: int
    num_leases_expired: int
    num_lease_cooldowns: int
    cooldown_until_ms: int | None = Field(description="no leases for the node until then: it walked away from too many")
    leases: list[LeaseView]
    voided: WorkView
    submissions: list[SubmissionView]
    rejections: list[RejectionView]
    contribution: list[ContributionPoint]


class VersionView(BaseModel):
    version: int
    base_version: int
    codec: str
    num_bytes: int
    full_state_bytes: int
    ratio_to_full: float | None
    created_ms: int
    num_nodes_holding: int = Field(
        description="nodes seen recently whose last heartbeat reported running this version (a node runs one)"
    )
    num_nodes_generated: int = Field(
        description="nodes with rollouts generated at this version accepted (not counting failed full checks)"
    )


class VersionsPage(BaseModel):
    """One page of the published versions, newest first, with where the pages beside it start."""

    versions: list[VersionView]
    has_newer: bool
    newer_before: int | None = Field(description="`before` of the page of newer versions; None: the newest page")
    older_before: int | None = Field(description="`before` of the page of older versions; None: there are none")


def finite_number(metrics: dict[str, Any], key: str) -> float | None:
    """metrics[key] when it is a finite int or float (not a bool), else None."""
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def parse_metrics(metrics_json: str) -> dict[str, Any]:
    try:
        parsed = json.loads(metrics_json)
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def acceptance_rate(num_accepted: int, num_rejected: int) -> float | None:
    total = num_accepted + num_rejected
    return num_accepted / total if total else None


def submission_status(num_accepted: int, num_rejected: int) -> str:
    if num_rejected == 0:
        return "accepted"
    if num_accepted == 0:
        return "rejected"
    return "partly rejected"


def cumulative(values: list[int]) -> list[int]:
    totals, running = [], 0
    for value in values:
        running += value
        totals.append(running)
    return totals


def contribution_bucket_ms(registered_ms: int, now_ms: int) -> int:
    """A bucket width that cuts the node's life into about NUM_CONTRIBUTION_BUCKETS buckets."""
    return max(MIN_CONTRIBUTION_BUCKET_MS, -(-(now_ms - registered_ms) // NUM_CONTRIBUTION_BUCKETS))


def rank_key(row: NodeRow) -> tuple[int, int, int]:
    return (row.settled.num_tokens, row.pending.num_tokens, row.num_rollouts_accepted)


def work_view(totals: WorkTotals) -> WorkView:
    return WorkView(
        num_entries=totals.num_entries,
        num_tokens=totals.num_tokens,
        num_rollouts=totals.num_rollouts,
        flops_estimate=totals.flops_estimate,
    )


def evidence_value(evidence_json: str) -> Any:
    """The stored evidence as JSON when it parses, else its (shortened) text."""
    if not evidence_json:
        return None
    try:
        return json.loads(evidence_json)
    except json.JSONDecodeError:
        return evidence_json[:MAX_EVIDENCE_CHARS]


def training_point(record: MetricsRecord) -> TrainingPoint:
    metrics = parse_metrics(record.metrics_json)
    version = finite_number(metrics, "policy_version")
    return TrainingPoint(
        step=record.step,
        created_ms=record.created_ms,
        policy_version=None if version is None else int(version),
        reward_mean=finite_number(metrics, "reward_mean"),
        eval_reward=finite_number(metrics, "eval_reward"),
        tokens_per_second=finite_number(metrics, "tokens_per_second"),
        loss=finite_number(metrics, "loss"),
        skipped=metrics.get("skipped") is True,
    )


def extreme_indices(values: Sequence[float | None], num_buckets: int) -> set[int]:
    """Cut the rows into num_buckets runs of consecutive rows; keep each run's first and last row
    holding a value, and the rows of its lowest and highest value (min/max downsampling: a spike
    or a dip survives, where keeping every k-th row would drop it)."""
    present = [index for index, value in enumerate(values) if value is not None]
    kept: set[int] = set()
    for bucket in range(num_buckets):
        run = present[bucket * len(present) // num_buckets : (bucket + 1) * len(present) // num_buckets]
        if run:
            kept.update((run[0], run[-1], min(run, key=values.__getitem__), max(run, key=values.__getitem__)))
    return kept


def smooth_ema(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average giving weight to the past, debiased
    (divided by 1 - weight**n at the n-th value) so that the start is not pulled towards 0."""
    if not 0 <= weight < 1:
        raise ValueError(f"the smoothing weight is from 0 (none) up to but not including 1, got {weight}")
    smoothed, running, debias = [], 0.0, 1.0
    for value in values:
        running = weight * running + (1 - weight) * value
        debias *= weight
        smoothed.append(running / (1 - debias))
    return smoothed


def smooth_present(values: Sequence[float | None], weight: float) -> list[float | None]:
    """smooth_ema over the values that are not None; None stays None."""
    smoothed = iter(smooth_ema([value for value in values if value is not None], weight))
    return [None if value is None else next(smoothed) for value in values]


def with_smoothing(points: list[TrainingPoint], weight: float) -> list[TrainingPoint]:
    """points with their train reward and the throughput of the steps that trained smoothed."""
    rewards = smooth_present([p.reward_mean for p in points], weight)
    rates = smooth_present([None if p.skipped else p.tokens_per_second for p in points], weight)
    return [
        point.model_copy(update={"reward_mean_smoothed": reward, "tokens_per_second_smoothed": rate})
        for point, reward, rate in zip(points, rewards, rates, strict=True)
    ]


def evenly_spaced_indices(num_values: int, num_indices: int) -> set[int]:
    """num_indices indices spread evenly over range(num_values), the first and the last among them."""
    if num_indices >= num_values:
        return set(range(num_values))
    if num_indices == 1:
        return {0}
    return {round(i * (num_values - 1) / (num_indices - 1)) for i in range(num_indices)}


def downsample_keeping_extremes(points: list[TrainingPoint], num_points: int) -> list[TrainingPoint]:
    """At most num_points (at least MIN_TRAINING_POINTS) of points, in step order: the extremes of
    the train reward and of the held-out reward (sparse: every eval_every steps), each over
    num_points / 10 stretches, and 2 points a stretch evenly spaced, which alone keep their
    smoothed values: a smoothed line through the extremes' points would zigzag with them."""
    if len(points) <= num_points:
        return points
    assert num_points >= MIN_TRAINING_POINTS, f"{num_points} points leave no room for the extremes"
    num_buckets = num_points // MIN_TRAINING_POINTS
    kept = extreme_indices([p.reward_mean for p in points], num_buckets)
    kept |= extreme_indices([p.eval_reward for p in points], num_buckets)
    evenly_spaced = evenly_spaced_indices(len(points), 2 * num_buckets)
    unsmoothed = {"reward_mean_smoothed": None, "tokens_per_second_smoothed": None}
    return [
        points[index] if index in evenly_spaced else points[index].model_copy(update=unsmoothed)
        for index in sorted(kept | evenly_spaced)
    ]


def rejection_view(record: RejectionRecord) -> RejectionView:
    return RejectionView(
        source=record.source.value,
        reason=record.reason,
        message=record.message,
        remedy=remedy(record.reason),
        evidence=evidence_value(record.evidence_json),
        prompt_index=record.prompt_index,
        sample_index=record.sample_index,
        created_ms=record.created_ms,
    )


class DashboardData:
    """Reads the coordinator's store into the dashboard's views. Methods block on the store:
    call them from a worker thread."""

    def __init__(self, app: Coordinator):
        self.app = app

    def run(self) -> RunView:
        config, setup = self.app.config, self.app.setup
        return RunView(
            run_id=config.run.run_id,
            task=config.run.task,
            model_name=setup.model_name,
            trainer_key_fingerprint=key_id(setup.trainer_public_key),
            group_size=config.run.group_size,
            max_staleness=config.run.max_staleness,
        )

    def training(
        self, *, since: int = 0, until: int = LAST_STEP, num_points: int = NUM_TRAINING_POINTS, smoothing: float = 0.0
    ) -> list[TrainingPoint]:
        """The trainer's steps since..until, smoothed with weight smoothing over all the steps read
        (smooth_ema), then at most num_points of them chosen to keep each stretch's extremes
        (downsample_keeping_extremes)."""
        records = self.app.store.list_metrics_between(since, until, MAX_SCANNED_METRICS_ROWS)
        points = with_smoothing([training_point(record) for record in records], smoothing)
        return downsample_keeping_extremes(points, num_points)

    def latest_training(self, num_steps: int) -> list[TrainingPoint]:
        return [training_point(record) for record in self.app.store.list_metrics(num_steps)]

    def overview(self) -> OverviewView:
        counters = self.app.run_counters()
        nodes = self.app.store.list_nodes()
        now = self.app.clock()
        online = [n for n in nodes if n.state(now, self.app.liveness) == NodeState.ONLINE]
        points = self.latest_training(NUM_TRAINING_POINTS)
        latest = points[-1] if points else None
        last_trained = next((p for p in reversed(points) if not p.skipped), None)
        last_eval = next((p.eval_reward for p in reversed(points) if p.eval_reward is not None), None)
        return OverviewView(
            run=self.run(),
            trainer_step=counters.trainer_step,
            policy_version=counters.latest_policy_version,
            num_nodes=len(nodes),
            num_nodes_online=counters.num_nodes_online,
            num_rollouts_accepted=counters.num_rollouts_accepted,
            num_rollouts_rejected=counters.num_rollouts_rejected,
            num_groups_pending_validation=counters.num_groups.get(GroupState.PENDING_VALIDATION, 0),
            num_groups={state.value: count for state, count in counters.num_groups.items()},
            node_tokens_per_second=sum(n.tokens_per_s for n in online),
            trainer_tokens_per_second=last_trained.tokens_per_second if last_trained else None,
            reward_mean=latest.reward_mean if latest else None,
            eval_reward=last_eval,
            updated_ms=now,
        )

    def _node_row(self, node: NodeRecord, totals: ContributionTotals | None, now: int, rank: int = 0) -> NodeRow:
        return NodeRow(
            rank=rank,
            node_id=node.node_id,
            display_name=node.display_name,
            engine=node.engine,
            hardware=node.hardware,
            software_version=node.software_version,
            state=node.state(now, self.app.liveness).name.lower(),
            banned=node.banned,
            ban_reason=node.ban_reason,
            last_seen_ms=node.last_seen_ms,
            policy_version=node.policy_version,
            tokens_per_second=node.tokens_per_s,
            num_rollouts_accepted=node.num_rollouts_accepted,
            num_rollouts_rejected=node.num_rollouts_rejected,
            acceptance_rate=acceptance_rate(node.num_rollouts_accepted, node.num_rollouts_rejected),
            reputation=node.reputation,
            settled=work_view(totals.settled if totals else WorkTotals()),
            pending=work_view(totals.pending if totals else WorkTotals()),
        )

    def leaderboard(self) -> list[NodeRow]:
        """Nodes ranked by verified (settled) contribution, then pending, then accepted rollouts."""
        totals = {t.node_id: t for t in self.app.store.contribution_totals()}
        now = self.app.clock()
        rows = [self._node_row(node, totals.get(node.node_id), now) for node in self.app.store.list_nodes()]
        rows.sort(key=rank_key, reverse=True)
        return [row.model_copy(update={"rank": index + 1}) for index, row in enumerate(rows)]

    def node(self, node_id: str) -> NodeDetailView:
        node = self.app.store.get_node(node_id)
        if node is None:
            raise UnknownNodePageError(f"node {node_id} is not registered")
        now = self.app.clock()
        totals = next(iter(self.app.store.contribution_totals(node_id)), None)
        rank = next((row.rank for row in self.leaderboard() if row.node_id == node_id), 0)
        bucket_ms = contribution_bucket_ms(node.registered_ms, now)
        buckets = self.app.store.contribution_timeline(node_id, bucket_ms)
        running = cumulative([bucket.work.num_tokens for bucket in buckets])
        return NodeDetailView(
            node=self._node_row(node, totals, now, rank),
            public_key=node.public_key.hex(),
            key_id=key_id(node.public_key),
            registered_ms=node.registered_ms,
            num_full_checks_passed=node.num_full_checks_passed,
            num_full_checks_failed=node.num_full_checks_failed,
            num_strikes=node.num_strikes,
            on_probation=node.on_probation,
            num_checked_tokens=node.num_checked_tokens,
            num_groups_consumed_when_caught=next(
                (
                    v.num_groups_consumed
                    for v in self.app.store.list_validations(node_id, NUM_RECENT_REJECTIONS)
                    if not v.passed
                ),
                None,
            ),
            num_leases_released=node.num_leases_released,
            num_leases_expired=node.num_leases_expired,
            num_lease_cooldowns=node.num_lease_cooldowns,
            cooldown_until_ms=node.lease_cooldown_until_ms if node.lease_cooldown_until_ms > now else None,
            leases=[
                LeaseView(
                    lease_id=lease.lease_id,
                    lease_number=lease.lease_number,
                    policy_version=lease.policy_version,
                    created_ms=lease.created_ms,
                    closed_ms=lease.closed_ms,
                    state=lease.state.value,
                )
                for lease in self.app.store.list_leases(node_id, NUM_RECENT_LEASES)
            ],
            voided=work_view(totals.voided if totals else WorkTotals()),
            submissions=[
                SubmissionView(
                    batch_hash=s.batch_hash.hex(),
                    lease_id=s.lease_id,
                    created_ms=s.created_ms,
                    num_accepted=s.num_accepted,
                    num_rejected=s.num_rejected,
                    status=submission_status(s.num_accepted, s.num_rejected),
                )
                for s in self.app.store.list_submissions(node_id, NUM_RECENT_SUBMISSIONS)
            ],
            rejections=[rejection_view(r) for r in self.app.store.list_rejections(node_id, NUM_RECENT_REJECTIONS)],
            contribution=[
                ContributionPoint(
                    start_ms=bucket.start_ms,
                    end_ms=min(bucket.start_ms + bucket_ms, now),
                    num_tokens=bucket.work.num_tokens,
                    cumulative_tokens=total,
                )
                for bucket, total in zip(buckets, running, strict=True)
            ],
        )

    def versions(self, *, before: int | None = None, limit: int = NUM_VERSIONS_PER_PAGE) -> VersionsPage:
        """Up to limit published versions numbered below before (or the newest), newest first;
        each read is bounded by limit, however many versions there are."""
        store = self.app.store
        records = store.list_versions_page(limit + 1, before)
        older_before = records[limit - 1].version if len(records) > limit else None
        records = records[:limit]
        anchor = records[0].version if records else (None if before is None else before - 1)
        newer = [] if anchor is None else store.version_numbers_after(anchor, limit + 1)
        holding = store.num_nodes_holding(self.app.clock() - self.app.liveness.offline_after_ms)
        generated = store.num_nodes_generated(records[-1].version, records[0].version) if records else {}
        return VersionsPage(
            versions=[
                VersionView(
                    version=v.version,
                    base_version=v.base_version,
                    codec=Codec(v.codec).name.lower(),
                    num_bytes=v.num_bytes,
                    full_state_bytes=v.full_state_bytes,
                    ratio_to_full=v.num_bytes / v.full_state_bytes if v.full_state_bytes else None,
                    created_ms=v.created_ms,
                    num_nodes_holding=holding.get(v.version, 0),
                    num_nodes_generated=generated.get(v.version, 0),
                )
                for v in records
            ],
            has_newer=bool(newer),
            newer_before=newer[limit] if len(newer) > limit else None,
            older_before=older_before,
        )
