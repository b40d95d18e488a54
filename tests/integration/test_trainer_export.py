"""`rollproof trainer export`, then `rollproof eval` on the exported directory (issue 6)."""

import json
import subprocess

import numpy as np
import torch

from coordinator.blobstore import BlobStore
from policy.model import load_model
from policy.weights import export_bf16_state
from protocol.identity import Identity
from trainer.publish import PolicyPublisher


def test_export_a_published_version_and_evaluate_it(tmp_path, tiny_model, rollproof_command):
    identity = Identity.generate()
    (tmp_path / "trainer").mkdir()
    identity.save(tmp_path / "trainer" / "trainer.key")
    store = BlobStore(tmp_path / "policy", run_id="demo", trainer_public_key=identity.public_key)
    publisher = PolicyPublisher(identity, "demo", store, keyframe_interval=10)
    model = load_model(tiny_model)
    states = {}
    for version in range(1, 4):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter), alpha=1e-3 * (version > 1))
        states[version] = export_bf16_state(model)
        publisher.publish(version, states[version])

    def run(*args):
        return subprocess.run([*rollproof_command, *args], capture_output=True, text=True, timeout=300)

    by_key_file = run(
        "trainer",
        "export",
        "--policy-dir",
        str(tmp_path / "policy"),
        "--model",
        str(tiny_model),
        "--data-dir",
        str(tmp_path / "trainer"),
        "--out",
        str(tmp_path / "v3"),
    )
    assert by_key_file.returncode == 0, by_key_file.stderr
    assert "exported policy version 3 of run demo" in by_key_file.stdout
    exported = export_bf16_state(load_model(tmp_path / "v3"))
    assert all(np.array_equal(exported[name], states[3][name]) for name in states[3])

    by_fingerprint = run(
        "trainer",
        "export",
        "--policy-dir",
        str(tmp_path / "policy"),
        "--model",
        str(tiny_model),
        "--trainer-key-fingerprint",
        identity.key_id,
        "--version",
        "2",
        "--out",
        str(tmp_path / "v2"),
    )
    assert by_fingerprint.returncode == 0, by_fingerprint.stderr
    exported = export_bf16_state(load_model(tmp_path / "v2"))
    assert all(np.array_equal(exported[name], states[2][name]) for name in states[2])

    wrong_key = run(
        "trainer",
        "export",
        "--policy-dir",
        str(tmp_path / "policy"),
        "--model",
        str(tiny_model),
        "--trainer-key-fingerprint",
        Identity.generate().key_id,
        "--out",
        str(tmp_path / "bad"),
    )
    assert wrong_key.returncode != 0 and "signed by" in wrong_key.stderr
    assert not (tmp_path / "bad").exists()

    evaluated = run("eval", "--model", str(tmp_path / "v3"), "--num-problems", "4", "--max-tokens", "4", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["num_problems"] == 4
