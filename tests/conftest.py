import socket
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
VECTORS_DIR = REPO_ROOT / "tests" / "vectors"


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
