"""README's "Running the pieces yourself", run as written: the commands of its first block, parsed
from the README, with only the placeholders filled in (DIR, the trainer's key id) and the
coordinator moved to a free port. The held-out reward of the published policy must rise.

The same recipe runs again with gRPC over TLS, as the README's TLS subsection writes it (its `certs`
command, its coordinator flags, a node trusting the certificate file and the trainer pinning its
fingerprint), and with the coordinator's store on PostgreSQL (`store.url`, a fresh database)."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.cluster import postgres_database, wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ADDRESS = "127.0.0.1:7470"
KEY_ID_PLACEHOLDER = "12D3KooW..."
FINGERPRINT_PLACEHOLDER = "4177c0d5..."
ALL_INTERFACES = "server.host=0.0.0.0"
MIN_REWARD_GAIN = 0.1
TRAINING_TIMEOUT_S = 900

Service = tuple[str, ...]
COORDINATOR: Service = ("coordinator", "serve")
TRAINER: Service = ("trainer", "run")
NODE: Service = ("node", "run")
SERVICES = (COORDINATOR, TRAINER, NODE)


def bash_block(heading: str) -> list[list[str]]:
    """The first bash block under a README heading, one argv per command."""
    section = (REPO_ROOT / "README.md").read_text().split(f"\n{heading}\n", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.split("#")[0].strip()]


def recipe_commands() -> list[list[str]]:
    return bash_block("## Running the pieces yourself")


def service(argv: list[str]) -> tuple[str, ...]:
    return tuple(argv[1:3])


@dataclass(frozen=True)
class Variant:
    """What a variant adds to the recipe: commands run first, flags appended to a service's command,
    where the certificate is published (copied) for the clients that trust it by file, and the
    transport and store the coordinator must report when it starts."""

    first: list[list[str]] = field(default_factory=list)
    flags: dict[Service, list[str]] = field(default_factory=dict)
    published_certificate: str | None = None
    transport: str = "plaintext"
    store: str = "sqlite"


def client_flags(argv: list[str]) -> list[str]:
    """A `node run` line's flags but its address and the `...` that stands for the recipe's."""
    flags = [arg for arg in argv[3:] if arg != "..."]
    address = flags.index("--coordinator")
    return flags[:address] + flags[address + 2 :]


def tls_variant() -> Variant:
    """The README's TLS subsection on top of the recipe: its `certs` command, its coordinator flags
    (after the `...`), its first node line's flags (the certificate file) on the node, and its second
    node line's (the pinned fingerprint) on the trainer, which "takes the same flags"."""
    commands = bash_block("### TLS")
    (coordinator,) = [argv for argv in commands if service(argv) == COORDINATOR]
    by_file, by_fingerprint = [client_flags(argv) for argv in commands if service(argv) == NODE]
    return Variant(
        first=[argv for argv in commands if argv[1] == "certs"],
        flags={
            COORDINATOR: coordinator[coordinator.index("...") + 1 :],
            NODE: by_file,
            TRAINER: by_fingerprint,
        },
        published_certificate=by_file[by_file.index("--coordinator-ca") + 1],
        transport="TLS",
    )


def test_the_recipe_parses_into_the_commands_it_promises():
    names = [service(argv) for argv in recipe_commands()]
    assert names[:5] == [
        ("keygen", "--out"),
        ("bootstrap",),
        ("coordinator", "serve"),
        ("trainer", "run"),
        ("node", "run"),
    ], names


def test_the_tls_subsection_parses_into_certs_and_flags_for_each_service():
    variant = tls_variant()
    assert [argv[1] for argv in variant.first] == ["certs"]
    assert {"server.tls_cert=./tls/coordinator.crt", "server.tls_key=./tls/coordinator.key"} <= set(
        variant.flags[COORDINATOR]
    ), variant.flags
    assert variant.flags[NODE][0] == "--coordinator-ca" and variant.published_certificate, variant.flags
    assert variant.flags[TRAINER] == ["--coordinator-fingerprint", FINGERPRINT_PLACEHOLDER], variant.flags


