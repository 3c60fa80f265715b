"""The events webhook: the document, its signature, retries, the bounded buffer.

The sink's own timers run on a Clock; where it talks HTTP, it talks to a real
loopback FakeEmailAPI through the real treq transport.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, error, reactor
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher
from zope.interface.verify import verifyObject

from mailgate.config import EventsConfig
from mailgate.events import EventSink, NullEventSink, event_document, make_event_sink
from mailgate.interfaces import IEventSink
from mailgate.providers.base import HTTPResponse
from mailgate.providers.webhook import verify_signature
from mailgate.testing import FakeEmailAPI, ScriptedResponse
from mailgate.transports import TreqTransport, make_http_client

TEST_EVENTS_TOKEN = "test-events-token-not-a-secret"
TEST_EVENTS_SECRET = "test-events-signing-secret-not-a-secret"
FAILED = {
    "queue_id": "QID1",
    "account": "alice",
    "sender": "alice@example.com",
    "recipients": ["bob@example.org", "carol@example.net"],
    "provider": "main",
    "reason": "HTTP 400: invalid recipient",
    "attempts": 3,
}


class Warnings:
    """Collects the sink's warnings."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace", "").startswith("mailgate.events"):
            self.events.append(event)

    def texts(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(event) for event in self.events]


@pytest.fixture
def warnings() -> Any:
    observer = Warnings()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


class Scripted:
    """An ITransport answering from a list: HTTPResponse, an exception, or None (never)."""

    def __init__(self, *answers: Any):
        self.answers = list(answers)
        self.requests: list[Any] = []
        self.unanswered: list[defer.Deferred[Any]] = []

    def send(self, request: Any) -> defer.Deferred[Any]:
        self.requests.append(request)
        answer = self.answers.pop(0) if self.answers else HTTPResponse(200, (), b"")
        if answer is None:
            d: defer.Deferred[Any] = defer.Deferred()
            self.unanswered.append(d)
            return d
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)


def status(code: int, *headers: tuple[str, str]) -> HTTPResponse:
    return HTTPResponse(code, headers, b"")


def sink(transport: Any, clock: Clock, **kwargs: Any) -> EventSink:
    return EventSink(transport, clock, "https://events.example/hook", **kwargs)


# -- the document ----------------------------------------------------------------------


def test_document_schema() -> None:
    """Every field of mailgate.event.v1, with an ISO 8601 UTC timestamp in milliseconds."""
    document = event_document("EVT1", "failed", 1795348800.25, provider_message_id=None, **FAILED)
    assert document == {
        "schema": "mailgate.event.v1",
        "id": "EVT1",
        "type": "failed",
        "timestamp": "2026-11-22T12:00:00.250Z",
        "queue_id": "QID1",
        "account": "alice",
        "sender": "alice@example.com",
        "recipients": ["bob@example.org", "carol@example.net"],
        "provider": "main",
        "provider_message_id": None,
        "reason": "HTTP 400: invalid recipient",
        "attempts": 3,
    }


def test_sinks_provide_the_interface() -> None:
    """Both sinks are IEventSinks; the null sink accepts the same call and does nothing."""
    assert verifyObject(IEventSink, sink(Scripted(), Clock()))
    null = NullEventSink()
    assert verifyObject(IEventSink, null)
    assert null.emit("delivered", **FAILED) is None
    assert isinstance(make_event_sink(None, Clock(), object()), NullEventSink)


# -- against a real loopback API -----------------------------------------------------


@pytest_twisted.async_yield_fixture
async def api() -> AsyncIterator[FakeEmailAPI]:
    fake = FakeEmailAPI()
    await fake.start(reactor)
    client, pool = make_http_client(reactor)
    fake.client = client  # type: ignore[attr-defined]
    try:
        yield fake
    finally:
        await pool.closeCachedConnections()
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_posts_signed_event(api: FakeEmailAPI) -> None:
    """One POST with the JSON document, the bearer token, the event id as idempotency
    key and a signature the receiver can verify."""
    clock = Clock()
    clock.advance(1795348800)
    config = EventsConfig(
        url=api.url + "/events", token=TEST_EVENTS_TOKEN, signing_secret=TEST_EVENTS_SECRET, timeout=30
    )
    events = make_event_sink(config, reactor, api.client)  # type: ignore[attr-defined]
    assert isinstance(events, EventSink)
    events.clock = clock  # timestamps from the Clock
    received = api.next_request()
    events.emit("delivered", queue_id="QID7", account="alice", sender="a@example.com",
                recipients=["b@example.org"], provider="main", provider_message_id="pm-1", attempts=1)
    request = await received
    await events.idle()
    document = request.json()
    assert request.method == "POST" and request.path == "/events"
    assert document["type"] == "delivered" and document["schema"] == "mailgate.event.v1"
    assert (document["queue_id"], document["provider_message_id"], document["attempts"]) == ("QID7", "pm-1", 1)
    assert document["timestamp"] == "2026-11-22T12:00:00.000Z"
    assert request.headers["authorization"] == f"Bearer {TEST_EVENTS_TOKEN}"
    assert request.headers["idempotency-key"] == document["id"]
    assert request.headers["content-type"] == "application/json"
    assert verify_signature(TEST_EVENTS_SECRET, request.body, request.headers["x-mailgate-signature"], now=clock.seconds())


