"""README's "Running the pieces yourself", run as written: the commands of its first block, parsed
from the README, with only the placeholders filled in (DIR, the trainer's key id) and the
coordinator moved to a free port. The held-out reward of the published policy must rise."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.cluster import wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ADDRESS = "127.0.0.1:7470"
KEY_ID_PLACEHOLDER = "12D3KooW..."
MIN_REWARD_GAIN = 0.1
TRAINING_TIMEOUT_S = 900


def recipe_commands() -> list[list[str]]:
    """The first bash block under "## Running the pieces yourself", one argv per command."""
    section = (REPO_ROOT / "README.md").read_text().split("## Running the pieces yourself", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.split("#")[0].strip()]


def test_the_recipe_parses_into_the_commands_it_promises():
    names = [tuple(argv[1:3]) for argv in recipe_commands()]
    assert names[:5] == [
        ("keygen", "--out"),
        ("bootstrap",),
        ("coordinator", "serve"),
        ("trainer", "run"),
        ("node", "run"),
    ], names


SERVICES = (["coordinator", "serve"], ["trainer", "run"], ["node", "run"])


class Recipe:
    """The recipe's commands in a scratch directory, placeholders filled as they become known."""

    def __init__(self, directory: Path, port: int):
        self.directory = directory
        self.port = port
        self.environment = {**os.environ, "ROLLPROOF_CACHE_DIR": str(directory / "cache")}
        self.filled = {"DIR": "", KEY_ID_PLACEHOLDER: ""}
        self.services: list[subprocess.Popen] = []

    def argv_of(self, argv: list[str]) -> list[str]:
        assert argv[0] == "rollproof", argv
        address = f"127.0.0.1:{self.port}"
        args = [self.filled.get(arg, arg).replace(DEFAULT_ADDRESS, address) for arg in argv[1:]]
        if args[:2] == ["coordinator", "serve"]:
            args += ["--grpc-port", str(self.port), "--http-port", "0"]
        return [sys.executable, "-m", "rollproof.cli", *args]

    def run(self, argv: list[str]) -> str:
        result = subprocess.run(
            self.argv_of(argv), cwd=self.directory, env=self.environment, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        if argv[1] == "keygen":
            self.filled[KEY_ID_PLACEHOLDER] = result.stdout.split("key id: ")[1].split()[0]
        elif argv[1] == "bootstrap":
            self.filled["DIR"] = result.stdout.strip().splitlines()[-1]
        return result.stdout

    def start(self, argv: list[str]) -> None:
        with (self.directory / f"{argv[1]}.log").open("wb") as log:
            self.services.append(
                subprocess.Popen(self.argv_of(argv), cwd=self.directory, env=self.environment, stdout=log, stderr=log)
            )
        if argv[1] == "coordinator":
            wait_for(lambda: (self.directory / "coord" / "endpoints.json").exists(), 120, "the coordinator")

    def held_out_rewards(self) -> list[float]:
        for service in self.services:
            assert service.poll() is None, (self.directory / "trainer.log").read_text()[-3000:]
        metrics = self.directory / "trainer" / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        return [record["eval_reward"] for record in records if "eval_reward" in record]

    def stop(self) -> None:
        """Ctrl-C to every service, newest first, then SIGKILL to what is left after a minute."""
        for service in reversed(self.services):
            if service.poll() is None:
                service.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 60
        for service in reversed(self.services):
            try:
                service.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(service.pid, signal.SIGKILL)
                service.wait()


@pytest.mark.slow
def test_the_recipe_as_written_trains(tmp_path, free_port):
    """Commands before the services run to completion, the services stay up until the held-out
    reward has risen, and the commands after them (node status, eval) run then."""
    commands = recipe_commands()
    last_service = max(i for i, argv in enumerate(commands) if argv[1:3] in SERVICES)
    recipe = Recipe(tmp_path, free_port)
    try:
        for argv in commands[: last_service + 1]:
            if argv[1:3] in SERVICES:
                recipe.start(argv)
            else:
                recipe.run(argv)

        def risen() -> bool:
            rewards = recipe.held_out_rewards()
            return len(rewards) >= 2 and max(rewards[1:]) >= rewards[0] + MIN_REWARD_GAIN

        wait_for(risen, TRAINING_TIMEOUT_S, "the held-out reward to rise", interval_s=5)
        after = {tuple(argv[1:3]): recipe.run(argv) for argv in commands[last_service + 1 :]}
    finally:
        recipe.stop()
    assert "rollouts accepted" in after["node", "status"]
    assert "mean reward" in after["eval", "--model"]
