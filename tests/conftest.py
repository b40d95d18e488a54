import re
import socket
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
VECTORS_DIR = REPO_ROOT / "tests" / "vectors"
# Tests under these start real processes: each gets the `integration` marker.
INTEGRATION_DIRS = (REPO_ROOT / "tests" / "integration", REPO_ROOT / "tests" / "adversarial")
# A test with one of these runs only when -m names one of its markers (other than `integration`,
# which says where a test lives): `-m slow`, `-m gpu`, `-m vllm`.
OPT_IN_MARKERS = frozenset({"slow", "gpu"})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the integration tests, and leave out the opt-in tests that -m does not ask for. This is
    not a -m in addopts because pytest keeps only the last -m: `-m "not integration"` would run the
    slow and gpu tests."""
    for item in items:
        if any(item.path.resolve().is_relative_to(directory) for directory in INTEGRATION_DIRS):
            item.add_marker(pytest.mark.integration)
    named = set(re.findall(r"[A-Za-z_]\w*", config.option.markexpr)) - {"and", "or", "not", "integration"}
    kept, deselected = [], []
    for item in items:
        markers = {marker.name for marker in item.iter_markers()}
        (deselected if markers & OPT_IN_MARKERS and not markers & named else kept).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A directory with the untrained default tiny model (config, safetensors, tokenizer)."""
    from policy.model import create_tiny_model

    directory = tmp_path_factory.mktemp("model")
    create_tiny_model(directory)
    return directory


@pytest.fixture
def rollproof_command() -> list[str]:
    """The real CLI, run as a subprocess with this interpreter."""
    return [sys.executable, "-m", "rollproof.cli"]
