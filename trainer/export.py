"""Exporting a published policy version as a Hugging Face model directory.

The version is rebuilt from the coordinator's policy store (`<coordinator data_dir>/policy`,
laid out as coordinator/blobstore.py describes, read here without changing it) the way a
node rebuilds it: the newest stored keyframe at or before the version, then the delta of every
version after it, each manifest checked against the pinned trainer key and every blob against
its hash (protocol/manifest.py open_update). The result is hashed in full and must equal the
version's state hash. Its weights replace those of the run's base model, whose config goes with
them, and every other file of the base model's directory (tokenizer files, chat template, licence)
is copied byte for byte, never re-saved: transformers re-saves some tokenizers as another one
(a qwen2 model's character tokenizer as a byte-level BPE that drops spaces). So
`AutoModelForCausalLM.from_pretrained(DIR)` and `rollproof eval --model DIR` load the export, and
its tokenizer is the base model's.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from protocol.codec import BF16State, state_hash
from protocol.manifest import (
    PolicyUpdateError,
    apply_update,
    open_update,
    signed_manifest_from_bytes,
    verify_manifest,
)
from protocol.types import Codec, PolicyManifest

_MANIFEST_NAME = re.compile(r"^(\d{12})\.(keyframe|delta)$")
# Weight files (and their shard indexes) of a model directory: the export writes its own.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


class ExportError(ValueError):
    pass


def stored_manifests(policy_dir: Path) -> dict[tuple[int, Codec], Path]:
    """The manifest files of a policy store, by (version, codec)."""
    manifest_dir = Path(policy_dir).expanduser() / "manifests"
    if not manifest_dir.is_dir():
        raise ExportError(f"{policy_dir} is not a policy store (no manifests/); pass <coordinator data_dir>/policy")
    stored = {}
    for path in manifest_dir.iterdir():
        if match := _MANIFEST_NAME.match(path.name):
            codec = Codec.KEYFRAME if match.group(2) == "keyframe" else Codec.DELTA
            stored[(int(match.group(1)), codec)] = path
    return stored


def latest_stored_version(policy_dir: Path) -> int:
    stored = stored_manifests(policy_dir)
    if not stored:
        raise ExportError(f"the policy store {policy_dir} holds no version yet")
    return max(version for version, _ in stored)


def update_path(stored: dict[tuple[int, Codec], Path], version: int) -> list[Path]:
    """The manifests that rebuild `version`: the newest keyframe at or before it, then one
    delta per stored version after that keyframe, up to `version`."""
    keyframes = [v for v, codec in stored if codec == Codec.KEYFRAME and v <= version]
    if not keyframes:
        held = sorted({v for v, _ in stored})
        raise ExportError(
            f"version {version} cannot be rebuilt: no keyframe at or before it is stored "
            f"(stored versions: {held[0]}..{held[-1]})"
            if held
            else "the policy store is empty"
        )
    start = max(keyframes)
    later = sorted({v for v, _ in stored if start < v <= version})
    if version != start and (not later or later[-1] != version):
        raise ExportError(f"version {version} is not stored (the newest is {max(v for v, _ in stored)})")
    missing = [v for v in later if (v, Codec.DELTA) not in stored]
    if missing:
        raise ExportError(f"the delta to version {missing[0]} is not stored; version {version} cannot be rebuilt")
    return [stored[(start, Codec.KEYFRAME)], *(stored[(v, Codec.DELTA)] for v in later)]


def rebuild_version(policy_dir: Path, version: int, trainer_public_key: bytes) -> tuple[BF16State, PolicyManifest]:
    """The bf16 state of `version` and its manifest, every signature and hash checked."""
    policy_dir = Path(policy_dir).expanduser()
    state: BF16State | None = None
    held_hash: bytes | None = None
    manifest: PolicyManifest | None = None
    for path in update_path(stored_manifests(policy_dir), version):
        try:
            signed = signed_manifest_from_bytes(path.read_bytes())
            declared = verify_manifest(signed, trainer_public_key)
            blobs = {ref.hash: _read_blob(policy_dir, ref.hash) for ref in declared.blobs}
            update = open_update(
                signed,
                blobs,
                trainer_public_key=trainer_public_key,
                run_id=(manifest or declared).run_id,
                current_version=manifest.version if manifest else None,
                current_specs=None,
            )
            state = apply_update(state, update, held_state_hash=held_hash)
        except PolicyUpdateError as error:
            raise ExportError(f"{path.name} does not apply: {error}") from None
        manifest, held_hash = update.manifest, update.manifest.state_hash
    assert state is not None and manifest is not None
    if state_hash(state) != manifest.state_hash:
        raise ExportError(f"the rebuilt version {version} does not have the state hash its manifest declares")
    return state, manifest


def _read_blob(policy_dir: Path, blob_hash: bytes) -> bytes:
    path = policy_dir / "blobs" / blob_hash.hex()[:2] / blob_hash.hex()
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ExportError(f"blob {blob_hash.hex()} is missing from {policy_dir}") from None


def export_model(state: BF16State, base_model_dir: Path, out_dir: Path, *, dtype: str = "bfloat16") -> None:
    """Write `state` as the weights of the base model's architecture into `out_dir`, with the
    base model's config, and its other files copied byte for byte."""
    from policy.model import load_model
    from policy.weights import load_bf16_state

    base_model_dir, out_dir = Path(base_model_dir).expanduser(), Path(out_dir).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} exists and is not empty; choose a new directory")
    model = load_model(base_model_dir, dtype=dtype)
    load_bf16_state(model, state)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    copy_model_files(base_model_dir, out_dir)


def copy_model_files(base_model_dir: Path, out_dir: Path) -> None:
    """Copy byte for byte each file of `base_model_dir` (not its subdirectories) that is not
    weights and that `out_dir` does not have yet (save_pretrained wrote config.json and the
    generation config there)."""
    for path in sorted(base_model_dir.iterdir()):
        is_weights = any(path.name.endswith((suffix, f"{suffix}.index.json")) for suffix in _WEIGHT_SUFFIXES)
        if path.is_file() and not is_weights and not (out_dir / path.name).exists():
            shutil.copyfile(path, out_dir / path.name)
