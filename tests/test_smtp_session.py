"""The SMTP session outside DATA and AUTH: greeting, EHLO, STARTTLS, roles, envelope, limits."""

from __future__ import annotations

from ipaddress import ip_network

import pytest

from mailgate import smtp
from mailgate.accounts.memory import MemoryAccountStore
from tests.smtp_helpers import (
    ACCOUNTS,
    TLS_CONTEXT,
    TRUSTED,
    FakeDeliverer,
    authed_client,
    check_reply_lines,
    connect,
    relay_client,
    tls_client,
)

TRUSTED_NETS = (ip_network("127.0.0.0/8"),)


# -- greeting and EHLO ------------------------------------------------------------------


def test_greeting():
    """A new connection is greeted with 220 and the host name."""
    client = connect()
    assert client.session.transport is client.transport  # greeting checked by connect()


def test_ehlo_plaintext_extensions():
    """EHLO before TLS advertises SIZE, PIPELINING, 8BITMIME, ENHANCEDSTATUSCODES, STARTTLS, and no AUTH."""
    client = connect("submission", max_message_size=12345)
    lines = client.ehlo()
    assert lines[0] == "250-mx.test greets client.test [192.0.2.10]"
    assert client.extensions() == [
        "SIZE 12345",
        "8BITMIME",
        "PIPELINING",
        "ENHANCEDSTATUSCODES",
        "STARTTLS",
    ]


def test_ehlo_under_tls_offers_auth_not_starttls():
    """On the implicit-TLS port EHLO offers AUTH PLAIN LOGIN and no STARTTLS."""
    client = tls_client("submissions")
    extensions = client.extensions()
    assert "STARTTLS" not in extensions
    assert "AUTH PLAIN LOGIN" in extensions


def test_ehlo_after_starttls_offers_auth_not_starttls():
    """After STARTTLS, EHLO offers AUTH and no longer STARTTLS."""
    client = tls_client("submission")
    extensions = client.extensions()
    assert "STARTTLS" not in extensions
    assert "AUTH PLAIN LOGIN" in extensions


def test_ehlo_cram_md5_only_when_enabled():
    """CRAM-MD5 is advertised only when the listener's store supports it."""
    assert "AUTH PLAIN LOGIN CRAM-MD5" in tls_client(cram_md5=True).extensions()
    assert "AUTH PLAIN LOGIN" in tls_client(cram_md5=False).extensions()


def test_ehlo_after_auth_no_longer_offers_auth():
    """Once authenticated, EHLO stops advertising AUTH."""
    client = authed_client()
    assert not any(ext.startswith("AUTH") for ext in client.extensions())


@pytest.mark.parametrize(
    "kwargs",
    [{"tls_transport": False}, {"tls": None}],
    ids=["transport-without-tls", "no-certificate"],
)
def test_no_starttls_where_unusable(kwargs):
    """STARTTLS is not advertised when the transport or the listener cannot do TLS."""
    client = connect("relay", **kwargs)
    assert "STARTTLS" not in client.extensions()


def test_helo_reply_has_no_extensions():
    """HELO gets a one-line 250 without extensions."""
    client = connect()
    assert client.cmd("HELO client.test") == ["250 mx.test greets client.test [192.0.2.10]"]


@pytest.mark.parametrize(
    "line",
    [
        b"EHLO",
        b"EHLO a b",
        b"EHLO a\tb",
        b"EHLO a\x01b",
        b"EHLO a\x7fb",
        b"EHLO \xc3\xa9.test",
        b"HELO",
        b"EHLO " + b"a" * 256,
    ],
)
def test_ehlo_bad_argument(line):
    """A missing or unprintable EHLO/HELO argument gets 501 5.5.4 and the session stays un-greeted."""
    client = connect()
    assert client.code(line).startswith("501 5.5.4")
    assert client.code("MAIL FROM:<a@b.example>").startswith("503 5.5.1")


def test_ehlo_bare_lf_injects_nothing():
    """A bare LF inside the EHLO argument is one bad command (500 5.5.2); nothing lands in the session."""
    client = connect()
    assert client.send(b"EHLO evil\nReceived: forged\r\n") == [
        "500 5.5.2 Bare LF or CR in command line is not allowed"
    ]
    assert client.session._helo is None
    assert client.code("MAIL FROM:<a@b.example>").startswith("503 5.5.1")


