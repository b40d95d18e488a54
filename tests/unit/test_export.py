import numpy as np
import pytest

from coordinator.blobstore import BlobStore
from policy.model import load_model
from policy.tokenizer import load_tokenizer
from policy.weights import export_bf16_state
from protocol.identity import Identity
from tests.unit.test_codec import perturb, random_bf16_state
from tests.unit.test_model_families import char_tokenizer_model_dir
from trainer.export import ExportError, export_model, latest_stored_version, rebuild_version
from trainer.publish import PolicyPublisher

RUN = "run-export"
TRAINER = Identity.from_seed(bytes([9]) * 32)
SHAPES = {"embed": (64, 16), "layer.weight": (16, 32), "norm": (16,)}


def publish_all(policy_dir, states, *, keyframe_interval=3, num_keyframes_kept=2):
    store = BlobStore(
        policy_dir, run_id=RUN, trainer_public_key=TRAINER.public_key, num_keyframes_kept=num_keyframes_kept
    )
    publisher = PolicyPublisher(TRAINER, RUN, store, keyframe_interval=keyframe_interval)
    for version, state in states.items():
        publisher.publish(version, state)


@pytest.fixture
def states():
    rng = np.random.default_rng(1)
    result = {1: random_bf16_state(rng, SHAPES)}
    for version in range(2, 8):
        result[version] = perturb(rng, result[version - 1], 0.05)
    return result


def assert_same_state(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name])


def test_every_kept_version_is_rebuilt_bit_for_bit(tmp_path, states):
    publish_all(tmp_path, states)  # keyframes at 1, 3, 6; the two newest kept: versions 3..7 rebuild
    assert latest_stored_version(tmp_path) == 7
    for version in range(3, 8):
        state, manifest = rebuild_version(tmp_path, version, TRAINER.public_key)
        assert manifest.version == version and manifest.run_id == RUN
        assert_same_state(state, states[version])


def test_versions_that_cannot_be_rebuilt_are_refused(tmp_path, states):
    publish_all(tmp_path, states)
    with pytest.raises(ExportError, match="no keyframe at or before"):
        rebuild_version(tmp_path, 2, TRAINER.public_key)
    with pytest.raises(ExportError, match="not stored"):
        rebuild_version(tmp_path, 9, TRAINER.public_key)
    with pytest.raises(ExportError, match="not a policy store"):
        rebuild_version(tmp_path / "nothing", 3, TRAINER.public_key)


def test_wrong_key_and_corrupted_blobs_are_refused(tmp_path, states):
    publish_all(tmp_path, states)
    with pytest.raises(ExportError, match="signed by"):
        rebuild_version(tmp_path, 7, Identity.generate().public_key)
    blob = next(path for path in sorted((tmp_path / "blobs").glob("*/*")))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 1
    blob.write_bytes(bytes(data))
    failures = 0
    for version in range(3, 8):
        try:
            rebuild_version(tmp_path, version, TRAINER.public_key)
        except ExportError as error:
            assert "hash" in str(error)
            failures += 1
    assert failures > 0


def test_exported_directory_loads_with_transformers(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = export_bf16_state(load_model(tiny_model))
    published = perturb(np.random.default_rng(2), base, 0.1)
    publish_all(tmp_path / "policy", {1: base, 2: published})
    state, _ = rebuild_version(tmp_path / "policy", 2, TRAINER.public_key)
    export_model(state, tiny_model, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    assert_same_state(export_bf16_state(model), published)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    assert tokenizer.pad_token_id == AutoTokenizer.from_pretrained(str(tiny_model)).pad_token_id
    with pytest.raises(ExportError, match="not empty"):
        export_model(state, tiny_model, tmp_path / "out")


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_export_copies_the_base_models_tokenizer_byte_for_byte(tmp_path, family):
    from transformers import AutoTokenizer

    base = char_tokenizer_model_dir(family, tmp_path / "base")
    (base / "chat_template.jinja").write_text("{% for message in messages %}{{ message.content }}{% endfor %}")
    export_model(export_bf16_state(load_model(base)), base, tmp_path / "out")
    out = tmp_path / "out"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert {path.name for path in out.iterdir()} == {path.name for path in base.iterdir()}
    text = " two  spaces, then\na newline "

    def auto_tokenizer(directory):
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)

    for load in (load_tokenizer, auto_tokenizer):
        base_tokenizer, exported_tokenizer = load(base), load(out)
        ids = exported_tokenizer(text).input_ids
        assert ids == base_tokenizer(text).input_ids
        assert exported_tokenizer.decode(ids, skip_special_tokens=True) == base_tokenizer.decode(
            ids, skip_special_tokens=True
        )
    exported_tokenizer = load_tokenizer(out)
    assert exported_tokenizer.decode(exported_tokenizer(text).input_ids, skip_special_tokens=True) == text
