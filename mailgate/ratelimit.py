"""Rate and concurrency limits: per provider (requests) and per account (messages).

Three pieces, all driven by an injected ``IReactorTime`` so tests use a Clock:

* :class:`TokenBucket`: the arithmetic.  ``rate`` tokens per second flow into
  a bucket holding at most ``burst``; a request takes one.  Pure: no timers.
* :class:`RequestGate`: what the dispatcher passes before each API request:
  at most ``max_concurrency`` requests in flight to one provider (a
  ``DeferredSemaphore``) and at most ``rate`` requests per second (a token
  bucket, waiters served in arrival order by one timer).  The wait is
  bounded: in sync mode a client must not hang behind a saturated provider,
  it gets ``451 4.7.0`` instead.
* :class:`AccountRateLimiter`: messages per minute per account, checked at
  MAIL FROM (``451 4.7.1``, so the client slows down: RFC 3463 "delivery not
  authorized" class 7, transient).  Keyed by account name; memory stays
  bounded because a full bucket (an idle account) is dropped, which changes
  nothing: a missing bucket is a full one.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

from mailgate.accounts.account import Account


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full."""

    def __init__(self, rate: float, burst: float, now: float):
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError("rate must be a finite number greater than zero")
        if not (math.isfinite(burst) and burst >= 1):
            raise ValueError("burst must be at least 1")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        self._refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def wait_time(self, now: float) -> float:
        """Seconds until a token is available (0 if one is now)."""
        self._refill(now)
        return max(0.0, (1 - self.tokens) / self.rate)

    def is_full(self, now: float) -> bool:
        """True when the bucket is as if it had never been used."""
        self._refill(now)
        return self.tokens >= self.burst

    def reconfigure(self, rate: float, burst: float, now: float) -> None:
        """Change the limits, keeping what was already used up."""
        self._refill(now)
        self.rate, self.burst = rate, burst
        self.tokens = min(self.tokens, burst)


@dataclass(frozen=True)
class RequestLimits:
    """A provider's request limits.  ``rate`` None: no rate limit; ``burst``
    None: ``max(1, ceil(rate))`` (one second's worth)."""

    max_concurrency: int = 32
    rate: float | None = None
    burst: int | None = None

    @property
    def bucket_size(self) -> float:
        if self.burst is not None:
            return float(self.burst)
        return float(max(1, math.ceil(self.rate or 1)))


class LimitWaitExceeded(Exception):
    """No request slot became free within the allowed wait."""


class _RateQueue:
    """Waiters for a token bucket, served in arrival order by a single timer."""

    def __init__(self, bucket: TokenBucket, clock: Any):
        self.bucket = bucket
        self.clock = clock
        self.waiting: deque[defer.Deferred[None]] = deque()
        self.timer: Any = None

    def wait(self) -> defer.Deferred[None]:
        if not self.waiting and self.bucket.take(self.clock.seconds()):
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred(canceller=self._cancel)
        self.waiting.append(d)
        self._schedule()
        return d

    def _cancel(self, d: defer.Deferred[None]) -> None:
        self.waiting.remove(d)
        if not self.waiting and self.timer is not None and self.timer.active():
            self.timer.cancel()
            self.timer = None

    def _schedule(self) -> None:
        if self.timer is None and self.waiting:
            self.timer = self.clock.callLater(self.bucket.wait_time(self.clock.seconds()), self._serve)

    def _serve(self) -> None:
        self.timer = None
        while self.waiting and self.bucket.take(self.clock.seconds()):
            self.waiting.popleft().callback(None)
        self._schedule()


