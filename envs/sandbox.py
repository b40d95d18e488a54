"""Running untrusted programs: one `Sandbox` interface, a bubblewrap implementation, and a bounded pool.

A task whose reward depends on running code (envs/code.py) hands each program to a `SandboxPool`, which
runs at most `max_concurrent` of them at once on a `Sandbox` and refuses work beyond `max_queued` waiting
executions with `SandboxBusyError`. The implementation is chosen by name (`SandboxSettings.implementation`;
`register_sandbox` adds one, e.g. a client of a remote sandbox service).

`BubblewrapSandbox` runs each program under Debian's `bwrap`: new user, PID, network, IPC and UTS
namespaces (no network at all), a read-only view of /usr (and the /lib, /bin links into it) and nothing
else of the host, a fresh size-capped tmpfs as the scratch directory, an empty environment, all
capabilities dropped, and a kill of the sandbox when its parent dies. `prlimit` caps CPU time, address
space, processes and file size; a wall-clock deadline kills the whole process group; stdout and stderr
are read up to a byte cap. Run as root, each execution runs as its own unprivileged uid, so the
process limit holds per execution (the kernel does not apply RLIMIT_NPROC to root). Run as another
user, there is no process limit (it would count all of that user's processes): a fork bomb then runs
until the wall-clock kill, inside its PID namespace.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024
DEFAULT_PYTHON = "/usr/bin/python3"
# Run by root, each execution runs as a fresh uid/gid of this range, ids no account on the host uses: the
# process limit then holds per execution, and processes of an ended one that the kernel is still tearing
# down count against no later one.
FIRST_SANDBOX_ID = 2_000_000_000
NUM_SANDBOX_IDS = 100_000_000
# bwrap's monitor and its init process count against the process limit besides the program's own.
NUM_BWRAP_PROCESSES = 2
_READ_CHUNK = 65536


class SandboxOutcome(enum.Enum):
    OK = "ok"
    """The program exited with status 0 within every limit."""
    ERROR = "error"
    """The program exited with a non-zero status."""
    TIMEOUT = "timeout"
    """The wall-clock deadline passed; the sandbox was killed."""
    CPU_LIMIT = "cpu_limit"
    MEMORY_LIMIT = "memory_limit"
    FILE_SIZE_LIMIT = "file_size_limit"
    PROCESS_LIMIT = "process_limit"
    OUTPUT_LIMIT = "output_limit"
    """The program wrote more than the output cap; the sandbox was killed."""
    KILLED = "killed"
    """A signal ended the program."""


@dataclass(frozen=True)
class SandboxLimits:
    wall_seconds: float = 5.0
    cpu_seconds: int = 2
    memory_bytes: int = 512 * MIB
    """Address space of each process (RLIMIT_AS)."""
    max_processes: int = 16
    max_file_bytes: int = 1 * MIB
    """Largest file a process may write (RLIMIT_FSIZE)."""
    scratch_bytes: int = 8 * MIB
    """Size of the scratch tmpfs (its pages are memory of the host)."""
    max_output_bytes: int = 64 * 1024
    """Stdout and stderr together; more kills the sandbox."""

    def __post_init__(self) -> None:
        for name in (
            "wall_seconds",
            "cpu_seconds",
            "memory_bytes",
            "max_processes",
            "max_file_bytes",
            "scratch_bytes",
            "max_output_bytes",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"sandbox limit {name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class SandboxRequest:
    argv: tuple[str, ...]
    """The command inside the sandbox; argv[0] is an absolute path in its read-only view."""
    stdin: bytes = b""
    limits: SandboxLimits = field(default_factory=SandboxLimits)


@dataclass(frozen=True)
class SandboxResult:
    outcome: SandboxOutcome
    stdout: bytes
    stderr: bytes
    exit_status: int | None
    """bwrap's exit status: the program's, or 128 + the signal that ended it; None when the deadline or the
    output cap made the sandbox kill it."""
    wall_seconds: float

    @property
    def ok(self) -> bool:
        return self.outcome is SandboxOutcome.OK


class SandboxUnavailableError(RuntimeError):
    """This machine cannot run the chosen sandbox, or cannot start one now: no program ran, so no reward
    can be computed (never taken for a program's failure)."""


class SandboxBusyError(RuntimeError):
    """The pool's queue of waiting executions is full."""


class Sandbox(ABC):
    """Runs one program in isolation. Implementations are thread-safe."""

    @abstractmethod
    def run(self, request: SandboxRequest) -> SandboxResult: ...


def _read_only_view() -> list[str]:
    """bwrap arguments for /usr and the top-level links into it; a top-level directory (no merged /usr) is bound."""
    arguments = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64"):
        path = Path("/") / name
        if path.is_symlink():
            arguments += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            arguments += ["--ro-bind", str(path), str(path)]
    return arguments


class BubblewrapSandbox(Sandbox):
    def __init__(self, run_as_own_users: bool | None = None):
        found = {name: shutil.which(name) for name in ("bwrap", "prlimit", "setpriv")}
        if None in found.values():
            raise SandboxUnavailableError(
                "the bubblewrap sandbox needs `bwrap`, `prlimit` and `setpriv` on PATH: "
                "apt-get install bubblewrap util-linux"
            )
        self.bwrap, self.prlimit = found["bwrap"] or "", found["prlimit"] or ""
        own_users = os.geteuid() == 0 if run_as_own_users is None else run_as_own_users
        self.setpriv = found["setpriv"] if own_users else None
        # A random start: sandboxes of other processes on the machine use other ids.
        self._run_counter = itertools.count(secrets.randbelow(NUM_SANDBOX_IDS))
        self._view = _read_only_view()
        probe = self.run(SandboxRequest(("/usr/bin/true",)))
        if not probe.ok:
            raise SandboxUnavailableError(
                f"bubblewrap cannot make a sandbox on this machine ({probe.outcome.value}, status {probe.exit_status}: "
                f"{probe.stderr.decode(errors='replace').strip()[-300:]}); it needs user namespaces "
                "(sysctl kernel.unprivileged_userns_clone=1, or a container allowed to create them)"
            )

    def command(self, request: SandboxRequest) -> list[str]:
        limits = request.limits
        return [
            self.prlimit,
            # SIGXCPU at the soft limit tells a CPU-time kill apart; SIGKILL a second later.
            f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds + 1}",
            f"--as={limits.memory_bytes}",
            # The process limit counts every process of the uid: only an execution's own uid can carry it.
            *([f"--nproc={limits.max_processes + NUM_BWRAP_PROCESSES}"] if self.setpriv else []),
            f"--fsize={limits.max_file_bytes}",
            "--core=0",
            "--",
            self.bwrap,
            "--unshare-all",
            "--unshare-user",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--hostname",
            "sandbox",
            "--clearenv",
            "--setenv",
            "PATH",
            "/usr/bin:/bin",
            "--setenv",
            "HOME",
            "/tmp",
            "--setenv",
            "LANG",
            "C.UTF-8",
            *self._view,
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--size",
            str(limits.scratch_bytes),
            "--tmpfs",
            "/tmp",
            "--chdir",
            "/tmp",
            "--",
            *request.argv,
        ]

    def run(self, request: SandboxRequest) -> SandboxResult:
        started = time.monotonic()
        command = self.command(request)
        if self.setpriv is not None:
            user_id = FIRST_SANDBOX_ID + next(self._run_counter) % NUM_SANDBOX_IDS
            command = [self.setpriv, f"--reuid={user_id}", f"--regid={user_id}", "--clear-groups", "--", *command]
        try:
            # No user switch or preexec_fn here: Popen then starts the child with vfork, which runs no
            # fork handlers (gRPC's and torch's crash a forked child of a busy coordinator now and then).
            process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
            )
        except OSError as error:
            raise SandboxUnavailableError(f"cannot start a sandbox: {error}") from error
        try:
            stdout, stderr, stopped = _exchange(process, request.stdin, request.limits, started)
        finally:
            # Killing bwrap's monitor kills the sandbox's init (--die-with-parent), and with it every
            # process of the PID namespace; nothing of the sandbox outlives this call's process group.
            _kill_group(process)
            process.wait()
        if stopped is not None:
            return SandboxResult(stopped, stdout, stderr, None, time.monotonic() - started)
        return SandboxResult(
            _outcome(process.returncode, stderr), stdout, stderr, process.returncode, time.monotonic() - started
        )


