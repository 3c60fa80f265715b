"""The events webhook: tell the operator's system what became of each message.

After acceptance (queue mode) the client has long gone when a message is
delivered, deferred or finally fails; the operator learns it from a JSON POST
per event to ``[events] url`` (ARCHITECTURE.md "After acceptance").  The
schema, ``mailgate.event.v1``, is documented in README.rst ("Events
webhook")::

    {"schema": "mailgate.event.v1", "id": "...", "type": "failed",
     "timestamp": "2026-11-22T10:00:00.123Z", "queue_id": "...",
     "account": "alice", "sender": "alice@example.com",
     "recipients": ["bob@example.org"], "provider": "main",
     "provider_message_id": null, "reason": "HTTP 400: ...", "attempts": 3}

Delivery of events is best effort and never slows mail down: :meth:`EventSink.emit`
only appends to a bounded in-memory buffer and returns.  A few requests run at
once through the shared treq client (:class:`~mailgate.transports.TreqTransport`);
an answer of 408, 429 or 5xx, a timeout or a connection error is retried with
a growing delay (1, 4, 16, 64 s...; ``Retry-After`` honoured up to 5 minutes),
other 4xx answers are final.  An event that cannot be delivered, or that finds
the buffer full, is dropped with a logged warning naming the event and the
message, never the URL or a credential.

Requests carry ``Authorization: Bearer <token>`` when a token is set, the
event id as ``Idempotency-Key`` (a retried event has the same id), and with a
signing secret the same ``X-Mailgate-Signature: t=<unix time>,v1=<hex>``
header as the webhook provider (:func:`mailgate.providers.webhook.signature`),
computed afresh for each attempt.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailgate.config import EventsConfig
from mailgate.ids import new_queue_id
from mailgate.interfaces import IEventSink, ITransport
from mailgate.providers.base import USER_AGENT, HTTPRequest, HTTPResponse, parse_retry_after
from mailgate.providers.webhook import signature
from mailgate.transports import TreqTransport

SCHEMA = "mailgate.event.v1"
KINDS = ("delivered", "deferred", "failed")
MAX_IN_FLIGHT = 4
FIRST_RETRY = 1.0  # seconds; each further retry waits four times longer
RETRY_FACTOR = 4.0
MAX_RETRY_AFTER = 300.0
MAX_REASON = 1000  # characters of a reason kept in an event


def event_document(
    event_id: str,
    kind: str,
    now: float,
    *,
    queue_id: str,
    account: str,
    sender: str,
    recipients: Sequence[str],
    provider: str | None,
    provider_message_id: str | None,
    reason: str | None,
    attempts: int,
) -> dict[str, Any]:
    """The ``mailgate.event.v1`` document for one event."""
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {
        "schema": SCHEMA,
        "id": event_id,
        "type": kind,
        "timestamp": stamp,
        "queue_id": queue_id,
        "account": account,
        "sender": sender,
        "recipients": list(recipients),
        "provider": provider,
        "provider_message_id": provider_message_id,
        "reason": reason[:MAX_REASON] if reason is not None else None,
        "attempts": attempts,
    }


@dataclass
class _Event:
    id: str
    kind: str
    queue_id: str
    body: bytes = field(repr=False)
    attempts: int = 0


@implementer(IEventSink)
class EventSink(Service):
    """POSTs events to the operator's URL; see the module docstring.

    ``buffer_size`` bounds the events held (waiting, in flight or waiting to
    be retried); ``max_attempts`` is the number of POSTs per event.  Stopping
    the service makes one last attempt for what is held, for at most
    ``grace`` seconds, then drops the rest with one warning.
    """

    log = Logger()

    def __init__(
        self,
        transport: ITransport,
        clock: Any,
        url: str,
        *,
        token: str | None = None,
        signing_secret: str | None = None,
        buffer_size: int = 10_000,
        max_attempts: int = 5,
        grace: float = 10.0,
    ):
        self.transport = transport
        self.clock = clock
        self.url = url
        self._token = token
        self._secret = signing_secret
        self.buffer_size = buffer_size
        self.max_attempts = max_attempts
        self.grace = grace
        self._pending: deque[_Event] = deque()
        self._in_flight = 0
        self._retries: dict[str, tuple[_Event, Any]] = {}
        self._stopping = False
        self._idle: list[defer.Deferred[None]] = []

    def __repr__(self) -> str:
        return f"<EventSink held={self.held}>"

    @property
    def held(self) -> int:
        """Events not yet delivered or dropped."""
        return len(self._pending) + self._in_flight + len(self._retries)

    def emit(
        self,
        kind: str,
        *,
        queue_id: str,
        account: str,
        sender: str,
        recipients: Sequence[str],
        provider: str | None = None,
        provider_message_id: str | None = None,
        reason: str | None = None,
        attempts: int = 0,
    ) -> None:
        """Queue one event for sending; returns at once and never raises."""
        try:
            now = self.clock.seconds()
            event_id = new_queue_id(now)
            document = event_document(
                event_id,
                kind,
                now,
                queue_id=queue_id,
                account=account,
                sender=sender,
                recipients=recipients,
                provider=provider,
                provider_message_id=provider_message_id,
                reason=reason,
                attempts=attempts,
            )
            event = _Event(event_id, kind, queue_id, json.dumps(document, ensure_ascii=False).encode("utf-8"))
            if self.held >= self.buffer_size:
                self._drop(event, f"the buffer of {self.buffer_size} events is full")
                return
            self._pending.append(event)
            self._pump()
        except Exception:  # noqa: BLE001 - an event must never cost a message
            self.log.failure("could not queue a {kind} event for message {queue_id}", kind=kind, queue_id=queue_id)

    def _pump(self) -> None:
        while self._pending and self._in_flight < MAX_IN_FLIGHT:
            event = self._pending.popleft()
            self._in_flight += 1
            d = defer.maybeDeferred(self._post, event)
            d.addCallback(self._answered, event)
            d.addErrback(self._not_answered, event)
            d.addBoth(self._done)

    def _post(self, event: _Event) -> defer.Deferred[HTTPResponse]:
        event.attempts += 1
        headers = [
            ("Content-Type", "application/json"),
            ("User-Agent", USER_AGENT),
            ("Idempotency-Key", event.id),
        ]
        if self._token:
            headers.append(("Authorization", f"Bearer {self._token}"))
        if self._secret:
            headers.append(("X-Mailgate-Signature", signature(self._secret, event.body, int(self.clock.seconds()))))
        return self.transport.send(HTTPRequest("POST", self.url, tuple(headers), event.body, "events"))

    def _answered(self, response: HTTPResponse, event: _Event) -> None:
        status = response.status
        if 200 <= status < 300:
            return
        if status in (408, 429) or status >= 500:
            after = parse_retry_after(response.header("Retry-After"), self.clock.seconds())
            self._retry(event, f"HTTP {status}", after)
        else:
            self._drop(event, f"the events URL refused it (HTTP {status})")

    def _not_answered(self, failure: Any, event: _Event) -> None:
        self._retry(event, f"no answer ({failure.type.__name__})", None)

    def _retry(self, event: _Event, why: str, after: float | None) -> None:
        if self._stopping or event.attempts >= self.max_attempts:
            self._drop(event, f"{why} after {event.attempts} attempts")
            return
        delay = FIRST_RETRY * RETRY_FACTOR ** (event.attempts - 1)
        if after is not None:
            delay = max(delay, min(after, MAX_RETRY_AFTER))
        self._retries[event.id] = (event, self.clock.callLater(delay, self._requeue, event))

    def _requeue(self, event: _Event) -> None:
        del self._retries[event.id]
        self._pending.append(event)
        self._pump()

    def _done(self, _: Any) -> None:
        self._in_flight -= 1
        self._pump()
        if not self.held and self._idle:
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                waiter.callback(None)

    def _drop(self, event: _Event, why: str) -> None:
        self.log.warn(
            "event {event_id} ({kind} for message {queue_id}) dropped: {why}",
            event_id=event.id,
            kind=event.kind,
            queue_id=event.queue_id,
            why=why,
        )

    def idle(self) -> defer.Deferred[None]:
        """Fires when no event is held any more (at once if none is)."""
        if not self.held:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred(canceller=self._idle.remove)
        self._idle.append(waiter)
        return waiter

    def startService(self) -> None:
        super().startService()
        self._stopping = False

    def stopService(self) -> defer.Deferred[None]:
        """One last attempt for every held event (no more retries), for at most ``grace`` seconds."""
        super().stopService()
        self._stopping = True
        for event, timer in self._retries.values():
            timer.cancel()
            self._pending.append(event)
        self._retries.clear()
        self._pump()
        finished = self.idle()
        finished.addTimeout(self.grace, self.clock)
        return finished.addErrback(self._give_up)

    def _give_up(self, failure: Any) -> None:
        failure.trap(defer.TimeoutError)
        self.log.warn(
            "{count} events not sent: the events URL did not answer within {grace:g} s of shutdown",
            count=self.held,
            grace=self.grace,
        )
        self._pending.clear()


@implementer(IEventSink)
class NullEventSink(Service):
    """Used when ``[events]`` is not configured: every event is ignored."""

    def emit(
        self,
        kind: str,
        *,
        queue_id: str,
        account: str,
        sender: str,
        recipients: Sequence[str],
        provider: str | None = None,
        provider_message_id: str | None = None,
        reason: str | None = None,
        attempts: int = 0,
    ) -> None:
        return None


def make_event_sink(config: EventsConfig | None, reactor: Any, http_client: Any) -> EventSink | NullEventSink:
    """The sink ``[events]`` asks for, sending through the shared treq client."""
    if config is None:
        return NullEventSink()
    return EventSink(
        TreqTransport(http_client, reactor, config.timeout),
        reactor,
        config.url,
        token=config.token,
        signing_secret=config.signing_secret,
        buffer_size=config.buffer_size,
        max_attempts=config.max_attempts,
        grace=config.timeout,
    )
