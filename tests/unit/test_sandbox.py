"""The sandbox: hostile programs are contained (each earns 0 and says why, the host is untouched), and the
pool bounds concurrency and its queue. Needs bubblewrap (`./dev.sh test` installs it); skipped without."""

from __future__ import annotations

import os
import resource
import socket
import threading
from pathlib import Path

import pytest

from envs import Split
from envs.code import CodeTask
from envs.sandbox import (
    DEFAULT_PYTHON,
    BubblewrapSandbox,
    Sandbox,
    SandboxBusyError,
    SandboxLimits,
    SandboxOutcome,
    SandboxPool,
    SandboxRequest,
    SandboxResult,
    SandboxSettings,
    SandboxUnavailableError,
    configure_sandbox,
    default_pool,
    default_queue_depth,
    register_sandbox,
)

# The host may grow by this much while running every hostile program (their output is capped at 64 KiB).
MAX_HOST_GROWTH_BYTES = 64 * 1024 * 1024


def bubblewrap_or_skip() -> BubblewrapSandbox:
    """The bubblewrap sandbox, or a skip of the calling test saying what this machine lacks."""
    if not Path(DEFAULT_PYTHON).exists():
        pytest.skip(f"the sandbox runs programs with {DEFAULT_PYTHON}, which this machine lacks")
    try:
        return BubblewrapSandbox()
    except SandboxUnavailableError as error:
        pytest.skip(f"bubblewrap cannot run here: {error}")


@pytest.fixture(scope="module")
def sandbox() -> BubblewrapSandbox:
    return bubblewrap_or_skip()


@pytest.fixture(scope="module")
def pool(sandbox):
    pool = SandboxPool(sandbox, max_concurrent=4, max_queued=64)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def task(pool) -> CodeTask:
    return CodeTask(pool=pool)


@pytest.fixture(scope="module")
def problem(task):
    return task.problem(Split.TRAIN, seed=0, index=0)


def python(sandbox: Sandbox, source: str, **limits) -> SandboxResult:
    return sandbox.run(SandboxRequest((DEFAULT_PYTHON, "-I", "-S", "-c", source), limits=SandboxLimits(**limits)))


def run_program(task: CodeTask, problem, program: str) -> tuple[float, SandboxResult]:
    """The reward of `program` and how its run ended."""
    assert task.pool is not None
    result = task.pool.run(task.request(problem, program))
    return task.score(problem, result), result


def test_the_reference_program_passes_every_hidden_test(task, problem):
    reward, result = run_program(task, problem, problem.answer)
    assert (reward, result.outcome) == (1.0, SandboxOutcome.OK)


def test_the_sandbox_sees_only_a_read_only_usr_and_its_own_scratch_directory(sandbox):
    result = python(
        sandbox,
        "import os\n"
        "print(sorted(os.listdir('/')))\n"
        "print(os.getuid() != 0, sorted(os.environ))\n"
        "open('/tmp/scratch', 'w').write('ok')\n"
        "try:\n"
        "    open('/usr/written', 'w')\n"
        "except OSError as error:\n"
        "    print(type(error).__name__)\n",
    )
    lines = result.stdout.decode().splitlines()
    assert result.outcome is SandboxOutcome.OK, result.stderr
    assert set(eval(lines[0])) <= {"bin", "dev", "lib", "lib32", "lib64", "proc", "sbin", "tmp", "usr"}
    assert lines[1].startswith("True ") and set(eval(lines[1][5:])) <= {"HOME", "LANG", "LC_CTYPE", "PATH", "PWD"}
    assert lines[2] in {"OSError", "PermissionError"}


def test_a_sandbox_that_keeps_the_callers_uid_still_isolates(sandbox):
    same_user = BubblewrapSandbox(run_as_own_users=False)
    result = python(same_user, "import os; print(sorted(os.listdir('/')))")
    assert result.outcome is SandboxOutcome.OK, result.stderr
    assert "work" not in result.stdout.decode() and "root" not in result.stdout.decode()


