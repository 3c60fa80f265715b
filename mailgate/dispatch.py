"""The dispatcher: the only place that sends requests to providers.

For each message it walks the account's route (ARCHITECTURE.md "After
acceptance"): a provider that cannot carry the message (``check``), whose
circuit is open (:mod:`mailgate.circuit`), or that fails transiently before
taking the request hands over to the next one; a provider that accepts, or
rejects the content permanently, ends the walk, and so does an answer that
may mean the API took the message (a timeout, a reset): never fail over after
a provider may have accepted.  When every provider on the route has its
circuit open, no request is sent and the answer is ``451 4.3.0``.

Each request first passes the provider's :class:`~mailgate.ratelimit.RequestGate`
(concurrency and rate); a request that cannot get through within
``limit_wait`` seconds is ``451 4.7.0`` (nothing was sent, so the next
provider may be tried).  In sync mode the outcome is the reply to the final
dot, so transient failures are ``451`` and the client keeps the message (RFC
5321 §4.2.5: a 4yz reply keeps the responsibility with the client).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.logger import Logger
from zope.interface import implementer

from mailgate.accounts.account import Account
from mailgate.circuit import CircuitBreaker, CircuitPolicy, CircuitState
from mailgate.interfaces import IDeliverer, IProvider, ITransport
from mailgate.metrics import Metrics
from mailgate.model import OutboundEmail
from mailgate.outcome import Delivered, Failed, Outcome, Retry
from mailgate.providers.base import HTTPRequest, HTTPResponse
from mailgate.ratelimit import LimitWaitExceeded, RequestGate, RequestLimits
from mailgate.replies import sanitise_text
from mailgate.transports import APITimeout


@dataclass(frozen=True)
class Route:
    """A configured provider: its pure adapter, the transport that carries its
    requests, its request limits and its circuit breaker policy."""

    adapter: IProvider
    transport: ITransport
    limits: RequestLimits = field(default_factory=RequestLimits)
    circuit: CircuitPolicy = field(default_factory=CircuitPolicy)


@implementer(IDeliverer)
class Dispatcher:
    """Delivers messages along routes; holds each provider's breaker and gate.

    ``limit_wait``: seconds a request may wait for its provider's concurrency
    or rate limit (None: no bound).
    """

    log = Logger()

    def __init__(
        self,
        providers: Mapping[str, Route],
        default_route: Sequence[str],
        clock: Any,
        limit_wait: float | None = 30.0,
        metrics: Metrics | None = None,
    ):
        self.providers = providers
        self.default_route = tuple(default_route)
        self.clock = clock
        self.limit_wait = limit_wait
        self.breakers = {name: CircuitBreaker(name, clock, route.circuit) for name, route in providers.items()}
        self.gates = {name: RequestGate(route.limits, clock) for name, route in providers.items()}
        self.metrics = metrics if metrics is not None else Metrics()

    def replace_routes(self, providers: Mapping[str, Route], default_route: Sequence[str]) -> None:
        """Use new providers from now on (a reload).

        A provider whose limits (or circuit policy) did not change keeps its gate
        (and breaker): requests in flight stay counted, an open circuit stays open.
        Deliveries under way finish with the objects they started with.
        """
        old = self.providers
        self.breakers = {
            name: self.breakers[name]
            if name in old and old[name].circuit == route.circuit
            else CircuitBreaker(name, self.clock, route.circuit)
            for name, route in providers.items()
        }
        self.gates = {
            name: self.gates[name]
            if name in old and old[name].limits == route.limits
            else RequestGate(route.limits, self.clock)
            for name, route in providers.items()
        }
        self.providers, self.default_route = providers, tuple(default_route)

    def usable(self, name: str) -> bool:
        """Configured, and its circuit not open (readiness; changes no state)."""
        breaker = self.breakers.get(name)
        return breaker is not None and breaker.retry_in() == 0

    def prepare(self, queue_id: str, raw: bytes, sender: str, recipients: tuple[str, ...], account: Account) -> None:
        """Sync mode keeps nothing before the message is parsed."""

    def release(self, queue_id: str) -> None:
        """Nothing was prepared (see :meth:`prepare`)."""

    @defer.inlineCallbacks
    def deliver(
        self,
        email: OutboundEmail,
        account: Account,
        queue_id: str,
        *,
        done: Mapping[str, str] | None = None,
        on_delivered: Callable[[str, Delivered, int, tuple[str, ...] | None], Any] | None = None,
    ) -> Any:
        """Walk the route; see the module docstring.

        The queue passes ``done`` (request key -> provider message id: requests an
        API already accepted, from its journal) to skip, and ``on_delivered(key,
        delivered, remaining, recipients)``, called (and waited for, if it returns
        a Deferred) after each accepted request with the number of requests still
        to send and the envelope recipients that request delivered to
        (:func:`carried_recipients`), so that a partial delivery can be recorded
        before the next request goes out.
        """
        route = account.route or self.default_route
        refusal: Failed | None = None
        misconfigured: Retry | None = None
        last_retry: Retry | None = None
        circuit_open: list[str] = []
        for name in route:
            provider = self.providers.get(name)
            if provider is None:
                self.log.error("account {account} routes to unknown provider {name}", account=account.name, name=name)
                misconfigured = Retry(name, "provider is not configured", "4.3.5")
                continue
            unsuitable = provider.adapter.check(email, account)
            if unsuitable is not None:
                refusal = refusal or unsuitable
                continue
            breaker = self.breakers[name]
            if not breaker.allow():
                circuit_open.append(name)
                continue
            # allow() on a half-open circuit hands this message the one probe.
            probe = breaker.state is CircuitState.HALF_OPEN
            if last_retry is not None:
                # The message outcome line names only the last provider: say why we moved on.
                self.log.info(
                    "message {queue_id} failover to {provider}: {previous} {outcome}",
                    queue_id=queue_id,
                    provider=name,
                    previous=last_retry.provider,
                    outcome=_describe(last_retry),
                )
            try:
                outcome = yield self._attempt(name, provider, email, account, queue_id, done or {}, on_delivered)
            finally:
                if probe:
                    # A probe that sent nothing (local limit, adapter error) must not
                    # keep the circuit waiting for an answer that never comes.  Only
                    # the probe's holder frees it: a request sent before the circuit
                    # opened, ending now, must not let a second probe through.
                    breaker.abandon()
            if isinstance(outcome, Retry) and not outcome.ambiguous:
                last_retry = outcome
                continue
            return outcome
        if last_retry is not None:
            return last_retry
        if circuit_open:
            return self._all_routes_down(circuit_open)
        if misconfigured is not None:
            return misconfigured
        if refusal is not None:
            return refusal
        return Retry("mailgate", "no provider is configured for this account", "4.3.5")

    def recipient_limit(self, account: Account) -> int | None:
        """The most recipients one message on ``account``'s route can have: the
        largest ``max_recipients`` among its providers (any provider without such
        a limit, or an unknown one, lifts it).  The session refuses more at RCPT
        (452 4.5.3), where the client can send the rest in another transaction."""
        limits = []
        for name in account.route or self.default_route:
            route = self.providers.get(name)
            limit = getattr(route.adapter, "max_recipients", None) if route is not None else None
            if limit is None:
                return None
            limits.append(limit)
        return max(limits, default=None)

    def _all_routes_down(self, names: list[str]) -> Retry:
        """Every usable provider's circuit is open: nothing was sent.  ``after``
        is when the first of them lets a probe through."""
        after = min(self.breakers[name].retry_in() for name in names)
        return Retry(
            "mailgate",
            f"all routes down (circuit open for {', '.join(names)})",
            "4.3.0",
            after=after or None,
        )

    def refusal(self, email: OutboundEmail, account: Account) -> Failed | None:
        """The permanent refusal ``deliver`` would end with, known without any I/O:
        no configured provider on the route can carry the message (``check``).
        Queue mode answers the final dot with it instead of accepting a message
        that can only bounce."""
        refusal: Failed | None = None
        for name in account.route or self.default_route:
            provider = self.providers.get(name)
            if provider is None:
                return None
            unsuitable = provider.adapter.check(email, account)
            if unsuitable is None:
                return None
            refusal = refusal or unsuitable
        return refusal

    @defer.inlineCallbacks
    def _attempt(
        self,
        name: str,
        provider: Route,
        email: OutboundEmail,
        account: Account,
        queue_id: str,
        done: Mapping[str, str],
        on_delivered: Callable[[str, Delivered, int, tuple[str, ...] | None], Any] | None,
    ) -> Any:
        requests = provider.adapter.build_requests(email, account, queue_id)
        delivered: list[Delivered] = []
        for index, request in enumerate(requests):
            # Keys matter only for messages sent in several requests (journal).
            key = request_key(request) if done or (on_delivered is not None and len(requests) > 1) else ""
            if key in done:
                delivered.append(Delivered(name, done[key]))
                continue
            outcome = yield self._request(name, provider, request)
            if delivered and isinstance(outcome, Retry) and not outcome.ambiguous:
                # Part of the message is with this provider: another one must not get it.
                outcome = replace(outcome, ambiguous=True)
            elif delivered and isinstance(outcome, Failed):
                # The bounce must not claim nobody got it (one reply per transaction).
                outcome = replace(
                    outcome,
                    reason=f"{len(delivered)} of {len(requests)} requests were accepted before: {outcome.reason}",
                )
            if not isinstance(outcome, Delivered):
                # A request after an accepted one failed: the client must retry the whole
                # message; the idempotency key lets the API recognise the repeat.
                return outcome
            delivered.append(outcome)
            if on_delivered is not None:
                recipients = carried_recipients(request, email, len(requests))
                yield defer.maybeDeferred(on_delivered, key, outcome, len(requests) - index - 1, recipients)
        if len(delivered) == 1:
            return delivered[0]
        ids = ",".join(d.message_id for d in delivered)
        return Delivered(name, ids)

    @defer.inlineCallbacks
    def _request(self, name: str, provider: Route, request: Any) -> Any:
        """Send one request through the provider's gate; tell its breaker what came of it."""
        breaker = self.breakers[name]
        try:
            release = yield self.gates[name].acquire(self.limit_wait)
        except LimitWaitExceeded as e:
            # Our own limit, not the API's failure: the breaker does not count it.
            return Retry(name, str(e), "4.7.0")
        response: HTTPResponse | None = None
        started = self.clock.seconds()
        try:
            response = yield provider.transport.send(request)
        except APITimeout as e:
            outcome: Outcome = Retry(name, str(e), "4.4.1", ambiguous=True)
        except (ConnectError, DNSLookupError) as e:
            # Nothing was sent: the next provider may safely be tried.
            outcome = Retry(name, f"cannot reach the API ({type(e).__name__})", "4.4.1")
        except Exception as e:  # noqa: BLE001 - any other transport failure is transient
            outcome = Retry(name, f"no complete answer from the API ({type(e).__name__})", "4.4.1", ambiguous=True)
        else:
            outcome = provider.adapter.classify(request, response)
        finally:
            release()
        self.metrics.provider_request(name, outcome, self.clock.seconds() - started)
        # A 429 is not counted: the API is up and asks us to slow down, often for
        # one API key only (passthrough logins each bring their own); the message
        # fails over, but one client's quota must not open the circuit for everyone.
        # Likewise an SMTP server's 4xx to one message (``concerns_message_only``).
        if response is None or not response.concerns_message_only:
            if isinstance(outcome, Retry):
                breaker.record_failure()
            else:
                breaker.record_success()
        return outcome


