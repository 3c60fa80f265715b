"""SMTP AUTH in the session (RFC 4954): TLS only, strict parsing, delays and limits."""

from __future__ import annotations

import base64
import re
from ipaddress import ip_network

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from mailgate.accounts.memory import MemoryAccountStore
from tests.smtp_helpers import (
    ACCOUNTS,
    ALICE,
    BrokenStore,
    b64,
    connect,
    cram_response,
    plain,
    tls_client,
)


@pytest.fixture
def log_events():
    """Every twisted.logger event emitted during the test (info included), in order."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"


def ready(**kwargs) -> object:
    """A TLS session after EHLO, ready for AUTH, with no failure delay unless asked."""
    kwargs.setdefault("auth_failure_delay", 0)
    client = tls_client(**kwargs)
    client.ehlo()
    return client


def failed_reply(client, line: bytes | str) -> str:
    """Send a line whose login should fail; let the failure delay pass; return the reply."""
    lines = client.cmd(line)
    client.clock.advance(1000)
    lines += client.replies()
    assert len(lines) == 1, lines
    return lines[0]


# -- availability ---------------------------------------------------------------------


@pytest.mark.parametrize("role", ["submission", "relay"])
def test_auth_refused_before_tls(role):
    """AUTH in plaintext gets 538 5.7.11 and the password is never checked."""
    client = connect(role)
    client.ehlo()
    assert client.code(b"AUTH PLAIN " + plain("alice", "s3cret")) == (
        "538 5.7.11 Encryption required for requested authentication mechanism"
    )
    assert client.session.account is None


def test_auth_needs_ehlo():
    """AUTH before EHLO is 503 5.5.1."""
    client = tls_client()
    assert client.code(b"AUTH PLAIN " + plain("alice", "s3cret")).startswith("503 5.5.1")


def test_bare_auth():
    """AUTH without a mechanism gets 501 5.5.4 (no crash)."""
    client = ready()
    assert client.code("AUTH") == "501 5.5.4 AUTH requires a mechanism name"
    assert client.code("NOOP") == "250 2.0.0 Ok"


@pytest.mark.parametrize("mechanism", ["GSSAPI", "XOAUTH2", "CRAM-MD5", "PLAIN-X", "\xe9"])
def test_unknown_mechanism(mechanism):
    """An unknown mechanism (CRAM-MD5 when disabled) gets 504 5.5.4."""
    client = ready(cram_md5=False)
    assert (
        client.code(f"AUTH {mechanism}".encode())
        == "504 5.5.4 Unrecognised authentication mechanism"
    )


@pytest.mark.parametrize("name", ["plain", "Plain", "pLaIn"])
def test_mechanism_case_insensitive(name):
    """Mechanism names are case-insensitive."""
    client = ready()
    assert client.code(f"AUTH {name} ".encode() + plain("alice", "s3cret")) == AUTH_OK
    assert client.session.account is ALICE


# -- PLAIN ------------------------------------------------------------------------------


def test_plain_initial_response():
    """AUTH PLAIN with an initial response logs in; the account is the avatar."""
    client = ready()
    assert client.code(b"AUTH PLAIN " + plain("alice", "s3cret")) == AUTH_OK
    assert client.session.account is ALICE


def test_plain_continuation():
    """AUTH PLAIN without initial response gets an empty 334 and accepts the response line."""
    client = ready()
    assert client.cmd("AUTH PLAIN") == ["334 "]
    assert client.code(plain("alice", "s3cret")) == AUTH_OK


def test_plain_empty_initial_response():
    """AUTH PLAIN = (an empty initial response) is a malformed PLAIN message: 501 5.5.2."""
    client = ready()
    assert client.code("AUTH PLAIN =") == "501 5.5.2 Malformed PLAIN response"
    assert client.code("NOOP") == "250 2.0.0 Ok"


@pytest.mark.parametrize("message", ["alice\0s3cret", "\0alice\0s3cret\0", "a\0b\0c\0d"])
def test_plain_wrong_part_count(message):
    """PLAIN with two or four parts gets 501 5.5.2, not a crash."""
    client = ready()
    assert client.code(b"AUTH PLAIN " + b64(message)) == "501 5.5.2 Malformed PLAIN response"
    assert client.session.account is None


@pytest.mark.parametrize(
    "argument",
    [
        b" " + plain("alice", "s3cret"),
        plain("alice", "s3cret") + b"\t",
        b"!" + plain("alice", "s3cret"),
        plain("alice", "s3cret")[:-1],
        plain("alice", "s3cret") + b"==",
    ],
)
def test_plain_junk_around_base64(argument):
    """Whitespace or junk around the base64, or broken padding, gets 501 5.5.2."""
    client = ready()
    assert client.code(b"AUTH PLAIN " + argument) == "501 5.5.2 Cannot decode response"
    assert client.session.account is None


def test_plain_junk_in_continuation():
    """A continuation line with surrounding space is refused as undecodable."""
    client = ready()
    client.cmd("AUTH PLAIN")
    assert client.code(b" " + plain("alice", "s3cret")) == "501 5.5.2 Cannot decode response"


def test_plain_foreign_authzid():
    """An authorization identity different from the user gets 535 5.7.8 even with the right password."""
    client = ready()
    assert (
        failed_reply(client, b"AUTH PLAIN " + plain("alice", "s3cret", authzid="bob"))
        == AUTH_FAILED
    )
    assert client.session.account is None


def test_plain_matching_authzid():
    """An authorization identity equal to the user is accepted."""
    client = ready()
    assert client.code(b"AUTH PLAIN " + plain("alice", "s3cret", authzid="alice")) == AUTH_OK


@pytest.mark.parametrize(
    "user, password", [("", "s3cret"), ("alice", ""), ("alice", "wrong"), ("eve", "x")]
)
def test_plain_bad_credentials(user, password):
    """Empty or wrong credentials get 535 5.7.8."""
    client = ready()
    assert failed_reply(client, b"AUTH PLAIN " + plain(user, password)) == AUTH_FAILED
    assert client.session.account is None


def test_plain_utf8_credentials():
    """UTF-8 user names and passwords with spaces work."""
    client = ready()
    assert client.code(b"AUTH PLAIN " + plain("dave@example.com", "pw d")) == AUTH_OK


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_cancel(mechanism):
    """ "*" cancels the exchange with 501 5.7.0; the session goes on."""
    client = ready()
    assert client.cmd(f"AUTH {mechanism}")[0].startswith("334 ")
    assert client.code("*") == "501 5.7.0 Authentication cancelled"
    assert client.code("NOOP") == "250 2.0.0 Ok"


# -- LOGIN -------------------------------------------------------------------------------


def test_login_without_initial_response():
    """AUTH LOGIN asks for Username: and Password: in base64 and logs in."""
    client = ready()
    assert client.cmd("AUTH LOGIN") == ["334 " + base64.b64encode(b"Username:").decode()]
    assert client.cmd(b64("alice")) == ["334 " + base64.b64encode(b"Password:").decode()]
    assert client.code(b64("s3cret")) == AUTH_OK
    assert client.session.account is ALICE


def test_login_with_initial_response():
    """AUTH LOGIN <user> asks only for the password."""
    client = ready()
    assert client.cmd(b"AUTH LOGIN " + b64("alice")) == ["334 UGFzc3dvcmQ6"]
    assert client.code(b64("s3cret")) == AUTH_OK


def test_login_wrong_password():
    """AUTH LOGIN with a wrong password gets 535 5.7.8."""
    client = ready()
    client.cmd(b"AUTH LOGIN " + b64("alice"))
    assert failed_reply(client, b64("nope")) == AUTH_FAILED


def test_login_commands_during_exchange_are_responses():
    """While AUTH waits for a response, the next line is the response, not a command."""
    client = ready()
    client.cmd("AUTH LOGIN")
    assert client.cmd("MAIL FROM:<a@b.example>") == ["501 5.5.2 Cannot decode response"]
    assert client.session._sender is None
    client.cmd("AUTH LOGIN")
    assert client.cmd("RSET") == ["334 UGFzc3dvcmQ6"]  # "RSET" is valid base64: a username


# -- CRAM-MD5 ----------------------------------------------------------------------------

_CHALLENGE = re.compile(rb"<[0-9a-f]{32}\.\d+@mx\.test>\Z")


def cram_challenge(client) -> bytes:
    lines = client.cmd("AUTH CRAM-MD5")
    assert len(lines) == 1 and lines[0].startswith("334 ")
    return base64.b64decode(lines[0][4:])


def test_cram_md5_success():
    """A correct HMAC-MD5 over the challenge actually sent logs in."""
    client = ready(cram_md5=True)
    challenge = cram_challenge(client)
    assert _CHALLENGE.match(challenge), challenge
    assert client.code(cram_response("alice", "s3cret", challenge)) == AUTH_OK
    assert client.session.account is ALICE


def test_cram_md5_wrong_digest():
    """A digest over a different password or challenge gets 535 5.7.8."""
    client = ready(cram_md5=True)
    challenge = cram_challenge(client)
    assert failed_reply(client, cram_response("alice", "wrong", challenge)) == AUTH_FAILED
    cram_challenge(client)
    assert (
        failed_reply(client, cram_response("alice", "s3cret", challenge)) == AUTH_FAILED
    )  # replayed


@pytest.mark.parametrize("response", [b"alice", b"alice " + b"z" * 32, b"alice 1234", b""])
def test_cram_md5_malformed(response):
    """A CRAM-MD5 response without a space, or with a non-hex digest, gets 501 5.5.2 (no crash)."""
    client = ready(cram_md5=True)
    cram_challenge(client)
    assert client.code(b64(response)) == "501 5.5.2 Malformed CRAM-MD5 response"
    assert client.code("NOOP") == "250 2.0.0 Ok"


def test_cram_md5_initial_response_refused():
    """CRAM-MD5 takes no initial response: 501 5.5.4."""
    client = ready(cram_md5=True)
    assert client.code(b"AUTH CRAM-MD5 " + b64("alice")).startswith("501 5.5.4")


def test_cram_md5_challenges_unique_across_sessions():
    """Each session gets a different, well-formed challenge with 128 random bits."""
    challenges = set()
    for _ in range(50):
        challenge = cram_challenge(ready(cram_md5=True))
        assert _CHALLENGE.match(challenge)
        challenges.add(challenge.split(b".")[0])
    assert len(challenges) == 50


def test_cram_md5_store_without_support():
    """If the store cannot check CRAM-MD5, a correct response still fails with 535."""
    client = ready(cram_md5=True, store=MemoryAccountStore(ACCOUNTS, cram_md5=False))
    challenge = cram_challenge(client)
    assert failed_reply(client, cram_response("alice", "s3cret", challenge)) == AUTH_FAILED


# -- sequencing ---------------------------------------------------------------------------


def test_second_auth_after_success():
    """AUTH after a successful AUTH is 503 5.5.1."""
    client = ready()
    client.login()
    assert (
        client.code(b"AUTH PLAIN " + plain("bob", "hunter2")) == "503 5.5.1 Already authenticated"
    )
    assert client.session.account is ALICE


def test_auth_during_transaction():
    """AUTH during a mail transaction is 503 5.5.1."""
    client = connect(
        "relay",
        peer="127.0.0.1",
        trusted_networks=(ip_network("127.0.0.0/8"),),
        trusted_account=ALICE,
    )
    client.ehlo()
    client.starttls()
    client.ehlo()
    assert client.code("MAIL FROM:<a@b.example>").startswith("250")
    assert client.code(b"AUTH PLAIN " + plain("alice", "s3cret")) == (
        "503 5.5.1 AUTH not allowed during a mail transaction"
    )


def test_auth_pipelined_with_mail():
    """A pipelined AUTH PLAIN + MAIL: MAIL is answered only after the login completes."""
    client = ready()
    lines = client.send(
        b"AUTH PLAIN " + plain("alice", "s3cret") + b"\r\nMAIL FROM:<alice@example.com>\r\n"
    )
    assert lines == [AUTH_OK, "250 2.1.0 Sender ok"]


# -- failures: delays, limit, store errors -----------------------------------------------


def test_failure_answered_after_delay():
    """A failed login is answered only after the failure delay, growing with each failure."""
    client = ready(auth_failure_delay=1.0, max_auth_failures=3)
    assert client.cmd(b"AUTH PLAIN " + plain("alice", "bad")) == []
    client.clock.advance(0.99)
    assert client.replies() == []
    client.clock.advance(0.02)
    assert client.replies() == [AUTH_FAILED]
    assert client.cmd(b"AUTH PLAIN " + plain("alice", "bad")) == []
    client.clock.advance(1.5)
    assert client.replies() == []
    client.clock.advance(0.6)
    assert client.replies() == [AUTH_FAILED]


def test_commands_wait_for_delayed_failure():
    """Commands pipelined after a failing AUTH are answered after its delayed reply, in order."""
    client = ready(auth_failure_delay=2.0)
    assert client.send(b"AUTH PLAIN " + plain("alice", "bad") + b"\r\nNOOP\r\n") == []
    client.clock.advance(2.0)
    assert client.replies() == [AUTH_FAILED, "250 2.0.0 Ok"]


def test_idle_timeout_not_counted_during_failure_delay():
    """The failure delay is not the client's idle time."""
    client = ready(auth_failure_delay=400.0, command_timeout=300)
    client.cmd(b"AUTH PLAIN " + plain("alice", "bad"))
    client.clock.advance(399)
    assert client.replies() == []
    client.clock.advance(1)
    assert client.replies() == [AUTH_FAILED]
    assert not client.closed


