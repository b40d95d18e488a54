import asyncio
import logging
import socket
import threading
import time

import grpc
import pytest

from protocol.retry import RetryPolicy, call_with_retry, call_with_retry_async, retry_hint_s, transient_status

FAST = RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.004)


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "", trailing: tuple = ()):
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._trailing


class Flaky:
    """Fails with `errors` in turn, then answers "ok"."""

    def __init__(self, *errors: Exception):
        self.errors = list(errors)
        self.num_calls = 0

    def __call__(self) -> str:
        self.num_calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def test_transient_statuses_are_retried_until_the_call_succeeds(caplog):
    flaky = Flaky(
        *(
            FakeRpcError(code, "down")
            for code in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.ABORTED,
            )
        )
    )
    with caplog.at_level(logging.WARNING, logger="protocol.retry"):
        assert call_with_retry(flaky, address="127.0.0.1:1", what="ack", policy=FAST) == "ok"
    assert flaky.num_calls == 5
    assert len(caplog.records) == 4
    assert "127.0.0.1:1 ack: UNAVAILABLE (down)" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    "error",
    [
        FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT),
        FakeRpcError(grpc.StatusCode.UNAUTHENTICATED),
        FakeRpcError(grpc.StatusCode.CANCELLED),
        ValueError("not a gRPC error"),
    ],
)
def test_other_errors_are_raised_at_once(error):
    flaky = Flaky(error)
    with pytest.raises(type(error)):
        call_with_retry(flaky, address="a:1", what="x", policy=FAST)
    assert flaky.num_calls == 1
    assert transient_status(error) is None


def test_max_attempts_bounds_the_calls_and_raises_the_last_error():
    flaky = Flaky(*(FakeRpcError(grpc.StatusCode.UNAVAILABLE, f"try {n}") for n in range(10)))
    policy = RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.001, max_attempts=3)
    with pytest.raises(FakeRpcError) as raised:
        call_with_retry(flaky, address="a:1", what="x", policy=policy)
    assert flaky.num_calls == 3 and raised.value.details() == "try 2"


def test_a_set_stop_event_ends_the_retries():
    stop = threading.Event()
    stop.set()
    flaky = Flaky(*(FakeRpcError(grpc.StatusCode.UNAVAILABLE) for _ in range(10)))
    with pytest.raises(FakeRpcError):
        call_with_retry(flaky, address="a:1", what="x", stop=stop)
    assert flaky.num_calls == 1


def test_the_server_retry_hint_is_read_from_metadata_or_the_rate_limit_message():
    assert retry_hint_s(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, trailing=(("retry-after-ms", "1500"),))) == 1.5
    limited = FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "more than 50 requests/s (burst 100); retry in 0.02s")
    assert retry_hint_s(limited) == 0.02
    assert retry_hint_s(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused")) is None


def test_backoff_doubles_with_jitter_up_to_the_cap():
    policy = RetryPolicy(initial_backoff_s=0.5, max_backoff_s=30.0)
    for attempt, base in [(1, 0.5), (2, 1.0), (4, 4.0), (7, 30.0), (1000, 30.0)]:
        waits = [policy.backoff_s(attempt) for _ in range(50)]
        assert all(0.5 * base <= wait < base for wait in waits)
    with pytest.raises(ValueError, match="max_backoff_s"):
        RetryPolicy(initial_backoff_s=2.0, max_backoff_s=1.0)


def test_the_asyncio_variant_retries_and_stops_alike():
    flaky = Flaky(FakeRpcError(grpc.StatusCode.UNAVAILABLE), FakeRpcError(grpc.StatusCode.UNAVAILABLE))

    async def call():
        return flaky()

    assert asyncio.run(call_with_retry_async(lambda: call(), address="a:1", what="lease", policy=FAST)) == "ok"
    assert flaky.num_calls == 3

    async def stopped():
        stop = asyncio.Event()
        stop.set()
        down = Flaky(*(FakeRpcError(grpc.StatusCode.UNAVAILABLE) for _ in range(10)))

        async def call_down():
            return down()

        with pytest.raises(FakeRpcError):
            await call_with_retry_async(call_down, address="a:1", what="lease", stop=stop)
        return down.num_calls

    assert asyncio.run(stopped()) == 1


@pytest.mark.slow
def test_a_client_reaches_a_coordinator_back_from_a_long_outage_within_seconds():
    """gRPC's own reconnect backoff (120 s by default) would keep a client cut off long after the
    coordinator came back; open_channel caps it, so the retry policy's next attempt gets through."""
    from concurrent.futures import ThreadPoolExecutor

    from protocol.channel import MAX_RECONNECT_BACKOFF_MS, open_channel

    outage_s, policy = 90.0, RetryPolicy(initial_backoff_s=0.5, max_backoff_s=2.0)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"ok")
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("probe.Probe", {"Call": handler})])
    server.add_insecure_port(address)
    back_at: list[float] = []

    def come_back() -> None:
        time.sleep(outage_s)
        server.start()
        back_at.append(time.monotonic())

    threading.Thread(target=come_back, daemon=True).start()
    channel = open_channel(address)
    try:
        call = channel.unary_unary("/probe.Probe/Call")
        assert call_with_retry(lambda: call(b"", timeout=10), address=address, what="probe", policy=policy) == b"ok"
        waited_s = time.monotonic() - back_at[0]
    finally:
        channel.close()
        server.stop(None)
    assert waited_s < MAX_RECONNECT_BACKOFF_MS / 1000 + policy.max_backoff_s + 2.0, waited_s
