"""Validation cost (issue 7): validator CPU time per rollout ÷ node generation time per rollout.

One process builds the real coordinator (store, blob store, scheduler, validator) on a temporary SQLite
file with the tiny model published as version 1, plays an honest fp32 node (leases, the torch engine
with seeded sampling and commitments, submissions), then lets the validator fully check every group:
rebuild the policy from the signed update, one batched prefill over the groups it takes at once (each
prompt run once for its group), the token rule, log-prob drift, per-chunk and pooled commitments,
termination. The baseline is the node's own generation time for the same rollouts, measured in the same
run. On the CPU both sides are timed in CPU time of this (single-threaded) process, as the issue defines
the figure; wall-clock figures are printed beside them (equal on an idle machine, inflated alike by
other load). With --device cuda both run on the GPU and the figure is the wall-clock ratio (the CPU
mostly waits).

Then honest nodes against the per-group verdicts (coordinator/verdicts.py) and the node-level token
statistics (coordinator/node_stats.py), per engine (the torch engine, and vLLM where it is installed):
nodes in bf16 (and one in fp32) on the default tiny model warmed up by `rollproof bootstrap`, at T = 0.7
and 1.0, with and without top-k/top-p, replayed by a torch validator on SDPA or eager attention, all
on --device. Every group is fully checked (strikes, doubts, how far its tokens and log-probabilities
came toward the bounds, and how many rollouts passed 0.5-3 times a bound); its statistics are pooled
per configuration into consecutive windows of NODE_WINDOW_TOKENS tokens, each judged by the node-level
tests, and also judged after every group over the newest groups covering the window, as the
coordinator does. A window is counted against the first test it fails.

Prints, last: validation-cost-ratio and floor-load-fraction (validation compute as a fraction of
node compute when a node has reached the floor sampling rate), node-test-false-positive-rate (honest
bf16 windows flagged by any node-level test, of those judged) and probation-tokens (the fully checked
tokens a node passes before its groups are trainable).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.node_stats import (  # noqa: E402
    DIRECTION_SLACK,
    FALSE_POSITIVE_RATE,
    LIFETIME_FALSE_POSITIVE_RATE,
    NODE_WINDOW_TOKENS,
    WIDE_GAP_FRACTION,
)
from coordinator.store import TokenStats  # noqa: E402
from policy.model import TinyModelShape  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer leases (under a minute)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (node and validator)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--hidden-size",
        type=int,
        default=TinyModelShape.hidden_size,
        help="the model's width (the default tiny model's by default; its depth scales along)",
    )
    parser.add_argument("--num-layers", type=int, default=TinyModelShape.num_hidden_layers)
    parser.add_argument(
        "--tokens-per-engine",
        type=int,
        help="honest checked tokens per engine, spread over its configurations in whole windows "
        "(default 50,000; with --quick one window for each of two configurations)",
    )
    parser.add_argument(
        "--engines", help=f"comma-separated, of {','.join(ENGINES)} (default: those installed; with --quick torch)"
    )
    args = parser.parse_args()
    engines = args.engines.split(",") if args.engines else ["torch"] if args.quick else installed_engines()
    if unknown := sorted(set(engines) - set(ENGINES)):
        parser.error(f"unknown engines {unknown}: expected some of {','.join(ENGINES)}")
    if "vllm" in engines and "vllm" not in installed_engines():
        parser.error("vLLM is not installed here: see docs/operations.md#the-vllm-engine for its install")

    import torch

    from coordinator.blobstore import BlobStore
    from coordinator.config import CoordinatorConfig
    from coordinator.server import build, load_run_setup, open_coordinator_store
    from node.generate import generate_batch
    from policy.engine import TorchEngine
    from policy.model import create_tiny_model, freeze_long_lived_objects, load_model
    from policy.tokenizer import load_tokenizer
    from policy.weights import export_bf16_state, load_bf16_state
    from protocol import convert
    from protocol.identity import Identity
    from trainer.publish import PolicyPublisher

    torch.set_num_threads(1)
    num_leases = 4 if args.quick else 16
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        shape = TinyModelShape(
            hidden_size=args.hidden_size,
            intermediate_size=3 * args.hidden_size,
            num_hidden_layers=args.num_layers,
            num_attention_heads=max(4, args.hidden_size // 64),
        )
        create_tiny_model(root / "model", shape=shape)
        trainer = Identity.generate()
        model = load_model(root / "model", dtype=args.dtype, device=args.device)
        freeze_long_lived_objects()  # as the node daemon does once its model is loaded
        blobs = BlobStore(root / "data" / "policy", run_id="demo", trainer_public_key=trainer.public_key)
        PolicyPublisher(trainer, "demo", blobs).publish_model(1, model)
        load_bf16_state(model, export_bf16_state(model))
        config = CoordinatorConfig.model_validate(
            {
                "data_dir": str(root / "data"),
                "trainer_key_fingerprint": trainer.key_id,
                "run": {
                    "model": str(root / "model"),
                    "group_size": 8,
                    "prompts_per_lease": 4,
                    "sampling": {"max_tokens": args.max_tokens},
                },
                "lease": {"max_open_per_node": num_leases},
                "validation": {"device": args.device},
            }
        )
        setup = load_run_setup(config)
        store = open_coordinator_store(config)
        built = build(config, setup, store)
        app, validator = built.app, built.validator
        node = Identity.generate()
        engine_name = f"torch-{args.device}-{args.dtype}"
        app.register(node.key_id, node.public_key, "bench", engine_name, args.device, "bench")
        tokenizer = load_tokenizer(root / "model")
        engine = TorchEngine(model, stop_token_ids={tokenizer.eos_token_id}, max_batch_size=32)
        generation_s = generation_wall_s = 0.0
        num_rollouts = num_tokens = 0
        for _ in range(num_leases):
            lease = app.lease(node.key_id, 1)
            started, started_wall = time.process_time(), time.perf_counter()
            generated = generate_batch(engine, tokenizer, setup.task, config.run.seed, lease, engine_name)
            generation_s += time.process_time() - started
            generation_wall_s += time.perf_counter() - started_wall
            num_rollouts += sum(len(g.rollouts) for g in generated.batch.groups)
            num_tokens += generated.num_tokens
            result = app.submit(node.key_id, convert.batch_to_proto(generated.batch).SerializeToString())
            assert result.receipt.num_rejected == 0, result.receipt
        validator.run_pending(limit=1)  # loads the validator's model and rebuilds the policy once
        started, started_wall = time.process_time(), time.perf_counter()
        while validator.run_pending(limit=64):
            pass
        validation_s = time.process_time() - started
        validation_wall_s = time.perf_counter() - started_wall
        results = [r for r in store.list_validations(node.key_id, 10_000)]
        store.close()
    assert all(r.passed for r in results), [r.evidence_json for r in results if not r.passed][:2]
    ratio = validation_s / generation_s if args.device == "cpu" else validation_wall_s / generation_wall_s
    floor_rate = config.validation.floor_rate
    print(
        json.dumps(
            {
                "rollouts": num_rollouts,
                "tokens": num_tokens,
                "groups_checked": len(results),
                "generation_ms_per_rollout": round(1000 * generation_s / num_rollouts, 2),
                "validation_ms_per_rollout": round(1000 * validation_s / num_rollouts, 2),
                "wall_clock_ratio": round(validation_wall_s / generation_wall_s, 3),
            }
        )
    )
    configs = QUICK_NODE_TEST_CONFIGS if args.quick else NODE_TEST_CONFIGS
    tokens_per_engine = args.tokens_per_engine or (len(configs) * NODE_WINDOW_TOKENS if args.quick else 50_000)
    node_tests = measure_node_tests(engines, tokens_per_engine, configs, args.device)
    print_engine_summaries(node_tests["configs"])
    print(f"validation-cost-ratio: {ratio:.3f} (target: <= 0.1)")
    print(
        f"floor-load-fraction: {floor_rate * ratio:.4f} "
        f"(validation compute ÷ node compute at the {floor_rate:.0%} floor)"
    )
    print(
        f"node-test-false-positive-rate: {node_tests['false_positive_rate']:.4f} "
        f"({node_tests['num_flagged']} of {node_tests['num_windows']} honest bf16 windows of {NODE_WINDOW_TOKENS} "
        f"tokens, engines {','.join(engines)}; {node_tests['num_flagged_judgements']} of "
        f"{node_tests['num_judgements']} judgements after each group; each test is bounded at "
        f"{FALSE_POSITIVE_RATE:g} per window) (target: ≤ 0.001)"
    )
    print(
        f"node-lifetime-flagged: {node_tests['num_lifetime_flagged']} "
        f"(honest bf16 nodes, one per configuration, {node_tests['num_lifetime_tokens']:,} tokens in all, judged "
        f"after each group; bounded at {LIFETIME_FALSE_POSITIVE_RATE:g} per node's life) (target: 0)"
    )
    print(f"probation-tokens: {probation_tokens()}")


@dataclass(frozen=True)
class NodeTestConfig:
    """One honest configuration: the node's precision and sampling, the validator's attention kernel."""

    dtype: str
    temperature: float
    top_k: int
    top_p: float
    validator_attention: str


NODE_TEST_CONFIGS = (
    NodeTestConfig("bfloat16", 1.0, 0, 1.0, "sdpa"),
    NodeTestConfig("bfloat16", 0.7, 0, 1.0, "sdpa"),
    NodeTestConfig("bfloat16", 1.0, 20, 0.9, "sdpa"),
    NodeTestConfig("bfloat16", 0.7, 20, 0.9, "sdpa"),
    NodeTestConfig("bfloat16", 1.0, 0, 1.0, "eager"),
    NodeTestConfig("bfloat16", 0.7, 20, 0.9, "eager"),
    NodeTestConfig("float32", 1.0, 0, 1.0, "sdpa"),
)
QUICK_NODE_TEST_CONFIGS = (NODE_TEST_CONFIGS[0], NODE_TEST_CONFIGS[5])  # same kernels; eager validator, filters
ENGINES = ("torch", "vllm")
PROMPTS_PER_BATCH = 8
GROUP_SIZE = 8


def installed_engines() -> tuple[str, ...]:
    return ("torch", "vllm") if importlib.util.find_spec("vllm") is not None else ("torch",)


def probation_tokens() -> int:
    """The verdicts' probation setting where the coordinator has one, else the node token window."""
    from coordinator.config import ValidationSection

    field = ValidationSection.model_fields.get("probation_tokens")
    return int(field.default) if field is not None else NODE_WINDOW_TOKENS


