from pathlib import Path

import pytest

from coordinator.config import CoordinatorConfig
from node.config import NodeConfig
from rollproof.config import ConfigError, load_config, parse_assignment
from tests.conftest import REPO_ROOT
from trainer.config import TrainerConfig

ROLES = {"coordinator": CoordinatorConfig, "node": NodeConfig, "trainer": TrainerConfig}
EXAMPLES = sorted((REPO_ROOT / "configs").glob("*.toml"))


def _role_of(path: Path) -> str:
    return path.stem.split("-")[0]


def test_there_are_examples_for_every_role():
    assert {_role_of(p) for p in EXAMPLES} >= set(ROLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_parses(path):
    load_config(ROLES[_role_of(path)], _role_of(path), config_file=path, environ={})


def test_precedence_defaults_file_env_flags(tmp_path):
    config_file = tmp_path / "node.toml"
    config_file.write_text('display_name = "from-file"\n[engine]\nthreads = 3\nbatch_size = 5\n')
    environ = {"ROLLPROOF_NODE_ENGINE__THREADS": "4", "ROLLPROOF_NODE_DISPLAY_NAME": "from-env"}
    config = load_config(
        NodeConfig,
        "node",
        config_file=config_file,
        environ=environ,
        overrides={"display_name": "from-flag", "engine.dtype": None},
    )
    assert config.display_name == "from-flag"
    assert config.engine.threads == 4
    assert config.engine.batch_size == 5
    assert config.engine.dtype == "float32"
    assert config.engine.device == "cpu"


def test_bad_value_names_the_key(tmp_path):
    config_file = tmp_path / "node.toml"
    config_file.write_text("[engine]\nbatch_size = 0\n")
    with pytest.raises(ConfigError, match=r"engine\.batch_size") as info:
        load_config(NodeConfig, "node", config_file=config_file, environ={})
    assert str(config_file) in str(info.value)


def test_bad_env_value_names_the_key_and_source():
    with pytest.raises(ConfigError, match=r"(?s)ROLLPROOF_TRAINER_\* environment.*optimizer\.lr"):
        load_config(TrainerConfig, "trainer", environ={"ROLLPROOF_TRAINER_OPTIMIZER__LR": "fast"})


@pytest.mark.parametrize(
    ("key", "reported"), [("engine.threadz", "engine.threadz"), ("enginee.threads", "enginee"), ("colour", "colour")]
)
def test_unknown_key_is_an_error(key, reported):
    with pytest.raises(ConfigError, match=f"{reported}: unknown key"):
        load_config(NodeConfig, "node", overrides={key: 1}, environ={})


def test_unknown_env_key_is_an_error():
    with pytest.raises(ConfigError, match="bogus: unknown key"):
        load_config(CoordinatorConfig, "coordinator", environ={"ROLLPROOF_COORDINATOR_BOGUS": "1"})


def test_invalid_toml_and_missing_file(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[engine\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(NodeConfig, "node", config_file=broken, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(NodeConfig, "node", config_file=tmp_path / "absent.toml", environ={})


def test_parse_assignment_reads_toml_values():
    assert parse_assignment("engine.threads=2") == ("engine.threads", 2)
    assert parse_assignment("p2p.enabled=true") == ("p2p.enabled", True)
    assert parse_assignment("display_name=alice") == ("display_name", "alice")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_assignment("threads")


def test_operator_token_is_not_printed():
    config = load_config(CoordinatorConfig, "coordinator", environ={"ROLLPROOF_COORDINATOR_OPERATOR_TOKEN": "s3cret"})
    assert config.operator_token.get_secret_value() == "s3cret"
    assert "s3cret" not in config.model_dump_json()


def test_tls_settings_parse():
    coordinator = load_config(
        CoordinatorConfig,
        "coordinator",
        environ={},
        overrides={
            "server.tls_cert": "/etc/rollproof/coordinator.crt",
            "server.tls_key": "/etc/rollproof/coordinator.key",
        },
    )
    assert coordinator.server.tls_cert == Path("/etc/rollproof/coordinator.crt")
    node = load_config(NodeConfig, "node", environ={"ROLLPROOF_NODE_COORDINATOR_CA": "/etc/rollproof/ca.pem"})
    assert node.coordinator_tls.ca_file == Path("/etc/rollproof/ca.pem")
    fingerprint = "AB:" * 31 + "CD"
    trainer = load_config(TrainerConfig, "trainer", environ={}, overrides={"coordinator_fingerprint": fingerprint})
    assert trainer.coordinator_tls.fingerprint == "ab" * 31 + "cd"
    assert not load_config(NodeConfig, "node", environ={}).coordinator_tls.enabled


def test_bad_tls_settings_name_the_problem():
    with pytest.raises(ConfigError, match="set server.tls_cert and server.tls_key together"):
        load_config(CoordinatorConfig, "coordinator", environ={}, overrides={"server.tls_cert": "/tmp/c.pem"})
    with pytest.raises(ConfigError, match="not a SHA-256 certificate fingerprint"):
        load_config(NodeConfig, "node", environ={}, overrides={"coordinator_fingerprint": "abc"})
    with pytest.raises(ConfigError, match="coordinator_ca or coordinator_fingerprint, not both"):
        load_config(
            TrainerConfig,
            "trainer",
            environ={},
            overrides={"coordinator_ca": "/tmp/ca.pem", "coordinator_fingerprint": "ab" * 32},
        )