def _exchange(
    process: subprocess.Popen[bytes], stdin: bytes, limits: SandboxLimits, started: float
) -> tuple[bytes, bytes, SandboxOutcome | None]:
    """Feed stdin and collect stdout and stderr until both close and the process exits; a passed deadline
    or the output cap stops it (the outcome returned), and the caller kills the group."""
    assert process.stdin and process.stdout and process.stderr
    stdout_fd, stderr_fd, stdin_fd = process.stdout.fileno(), process.stderr.fileno(), process.stdin.fileno()
    outputs: dict[int, bytearray] = {stdout_fd: bytearray(), stderr_fd: bytearray()}

    def collected(stopped: SandboxOutcome | None) -> tuple[bytes, bytes, SandboxOutcome | None]:
        return bytes(outputs[stdout_fd]), bytes(outputs[stderr_fd]), stopped

    pending = memoryview(stdin)
    with selectors.DefaultSelector() as selector:
        for fd in (stdout_fd, stderr_fd):
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        if pending:
            os.set_blocking(stdin_fd, False)
            selector.register(stdin_fd, selectors.EVENT_WRITE)
        else:
            process.stdin.close()
        while len(selector.get_map()) > 0:
            remaining = limits.wall_seconds - (time.monotonic() - started)
            if remaining <= 0:
                return collected(SandboxOutcome.TIMEOUT)
            for key, _ in selector.select(remaining):
                if key.fd == stdin_fd:
                    pending = _write_some(key.fd, pending)
                    if not pending:
                        selector.unregister(key.fd)
                        process.stdin.close()
                    continue
                chunk = os.read(key.fd, _READ_CHUNK)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                outputs[key.fd] += chunk
                if len(outputs[stdout_fd]) + len(outputs[stderr_fd]) > limits.max_output_bytes:
                    return collected(SandboxOutcome.OUTPUT_LIMIT)
    try:
        process.wait(max(0.0, limits.wall_seconds - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        return collected(SandboxOutcome.TIMEOUT)
    return collected(None)


def _write_some(fd: int, pending: memoryview) -> memoryview:
    """What is left of `pending` after one write to `fd`; nothing when the program closed its stdin."""
    try:
        return pending[os.write(fd, pending[:_READ_CHUNK]) :]
    except BrokenPipeError:
        return pending[:0]


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()


_SIGNAL_OUTCOMES: dict[int, SandboxOutcome] = {
    signal.SIGXCPU.value: SandboxOutcome.CPU_LIMIT,
    signal.SIGXFSZ.value: SandboxOutcome.FILE_SIZE_LIMIT,
}


# A Python program meets most limits as an exception (it ignores SIGXFSZ); its last words name the limit.
_PYTHON_ERROR_OUTCOMES = (
    (b"MemoryError", SandboxOutcome.MEMORY_LIMIT),
    (b"[Errno 27] File too large", SandboxOutcome.FILE_SIZE_LIMIT),
    (b"BlockingIOError: [Errno 11]", SandboxOutcome.PROCESS_LIMIT),
)


def _outcome(returncode: int, stderr: bytes) -> SandboxOutcome:
    """What ended a program that exited by itself. bwrap exits with its child's status, and with
    128 + the signal number when a signal ended the child."""
    if returncode == 0:
        return SandboxOutcome.OK
    signal_number = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    if signal_number:
        return _SIGNAL_OUTCOMES.get(signal_number, SandboxOutcome.KILLED)
    last_error = stderr[-4096:]
    for marker, outcome in _PYTHON_ERROR_OUTCOMES:
        if marker in last_error:
            return outcome
    return SandboxOutcome.ERROR


SandboxFactory = Callable[[], Sandbox]
_IMPLEMENTATIONS: dict[str, SandboxFactory] = {"bubblewrap": BubblewrapSandbox}


def register_sandbox(name: str, factory: SandboxFactory) -> None:
    """Make a sandbox implementation (a remote sandbox service's client, say) selectable by name."""
    if name in _IMPLEMENTATIONS:
        raise ValueError(f"sandbox implementation {name!r} is taken; pick another name")
    _IMPLEMENTATIONS[name] = factory


def default_max_concurrent() -> int:
    return max(2, os.cpu_count() or 1)


@dataclass(frozen=True)
class SandboxSettings:
    implementation: str = "bubblewrap"
    max_concurrent: int = field(default_factory=default_max_concurrent)
    max_queued: int = 1024
    """Executions that may wait for a free slot; more are refused with SandboxBusyError."""

    def __post_init__(self) -> None:
        if self.implementation not in _IMPLEMENTATIONS:
            raise ValueError(
                f"unknown sandbox implementation {self.implementation!r}; known: {', '.join(sorted(_IMPLEMENTATIONS))}"
            )
        if self.max_concurrent < 1 or self.max_queued < 0:
            raise ValueError(
                f"sandbox max_concurrent must be >= 1 and max_queued >= 0, got {self.max_concurrent}, {self.max_queued}"
            )


class SandboxPool:
    """At most `max_concurrent` executions at once (the executor's threads), at most `max_queued` waiting."""

    def __init__(self, sandbox: Sandbox, max_concurrent: int, max_queued: int):
        self.sandbox = sandbox
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self._executor = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="sandbox")
        self._lock = threading.Lock()
        self._num_waiting = 0
        self._num_running = 0

    @classmethod
    def from_settings(cls, settings: SandboxSettings) -> SandboxPool:
        return cls(_IMPLEMENTATIONS[settings.implementation](), settings.max_concurrent, settings.max_queued)

    def queue_depth(self) -> int:
        """Executions waiting for a free slot."""
        with self._lock:
            return self._num_waiting

    def num_running(self) -> int:
        with self._lock:
            return self._num_running

    def run_many(self, requests: Sequence[SandboxRequest]) -> list[SandboxResult]:
        """Run every request, concurrently up to the pool's limit; results in the order of `requests`.
        Raises SandboxBusyError, running none of them, when they do not fit in the queue."""
        with self._lock:
            num_free = self.max_concurrent - self._num_running
            if self._num_waiting + max(0, len(requests) - num_free) > self.max_queued:
                raise SandboxBusyError(
                    f"the sandbox queue is full ({self._num_waiting} executions waiting, at most {self.max_queued}, "
                    f"{self.max_concurrent} running): retry later, or raise sandbox.max_concurrent / max_queued"
                )
            self._num_waiting += len(requests)
        futures = [self._executor.submit(self._run_when_free, request) for request in requests]
        return [future.result() for future in futures]

    def run(self, request: SandboxRequest) -> SandboxResult:
        return self.run_many([request])[0]

    def _run_when_free(self, request: SandboxRequest) -> SandboxResult:
        with self._lock:
            self._num_waiting -= 1
            self._num_running += 1
        try:
            return self.sandbox.run(request)
        finally:
            with self._lock:
                self._num_running -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=True)


_default_lock = threading.Lock()
_default_settings = SandboxSettings()
_default_pool: SandboxPool | None = None


def configure_sandbox(settings: SandboxSettings) -> None:
    """Choose the process's sandbox (the coordinator calls this with its `[sandbox]` settings)."""
    global _default_settings, _default_pool
    with _default_lock:
        previous, _default_pool, _default_settings = _default_pool, None, settings
    if previous is not None:
        previous.close()


def default_pool() -> SandboxPool:
    """The process's pool, made on first use from the configured settings."""
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            _default_pool = SandboxPool.from_settings(_default_settings)
        return _default_pool


def default_queue_depth() -> int:
    """Executions waiting in the process's pool (0 before its first use), for the coordinator's metrics."""
    with _default_lock:
        pool = _default_pool
    return 0 if pool is None else pool.queue_depth()