def test_too_many_failures_close():
    """The max_auth_failures-th failure gets 421 4.7.0 and the connection is closed."""
    client = ready(max_auth_failures=3, auth_failure_delay=1.0)
    for _ in range(2):
        assert failed_reply(client, b"AUTH PLAIN " + plain("alice", "bad")) == AUTH_FAILED
    assert client.cmd(b"AUTH PLAIN " + plain("alice", "bad")) == [
        "421 4.7.0 Too many authentication failures, closing connection"
    ]
    assert client.closed


def test_failure_limit_counts_all_mechanisms():
    """Failures with different mechanisms add up to the same limit."""
    client = ready(max_auth_failures=2, cram_md5=True)
    assert failed_reply(client, b"AUTH PLAIN " + plain("alice", "bad")) == AUTH_FAILED
    challenge = cram_challenge(client)
    assert client.code(cram_response("alice", "bad", challenge)).startswith("421 4.7.0")
    assert client.closed


def test_disconnect_during_failure_delay():
    """A client that disconnects during the failure delay gets nothing written and no error is logged."""
    client = ready(auth_failure_delay=5.0)
    client.cmd(b"AUTH PLAIN " + plain("alice", "bad"))
    client.transport.loseConnection()
    client.clock.advance(10)
    assert client.replies() == []


