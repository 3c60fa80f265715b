"""Fakes shipped for mailgate's tests and for its users' tests.

:class:`FakeEmailAPI` is a real ``twisted.web`` server on a loopback port that
records every request and answers from a script of responses, with the faults
real APIs produce: error statuses, ``Retry-After``, answers that never come,
connection resets.  Scripted responses that were never used fail
:meth:`FakeEmailAPI.assert_script_consumed`, so a test cannot pass by never
reaching the API (buildbot's fake HTTP service does the same).
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from email import policy as email_policy
from email.parser import BytesParser
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from mailgate.providers.multipart import FormFile


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = field(repr=False)

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> list[tuple[str, str | FormFile]]:
        """The body as ``multipart/form-data`` fields, in order (:func:`decode_form`)."""
        return decode_form(self.body, self.headers.get("content-type", ""))


def decode_form(body: bytes, content_type: str) -> list[tuple[str, str | FormFile]]:
    """Fields of a ``multipart/form-data`` body (RFC 7578), read by the stdlib MIME parser.

    Text fields are UTF-8 strings, file fields :class:`FormFile`.  Deliberately
    not mailgate's own encoder run backwards: an independent reader is what
    shows the encoding is right.
    """
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1")
    message = BytesParser(policy=email_policy.HTTP).parsebytes(head + body)
    if not message.is_multipart() or message.get_content_type() != "multipart/form-data":
        raise ValueError(f"not a multipart/form-data body: {content_type!r}")
    fields: list[tuple[str, str | FormFile]] = []
    for part in message.iter_parts():
        # The header object's parser, not get_param(): the legacy one mis-splits a
        # quoted-string that ends in an escaped backslash.
        params = part["content-disposition"].params
        name = _param_text(params.get("name"))
        filename = params.get("filename")
        data = part.get_payload(decode=True)
        if filename is None:
            fields.append((name, data.decode("utf-8")))
        else:
            fields.append((name, FormFile(_param_text(filename), part.get_content_type(), data)))
    return fields


def _param_text(value: Any) -> str:
    """A header parameter as text: raw UTF-8 octets arrive surrogate-escaped."""
    return str(value).encode("utf-8", "surrogateescape").decode("utf-8")


@dataclass(frozen=True)
class ScriptedResponse:
    """One answer: a status and body, or a fault (``hang`` never answers, ``reset`` drops the connection)."""

    status: int = 200
    body: Any = None
    headers: tuple[tuple[str, str], ...] = ()
    hang: bool = False
    reset: bool = False


class _Recorder(Resource):
    isLeaf = True

    def __init__(self, api: FakeEmailAPI):
        super().__init__()
        self.api = api

    def render(self, request: Any) -> Any:
        api = self.api
        headers = {
            name.decode("latin-1").lower(): b", ".join(values).decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        recorded = RecordedRequest(
            method=request.method.decode("ascii"),
            path=request.uri.decode("latin-1"),
            headers=headers,
            body=request.content.read(),
        )
        api.requests.append(recorded)
        script = api.script.popleft() if api.script else ScriptedResponse(body={"id": f"fake-{len(api.requests)}"})
        if api.received_waiters:
            waiters, api.received_waiters = api.received_waiters, []
            for waiter in waiters:
                waiter.callback(recorded)
        if script.hang:
            api.hanging.append(request)
            return NOT_DONE_YET
        if script.reset:
            request.channel.transport.abortConnection()
            return NOT_DONE_YET
        request.setResponseCode(script.status)
        for name, value in script.headers:
            request.setHeader(name, value)
        body = script.body
        if isinstance(body, bytes):
            return body
        request.setHeader("Content-Type", "application/json")
        return json.dumps(body if body is not None else {}).encode("utf-8")


class FakeEmailAPI:
    """A loopback HTTP API that records requests and answers from a script."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.script: deque[ScriptedResponse] = deque()
        self.hanging: list[Any] = []
        self.received_waiters: list[defer.Deferred[RecordedRequest]] = []
        self.port: Any = None

    def respond(self, *responses: ScriptedResponse) -> None:
        """Queue answers for the next requests; once used up, requests get 200 ``{"id": ...}``."""
        self.script.extend(responses)

    def next_request(self) -> defer.Deferred[RecordedRequest]:
        waiter: defer.Deferred[RecordedRequest] = defer.Deferred()
        self.received_waiters.append(waiter)
        return waiter

    def assert_script_consumed(self) -> None:
        assert not self.script, f"scripted responses never requested: {list(self.script)}"

    async def start(self, reactor: Any) -> str:
        """Listen on 127.0.0.1 (a free port); returns the base URL."""
        site = Site(_Recorder(self))
        site.noisy = False
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        return self.url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    async def stop(self) -> None:
        for request in self.hanging:
            if request.channel is not None:
                request.channel.transport.abortConnection()
        self.hanging.clear()
        if self.port is not None:
            await self.port.stopListening()
            self.port = None
