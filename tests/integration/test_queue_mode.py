"""Queue mode end to end: real clients over real TLS, a real twisted.web API that
injects faults (503, 429 with Retry-After, a reset after the request was sent, a
timeout, a 400), a full disk at DATA."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from mailgate.cli import main as cli_main
from mailgate.testing import FakeEmailAPI, ScriptedResponse
from tests.spool_helpers import stand_in_python

from .conftest import PASSWORDS, running_gateway, send_with_smtplib, write_config

QUEUED = re.compile(r"2\.0\.0 Ok: queued as ([A-Z2-7]{22})")
MESSAGE = b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: queued\r\nX-Mailgate-Tag: t1\r\n\r\nhello\r\n"
# Short retry times so that a few retries take seconds, not minutes.
QUEUE_SETTINGS = """
[queue]
first_retry = "0.2s"
max_retry_interval = "1s"
"""


@pytest_twisted.async_yield_fixture
async def queue_gateway(tmp_path: Path, tls_files: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("MAILGATE_TEST_API_TOKEN", "test-api-token-not-a-secret")
    api = FakeEmailAPI()
    await api.start(reactor)
    (tmp_path / "state").mkdir()  # mailgate never creates its state directory
    config_path = write_config(tmp_path, tls_files, api.url, extra=QUEUE_SETTINGS)
    config_path.write_text(config_path.read_text().replace('mode = "sync"', 'mode = "queue"'))
    assert cli_main(["account", "add", "--config", str(config_path), "alice", "--password", PASSWORDS["alice"]]) == 0
    async for gateway in running_gateway(config_path, api, tls_files[2]):
        yield gateway


async def send(gateway: Any, sender: str = "alice@example.com") -> Any:
    return await send_with_smtplib(
        gateway, "submission", "PLAIN", sender=sender, recipients=["bob@example.org"], message=MESSAGE
    )


async def requests_until(api: FakeEmailAPI, count: int) -> None:
    while len(api.requests) < count:
        await api.next_request()
    # Let the answer to the last one reach the queue.
    await deferLater(0.05)


def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


async def until_empty(gateway: Any) -> None:
    runner = gateway.service.queue
    while any(runner.snapshot()["depth_by_state"].values()):
        await deferLater(0.05)


@pytest_twisted.ensureDeferred
async def test_250_means_queued_then_delivered(queue_gateway: Any) -> None:
    """The final dot is answered "queued as <id>" and the API then gets the message with
    that id as idempotency key and the control headers applied; the spool is emptied."""
    result = await send(queue_gateway)
    assert result.code == 250, result.text
    queue_id = QUEUED.fullmatch(result.text).group(1)  # type: ignore[union-attr]
    await requests_until(queue_gateway.api, 1)
    await until_empty(queue_gateway)
    [request] = queue_gateway.api.requests
    assert request.headers["idempotency-key"] == queue_id
    document = request.json()
    assert document["envelope"] == {"mail_from": "alice@example.com", "rcpt_to": ["bob@example.org"]}
    assert document["controls"]["tags"] == ["t1"]
    assert queue_gateway.service.queue.spool.ids() == []


@pytest_twisted.ensureDeferred
async def test_a_message_refused_after_the_parse_leaves_nothing_in_the_spool(queue_gateway: Any) -> None:
    """The spool writer process starts writing every message before it is parsed; one
    refused after the parse (here: MIME nested too deep) gets its 554, and its file is
    removed again: nothing in tmp/ or messages/, nothing sent."""
    deep = b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: deep\r\nMIME-Version: 1.0\r\n"
    for level in range(40):
        deep += b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (level, level)
    deep += b"Content-Type: text/plain\r\n\r\nx\r\n"
    result = await send_with_smtplib(
        queue_gateway, "submission", "PLAIN", sender="alice@example.com", recipients=["bob@example.org"], message=deep
    )
    assert (result.code, result.text.split(":")[0]) == (554, "5.6.0 Message could not be parsed")
    # The process works in order, and the discard goes out as soon as the refused
    # message's file is written: by the time a later message is queued, it is done.
    assert (await send(queue_gateway)).code == 250
    spool = queue_gateway.service.queue.spool
    assert os.listdir(spool.tmp) == []
    await requests_until(queue_gateway.api, 1)
    await until_empty(queue_gateway)
    assert [request.json()["subject"] for request in queue_gateway.api.requests] == ["queued"]


@pytest_twisted.ensureDeferred
async def test_api_faults_are_retried_until_delivered(queue_gateway: Any) -> None:
    """503, 429 with Retry-After, a reset after the request reached the API and a
    timeout are each retried later (never before Retry-After), with the same
    idempotency key, until the API accepts: one accepted request in the end."""
    api = queue_gateway.api
    api.respond(
        ScriptedResponse(status=503),
        ScriptedResponse(status=429, headers=(("Retry-After", "1"),)),
        ScriptedResponse(reset=True),
        ScriptedResponse(hang=True),  # api_timeout = 2 s
        ScriptedResponse(status=200, body={"id": "finally"}),
    )
    result = await send(queue_gateway)
    assert result.code == 250
    queue_id = QUEUED.fullmatch(result.text).group(1)  # type: ignore[union-attr]
    await requests_until(api, 5)
    await until_empty(queue_gateway)
    api.assert_script_consumed()
    assert {r.headers["idempotency-key"] for r in api.requests} == {queue_id}
    assert len(api.requests) == 5


@pytest_twisted.ensureDeferred
async def test_rejection_after_acceptance_bounces_to_the_sender(queue_gateway: Any) -> None:
    """A 400 after the 250 sends a DSN from <> to the envelope sender through the route."""
    api = queue_gateway.api
    api.respond(ScriptedResponse(status=400, body={"message": "recipient is suppressed"}))
    result = await send(queue_gateway)
    assert result.code == 250
    await requests_until(api, 2)
    await until_empty(queue_gateway)
    bounce = api.requests[1].json()
    assert bounce["envelope"] == {"mail_from": "", "rcpt_to": ["alice@example.com"]}
    assert "Rejected by api: HTTP 400: recipient is suppressed" in " ".join(bounce["text"].split())
    assert api.requests[1].headers["idempotency-key"] != api.requests[0].headers["idempotency-key"]


def python_with_a_full_disk(directory: Path) -> str:
    """The spool writer program, but every fsync fails with ENOSPC, where a full
    disk shows up for data the kernel had buffered."""
    fault = "def full(fd):\n    raise OSError(errno.ENOSPC, 'No space left on device')\nos.fsync = full"
    return stand_in_python(directory, "python-with-a-full-disk", fault)


async def restart_spool_writer(gateway: Any, python: str) -> None:
    writer = gateway.service.spool_writer
    await writer.stopService()
    writer.python = python
    writer.startService()


@pytest_twisted.ensureDeferred
async def test_disk_full_at_data_is_452_never_250(queue_gateway: Any, tmp_path: Path, logged_errors: Any) -> None:
    """ENOSPC while spooling (from fsync in the spool writer process) answers
    452 4.3.1; no file is left behind and nothing reaches the API; once there is
    space again the same message is accepted."""
    spool = queue_gateway.service.queue.spool
    await restart_spool_writer(queue_gateway, python_with_a_full_disk(tmp_path))
    try:
        result = await send(queue_gateway)
    finally:
        await restart_spool_writer(queue_gateway, sys.executable)
    assert (result.code, result.text) == (452, "4.3.1 Insufficient system storage")
    assert spool.ids() == [] and os.listdir(spool.tmp) == [] and queue_gateway.api.requests == []
    assert "No space left on device" in json.dumps([e.get("error") for e in logged_errors.take()])
    result = await send(queue_gateway)
    assert result.code == 250
    await requests_until(queue_gateway.api, 1)
