"""Operator and contributor mistakes (issue 21): each gets one line naming the cause and the fix, a
non-zero exit code and no traceback. Every test runs the real command."""

import os
import signal
import socket
import subprocess
import time

import pytest

from protocol.identity import Identity
from tests.integration.cluster import Cluster

TIMEOUT_S = 120


def _run(command, *args, cwd=None):
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=TIMEOUT_S, cwd=cwd)


def _error_line(result, command_name: str) -> str:
    """The one error line of a refused command, after checking there is no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"rollproof {command_name}: error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def fingerprint() -> str:
    return Identity.generate().key_id


@pytest.fixture
def taken_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _serve(rollproof_command, tmp_path, model, fingerprint, *flags):
    return _run(
        rollproof_command,
        "coordinator",
        "serve",
        "--data-dir",
        str(tmp_path / "coordinator"),
        "--model",
        str(model),
        "--trainer-key-fingerprint",
        fingerprint,
        "--grpc-port",
        "0",
        "--http-port",
        "0",
        *flags,
    )


@pytest.mark.parametrize("which", ["grpc", "http"])
def test_a_taken_port_names_the_address_and_the_flag(
    rollproof_command, tmp_path, tiny_model, fingerprint, taken_port, which
):
    result = _serve(rollproof_command, tmp_path, tiny_model, fingerprint, f"--{which}-port", str(taken_port))
    line = _error_line(result, "coordinator")
    assert f"127.0.0.1:{taken_port}" in line and f"--{which}-port" in line


def test_a_database_that_does_not_open_is_named_without_its_password(
    rollproof_command, tmp_path, tiny_model, fingerprint
):
    url = "postgresql+psycopg://rollproof:s3cret@127.0.0.1:5432/rollproof_no_such_database"
    result = _serve(rollproof_command, tmp_path, tiny_model, fingerprint, "--set", f"store.url={url}")
    line = _error_line(result, "coordinator")
    assert "cannot open the store postgresql+psycopg://rollproof:***@127.0.0.1:5432/rollproof_no_such_database" in line
    assert "s3cret" not in result.stderr


def test_a_missing_model_directory_and_a_checkpoint_are_named(rollproof_command, tmp_path, fingerprint):
    missing = _serve(rollproof_command, tmp_path, tmp_path / "no-such-dir", fingerprint)
    assert _error_line(missing, "coordinator").endswith(f"model directory {tmp_path / 'no-such-dir'} does not exist")
    checkpoint = tmp_path / "trainer" / "checkpoints" / "step-00000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / "optimizer.pt").write_bytes(b"")
    for directory in (checkpoint, checkpoint.parent):
        line = _error_line(_run(rollproof_command, "eval", "--model", str(directory)), "eval")
        assert "is a trainer checkpoint" in line and "rollproof trainer export" in line


def test_node_key_files_must_exist_and_be_files(rollproof_command, tmp_path, tiny_model, fingerprint):
    base = ["node", "run", "--model", str(tiny_model), "--state-dir", str(tmp_path / "node")]
    mistyped = _run(rollproof_command, *base, "--trainer-key-fingerprint", fingerprint, "--key-file", "nokey.pem")
    assert "key file nokey.pem does not exist; create one with `rollproof keygen --out nokey.pem`" in _error_line(
        mistyped, "node"
    )
    assert not (tmp_path / "node" / "node.key").exists()
    (tmp_path / "keys").mkdir()
    directory = _run(
        rollproof_command, *base, "--trainer-key-fingerprint", fingerprint, "--set", f"key_file={tmp_path / 'keys'}/"
    )
    assert "is a directory; name the key file itself" in _error_line(directory, "node")
    typo = _run(rollproof_command, *base, "--trainer-key-fingerprint", "foo")
    assert "trainer_key_fingerprint" in typo.stderr and "'foo' is not the id of an Ed25519 key" in typo.stderr
    assert typo.returncode == 2 and "Traceback" not in typo.stderr


def test_a_node_without_a_coordinator_says_where_it_looked_and_stops_cleanly_on_ctrl_c(
    rollproof_command, tmp_path, tiny_model, fingerprint, free_port
):
    process = subprocess.Popen(
        [
            *rollproof_command,
            "node",
            "run",
            "--model",
            str(tiny_model),
            "--state-dir",
            str(tmp_path / "node"),
            "--trainer-key-fingerprint",
            fingerprint,
            "--coordinator",
            f"127.0.0.1:{free_port}",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        deadline = time.monotonic() + TIMEOUT_S
        while not any("no coordinator answers at" in line for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, "".join(lines)
            lines.append(process.stderr.readline())
        hint = next(line for line in lines if "no coordinator answers at" in line)
        assert f"127.0.0.1:{free_port}" in hint and "grpc=HOST:PORT" in hint
        assert any("created a new node key" in line for line in lines)
        process.send_signal(signal.SIGINT)
        rest = process.communicate(timeout=TIMEOUT_S)[1]
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0 and "Traceback" not in rest, rest


def test_admin_flags_go_before_or_after_the_action(rollproof_command, free_port):
    for argv in (
        ["admin", "--coordinator", f"127.0.0.1:{free_port}", "--token", "t", "status"],
        ["admin", "status", "--coordinator", f"127.0.0.1:{free_port}", "--token", "t"],
    ):
        line = _error_line(_run(rollproof_command, *argv), "admin")
        assert f"no coordinator answers at 127.0.0.1:{free_port}" in line


def test_a_closed_pipe_ends_the_command_quietly(rollproof_command):
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` that has already gone
    try:
        result = subprocess.run(
            [*rollproof_command, "config", "show", "coordinator"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=TIMEOUT_S,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 141 and result.stderr == "", result.stderr


def test_config_typos_get_a_suggestion_and_show_hides_passwords(rollproof_command):
    typo = _run(rollproof_command, "config", "show", "node", "--set", "engine.bach_size=3")
    assert typo.returncode == 2 and "engine.bach_size: unknown key; did you mean 'engine.batch_size'?" in typo.stderr
    shown = _run(rollproof_command, "config", "show", "coordinator", "--set", "store.url=postgresql://u:pw@db/run")
    assert (
        shown.returncode == 0 and '"url": "postgresql://u:***@db/run"' in shown.stdout and "u:pw@" not in shown.stdout
    )


def test_a_trainer_with_another_key_says_which_key_the_coordinator_wants(rollproof_command, tmp_path, tiny_model):
    cluster = Cluster(tmp_path, tiny_model, Identity.generate())
    try:
        cluster.start_coordinator()
        base = ["trainer", "run", "--coordinator", cluster.address, "--model", str(tiny_model)]
        environment = {**os.environ, **cluster.tls_environment()}
        empty = subprocess.run(
            [*rollproof_command, *base, "--data-dir", str(tmp_path / "empty")],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            env=environment,
        )
        assert "created a new trainer key" in empty.stderr
        line = _error_line(empty, "trainer")
        assert f"accepts trainer key {cluster.trainer_identity.key_id}" in line and "--key-file" in line
        missing = subprocess.run(
            [*rollproof_command, *base, "--key-file", str(tmp_path / "trainer.key")],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            env=environment,
        )
        assert "does not exist; create one with `rollproof keygen" in _error_line(missing, "trainer")
    finally:
        cluster.stop_all()
