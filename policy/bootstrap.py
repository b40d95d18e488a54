"""The supervised warm-up that makes the default tiny model (`rollproof bootstrap`).

A fresh tiny model (policy.model) is trained on reference answers of a task's train split, from a
fixed seed with a fixed data order (problem index step * batch_size + row), until the greedy reward
on a validation sample (train-split problems far past those trained on, never the held-out split)
reaches `stop_at_reward`, or for `num_steps`; then its greedy held-out reward is measured. Stopping
at a reward rather than after a fixed count leaves the model mid-way up its learning curve, where
RL has room and gains quickly, on any machine: the curve of a small model on addition is steep
(0.12 to 0.70 between 200 and 300 steps), so a fixed count would land anywhere on it. The result is cached
under <cache root>/models/<task>-<fingerprint of the settings>, written to a temporary
directory and renamed into place, so a second call with the same settings returns at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from envs import DEFAULT_TASK, Problem, Split, Task, get_task
from envs.base import MultiTurnTask
from policy.model import TinyModelShape, create_tiny_model, save_model, summarize_model
from policy.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

BOOTSTRAP_FORMAT_VERSION = 2
"""Bump when the training procedure changes, so old cache entries are not reused."""
REPORT_FILE = "bootstrap.json"
CACHE_DIR_VARIABLE = "ROLLPROOF_CACHE_DIR"
IGNORE_INDEX = -100
NUM_LOG_LINES = 10
VALIDATION_START = 10**9
"""Index of the first validation problem in the train split; training reads from index 0."""


class BootstrapError(ValueError):
    """The bootstrap output directory cannot be used."""


@dataclass(frozen=True)
class BootstrapSettings:
    task: str = DEFAULT_TASK
    seed: int = 0
    num_steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 3e-3
    num_warmup_steps: int = 50
    final_learning_rate_fraction: float = 0.1
    max_grad_norm: float = 1.0
    num_eval_problems: int = 200
    stop_at_reward: float | None = 0.25
    check_every: int = 10
    num_check_problems: int = 100
    shape: TinyModelShape = field(default_factory=TinyModelShape)

    def __post_init__(self) -> None:
        for name in ("num_steps", "batch_size", "num_eval_problems", "check_every", "num_check_problems"):
            if getattr(self, name) < 1:
                raise BootstrapError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.stop_at_reward is not None and not 0 < self.stop_at_reward <= 1:
            raise BootstrapError(f"stop_at_reward must be in (0, 1] or unset, got {self.stop_at_reward}")

    def fingerprint(self) -> str:
        """A short hash of everything that decides the result."""
        described = json.dumps({"format": BOOTSTRAP_FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(described.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BootstrapResult:
    directory: Path
    cached: bool
    report: dict[str, Any]


def default_cache_root() -> Path:
    return Path(os.environ.get(CACHE_DIR_VARIABLE, "~/.cache/rollproof")).expanduser()


def cached_model_dir(settings: BootstrapSettings, cache_root: Path) -> Path:
    return cache_root / "models" / f"{settings.task}-{settings.fingerprint()}"


def read_report(directory: Path) -> dict[str, Any] | None:
    try:
        report = json.loads((directory / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def ensure_bootstrapped(
    settings: BootstrapSettings, *, out_dir: Path | None = None, cache_root: Path | None = None
) -> BootstrapResult:
    """The warmed-up model directory for `settings`: reused if already made, else made now.

    It is `out_dir` when given, else the cache entry under `cache_root` (default
    ~/.cache/rollproof, or $ROLLPROOF_CACHE_DIR)."""
    get_task(settings.task)
    target = (out_dir or cached_model_dir(settings, cache_root or default_cache_root())).expanduser()
    report = read_report(target)
    if report is not None and report.get("fingerprint") == settings.fingerprint():
        return BootstrapResult(target, cached=True, report=report)
    if target.exists():
        raise BootstrapError(
            f"{target} exists but holds no bootstrap with these settings "
            f"(fingerprint {settings.fingerprint()}); delete it or choose another output directory"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        report = run_bootstrap(settings, staging)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process made the same entry meanwhile; use it when it is complete.
            finished = read_report(target)
            if finished is None or finished.get("fingerprint") != settings.fingerprint():
                raise
            return BootstrapResult(target, cached=True, report=finished)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return BootstrapResult(target, cached=False, report=report)


def run_bootstrap(settings: BootstrapSettings, directory: Path) -> dict[str, Any]:
    """Create, warm up, evaluate and save the tiny model into `directory`; return the report."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    task = get_task(settings.task)
    model = create_tiny_model(directory, shape=settings.shape, seed=settings.seed)
    tokenizer = load_tokenizer(directory)
    summary = summarize_model(model)
    log.info(
        "bootstrap %s: %s model, %d parameters (hidden %d, %d layers, %d heads, vocab %d), %d steps of %d",
        settings.task,
        summary.model_type,
        summary.num_parameters,
        summary.hidden_size,
        summary.num_hidden_layers,
        summary.num_attention_heads,
        summary.vocab_size,
        settings.num_steps,
        settings.batch_size,
    )
    eval_problems = task.problems(Split.EVAL, settings.seed, settings.num_eval_problems)
    reward_before = evaluate_greedy(task, model, tokenizer, eval_problems)
    log.info("held-out greedy reward before warm-up: %.3f", reward_before)

    started = time.monotonic()
    torch.manual_seed(settings.seed)
    previous_num_threads = torch.get_num_threads()
    # One thread: the result does not depend on the machine's core count, and tiny matrices
    # gain little from more threads (and lose much when the cores are busy).
    torch.set_num_threads(1)
    try:
        num_steps_trained, check_reward = train(settings, task, model, tokenizer)
    finally:
        torch.set_num_threads(previous_num_threads)
    train_seconds = time.monotonic() - started

    reward_after = evaluate_greedy(task, model, tokenizer, eval_problems)
    log.info("held-out greedy reward after warm-up: %.3f (trained %.1f s)", reward_after, train_seconds)
    save_model(model, directory)
    report = {
        "fingerprint": settings.fingerprint(),
        "settings": asdict(settings),
        "model": summary.as_dict(),
        "eval_reward_before": reward_before,
        "eval_reward_after": reward_after,
        "num_steps_trained": num_steps_trained,
        "check_reward": check_reward,
        "num_eval_problems": len(eval_problems),
        "train_seconds": round(train_seconds, 2),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    (directory / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def learning_rate_at(settings: BootstrapSettings, step: int) -> float:
    """Linear warm-up, then cosine decay to final_learning_rate_fraction of the peak."""
    if step < settings.num_warmup_steps:
        return settings.learning_rate * (step + 1) / settings.num_warmup_steps
    num_decay_steps = max(1, settings.num_steps - settings.num_warmup_steps)
    progress = min(1.0, (step - settings.num_warmup_steps) / num_decay_steps)
    floor = settings.final_learning_rate_fraction
    return settings.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def supervised_batch(
    problems: list[Problem], tokenizer: Any, max_length: int, task: Task | None = None
) -> dict[str, Any]:
    """Right-padded prompt+answer+EOS sequences; the loss covers the answer and EOS only. For a
    multi-turn task the answer is the model's side of a reference rollout: its environment's turns
    are put in, outside the loss."""
    import torch

    sequences, labels = [], []
    prompts_ids = tokenizer([problem.prompt for problem in problems]).input_ids
    answers_ids = tokenizer([problem.answer for problem in problems], add_special_tokens=False).input_ids
    for problem, prompt_ids, answer_ids in zip(problems, prompts_ids, answers_ids, strict=True):
        answer_ids = answer_ids + [tokenizer.eos_token_id]
        answer_labels = answer_ids
        if isinstance(task, MultiTurnTask):
            transcript_ids, mask = task.environment(problem, 0, tokenizer).transcript(answer_ids)
            answer_ids = list(transcript_ids)
            answer_labels = [t if sampled else IGNORE_INDEX for t, sampled in zip(transcript_ids, mask, strict=True)]
        if len(prompt_ids) + len(answer_ids) > max_length:
            raise BootstrapError(
                f"a problem needs {len(prompt_ids) + len(answer_ids)} tokens but the model takes {max_length}: "
                f"{problem.prompt!r}"
            )
        sequences.append(prompt_ids + answer_ids)
        labels.append([IGNORE_INDEX] * len(prompt_ids) + answer_labels)
    width = max(len(sequence) for sequence in sequences)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in sequences]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences]),
        "labels": torch.tensor([s + [IGNORE_INDEX] * (width - len(s)) for s in labels]),
    }