def test_store_error_is_tempfail_without_leak(logged_errors):
    """A failing account store gets 454 4.7.0; the error is logged, never shown to the client."""
    client = ready(store=BrokenStore({}))
    lines = client.cmd(b"AUTH PLAIN " + plain("alice", "s3cret"))
    assert lines == ["454 4.7.0 Temporary authentication failure"]
    assert client.session.account is None
    assert client.code("NOOP") == "250 2.0.0 Ok"
    [event] = logged_errors.take()
    assert event["log_failure"].check(RuntimeError)
    assert "secret-detail" not in "".join(lines)


def test_store_unauthorized_is_not_logged_as_failure(log_events):
    """A wrong password is logged as an info event, not as an error (the suite fails on logged errors)."""
    client = ready()
    failed_reply(client, b"AUTH PLAIN " + plain("alice", "bad"))
    assert not any("log_failure" in event for event in log_events)
    assert any(
        event.get("mechanism") == "PLAIN" and event.get("count") == 1 for event in log_events
    )


def test_secrets_not_logged(log_events):
    """Passwords never appear in log events, on success or failure."""
    client = ready()
    failed_reply(client, b"AUTH PLAIN " + plain("alice", "wrong-pw-123"))
    client.login()
    text = repr(log_events)
    assert "wrong-pw-123" not in text and "s3cret" not in text


