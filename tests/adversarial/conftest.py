import json
from pathlib import Path

import pytest

from tests.adversarial.harness import MARGINS
from tests.integration.cluster import checking_cluster

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, tiny_model):
    """The attack suite's coordinator, shared by every module that does not start its own."""
    with checking_cluster(
        tmp_path_factory.mktemp("adversarial"), tiny_model, "server.max_message_bytes=262144"
    ) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def trusted(tiny_model):
    """The published policy as an honest node holds it: the bf16 rounding of the weights."""
    from policy.model import load_model
    from policy.tokenizer import load_tokenizer
    from policy.weights import export_bf16_state, load_bf16_state

    model = load_model(tiny_model)
    load_bf16_state(model, export_bf16_state(model))
    return model, load_tokenizer(tiny_model)


@pytest.fixture(scope="session", autouse=True)
def report_margins():
    yield
    if MARGINS:
        artifacts = REPO_ROOT / "artifacts"
        artifacts.mkdir(exist_ok=True)
        (artifacts / "adversarial-margins.json").write_text(json.dumps(MARGINS, indent=2, sort_keys=True))
        print("\ndetection margins (measured vs allowed):")
        for attack, margin in sorted(MARGINS.items()):
            print(f"  {attack}: {margin}")
