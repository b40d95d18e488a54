"""The code task against a real coordinator, which re-runs every submitted program in its sandbox: a program
that passes there is accepted, and a batch of hostile programs (fork bomb, infinite loop, memory bomb, 1 GB
write, network connect, reads of the coordinator's key and data directory, kills of its process and of the
sandbox's parent) each earns 0 while the coordinator keeps serving, with bounded memory and latency. Nodes
that claim what their programs do not earn: tests/adversarial/test_code_attacks.py."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from coordinator.core import commitment_bytes
from envs import Split, get_task
from node.client import CoordinatorClient
from node.generate import generate_batch
from protocol import convert
from protocol.identity import Identity
from protocol.proto import service_pb2
from protocol.types import FinishReason, Rollout, RolloutVerdict
from tests.integration.cluster import checking_cluster, wait_for
from tests.unit.test_sandbox import HOSTILE, bubblewrap_or_skip

GROUP_SIZE = 8
PROMPTS_PER_LEASE = 2
# RunInfo answers within this while the coordinator re-executes a batch of hostile programs (on a busy
# 2-core machine; milliseconds on an idle one).
MAX_RUN_INFO_SECONDS = 3.0
MAX_COORDINATOR_GROWTH_BYTES = 64 * 1024 * 1024

# A forged rollout: its program, from the problem's reference answer, and the reward it claims.
Forgery = tuple[Callable[[str], str], float]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model):
    bubblewrap_or_skip()
    with checking_cluster(
        tmp_path_factory.mktemp("code"),
        tiny_model,
        "run.task=code",
        f"run.group_size={GROUP_SIZE}",
        f"run.prompts_per_lease={PROMPTS_PER_LEASE}",
        # Room for the longest hostile program (a path of the test's temporary directory) after a prompt.
        "run.sampling.max_tokens=100",
        "lease.max_open_per_node=8",
        # Rewards are recomputed by the cheap checks; a validator replaying the forged rollouts in the
        # background would only add its own memory to the coordinator's growth measured here.
        "validation.enabled=false",
    ) as cluster:
        yield cluster


def with_program(rollout: Rollout, tokenizer, program: str, claimed_reward: float) -> Rollout:
    """`rollout` with its tokens replaced by `program`'s, claiming `claimed_reward`."""
    token_ids = (*tokenizer.encode(program, add_special_tokens=False), tokenizer.eos_token_id)
    return dataclasses.replace(
        rollout,
        token_ids=token_ids,
        sampled_mask=(True,) * len(token_ids),
        logprobs=(-0.5,) * len(token_ids),
        commitment=bytes(commitment_bytes(len(token_ids))),
        finish_reason=FinishReason.STOP,
        claimed_reward=claimed_reward,
    )


async def forged_batch(
    cluster, engine, forgeries: Sequence[Sequence[Forgery | None]]
) -> tuple[CoordinatorClient, bytes]:
    """A fresh node (registered, with a lease) and its honest batch in which rollout j of group i is
    replaced by `forgeries[i][j]` (where given), as the payload to submit."""
    model, tokenizer = engine
    client = CoordinatorClient(cluster.address, Identity.generate(), tls=cluster.coordinator_tls)
    run_info = await client.run_info()
    await client.register(service_pb2.RegisterRequest(display_name="coder", engine="torch"))
    lease = convert.lease_from_proto((await client.lease(1)).lease)
    task = get_task(run_info.task)
    batch = generate_batch(model, tokenizer, task, run_info.run_seed, lease, "torch").batch
    groups = []
    for group, group_forgeries in zip(batch.groups, forgeries, strict=True):
        answer = task.problem(Split.TRAIN, run_info.run_seed, group.prompt_index).answer
        rollouts = [
            rollout if forgery is None else with_program(rollout, tokenizer, forgery[0](answer), forgery[1])
            for rollout, forgery in zip(group.rollouts, group_forgeries, strict=True)
        ]
        groups.append(dataclasses.replace(group, rollouts=tuple(rollouts)))
    return client, convert.batch_to_proto(dataclasses.replace(batch, groups=tuple(groups))).SerializeToString()


