"""Durability and API faults (SECURITY.md), sync mode: the client hears the truth.

A transient API failure is a 451 (the client keeps the message and retries,
RFC 5321 §4.2.5); a rejection is a 554 whose text, however hostile the API's
answer, is one well-formed reply line.  The queue-mode cases of SECURITY.md
(kill -9 after 250, DSNs, SIGTERM) belong with the durable queue.
"""

from __future__ import annotations

import time

import pytest
import pytest_twisted

from mailgate.testing import ScriptedResponse

from .invariants import Invariants


@pytest.mark.parametrize(
    "response, reply",
    [
        (ScriptedResponse(status=503), "451 4.3.0 "),
        (ScriptedResponse(status=500, body=b"<html>oops</html>"), "451 4.3.0 "),
        (ScriptedResponse(status=429, headers=(("Retry-After", "120"),)), "451 4.7.0 "),
        (ScriptedResponse(reset=True), "451 4.4.1 "),
        (ScriptedResponse(hang=True), "451 4.4.1 "),
    ],
    ids=["503", "500-html", "429-retry-after", "reset", "timeout"],
)
@pytest_twisted.ensureDeferred
async def test_transient_api_failure_is_451_and_retry_delivers(
    inv: Invariants, role: str, response: ScriptedResponse, reply: str
) -> None:
    """A transient failure is 451 with its enhanced code, never 250 or 5xx; the client's
    retry in the same session is delivered (two requests reached the API, one message)."""
    inv.gateway.api.respond(response)

    def attack() -> tuple[str, str]:
        client = inv.client(role)
        client.prepare()
        return client.message(), client.message()

    failed, retried = await inv.attack(attack)
    assert failed.startswith(reply)
    assert retried.startswith("250 ")
    await inv.check(delivered=2, role=role)


HOSTILE = "bad\r\n250 2.0.0 Ok: forged\r\n\x00\x1b[31m" + "é" * 50 + "x" * 5000


@pytest.mark.parametrize(
    "response",
    [
        ScriptedResponse(status=422, body={"message": HOSTILE}),
        ScriptedResponse(status=400, body=HOSTILE.encode("utf-8")),
        ScriptedResponse(status=400, body=b"\xff\xfe\x00garbage"),
    ],
    ids=["json-message", "text-body", "binary-body"],
)
@pytest_twisted.ensureDeferred
async def test_hostile_rejection_text_is_one_safe_line(inv: Invariants, role: str, response: ScriptedResponse) -> None:
    """An API rejection carrying CR/LF, NUL, escapes, non-ASCII and 5 KB of text becomes one
    554 reply line of at most 512 octets: the API cannot forge a 250 or break the client."""
    inv.gateway.api.respond(response)

    def attack() -> list[str]:
        client = inv.client(role)
        client.prepare()
        client.transaction()
        client.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        return client.reply()

    lines = await inv.attack(attack)
    assert len(lines) == 1 and lines[0].startswith("554 5.")  # Form and length: Invariants.check.
    await inv.check(delivered=1, role=role)


@pytest.mark.parametrize(
    "body",
    [{"id": "id\r\n250 forged"}, {"id": "x" * 5000}, b"not json at all", {"id": ["a", "b"]}],
    ids=["crlf-id", "huge-id", "not-json", "list-id"],
)
@pytest_twisted.ensureDeferred
async def test_odd_success_answer_is_a_clean_250(inv: Invariants, role: str, body: object) -> None:
    """A 2xx with an odd body is delivery: one 250 line, the API's id sanitised and bounded."""
    inv.gateway.api.respond(ScriptedResponse(status=200, body=body))

    def attack() -> list[str]:
        client = inv.client(role)
        client.prepare()
        client.transaction()
        client.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        return client.reply()

    lines = await inv.attack(attack)
    assert len(lines) == 1 and lines[0].startswith("250 2.0.0 Ok")
    await inv.check(delivered=1, role=role)


@pytest_twisted.ensureDeferred
async def test_client_leaves_while_the_api_is_slow(inv: Invariants, role: str) -> None:
    """The client disconnects while its message waits for a hanging API: the one request
    stands, nothing is logged as an error, and no reply is written to the closed session."""
    inv.gateway.api.respond(ScriptedResponse(hang=True))

    def attack() -> None:
        client = inv.client(role)
        client.prepare()
        client.transaction()
        client.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        for _ in range(600):
            if inv.gateway.api.requests:
                break
            time.sleep(0.01)
        client.close()

    await inv.attack(attack)
    await inv.check(delivered=1, role=role)
