"""Per-signer token buckets with bounded memory."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict


class RateLimitedError(ValueError):
    code = "rate_limited"


class RateLimiter:
    """Allows `rate` requests per second per key with bursts of up to `burst`.

    At most `max_keys` buckets are held; the least recently used one is dropped first
    (a dropped key starts again with a full bucket, which only ever errs toward allowing).
    """

    def __init__(self, rate: float, burst: int, *, max_keys: int = 100_000, clock=time.monotonic):
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        """Take one token for `key` or raise RateLimitedError."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                raise RateLimitedError(
                    f"more than {self.rate:g} requests/s (burst {self.burst}); retry in {(1 - tokens) / self.rate:.2f}s"
                )
            self._buckets[key] = (tokens - 1.0, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
