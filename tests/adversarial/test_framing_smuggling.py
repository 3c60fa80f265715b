"""Framing and smuggling (SECURITY.md): where a message ends, and what counts as a command.

The only end of data is <CRLF>.<CRLF> (RFC 5321 §4.1.1.4); every other variant
is content, and content with bare CR/LF is refused after the real end (or
normalised), so mailgate and any server behind it can never disagree about
where a message ends (SMTP smuggling, CVE-2023-51764/51765/51766).
"""

from __future__ import annotations

import socket
import time

import pytest
import pytest_twisted

from .invariants import MESSAGE, Invariants, stuff

SMUGGLED = (
    b"MAIL FROM:<mallory@example.com>\r\n"
    b"RCPT TO:<victim@example.org>\r\n"
    b"DATA\r\n"
    b"From: mallory@example.com\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"smuggled\r\n"
)
HEAD = b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: carrier\r\n\r\nhello"


@pytest.mark.parametrize(
    "end, reply",
    [
        (b"\n.\n", "550 5.5.2"),
        (b"\n.\r\n", "550 5.5.2"),
        (b"\r\n.\n", "550 5.5.2"),
        (b"\r.\r", "550 5.5.2"),
        (b"\r.\r\n", "550 5.5.2"),
        (b"\r\n.\r\r\n", "550 5.5.2"),
        (b"\r\n\x00.\r\n", "550 5.6.0"),
    ],
    ids=["lf.lf", "lf.crlf", "crlf.lf", "cr.cr", "cr.crlf", "crlf.cr-crlf", "crlf-nul.crlf"],
)
@pytest_twisted.ensureDeferred
async def test_fake_end_of_data_smuggles_nothing(inv: Invariants, role: str, end: bytes, reply: str) -> None:
    """A fake end-of-data followed by a second transaction is one message, refused after
    the real <CRLF>.<CRLF>: one reply, never two messages."""

    def attack() -> tuple[str, str]:
        client = inv.client(role)
        client.prepare()
        client.transaction()
        client.send(HEAD + end + SMUGGLED + b".\r\n")
        verdict = client.reply()[-1]
        return verdict, client.cmd("QUIT")

    verdict, after = await inv.attack(attack)
    assert verdict.startswith(reply + " ")
    assert after == "221 2.0.0 Bye"  # Nothing of the smuggled transaction was answered.
    await inv.check(delivered=0, role=role)


@pytest_twisted.ensureDeferred
async def test_dot_space_line_is_content(inv: Invariants, role: str) -> None:
    """"<CRLF>. <CRLF>" is an ordinary line: the would-be commands after it are message
    text of the one message delivered."""

    def attack() -> str:
        client = inv.client(role)
        client.prepare()
        client.transaction()
        client.send(HEAD + b"\r\n. \r\n" + SMUGGLED + b".\r\n")
        return client.reply()[-1]

    assert (await inv.attack(attack)).startswith("250 ")
    assert "MAIL FROM:<mallory@example.com>" in inv.gateway.api.requests[-1].json()["text"]
    await inv.check(delivered=1, role=role)


@pytest.mark.parametrize("gateway_limits", ['exempt_networks = []\nline_endings = "normalize"'])
@pytest_twisted.ensureDeferred
async def test_normalised_line_endings_still_one_message(inv: Invariants, role: str) -> None:
    """With line_endings = "normalize", "<LF>.<LF>" becomes ordinary content of one message."""

    def attack() -> str:
        client = inv.client(role)
        client.prepare()
        client.transaction()
        client.send(HEAD + b"\n.\n" + SMUGGLED + b".\r\n")
        return client.reply()[-1]

    assert (await inv.attack(attack)).startswith("250 ")
    assert inv.gateway.api.requests[-1].json()["envelope"]["rcpt_to"] == ["bob@example.org"]
    await inv.check(delivered=1, role=role)


@pytest_twisted.ensureDeferred
async def test_long_data_line_does_not_return_to_command_mode(inv: Invariants, role: str) -> None:
    """A line over 998 octets keeps the session in DATA (stock Twisted fell back to command
    mode and ran the rest as commands): one 550 after the real end, and no transaction left."""

    def attack() -> tuple[str, str]:
        client = inv.client(role)
        client.prepare()
        client.transaction()
        client.send(b"Subject: long\r\n\r\n" + b"A" * 5000 + b"\r\n" + SMUGGLED + b".\r\n")
        verdict = client.reply()[-1]
        return verdict, client.cmd("RCPT TO:<victim@example.org>")

    verdict, rcpt = await inv.attack(attack)
    assert verdict.startswith("550 5.5.2 ")
    assert rcpt.startswith("503 5.5.1 ")
    await inv.check(delivered=0, role=role)


@pytest_twisted.ensureDeferred
async def test_megabyte_line_in_data(inv: Invariants, role: str) -> None:
    """2 MiB without a line break inside DATA: memory stays bounded, 550 after the end."""

    def attack() -> str:
        client = inv.client(role)
        client.prepare()
        client.transaction()
        chunk = b"B" * 65536
        for _ in range(32):
            client.send(chunk)
        client.send(b"\r\n.\r\n")
        return client.reply()[-1]

    assert (await inv.attack(attack)).startswith("550 5.5.2 ")
    await inv.check(delivered=0, role=role)