def test_ehlo_resets_transaction():
    """EHLO in the middle of a transaction forgets the sender (RFC 5321 §4.1.4)."""
    client = authed_client()
    assert client.code("MAIL FROM:<a@b.example>").startswith("250 2.1.0")
    client.ehlo()
    assert client.code("RCPT TO:<c@d.example>").startswith("503 5.5.1")


# -- STARTTLS ---------------------------------------------------------------------------


def test_starttls_discards_pipelined_commands():
    """Commands sent after STARTTLS in the same packet are never answered (CVE-2011-0411)."""
    client = connect()
    client.ehlo()
    assert client.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<a@b.example>\r\n") == [
        "220 2.0.0 Ready to start TLS"
    ]
    assert client.transport.tls_started
    assert client.transport.tls_contexts == [TLS_CONTEXT]
    assert client.session._buffer == b""
    assert not client.closed
    # The next thing read is the first command inside TLS.
    assert client.code("NOOP") == "250 2.0.0 Ok"


def test_starttls_forgets_ehlo_and_transaction():
    """After STARTTLS, MAIL without a new EHLO is 503 5.5.1 (state from before TLS is gone)."""
    client = relay_client(tls_transport=True)
    assert client.code("MAIL FROM:<a@b.example>").startswith("250 2.1.0")
    client.starttls()
    assert client.code("MAIL FROM:<a@b.example>") == "503 5.5.1 Send EHLO/HELO first"
    assert client.code("RCPT TO:<c@d.example>").startswith("503 5.5.1")


def test_starttls_twice():
    """A second STARTTLS is refused with 503 5.5.1."""
    client = tls_client("submission")
    client.ehlo()
    assert client.code("STARTTLS") == "503 5.5.1 TLS already active"
    assert client.transport.tls_contexts == [TLS_CONTEXT]


def test_starttls_with_argument():
    """STARTTLS takes no argument: 501 5.5.4 and TLS is not started."""
    client = connect()
    client.ehlo()
    assert client.code("STARTTLS now").startswith("501 5.5.4")
    assert not client.transport.tls_started


def test_starttls_on_submissions():
    """STARTTLS on the implicit-TLS port is 503 5.5.1."""
    client = tls_client("submissions")
    client.ehlo()
    assert client.code("STARTTLS") == "503 5.5.1 TLS already active"


@pytest.mark.parametrize("kwargs", [{"tls_transport": False}, {"tls": None}])
def test_starttls_unavailable(kwargs):
    """STARTTLS where TLS cannot be started gets 454 4.7.0 and the session goes on."""
    client = connect("relay", **kwargs)
    client.ehlo()
    assert client.code("STARTTLS") == "454 4.7.0 TLS not available"
    assert client.code("NOOP") == "250 2.0.0 Ok"


def test_tls_handshake_timeout():
    """If the STARTTLS handshake never completes, the connection is aborted after the timeout."""
    client = connect("submission", tls_handshake_timeout=30)
    client.ehlo()
    assert client.code("STARTTLS").startswith("220 2.0.0")
    client.clock.advance(29)
    assert not client.transport.disconnected
    client.clock.advance(2)
    assert client.transport.disconnected
    assert client.replies() == []


def test_implicit_tls_handshake_timeout():
    """On submissions, a client that never finishes the handshake is aborted."""
    client = connect("submissions", tls_handshake_timeout=30)
    client.clock.advance(31)
    assert client.transport.disconnected


def test_handshake_completed_cancels_timeout():
    """A completed handshake cancels the handshake timer."""
    client = connect("submissions", tls_handshake_timeout=30)
    client.session.handshakeCompleted()
    client.clock.advance(31)
    assert not client.transport.disconnected
    assert client.code("NOOP") == "250 2.0.0 Ok"


# -- roles -------------------------------------------------------------------------------


def test_submission_without_tls_requires_starttls():
    """On submission in plaintext, MAIL is 530 5.7.0 (STARTTLS first)."""
    client = connect("submission")
    client.ehlo()
    assert client.code("MAIL FROM:<a@b.example>") == "530 5.7.0 Must issue a STARTTLS command first"


def test_submission_with_tls_requires_auth():
    """On submission after TLS but without AUTH, MAIL is 530 5.7.0."""
    client = tls_client("submission")
    client.ehlo()
    assert client.code("MAIL FROM:<a@b.example>") == "530 5.7.0 Authentication required"


