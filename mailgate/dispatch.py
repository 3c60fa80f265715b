"""The dispatcher: the only place that sends requests to providers.

For each message it walks the account's route (ARCHITECTURE.md "After
acceptance"): a provider that cannot carry the message (``check``) or that
fails transiently hands over to the next one; a provider that accepts, or
rejects the content permanently, ends the walk.  In sync mode the outcome is
the reply to the final dot, so transient failures are ``451`` and the client
keeps the message (RFC 5321 §4.2.5: a 4yz reply keeps the responsibility with
the client).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.logger import Logger
from zope.interface import implementer

from mailgate.accounts.account import Account
from mailgate.interfaces import IDeliverer, IProvider, ITransport
from mailgate.model import OutboundEmail
from mailgate.outcome import Delivered, Failed, Outcome, Retry
from mailgate.replies import sanitise_text
from mailgate.transports import APITimeout


@dataclass(frozen=True)
class Route:
    """A configured provider: its pure adapter and the transport that carries its requests."""

    adapter: IProvider
    transport: ITransport


@implementer(IDeliverer)
class Dispatcher:
    log = Logger()

    def __init__(self, providers: Mapping[str, Route], default_route: Sequence[str], clock: Any):
        self.providers = providers
        self.default_route = tuple(default_route)
        self.clock = clock

    @defer.inlineCallbacks
    def deliver(self, email: OutboundEmail, account: Account, queue_id: str) -> Any:
        route = account.route or self.default_route
        refusal: Failed | None = None
        last_retry: Retry | None = None
        for name in route:
            provider = self.providers.get(name)
            if provider is None:
                self.log.error("account {account} routes to unknown provider {name}", account=account.name, name=name)
                last_retry = Retry(name, "provider is not configured", "4.3.5")
                continue
            unsuitable = provider.adapter.check(email, account)
            if unsuitable is not None:
                refusal = refusal or unsuitable
                continue
            outcome = yield self._attempt(name, provider, email, account, queue_id)
            if isinstance(outcome, Retry) and not outcome.ambiguous:
                last_retry = outcome
                continue
            return outcome
        if last_retry is not None:
            return last_retry
        if refusal is not None:
            return refusal
        return Retry("mailgate", "no provider is configured for this account", "4.3.5")

    @defer.inlineCallbacks
    def _attempt(
        self, name: str, provider: Route, email: OutboundEmail, account: Account, queue_id: str
    ) -> Any:
        requests = provider.adapter.build_requests(email, account, queue_id)
        delivered: list[Delivered] = []
        for request in requests:
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
            if not isinstance(outcome, Delivered):
                # Successes are logged once per message by the session; failed attempts
                # here, so a failover can be traced provider by provider.
                self.log.info(
                    "provider {provider} message {queue_id}: {outcome} after {elapsed:.3f}s",
                    provider=name,
                    queue_id=queue_id,
                    outcome=_describe(outcome),
                    elapsed=self.clock.seconds() - started,
                )
                # A request after an accepted one failed: the client must retry the whole
                # message; the idempotency key lets the API recognise the repeat.
                return outcome
            delivered.append(outcome)
        if len(delivered) == 1:
            return delivered[0]
        ids = ",".join(d.message_id for d in delivered)
        return Delivered(name, ids)


def _describe(outcome: Retry | Failed) -> str:
    if isinstance(outcome, Retry):
        return f"retry ({outcome.enhanced} {sanitise_text(outcome.reason)})"
    return f"failed ({outcome.code} {outcome.enhanced} {sanitise_text(outcome.reason)})"
