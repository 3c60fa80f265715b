"""Fixtures of the adversarial suite: a real mailgate on loopback, and the invariants.

Per-client limits exempt loopback by default (README.rst, "Defences and
limits"); here ``exempt_networks = []`` makes them apply to the test clients.
A module sets its own limits by overriding the ``gateway_limits`` fixture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from mailgate import smtp
from tests.integration.conftest import file_store_gateway, make_tls_files

from .invariants import ROLES, Invariants

ADVERSARIAL_LIMITS = "exempt_networks = []"


@pytest.fixture
def gateway_limits() -> str:
    """Lines added to the gateway's [limits] table."""
    return ADVERSARIAL_LIMITS


@pytest_twisted.async_yield_fixture
async def gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gateway_limits: str) -> Any:
    async for running in file_store_gateway(tmp_path, make_tls_files(tmp_path), monkeypatch, limits=gateway_limits):
        yield running


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> list[smtp.SMTPSession]:
    """Every server-side session opened during the test."""
    opened: list[smtp.SMTPSession] = []
    original = smtp.SMTPSession.connectionMade

    def recording(self: smtp.SMTPSession) -> None:
        opened.append(self)
        original(self)

    monkeypatch.setattr(smtp.SMTPSession, "connectionMade", recording)
    return opened


@pytest.fixture
def inv(gateway: Any, logged_errors: Any, sessions: list[smtp.SMTPSession]) -> Any:
    invariants = Invariants(gateway, logged_errors, sessions)
    invariants.start()
    yield invariants
    for client in invariants.clients:
        client.close()
    if invariants._sampler.running:
        invariants._sampler.stop()


@pytest.fixture(params=ROLES)
def role(request: pytest.FixtureRequest) -> str:
    """Each case runs on the submission (STARTTLS), submissions (implicit TLS) and relay listeners."""
    return request.param
