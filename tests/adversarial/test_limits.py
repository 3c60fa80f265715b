"""Limits (SECURITY.md): line lengths, sizes, recipients, and floods of commands.

The test gateway has max_message_size = 1 MiB, max_recipients = 50 and the
defaults max_errors = 10 and max_junk_commands = 100.
"""

from __future__ import annotations

import pytest
import pytest_twisted

from .invariants import Invariants

MAX_SIZE = 1024 * 1024


@pytest_twisted.ensureDeferred
async def test_command_line_over_512_octets(inv: Invariants, role: str) -> None:
    """A command line of 513 octets (RFC 5321 §4.5.3.1.4) gets 500 5.5.2; the session goes on."""

    def attack() -> tuple[str, str]:
        client = inv.client(role)
        client.ehlo()
        too_long = client.cmd(b"NOOP " + b"x" * 506)  # 513 octets with CRLF
        return too_long, client.cmd("NOOP")

    assert await inv.attack(attack) == ("500 5.5.2 Line too long", "250 2.0.0 Ok")
    await inv.check(delivered=0, role=role)


@pytest_twisted.ensureDeferred
async def test_megabyte_without_line_end_in_command_mode(inv: Invariants, role: str) -> None:
    """1 MiB without CRLF in command mode: a reply and the connection closed, memory bounded."""

    def attack() -> list[str]:
        client = inv.client(role)
        client.ehlo()
        try:
            for _ in range(16):
                client.send(b"M" * 65536)
        except OSError:
            pass  # The server may close while we are still sending.
        return client.read_until_closed()

    assert await inv.attack(attack) == ["500 5.5.2 Line too long", "421 4.7.0 Too many errors, closing connection"]
    await inv.check(delivered=0, role=role)


@pytest.mark.parametrize(
    "parameter, reply",
    [
        (f"SIZE={MAX_SIZE + 1}", "552 5.3.4 "),
        ("SIZE=" + "9" * 30, "501 5.5.4 "),
        ("SIZE=-1", "501 5.5.4 "),
        ("SIZE", "501 5.5.4 "),
        ("BODY=BINARYMIME", "501 5.5.4 "),
        ("SMTPUTF8", "555 5.5.4 "),
        ("X-EVIL=1 Y=2 Z=3", "555 5.5.4 "),
    ],
)
@pytest_twisted.ensureDeferred
async def test_mail_parameters(inv: Invariants, role: str, parameter: str, reply: str) -> None:
    """MAIL FROM parameters: declared size over the limit, malformed and unknown ones are refused."""

    def attack() -> tuple[str, str]:
        client = inv.client(role)
        client.prepare()
        refused = client.cmd(f"MAIL FROM:<alice@example.com> {parameter}")
        return refused, client.cmd("MAIL FROM:<alice@example.com> SIZE=100")

    refused, retry = await inv.attack(attack)
    assert refused.startswith(reply)
    assert retry.startswith("250 ")
    await inv.check(delivered=0, role=role)


@pytest_twisted.ensureDeferred
async def test_declared_small_sent_large(inv: Invariants, role: str) -> None:
    """SIZE=100 but 1.5 MiB sent: discarded while streaming, 552 5.3.4 after the dot,
    and the same session then delivers a normal message."""

    def attack() -> tuple[str, str]:
        client = inv.client(role)
        client.prepare()
        assert client.cmd("MAIL FROM:<alice@example.com> SIZE=100").startswith("250 ")
        assert client.cmd("RCPT TO:<bob@example.org>").startswith("250 ")
        assert client.cmd("DATA").startswith("354 ")
        client.send(b"Subject: big\r\n\r\n")
        line = b"x" * 998 + b"\r\n"
        for _ in range(1536):
            client.send(line)
        client.send(b".\r\n")
        big = client.reply()[-1]
        return big, client.message()

    big, normal = await inv.attack(attack)
    assert big == "552 5.3.4 Message size exceeds fixed maximum message size"
    assert normal.startswith("250 ")
    await inv.check(delivered=1, role=role)


