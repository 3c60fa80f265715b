"""Relay and sender policy (SECURITY.md): no open relay, no forged senders.

The relay listener trusts 127.0.0.1 only, so 127.0.0.2 plays the untrusted
internet.  The ``restricted`` account may send only as owner@example.com.
"""

from __future__ import annotations

import pytest
import pytest_twisted

from .invariants import Invariants, RawClient

OPEN_RELAY_RECIPIENTS = [
    "<victim%example.org@localhost>",
    "<@localhost:victim@example.org>",
    "<@a.example,@b.example:victim@example.org>",
    "<example.org!victim@localhost>",
    '<"victim@example.org">',
    '<"victim@example.org"@localhost>',
    "<victim@[127.0.0.1]>",
    "victim@example.org",
]


def login_as(client: RawClient, user: str) -> None:
    client.ehlo()
    if client.role != "submissions":
        client.starttls()
        client.ehlo()
    assert client.login(user) == "235 2.7.0 Authentication successful"


@pytest.mark.parametrize("recipient", OPEN_RELAY_RECIPIENTS)
@pytest.mark.parametrize(("role", "source"), [("submission", "127.0.0.1"), ("submissions", "127.0.0.1"), ("relay", "127.0.0.2")])
@pytest_twisted.ensureDeferred
async def test_no_open_relay(inv: Invariants, role: str, source: str, recipient: str) -> None:
    """Without AUTH (and, on the relay, from outside trusted_networks) MAIL is 530 5.7.0,
    whatever relay trick the recipient uses; nothing is delivered."""

    def attack() -> list[str]:
        client = inv.client(role, source=source)
        client.ehlo()
        if role != "submissions":
            client.starttls()
            client.ehlo()
        return [
            client.cmd("MAIL FROM:<spammer@example.net>"),
            client.cmd(f"RCPT TO:{recipient}"),
            client.cmd("DATA"),
        ]

    mail, rcpt, data = await inv.attack(attack)
    assert mail == "530 5.7.0 Authentication required"
    assert rcpt.startswith("503 5.5.1 ") and data.startswith("503 5.5.1 ")
    await inv.check(delivered=0, role=role, alive_source=source)


@pytest_twisted.ensureDeferred
async def test_untrusted_relay_client_in_plaintext(inv: Invariants) -> None:
    """The relay listener without TLS and from an untrusted address: 530 5.7.0, and AUTH
    needs TLS first."""

    def attack() -> list[str]:
        client = inv.client("relay", source="127.0.0.2")
        client.ehlo()
        return [client.cmd("MAIL FROM:<spammer@example.net>"), client.login()]

    assert await inv.attack(attack) == [
        "530 5.7.0 Authentication required",
        "538 5.7.11 Encryption required for requested authentication mechanism",
    ]
    await inv.check(delivered=0, role="relay", alive_source="127.0.0.2")


@pytest.mark.parametrize(
    "sender, reply",
    [
        ("<ceo@bank.example>", "553 5.7.1 Sender address not allowed for this account"),
        ("<>", "553 5.7.1 Sender address not allowed for this account"),
        ("<owner@example.com.evil.example>", "553 5.7.1 Sender address not allowed for this account"),
        ('<"owner@example.com"@evil.example>', "553 5.7.1 Sender address not allowed for this account"),
        ("<owner@example.com@evil.example>", "553 5.1.7 Bad sender address syntax"),
        ("<@example.com:ceo@bank.example>", "553 5.7.1 Sender address not allowed for this account"),
        ("<OWNER@EXAMPLE.COM>", "250 2.1.0 Sender ok"),
    ],
    ids=["foreign", "null", "suffix", "quoted", "double-at", "source-route", "case"],
)
@pytest_twisted.ensureDeferred
async def test_envelope_sender_restriction(inv: Invariants, role: str, sender: str, reply: str) -> None:
    """An account limited to owner@example.com cannot use another envelope sender,
    however it is dressed up; case does not matter (RFC 5321 §2.4 domains)."""

    def attack() -> str:
        client = inv.client(role)
        login_as(client, "restricted")
        return client.cmd(f"MAIL FROM:{sender}")

    assert await inv.attack(attack) == reply
    await inv.check(delivered=0, role=role)


@pytest.mark.parametrize(
    "headers",
    [
        b"From: ceo@bank.example\r\n",
        b"From: owner@example.com\r\nFrom: ceo@bank.example\r\n",
        b"From: owner@example.com, ceo@bank.example\r\n",
        b"From: owner@example.com\r\nSender: ceo@bank.example\r\n",
        b"From: owner@example.com\r\nResent-From: ceo@bank.example\r\n",
        b"From: =?utf-8?q?owner=40example.com?= <ceo@bank.example>\r\n",
        b'From: "owner@example.com" <ceo@bank.example>\r\n',
        b"From: Owner <owner@example.com> (ceo@bank.example)\r\nSender: <ceo@bank.example>\r\n",
        b"Subject: no author at all\r\n",
    ],
    ids=["foreign", "second-from", "two-mailboxes", "sender", "resent-from", "encoded-name", "quoted-name", "comment", "missing"],
)
@pytest_twisted.ensureDeferred
async def test_author_header_restriction(inv: Invariants, role: str, headers: bytes) -> None:
    """With an allowed envelope sender, a foreign author in any From/Sender/Resent-From
    mailbox is 550 5.7.1, after the dot, with nothing delivered."""

    def attack() -> str:
        client = inv.client(role)
        login_as(client, "restricted")
        return client.message(headers + b"To: bob@example.org\r\n\r\nhi\r\n", sender="owner@example.com")

    assert await inv.attack(attack) == "550 5.7.1 From: header address not allowed for this account"
    await inv.check(delivered=0, role=role)


@pytest_twisted.ensureDeferred
async def test_allowed_author_is_delivered(inv: Invariants, role: str) -> None:
    """Control for the cases above: the restricted account's own From: is delivered once."""

    def attack() -> str:
        client = inv.client(role)
        login_as(client, "restricted")
        body = b"From: Owner <owner@example.com>\r\nTo: bob@example.org\r\n\r\nhi\r\n"
        return client.message(body, sender="owner@example.com")

    assert (await inv.attack(attack)).startswith("250 ")
    await inv.check(delivered=1, role=role)


@pytest_twisted.ensureDeferred
async def test_mail_auth_parameter_is_ignored(inv: Invariants, role: str) -> None:
    """MAIL FROM's AUTH= parameter (RFC 4954 §5) cannot claim another identity: the
    account and envelope sender stay what the login allows."""

    def attack() -> str:
        client = inv.client(role)
        login_as(client, "restricted")
        assert client.cmd("MAIL FROM:<owner@example.com> AUTH=<ceo@bank.example>").startswith("250 ")
        assert client.cmd("RCPT TO:<bob@example.org>").startswith("250 ")
        assert client.cmd("DATA").startswith("354 ")
        client.send(b"From: owner@example.com\r\n\r\nhi\r\n.\r\n")
        return client.reply()[-1]

    assert (await inv.attack(attack)).startswith("250 ")
    document = inv.gateway.api.requests[-1].json()
    assert document["account"] == "restricted"
    assert document["envelope"]["mail_from"] == "owner@example.com"
    await inv.check(delivered=1, role=role)
