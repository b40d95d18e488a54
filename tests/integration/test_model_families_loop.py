"""Families other than Llama through the loop (issue 19): a coordinator that fully checks every
submission, a trainer and a node, on a Qwen2 model (its model type makes AutoTokenizer rebuild the
character tokenizer, policy/tokenizer.py) and on a Granite model (its head divides the output
embeddings' result by `logits_scaling`, policy/model.py logits_from_hidden).

Both are the warmed-up default Llama model rewritten as the other family with the same function, so
that groups have a reward spread to learn from at once: Qwen2 is Llama with q/k/v biases (zero
here); the Granite model has its tied embeddings scaled up by LOGITS_SCALING and its input
embeddings scaled back down by its `embedding_multiplier`, so its logits_scaling is what makes its
logits right. Were the node to compute logits as the output embeddings alone, it would sample at a
temperature 1/8 of the leased one, the validator would agree, and only the trainer's log-probability
mismatch would show it."""

import json
import re

import pytest
import torch

from protocol.identity import Identity
from tests.integration.cluster import Cluster, wait_for

LOGITS_SCALING = 8.0  # a power of two: the scaled embeddings are exact in bf16
# Mean |node - trainer| log-probability on groups of the trainer's own version: bf16 sampling
# weights against fp32 ones (measured 0.0013 on the Granite model; 0.22 were the node to take
# the output embeddings alone as its logits).
MAX_FRESH_LOGPROB_MISMATCH = 0.02


def rewrite_llama_as(family: str, source, target) -> None:
    from transformers import AutoModelForCausalLM, GraniteConfig, Qwen2Config

    from policy.model import load_model, save_model

    llama = load_model(source)
    config = llama.config
    shared = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=config.rope_parameters,
        tie_word_embeddings=True,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )
    state = llama.state_dict()
    if family == "qwen2":
        model = AutoModelForCausalLM.from_config(Qwen2Config(**shared))
    else:
        model = AutoModelForCausalLM.from_config(
            GraniteConfig(
                **shared,
                logits_scaling=LOGITS_SCALING,
                embedding_multiplier=1 / LOGITS_SCALING,
                residual_multiplier=1.0,
                attention_multiplier=config.head_dim**-0.5,
            )
        )
        state = {
            name: tensor * LOGITS_SCALING if name in ("model.embed_tokens.weight", "lm_head.weight") else tensor
            for name, tensor in state.items()
        }
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(name.endswith("_proj.bias") for name in missing), (missing, unexpected)
    with torch.no_grad():
        for name in missing:
            model.get_parameter(name).zero_()
    probe = torch.arange(4, 40)[None]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=probe).logits, llama(input_ids=probe).logits)
    save_model(model, target)


def metrics_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def applied_versions(log: str) -> list[int]:
    return [int(version) for version in re.findall(r"policy version (\d+) applied", log)]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "granite"])
def test_a_non_llama_family_trains_through_the_loop(tmp_path, family):
    from policy.bootstrap import bootstrapped_model_dir

    model_dir = tmp_path / f"model-{family}"
    rewrite_llama_as(family, bootstrapped_model_dir(), model_dir)
    identity = Identity.generate()
    (tmp_path / "trainer").mkdir()
    identity.save(tmp_path / "trainer" / "trainer.key")
    cluster = Cluster(tmp_path, model_dir, identity)
    metrics_path = tmp_path / "trainer" / "metrics.jsonl"
    try:
        cluster.start_coordinator(
            *("--set", "validation.num_initial_checks=1000000"),
            *("--set", "run.group_size=4"),
            *("--set", "run.prompts_per_lease=2"),
            *("--set", "run.sampling.max_tokens=8"),
        )
        cluster.spawn(
            "trainer",
            [
                "trainer",
                "run",
                *("--coordinator", cluster.address),
                *("--model", str(model_dir)),
                *("--data-dir", str(tmp_path / "trainer")),
                *("--set", "groups_per_step=2"),
                *("--set", "eval_every=0"),
            ],
        )
        node = cluster.start_node("node-1", "--batch-size", "8")

        def trained_and_applied() -> bool:
            trained = any(not m["skipped"] for m in metrics_lines(metrics_path))
            return trained and max(applied_versions(node.log()), default=0) >= 2

        wait_for(trained_and_applied, 300, "a trained step and its version applied by the node")
    finally:
        cluster.stop_all()
    ((num_accepted, num_rejected),) = cluster.query("SELECT SUM(num_accepted), SUM(num_rejected) FROM submissions")
    assert num_accepted > 0 and num_rejected == 0
    ((checks_passed, checks_failed),) = cluster.query(
        "SELECT num_full_checks_passed, num_full_checks_failed FROM nodes"
    )
    assert checks_passed > 0 and checks_failed == 0
    trained = [m for m in metrics_lines(metrics_path) if not m["skipped"]]
    fresh = [m for m in trained if set(m["staleness"]) == {"0"}]
    assert fresh, trained
    assert all(m["logprob_mismatch"] < MAX_FRESH_LOGPROB_MISMATCH for m in fresh), fresh