@pytest_twisted.ensureDeferred
async def test_message_just_under_the_limit_is_accepted(inv: Invariants, role: str) -> None:
    """The size limit is not off by a line: a message just under 1 MiB is delivered."""
    body = b"Subject: fits\r\n\r\n" + (b"y" * 998 + b"\r\n") * (MAX_SIZE // 1000 - 200)

    def attack() -> str:
        client = inv.client(role)
        client.prepare()
        return client.message(body)

    assert (await inv.attack(attack)).startswith("250 ")
    await inv.check(delivered=1, role=role)


@pytest_twisted.ensureDeferred
async def test_recipient_51_of_50(inv: Invariants, role: str) -> None:
    """The 51st recipient gets 452 4.5.3; the message goes to the 50 accepted, once."""

    def attack() -> tuple[list[str], str]:
        client = inv.client(role)
        client.prepare()
        assert client.cmd("MAIL FROM:<alice@example.com>").startswith("250 ")
        codes = [client.cmd(f"RCPT TO:<r{i}@example.org>")[:9] for i in range(51)]
        assert client.cmd("DATA").startswith("354 ")
        client.send(b"Subject: many\r\n\r\nhi\r\n.\r\n")
        return codes, client.reply()[-1]

    codes, verdict = await inv.attack(attack)
    assert codes == ["250 2.1.5"] * 50 + ["452 4.5.3"]
    assert verdict.startswith("250 ")
    assert len(inv.gateway.api.requests[-1].json()["envelope"]["rcpt_to"]) == 50
    await inv.check(delivered=1, role=role)


@pytest_twisted.ensureDeferred
async def test_thousands_of_pipelined_recipients(inv: Invariants, role: str) -> None:
    """5,000 RCPTs in one write: 50 accepted, then 452s until the error limit, then 421 and close."""

    def attack() -> list[str]:
        client = inv.client(role)
        client.prepare()
        assert client.cmd("MAIL FROM:<alice@example.com>").startswith("250 ")
        try:
            client.send(b"".join(b"RCPT TO:<r%d@example.org>\r\n" % i for i in range(5000)))
        except OSError:
            pass
        return client.read_until_closed()

    lines = await inv.attack(attack)
    assert [line[:9] for line in lines] == ["250 2.1.5"] * 50 + ["452 4.5.3"] * 10 + ["421 4.7.0"]
    await inv.check(delivered=0, role=role)


@pytest.mark.parametrize("command", ["NOOP", "RSET", "VRFY postmaster", "HELP", "EHLO client.example"])
@pytest_twisted.ensureDeferred
async def test_junk_command_flood(inv: Invariants, role: str, command: str) -> None:
    """Commands that move no mail are limited: the 101st gets 421 4.7.0 and the session ends."""

    def attack() -> list[str]:
        client = inv.client(role)
        client.prepare()
        replies = []
        try:
            for _ in range(200):
                client.send(command.encode() + b"\r\n")
                replies.append(client.reply()[-1])
        except Exception:  # noqa: BLE001 - the server closed, as it should
            pass
        return replies

    replies = await inv.attack(attack)
    ehlos_so_far = 2 if role == "submission" else 1  # EHLO counts too (before and after STARTTLS).
    assert len(replies) == 101 - ehlos_so_far
    assert replies[-1] == "421 4.7.0 Too many commands without a message, closing connection"
    await inv.check(delivered=0, role=role)


@pytest_twisted.ensureDeferred
async def test_duplicate_recipient_flood(inv: Invariants, role: str) -> None:
    """The same recipient over and over is a junk command too: 421 4.7.0, nothing delivered."""

    def attack() -> list[str]:
        client = inv.client(role)
        client.prepare()
        assert client.cmd("MAIL FROM:<alice@example.com>").startswith("250 ")
        try:
            client.send(b"RCPT TO:<bob@example.org>\r\n" * 1000)
        except OSError:
            pass
        return client.read_until_closed()

    lines = await inv.attack(attack)
    assert lines[-1] == "421 4.7.0 Too many commands without a message, closing connection"
    ehlos_so_far = 2 if role == "submission" else 1
    assert len(lines) == 1 + (100 - ehlos_so_far) + 1  # The first RCPT is no repeat.
    await inv.check(delivered=0, role=role)


@pytest_twisted.ensureDeferred
async def test_unknown_command_flood(inv: Invariants, role: str) -> None:
    """Unknown commands count as errors: the 11th ends the session with 421 4.7.0."""

    def attack() -> list[str]:
        client = inv.client(role)
        client.ehlo()
        try:
            client.send(b"XYZZY plugh\r\n" * 1000)
        except OSError:
            pass
        return client.read_until_closed()

    lines = await inv.attack(attack)
    assert lines == ["500 5.5.2 Syntax error, command unrecognised"] * 10 + [
        "421 4.7.0 Too many errors, closing connection"
    ]
    await inv.check(delivered=0, role=role)


@pytest_twisted.ensureDeferred
async def test_many_messages_in_one_session(inv: Invariants, role: str) -> None:
    """A busy honest client (RSET between messages, as Postfix does on cached connections)
    is not mistaken for a flood: 30 messages, 30 deliveries."""

    def attack() -> list[str]:
        client = inv.client(role)
        client.prepare()
        verdicts = []
        for _ in range(30):
            assert client.cmd("RSET") == "250 2.0.0 Reset state"
            assert client.cmd("NOOP") == "250 2.0.0 Ok"
            verdicts.append(client.message())
        client.quit()
        return verdicts

    verdicts = await inv.attack(attack)
    assert all(verdict.startswith("250 2.0.0 Ok: ") for verdict in verdicts)
    await inv.check(delivered=30, role=role)


@pytest.mark.parametrize(
    "path, reply",
    [
        ("<" + "a" * 300 + "@example.com>", "553 5.1.7 "),
        ("<alice@" + "b" * 300 + ".example>", "553 5.1.7 "),
        ("<alice@example.com", "553 5.1.7 "),
        ("", "553 5.1.7 "),
    ],
    ids=["long-local", "long-domain", "unclosed", "missing"],
)
@pytest_twisted.ensureDeferred
async def test_malformed_or_oversized_sender(inv: Invariants, role: str, path: str, reply: str) -> None:
    """Reverse-paths beyond RFC 5321 §4.5.3.1 sizes or malformed are refused with 553 5.1.7."""

    def attack() -> str:
        client = inv.client(role)
        client.prepare()
        return client.cmd(f"MAIL FROM:{path}")

    assert (await inv.attack(attack)).startswith(reply)
    await inv.check(delivered=0, role=role)


@pytest_twisted.ensureDeferred
async def test_overlong_auth_line(inv: Invariants, role: str) -> None:
    """An AUTH line over the 12288-octet SASL cap is refused without reading it as credentials."""

    def attack() -> tuple[str, str]:
        client = inv.client(role)
        client.ehlo()
        return client.cmd(b"AUTH PLAIN " + b"A" * 13000), client.cmd("NOOP")

    assert await inv.attack(attack) == ("500 5.5.2 Line too long", "250 2.0.0 Ok")
    await inv.check(delivered=0, role=role)