def test_submissions_requires_auth():
    """On submissions without AUTH, MAIL is 530 5.7.0."""
    client = tls_client("submissions")
    client.ehlo()
    assert client.code("MAIL FROM:<a@b.example>") == "530 5.7.0 Authentication required"


def test_relay_trusted_network_needs_no_auth():
    """On relay, a peer in trusted_networks sends without AUTH, as the trusted account."""
    client = relay_client()
    assert client.code("MAIL FROM:<a@b.example>") == "250 2.1.0 Sender ok"
    assert client.session._transaction_account is TRUSTED


def test_relay_trusted_ipv4_mapped_ipv6_peer():
    """An IPv4-mapped IPv6 peer address matches an IPv4 trusted network."""
    client = relay_client(peer="::ffff:127.0.0.1", ipv6=True)
    assert client.code("MAIL FROM:<a@b.example>") == "250 2.1.0 Sender ok"


def test_ipv4_client_of_a_dual_stack_socket_is_named_in_ipv4_form():
    """``::ffff:a.b.c.d`` (systemd's dual-stack ListenStream=25) is shown and recorded as
    a.b.c.d, so one client has one address in greetings, logs and Received headers."""
    client = relay_client(peer="::ffff:127.0.0.1", ipv6=True)
    assert client.session.peer_ip == "127.0.0.1"
    assert client.message()[-1].startswith("250 2.0.0")
    assert client.deliverer.calls[0].email.raw.startswith(b"Received: from client.test ([127.0.0.1])\r\n")


def test_relay_trusted_ipv6_network():
    """A native IPv6 peer matches an IPv6 trusted network."""
    client = connect(
        "relay",
        peer="::1",
        ipv6=True,
        trusted_networks=(ip_network("::1/128"),),
        trusted_account=TRUSTED,
    )
    client.ehlo()
    assert client.code("MAIL FROM:<a@b.example>") == "250 2.1.0 Sender ok"


def test_relay_trusted_network_without_trusted_account():
    """Without a trusted account configured, even a trusted peer must authenticate."""
    client = connect("relay", peer="127.0.0.1", trusted_networks=TRUSTED_NETS)
    client.ehlo()
    assert client.code("MAIL FROM:<a@b.example>").startswith("530 5.7.0")


@pytest.mark.parametrize(
    "sender",
    [
        "<a@b.example>",
        "<>",
        "<victim%target.example@mx.test>",
        "<target.example!victim@mx.test>",
        "<@mx.test:victim@target.example>",
        '<"victim@target.example"@mx.test>',
        "victim@target.example",
    ],
)
@pytest.mark.parametrize("peer", ["192.0.2.10", "::ffff:192.0.2.10", "128.0.0.1"])
def test_relay_untrusted_peer_refused(sender, peer):
    """On relay from an untrusted peer, every sender form (open-relay tricks included) gets 530 5.7.0."""
    client = connect(
        "relay", peer=peer, ipv6=":" in peer, trusted_networks=TRUSTED_NETS, trusted_account=TRUSTED
    )
    client.ehlo()
    assert client.code(f"MAIL FROM:{sender}") == "530 5.7.0 Authentication required"
    assert client.code("RCPT TO:<victim@target.example>").startswith("503 5.5.1")
    assert client.code("DATA").startswith("503 5.5.1")
    assert client.deliverer.calls == []


def test_relay_untrusted_peer_may_authenticate():
    """On relay, an untrusted peer may send after STARTTLS and AUTH."""
    client = authed_client(role="relay", trusted_networks=TRUSTED_NETS, trusted_account=TRUSTED)
    assert client.code("MAIL FROM:<alice@example.com>") == "250 2.1.0 Sender ok"


# -- MAIL / RCPT --------------------------------------------------------------------------


def test_mail_before_ehlo():
    """MAIL before EHLO/HELO is 503 5.5.1."""
    client = tls_client()
    assert client.code("MAIL FROM:<a@b.example>") == "503 5.5.1 Send EHLO/HELO first"


