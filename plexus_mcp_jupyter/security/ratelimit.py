"""Per-identity token buckets: `rate` requests (or bytes, `cost`) per second on average, `burst` at once."""

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


class BytesLimited(RateLimited):
    """Over a byte budget (`request_bytes_rate`): `retry_after` whole seconds to wait (HTTP 429 with Retry-After)."""

    def __init__(self, wait: float, rate: float, burst: float, what: str) -> None:
        self.retry_after = max(1, math.ceil(wait))
        Exception.__init__(
            self,
            f"byte budget: {what} may send {rate:,.0f} bytes per second (request_bytes_rate; {burst:,.0f} at once, "
            f"request_bytes_burst) in bodies over 64 KiB; retry after {self.retry_after} s",
        )


class RateLimiter:
    """Token buckets by identity (an API key's id). Cheap: a dictionary entry and a little arithmetic."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # identity -> (tokens, last refill)
        self._lock = threading.Lock()

    def take(self, identity: str, rate: float | None = None, cost: float = 1.0) -> float:
        """Spend `cost` (one request, or a body's bytes); return 0.0 if allowed, else the seconds to wait before it
        would be. A cost above the burst is charged as the burst (a full bucket lets it through)."""
        rate = rate or self.rate
        burst = max(float(self.burst), rate)
        cost = min(cost, burst)
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(identity, (burst, now))
            tokens = min(burst, tokens + (now - last) * rate)
            if tokens >= cost:
                self._buckets[identity] = (tokens - cost, now)
                return 0.0
            self._buckets[identity] = (tokens, now)
            return (cost - tokens) / rate