def request_key(request: HTTPRequest) -> str:
    """What identifies one request across attempts and restarts: provider, method,
    URL and body (headers are left out: signatures carry a timestamp).  Adapters
    build the same request from the same message, so a journaled request is
    recognised when the message is tried again."""
    digest = hashlib.sha256()
    for part in (request.provider, request.method, request.url):
        digest.update(part.encode("utf-8", "surrogatepass") + b"\0")
    digest.update(request.body)
    return digest.hexdigest()[:32]


def carried_recipients(request: Any, email: OutboundEmail, count: int) -> tuple[str, ...] | None:
    """The envelope recipients an accepted request delivered to, or None when that
    is not known.

    What the request names (``HTTPRequest.recipients``, an ``SMTPRequest``'s
    envelope); a request that names none carries the whole envelope when it is
    the message's only one.  One of several that names none is unknown: taking
    it for the whole envelope would keep the others out of a DSN they are owed.
    """
    named = tuple(getattr(request, "recipients", ()) or ())
    if named:
        return named
    return tuple(email.envelope_recipients) if count == 1 else None


def _describe(outcome: Retry | Failed) -> str:
    if isinstance(outcome, Retry):
        return f"retry ({outcome.enhanced} {sanitise_text(outcome.reason)})"
    return f"failed ({outcome.code} {outcome.enhanced} {sanitise_text(outcome.reason)})"