class RequestGate:
    """Concurrency and rate limit of one provider, with a bounded wait.

    ``acquire(timeout)`` fires with a ``release`` callable once the request
    may be sent (call it when the request is done, whatever came of it), or
    fails with :class:`LimitWaitExceeded` after ``timeout`` seconds (None:
    wait as long as it takes).  The concurrency slot is taken first and the
    rate token second, so requests start no faster than the rate allows even
    when slots free up together.
    """

    def __init__(self, limits: RequestLimits, clock: Any):
        if limits.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.limits = limits
        self.clock = clock
        self.slots = defer.DeferredSemaphore(limits.max_concurrency)
        self.rate: _RateQueue | None = None
        if limits.rate is not None:
            self.rate = _RateQueue(TokenBucket(limits.rate, limits.bucket_size, clock.seconds()), clock)

    @property
    def in_flight(self) -> int:
        return self.slots.limit - self.slots.tokens

    @defer.inlineCallbacks
    def acquire(self, timeout: float | None) -> Any:
        deadline = None if timeout is None else self.clock.seconds() + timeout
        yield self._bounded(self.slots.acquire(), deadline)
        if self.rate is not None:
            try:
                yield self._bounded(self.rate.wait(), deadline)
            except BaseException:
                self.slots.release()
                raise
        return _Release(self.slots.release)

    def _bounded(self, waiting: defer.Deferred[Any], deadline: float | None) -> defer.Deferred[Any]:
        if deadline is None or waiting.called:
            return waiting
        remaining = max(0.0, deadline - self.clock.seconds())

        def exceeded(failure: Any) -> Any:
            failure.trap(defer.TimeoutError)
            raise LimitWaitExceeded(f"provider busy: no request slot free within {remaining:g} s")

        return waiting.addTimeout(remaining, self.clock).addErrback(exceeded)


class _Release:
    """Frees a request slot once; a second call does nothing."""

    def __init__(self, release: Callable[[], None]):
        self._release: Callable[[], None] | None = release

    def __call__(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()


@dataclass(frozen=True)
class MessageRate:
    """Messages per minute for an account, and how many may come at once."""

    per_minute: int
    burst: int


class AccountRateLimiter:
    """Per-account message rate, checked when a transaction starts (MAIL FROM).

    An account's own ``max_messages_per_minute`` (and ``message_burst``) win
    over the server default; 0 means unlimited.  The burst defaults to the
    per-minute figure: an idle client may send that many at once, then the
    rate applies.  Buckets of idle accounts (full again) are forgotten as
    traffic goes by; at most ``max_tracked`` are kept, beyond which the least
    recently used is dropped (which only gives that account a fresh burst).
    """

    def __init__(self, clock: Any, default: MessageRate | None = None, max_tracked: int = 100_000):
        self.clock = clock
        self.default = default
        self.max_tracked = max_tracked
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def rate_for(self, account: Account) -> MessageRate | None:
        per_minute = account.max_messages_per_minute
        if per_minute is None:
            if self.default is None or self.default.per_minute == 0:
                return None
            return MessageRate(self.default.per_minute, account.message_burst or self.default.burst)
        if per_minute == 0:
            return None
        return MessageRate(per_minute, account.message_burst or per_minute)

    def allow(self, account: Account) -> bool:
        """Count one message for ``account``; False when it is over its rate."""
        rate = self.rate_for(account)
        if rate is None:
            return True
        now = self.clock.seconds()
        self._forget_idle(now)
        per_second = rate.per_minute / 60
        bucket = self._buckets.get(account.name)
        if bucket is None:
            if len(self._buckets) >= self.max_tracked:
                self._buckets.popitem(last=False)
            bucket = self._buckets[account.name] = TokenBucket(per_second, rate.burst, now)
        else:
            self._buckets.move_to_end(account.name)
            if (bucket.rate, bucket.burst) != (per_second, rate.burst):
                bucket.reconfigure(per_second, rate.burst, now)
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)

    def _forget_idle(self, now: float) -> None:
        """Drop full buckets from the least recently used end: each bucket is
        dropped once, so this costs O(1) per message on average."""
        while self._buckets:
            name, bucket = next(iter(self._buckets.items()))
            if not bucket.is_full(now):
                return
            del self._buckets[name]