@pytest.mark.parametrize(
    "line, reply",
    [
        ("MAIL", "501 5.5.4"),
        ("MAIL TO:<a@b.example>", "501 5.5.4"),
        ("MAIL FROM:", "553 5.1.7"),
        ("MAIL FROM:<a@b.example", "553 5.1.7"),
        ("MAIL FROM:<nobody>", "553 5.1.7"),
        ("MAIL FROM:<a@b.example>SIZE=1", "501 5.5.4"),
        ("MAIL FROM:<a@b.example> SIZE", "501 5.5.4"),
        ("MAIL FROM:<a@b.example> SIZE=abc", "501 5.5.4"),
        ("MAIL FROM:<a@b.example> SIZE=1" + "0" * 30, "501 5.5.4"),
        ("MAIL FROM:<a@b.example> BODY=BINARYMIME", "501 5.5.4"),
        ("MAIL FROM:<a@b.example> BODY", "501 5.5.4"),
        ("MAIL FROM:<a@b.example> SIZE=10485761", "552 5.3.4"),
        ("MAIL FROM:<a@b.example> SMTPUTF8", "555 5.5.4"),
        ("MAIL FROM:<a@b.example> RET=HDRS", "555 5.5.4"),
    ],
)
def test_mail_errors(line, reply):
    """Bad MAIL commands get the precise reply and leave no transaction behind."""
    client = authed_client()
    assert client.code(line).startswith(reply + " ")
    assert client.session._sender is None


@pytest.mark.parametrize(
    "params",
    ["", " SIZE=10485760", " BODY=8BITMIME", " BODY=7bit", " AUTH=<>", " size=100 body=8bitmime"],
)
def test_mail_accepted_params(params):
    """SIZE within the limit, BODY=7BIT/8BITMIME and AUTH= are accepted."""
    client = authed_client()
    assert client.code("MAIL FROM:<alice@example.com>" + params) == "250 2.1.0 Sender ok"


def test_mail_size_uses_account_limit():
    """An account's smaller size limit applies to SIZE= as well."""
    client = authed_client("carol")
    assert client.code("MAIL FROM:<c@example.com> SIZE=2001").startswith("552 5.3.4")
    assert client.code("MAIL FROM:<c@example.com> SIZE=2000").startswith("250 2.1.0")


def test_mail_non_ascii_then_session_usable():
    """A UTF-8 sender gets 553 5.6.7 and the session goes on to deliver a normal message."""
    client = authed_client()
    assert client.code("MAIL FROM:<jörg@example.com>".encode()) == (
        "553 5.6.7 Non-ASCII address requires SMTPUTF8, which is not supported"
    )
    assert client.message()[-1].startswith("250 2.0.0")


def test_rcpt_non_ascii_never_crashes_at_data():
    """A quoted UTF-8 recipient is refused at RCPT; DATA later works for the others."""
    client = authed_client()
    assert client.code("MAIL FROM:<alice@example.com>").startswith("250")
    assert client.code('RCPT TO:<"jörg"@example.net>'.encode()).startswith("553 5.6.7")
    assert client.code("RCPT TO:<bob@example.net>").startswith("250 2.1.5")
    assert client.code("DATA").startswith("354")
    assert client.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")[-1].startswith("250 2.0.0")
    assert client.deliverer.calls[0].email.envelope_recipients == ("bob@example.net",)


def test_nested_mail():
    """A second MAIL inside a transaction is 503 5.5.1."""
    client = authed_client()
    client.code("MAIL FROM:<a@b.example>")
    assert client.code("MAIL FROM:<a@b.example>") == "503 5.5.1 Sender already specified"


def test_rcpt_before_mail():
    """RCPT before MAIL is 503 5.5.1."""
    client = authed_client()
    assert client.code("RCPT TO:<b@c.example>") == "503 5.5.1 Need MAIL before RCPT"


@pytest.mark.parametrize(
    "line, reply",
    [
        ("RCPT", "501 5.5.4"),
        ("RCPT FROM:<b@c.example>", "501 5.5.4"),
        ("RCPT TO:<>", "553 5.1.3"),
        ("RCPT TO:<postmaster>", "553 5.1.3"),
        ("RCPT TO:<b@c.example> NOTIFY=NEVER", "555 5.5.4"),
        ("RCPT TO:<b@c..example>", "553 5.1.3"),
    ],
)
def test_rcpt_errors(line, reply):
    """Bad RCPT commands get the precise reply."""
    client = authed_client()
    client.code("MAIL FROM:<a@b.example>")
    assert client.code(line).startswith(reply + " ")
    assert client.session._recipients == []


