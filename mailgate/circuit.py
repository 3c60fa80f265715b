"""A circuit breaker per provider: stop sending to an API that keeps failing.

An API that is down answers every request with a timeout or a 5xx.  Sending
each message there first costs the client (sync mode) the whole API timeout
and the API a stampede when it comes back.  The breaker counts consecutive
transient failures (every :class:`~mailgate.outcome.Retry` an API earns,
ambiguous or not, except a 429: an API that asks us to slow down is up, and
the quota may be one client's own key); at ``failures`` in a row it *opens*:
the dispatcher skips the provider and fails over to the next one on the route
(ARCHITECTURE.md, "After acceptance").  After ``cooldown`` seconds it is
*half-open*: exactly one request (the probe) goes through.  A probe that
succeeds closes the circuit; one that fails re-opens it for twice the previous
cool-down, up to ``max_cooldown``.  Any answer that is not transient
(delivered, or a permanent rejection: the API is up and deciding) resets the
count.

The state machine is pure: time comes from an injected ``IReactorTime``
(``seconds()``), so tests drive it with a ``Clock``.  A state change is logged
once, never per message.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(frozen=True)
class CircuitPolicy:
    """When a provider's circuit opens, and for how long.

    ``failures``: consecutive transient failures that open it.  ``cooldown``:
    seconds it stays open the first time; each failed probe doubles it, up to
    ``max_cooldown``.
    """

    failures: int = 5
    cooldown: float = 30.0
    max_cooldown: float = 600.0

    def __post_init__(self) -> None:
        if self.failures < 1:
            raise ValueError("failures must be at least 1")
        if not (math.isfinite(self.cooldown) and self.cooldown > 0):
            raise ValueError("cooldown must be a finite number of seconds greater than zero")
        if not (math.isfinite(self.max_cooldown) and self.max_cooldown >= self.cooldown):
            raise ValueError("max_cooldown must be finite and at least cooldown")


class CircuitBreaker:
    """The breaker of one provider.

    Call :meth:`allow` before sending a message to the provider; when it
    answers True, report what came of it with :meth:`record_success` or
    :meth:`record_failure`, or with :meth:`abandon` when no request was sent
    after all (so a half-open probe slot is not lost).
    """

    log = Logger()

    def __init__(self, name: str, clock: Any, policy: CircuitPolicy = CircuitPolicy()):
        self.name = name
        self.clock = clock
        self.policy = policy
        self.state = CircuitState.CLOSED
        self.consecutive_failures = 0
        self.cooldown = policy.cooldown
        self.opened_until = 0.0
        self._probing = False

    def allow(self) -> bool:
        """May a message be sent to this provider now?

        Open and past its cool-down, the circuit turns half-open and this call
        takes the one probe; while the probe is out, everyone else is refused.
        """
        if self.state is CircuitState.CLOSED:
            return True
        if self.state is CircuitState.OPEN:
            if self.clock.seconds() < self.opened_until:
                return False
            self._move(CircuitState.HALF_OPEN, "probing with the next message")
        if self._probing:
            return False
        self._probing = True
        return True

    def retry_in(self) -> float:
        """Seconds until a message may be sent again (0 when it may be now)."""
        if self.state is CircuitState.OPEN:
            return max(0.0, self.opened_until - self.clock.seconds())
        return 0.0

    def record_success(self) -> None:
        """The provider answered with something other than a transient failure."""
        self.consecutive_failures = 0
        self._probing = False
        if self.state is not CircuitState.CLOSED:
            self.cooldown = self.policy.cooldown
            self._move(CircuitState.CLOSED, "the provider answered")

    def record_failure(self) -> None:
        """The provider failed transiently (timeout, connection error, 429, 5xx...)."""
        self.consecutive_failures += 1
        if self.state is CircuitState.HALF_OPEN:
            self._probing = False
            self.cooldown = min(self.cooldown * 2, self.policy.max_cooldown)
            self._open()
        elif self.state is CircuitState.CLOSED and self.consecutive_failures >= self.policy.failures:
            self._open()
        # Already open: a request sent before it opened failed too; nothing changes.

    def abandon(self) -> None:
        """A message allowed by :meth:`allow` was not sent after all: free the probe."""
        self._probing = False

    def _open(self) -> None:
        self.opened_until = self.clock.seconds() + self.cooldown
        self._move(
            CircuitState.OPEN,
            f"{self.consecutive_failures} consecutive transient failures; "
            f"skipped for {self.cooldown:g} s",
        )

    def _move(self, state: CircuitState, why: str) -> None:
        self.state = state
        emit = self.log.warn if state is CircuitState.OPEN else self.log.info
        emit(
            "circuit of provider {provider} {state}: {why}",
            provider=self.name,
            state=state.value,
            why=why,
        )