HOSTILE = {
    # any() of endless zeros: a loop that allocates nothing, so only a time limit can end it.
    "infinite loop": ("any(iter(int, 1))", {SandboxOutcome.CPU_LIMIT, SandboxOutcome.TIMEOUT}),
    "fork bomb": (
        "any(__import__('os').fork() < 0 for _ in iter(int, 1))",
        {SandboxOutcome.PROCESS_LIMIT, SandboxOutcome.CPU_LIMIT, SandboxOutcome.TIMEOUT},
    ),
    "memory bomb": ("len([bytearray(2**20) for _ in range(10**6)])", {SandboxOutcome.MEMORY_LIMIT}),
    "1 GB write": (
        "[(f := open('/tmp/big', 'wb')), [f.write(b'0' * 2**20) for _ in range(1024)]] and x",
        {SandboxOutcome.FILE_SIZE_LIMIT},
    ),
    "output flood": ("print('x' * 10**6) or x", {SandboxOutcome.OUTPUT_LIMIT}),
    "kill itself": ("__import__('os').kill(__import__('os').getpid(), 9)", {SandboxOutcome.KILLED}),
    "syntax error": ("45+", {SandboxOutcome.ERROR}),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_programs_earn_nothing_and_say_why(task, problem, name):
    program, outcomes = HOSTILE[name]
    reward, result = run_program(task, problem, program)
    assert reward == 0.0
    assert result.outcome in outcomes, (result.outcome, result.stderr[-300:])
    assert len(result.stdout) + len(result.stderr) <= SandboxLimits().max_output_bytes + 65536


def test_a_network_connect_reaches_nothing(task, problem):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0)
        port = listener.getsockname()[1]
        reward, result = run_program(task, problem, f"__import__('socket').create_connection(('127.0.0.1', {port}))")
        for host in ("1.1.1.1", "10.0.0.1"):
            assert run_program(task, problem, f"__import__('socket').create_connection(('{host}', 80), 1)")[0] == 0
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert reward == 0.0
    assert result.outcome is SandboxOutcome.ERROR
    assert b"ConnectionRefusedError" in result.stderr or b"Network is unreachable" in result.stderr


def test_the_coordinators_key_and_data_directory_are_invisible(task, problem, sandbox, tmp_path):
    data_dir = tmp_path / "coordinator"
    data_dir.mkdir()
    (data_dir / "trainer.key").write_text("SECRET-KEY-MATERIAL")
    (data_dir / "coordinator.sqlite3").write_text("SECRET-STORE")
    key_path = data_dir / "trainer.key"
    reward, result = run_program(task, problem, f"open({str(key_path)!r}).read()")
    assert reward == 0.0 and result.outcome is SandboxOutcome.ERROR
    assert b"FileNotFoundError" in result.stderr
    seen = python(
        sandbox,
        "import os\n"
        f"for path in ({str(data_dir)!r}, {str(key_path)!r}, '/work', '/root', {os.getcwd()!r}, '/etc/shadow'):\n"
        "    print(path, os.path.exists(path))\n",
    )
    assert seen.outcome is SandboxOutcome.OK
    assert all(line.endswith(" False") for line in seen.stdout.decode().splitlines()), seen.stdout
    assert b"SECRET" not in seen.stdout


def test_killing_the_parent_or_everything_it_can_leaves_the_host_alive(task, problem, sandbox):
    for program in (
        "__import__('os').kill(__import__('os').getppid(), 9)",
        "__import__('os').kill(-1, 9)",
        f"__import__('os').kill({os.getpid()}, 9)",
        f"__import__('os').killpg({os.getpgid(0)}, 9)",
    ):
        reward, result = run_program(task, problem, program)
        assert reward == 0.0, program
        assert result.outcome in {SandboxOutcome.OK, SandboxOutcome.ERROR, SandboxOutcome.KILLED}, program
    assert run_program(task, problem, problem.answer)[0] == 1.0


