"""Where built requests go: HTTPS through treq, or a capture folder.

Only the dispatcher calls these; adapters never do I/O.  Both implement
:class:`~mailgate.interfaces.ITransport`.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import treq
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from mailgate.atomicfile import write_atomically
from mailgate.interfaces import ITransport
from mailgate.providers.base import HTTPRequest, HTTPResponse

MAX_RESPONSE_BODY = 1024 * 1024


class ResponseTooLarge(Exception):
    """The API answered with more than :data:`MAX_RESPONSE_BODY` octets."""


class APITimeout(Exception):
    """The API did not answer in time."""


@implementer(ITransport)
class TreqTransport:
    """HTTPS requests through one shared treq ``HTTPClient`` (persistent pool).

    The timeout covers the whole exchange, response body included, and is
    scheduled on the injected clock so tests control it.
    """

    def __init__(self, client: Any, clock: Any, timeout: float):
        self.client = client
        self.clock = clock
        self.timeout = timeout

    def send(self, request: HTTPRequest) -> defer.Deferred[HTTPResponse]:
        headers = Headers()
        for name, value in request.headers:
            headers.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
        timed_out = []

        def on_timeout() -> None:
            timed_out.append(True)
            exchange.cancel()

        exchange = defer.ensureDeferred(self._exchange(request, headers))
        timer = self.clock.callLater(self.timeout, on_timeout)

        def finished(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if timed_out and isinstance(result, Failure):
                # Cancelling surfaces as CancelledError or, mid-response, as treq's
                # ResponseNeverReceived wrapping it: either way the API was too slow.
                raise APITimeout(f"no answer within {self.timeout:g} s")
            return result

        return exchange.addBoth(finished)

    async def _exchange(self, request: HTTPRequest, headers: Headers) -> HTTPResponse:
        response = await self.client.request(
            request.method, request.url, headers=headers, data=request.body
        )
        chunks: list[bytes] = []
        received = 0

        def collect(data: bytes) -> None:
            nonlocal received
            received += len(data)
            if received > MAX_RESPONSE_BODY:
                raise ResponseTooLarge(f"response body over {MAX_RESPONSE_BODY} octets")
            chunks.append(data)

        await treq.collect(response, collect)
        response_headers = tuple(
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, values in response.headers.getAllRawHeaders()
            for value in values
        )
        return HTTPResponse(response.code, response_headers, b"".join(chunks))


@implementer(ITransport)
class CaptureTransport:
    """Writes each request as a JSON file instead of sending it (the ``capture`` provider).

    A newcomer sees exactly what an API would receive.  Credential headers are
    redacted.  Files are written to a temporary name and renamed, so a reader
    never sees half a file; the answer is a 200 with the file's id.
    """

    def __init__(self, folder: Path):
        self.folder = folder

    def send(self, request: HTTPRequest) -> defer.Deferred[HTTPResponse]:
        return defer.maybeDeferred(self._write, request)

    def _write(self, request: HTTPRequest) -> HTTPResponse:
        self.folder.mkdir(parents=True, exist_ok=True)
        key = next((v for n, v in request.headers if n == "Idempotency-Key"), None) or os.urandom(8).hex()
        try:
            body: Any = json.loads(request.body)
        except ValueError:
            body = request.body.decode("utf-8", "replace")
        document = {
            "captured_at": datetime.now(UTC).isoformat(),
            "provider": request.provider,
            "method": request.method,
            "url": request.url,
            "headers": [[name, value] for name, value in request.redacted_headers()],
            "body": body,
        }
        target = self.folder / f"{key}.json"
        data = json.dumps(document, ensure_ascii=False, indent=2).encode("utf-8")
        write_atomically(target, data, mode=0o640, durable=False)
        payload = json.dumps({"id": key, "file": str(target)}).encode()
        return HTTPResponse(200, (("Content-Type", "application/json"),), payload)
