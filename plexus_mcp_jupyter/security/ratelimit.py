"""Per-identity token buckets: `rate` requests per second on average, `burst` at once."""

from __future__ import annotations

import math
import threading
import time


class RateLimited(Exception):
    """Over the limit: `retry_after` whole seconds to wait (HTTP 429 with Retry-After)."""

    def __init__(self, wait: float, rate: float, burst: int) -> None:
        self.retry_after = max(1, math.ceil(wait))
        super().__init__(
            f"rate limit: this key may make {rate:g} requests per second (bursts of {burst}); retry "
            f"after {self.retry_after} s"
        )


class RateLimiter:
    """Token buckets by identity (an API key's id). Cheap: a dictionary entry and a little arithmetic."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # identity -> (tokens, last refill)
        self._lock = threading.Lock()

    def take(self, identity: str, rate: float | None = None) -> float:
        """Spend one request; return 0.0 if allowed, else the seconds to wait before the next one."""
        rate = rate or self.rate
        burst = max(float(self.burst), rate)
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(identity, (burst, now))
            tokens = min(burst, tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[identity] = (tokens - 1.0, now)
                return 0.0
            self._buckets[identity] = (tokens, now)
            return (1.0 - tokens) / rate
