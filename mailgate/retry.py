"""When to try a queued message again: a pure function of the attempt history.

ARCHITECTURE.md "After acceptance": transient failures are retried with
exponential backoff and jitter, an API's ``Retry-After`` (RFC 9110 §10.2.3) is
honoured, and the message is given up after the queue lifetime (Postfix's
``maximal_queue_lifetime``; RFC 5321 §4.5.4.1 asks for at least 4-5 days).

Jitter spreads the retries of messages that failed together (an API outage)
so they do not all come back at the same second ("thundering herd").  The
random number is an argument, so the schedule is a pure function and tests
pin it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["RetryPolicy", "next_attempt"]


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff settings (``[queue]`` in mailgate.toml).

    After the n-th failed attempt the delay is ``first_retry * factor**(n-1)``,
    capped at ``max_retry_interval``, then moved by up to ``jitter`` (a fraction)
    either way.  ``lifetime`` counts from the message's arrival.
    """

    first_retry: float = 60.0
    max_retry_interval: float = 3600.0
    lifetime: float = 5 * 86400.0
    factor: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        for name in ("first_retry", "max_retry_interval", "lifetime"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number greater than zero")
        if not math.isfinite(self.factor) or self.factor < 1:
            raise ValueError("factor must be at least 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be at least 0 and less than 1")

    def backoff(self, attempts: int, random: float) -> float:
        """The delay after ``attempts`` failed attempts (>= 1); ``random`` in [0, 1)."""
        exponent = min(max(attempts, 1) - 1, 64)  # beyond 2**64 the cap has long applied
        base = min(self.max_retry_interval, self.first_retry * self.factor**exponent)
        return base * (1 + self.jitter * (2 * random - 1))


def next_attempt(
    policy: RetryPolicy,
    *,
    arrival: float,
    now: float,
    attempts: int,
    random: float,
    retry_after: float | None = None,
) -> float | None:
    """The time of the next attempt after a transient failure at ``now``, or None to give up.

    ``attempts`` counts the failed attempts so far, this one included.
    ``retry_after`` is the API's minimum delay in seconds: never retried sooner,
    even beyond ``max_retry_interval``, as long as that is before the lifetime
    ends.  The last retry happens when the lifetime ends (not a backoff period
    after it), also when a ``Retry-After`` reaches past it: one absurd header
    must not bounce a message that arrived a minute ago.  When the lifetime
    has ended, the answer is None.
    """
    deadline = arrival + policy.lifetime
    if now >= deadline:
        return None
    delay = policy.backoff(attempts, random)
    if retry_after is not None and math.isfinite(retry_after) and retry_after > 0:
        delay = max(delay, retry_after)
    return min(now + delay, deadline)