def test_sender_not_allowed():
    """A sender outside the account's allowed senders gets 553 5.7.1."""
    client = authed_client("bob")
    assert client.code("MAIL FROM:<mallory@example.com>") == (
        "553 5.7.1 Sender address not allowed for this account"
    )
    assert client.code("MAIL FROM:<>").startswith("553 5.7.1")
    assert client.code("MAIL FROM:<Bob@Example.com>").startswith("250 2.1.0")
    client.code("RSET")
    assert client.code("MAIL FROM:<anyone@bob.test>").startswith("250 2.1.0")


def test_recipient_limit_server():
    """The 51st recipient of a 50-recipient limit gets 452 4.5.3; the others are kept."""
    client = authed_client(max_recipients=50, max_errors=100)
    client.code("MAIL FROM:<a@b.example>")
    for n in range(50):
        assert client.code(f"RCPT TO:<r{n}@c.example>").startswith("250 2.1.5")
    assert client.code("RCPT TO:<r50@c.example>") == "452 4.5.3 Too many recipients"
    assert len(client.session._recipients) == 50


def test_recipient_limit_account_overrides_server():
    """An account's own recipient limit replaces the server's, lower or higher."""
    bob = authed_client("bob", max_recipients=50)  # bob: 5
    bob.code("MAIL FROM:<bob@example.com>")
    for n in range(5):
        assert bob.code(f"RCPT TO:<r{n}@c.example>").startswith("250")
    assert bob.code("RCPT TO:<r5@c.example>").startswith("452 4.5.3")
    carol = authed_client("carol", max_recipients=50)  # carol: 60
    carol.code("MAIL FROM:<c@example.com>")
    for n in range(60):
        assert carol.code(f"RCPT TO:<r{n}@c.example>").startswith("250")
    assert carol.code("RCPT TO:<r60@c.example>").startswith("452 4.5.3")


def test_recipient_limit_of_the_route_applies_at_rcpt():
    """A route whose providers take at most 3 recipients per message refuses the 4th
    at RCPT with 452 4.5.3 (the client sends the rest in another transaction), instead
    of a 4xx for the whole message at the final dot, which a client retries forever."""
    carol = authed_client("carol", max_recipients=50)  # carol's own limit: 60
    seen = []
    carol.session.route_recipient_limit = lambda account: seen.append(account.name) or 3
    carol.code("MAIL FROM:<c@example.com>")
    for n in range(3):
        assert carol.code(f"RCPT TO:<r{n}@c.example>").startswith("250")
    assert carol.code("RCPT TO:<r3@c.example>") == "452 4.5.3 Too many recipients"
    assert seen[-1] == "carol"
    unlimited = authed_client("carol", max_recipients=50)
    unlimited.session.route_recipient_limit = lambda account: None
    unlimited.code("MAIL FROM:<c@example.com>")
    for n in range(60):
        assert unlimited.code(f"RCPT TO:<r{n}@c.example>").startswith("250")
    assert unlimited.code("RCPT TO:<r60@c.example>").startswith("452 4.5.3")


def test_duplicate_recipient_accepted_once():
    """A recipient given twice (any case) is accepted and counted once."""
    client = authed_client()
    client.code("MAIL FROM:<a@b.example>")
    assert client.code("RCPT TO:<b@c.example>").startswith("250 2.1.5")
    assert client.code("RCPT TO:<b@C.EXAMPLE>").startswith("250 2.1.5")
    assert client.session._recipients == ["b@c.example"]


def test_data_without_rcpt():
    """DATA without a recipient is 503 5.5.1; DATA without MAIL too."""
    client = authed_client()
    assert client.code("DATA") == "503 5.5.1 Need MAIL before RCPT"
    client.code("MAIL FROM:<a@b.example>")
    assert client.code("DATA") == "503 5.5.1 Need RCPT before DATA"
    assert client.code("DATA now").startswith("501 5.5.4")


def test_rset_clears_transaction():
    """RSET ends the transaction; RSET with an argument is 501."""
    client = authed_client()
    client.code("MAIL FROM:<a@b.example>")
    assert client.code("RSET") == "250 2.0.0 Reset state"
    assert client.code("RCPT TO:<b@c.example>").startswith("503 5.5.1")
    assert client.code("RSET x").startswith("501 5.5.4")