def tokens_per_config(tokens_per_engine: int, num_configs: int) -> int:
    """An engine's token budget spread over its configurations, each a whole number of windows."""
    return max(1, math.ceil(tokens_per_engine / num_configs / NODE_WINDOW_TOKENS)) * NODE_WINDOW_TOKENS


# Multiples of a per-rollout bound at which RolloutVerdicts counts the honest rollouts beyond it.
TAIL_MULTIPLES = (0.5, 1.0, 1.5, 2.0, 3.0)
# Upper edges of the bins, in units of the tolerance, of the score gaps of tokens off the validator's
# choice (RolloutVerdicts.gap_bins; node_stats.WIDE_GAP_FRACTION is one of them).
GAP_BIN_EDGES = (0.1, 0.2, 0.3, 0.5, 1.0, 3.0, math.inf)


@dataclass
class RolloutVerdicts:
    """The per-rollout (per-group) verdicts of honest groups and how close they came to the bounds."""

    num_groups: int = 0
    strikes: Counter = field(default_factory=Counter)  # failed check -> groups
    doubts: Counter = field(default_factory=Counter)  # doubting check -> groups (passed, node on probation)
    num_rollouts: int = 0
    # The rollout with the most tokens the node took off the validator's choice: (count, its tokens).
    most_off_choice: tuple[int, int] = (0, 0)
    max_score_gap: float = 0.0  # of a token off the validator's choice, in units of the tolerance
    max_drift: float = 0.0  # the largest |claimed - recomputed| log-probability, in units of its bound
    # Rollouts whose largest score gap / log-prob drift is over each of TAIL_MULTIPLES times its bound.
    score_gap_tail: Counter = field(default_factory=Counter)
    drift_tail: Counter = field(default_factory=Counter)
    # Tokens off the validator's choice by score gap (upper bin edge -> tokens), and of those over
    # node_stats.WIDE_GAP_FRACTION at T > 0, how many took the likelier token; filter doubts.
    gap_bins: Counter = field(default_factory=Counter)
    num_wide: int = 0
    num_wide_up: int = 0
    num_filter_doubts: int = 0
    evidence: list = field(default_factory=list)  # the first strikes' and doubts' evidence, with their prompt

    def add(self, verdict, reports, tolerances, prompt_index: int) -> None:
        from protocol import sampling as rule

        self.num_groups += 1
        if not verdict.passed:
            self.strikes[verdict.check] += 1
        elif verdict.suspect:
            self.doubts[verdict.check] += 1
        if verdict.check != "all" and len(self.evidence) < 5:
            self.evidence.append({"check": verdict.check, "prompt_index": prompt_index, **verdict.evidence})
        for report in reports:
            checks = report.token_checks
            off_choice = checks.verdicts != rule.TokenVerdict.EXACT
            self.num_rollouts += 1
            self.most_off_choice = max(self.most_off_choice, (int(off_choice.sum()), len(off_choice)))
            tolerance = rule.score_tolerance(tolerances.logit_tolerance, report.temperature)
            gaps = checks.score_gaps[off_choice] / tolerance
            self.gap_bins.update(next(e for e in GAP_BIN_EDGES if g <= e) for g in gaps.tolist())
            if report.temperature > 0:
                wide = off_choice & (checks.score_gaps / tolerance > WIDE_GAP_FRACTION) & (report.near_tie_lifts != 0)
                self.num_wide += int(wide.sum())
                self.num_wide_up += int((report.near_tie_lifts[wide] > 0).sum())
            self.num_filter_doubts += int((checks.verdicts == rule.TokenVerdict.FILTER_DOUBT).sum())
            score_gap = float(gaps.max()) if off_choice.any() else 0.0
            allowed = report.allowed_logprob_drift(tolerances.max_logprob_drift)
            drift = float(report.logprob_drift.max(initial=0.0)) / allowed
            self.max_score_gap, self.max_drift = max(self.max_score_gap, score_gap), max(self.max_drift, drift)
            self.score_gap_tail.update(m for m in TAIL_MULTIPLES if score_gap > m)
            self.drift_tail.update(m for m in TAIL_MULTIPLES if drift > m)

    def summary(self) -> dict:
        return {
            "groups": self.num_groups,
            "rollouts": self.num_rollouts,
            "strikes": dict(self.strikes),
            "doubts": dict(self.doubts),
            "most_off_choice_in_a_rollout": list(self.most_off_choice),
            "max_score_gap_per_tolerance": round(self.max_score_gap, 3),
            "max_logprob_drift_per_bound": round(self.max_drift, 3),
            "rollouts_over_score_gap_multiple": {str(m): self.score_gap_tail[m] for m in TAIL_MULTIPLES},
            "rollouts_over_drift_multiple": {str(m): self.drift_tail[m] for m in TAIL_MULTIPLES},
            "off_choice_by_score_gap": {str(e): self.gap_bins[e] for e in GAP_BIN_EDGES},
            "wide_off_choice": self.num_wide,
            "wide_off_choice_likelier": self.num_wide_up,
            "filter_doubts": self.num_filter_doubts,
            "evidence": self.evidence,
        }


