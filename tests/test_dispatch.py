"""The dispatcher and transports: failover along the route, timeouts on a Clock,
the treq transport against a stub API, the capture folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailgate.accounts.account import Account
from mailgate.dispatch import Dispatcher, Route
from mailgate.interfaces import IDeliverer, ITransport
from mailgate.message import parse_message
from mailgate.outcome import Delivered, Failed, Retry
from mailgate.providers.base import HTTPResponse
from mailgate.providers.webhook import WebhookProvider
from mailgate.transports import APITimeout, CaptureTransport, TreqTransport

RAW = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
EMAIL = parse_message(RAW, "a@example.com", ("b@example.org",))


@implementer(ITransport)
class ScriptedTransport:
    """Answers each request with the next scripted response or exception."""

    def __init__(self, *answers: Any):
        self.answers = list(answers)
        self.sent: list[Any] = []

    def send(self, request: Any) -> defer.Deferred[HTTPResponse]:
        self.sent.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)


def ok(identifier: str) -> HTTPResponse:
    return HTTPResponse(200, (), json.dumps({"id": identifier}).encode())


def route(name: str, transport: ScriptedTransport) -> Route:
    return Route(WebhookProvider(name, {"url": f"https://{name}.example/v1"}), transport)


def deliver(dispatcher: Dispatcher, account: Account = Account(name="a")) -> Any:
    return dispatcher.deliver(EMAIL, account, "QID").result


def test_dispatcher_provides_interface() -> None:
    """The dispatcher is an IDeliverer; the transports are ITransports."""
    dispatcher = Dispatcher({}, (), Clock())
    assert verifyObject(IDeliverer, dispatcher)
    assert verifyObject(ITransport, CaptureTransport(Path("/nonexistent")))
    assert verifyObject(ITransport, TreqTransport(object(), Clock(), 1))


def test_first_provider_delivers() -> None:
    """When the first provider accepts, the second is never asked."""
    first, second = ScriptedTransport(ok("one")), ScriptedTransport(ok("two"))
    dispatcher = Dispatcher({"p1": route("p1", first), "p2": route("p2", second)}, ("p1", "p2"), Clock())
    assert deliver(dispatcher) == Delivered("p1", "one")
    assert second.sent == []


def test_transient_failure_fails_over() -> None:
    """A 503 or a connection error moves the message to the next provider on the route."""
    first = ScriptedTransport(HTTPResponse(503, (), b""))
    second = ScriptedTransport(error.ConnectionRefusedError())
    third = ScriptedTransport(ok("three"))
    providers = {"p1": route("p1", first), "p2": route("p2", second), "p3": route("p3", third)}
    dispatcher = Dispatcher(providers, ("p1", "p2", "p3"), Clock())
    assert deliver(dispatcher) == Delivered("p3", "three")


def test_permanent_rejection_stops_the_route() -> None:
    """A content rejection is final: it is not retried elsewhere (the next API would only repeat it)."""
    first, second = ScriptedTransport(HTTPResponse(400, (), b'{"message": "no"}')), ScriptedTransport(ok("x"))
    dispatcher = Dispatcher({"p1": route("p1", first), "p2": route("p2", second)}, ("p1", "p2"), Clock())
    assert deliver(dispatcher) == Failed("p1", "HTTP 400: no", 554, "5.6.0")
    assert second.sent == []


def test_all_transient_gives_the_last_retry() -> None:
    """When every provider fails transiently the client is told to retry (451)."""
    dispatcher = Dispatcher(
        {"p1": route("p1", ScriptedTransport(HTTPResponse(500, (), b""))), "p2": route("p2", ScriptedTransport(APITimeout("no answer within 30 s")))},
        ("p1", "p2"),
        Clock(),
    )
    outcome = deliver(dispatcher)
    assert outcome == Retry("p2", "no answer within 30 s", "4.4.1", ambiguous=True)
    assert outcome.reply().code == 451


def test_ambiguous_failure_does_not_fail_over() -> None:
    """A timeout or a reset after sending may mean the API took the message: trying the
    next provider could deliver it twice, so the client is told to retry instead."""
    second = ScriptedTransport(ok("two"))
    for failure in (APITimeout("no answer within 30 s"), error.ConnectionLost()):
        dispatcher = Dispatcher(
            {"p1": route("p1", ScriptedTransport(failure)), "p2": route("p2", second)}, ("p1", "p2"), Clock()
        )
        outcome = deliver(dispatcher)
        assert (outcome.provider, outcome.ambiguous, outcome.reply().code) == ("p1", True, 451)
    assert second.sent == []


def test_account_route_overrides_default(logged_errors: Any) -> None:
    """An account's own route is used instead of the server's; an unknown name is a logged,
    transient error (451 4.3.5), so a misconfiguration never bounces mail."""
    used = ScriptedTransport(ok("b"))
    dispatcher = Dispatcher({"p1": route("p1", ScriptedTransport()), "p2": route("p2", used)}, ("p1",), Clock())
    assert deliver(dispatcher, Account(name="x", route=("p2",))) == Delivered("p2", "b")
    missing = deliver(dispatcher, Account(name="y", route=("gone",)))
    assert (missing.reply().code, missing.enhanced) == (451, "4.3.5")
    [event] = logged_errors.take()
    assert event["name"] == "gone"


class Hanging(Resource):
    isLeaf = True

    def render(self, request: Any) -> Any:
        return NOT_DONE_YET


class Answering(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes | None, bytes]] = []

    def render(self, request: Any) -> bytes:
        self.seen.append((request.method, request.getHeader(b"authorization"), request.content.read()))
        request.setResponseCode(202)
        request.setHeader(b"Retry-After", b"5")
        return b'{"id": "stub-1"}'


def test_treq_transport_sends_and_reads() -> None:
    """The treq transport sends method, headers and body, and returns status, headers and body."""
    resource = Answering()
    stub = StubTreq(resource)
    transport = TreqTransport(stub, Clock(), 30)
    [request] = WebhookProvider("p", {"url": "https://api.example/v1", "token": "tk"}).build_requests(
        EMAIL, Account(name="a"), "Q"
    )
    result = transport.send(request)
    stub.flush()
    response = result.result
    assert response.status == 202
    assert response.header("retry-after") == "5"
    assert response.json() == {"id": "stub-1"}
    assert resource.seen == [(b"POST", b"Bearer tk", request.body)]


def test_treq_transport_times_out_on_the_clock() -> None:
    """An API that never answers fails with APITimeout exactly when the clock passes the timeout."""
    clock = Clock()
    stub = StubTreq(Hanging())
    transport = TreqTransport(stub, clock, 30)
    [request] = WebhookProvider("p", {"url": "https://api.example/v1"}).build_requests(EMAIL, Account(name="a"), "Q")
    result = transport.send(request)
    stub.flush()
    clock.advance(29.9)
    assert not result.called
    clock.advance(0.2)
    failure = result.result
    result.addErrback(lambda _: None)
    assert failure.check(APITimeout)
    assert str(failure.value) == "no answer within 30 s"


def test_capture_writes_redacted_request(tmp_path: Path) -> None:
    """The capture transport writes the request as JSON, credentials redacted, and answers 200."""
    transport = CaptureTransport(tmp_path / "captured")
    [request] = WebhookProvider("cap", {"url": "https://api.example/v1", "token": "secret-token"}).build_requests(
        EMAIL, Account(name="a"), "QID9"
    )
    response = transport.send(request).result
    assert response.status == 200 and response.json()["id"] == "QID9"
    written = (tmp_path / "captured" / "QID9.json").read_text()
    assert "secret-token" not in written
    document = json.loads(written)
    assert ["Authorization", "<redacted>"] in document["headers"]
    assert document["body"]["subject"] == "hi"
    assert document["url"] == "https://api.example/v1"
    assert list((tmp_path / "captured").iterdir()) == [tmp_path / "captured" / "QID9.json"]


class Oversized(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setResponseCode(200)
        return b"x" * (2 * 1024 * 1024)


def test_accepted_with_unreadable_body_is_delivered() -> None:
    """An API that answers 2xx but whose body cannot be read (over 1 MiB) took the
    message: it counts as delivered under mailgate's id, never as a failure."""
    stub = StubTreq(Oversized())
    transport = TreqTransport(stub, Clock(), 30)
    provider = WebhookProvider("p", {"url": "https://api.example/v1"})
    [request] = provider.build_requests(EMAIL, Account(name="a"), "QID5")
    result = transport.send(request)
    stub.flush()
    response = result.result
    assert (response.status, response.body) == (200, b"")
    assert provider.classify(request, response) == Delivered("p", "QID5")