@pytest_twisted.ensureDeferred
async def test_retries_after_503_with_the_same_event_id(api: FakeEmailAPI, warnings: Warnings) -> None:
    """A 503 is retried after the backoff (on the sink's clock), with the same id and
    body and a fresh signature; nothing is dropped."""
    clock = Clock()
    transport = TreqTransport(api.client, reactor, 30)  # type: ignore[attr-defined]
    events = EventSink(transport, clock, api.url + "/events", signing_secret=TEST_EVENTS_SECRET)
    api.respond(ScriptedResponse(status=503))
    events.emit("failed", provider_message_id=None, **FAILED)
    first = await api.next_request()
    while not clock.getDelayedCalls():  # until the 503 is read and its retry scheduled
        await _tick()
    clock.advance(0.9)
    assert len(api.requests) == 1
    second_request = api.next_request()
    clock.advance(0.1)
    second = await second_request
    await events.idle()
    assert second.body == first.body
    assert second.headers["idempotency-key"] == first.headers["idempotency-key"]
    assert verify_signature(TEST_EVENTS_SECRET, second.body, second.headers["x-mailgate-signature"], now=clock.seconds())
    api.assert_script_consumed()
    assert warnings.events == []


def _tick() -> defer.Deferred[None]:
    """Let the reactor run one round (the response is read from a real socket)."""
    return deferLater(reactor, 0.01, lambda: None)


# -- retry policy and the buffer, with a scripted transport -----------------------------


def test_backoff_grows_and_gives_up_after_max_attempts(warnings: Warnings) -> None:
    """Retries wait 1, 4, 16 s...; after max_attempts the event is dropped with a warning
    that names the event and message but not the URL."""
    clock = Clock()
    transport = Scripted(*[status(500)] * 3)
    events = sink(transport, clock, max_attempts=3)
    events.emit("deferred", **FAILED)
    assert len(transport.requests) == 1
    clock.advance(1)
    assert len(transport.requests) == 2
    clock.advance(3.9)
    assert len(transport.requests) == 2
    clock.advance(0.1)
    assert len(transport.requests) == 3
    assert events.held == 0
    [text] = warnings.texts()
    event_id = json.loads(transport.requests[0].body)["id"]
    assert text == f"event {event_id} (deferred for message QID1) dropped: HTTP 500 after 3 attempts"
    assert "events.example" not in text


def test_timeouts_and_connection_errors_are_retried() -> None:
    """No answer (timeout, refused connection) is retried like a 5xx."""
    clock = Clock()
    transport = Scripted(error.ConnectionRefusedError(), error.TimeoutError(), status(204))
    events = sink(transport, clock)
    events.emit("delivered", **FAILED)
    clock.advance(1)
    clock.advance(4)
    assert len(transport.requests) == 3
    assert events.held == 0


def test_retry_after_is_honoured_within_a_cap() -> None:
    """A 429 with Retry-After waits at least that long (at most five minutes)."""
    clock = Clock()
    transport = Scripted(status(429, ("Retry-After", "30")), status(429, ("Retry-After", "99999")))
    events = sink(transport, clock)
    events.emit("delivered", **FAILED)
    clock.advance(29)
    assert len(transport.requests) == 1
    clock.advance(1)
    assert len(transport.requests) == 2
    clock.advance(299)
    assert len(transport.requests) == 2
    clock.advance(1)
    assert len(transport.requests) == 3


def test_client_errors_are_final(warnings: Warnings) -> None:
    """A 4xx other than 408/429 means the receiver refuses the event: no retry."""
    clock = Clock()
    transport = Scripted(status(400))
    events = sink(transport, clock)
    events.emit("failed", **FAILED)
    clock.advance(1000)
    assert len(transport.requests) == 1
    assert "refused it (HTTP 400)" in warnings.texts()[0]


def test_full_buffer_drops_new_events_with_a_warning(warnings: Warnings) -> None:
    """With the receiver hanging, events beyond the buffer are dropped (never blocking
    the caller); the held ones are sent once it answers."""
    clock = Clock()
    transport = Scripted(*[None] * 4)
    events = sink(transport, clock, buffer_size=6)
    for index in range(8):
        events.emit("delivered", **{**FAILED, "queue_id": f"Q{index}"})
    assert events.held == 6
    assert len(transport.requests) == 4  # a few in flight at once
    texts = warnings.texts()
    assert len(texts) == 2
    assert texts[0].endswith("(delivered for message Q6) dropped: the buffer of 6 events is full")
    for d in list(transport.unanswered):
        d.callback(status(200))
    assert events.held == 0
    sent = [json.loads(request.body)["queue_id"] for request in transport.requests]
    assert sent == ["Q0", "Q1", "Q2", "Q3", "Q4", "Q5"]


def test_emit_never_raises(logged_errors: Any) -> None:
    """A bad call is a logged bug, never an exception in the delivery path."""
    events = sink(Scripted(), Clock())
    assert events.emit("exploded", **FAILED) is None
    [event] = logged_errors.take()
    assert event["queue_id"] == "QID1"


def test_stop_makes_one_last_attempt_within_the_grace(warnings: Warnings) -> None:
    """At shutdown, events waiting for a retry are sent at once (no further retries); what
    is still unanswered after the grace period is given up with one warning."""
    clock = Clock()
    transport = Scripted(status(503), None)
    events = sink(transport, clock, grace=10)
    events.startService()
    events.emit("failed", **FAILED)
    assert events.held == 1 and len(transport.requests) == 1
    stopped = events.stopService()
    assert len(transport.requests) == 2
    assert not stopped.called
    clock.advance(10)
    assert stopped.called
    assert warnings.texts()[-1] == "1 events not sent: the events URL did not answer within 10 s of shutdown"
    assert clock.getDelayedCalls() == []


def test_stop_fires_at_once_when_nothing_is_held() -> None:
    """An idle sink stops immediately."""
    events = sink(Scripted(), Clock())
    events.startService()
    assert events.stopService().called