@dataclass
class NodeWindows:
    """One honest node's token statistics judged two ways: consecutive disjoint windows of
    NODE_WINDOW_TOKENS (independent trials), and after every group over its newest groups covering
    the window, as the coordinator judges (overlapping, so correlated)."""

    dtype: str
    totals: TokenStats = field(default_factory=TokenStats)
    disjoint: TokenStats = field(default_factory=TokenStats)
    newest: deque = field(default_factory=deque)
    num_windows: int = 0
    flagged: Counter = field(default_factory=Counter)  # node-level test -> disjoint windows it failed
    num_judgements: int = 0
    flagged_judgements: Counter = field(default_factory=Counter)
    max_window_near_tie_rate: float = 0.0
    max_window_logprob_z: float = 0.0  # |z| of the advantage-weighted log-probability offsets
    max_lifetime_log10_e: dict = field(default_factory=dict)  # lifetime test -> its largest log10 e-value
    lifetime_flagged: str = ""  # the lifetime test that flagged this node first, if any

    def add(self, tokens: TokenStats) -> None:
        from coordinator.node_stats import judge_lifetime, lifetime_log_e_values

        self.totals += tokens
        for check, log_e in lifetime_log_e_values(self.totals, self.dtype).items():
            largest = self.max_lifetime_log10_e.get(check, -math.inf)
            self.max_lifetime_log10_e[check] = max(largest, log_e / math.log(10))
        failure = judge_lifetime(self.totals, self.dtype)
        if failure is not None and not self.lifetime_flagged:
            self.lifetime_flagged = failure.check
        self.disjoint += tokens
        if self.disjoint.num_tokens >= NODE_WINDOW_TOKENS:
            self.num_windows += 1
            self._judge(self.disjoint, self.flagged)
            self.disjoint = TokenStats()
        self.newest.append(tokens)
        while sum(t.num_tokens for t in self.newest) - self.newest[0].num_tokens >= NODE_WINDOW_TOKENS:
            self.newest.popleft()
        window = sum(self.newest, TokenStats())
        if window.num_tokens >= NODE_WINDOW_TOKENS:
            self.num_judgements += 1
            self._judge(window, self.flagged_judgements)

    def _judge(self, window: TokenStats, flagged: Counter) -> None:
        from coordinator.node_stats import judge_tokens

        judgement = judge_tokens(window, self.dtype)
        if judgement.failure is not None:
            flagged[judgement.failure.check] += 1
        self.max_window_near_tie_rate = max(self.max_window_near_tie_rate, window.num_near_ties / window.num_tokens)
        if window.logprob_advantage_sum_squares > 0:
            z = abs(window.logprob_advantage_sum) / math.sqrt(window.logprob_advantage_sum_squares)
            self.max_window_logprob_z = max(self.max_window_logprob_z, z)

    def summary(self) -> dict:
        from coordinator.node_stats import WINDOW_CHECKS

        totals = self.totals
        return {
            "tokens": totals.num_tokens,
            "near_tie_rate": round(totals.num_near_ties / max(1, totals.num_tokens), 5),
            "near_ties": totals.num_near_ties,
            "near_ties_likelier": totals.num_near_ties_up,
            "near_ties_directed": totals.num_directed_near_ties,
            "near_ties_positive": totals.num_near_ties_positive,
            "near_ties_positive_expected": round(totals.near_ties_positive_expected, 2),
            "max_window_near_tie_rate": round(self.max_window_near_tie_rate, 5),
            "max_window_logprob_z": round(self.max_window_logprob_z, 3),
            "windows": self.num_windows,
            "judgements": self.num_judgements,
            "near_ties_positive_variance": round(totals.near_ties_positive_variance, 2),
            "flagged": {check: [self.flagged[check], self.flagged_judgements[check]] for check in WINDOW_CHECKS},
            "max_lifetime_log10_e": {check: round(value, 2) for check, value in self.max_lifetime_log10_e.items()},
            "lifetime_flagged": self.lifetime_flagged,
        }


