import subprocess
import sys

from tests.conftest import REPO_ROOT

GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def test_committed_generated_code_matches_the_proto_sources(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = {p.name: p.read_text() for p in (tmp_path / "protocol" / "proto").iterdir()}
    committed_dir = REPO_ROOT / "protocol" / "proto"
    committed = {p.name: p.read_text() for p in committed_dir.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
    assert fresh.keys() == committed.keys(), "generated files differ: run `python scripts/gen_proto.py`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated code {stale}: run `python scripts/gen_proto.py`"
