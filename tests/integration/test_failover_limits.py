"""Failover past an open circuit and the per-account message rate, over real sockets.

A real mailgate (sync mode) with two webhook providers, each a real loopback
FakeEmailAPI; real clients (smtplib) over real TLS.  The circuit breakers'
time is a Clock the test advances, so a slow machine cannot make a cool-down
run out early.
"""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import tomli_w
from twisted.internet import reactor
from twisted.internet.task import Clock

from mailgate.circuit import CircuitState
from mailgate.cli import main as cli_main
from mailgate.testing import FakeEmailAPI, ScriptedResponse

from .conftest import (
    PASSWORDS,
    TEST_API_TOKEN,
    Gateway,
    running_gateway,
    send_with_smtplib,
    write_config,
)

COOLDOWN = 30.0
MESSAGE = b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: failover\r\n\r\nHello.\r\n"


@pytest_twisted.async_yield_fixture
async def two_providers(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Gateway, FakeEmailAPI]]:
    """A gateway whose route is ``api`` then ``backup``; circuits open after 2 failures
    for 30 s of a Clock (``gateway.breaker_clock``)."""
    monkeypatch.setenv("MAILGATE_TEST_API_TOKEN", TEST_API_TOKEN)
    primary, backup = FakeEmailAPI(), FakeEmailAPI()
    await primary.start(reactor)
    await backup.start(reactor)
    extra = f"""circuit_failures = 2
circuit_cooldown = {COOLDOWN}

[providers.backup]
type = "webhook"
url = "{backup.url}/v1/emails"
token = "env:MAILGATE_TEST_API_TOKEN"
circuit_failures = 2
circuit_cooldown = {COOLDOWN}
"""
    config_path = write_config(tmp_path, tls_files, primary.url, extra)
    assert cli_main(["account", "add", "--config", str(config_path), "alice", "--password", PASSWORDS["alice"]]) == 0
    try:
        async for gateway in running_gateway(config_path, primary, tls_files[2]):
            clock = Clock()
            for breaker in gateway.service.dispatcher.breakers.values():
                breaker.clock = clock
            gateway.breaker_clock = clock  # type: ignore[attr-defined]
            yield gateway, backup
    finally:
        await backup.stop()


async def send(gateway: Gateway) -> Any:
    return await send_with_smtplib(
        gateway, "submissions", "PLAIN", sender="alice@example.com", recipients=["bob@example.org"], message=MESSAGE
    )


@pytest_twisted.ensureDeferred
async def test_failover_while_down_and_back_when_the_circuit_closes(
    two_providers: tuple[Gateway, FakeEmailAPI],
) -> None:
    """While the first API answers 503, each message is delivered by the second; after two
    failures the first is not even asked; after the cool-down one probe reaches it, and
    once it answers, it carries the mail again."""
    gateway, backup = two_providers
    primary = gateway.api
    primary.respond(ScriptedResponse(status=503), ScriptedResponse(status=503))
    for expected in ("fake-1", "fake-2", "fake-3"):
        result = await send(gateway)
        assert (result.code, result.text) == (250, f"2.0.0 Ok: {expected}")
    assert len(primary.requests) == 2  # the third message skipped the open circuit
    assert len(backup.requests) == 3
    assert gateway.service.dispatcher.breakers["api"].state is CircuitState.OPEN

    gateway.breaker_clock.advance(COOLDOWN)  # type: ignore[attr-defined]
    result = await send(gateway)
    assert (result.code, result.text) == (250, "2.0.0 Ok: fake-3")  # the probe, answered by the first API
    assert gateway.service.dispatcher.breakers["api"].state is CircuitState.CLOSED
    result = await send(gateway)
    assert (result.code, result.text) == (250, "2.0.0 Ok: fake-4")
    assert (len(primary.requests), len(backup.requests)) == (4, 3)
    primary.assert_script_consumed()
    for request in primary.requests + backup.requests:
        assert request.json()["subject"] == "failover"


@pytest_twisted.ensureDeferred
async def test_all_routes_down_is_451_without_a_request(two_providers: tuple[Gateway, FakeEmailAPI]) -> None:
    """With both APIs failing, both circuits open; the next client gets 451 4.3.0 at once
    and neither API sees a request."""
    gateway, backup = two_providers
    gateway.api.respond(*[ScriptedResponse(status=503)] * 2)
    backup.respond(*[ScriptedResponse(status=500)] * 2)
    for _ in range(2):
        assert (await send(gateway)).code == 451
    result = await send(gateway)
    assert (result.code, result.text) == (
        451,
        "4.3.0 Temporary failure at mailgate: all routes down (circuit open for api, backup)",
    )
    assert (len(gateway.api.requests), len(backup.requests)) == (2, 2)
    # After the cool-down the first API is probed again and, answering, takes the message.
    gateway.breaker_clock.advance(COOLDOWN)  # type: ignore[attr-defined]
    assert (await send(gateway)).code == 250
    assert (len(gateway.api.requests), len(backup.requests)) == (3, 2)


@pytest_twisted.async_yield_fixture
async def rate_limited(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Gateway]:
    """A gateway where alice may send 2 messages a minute (in her accounts-file entry)."""
    monkeypatch.setenv("MAILGATE_TEST_API_TOKEN", TEST_API_TOKEN)
    api = FakeEmailAPI()
    await api.start(reactor)
    config_path = write_config(tmp_path, tls_files, api.url)
    assert cli_main(["account", "add", "--config", str(config_path), "alice", "--password", PASSWORDS["alice"]]) == 0
    accounts = tmp_path / "accounts.toml"
    document = tomllib.loads(accounts.read_text())
    document["accounts"]["alice"]["max_messages_per_minute"] = 2
    accounts.write_text(tomli_w.dumps(document))
    async for gateway in running_gateway(config_path, api, tls_files[2]):
        gateway.service.message_rate.clock = Clock()  # time stands still: no refill during the test
        yield gateway


@pytest_twisted.ensureDeferred
async def test_account_over_its_rate_gets_451_at_mail(rate_limited: Gateway) -> None:
    """smtplib sees 451 4.7.1 at MAIL FROM once the account is over its rate, on a new
    connection too; nothing more reaches the API."""
    for _ in range(2):
        assert (await send(rate_limited)).code == 250
    result = await send(rate_limited)
    assert (result.code, result.text) == (451, "4.7.1 Message rate limit exceeded for this account, try again later")
    assert len(rate_limited.api.requests) == 2