class HonestNodes:
    """Honest nodes of one engine generating for leased prompts, their groups checked as a validator does."""

    def __init__(self, engine_kind: str, device: str = "cpu"):
        from envs import get_task
        from policy.bootstrap import BootstrapSettings, ensure_bootstrapped
        from policy.tokenizer import load_tokenizer

        if engine_kind not in ENGINES:
            raise ValueError(f"unknown engine {engine_kind!r}: expected one of {ENGINES}")
        self.engine_kind = engine_kind
        self.device = device
        settings = BootstrapSettings()
        self.model_dir = ensure_bootstrapped(settings).directory
        self.tokenizer = load_tokenizer(self.model_dir)
        self.task = get_task(settings.task)
        self._engines: dict[str, object] = {}
        self._validators: dict[tuple[str, str], object] = {}
        self.prompt_index = 0

    def engine(self, dtype: str):
        if dtype not in self._engines:
            stop = {self.tokenizer.eos_token_id}
            if self.engine_kind == "vllm":
                from policy.vllm_engine import VllmEngine

                self._engines[dtype] = VllmEngine(
                    self.model_dir, stop, max_batch_size=64, dtype=dtype, device=self.device
                )
            else:
                from policy.engine import TorchEngine
                from policy.model import load_model

                self._engines[dtype] = TorchEngine(
                    load_model(self.model_dir, dtype=dtype, device=self.device), stop, max_batch_size=64
                )
        return self._engines[dtype]

    def validator(self, dtype: str, attention: str):
        from policy.model import load_model

        if (dtype, attention) not in self._validators:
            model = load_model(self.model_dir, dtype=dtype, device=self.device)
            model.set_attn_implementation(attention)
            self._validators[dtype, attention] = model
        return self._validators[dtype, attention]

    def run(self, config: NodeTestConfig, num_tokens: int) -> tuple[RolloutVerdicts, NodeWindows]:
        """Leases of PROMPTS_PER_BATCH prompts until the node's passed groups hold num_tokens tokens."""
        from coordinator.verdicts import TOLERANCES, GroupJob, group_verdict
        from envs.base import Split
        from node.generate import generate_batch
        from policy.prefill import ClaimedRollout, replay
        from protocol.sampling import derive_sample_seed
        from protocol.types import LeasedPrompt, SamplingParams, WorkLease

        tolerances = TOLERANCES[config.dtype]
        sampling = SamplingParams(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, max_tokens=32)
        engine, validator = self.engine(config.dtype), self.validator(config.dtype, config.validator_attention)
        verdicts, windows = RolloutVerdicts(), NodeWindows(config.dtype)
        while windows.totals.num_tokens < num_tokens:
            prompts = []
            for _ in range(PROMPTS_PER_BATCH):
                problem = self.task.problem(Split.TRAIN, 0, self.prompt_index)
                prompts.append(
                    LeasedPrompt(self.prompt_index, problem.prompt, tuple(self.tokenizer.encode(problem.prompt)))
                )
                self.prompt_index += 1
            lease = WorkLease(
                "bench", "bench", self.task.name, 1, tuple(prompts), GROUP_SIZE, sampling, self.prompt_index, 0
            )
            engine_name = f"{self.engine_kind}-{self.device}-{config.dtype}"
            batch = generate_batch(engine, self.tokenizer, self.task, 0, lease, engine_name).batch
            for position, (prompt, group) in enumerate(zip(prompts, batch.groups, strict=True)):
                seeds = tuple(derive_sample_seed(lease.sampling_seed, position, r.sample_index) for r in group.rollouts)
                job = GroupJob(
                    "bench", "bench", 1, config.dtype, prompt.prompt_token_ids, sampling, seeds, group.rollouts
                )
                reports = replay(
                    validator,
                    [
                        ClaimedRollout(prompt.prompt_token_ids, r.token_ids, r.logprobs, r.commitment, sampling, seed)
                        for r, seed in zip(group.rollouts, seeds, strict=True)
                    ],
                    tolerances.logit_tolerance,
                )
                verdict = group_verdict(job, reports, tolerances)
                verdicts.add(verdict, reports, tolerances, prompt.prompt_index)
                if verdict.passed and verdict.tokens is not None:
                    windows.add(verdict.tokens)
        return verdicts, windows


