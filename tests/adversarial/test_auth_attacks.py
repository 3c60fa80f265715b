"""AUTH (SECURITY.md): parsing, sequencing, brute force within and across connections.

The test accounts are ``alice`` and ``restricted`` (tests/integration/conftest.py),
with CRAM-MD5 enabled.  Per session: 3 failures, the third closing with 421.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest
import pytest_twisted

from tests.integration.conftest import PASSWORDS

from .invariants import Invariants, RawClient, plain_token

ALICE = PASSWORDS["alice"]


def secure(client: RawClient) -> None:
    """EHLO under TLS (STARTTLS where the listener needs it), ready for AUTH."""
    client.ehlo()
    if client.role != "submissions":
        client.starttls()
        client.ehlo()


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


@pytest.mark.parametrize("role", ["submission", "relay"])
@pytest_twisted.ensureDeferred
async def test_auth_not_offered_or_accepted_before_tls(inv: Invariants, role: str) -> None:
    """In plaintext AUTH is not advertised, and a correct PLAIN login is 538 5.7.11 (RFC 4954 §4)."""

    def attack() -> tuple[list[str], str]:
        client = inv.client(role)
        ehlo = client.ehlo()
        return ehlo, client.login()

    ehlo, reply = await inv.attack(attack)
    assert not any("AUTH" in line for line in ehlo)
    assert reply == "538 5.7.11 Encryption required for requested authentication mechanism"
    await inv.check(delivered=0, role=role)


@pytest.mark.parametrize(
    "line, reply",
    [
        (b"AUTH", "501 5.5.4 AUTH requires a mechanism name"),
        (b"AUTH GSSAPI", "504 5.5.4 Unrecognised authentication mechanism"),
        (b"AUTH XOAUTH2 dXNlcg==", "504 5.5.4 Unrecognised authentication mechanism"),
        (b"AUTH PLAIN " + b64(b"alice\x00" + ALICE.encode()), "501 5.5.2 Malformed PLAIN response"),
        (b"AUTH PLAIN " + b64(b"a\x00alice\x00" + ALICE.encode() + b"\x00x"), "501 5.5.2 Malformed PLAIN response"),
        (b"AUTH PLAIN " + b64(b"restricted\x00alice\x00" + ALICE.encode()), "535 5.7.8 Authentication credentials invalid"),
        (b"AUTH PLAIN  " + plain_token("alice", ALICE), "501 5.5.2 Cannot decode response"),
        (b"AUTH PLAIN " + plain_token("alice", ALICE) + b" junk", "501 5.5.2 Cannot decode response"),
        (b"AUTH PLAIN " + plain_token("alice", ALICE)[:-1], "501 5.5.2 Cannot decode response"),
        (b"AUTH PLAIN " + plain_token("alice", ALICE) + b"==", "501 5.5.2 Cannot decode response"),
        (b"AUTH PLAIN !!!!", "501 5.5.2 Cannot decode response"),
        (b"AUTH PLAIN =", "501 5.5.2 Malformed PLAIN response"),
        (b"AUTH PLAIN " + b64(b"\x00\xff\xfe\x00pw"), "501 5.5.2 Malformed PLAIN response"),
        (b"AUTH PLAIN " + b64(b"\x00alice\x00"), "535 5.7.8 Authentication credentials invalid"),
        (b"AUTH PLAIN " + b64(b"\x00nobody\x00" + ALICE.encode()), "535 5.7.8 Authentication credentials invalid"),
        (b"AUTH PLAIN " + plain_token("alice", "wrong"), "535 5.7.8 Authentication credentials invalid"),
        (b"AUTH CRAM-MD5 " + b64(b"alice 0123"), "501 5.5.4 This mechanism takes no initial response"),
    ],
    ids=[
        "bare", "gssapi", "xoauth2", "plain-2-parts", "plain-4-parts", "foreign-authzid",
        "leading-space", "trailing-junk", "truncated", "extra-padding", "not-base64", "empty",
        "non-utf8", "empty-password", "unknown-user", "wrong-password", "cram-initial",
    ],
)  # fmt: skip
@pytest_twisted.ensureDeferred
async def test_malformed_or_refused_auth(inv: Invariants, role: str, line: bytes, reply: str) -> None:
    """Each malformed or refused AUTH gets its precise reply, no login, and the session goes on."""

    def attack() -> tuple[str, str]:
        client = inv.client(role)
        secure(client)
        refused = client.cmd(line)
        return refused, client.cmd("MAIL FROM:<alice@example.com>")

    refused, mail = await inv.attack(attack)
    assert refused == reply
    expected_mail = "250 " if role == "relay" else "530 5.7.0 Authentication required"
    assert mail.startswith(expected_mail)
    await inv.check(delivered=0, role=role)


@pytest.mark.parametrize(
    "response, reply",
    [
        (b"*", "501 5.7.0 Authentication cancelled"),
        (b"not base64!", "501 5.5.2 Cannot decode response"),
        (b"A" * 13000, "500 5.5.2 Line too long"),
        (b64(b"\xff\xfe"), "501 5.5.2 Cannot decode response"),
    ],
    ids=["cancel", "junk", "12k-username", "non-utf8"],
)
@pytest_twisted.ensureDeferred
async def test_login_exchange_abuse(inv: Invariants, role: str, response: bytes, reply: str) -> None:
    """Inside the AUTH LOGIN exchange: cancel, junk, a 13 KB line and non-UTF-8 end it cleanly."""

    def attack() -> tuple[str, str]:
        client = inv.client(role)
        secure(client)
        assert client.cmd("AUTH LOGIN") == "334 VXNlcm5hbWU6"
        return client.cmd(response), client.cmd("NOOP")

    assert await inv.attack(attack) == (reply, "250 2.0.0 Ok")
    await inv.check(delivered=0, role=role)


@pytest.mark.parametrize(
    "make_response, reply",
    [
        (lambda challenge: b64(b"alice"), "501 5.5.2 Malformed CRAM-MD5 response"),
        (lambda challenge: b64(b"alice nothex"), "501 5.5.2 Malformed CRAM-MD5 response"),
        (lambda challenge: b64(b"alice " + b"0" * 32), "535 5.7.8 Authentication credentials invalid"),
        (
            lambda challenge: b64(b"alice " + hmac.new(b"wrong", challenge, hashlib.md5).hexdigest().encode()),
            "535 5.7.8 Authentication credentials invalid",
        ),
        (
            lambda challenge: b64(b"alice " + hmac.new(ALICE.encode(), challenge, hashlib.md5).hexdigest().encode()),
            "235 2.7.0 Authentication successful",
        ),
    ],
    ids=["no-space", "not-hex", "zero-digest", "wrong-password", "correct"],
)
@pytest_twisted.ensureDeferred
async def test_cram_md5_responses(inv: Invariants, role: str, make_response: object, reply: str) -> None:
    """CRAM-MD5 responses: malformed is 501, wrong is 535, right logs in (RFC 2195); no crash."""

    def attack() -> str:
        client = inv.client(role)
        secure(client)
        challenge_line = client.cmd("AUTH CRAM-MD5")
        assert challenge_line.startswith("334 ")
        challenge = base64.b64decode(challenge_line[4:])
        return client.cmd(make_response(challenge))  # type: ignore[operator]

    assert await inv.attack(attack) == reply
    await inv.check(delivered=0, role=role)


@pytest_twisted.ensureDeferred
async def test_cram_md5_challenges_are_unique_and_unpredictable(inv: Invariants) -> None:
    """Twenty challenges over four sessions: all different, each with 128 random bits
    (RFC 2195 §2 needs unique challenges; Twisted's own came from ``random``)."""

    def attack() -> list[bytes]:
        challenges = []
        for _ in range(4):
            client = inv.client("submissions")
            secure(client)
            for _ in range(5):  # Each cancel is an error reply; 10 would end the session.
                challenges.append(base64.b64decode(client.cmd("AUTH CRAM-MD5")[4:]))
                assert client.cmd("*") == "501 5.7.0 Authentication cancelled"
            client.quit()
        return challenges

    challenges = await inv.attack(attack)
    randoms = [re.fullmatch(rb"<([0-9a-f]{32})\.\d+@localhost>", c).group(1) for c in challenges]  # type: ignore[union-attr]
    assert len(set(randoms)) == 20
    await inv.check(delivered=0, role="submissions")


@pytest_twisted.ensureDeferred
async def test_repeated_failures_in_one_session(inv: Invariants, role: str) -> None:
    """Wrong passwords on one connection are answered slowly, and the third ends it with 421."""

    def attack() -> list[str]:
        client = inv.client(role)
        secure(client)
        replies = [client.cmd(b"AUTH PLAIN " + plain_token("alice", f"guess{i}")) for i in range(2)]
        client.send(b"AUTH PLAIN " + plain_token("alice", "guess3") + b"\r\n")
        return replies + client.read_until_closed()

    assert await inv.attack(attack) == [
        "535 5.7.8 Authentication credentials invalid",
        "535 5.7.8 Authentication credentials invalid",
        "421 4.7.0 Too many authentication failures, closing connection",
    ]
    await inv.check(delivered=0, role=role)


@pytest.mark.parametrize("gateway_limits", ["exempt_networks = []\nmax_auth_failures_per_ip = 4"])
@pytest_twisted.ensureDeferred
async def test_failures_across_connections_are_throttled_per_client(inv: Invariants, role: str) -> None:
    """Four failures spread over two connections use up 127.0.0.1's budget: its next AUTH,
    even with the right password, gets 421 4.7.0 without a verdict; 127.0.0.2 still logs
    in and sends."""

    def attack() -> tuple[str, list[str], str]:
        for _ in range(2):
            client = inv.client(role)
            secure(client)
            for guess in ("guess-a", "guess-b"):
                assert client.cmd(b"AUTH PLAIN " + plain_token("alice", guess)).startswith("535 ")
            client.quit()
        throttled = inv.client(role)
        secure(throttled)
        throttled.send(b"AUTH PLAIN " + plain_token("alice", ALICE) + b"\r\n")
        refused = throttled.read_until_closed()
        elsewhere = inv.client(role, source="127.0.0.2")
        secure(elsewhere)
        login = elsewhere.login()
        return login, refused, elsewhere.message()

    login, refused, verdict = await inv.attack(attack)
    assert refused == ["421 4.7.0 Too many authentication failures from your address, try again later"]
    assert login == "235 2.7.0 Authentication successful"
    assert verdict.startswith("250 ")
    await inv.check(delivered=1, role=role, alive_source="127.0.0.2")


@pytest_twisted.ensureDeferred
async def test_second_auth_after_success(inv: Invariants, role: str) -> None:
    """A second AUTH after a successful one is 503 5.5.1 (RFC 4954 §4)."""

    def attack() -> tuple[str, str]:
        client = inv.client(role)
        secure(client)
        assert client.login() == "235 2.7.0 Authentication successful"
        return client.login("restricted"), client.message()

    second, verdict = await inv.attack(attack)
    assert second == "503 5.5.1 Already authenticated"
    assert verdict.startswith("250 ")
    await inv.check(delivered=1, role=role)


@pytest_twisted.ensureDeferred
async def test_auth_during_transaction(inv: Invariants) -> None:
    """AUTH after MAIL (a trusted relay client) is 503 5.5.1 (RFC 4954 §4)."""

    def attack() -> str:
        client = inv.client("relay")
        secure(client)
        assert client.cmd("MAIL FROM:<alice@example.com>").startswith("250 ")
        return client.login()

    assert await inv.attack(attack) == "503 5.5.1 AUTH not allowed during a mail transaction"
    await inv.check(delivered=0, role="relay")


@pytest_twisted.ensureDeferred
async def test_auth_before_ehlo(inv: Invariants, role: str) -> None:
    """AUTH after HELO (no ESMTP) is 503 5.5.1: AUTH is an ESMTP extension."""

    def attack() -> str:
        client = inv.client(role)
        if role != "submissions":
            client.ehlo()
            client.starttls()
        assert client.cmd("HELO client.example").startswith("250 ")
        return client.login()

    assert await inv.attack(attack) == "503 5.5.1 Send EHLO/HELO first"
    await inv.check(delivered=0, role=role)


@pytest_twisted.ensureDeferred
async def test_mechanism_names_are_case_insensitive(inv: Invariants, role: str) -> None:
    """"auth plain" logs in like "AUTH PLAIN" (RFC 4954 §4: mechanism names are case-insensitive)."""

    def attack() -> tuple[str, str]:
        client = inv.client(role)
        secure(client)
        return client.cmd(b"auth plain " + plain_token("alice", ALICE)), client.message()

    login, verdict = await inv.attack(attack)
    assert login == "235 2.7.0 Authentication successful"
    assert verdict.startswith("250 ")
    await inv.check(delivered=1, role=role)


@pytest_twisted.ensureDeferred
async def test_mail_pipelined_behind_failed_auth(inv: Invariants, role: str) -> None:
    """MAIL pipelined behind a failing AUTH waits for its verdict and is then refused."""

    def attack() -> list[str]:
        client = inv.client(role)
        secure(client)
        client.send(b"AUTH PLAIN " + plain_token("alice", "wrong") + b"\r\nMAIL FROM:<alice@example.com>\r\n")
        return client.replies(2)

    replies = await inv.attack(attack)
    assert replies[0] == "535 5.7.8 Authentication credentials invalid"
    assert replies[1].startswith("250 " if role == "relay" else "530 5.7.0 ")
    await inv.check(delivered=0, role=role)
