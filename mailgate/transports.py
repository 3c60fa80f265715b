"""Where built requests go: HTTPS through treq, or a capture folder.

Only the dispatcher calls these; adapters never do I/O.  Both implement
:class:`~mailgate.interfaces.ITransport`.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

import treq
from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from mailgate.atomicfile import write_atomically
from mailgate.interfaces import ITransport
from mailgate.providers.base import HTTPRequest, HTTPResponse

MAX_RESPONSE_BODY = 1024 * 1024


class ResponseTooLarge(Exception):
    """The API answered with more than :data:`MAX_RESPONSE_BODY` octets."""


class APITimeout(Exception):
    """The API did not answer in time."""


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written at once.

    treq would wrap bytes in a FileBodyProducer, which writes from a cooperative
    task one reactor iteration later; the body is small and ready, so write it now.
    """

    def __init__(self, body: bytes):
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class NoCookies(CookieJar):
    """A cookie jar that keeps and sends nothing.

    treq's ``HTTPClient`` keeps one jar for all its requests, so a cookie an API
    sets (a load balancer's, a bot filter's) would go back with the next request
    to that host, whichever account's credentials and message it carries.  A
    request to an API stands alone; no state may pass from one account's
    requests to another's.  It also spares the stdlib cookie policy's work on
    every request.
    """

    def add_cookie_header(self, request: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass

    def set_cookie(self, cookie: Any) -> None:
        pass


def make_http_client(
    reactor: Any, connect_timeout: float = 10, trust_root: Any = None
) -> tuple[Any, Any]:
    """The one treq ``HTTPClient`` for all providers, and its persistent pool.

    Bodies are written with :class:`BytesProducer`; the pool keeps connections
    open between messages (closed by :meth:`HTTPConnectionPool.closeCachedConnections`);
    cookies are neither kept nor sent (:class:`NoCookies`).

    With ``trust_root`` (a private CA, :func:`mailgate.tls.trust_root_from_file`)
    the client trusts only that CA, and its pool keeps no connections: it serves
    one special endpoint, and has no one to close it at shutdown.
    """
    pool = HTTPConnectionPool(reactor, persistent=trust_root is None)
    pool.maxPersistentPerHost = 32
    pool.cachedConnectionTimeout = 120
    policy = BrowserLikePolicyForHTTPS(trustRoot=trust_root)
    agent = Agent(reactor, contextFactory=policy, pool=pool, connectTimeout=connect_timeout)
    return HTTPClient(agent, cookiejar=NoCookies(), data_to_body_producer=BytesProducer), pool


class _URI(EncodedURL):
    """A URL already in its URI form (IDNA host, percent-encoded path).

    treq converts every request's URL with ``to_uri()``, which runs the IDNA
    codec over each host label again (about half of treq's own cost per
    request); a provider URL is converted once, when first used, instead.
    """

    def to_uri(self) -> EncodedURL:
        return self


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
        self._urls: dict[str, EncodedURL] = {}

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

    def _encoded_url(self, url: str) -> EncodedURL:
        """Parse each provider URL once, not per request (hyperlink parsing is costly)."""
        encoded = self._urls.get(url)
        if encoded is None:
            encoded = self._urls[url] = _URI.from_text(EncodedURL.from_text(url).to_uri().to_text())
        return encoded

    async def _exchange(self, request: HTTPRequest, headers: Headers) -> HTTPResponse:
        # No redirects: an API that redirects a POST is misconfigured, and following
        # it could send the message (and credentials) elsewhere.  Unbuffered: the
        # body is collected below, with a size limit.
        response = await self.client.request(
            request.method,
            self._encoded_url(request.url),
            headers=headers,
            data=request.body,
            allow_redirects=False,
            unbuffered=True,
        )
        chunks: list[bytes] = []
        received = 0

        def collect(data: bytes) -> None:
            nonlocal received
            received += len(data)
            if received > MAX_RESPONSE_BODY:
                raise ResponseTooLarge(f"response body over {MAX_RESPONSE_BODY} octets")
            chunks.append(data)

        try:
            await treq.collect(response, collect)
        except Exception:
            if 200 <= response.code < 300:
                # The API accepted the message; only its answer's body is lost (too
                # large, connection reset, timeout).  Reporting a failure would make
                # the client send the message again.
                chunks = []
            else:
                raise
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
