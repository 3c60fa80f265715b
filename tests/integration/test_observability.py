"""The running gateway seen from outside: the admin listener's readiness and
metrics after real SMTP traffic, and the log lines that trace a message."""

from __future__ import annotations

import re
import smtplib
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, task
from twisted.logger import formatEvent, globalLogPublisher

from mailgate.testing import ScriptedResponse

from .conftest import PASSWORDS, Gateway, file_store_gateway, send_with_smtplib

TEST_ADMIN_TOKEN = "test-admin-token-not-a-secret"
ADMIN = f"""
[admin]
endpoint = "tcp:0:interface=127.0.0.1"
token = "{TEST_ADMIN_TOKEN}"
"""
MESSAGE = b"From: alice@example.com\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest_twisted.async_yield_fixture
async def admin_gateway(tmp_path: Path, tls_files: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    async for gateway in file_store_gateway(tmp_path, tls_files, monkeypatch, ADMIN):
        yield gateway


def admin_url(gateway: Gateway, path: str) -> str:
    [admin] = [child for child in gateway.service if getattr(child, "name", None) == "admin"]
    return f"http://127.0.0.1:{admin.port.getHost().port}{path}"


async def scrape(gateway: Gateway, path: str) -> tuple[int, str]:
    response = await treq.get(
        admin_url(gateway, path), headers={"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}, persistent=False
    )
    return response.code, await response.text("utf-8")


async def eventually(condition: Any, what: str) -> None:
    """Wait (event loop running) until ``condition()`` holds; generous for a loaded machine."""
    for _ in range(600):
        if await condition():
            return
        await task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"never happened: {what}")


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in a Prometheus text exposition (0 when absent)."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    return 0.0


@pytest_twisted.ensureDeferred
async def test_readyz_follows_the_state_directory(admin_gateway: Gateway) -> None:
    """/readyz is 503 naming state_dir while the state directory does not exist, 200 once it does."""
    assert await scrape(admin_gateway, "/readyz") == (503, "not ready: state_dir\n")
    (admin_gateway.tmp / "state").mkdir()
    assert await scrape(admin_gateway, "/readyz") == (200, "ready\n")
    assert await scrape(admin_gateway, "/healthz") == (200, "ok\n")


@pytest_twisted.ensureDeferred
async def test_metrics_after_real_traffic(admin_gateway: Gateway) -> None:
    """Logins, messages, API answers and sessions from real clients show up in /metrics,
    labelled by listener, mechanism, code and provider, never by account or address."""
    gateway = admin_gateway
    gateway.api.respond(ScriptedResponse(status=200, body={"id": "api-1"}), ScriptedResponse(status=503))
    common = dict(sender="alice@example.com", recipients=["bob@example.org"], message=MESSAGE)
    assert (await send_with_smtplib(gateway, "submission", "PLAIN", **common)).code == 250
    assert (await send_with_smtplib(gateway, "submissions", "CRAM-MD5", **common)).code == 451
    with pytest.raises(smtplib.SMTPAuthenticationError):
        await send_with_smtplib(gateway, "submissions", "LOGIN", password="wrong", **common)

    async def sessions_ended() -> bool:
        text = (await scrape(gateway, "/metrics"))[1]
        return sample(text, "mailgate_sessions_total", listener="submissions", tls="true") == 2

    await eventually(sessions_ended, "both submissions sessions counted as ended")
    code, text = await scrape(gateway, "/metrics")
    assert code == 200
    assert sample(text, "mailgate_connections_total", listener="submission") == 1
    assert sample(text, "mailgate_connections_total", listener="relay") == 0
    assert sample(text, "mailgate_auth_total", mechanism="PLAIN", result="success") == 1
    assert sample(text, "mailgate_auth_total", mechanism="CRAM-MD5", result="success") == 1
    assert sample(text, "mailgate_auth_total", mechanism="LOGIN", result="failure") == 1
    assert sample(text, "mailgate_messages_total", result="accepted", code="250", enhanced="2.0.0") == 1
    assert sample(text, "mailgate_messages_total", result="rejected", code="451", enhanced="4.3.0") == 1
    assert sample(text, "mailgate_provider_requests_total", provider="api", outcome="delivered") == 1
    assert sample(text, "mailgate_provider_requests_total", provider="api", outcome="unavailable") == 1
    assert sample(text, "mailgate_provider_request_duration_seconds_count", provider="api") == 2
    labels = " ".join(re.findall(r'="([^"]*)"', text))
    for forbidden in ("alice", "@", "127.0.0.1", TEST_ADMIN_TOKEN, *PASSWORDS.values()):
        assert forbidden not in labels


@pytest_twisted.ensureDeferred
async def test_message_traced_from_reply_to_api(admin_gateway: Gateway) -> None:
    """The provider id in the 250 reply finds one outcome line with the queue id the API
    received as Idempotency-Key, and the session's end line follows."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        admin_gateway.api.respond(ScriptedResponse(status=200, body={"id": "api-trace-7"}))
        result = await send_with_smtplib(
            admin_gateway, "submission", "LOGIN", sender="alice@example.com", recipients=["bob@example.org"], message=MESSAGE
        )

        async def session_logged() -> bool:
            return any(e.get("log_format", "").startswith("session end") for e in events)

        await eventually(session_logged, "the session end line")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert result.text == "2.0.0 Ok: api-trace-7"
    [line] = [e for e in events if e.get("provider_id") == "api-trace-7"]
    queue_id = admin_gateway.api.requests[0].headers["idempotency-key"]
    assert (line["queue_id"], line["status"], line["account"], line["provider"], line["attempt"]) == (
        queue_id, "delivered", "alice", "api", 1,
    )  # fmt: skip
    assert formatEvent(line).startswith(
        f"message {queue_id} delivered: account=alice provider=api provider_id=api-trace-7 attempt=1 recipients=1 "
    )
    assert formatEvent(line).endswith("peer=127.0.0.1: 250 2.0.0 Ok: api-trace-7")
    [end] = [e for e in events if e.get("log_format", "").startswith("session end")]
    text = formatEvent(end)
    assert text.startswith("session end: peer=127.0.0.1 listener=submission tls=True account=alice messages=1 rejected=0 ")
    assert text.endswith(" reason=quit")
    assert sum(1 for e in events if e.get("queue_id") == queue_id) == 1