def measure_node_tests(
    engines: Sequence[str], tokens_per_engine: int, configs=NODE_TEST_CONFIGS, device: str = "cpu"
) -> dict:
    """Per engine and configuration, honest nodes' per-rollout verdicts and node-level judgements."""
    results = []
    for engine_kind in engines:
        nodes = HonestNodes(engine_kind, device)
        for config in configs:
            started = time.perf_counter()
            verdicts, windows = nodes.run(config, tokens_per_config(tokens_per_engine, len(configs)))
            results.append(
                {
                    "engine": engine_kind,
                    **dataclasses.asdict(config),
                    **verdicts.summary(),
                    **windows.summary(),
                    "seconds": round(time.perf_counter() - started, 1),
                }
            )
            print(json.dumps(results[-1]), flush=True)
    bf16 = [r for r in results if r["dtype"] == "bfloat16"]
    num_windows = sum(r["windows"] for r in bf16)
    num_flagged = sum(sum(flagged[0] for flagged in r["flagged"].values()) for r in bf16)
    return {
        "configs": results,
        "num_flagged": num_flagged,
        "num_windows": num_windows,
        "num_flagged_judgements": sum(sum(flagged[1] for flagged in r["flagged"].values()) for r in bf16),
        "num_judgements": sum(r["judgements"] for r in bf16),
        "false_positive_rate": num_flagged / num_windows if num_windows else 0.0,
        "num_lifetime_nodes": len(bf16),
        "num_lifetime_flagged": sum(bool(r["lifetime_flagged"]) for r in bf16),
        "num_lifetime_tokens": sum(r["tokens"] for r in bf16),
    }


