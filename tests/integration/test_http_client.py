"""The HTTP client every provider shares, against a real loopback API."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor

from mailgate.providers.base import HTTPRequest
from mailgate.testing import FakeEmailAPI, ScriptedResponse
from mailgate.transports import TreqTransport, make_http_client


@pytest_twisted.ensureDeferred
async def test_cookies_an_api_sets_never_go_back() -> None:
    """An API's Set-Cookie is not returned with the next request, which may carry
    another account's credentials and message: no state passes between requests."""
    api = FakeEmailAPI()
    await api.start(reactor)
    client, pool = make_http_client(reactor)
    transport = TreqTransport(client, reactor, 10)
    try:
        api.respond(ScriptedResponse(headers=(("Set-Cookie", "route=backend-7; Path=/"),)))
        for account in ("alice", "bob"):
            request = HTTPRequest(
                provider="api",
                method="POST",
                url=f"{api.url}/v1/emails",
                headers=(("Authorization", f"Bearer {account}-token-not-a-secret"), ("Content-Type", "application/json")),
                body=b"{}",
            )
            response = await transport.send(request)
            assert response.status == 200
        first, second = api.requests
        assert second.headers["authorization"] == "Bearer bob-token-not-a-secret"
        assert "cookie" not in first.headers and "cookie" not in second.headers
    finally:
        await pool.closeCachedConnections()
        await api.stop()
