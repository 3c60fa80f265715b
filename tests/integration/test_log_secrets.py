"""No secret reaches the log: the suite's main SMTP and API scenarios run through
the real gateway while every log event is captured, as text and as JSON (every
field, not only those in the message), tracebacks included; then no password,
API token, signing secret or admin token may appear, in clear or base64."""

from __future__ import annotations

import base64
import binascii
import re
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.logger import eventAsJSON, formatEvent, globalLogPublisher

from mailgate.testing import FakeEmailAPI, ScriptedResponse

from .conftest import (
    PASSWORDS,
    TEST_API_TOKEN,
    TEST_SIGNING_SECRET,
    Gateway,
    file_store_gateway,
    running_gateway,
    send_with_smtplib,
    write_passthrough_config,
)
from .test_observability import ADMIN, TEST_ADMIN_TOKEN, admin_url

WRONG_PASSWORD = "wrong-password-for-the-log-test"
PASSTHROUGH_USER = "passthrough-user-for-the-log-test"
PASSTHROUGH_TOKENS = ("passthrough-token-accepted-log-test", "passthrough-token-refused-log-test")
MESSAGE = b"From: alice@example.com\r\nSubject: hi\r\n\r\nhello\r\n"
SECRETS = (
    *PASSWORDS.values(),
    WRONG_PASSWORD,
    TEST_API_TOKEN,
    TEST_SIGNING_SECRET,
    TEST_ADMIN_TOKEN,
    PASSTHROUGH_USER,
    *PASSTHROUGH_TOKENS,
)
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{8,}={0,2}")


class CapturedLog:
    """Every event published while the test runs, rendered every way an observer could."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def text(self) -> str:
        parts = []
        for event in self.events:
            parts.append(formatEvent(event))
            parts.append(eventAsJSON(dict(event)))
            failure = event.get("log_failure")
            if failure is not None:
                parts.append(failure.getTraceback())
        return "\n".join(parts)


@pytest.fixture
def captured_log() -> Iterator[CapturedLog]:
    log = CapturedLog()
    globalLogPublisher.addObserver(log)
    try:
        yield log
    finally:
        globalLogPublisher.removeObserver(log)


def assert_no_secrets(log: CapturedLog) -> None:
    text = log.text()
    assert len(log.events) > 10, "the scenarios logged nothing: the test would prove nothing"
    decoded = []
    for run in _BASE64_RUN.findall(text):
        for candidate in (run, run[1:], run[2:], run[3:]):
            try:
                decoded.append(base64.b64decode(candidate + "=" * (-len(candidate) % 4)))
            except (binascii.Error, ValueError):
                continue
    blobs = b"\n".join(decoded)
    for secret in SECRETS:
        assert secret not in text, f"secret {secret!r} logged in clear"
        assert secret.encode() not in blobs, f"secret {secret!r} logged in base64"


@pytest_twisted.async_yield_fixture
async def logged_gateway(
    captured_log: CapturedLog, tmp_path: Path, tls_files: Any, monkeypatch: pytest.MonkeyPatch
) -> Any:
    async for gateway in file_store_gateway(tmp_path, tls_files, monkeypatch, ADMIN):
        yield gateway


@pytest_twisted.ensureDeferred
async def test_file_store_scenarios_log_no_secret(logged_gateway: Gateway, captured_log: CapturedLog) -> None:
    """PLAIN, LOGIN and CRAM-MD5 logins, wrong passwords, API 2xx/4xx/5xx/timeout with a
    bearer token and a signing secret, admin scrapes with right and wrong tokens, and a
    reload: none of their secrets is logged."""
    gateway = logged_gateway
    gateway.api.respond(
        ScriptedResponse(status=200, body={"id": "api-1"}),
        ScriptedResponse(status=422, body={"message": "Invalid 'To' address"}),
        ScriptedResponse(status=503, body=b"down"),
        ScriptedResponse(hang=True),
    )
    common = dict(sender="alice@example.com", recipients=["bob@example.org"], message=MESSAGE)
    results = [
        await send_with_smtplib(gateway, "submission", "PLAIN", **common),
        await send_with_smtplib(gateway, "submissions", "LOGIN", **common),
        await send_with_smtplib(gateway, "submission", "CRAM-MD5", **common),
        await send_with_smtplib(gateway, "submissions", "PLAIN", **common),
    ]
    assert [r.code for r in results] == [250, 554, 451, 451]
    assert results[3].text.startswith("4.4.1")  # the timeout
    for mechanism in ("PLAIN", "LOGIN", "CRAM-MD5"):
        with pytest.raises(smtplib.SMTPAuthenticationError):
            await send_with_smtplib(gateway, "submission", mechanism, password=WRONG_PASSWORD, **common)
    for token in (TEST_ADMIN_TOKEN, WRONG_PASSWORD):
        response = await treq.get(
            admin_url(gateway, "/metrics"), headers={"Authorization": f"Bearer {token}"}, persistent=False
        )
        await response.content()
    assert gateway.service.reloader.reload()
    assert [r.headers["authorization"] for r in gateway.api.requests] == [f"Bearer {TEST_API_TOKEN}"] * 4
    assert_no_secrets(captured_log)


@pytest_twisted.async_yield_fixture
async def logged_passthrough_gateway(captured_log: CapturedLog, tmp_path: Path, tls_files: Any) -> Any:
    api = FakeEmailAPI()
    await api.start(reactor)
    config_path = write_passthrough_config(tmp_path, tls_files, api.url)
    async for gateway in running_gateway(config_path, api, tls_files[2]):
        yield gateway


@pytest_twisted.ensureDeferred
async def test_passthrough_logins_log_no_secret(
    logged_passthrough_gateway: Gateway, captured_log: CapturedLog
) -> None:
    """Passthrough logins (the password is the API token; the username may be one too)
    are neither logged on success nor on refusal by the API."""
    gateway = logged_passthrough_gateway
    gateway.api.respond(
        ScriptedResponse(status=200, body={"id": "ok-1"}),
        ScriptedResponse(status=401, body={"message": "Invalid token"}),
    )
    common = dict(user=PASSTHROUGH_USER, sender="a@example.com", recipients=["b@example.org"], message=MESSAGE)
    accepted = await send_with_smtplib(gateway, "submissions", "PLAIN", password=PASSTHROUGH_TOKENS[0], **common)
    refused = await send_with_smtplib(gateway, "submission", "LOGIN", password=PASSTHROUGH_TOKENS[1], **common)
    assert (accepted.code, refused.code) == (250, 554)
    assert [r.headers["authorization"] for r in gateway.api.requests] == [f"Bearer {t}" for t in PASSTHROUGH_TOKENS]
    assert_no_secrets(captured_log)
