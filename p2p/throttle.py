"""Upload limits: a token bucket for bytes per second, shared by every upload of one host."""

from __future__ import annotations

from dataclasses import dataclass

import trio


@dataclass
class TokenBucket:
    """`rate` tokens per second, at most `burst` banked; a take may drive the level negative
    (the caller then waits it off), so a chunk larger than the burst still goes through."""

    rate: float
    burst: float
    level: float
    updated_at: float

    def take(self, amount: float, now: float) -> float:
        """Take `amount` tokens at time `now`; return how long to wait before sending them."""
        self.level = min(self.burst, self.level + (now - self.updated_at) * self.rate)
        self.updated_at = now
        self.level -= amount
        return 0.0 if self.level >= 0 else -self.level / self.rate


class UploadThrottle:
    """Pace the bytes a host sends to `bytes_per_s`, over all its concurrent uploads."""

    def __init__(self, bytes_per_s: int, burst_bytes: int) -> None:
        self._bucket = TokenBucket(
            rate=float(bytes_per_s), burst=float(burst_bytes), level=float(burst_bytes), updated_at=trio.current_time()
        )

    async def pace(self, num_bytes: int) -> None:
        delay = self._bucket.take(num_bytes, trio.current_time())
        if delay > 0:
            await trio.sleep(delay)