@pytest_twisted.ensureDeferred
async def test_commands_pipelined_after_ehlo_end_the_session(inv: Invariants, role: str) -> None:
    """EHLO must end a pipelined group (RFC 2920 §3.1): a transaction in the same packet
    gets 554 5.5.0 and the connection is closed."""

    def attack() -> list[str]:
        client = inv.client(role)
        client.prepare()
        client.send(b"EHLO again.example\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\n")
        return client.read_until_closed()

    lines = await inv.attack(attack)
    assert lines[0].startswith("250-localhost greets again.example")
    assert [line for line in lines if not line.startswith("250")] == [
        "554 5.5.0 Command pipelined where it is not allowed, closing connection"
    ]
    await inv.check(delivered=0, role=role)


@pytest_twisted.ensureDeferred
async def test_pipelining_without_ehlo_is_refused(inv: Invariants, role: str) -> None:
    """After HELO (no PIPELINING extension) a second command in the same packet closes the session."""

    def attack() -> list[str]:
        client = inv.client(role)
        assert client.cmd("HELO client.example").startswith("250 ")
        client.send(b"NOOP\r\nNOOP\r\nNOOP\r\n")
        return client.read_until_closed()

    assert await inv.attack(attack) == [
        "250 2.0.0 Ok",
        "554 5.5.0 Command pipelined where it is not allowed, closing connection",
    ]
    await inv.check(delivered=0, role=role)


@pytest_twisted.ensureDeferred
async def test_content_after_refused_data_is_not_run_as_commands(inv: Invariants, role: str) -> None:
    """DATA refused (no recipients) with the message pipelined behind it: the message
    text would be read as commands, so the session ends instead."""

    def attack() -> list[str]:
        client = inv.client(role)
        client.prepare()
        client.send(b"DATA\r\n" + SMUGGLED + b".\r\n")
        return client.read_until_closed()

    assert await inv.attack(attack) == [
        "503 5.5.1 Need MAIL before RCPT",
        "554 5.5.0 Command pipelined where it is not allowed, closing connection",
    ]
    await inv.check(delivered=0, role=role)


@pytest.mark.parametrize(
    "line",
    [b"NOOP\nMAIL FROM:<mallory@example.com>\r\n", b"RSET\rMAIL FROM:<mallory@example.com>\r\n"],
    ids=["bare-lf", "bare-cr"],
)
@pytest_twisted.ensureDeferred
async def test_command_with_bare_line_break_is_one_bad_command(inv: Invariants, role: str, line: bytes) -> None:
    """A command line holding a bare LF or CR is one bad command: one 500 reply, not two commands."""

    def attack() -> tuple[str, str]:
        client = inv.client(role)
        client.prepare()
        client.send(line)
        first = client.reply()[-1]
        return first, client.cmd("RCPT TO:<bob@example.org>")

    first, rcpt = await inv.attack(attack)
    assert first == "500 5.5.2 Bare LF or CR in command line is not allowed"
    assert rcpt.startswith("503 5.5.1 ")  # MAIL was never run.
    await inv.check(delivered=0, role=role)


@pytest_twisted.ensureDeferred
async def test_bdat_without_chunking_closes(inv: Invariants, role: str) -> None:
    """BDAT is not offered; its chunk would be read as commands, so the session ends."""

    def attack() -> list[str]:
        client = inv.client(role)
        client.prepare()
        chunk = b"MAIL FROM:<mallory@example.com>\r\n"
        client.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
        return client.read_until_closed()

    assert await inv.attack(attack) == [
        "554 5.5.1 CHUNKING is not offered: BDAT data would be read as commands, closing connection"
    ]
    await inv.check(delivered=0, role=role)


@pytest_twisted.ensureDeferred
async def test_end_of_data_split_byte_by_byte(inv: Invariants, role: str) -> None:
    """The whole message and its end, one octet per packet: one message, delivered once."""

    def attack() -> str:
        client = inv.client(role)
        client.prepare()
        client.transaction()
        raw = client.sock
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for octet in stuff(MESSAGE) + b".\r\n":
            client.send(bytes([octet]))
            time.sleep(0.001)
        return client.reply()[-1]

    assert (await inv.attack(attack)).startswith("250 ")
    await inv.check(delivered=1, role=role)


@pytest_twisted.ensureDeferred
async def test_dot_stuffed_lines_arrive_intact(inv: Invariants, role: str) -> None:
    """Lines that begin with dots (".", "..", ".hidden") survive stuffing and unstuffing."""
    body = b"Subject: dots\r\n\r\nstart\r\n.hidden\r\n.\r\n..\r\nend\r\n"

    def attack() -> str:
        client = inv.client(role)
        client.prepare()
        return client.message(body)

    assert (await inv.attack(attack)).startswith("250 ")
    assert inv.gateway.api.requests[-1].json()["text"] == "start\n.hidden\n.\n..\nend\n"
    await inv.check(delivered=1, role=role)


@pytest_twisted.ensureDeferred
async def test_two_pipelined_transactions_deliver_exactly_two(inv: Invariants, role: str) -> None:
    """Honest pipelining (RFC 2920) of two whole transactions in one packet: two 250s, two messages."""

    def attack() -> list[str]:
        client = inv.client(role)
        client.prepare()
        one = b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
        client.send((one + stuff(MESSAGE) + b".\r\n") * 2)
        return client.replies(8)

    lines = await inv.attack(attack)
    assert [line[:4] for line in lines] == ["250 ", "250 ", "354 ", "250 "] * 2
    await inv.check(delivered=2, role=role)