def test_slow_store_blocks_following_commands():
    """While the store has not answered, later commands wait; they are answered after the verdict."""
    pending: list[defer.Deferred] = []

    class SlowStore(MemoryAccountStore):
        def authenticate_password(self, username, password):
            d = defer.Deferred()
            pending.append(d)
            return d

    client = ready(store=SlowStore(ACCOUNTS))
    assert client.send(b"AUTH PLAIN " + plain("alice", "s3cret") + b"\r\nNOOP\r\n") == []
    pending[0].errback(UnauthorizedLogin())
    assert client.replies() == []  # failure delay 0 still goes through the clock
    client.clock.advance(0)
    assert client.replies() == [AUTH_FAILED, "250 2.0.0 Ok"]


# -- line limits ---------------------------------------------------------------------------


def test_auth_line_may_exceed_512():
    """An AUTH line may be longer than 512 octets (RFC 4954 §4)."""
    client = ready()
    long_password = "p" * 600
    line = b"AUTH PLAIN " + plain("alice", long_password)
    assert len(line) > 512
    assert failed_reply(client, line) == AUTH_FAILED


def test_auth_line_over_cap_refused():
    """An AUTH line over 12288 octets is refused as too long, even when it arrives complete."""
    client = ready()
    line = b"AUTH PLAIN " + b64("\0alice\0" + "p" * 20000)
    assert client.code(line) == "500 5.5.2 Line too long"
    assert client.code("NOOP") == "250 2.0.0 Ok"


def test_auth_continuation_over_cap_refused():
    """A response line over 12288 octets ends the exchange with 500 5.5.2."""
    client = ready()
    client.cmd("AUTH LOGIN")
    assert client.code(b64("u" * 20000)) == "500 5.5.2 Line too long"
    assert client.session._auth is None
    assert client.code("NOOP") == "250 2.0.0 Ok"