# -- other commands ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, reply",
    [
        ("NOOP", "250 2.0.0 Ok"),
        ("noop", "250 2.0.0 Ok"),
        ("HELP", "214 2.0.0"),
        ("VRFY postmaster", "252 2.5.2"),
        ("VRFY", "501 5.5.4"),
        ("EXPN staff", "502 5.5.1"),
        ("ETRN x", "502 5.5.1"),
        ("FOO", "500 5.5.2"),
        ("", "500 5.5.2"),
        ("MAIL2 FROM:<a@b>", "500 5.5.2"),
        ("SEND FROM:<a@b>", "500 5.5.2"),
    ],
)
def test_simple_commands(line, reply):
    """NOOP, HELP, VRFY, EXPN and unknown commands get their fixed replies; the session continues."""
    client = connect()
    assert client.code(line).startswith(reply)
    assert client.code("NOOP") == "250 2.0.0 Ok"


def test_quit():
    """QUIT answers 221 2.0.0 and closes; anything after it is ignored."""
    client = connect()
    assert client.send(b"QUIT\r\nNOOP\r\n") == ["221 2.0.0 Bye"]
    assert client.closed
    assert client.send(b"NOOP\r\n") == []


def test_non_ascii_verb():
    """A non-ASCII verb gets 500 5.5.2 and the session continues."""
    client = connect()
    assert client.code("NÖOP".encode()) == "500 5.5.2 Syntax error, command unrecognised"
    assert client.code(b"\xff\xfe\r") == "500 5.5.2 Bare LF or CR in command line is not allowed"
    assert client.code("NOOP") == "250 2.0.0 Ok"


# -- limits and robustness ---------------------------------------------------------------


def test_command_line_too_long():
    """A command line over 512 octets gets 500 5.5.2 and the session continues."""
    client = connect()
    assert client.code(b"NOOP " + b"x" * 506) == "500 5.5.2 Line too long"
    assert client.code(b"NOOP " + b"x" * 5000) == "500 5.5.2 Line too long"
    assert client.code(b"NOOP " + b"x" * 505) == "250 2.0.0 Ok"  # exactly 512 with CRLF


def test_megabyte_without_crlf_closes_with_bounded_buffer():
    """1 MiB without a line ending gets a reply and a close; the buffer never grows past the AUTH line cap."""
    client = connect()
    sizes = []
    chunk = b"A" * 4096
    lines: list[str] = []
    for _ in range(256):
        lines += client.send(chunk)
        sizes.append(len(client.session._buffer))
    assert max(sizes) <= 12288 + len(chunk)
    assert lines == ["500 5.5.2 Line too long", "421 4.7.0 Too many errors, closing connection"]
    assert client.closed


def test_megabyte_in_one_packet_closes():
    """1 MiB in a single read is refused at once and dropped."""
    client = connect()
    assert client.send(b"A" * (1 << 20)) == [
        "500 5.5.2 Line too long",
        "421 4.7.0 Too many errors, closing connection",
    ]
    assert client.session._buffer == b""
    assert client.closed


def test_bare_lf_in_command_is_one_command():
    """NOOP<LF>NOOP<CRLF> is one bad command with one reply, not two commands."""
    client = connect()
    assert client.send(b"NOOP\nNOOP\r\n") == [
        "500 5.5.2 Bare LF or CR in command line is not allowed"
    ]
    assert client.send(b"NOOP\rRSET\r\n") == [
        "500 5.5.2 Bare LF or CR in command line is not allowed"
    ]


def test_error_limit():
    """After max_errors errors the next error gets 421 4.7.0 and the connection is closed."""
    client = connect(max_errors=3)
    for _ in range(3):
        assert client.code("FOO").startswith("500 5.5.2")
    assert client.code("FOO") == "421 4.7.0 Too many errors, closing connection"
    assert client.closed


def test_many_pipelined_recipients_hit_limits():
    """Thousands of pipelined recipients: the recipient limit holds, then the error limit closes."""
    client = authed_client(max_recipients=50, max_errors=10)
    batch = b"MAIL FROM:<a@b.example>\r\n" + b"".join(
        b"RCPT TO:<r%d@c.example>\r\n" % n for n in range(3000)
    )
    lines = client.send(batch)
    assert lines.count("250 2.1.5 Recipient ok") == 50
    assert lines.count("452 4.5.3 Too many recipients") == 10
    assert lines[-1] == "421 4.7.0 Too many errors, closing connection"
    assert client.closed


