"""Injection and encoding (SECURITY.md): nothing the client says becomes a header or a command.

Where a message is delivered, the test inspects the JSON document the fake
API received (mailgate's webhook schema) for what must not be there.
"""

from __future__ import annotations

import pytest
import pytest_twisted

from .invariants import Invariants

HELO_REPLY = "501 5.5.4 EHLO/HELO requires a domain name or address literal"


@pytest_twisted.ensureDeferred
async def test_ehlo_with_bare_lf_injects_nothing(inv: Invariants, role: str) -> None:
    """"EHLO x<LF>X-Injected: yes" is one bad command; the Received header that later
    carries the EHLO name holds nothing injected."""

    def attack() -> tuple[str, str]:
        client = inv.client(role)
        client.send(b"EHLO evil.example\nX-Injected: yes\r\n")
        refused = client.reply()[-1]
        client.prepare()
        return refused, client.message()

    refused, verdict = await inv.attack(attack)
    assert refused == "500 5.5.2 Bare LF or CR in command line is not allowed"
    assert verdict.startswith("250 ")
    assert b"X-Injected" not in inv.gateway.api.requests[-1].body
    await inv.check(delivered=1, role=role)


@pytest.mark.parametrize(
    "argument",
    [b"", b"two words", b"nul\x00.example", b"tab\t.example", b"\xc3\xa9.example", b"a" * 300, b"\x7f.example"],
    ids=["empty", "space", "nul", "tab", "utf8", "300-octets", "del"],
)
@pytest_twisted.ensureDeferred
async def test_bad_ehlo_arguments(inv: Invariants, role: str, argument: bytes) -> None:
    """EHLO arguments that could not be a domain or address literal are 501 5.5.4."""

    def attack() -> tuple[str, str]:
        client = inv.client(role)
        refused = client.cmd(b"EHLO " + argument if argument else b"EHLO")
        return refused, client.cmd("NOOP")

    assert await inv.attack(attack) == (HELO_REPLY, "250 2.0.0 Ok")
    await inv.check(delivered=0, role=role)


@pytest.mark.parametrize(
    "line",
    [b"N\xc3\x96OP", b"NO0P", b"NO\x00OP", b"\xff\xfe\xfd", b"\x1b[31mNOOP", b"MAIL\x00FROM:<a@example.com>"],
    ids=["utf8-verb", "digit", "nul", "binary", "ansi-escape", "nul-separator"],
)
@pytest_twisted.ensureDeferred
async def test_junk_verbs(inv: Invariants, role: str, line: bytes) -> None:
    """Verbs that are not ASCII letters are 500 5.5.2, and the session continues."""

    def attack() -> tuple[str, str]:
        client = inv.client(role)
        client.prepare()
        return client.cmd(line), client.cmd("NOOP")

    assert await inv.attack(attack) == ("500 5.5.2 Syntax error, command unrecognised", "250 2.0.0 Ok")
    await inv.check(delivered=0, role=role)


@pytest.mark.parametrize(
    "command",
    [
        "MAIL FROM:<\u00e9l\u00e8ve@example.com>",
        'RCPT TO:<"\u2603"@example.org>',
        "RCPT TO:<bob@ex\u00e4mple.org>",
    ],
    ids=["utf8-sender", "quoted-utf8-recipient", "idn-recipient"],
)
@pytest_twisted.ensureDeferred
async def test_utf8_addresses_without_smtputf8(inv: Invariants, role: str, command: str) -> None:
    """Non-ASCII addresses without SMTPUTF8 (not offered) are 553 5.6.7 at MAIL/RCPT
    time, never a crash at DATA; the transaction can go on."""

    def attack() -> tuple[str, str]:
        client = inv.client(role)
        client.prepare()
        if command.startswith("RCPT"):
            assert client.cmd("MAIL FROM:<alice@example.com>").startswith("250 ")
        refused = client.cmd(command.encode("utf-8"))
        client.cmd("RSET")
        return refused, client.message()

    refused, verdict = await inv.attack(attack)
    assert refused == "553 5.6.7 Non-ASCII address requires SMTPUTF8, which is not supported"
    assert verdict.startswith("250 ")
    await inv.check(delivered=1, role=role)


@pytest.mark.parametrize(
    "command, reply",
    [
        (b"MAIL FROM:<al\x00ice@example.com>", "553 5.1.7 "),
        (b"MAIL FROM:<alice\x01@example.com>", "553 5.1.7 "),
        (b"MAIL FROM:<alice@example.com> X-Header=injected", "555 5.5.4 "),
        (b"MAIL FROM:<alice@example.com> RET=FULL ENVID=x", "555 5.5.4 "),
        (b"MAIL FROM:<alice@example.com> BODY=8BITMIME\x0bX=1", "501 5.5.4 "),
        (b"MAIL FROM:<alice@example.com>\x00 SIZE=1", "501 5.5.4 "),
        (b"MAIL FROM:<alice@example.com>,<bob@example.org>", "501 5.5.4 "),
        (b"MAIL TO:<alice@example.com>", "501 5.5.4 "),
    ],
    ids=["nul-local", "control-local", "unknown-param", "dsn-params", "vtab-param", "nul-after-path", "two-paths", "wrong-keyword"],
)
@pytest_twisted.ensureDeferred
async def test_mail_from_injection(inv: Invariants, role: str, command: bytes, reply: str) -> None:
    """Control octets and unknown parameters in MAIL FROM are refused, nothing is carried on."""

    def attack() -> tuple[str, str]:
        client = inv.client(role)
        client.prepare()
        return client.cmd(command), client.cmd("RCPT TO:<bob@example.org>")

    refused, rcpt = await inv.attack(attack)
    assert refused.startswith(reply)
    assert rcpt.startswith("503 5.5.1 ")
    await inv.check(delivered=0, role=role)