async def submit(client: CoordinatorClient, payload: bytes) -> list[RolloutVerdict]:
    receipt = await client.submit(payload)
    await client.close()
    return list(convert.receipt_from_proto(receipt).verdicts)


def reference(answer: str) -> str:
    return answer


def test_a_program_that_passes_in_the_coordinators_sandbox_is_accepted(cluster, engine):
    forgeries = [[(reference, 1.0)] + [None] * (GROUP_SIZE - 1), [None] * GROUP_SIZE]

    async def scenario():
        return await submit(*(await forged_batch(cluster, engine, forgeries)))

    verdicts = asyncio.run(scenario())
    assert all(v.accepted for v in verdicts), verdicts


def hostile_programs(cluster) -> list[str]:
    """Every hostile program of the sandbox's tests, and the ones aimed at this coordinator: its TLS key
    and data directory, its process, every process the sandbox can signal, and a listener on its host."""
    coordinator = cluster.processes[0].popen.pid
    return [
        *(program for program, _ in HOSTILE.values()),
        f"open('{cluster.certificate_pair.key_file}').read()",
        f"__import__('os').listdir('{cluster.coordinator_dir}')",
        f"__import__('os').kill({coordinator},9)",
        "__import__('os').kill(-1,9)",
        "__import__('os').kill(__import__('os').getppid(),9)",
        f"__import__('socket').create_connection(('127.0.0.1',{cluster.grpc_port}))",
    ]


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found: set[int] = set()
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.add(child)
            pending.append(child)
    return found


async def poll_run_info(cluster, submission: asyncio.Task) -> list[float]:
    """Seconds each RunInfo call took, one after another until `submission` is done."""
    client = CoordinatorClient(cluster.address, Identity.generate(), tls=cluster.coordinator_tls)
    latencies = []
    while not submission.done():
        started = time.monotonic()
        await client.run_info()
        latencies.append(time.monotonic() - started)
        await asyncio.sleep(0.1)
    await client.close()
    return latencies


def test_hostile_programs_earn_nothing_while_the_coordinator_keeps_serving(cluster, engine):
    """A batch of hostile programs, each claiming the 0 it earns, beside one honest program: the coordinator
    re-executes them all off its event loop (RunInfo answers throughout), ends every sandbox they start,
    stays alive and grows by little memory, and still scores the honest program 1."""
    coordinator = cluster.processes[0].popen.pid
    programs = hostile_programs(cluster)
    num_slots = GROUP_SIZE * PROMPTS_PER_LEASE - 1  # the last one is the honest program's
    # More infinite loops fill the batch: the re-execution then lasts seconds, long enough to watch RunInfo.
    programs += [HOSTILE["infinite loop"][0]] * (num_slots - len(programs))
    forged: list[Forgery | None] = [(lambda answer, program=program: program, 0.0) for program in programs]
    forged.append((reference, 1.0))
    forgeries = [forged[i : i + GROUP_SIZE] for i in range(0, len(forged), GROUP_SIZE)]
    children_before = descendants(coordinator)
    memory_before = resident_bytes(coordinator)

    async def scenario():
        client, payload = await forged_batch(cluster, engine, forgeries)
        started = time.monotonic()
        submission = asyncio.create_task(submit(client, payload))
        latencies = await poll_run_info(cluster, submission)
        return (await submission), latencies, time.monotonic() - started

    verdicts, latencies, took = asyncio.run(scenario())
    assert all(v.accepted for v in verdicts), [v for v in verdicts if not v.accepted]
    assert cluster.processes[0].popen.poll() is None, "the coordinator died"
    print(f"\nRunInfo during the re-execution ({took:.1f} s): {len(latencies)} calls, max {max(latencies):.3f} s")
    assert len(latencies) >= 3 and max(latencies) < MAX_RUN_INFO_SECONDS, (latencies, took)
    assert resident_bytes(coordinator) - memory_before < MAX_COORDINATOR_GROWTH_BYTES
    wait_for(lambda: descendants(coordinator) <= children_before, 30, "every sandbox to end")
