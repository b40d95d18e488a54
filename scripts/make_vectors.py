"""Write the protocol test vectors: tests/vectors/sampling.json, commitment.json and policy.json.

The vectors pin the numpy reference (protocol/sampling.py, protocol/commitment.py, the weight
codec and manifests of protocol/codec.py and protocol/manifest.py); other implementations check
themselves against them. Regenerating must not change a committed vector unless the rule itself
changes: tests/unit/test_sampling.py, test_commitment.py and test_manifest.py recompute them.

Floats are stored as their IEEE bit patterns (float32 as uint32) so that nothing is lost in JSON.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from protocol import codec, commitment, manifest
from protocol import sampling as rule
from protocol.identity import Identity
from protocol.types import BlobRef, Codec, PolicyManifest, SamplingParams

VECTORS_DIR = Path(__file__).resolve().parent.parent / "tests" / "vectors"
VOCAB_SIZE = 16
SAMPLING_CASES = (
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.5, top_k=4),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=0.8, top_k=6, top_p=0.9),
    SamplingParams(temperature=0.0),
)


def float32_bits(values: np.ndarray) -> list[int]:
    return np.asarray(values, dtype=np.float32).view(np.uint32).tolist()


def sampling_vectors() -> dict:
    rng = np.random.default_rng(20260101)
    seeds = [0, 1, 2**63 + 12345, rule.MASK64]
    seed_cases = [
        {
            "lease_seed": lease_seed,
            "prompt_position": position,
            "sample_index": index,
            "sample_seed": rule.derive_sample_seed(lease_seed, position, index),
        }
        for lease_seed in seeds
        for position, index in ((0, 0), (3, 1), (2**32, 7))
    ]
    noise_cases = []
    for seed in seeds:
        for position in (0, 1, 1000, 2**32 - 1):
            bits = rule.noise_bits(np.array([seed], dtype=np.uint64), np.array([position]), VOCAB_SIZE)
            noise_cases.append(
                {
                    "seed": seed,
                    "position": position,
                    "noise_bits": bits[0].tolist(),
                    "gumbel_f32_bits": float32_bits(rule.gumbel_from_bits(bits)[0]),
                }
            )
    sample_cases = []
    for case_index, params in enumerate(SAMPLING_CASES):
        for repeat in range(4):
            logits = (rng.standard_normal(VOCAB_SIZE) * 2.0).astype(np.float32)
            if repeat == 3:
                logits[5] = logits[9] = logits.max() + 1.0  # a tie in the logits
            seed = int(rng.integers(0, 2**63)) * 2 + repeat % 2
            position = int(rng.integers(0, 4096))
            sampled = rule.sample_tokens(logits[None, :], np.uint64(seed), position, params)
            sample_cases.append(
                {
                    "name": f"case{case_index}-{repeat}",
                    "logits_f32_bits": float32_bits(logits),
                    "seed": seed,
                    "position": position,
                    "temperature": params.temperature,
                    "top_k": params.top_k,
                    "top_p": params.top_p,
                    "token_id": int(sampled.token_ids[0]),
                    "logprob_f32_bits": float32_bits(sampled.logprobs)[0],
                    "margin_f32_bits": float32_bits(sampled.margins)[0],
                }
            )
    return {
        "description": "protocol/sampling.py vectors; floats as float32 bit patterns",
        "vocab_size": VOCAB_SIZE,
        "derive_sample_seed": seed_cases,
        "noise": noise_cases,
        "sample": sample_cases,
    }


def commitment_vectors() -> dict:
    rng = np.random.default_rng(20260102)
    hidden_cases = []
    for num_tokens, hidden_size in ((40, 8), (32, 16), (3, 24)):
        values = rng.standard_normal((num_tokens, hidden_size)).astype(np.float32) * 3.0
        values[0, :4] = values[0, 4]  # ties in magnitude
        bits = commitment.bf16_bits(values)
        hidden_cases.append(
            {
                "num_tokens": num_tokens,
                "hidden_size": hidden_size,
                "hidden_bf16_bits": bits.ravel().tolist(),
                "commitment_hex": commitment.commit(bits).hex(),
            }
        )
    indices = rng.choice(2**22, size=commitment.TOP_K, replace=False).astype(np.int64)
    values = commitment.bf16_bits(rng.standard_normal(commitment.TOP_K).astype(np.float32))
    points_case = {
        "indices": indices.tolist(),
        "bf16_bits": values.tolist(),
        "proof_hex": commitment.proofs_from_points(indices[None], values[None])[0].hex(),
    }
    return {
        "description": "protocol/commitment.py vectors (toploc 0.1.6 encoding)",
        "commit": hidden_cases,
        "points": points_case,
    }


def policy_vectors() -> dict:
    """Two versions of a tiny policy: their state hashes, keyframe and delta payloads (before
    zstd, whose output may differ between library versions), and the signed manifest of the
    delta, whose blob list is given rather than compressed here."""
    rng = np.random.default_rng(20260103)
    shapes = {"model.embed.weight": (6, 8), "model.norm.weight": (8,), "scale": ()}
    base = {name: rng.integers(0, 1 << 16, size=shape).astype(np.uint16) for name, shape in shapes.items()}
    new = {name: bits.copy() for name, bits in base.items()}
    new["model.embed.weight"].reshape(-1)[[0, 5, 6, 40, 47]] ^= np.array([1, 2, 0x8000, 0x7F, 3], dtype=np.uint16)
    new["model.norm.weight"][:7] ^= 1  # dense: a bitmap
    payload = b"".join(b"".join(section) for section in codec.delta_sections(base, new))
    delta = PolicyManifest(
        run_id="vector-run",
        version=8,
        base_version=7,
        codec=Codec.DELTA,
        tensors=codec.tensor_specs(new),
        blobs=(BlobRef(hash=manifest.blob_hash(b"the delta's one blob"), size=97, uncompressed_size=len(payload)),),
        state_hash=codec.state_hash(new),
        created_at_ms=1767225600000,
        base_state_hash=codec.state_hash(base),
    )
    trainer = Identity.from_seed(bytes(range(32)))
    signed = manifest.sign_manifest(trainer, delta)
    return {
        "description": "protocol/codec.py and protocol/manifest.py vectors; bf16 states as uint16 bits in C order",
        "states": [
            {name: {"shape": list(bits.shape), "bits": bits.ravel().tolist()} for name, bits in state.items()}
            for state in (base, new)
        ],
        "state_hashes_hex": [codec.state_hash(base).hex(), codec.state_hash(new).hex()],
        "keyframe_payload_hex": b"".join(b"".join(s) for s in codec.keyframe_sections(base)).hex(),
        "delta_payload_hex": payload.hex(),
        "trainer_seed_hex": bytes(range(32)).hex(),
        "delta_manifest_hex": signed.manifest_bytes.hex(),
        "delta_signature_hex": signed.signature.hex(),
    }


def _compact_number_lists(text: str) -> str:
    return re.sub(
        r"\[[\d,\s-]+\]", lambda match: "[" + ", ".join(match.group(0)[1:-1].split()).replace(",,", ",") + "]", text
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=VECTORS_DIR)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, vectors in (
        ("sampling.json", sampling_vectors()),
        ("commitment.json", commitment_vectors()),
        ("policy.json", policy_vectors()),
    ):
        (args.out_dir / name).write_text(_compact_number_lists(json.dumps(vectors, indent=1)) + "\n")
        print(f"wrote {args.out_dir / name}")


if __name__ == "__main__":
    main()