def test_idle_timeout():
    """A silent client gets 421 4.4.2 after the command timeout and is disconnected."""
    client = connect(command_timeout=300)
    client.clock.advance(299)
    assert client.replies() == []
    client.cmd("NOOP")  # activity restarts the timer
    client.clock.advance(299)
    assert client.replies() == []
    client.clock.advance(2)
    assert client.replies() == ["421 4.4.2 Timeout exceeded, closing connection"]
    assert client.closed


def test_session_lifetime():
    """A client that keeps the session alive with NOOPs is closed at the session lifetime."""
    client = connect(command_timeout=300, session_lifetime=3600)
    for _ in range(12):
        client.clock.advance(299)
        assert client.code("NOOP") == "250 2.0.0 Ok"
    client.clock.advance(3600 - 12 * 299)
    assert client.replies() == ["421 4.4.2 Session lifetime exceeded, closing connection"]
    assert client.closed


def test_disconnect_cancels_timers():
    """After the client disconnects, no timer is left on the clock."""
    client = connect("submissions")
    client.transport.loseConnection()
    assert client.clock.getDelayedCalls() == []


def test_helo_then_pipelined_command_without_pipelining():
    """HELO then MAIL in one packet (PIPELINING not negotiated) is 554 5.5.0 and close."""
    client = connect(
        "relay", peer="127.0.0.1", trusted_networks=TRUSTED_NETS, trusted_account=TRUSTED
    )
    assert client.send(b"HELO x\r\nMAIL FROM:<a@b.example>\r\n") == [
        "250 mx.test greets x [127.0.0.1]",
        "554 5.5.0 Command pipelined where it is not allowed, closing connection",
    ]
    assert client.closed
    assert client.session._sender is None


def test_helo_session_commands_must_not_be_pipelined():
    """Under HELO, two commands in one packet are a pipelining violation."""
    client = connect(
        "relay", peer="127.0.0.1", trusted_networks=TRUSTED_NETS, trusted_account=TRUSTED
    )
    client.cmd("HELO x")
    lines = client.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n")
    assert lines == [
        "250 2.1.0 Sender ok",
        "554 5.5.0 Command pipelined where it is not allowed, closing connection",
    ]
    assert client.session._recipients == []


def test_ehlo_must_end_a_pipelined_group():
    """EHLO followed by another command in the same packet is a pipelining violation (RFC 2920 §3.1)."""
    client = connect()
    lines = client.send(b"EHLO x\r\nNOOP\r\n")
    assert lines[-1] == "554 5.5.0 Command pipelined where it is not allowed, closing connection"
    assert client.closed


def test_factory_builds_configured_sessions():
    """The listener factory builds one fresh session per connection with its policy, portal and deliverer."""
    from twisted.cred.portal import Portal
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock

    from mailgate.auth import AccountRealm, AccountStoreChecker
    from mailgate.message import parse_message
    from tests.smtp_helpers import make_policy

    portal = Portal(AccountRealm(), [AccountStoreChecker(MemoryAccountStore(ACCOUNTS))])
    deliverer = FakeDeliverer()
    factory = smtp.SMTPSessionFactory(
        make_policy("relay"), portal, deliverer, Clock(), parse_message, TRUSTED
    )
    first = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    second = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2))
    assert isinstance(first, smtp.SMTPSession) and first is not second
    assert first.factory is factory
    assert (first.policy.role, first.portal, first.deliverer, first.trusted_account) == (
        "relay",
        portal,
        deliverer,
        TRUSTED,
    )


def test_reply_catalogue_is_ascii_with_enhanced_codes():
    """Every fixed reply is printable ASCII (nothing turns into "?" on the wire) and has a matching enhanced code."""
    from mailgate import replies

    catalogue = {
        name: value for name, value in vars(replies).items() if isinstance(value, replies.Reply)
    }
    assert len(catalogue) > 40
    for name, reply in catalogue.items():
        assert all(0x20 <= ord(c) <= 0x7E for c in reply.text), name
        if reply.code in (334, 354):
            continue
        assert reply.enhanced[:1] == str(reply.code)[0], name
        check_reply_lines([line.decode("ascii") for line in reply.lines()])


