"""The one retry policy of every gRPC client (trainer, node, validators, admin CLI), on tenacity:
capped exponential backoff with jitter, or the server's retry hint when it gives one; only
transient statuses are retried, and each retry is logged as one line with the address and the
cause. `call_with_retry` and `call_with_retry_async` are the sync and asyncio variants."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import tenacity

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT_STATUSES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED"})
RETRY_AFTER_METADATA_KEY = "retry-after-ms"
_RETRY_IN_DETAILS = re.compile(r"retry in (\d+(?:\.\d+)?)s")
MAX_LOGGED_DETAILS_CHARS = 200


@dataclass(frozen=True)
class RetryPolicy:
    """Attempt n waits `initial_backoff_s * 2**(n-1)`, capped at `max_backoff_s`, times a random
    factor in [0.5, 1) so that clients cut off together do not come back together."""

    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_attempts: int = 0  # 0: retry until the call succeeds (an outage of any length)

    def __post_init__(self) -> None:
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError(
                f"need 0 < initial_backoff_s <= max_backoff_s, got {self.initial_backoff_s} and {self.max_backoff_s}"
            )
        if self.max_attempts < 0:
            raise ValueError(f"max_attempts must be >= 0 (0: no limit), got {self.max_attempts}")

    def backoff_s(self, attempt: int) -> float:
        """The wait after the `attempt`-th failure (1-based)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * 2.0 ** min(attempt - 1, 62))
        return base * random.uniform(0.5, 1.0)


DEFAULT_POLICY = RetryPolicy()


def transient_status(error: BaseException) -> str | None:
    """The status name when `error` is a gRPC error worth retrying, else None."""
    import grpc  # imported here: protocol/ modules import no grpc at import time

    if isinstance(error, grpc.RpcError) and callable(getattr(error, "code", None)):
        name = error.code().name
        return name if name in TRANSIENT_STATUSES else None
    return None


def retry_hint_s(error: BaseException) -> float | None:
    """How long the server asked the caller to wait: its `retry-after-ms` trailing metadata, or
    the "retry in N s" of a rate limit's message; None when it said nothing."""
    for key, value in _trailing_metadata(error):
        if key == RETRY_AFTER_METADATA_KEY:
            try:
                return max(0.0, int(value) / 1000)
            except ValueError:
                break
    match = _RETRY_IN_DETAILS.search(_details(error))
    return float(match.group(1)) if match else None


def _trailing_metadata(error: BaseException) -> tuple[tuple[str, str | bytes], ...]:
    getter = getattr(error, "trailing_metadata", None)
    metadata = getter() if callable(getter) else None
    return tuple(metadata or ())


def _details(error: BaseException) -> str:
    getter = getattr(error, "details", None)
    return (getter() if callable(getter) else None) or ""


class _Wait(tenacity.wait.wait_base):
    def __init__(self, policy: RetryPolicy):
        self.policy = policy

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        error = _outcome_error(retry_state)
        hint = retry_hint_s(error) if error is not None else None
        if hint is not None:
            return min(self.policy.max_backoff_s, hint * random.uniform(1.0, 1.25))
        return self.policy.backoff_s(retry_state.attempt_number)


def _outcome_error(retry_state: tenacity.RetryCallState) -> BaseException | None:
    outcome = retry_state.outcome
    error = outcome.exception() if outcome is not None else None
    return error if isinstance(error, BaseException) else None


def _never() -> bool:
    return False


def _retrying_arguments(
    address: str,
    what: str,
    policy: RetryPolicy,
    is_stopping: Callable[[], bool],
    on_retry: Callable[[BaseException], None] | None,
) -> dict[str, Any]:
    def stop(retry_state: tenacity.RetryCallState) -> bool:
        return is_stopping() or 0 < policy.max_attempts <= retry_state.attempt_number

    def before_sleep(retry_state: tenacity.RetryCallState) -> None:
        error = _outcome_error(retry_state)
        assert error is not None, "tenacity sleeps only after a failed attempt"
        details = _details(error).replace("\n", " ")[:MAX_LOGGED_DETAILS_CHARS]
        log.warning(
            "%s %s: %s (%s); retry %d in %.1fs",
            address,
            what,
            transient_status(error),
            details,
            retry_state.attempt_number,
            retry_state.upcoming_sleep,
        )
        if on_retry is not None:
            on_retry(error)

    return {
        "wait": _Wait(policy),
        "retry": tenacity.retry_if_exception(lambda error: transient_status(error) is not None),
        "stop": stop,
        "before_sleep": before_sleep,
        "reraise": True,
    }


def call_with_retry(
    call: Callable[[], T],
    *,
    address: str,
    what: str,
    policy: RetryPolicy = DEFAULT_POLICY,
    stop: threading.Event | None = None,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """`call()` under the policy. A non-transient error, the last one once `max_attempts` are
    spent, or a transient one after `stop` is set is raised as it is."""

    def sleep(seconds: float) -> None:
        if stop is None:
            time.sleep(seconds)
        else:
            stop.wait(seconds)

    retrying = tenacity.Retrying(
        sleep=sleep,
        **_retrying_arguments(address, what, policy, stop.is_set if stop is not None else _never, on_retry),
    )
    return retrying(call)


async def call_with_retry_async(
    call: Callable[[], Awaitable[T]],
    *,
    address: str,
    what: str,
    policy: RetryPolicy = DEFAULT_POLICY,
    stop: asyncio.Event | None = None,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """The asyncio variant of `call_with_retry`: `call()` makes a fresh awaitable per attempt."""

    async def sleep(seconds: float) -> None:
        if stop is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)

    async def attempt() -> T:  # tenacity awaits only what it sees is a coroutine function
        return await call()

    retrying = tenacity.AsyncRetrying(
        sleep=sleep, **_retrying_arguments(address, what, policy, stop.is_set if stop is not None else _never, on_retry)
    )
    return await retrying(attempt)