def train(settings: BootstrapSettings, task: Task, model: Any, tokenizer: Any) -> tuple[int, float | None]:
    """Train until the validation reward reaches settings.stop_at_reward (checked every
    check_every steps) or for num_steps; return the steps trained and the last validation reward."""
    import torch

    check_problems = task.problems(Split.TRAIN, settings.seed, settings.num_check_problems, start=VALIDATION_START)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, betas=(0.9, 0.98), weight_decay=0.0)
    log_every = max(1, settings.num_steps // NUM_LOG_LINES)
    started = time.monotonic()
    check_reward = None
    for step in range(settings.num_steps):
        model.train()
        problems = task.problems(Split.TRAIN, settings.seed, settings.batch_size, start=step * settings.batch_size)
        batch = supervised_batch(problems, tokenizer, model.config.max_position_embeddings, task)
        learning_rate = learning_rate_at(settings, step)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        if (step + 1) % log_every == 0 or step + 1 == settings.num_steps:
            log.info(
                "step %d/%d  loss %.3f  lr %.2e  %.1f s",
                step + 1,
                settings.num_steps,
                loss.item(),
                learning_rate,
                time.monotonic() - started,
            )
        if settings.stop_at_reward is not None and (step + 1) % settings.check_every == 0:
            model.eval()
            check_reward = evaluate_greedy(task, model, tokenizer, check_problems)
            if check_reward >= settings.stop_at_reward:
                log.info(
                    "step %d: validation reward %.3f reached %.3f; stopping",
                    step + 1,
                    check_reward,
                    settings.stop_at_reward,
                )
                return step + 1, check_reward
    model.eval()
    return settings.num_steps, check_reward


def greedy_completions(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int = 100
) -> list[str]:
    """Greedy continuations of `prompts` (left-padded batches), decoded without special tokens."""
    import torch

    completions: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, padding_side="left")
        encoded = encoded.to(model.device)
        with torch.no_grad():
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        completions.extend(tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True))
    return completions


def evaluate_greedy(task: Task, model: Any, tokenizer: Any, problems: list[Problem]) -> float:
    """Mean reward of greedy completions; room for two tokens past the longest reference answer."""
    max_new_tokens = 2 + max(len(tokenizer(p.answer, add_special_tokens=False).input_ids) for p in problems)
    if isinstance(task, MultiTurnTask):
        from policy.evaluate import greedy_transcripts

        completions = greedy_transcripts(model, tokenizer, task, problems, max_new_tokens)
    else:
        completions = greedy_completions(model, tokenizer, [p.prompt for p in problems], max_new_tokens)
    return sum(task.rewards(problems, completions)) / len(problems)


def bootstrapped_model_dir(task: str = DEFAULT_TASK, cache_root: Path | None = None) -> Path:
    """The tiny model warmed up on `task` with the default settings, made on first use, then cached."""
    return ensure_bootstrapped(BootstrapSettings(task=task), cache_root=cache_root).directory
