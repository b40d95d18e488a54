import pytest

from coordinator.ratelimit import RateLimitedError, RateLimiter


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_burst_then_refill():
    clock = FakeClock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    for _ in range(3):
        limiter.check("a")
    with pytest.raises(RateLimitedError, match="retry in"):
        limiter.check("a")
    limiter.check("b")
    clock.now += 0.5
    limiter.check("a")
    with pytest.raises(RateLimitedError):
        limiter.check("a")


def test_memory_is_bounded():
    limiter = RateLimiter(rate=1.0, burst=1, max_keys=10, clock=FakeClock())
    for i in range(100):
        limiter.check(f"node-{i}")
    assert len(limiter._buckets) == 10