def test_the_host_stays_bounded_in_memory_through_every_hostile_program(task, problem):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rewards = task.rewards([problem] * len(HOSTILE), [program for program, _ in HOSTILE.values()])
    assert rewards == [0.0] * len(HOSTILE)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before < MAX_HOST_GROWTH_BYTES


def test_a_batch_of_programs_runs_concurrently_and_keeps_its_order(task):
    problems = task.problems(Split.TRAIN, seed=3, num_problems=12)
    completions = [p.answer if i % 3 else "0" for i, p in enumerate(problems)]
    rewards = task.rewards(problems, completions)
    assert [r == 1.0 for r in rewards] == [bool(i % 3) for i in range(12)]


class GatedSandbox(Sandbox):
    """A fake sandbox whose runs wait for `gate`, counting how many run at once."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.running = 0
        self.most_running = 0
        self.all_started = threading.Event()
        self.expected_at_once = 0

    def run(self, request: SandboxRequest) -> SandboxResult:
        with self.lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            if self.running == self.expected_at_once:
                self.all_started.set()
        self.gate.wait()
        with self.lock:
            self.running -= 1
        return SandboxResult(SandboxOutcome.OK, request.stdin, b"", 0, 0.0)


def test_the_pool_runs_up_to_its_limit_at_once_and_never_more():
    fake = GatedSandbox()
    fake.expected_at_once = 4
    pool = SandboxPool(fake, max_concurrent=4, max_queued=64)
    requests = [SandboxRequest(("/bin/true",), stdin=str(i).encode()) for i in range(32)]
    results: list[SandboxResult] = []
    worker = threading.Thread(target=lambda: results.extend(pool.run_many(requests)))
    worker.start()
    assert fake.all_started.wait(60), "the pool ran its requests one at a time"
    assert pool.num_running() == 4 and pool.queue_depth() == 28
    fake.gate.set()
    worker.join(60)
    pool.close()
    assert fake.most_running == 4
    assert [r.stdout for r in results] == [str(i).encode() for i in range(32)]
    assert pool.queue_depth() == 0


def test_a_full_queue_refuses_more_work_with_a_clear_error():
    fake = GatedSandbox()
    fake.expected_at_once = 1
    pool = SandboxPool(fake, max_concurrent=1, max_queued=2)
    worker = threading.Thread(target=pool.run_many, args=([SandboxRequest(("/bin/true",))] * 3,))
    worker.start()
    assert fake.all_started.wait(60)
    with pytest.raises(SandboxBusyError, match="queue is full"):
        pool.run(SandboxRequest(("/bin/true",)))
    assert pool.queue_depth() == 2
    fake.gate.set()
    worker.join(60)
    assert pool.run(SandboxRequest(("/bin/true",), stdin=b"after")).stdout == b"after"
    pool.close()


def test_settings_name_a_known_implementation_and_names_are_not_reused():
    with pytest.raises(ValueError, match="unknown sandbox implementation 'nsjail'; known: bubblewrap"):
        SandboxSettings(implementation="nsjail")
    with pytest.raises(ValueError, match="max_concurrent"):
        SandboxSettings(max_concurrent=0)
    with pytest.raises(ValueError, match="taken"):
        register_sandbox("bubblewrap", GatedSandbox)
    with pytest.raises(ValueError, match="cpu_seconds"):
        SandboxLimits(cpu_seconds=0)


def test_the_process_pool_follows_the_configured_settings(sandbox):
    configure_sandbox(SandboxSettings(max_concurrent=3, max_queued=5))
    try:
        assert default_queue_depth() == 0
        pool = default_pool()
        assert (pool.max_concurrent, pool.max_queued) == (3, 5)
        assert default_pool() is pool
        assert pool.run(SandboxRequest(("/usr/bin/true",))).ok
    finally:
        configure_sandbox(SandboxSettings())