# -- back-pressure: a client that does not read its replies (IPushProducer) -----------------


def test_session_is_a_streaming_producer_on_its_transport():
    """The session registers itself as a streaming producer, so a full send buffer pauses it."""
    from twisted.internet.interfaces import IPushProducer
    from zope.interface.verify import verifyObject

    client = relay_client()
    assert client.transport.producer is client.session
    assert client.transport.streaming is True
    assert verifyObject(IPushProducer, client.session)


def test_paused_session_answers_nothing_and_stops_reading_until_resumed():
    """When the transport pauses the session, buffered commands wait (and reading stops)
    until it resumes; then they are answered in order."""
    client = relay_client(max_junk_commands=10**6)
    client.session.pauseProducing()
    assert client.send(b"NOOP\r\nRSET\r\nNOOP\r\n") == []
    assert client.transport.producerState == "producing"  # A little input may wait...
    flood = b"NOOP\r\n" * (smtp.PAUSE_READING_AT // 6 + 1)
    assert client.send(flood) == []
    assert client.transport.producerState == "paused"  # ...but reading stops past the cap.
    client.session.resumeProducing()
    assert client.transport.producerState == "producing"
    lines = client.replies()
    assert lines[:3] == ["250 2.0.0 Ok", "250 2.0.0 Reset state", "250 2.0.0 Ok"]
    assert len(lines) == 3 + len(flood) // 6


def test_pause_while_answering_stops_after_the_current_reply():
    """The transport pauses us from inside write() when its buffer fills: the rest of
    the pipelined group stays unanswered (and unread) until it resumes."""
    client = relay_client()
    session, transport = client.session, client.transport
    original = transport.writeSequence

    def write_then_fill(seq):
        original(seq)
        session.pauseProducing()  # What a full FileDescriptor does to its producer.

    transport.writeSequence = write_then_fill
    assert client.send(b"NOOP\r\nNOOP\r\nNOOP\r\n") == ["250 2.0.0 Ok"]
    transport.writeSequence = original
    session.resumeProducing()
    assert client.replies() == ["250 2.0.0 Ok", "250 2.0.0 Ok"]
    assert session._buffer == b""


def _stalling(client):
    """Make the client's transport behave like a socket whose peer never reads: it
    never finishes closing.  Returns the list that records abortConnection calls."""
    aborted: list[bool] = []
    client.transport.loseConnection = lambda: setattr(client.transport, "disconnecting", True)
    client.transport.abortConnection = lambda: aborted.append(True)
    return aborted


@pytest.mark.parametrize("command", ["QUIT", "idle"])
def test_close_unregisters_producer_and_aborts_a_stalled_peer(command):
    """On close the producer is unregistered (a transport with a producer never closes)
    and a peer that still has not let the close finish after the grace is aborted."""
    client = relay_client(command_timeout=60)
    aborted = _stalling(client)
    if command == "QUIT":
        assert client.cmd("QUIT") == ["221 2.0.0 Bye"]
    else:
        client.clock.advance(60)
        assert client.replies() == ["421 4.4.2 Timeout exceeded, closing connection"]
    assert client.transport.producer is None
    assert client.transport.disconnecting
    client.clock.advance(smtp.CLOSE_GRACE - 1)
    assert aborted == []
    client.clock.advance(1)
    assert aborted == [True]


def test_close_grace_timer_cancelled_when_connection_closes():
    """A close that completes normally leaves no timer behind and aborts nothing."""
    client = relay_client()
    assert client.cmd("QUIT") == ["221 2.0.0 Bye"]
    assert not client.transport.connected
    assert client.clock.getDelayedCalls() == []


def test_megabyte_of_pipelined_commands_in_one_read():
    """1 MiB of pipelined NOOPs in one read are all answered and the buffer is emptied
    (the buffer is consumed in place, not re-sliced per line: linear, not quadratic)."""
    client = relay_client(max_junk_commands=10**6)
    count = (1024 * 1024) // len(b"NOOP\r\n")
    lines = client.send(b"NOOP\r\n" * count)
    assert len(lines) == count
    assert set(lines) == {"250 2.0.0 Ok"}
    assert client.session._buffer == b""
    assert not client.closed
