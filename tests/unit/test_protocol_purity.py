import subprocess
import sys

from tests.conftest import REPO_ROOT

FORBIDDEN = ["torch", "transformers", "vllm", "sqlalchemy", "grpc"]


def test_importing_every_protocol_module_imports_no_torch():
    modules = sorted(
        "protocol." + ".".join(p.relative_to(REPO_ROOT / "protocol").with_suffix("").parts)
        for p in (REPO_ROOT / "protocol").rglob("*.py")
        if p.name != "__init__.py" and not p.name.endswith("_pb2_grpc.py")
    )
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert result.stdout.strip() == "", f"protocol/ imported {result.stdout.strip()}"
