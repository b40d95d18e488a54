import os
import stat
import subprocess
import sys

HEAVY_MODULES = ["torch", "transformers", "grpc", "sqlalchemy", "numpy"]


def _run(command, *args, **kwargs):
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60, **kwargs)


def test_help_imports_nothing_heavy():
    """`rollproof --help` and every `rollproof X --help` must be instant: no heavy import before parsing."""
    code = (
        "import sys\n"
        "from rollproof.cli import build_parser\n"
        "parser = build_parser()\n"
        "names = list(parser._subparsers._group_actions[0].choices)\n"
        "for argv in [['--help']] + [[n, '--help'] for n in names]:\n"
        "    try:\n"
        "        parser.parse_args(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY_MODULES!r} if m in sys.modules), file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage: rollproof keygen" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == "HEAVY="


def test_help_lists_the_commands(rollproof_command):
    result = _run(rollproof_command, "--help")
    assert result.returncode == 0
    for name in ["keygen", "version", "config"]:
        assert name in result.stdout


def test_version(rollproof_command):
    result = _run(rollproof_command, "version")
    assert result.returncode == 0 and result.stdout.startswith("rollproof ")


def test_keygen_writes_an_owner_only_key_and_prints_its_id(rollproof_command, tmp_path):
    key_path = tmp_path / "trainer.key"
    result = _run(rollproof_command, "keygen", "--out", str(key_path))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    key_id = result.stdout.split("key id: ")[1].strip()
    assert key_id.startswith("12D3KooW")
    shown = _run(rollproof_command, "keygen", "--out", str(key_path), "--show")
    assert shown.stdout.strip().endswith(key_id)
    again = _run(rollproof_command, "keygen", "--out", str(key_path))
    assert again.returncode == 2 and "already exists" in again.stderr
    os.chmod(key_path, 0o644)
    refused = _run(rollproof_command, "keygen", "--out", str(key_path), "--show")
    assert refused.returncode == 2 and "chmod 600" in refused.stderr


def test_config_errors_are_clear_and_exit_2(rollproof_command):
    result = _run(rollproof_command, "config", "show", "node", "--set", "engine.batch_size=-1")
    assert result.returncode == 2
    assert "engine.batch_size" in result.stderr and "Traceback" not in result.stderr