class Recipe:
    """The recipe's commands in a scratch directory, placeholders filled as they become known."""

    def __init__(self, directory: Path, port: int, variant: Variant):
        self.directory = directory
        self.port = port
        self.variant = variant
        self.environment = {**os.environ, "ROLLPROOF_CACHE_DIR": str(directory / "cache")}
        # Placeholders, and what keeps the test on loopback: the coordinator binds 127.0.0.1 and
        # clients dial it there (a certificate always names loopback).
        self.filled = {
            "DIR": "",
            KEY_ID_PLACEHOLDER: "",
            FINGERPRINT_PLACEHOLDER: "",
            ALL_INTERFACES: "server.host=127.0.0.1",
        }
        self.services: list[subprocess.Popen] = []

    def argv_of(self, argv: list[str]) -> list[str]:
        assert argv[0] == "rollproof", argv
        address = f"127.0.0.1:{self.port}"
        args = [*argv[1:], *self.variant.flags.get(service(argv), [])]
        args = [self.filled.get(arg, arg).replace(DEFAULT_ADDRESS, address) for arg in args]
        if service(argv) == COORDINATOR:
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
        elif argv[1] == "certs":
            self.filled[FINGERPRINT_PLACEHOLDER] = result.stdout.split("fingerprint (SHA-256): ")[1].split()[0]
            certificate = self.directory / result.stdout.split("wrote ")[1].split(" and ")[0]
            published = self.variant.published_certificate
            if published is not None and (self.directory / published).resolve() != certificate.resolve():
                shutil.copy(certificate, self.directory / published)
        return result.stdout

    def start(self, argv: list[str]) -> None:
        with (self.directory / f"{argv[1]}.log").open("wb") as log:
            self.services.append(
                subprocess.Popen(self.argv_of(argv), cwd=self.directory, env=self.environment, stdout=log, stderr=log)
            )
        if service(argv) == COORDINATOR:
            wait_for(lambda: (self.directory / "coord" / "endpoints.json").exists(), 120, "the coordinator")

    def held_out_rewards(self) -> list[float]:
        for process in self.services:
            assert process.poll() is None, "\n".join(
                f"{log.name}:\n{log.read_text(errors='replace')[-2000:]}" for log in self.directory.glob("*.log")
            )
        metrics = self.directory / "trainer" / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        return [record["eval_reward"] for record in records if "eval_reward" in record]

    def stop(self) -> None:
        """Ctrl-C to every service, newest first, then SIGKILL to what is left after a minute."""
        for process in reversed(self.services):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 60
        for process in reversed(self.services):
            try:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def variant(request) -> Iterator[tuple[Variant, str | None]]:
    """The variant, and the PostgreSQL store's URL when it has one."""
    if request.param == "postgres":
        with postgres_database() as url:
            yield Variant(flags={COORDINATOR: ["--set", f"store.url={url}"]}, store="postgresql"), url
    else:
        yield (tls_variant() if request.param == "tls" else Variant()), None


def groups_trained_in(store_url: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(store_url)
    try:
        with engine.connect() as connection:
            return connection.execute(text("SELECT count(*) FROM group_consumptions")).scalar_one()
    finally:
        engine.dispose()


@pytest.mark.slow
@pytest.mark.timeout(TRAINING_TIMEOUT_S + 900)  # the setup and the commands after training, on a loaded machine
@pytest.mark.parametrize(
    "variant", ["as written", "tls", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_the_recipe_trains(tmp_path, free_port, variant):
    """Commands before the services run to completion, the services stay up until the held-out
    reward has risen, and the commands after them (node status, eval) run then."""
    additions, store_url = variant
    commands = recipe_commands()
    last_service = max(i for i, argv in enumerate(commands) if service(argv) in SERVICES)
    recipe = Recipe(tmp_path, free_port, additions)
    try:
        for argv in [*additions.first, *commands[: last_service + 1]]:
            if service(argv) in SERVICES:
                recipe.start(argv)
            else:
                recipe.run(argv)

        def risen() -> bool:
            rewards = recipe.held_out_rewards()
            return len(rewards) >= 2 and max(rewards[1:]) >= rewards[0] + MIN_REWARD_GAIN

        wait_for(risen, TRAINING_TIMEOUT_S, "the held-out reward to rise", interval_s=5)
        after = {service(argv): recipe.run(argv) for argv in commands[last_service + 1 :]}
    finally:
        recipe.stop()
    started = (tmp_path / "coordinator.log").read_text(errors="replace")
    assert f"({additions.transport}), HTTP" in started and f"({additions.store} store)" in started, started[-2000:]
    assert "rollouts accepted" in after["node", "status"]
    assert "mean reward" in after["eval", "--model"]
    if store_url is not None:
        assert not (tmp_path / "coord" / "coordinator.sqlite3").exists()
        assert groups_trained_in(store_url) > 0