def lifetime_maxima(rows: Sequence[dict]) -> dict[str, float]:
    checks = dict.fromkeys(check for r in rows for check in r["max_lifetime_log10_e"])
    return {check: max(r["max_lifetime_log10_e"].get(check, -math.inf) for r in rows) for check in checks}


def summed_tail(rows: Sequence[dict], key: str) -> list[int]:
    return [sum(r[key][str(m)] for r in rows) for m in TAIL_MULTIPLES]


def print_engine_summaries(results: Sequence[dict]) -> None:
    """One line per engine and precision, one per engine and node-level test."""
    from coordinator.node_stats import NEAR_TIE_RATE_BOUND, WINDOW_CHECKS

    for engine in dict.fromkeys(r["engine"] for r in results):
        for dtype in dict.fromkeys(r["dtype"] for r in results if r["engine"] == engine):
            rows = [r for r in results if r["engine"] == engine and r["dtype"] == dtype]
            tokens = sum(r["tokens"] for r in rows)
            near_ties = sum(r["near_ties"] for r in rows)
            strikes, doubts = Counter(), Counter()
            for r in rows:
                strikes.update(r["strikes"])
                doubts.update(r["doubts"])
            print(
                f"{engine} {dtype}: {tokens:,} checked tokens in {sum(r['groups'] for r in rows):,} groups over "
                f"{len(rows)} configurations; per group: {sum(strikes.values())} strikes {dict(strikes)}, "
                f"{sum(doubts.values())} doubts {dict(doubts)}; near-tie rate {near_ties / max(1, tokens):.4%} "
                f"(windows up to {max(r['max_window_near_tie_rate'] for r in rows):.4%}, bound "
                f"{NEAR_TIE_RATE_BOUND[dtype]:.1%}); max score gap off the validator's choice "
                f"{max(r['max_score_gap_per_tolerance'] for r in rows):.3f} x the tolerance; max log-prob drift "
                f"{max(r['max_logprob_drift_per_bound'] for r in rows):.3f} x its bound"
            )
            print(
                f"  of {sum(r['rollouts'] for r in rows):,} rollouts, over {', '.join(map(str, TAIL_MULTIPLES))} x "
                f"the bound: score gap {summed_tail(rows, 'rollouts_over_score_gap_multiple')}, log-prob drift "
                f"{summed_tail(rows, 'rollouts_over_drift_multiple')}"
            )
            bins = {str(e): sum(r["off_choice_by_score_gap"][str(e)] for r in rows) for e in GAP_BIN_EDGES}
            wide = sum(r["wide_off_choice"] for r in rows)
            print(
                f"  tokens off the validator's choice by score gap (bins up to x the tolerance): {bins}; wide "
                f"(over {WIDE_GAP_FRACTION}, T > 0) {wide} ({wide / max(1, tokens):.2e} a token, "
                f"{sum(r['wide_off_choice_likelier'] for r in rows)} the likelier token); filter doubts "
                f"{sum(r['filter_doubts'] for r in rows)}"
            )
            excess = sum(r["near_ties_positive"] - r["near_ties_positive_expected"] for r in rows)
            variance = sum(r["near_ties_positive_variance"] for r in rows)
            print(
                f"  lifetime (each configuration one node): near-ties in rewarded rollouts {excess:+.1f} over "
                f"expected = {excess / max(variance, 1e-9):+.3f} x the variance (slack {DIRECTION_SLACK}); largest "
                f"log10 e-values {lifetime_maxima(rows)}; flagged "
                f"{[r['lifetime_flagged'] for r in rows if r['lifetime_flagged']]}"
            )
            for check in WINDOW_CHECKS:
                print(
                    f"  {check}: {sum(r['flagged'][check][0] for r in rows)} of "
                    f"{sum(r['windows'] for r in rows)} disjoint windows flagged, "
                    f"{sum(r['flagged'][check][1] for r in rows)} of {sum(r['judgements'] for r in rows)} "
                    "judgements after each group"
                )


if __name__ == "__main__":
    main()
