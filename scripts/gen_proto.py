"""Regenerate protocol/proto/*_pb2*.py(i) from the .proto sources.

Usage: python scripts/gen_proto.py [--out DIR]

The .proto files are the source of truth; tests/unit/test_generated_code.py runs this
script into a temporary directory and fails when the committed output differs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "protocol" / "proto"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    mypy_plugin = shutil.which("protoc-gen-mypy", path=str(Path(sys.executable).parent))
    if mypy_plugin is None:
        raise SystemExit("protoc-gen-mypy not found next to this Python: pip install -e '.[dev]'")
    include = Path(protoc.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(p.relative_to(REPO_ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={mypy_plugin}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: the repo)")
    args = parser.parse_args()
    generate(args.out)


if __name__ == "__main__":
    main()
