"""The ``http`` account store against a real HTTPS auth endpoint on loopback.

The endpoint is a twisted.web resource behind real TLS (a trustme CA given to
mailgate as ``ca_file``); clients are smtplib over STARTTLS.  It answers by
username: an account, 401, 500, an unusable account, or nothing until the
test releases it (the slow endpoint).
"""

from __future__ import annotations

import json
import smtplib
import ssl
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from mailgate.testing import FakeEmailAPI
from mailgate.tls import server_context_factory

from .conftest import Gateway, running_gateway, write_config

# Throwaway test credentials, not secrets.
ENDPOINT_TOKEN = "endpoint-test-token"
PASSWORD = "http-user-test-password"
MESSAGE = b"From: <alice@example.com>\r\nTo: <bob@example.org>\r\nSubject: hi\r\n\r\nbody\r\n"


def account(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "route": ["api"],
        "allowed_senders": ["@example.com"],
        "providers": {"api": {"token": f"{name}-own-api-token"}},
    }


class AuthEndpoint(Resource):
    """POST /login: answers by username; ``slow-*`` users wait until :meth:`release`."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.logins: list[tuple[str, dict[str, str]]] = []
        self.held: dict[str, Any] = {}
        self.arrived: dict[str, defer.Deferred[None]] = {}

    def render_POST(self, request: Any) -> Any:
        body = json.loads(request.content.read())
        headers = {k.decode().lower(): b",".join(v).decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        user, password = body["username"], body["password"]
        self.logins.append((user, headers))
        request.setHeader("Content-Type", "application/json")
        if headers.get("authorization") != f"Bearer {ENDPOINT_TOKEN}":
            request.setResponseCode(500)
            return b'{"error": "mailgate did not authenticate"}'
        if user.startswith("slow-"):
            self.held[user] = request
            if user in self.arrived:
                self.arrived.pop(user).callback(None)
            return NOT_DONE_YET
        if user == "down":
            request.setResponseCode(500)
            return b'{"error": "database unavailable"}'
        if user == "broken":
            return json.dumps({"name": "broken", "route": ["no-such-provider"]}).encode()
        if password != PASSWORD:
            request.setResponseCode(401)
            return b'{"error": "invalid credentials"}'
        return json.dumps(account(user)).encode()

    def arrival(self, user: str) -> defer.Deferred[None]:
        waiter: defer.Deferred[None] = defer.Deferred()
        self.arrived[user] = waiter
        return waiter

    def release(self, user: str) -> None:
        request = self.held.pop(user)
        request.write(json.dumps(account(user)).encode())
        request.finish()


async def http_store_gateway(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], timeout: float
) -> AsyncIterator[tuple[Gateway, AuthEndpoint]]:
    chain, key, ca = tls_files
    endpoint = AuthEndpoint()
    site = Site(endpoint)
    site.noisy = False
    tls = server_context_factory(chain, key)
    port = await SSL4ServerEndpoint(reactor, 0, tls, interface="127.0.0.1").listen(site)
    api = FakeEmailAPI()
    await api.start(reactor)
    config = write_config(tmp_path, tls_files, api.url)
    store = (
        f'store = "http"\nurl = "https://localhost:{port.getHost().port}/login"\n'
        f'ca_file = "{ca}"\ntoken = "{ENDPOINT_TOKEN}"\ntimeout = {timeout}\n'
    )
    config.write_text(config.read_text().replace('store = "file"\npath = "accounts.toml"\n', store))
    try:
        async with aclosing(running_gateway(config, api, ca)) as running:
            async for gateway in running:
                yield gateway, endpoint
    finally:
        for request in endpoint.held.values():
            if request.channel is not None:
                request.channel.transport.abortConnection()
        await port.stopListening()
        await api.stop()


@pytest.fixture(autouse=True)
def api_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILGATE_TEST_API_TOKEN", "server-default-api-token")


@pytest_twisted.async_yield_fixture
async def http_gateway(tmp_path: Path, tls_files: tuple[Path, Path, Path]) -> Any:
    async for pair in http_store_gateway(tmp_path, tls_files, timeout=60):
        yield pair


@pytest_twisted.async_yield_fixture
async def impatient_gateway(tmp_path: Path, tls_files: tuple[Path, Path, Path]) -> Any:
    async for pair in http_store_gateway(tmp_path, tls_files, timeout=1):
        yield pair


def login_and_send(gateway: Gateway, user: str, password: str, mechanism: str = "PLAIN") -> tuple[int, int | None]:
    """smtplib over STARTTLS: (reply code to AUTH, reply code to the final dot or None)."""
    context = ssl.create_default_context(cafile=str(gateway.ca_path))
    with smtplib.SMTP("127.0.0.1", gateway.ports["submission"], timeout=120) as client:
        client.ehlo("client.example")
        client.starttls(context=context)
        client.ehlo("client.example")
        client.user, client.password = user, password
        authobject = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        try:
            code, _ = client.auth(mechanism, authobject, initial_response_ok=mechanism == "PLAIN")
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code, None
        client.mail("alice@example.com")
        client.rcpt("bob@example.org")
        data_code, _ = client.data(MESSAGE)
        return code, data_code


async def attempt(gateway: Gateway, user: str, password: str = PASSWORD, mechanism: str = "PLAIN") -> tuple[int, int | None]:
    return await threads.deferToThread(login_and_send, gateway, user, password, mechanism)


@pytest_twisted.ensureDeferred
async def test_endpoint_answers_become_smtp_replies(http_gateway: tuple[Gateway, AuthEndpoint], logged_errors: Any) -> None:
    """200 logs in with the endpoint's account (its own API token is used), 401 is 535,
    500 is 454, and an unusable account is 454 with an error naming the field."""
    gateway, endpoint = http_gateway
    assert await attempt(gateway, "alice") == (235, 250)
    assert gateway.api.requests[0].headers["authorization"] == "Bearer alice-own-api-token"
    assert gateway.api.requests[0].json()["account"] == "alice"
    assert await attempt(gateway, "alice", "wrong-password", "LOGIN") == (535, None)
    assert await attempt(gateway, "down") == (454, None)
    assert logged_errors.take() == []
    assert await attempt(gateway, "broken") == (454, None)
    [error] = logged_errors.take()
    assert (error["key"], error["message"]) == ("route", "no provider named 'no-such-provider'")
    assert [user for user, _ in endpoint.logins] == ["alice", "alice", "down", "broken"]
    assert all(headers["content-type"] == "application/json" for _, headers in endpoint.logins)


@pytest_twisted.ensureDeferred
async def test_cram_md5_is_not_offered(http_gateway: tuple[Gateway, AuthEndpoint]) -> None:
    """The endpoint only checks passwords, so CRAM-MD5 is not advertised."""
    gateway, _ = http_gateway

    def mechanisms() -> str:
        context = ssl.create_default_context(cafile=str(gateway.ca_path))
        with smtplib.SMTP("127.0.0.1", gateway.ports["submission"], timeout=60) as client:
            client.starttls(context=context)
            client.ehlo("client.example")
            return client.esmtp_features["auth"]

    assert (await threads.deferToThread(mechanisms)).split() == ["PLAIN", "LOGIN"]


@pytest_twisted.ensureDeferred
async def test_slow_endpoint_does_not_block_other_sessions(http_gateway: tuple[Gateway, AuthEndpoint]) -> None:
    """While one login waits on the endpoint, a cached login and a fresh one both complete;
    the waiting login completes once the endpoint answers."""
    gateway, endpoint = http_gateway
    assert await attempt(gateway, "alice") == (235, 250)
    arrived = endpoint.arrival("slow-sam")
    slow = defer.ensureDeferred(attempt(gateway, "slow-sam"))
    await arrived
    assert await attempt(gateway, "alice") == (235, 250)  # from the cache
    assert await attempt(gateway, "carol") == (235, 250)  # asked while slow-sam waits
    assert not slow.called and "slow-sam" in endpoint.held
    endpoint.release("slow-sam")
    assert await slow == (235, 250)
    assert [user for user, _ in endpoint.logins] == ["alice", "slow-sam", "carol"]
    assert [r.headers["authorization"] for r in gateway.api.requests] == [
        "Bearer alice-own-api-token", "Bearer alice-own-api-token", "Bearer carol-own-api-token",
        "Bearer slow-sam-own-api-token",
    ]  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_endpoint_timeout_is_a_temporary_failure(impatient_gateway: tuple[Gateway, AuthEndpoint]) -> None:
    """An endpoint that does not answer within the timeout gives 454 4.7.0, and nothing is cached."""
    gateway, endpoint = impatient_gateway
    assert await attempt(gateway, "slow-tim") == (454, None)
    assert "slow-tim" in endpoint.held