@pytest.mark.parametrize(
    "command",
    [b"RCPT TO:<bob@example.org> <evil@example.net>", b"RCPT TO:<bob@example.org>,<evil@example.net>", b"RCPT TO:<bob@example.org> NOTIFY=NEVER"],
    ids=["second-path", "comma-list", "dsn-notify"],
)
@pytest_twisted.ensureDeferred
async def test_rcpt_smuggles_no_second_recipient(inv: Invariants, role: str, command: bytes) -> None:
    """A RCPT line that tries to name two recipients, or DSN parameters we do not offer,
    is refused as a whole."""

    def attack() -> str:
        client = inv.client(role)
        client.prepare()
        assert client.cmd("MAIL FROM:<alice@example.com>").startswith("250 ")
        return client.cmd(command)

    reply = await inv.attack(attack)
    assert reply.startswith("501 5.5.4 ") or reply.startswith("555 5.5.4 ")
    await inv.check(delivered=0, role=role)


@pytest.mark.parametrize("declared", [True, False], ids=["BODY=8BITMIME", "undeclared"])
@pytest_twisted.ensureDeferred
async def test_eight_bit_body(inv: Invariants, role: str, declared: bool) -> None:
    """An 8-bit UTF-8 body (8BITMIME, RFC 6152) arrives decoded; undeclared 8-bit is
    accepted the same way, as Postfix does."""
    body = (
        "From: alice@example.com\r\nTo: bob@example.org\r\nSubject: 8bit\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        "Grüße ✓\r\n"
    ).encode("utf-8")

    def attack() -> str:
        client = inv.client(role)
        client.prepare()
        parameter = " BODY=8BITMIME" if declared else ""
        assert client.cmd(f"MAIL FROM:<alice@example.com>{parameter}").startswith("250 ")
        assert client.cmd("RCPT TO:<bob@example.org>").startswith("250 ")
        assert client.cmd("DATA").startswith("354 ")
        client.send(body + b".\r\n")
        return client.reply()[-1]

    assert (await inv.attack(attack)).startswith("250 ")
    assert inv.gateway.api.requests[-1].json()["text"] == "Grüße ✓\n"
    await inv.check(delivered=1, role=role)


@pytest.mark.parametrize(
    "subject",
    [
        b"=?utf-8?q?hi=0D=0ABcc:_evil@example.net?=",
        b"=?utf-8?b?aGkNCkJjYzogZXZpbEBleGFtcGxlLm5ldA==?=",
        b"\xff\xfe invalid \xc3\x28 utf-8",
        b"=?x-unknown?q?=FF?= =?utf-8?q?=C3?=",
        b"=?utf-8?q?a=00b?=",
    ],
    ids=["qp-crlf", "b64-crlf", "invalid-utf8", "unknown-charset", "encoded-nul"],
)
@pytest_twisted.ensureDeferred
async def test_encoded_header_injection(inv: Invariants, role: str, subject: bytes) -> None:
    """Encoded words that decode to CR/LF/NUL, invalid UTF-8 and unknown charsets are
    delivered with a one-line subject and no extra recipients."""

    def attack() -> str:
        client = inv.client(role)
        client.prepare()
        return client.message(b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: " + subject + b"\r\n\r\nhi\r\n")

    assert (await inv.attack(attack)).startswith("250 ")
    document = inv.gateway.api.requests[-1].json()
    assert not any(char in document["subject"] for char in "\r\n\x00")
    assert document["bcc"] == []
    assert all(header["name"].lower() != "bcc" for header in document["headers"])
    await inv.check(delivered=1, role=role)


@pytest_twisted.ensureDeferred
async def test_bcc_header_is_never_forwarded(inv: Invariants, role: str) -> None:
    """A Bcc: header is dropped; the blind recipient comes from the envelope only."""

    def attack() -> str:
        client = inv.client(role)
        client.prepare()
        body = b"From: alice@example.com\r\nTo: bob@example.org\r\nBcc: secret@example.net,\r\n other@example.net\r\n\r\nhi\r\n"
        return client.message(body, recipients=("bob@example.org", "secret@example.net"))

    assert (await inv.attack(attack)).startswith("250 ")
    request = inv.gateway.api.requests[-1]
    assert request.json()["bcc"] == [{"name": "", "address": "secret@example.net"}]
    assert b"other@example.net" not in request.body
    await inv.check(delivered=1, role=role)


@pytest.mark.parametrize(
    "disposition",
    [
        b"attachment; filename*=utf-8''%0D%0AX-Evil%3A%20yes",
        b'attachment; filename="=?utf-8?q?a=0D=0Ab.txt?="',
        b'attachment; filename="../../etc/passwd"',
        b"attachment; filename*0*=utf-8''a; filename*1=%00; filename*2=b",
    ],
    ids=["rfc2231-crlf", "encoded-word-crlf", "path-traversal", "continuation-nul"],
)
@pytest_twisted.ensureDeferred
async def test_attachment_filename_injection(inv: Invariants, role: str, disposition: bytes) -> None:
    """Attachment filenames are delivered on one line, without control characters."""
    body = (
        b"From: alice@example.com\r\nTo: bob@example.org\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nhi\r\n--b\r\n"
        b"Content-Type: text/plain\r\nContent-Disposition: " + disposition + b"\r\n\r\ndata\r\n--b--\r\n"
    )

    def attack() -> str:
        client = inv.client(role)
        client.prepare()
        return client.message(body)

    assert (await inv.attack(attack)).startswith("250 ")
    (attachment,) = inv.gateway.api.requests[-1].json()["attachments"]
    assert not any(char in (attachment["filename"] or "") for char in "\r\n\x00")
    await inv.check(delivered=1, role=role)
