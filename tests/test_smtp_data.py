"""DATA in the session: delivery, replies from outcomes, ordering, limits and smuggling."""

from __future__ import annotations

import errno
import re
from ipaddress import ip_network

import pytest
from twisted.internet import defer
from zope.interface.verify import verifyObject

from mailgate import smtp
from mailgate.interfaces import IDeliverer
from mailgate.message import MAX_DEPTH, MessageParseError, parse_message
from mailgate.outcome import Delivered, Failed, Retry
from tests.smtp_helpers import (
    ALICE,
    BOB,
    DEFAULT_OUTCOME,
    MESSAGE,
    FakeDeliverer,
    authed_client,
    connect,
    relay_client,
    stuff,
)

OK = "250 2.0.0 Ok: prov-1"


def test_fake_deliverer_provides_interface():
    """The fake deliverer used here really provides IDeliverer."""
    assert verifyObject(IDeliverer, FakeDeliverer())


# -- delivery -----------------------------------------------------------------------------


def test_message_delivered_with_exact_envelope():
    """One transaction with several recipients becomes one deliver() call and one 250 reply."""
    client = authed_client()
    lines = client.message(recipients=("bob@example.net", "carol@example.org", "dave@Example.ORG"))
    assert lines == [OK]
    [call] = client.deliverer.calls
    assert call.account is ALICE
    assert call.email.envelope_sender == "alice@example.com"
    assert call.email.envelope_recipients == (
        "bob@example.net",
        "carol@example.org",
        "dave@example.org",
    )
    assert call.email.subject == "hello"
    assert re.fullmatch(r"[A-Z2-7]{22}", call.queue_id)
    assert client.session.messages_accepted == 1


def test_received_header_prepended_without_recipients():
    """A Received trace header naming HELO, peer, protocol and queue id is prepended; no recipient appears in it."""
    client = authed_client()
    client.message(recipients=("bob@example.net", "hidden-bcc@example.org"))
    [call] = client.deliverer.calls
    raw = call.email.raw
    assert raw.startswith(b"Received: from client.test ([192.0.2.10])\r\n")
    trace = raw[: raw.index(b"From: ")]
    assert b"by mx.test (mailgate) with ESMTPSA id " + call.queue_id.encode() + b";" in trace
    assert b"bob@example.net" not in trace and b"hidden-bcc" not in trace and b" for " not in trace
    assert raw.endswith(MESSAGE)


def test_message_is_prepared_before_the_parse_and_released_after_the_verdict():
    """The deliverer sees the message as received (Received header included, not
    yet parsed) before deliver(), and is released once the final dot is answered."""
    client = authed_client(deliverer=FakeDeliverer(outcome=None))
    client.transaction()
    client.send(stuff(MESSAGE) + b".\r\n")
    [(queue_id, raw)] = client.deliverer.prepared
    [call] = client.deliverer.calls
    assert queue_id == call.queue_id and raw == call.email.raw
    assert raw.startswith(b"Received: ") and raw.endswith(MESSAGE)
    assert client.deliverer.released == []  # the verdict is not in yet
    call.deferred.callback(DEFAULT_OUTCOME)
    assert client.replies() == [OK]
    assert client.deliverer.released == [queue_id]


def test_a_failing_prepare_is_a_tempfail_not_a_traceback(logged_errors):
    """A deliverer whose prepare raises (a bug) costs the client a 451 4.3.0, logged;
    the session goes on, and the message is released, never delivered."""

    class Broken(FakeDeliverer):
        def prepare(self, *args):
            raise RuntimeError("prepare bug")

    client = authed_client(deliverer=Broken())
    assert client.message() == ["451 4.3.0 Local error in processing, try again later"]
    assert client.deliverer.calls == [] and len(client.deliverer.released) == 1
    assert len(logged_errors.take()) == 1
    assert client.cmd("NOOP") == ["250 2.0.0 Ok"]


def test_a_message_refused_after_the_parse_is_released_undelivered():
    """A prepared message refused after the parse (here its From: is not allowed)
    is never delivered, and released all the same."""
    client = authed_client("bob")
    body = b"From: ceo@bank.example\r\nSubject: x\r\n\r\nhi\r\n"
    assert client.message(body, sender="bob@example.com")[0].startswith("550 5.7.1")
    assert client.deliverer.calls == []
    [(queue_id, _)] = client.deliverer.prepared
    assert client.deliverer.released == [queue_id]


def test_received_header_names_an_ipv6_client_as_an_address_literal():
    """RFC 5321 §4.1.3: an IPv6 client is ``[IPv6:...]`` in the trace header."""
    client = authed_client(peer="2001:db8::25", ipv6=True)
    client.message()
    [call] = client.deliverer.calls
    assert call.email.raw.startswith(b"Received: from client.test ([IPv6:2001:db8::25])\r\n")


def test_received_header_plain_smtp_protocol():
    """Over HELO in plaintext from a trusted network the protocol is plain SMTP."""
    client = connect(
        "relay",
        peer="127.0.0.1",
        trusted_networks=(ip_network("127.0.0.0/8"),),
        trusted_account=ALICE,
    )
    client.cmd("HELO legacy.test")
    client.cmd("MAIL FROM:<a@example.com>")
    client.cmd("RCPT TO:<b@example.net>")
    client.cmd("DATA")
    assert client.send(stuff(MESSAGE) + b".\r\n") == [OK]
    assert b"with SMTP id " in client.deliverer.calls[0].email.raw.split(b"From: ")[0]


def test_null_sender_delivered():
    """The null reverse-path <> is delivered with an empty envelope sender."""
    client = authed_client()
    client.message(sender="")
    assert client.deliverer.calls[0].email.envelope_sender == ""


def test_dot_unstuffing():
    """Lines starting with a dot reach the deliverer unstuffed."""
    body = b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\nend\r\n"
    client = authed_client()
    assert client.message(body) == [OK]
    assert client.deliverer.calls[0].email.raw.endswith(body)


def test_empty_message():
    """An empty message (just the final dot) is still one transaction and one reply."""
    client = authed_client()
    client.transaction()
    assert len(client.send(b".\r\n")) == 1
    assert len(client.deliverer.calls) <= 1


@pytest.mark.parametrize(
    "outcome, reply",
    [
        (Delivered("p", "abc-123"), "250 2.0.0 Ok: abc-123"),
        (Retry("p", "rate limited", "4.7.0"), "451 4.7.0 Temporary failure at p: rate limited"),
        (Retry("p", "timeout", "4.4.1"), "451 4.4.1 Temporary failure at p: timeout"),
        (
            Failed("p", "bad content\r\n250 injected"),
            "554 5.0.0 Rejected by p: bad content 250 injected",
        ),
        (Failed("p", "too big", 552, "5.3.4"), "552 5.3.4 Rejected by p: too big"),
    ],
)
def test_reply_comes_from_outcome_when_deliverer_fires(outcome, reply):
    """The final-dot reply is the outcome's reply, sent only when the deliverer's Deferred fires."""
    client = authed_client(deliverer=FakeDeliverer(outcome=None))
    client.transaction()
    assert client.send(stuff(MESSAGE) + b".\r\n") == []
    client.deliverer.calls[0].deferred.callback(outcome)
    assert client.replies() == [reply]
    assert client.code("NOOP") == "250 2.0.0 Ok"


def test_pipelined_commands_wait_for_delivery_reply():
    """Commands pipelined after the final dot are answered only after the delivery reply, in order."""
    client = authed_client(deliverer=FakeDeliverer(outcome=None))
    client.transaction()
    assert client.send(stuff(MESSAGE) + b".\r\nRSET\r\nMAIL FROM:<alice@example.com>\r\n") == []
    assert client.session._sender is None
    client.deliverer.calls[0].deferred.callback(Delivered("p", "x1"))
    assert client.replies() == ["250 2.0.0 Ok: x1", "250 2.0.0 Reset state", "250 2.1.0 Sender ok"]


def test_quit_after_dot_waits_for_reply():
    """QUIT pipelined after the final dot gets its 221 only after the delivery verdict."""
    client = authed_client(deliverer=FakeDeliverer(outcome=None))
    client.transaction()
    assert client.send(stuff(MESSAGE) + b".\r\nQUIT\r\n") == []
    assert not client.closed
    client.deliverer.calls[0].deferred.callback(Delivered("p", "x1"))
    assert client.replies() == ["250 2.0.0 Ok: x1", "221 2.0.0 Bye"]
    assert client.closed


def test_pipelined_transaction_group():
    """After EHLO, MAIL/RCPT/RCPT/DATA in one packet are answered in order and DATA works."""
    client = authed_client()
    lines = client.send(
        b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n"
    )
    assert lines == [
        "250 2.1.0 Sender ok",
        "250 2.1.5 Recipient ok",
        "250 2.1.5 Recipient ok",
        "354 End data with <CR><LF>.<CR><LF>",
    ]
    assert client.send(stuff(MESSAGE) + b".\r\n") == [OK]
    assert client.deliverer.calls[0].email.envelope_recipients == ("b@example.net", "c@example.net")


def test_whole_transaction_in_one_packet():
    """A pipelined MAIL/RCPT/DATA followed by the message in the same packet is one delivery."""
    client = authed_client()
    lines = client.send(
        b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
        + stuff(MESSAGE)
        + b".\r\n"
    )
    assert lines[-1] == OK and len(lines) == 4
    assert len(client.deliverer.calls) == 1


def test_data_after_refused_data_closes():
    """Message text after a refused DATA in the same packet is never run as commands: 554 5.5.0 and close."""
    client = authed_client()
    client.cmd("MAIL FROM:<alice@example.com>")
    lines = client.send(b"DATA\r\nMAIL FROM:<x@example.com>\r\nRCPT TO:<v@example.net>\r\nDATA\r\n")
    assert lines == [
        "503 5.5.1 Need RCPT before DATA",
        "554 5.5.0 Command pipelined where it is not allowed, closing connection",
    ]
    assert client.closed
    assert client.deliverer.calls == []


def test_deliverer_error_is_tempfail(logged_errors):
    """An exception from the deliverer is answered 451 4.3.0 and logged; the session goes on."""
    client = authed_client(deliverer=FakeDeliverer(outcome=None))
    client.transaction()
    client.send(stuff(MESSAGE) + b".\r\n")
    client.deliverer.calls[0].deferred.errback(RuntimeError("provider exploded: secret"))
    assert client.replies() == ["451 4.3.0 Local error in processing, try again later"]
    [event] = logged_errors.take()
    assert event["log_failure"].check(RuntimeError)
    assert client.code("NOOP") == "250 2.0.0 Ok"


def test_no_idle_timeout_while_delivering():
    """The idle timeout does not run while the deliverer has not answered."""
    client = authed_client(
        deliverer=FakeDeliverer(outcome=None),
        command_timeout=300,
        data_timeout=600,
        session_lifetime=10**6,
    )
    client.transaction()
    client.send(stuff(MESSAGE) + b".\r\n")
    client.clock.advance(5000)
    assert client.replies() == []
    assert not client.closed
    client.deliverer.calls[0].deferred.callback(Delivered("p", "late"))
    assert client.replies() == ["250 2.0.0 Ok: late"]
    client.clock.advance(301)
    assert client.replies() == ["421 4.4.2 Timeout exceeded, closing connection"]


def test_data_timeout():
    """A client silent in the middle of DATA is closed after the data timeout, and nothing is delivered."""
    client = authed_client(command_timeout=300, data_timeout=600)
    client.transaction()
    client.send(b"Subject: x\r\n")
    client.clock.advance(599)
    assert client.replies() == []
    client.clock.advance(2)
    assert client.replies() == ["421 4.4.2 Timeout exceeded, closing connection"]
    assert client.deliverer.calls == []


def test_disconnect_mid_data_delivers_nothing():
    """A client that disconnects in the middle of DATA gets nothing delivered and the spool is dropped."""
    client = authed_client()
    client.transaction()
    client.send(b"Subject: x\r\n\r\npartial")
    spool = client.session._spool
    client.transport.loseConnection()
    assert client.deliverer.calls == []
    assert client.session._spool is None and spool.closed
    client.session.dataReceived(b"\r\n.\r\n")
    assert client.deliverer.calls == []


def test_disconnect_while_delivering_is_quiet():
    """If the client leaves before the verdict, the late verdict writes nothing and logs no error."""
    client = authed_client(deliverer=FakeDeliverer(outcome=None))
    client.transaction()
    client.send(stuff(MESSAGE) + b".\r\n")
    client.transport.loseConnection()
    client.deliverer.calls[0].deferred.callback(Delivered("p", "x"))
    assert client.replies() == []


def test_reading_paused_while_blocked_with_large_backlog():
    """A client flooding data while a reply is pending is paused, and resumed once answered."""
    client = authed_client(deliverer=FakeDeliverer(outcome=None), max_junk_commands=100000)
    client.transaction()
    client.send(stuff(MESSAGE) + b".\r\n")
    client.send(b"NOOP\r\n" * 50000)
    assert client.transport.producerState == "paused"
    client.deliverer.calls[0].deferred.callback(Delivered("p", "x"))
    lines = client.replies()
    assert lines[0] == "250 2.0.0 Ok: x" and lines.count("250 2.0.0 Ok") == 50000
    assert client.transport.producerState == "producing"


# -- size and line limits ---------------------------------------------------------------


def test_message_too_big_then_session_usable():
    """A message over the size limit gets 552 5.3.4 after the dot; the next message is delivered."""
    client = authed_client(max_message_size=1000)
    client.transaction()
    assert client.send(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n") == []
    for _ in range(100):
        assert client.send(b"y" * 70 + b"\r\n") == []
    assert client.send(b".\r\n") == ["552 5.3.4 Message size exceeds fixed maximum message size"]
    assert client.deliverer.calls == []
    assert client.message() == [OK]


def test_account_size_limit_applies_to_data():
    """An account's smaller size limit is enforced on the data itself."""
    client = authed_client("carol")
    client.transaction(sender="carol@example.com")
    assert client.send(b"Subject: x\r\n\r\n" + (b"z" * 100 + b"\r\n") * 30 + b".\r\n") == [
        "552 5.3.4 Message size exceeds fixed maximum message size"
    ]


def test_long_line_rejected_after_dot():
    """A line over 998 octets is rejected after the final dot with 550 5.5.2."""
    client = authed_client()
    client.transaction()
    assert client.send(b"Subject: x\r\n\r\n" + b"a" * 999 + b"\r\n") == []
    assert client.send(b".\r\n") == [
        "550 5.5.2 Message line longer than 998 octets (RFC 5322 section 2.1.1)"
    ]
    assert client.deliverer.calls == []
    assert client.message() == [OK]


@pytest.mark.parametrize("chunked", [False, True])
def test_long_line_smuggling(chunked):
    """Commands hidden after an over-long DATA line are message text: zero deliveries, one 550 reply."""
    client = authed_client()
    client.transaction()
    smuggled = (
        b"Subject: x\r\n\r\n" + b"A" * 5000 + b"\r\n"
        b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
        b"From: ceo@example.com\r\nSubject: smuggled\r\n\r\npay now\r\n.\r\n"
    )
    lines = []
    if chunked:
        for i in range(0, len(smuggled), 700):
            lines += client.send(smuggled[i : i + 700])
    else:
        lines = client.send(smuggled)
    assert lines == ["550 5.5.2 Message line longer than 998 octets (RFC 5322 section 2.1.1)"]
    assert client.deliverer.calls == []
    assert client.session._sender is None
    assert client.code("RCPT TO:<victim@example.net>").startswith("503 5.5.1")


# -- line endings, NUL and end-of-data variants -------------------------------------------

VARIANTS = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n\x00.\r\n"]
SMUGGLE_TAIL = (
    b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nevil\r\n"
)


@pytest.mark.parametrize("variant", VARIANTS)
def test_end_of_data_variants_rejected(variant):
    """Fake end-of-data sequences never end the message: one 550 reply after the real end, nothing delivered."""
    client = authed_client()
    client.transaction()
    lines = client.send(b"Subject: x\r\n\r\nhello" + variant + SMUGGLE_TAIL)
    assert lines == []  # still in DATA: the variant did not end the message
    lines = client.send(b".\r\n")
    assert len(lines) == 1 and lines[0][:9] in ("550 5.5.2", "550 5.6.0")
    assert client.deliverer.calls == []


@pytest.mark.parametrize("variant", [v for v in VARIANTS if b"\x00" not in v])
def test_end_of_data_variants_normalised_into_one_message(variant):
    """In normalize mode a fake end-of-data is content: exactly one message, with CRLF line endings."""
    client = authed_client(line_endings="normalize")
    client.transaction()
    assert client.send(b"Subject: x\r\n\r\nhello" + variant + SMUGGLE_TAIL) == []
    assert client.send(b".\r\n") == [OK]
    [call] = client.deliverer.calls
    body = call.email.raw.split(b"\r\n\r\n", 1)[1]
    assert b"\r\n" in body and b"\n" not in body.replace(b"\r\n", b"")
    assert b"\r" not in body.replace(b"\r\n", b"")
    assert b"MAIL FROM:<evil@example.com>" in body


@pytest.mark.parametrize("data", [b"a\nb\r\n", b"a\rb\r\n", b"a\r\r\n"])
def test_bare_line_endings_rejected(data):
    """Bare LF or bare CR in the message gets 550 5.5.2 in reject mode."""
    client = authed_client()
    client.transaction()
    assert client.send(b"Subject: x\r\n\r\n" + data + b".\r\n") == [
        "550 5.5.2 Bare LF or CR in message data is not allowed (RFC 5321 section 2.3.8)"
    ]
    assert client.deliverer.calls == []


def test_bare_line_endings_normalised():
    """In normalize mode bare LF and CR become CRLF and the message is delivered once."""
    client = authed_client(line_endings="normalize")
    client.transaction()
    assert client.send(b"Subject: x\r\n\r\none\ntwo\rthree\r\n.\r\n") == [OK]
    [call] = client.deliverer.calls
    assert call.email.raw.endswith(b"Subject: x\r\n\r\none\r\ntwo\r\nthree\r\n")


def test_nul_rejected():
    """A NUL octet in the message gets 550 5.6.0."""
    client = authed_client()
    client.transaction()
    assert client.send(b"Subject: x\r\n\r\na\x00b\r\n.\r\n") == [
        "550 5.6.0 NUL octet in message data is not allowed"
    ]
    assert client.deliverer.calls == []


# -- content checks ---------------------------------------------------------------------


def test_from_header_not_allowed():
    """An allowed envelope sender with a foreign From: header gets 550 5.7.1 and nothing is delivered."""
    client = authed_client("bob")
    body = b"From: ceo@bank.example\r\nSubject: x\r\n\r\nhi\r\n"
    assert client.message(body, sender="bob@example.com") == [
        "550 5.7.1 From: header address not allowed for this account"
    ]
    assert client.deliverer.calls == []


def test_from_header_allowed_domain():
    """A From: header inside the account's allowed domain is accepted."""
    client = authed_client("bob")
    body = b"From: Someone <someone@bob.test>\r\nSubject: x\r\n\r\nhi\r\n"
    assert client.message(body, sender="bob@example.com") == [OK]
    assert client.deliverer.calls[0].account is BOB


def test_missing_from_header_with_restricted_account():
    """With allowed senders set, a message without From: is refused with 550 5.7.1."""
    client = authed_client("bob")
    assert client.message(b"Subject: x\r\n\r\nhi\r\n", sender="bob@example.com") == [
        "550 5.7.1 From: header address not allowed for this account"
    ]


def test_unparsable_message():
    """A message the parser refuses (MIME nested too deep) gets 554 5.6.0; the session goes on."""
    depth = MAX_DEPTH + 5
    parts = [b"From: alice@example.com\r\nSubject: deep\r\nMIME-Version: 1.0\r\n"]
    for level in range(depth):
        parts.append(
            b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (level, level)
        )
    parts.append(b"Content-Type: text/plain\r\n\r\nx\r\n")
    for level in reversed(range(depth)):
        parts.append(b"--b%d--\r\n" % level)
    client = authed_client()
    assert client.message(b"".join(parts)) == [
        f"554 5.6.0 Message could not be parsed: MIME parts nested deeper than {MAX_DEPTH} levels"
    ]
    assert client.deliverer.calls == []
    [(refused, _)] = client.deliverer.prepared
    assert client.deliverer.released == [refused]  # what was prepared is taken back
    assert client.message() == [OK]


def test_parser_exception_never_drops_connection(logged_errors):
    """A parser bug (any exception but MessageParseError) is our fault: 451 4.3.0, logged
    with its traceback, never a permanent 554; the session survives."""

    def broken_parse(*args, **kwargs):
        raise ValueError("boom")

    client = authed_client(parse=broken_parse)
    assert client.message() == ["451 4.3.0 Local error in processing, try again later"]
    assert not client.closed
    assert client.deliverer.calls == []
    [event] = logged_errors.take()
    assert event["log_failure"].check(ValueError)


def test_unparsable_message_is_permanent():
    """Only MessageParseError, the parser's verdict on bad input, becomes 554 5.6.0."""

    def refusing_parse(*args, **kwargs):
        raise MessageParseError("MIME structure is nested too deeply")

    client = authed_client(parse=refusing_parse)
    assert client.message() == [
        "554 5.6.0 Message could not be parsed: MIME structure is nested too deeply"
    ]
    assert not client.closed


def test_parser_deferred_failure_is_transient(logged_errors):
    """A parser running off-thread that fails with a bug also gives 451, not 554."""
    client = authed_client(parse=lambda *args: defer.fail(KeyError("bug")))
    assert client.message() == ["451 4.3.0 Local error in processing, try again later"]
    assert len(logged_errors.take()) == 1


def test_no_delivery_after_disconnect_during_parse():
    """A client that disconnects while its message is being parsed (in a thread) gets
    no delivery: it heard no verdict and will retry, so delivering would duplicate."""
    pending: list = []

    def slow_parse(*args):
        d = defer.Deferred()
        pending.append((d, args))
        return d

    client = authed_client(parse=slow_parse)
    client.transaction()
    assert client.send(stuff(MESSAGE) + b".\r\n") == []
    client.transport.loseConnection()  # StringTransportWithDisconnection: connectionLost now.
    d, args = pending[0]
    d.callback(parse_message(*args))
    assert client.deliverer.calls == []
    assert client.session.messages_accepted == 0
    assert client.replies() == []


def test_parser_may_return_deferred():
    """A parser that answers with a Deferred (off-thread parsing) is waited for."""
    from mailgate.message import parse_message

    pending: list = []

    def slow_parse(*args):
        d = defer.Deferred()
        pending.append((d, args))
        return d

    client = authed_client(parse=slow_parse)
    client.transaction()
    assert client.send(stuff(MESSAGE) + b".\r\nNOOP\r\n") == []
    d, args = pending[0]
    d.callback(parse_message(*args))
    assert client.replies() == [OK, "250 2.0.0 Ok"]


# -- framing in the session -----------------------------------------------------------------


def _dialogue() -> bytes:
    return (
        b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
        + stuff(b"Subject: split\r\n\r\n.dot\r\n" + b"w" * 998 + b"\r\n..\r\nend\r\n")
        + b".\r\nRSET\r\n"
    )


def test_byte_by_byte_same_result():
    """Feeding the whole dialogue one octet at a time gives the same replies and the same message."""
    whole = authed_client()
    whole_lines = whole.send(_dialogue())
    single = authed_client()
    single_lines: list[str] = []
    for octet in _dialogue():
        single_lines += single.send(bytes([octet]))
    assert single_lines == whole_lines
    assert whole_lines[-2:] == [OK, "250 2.0.0 Reset state"]
    raw = [c.deliverer.calls[0].email.raw.split(b"\r\n", 3)[3] for c in (whole, single)]
    assert raw[0] == raw[1]


@pytest.mark.parametrize("cut", range(40))
def test_split_points_near_the_end(cut):
    """Cutting the stream at any point around the final dot and the next command changes nothing."""
    stream = _dialogue()
    point = len(stream) - cut
    client = authed_client()
    lines = client.send(stream[:point]) + client.send(stream[point:])
    assert lines[-2:] == [OK, "250 2.0.0 Reset state"]
    assert len(client.deliverer.calls) == 1


def test_two_messages_in_one_session():
    """Two transactions in one session give two deliveries with their own envelopes."""
    client = relay_client()
    assert client.message(sender="a@example.com", recipients=("x@example.net",)) == [OK]
    assert client.message(sender="b@example.com", recipients=("y@example.net",)) == [OK]
    assert [c.email.envelope_sender for c in client.deliverer.calls] == [
        "a@example.com",
        "b@example.com",
    ]
    assert client.session.messages_accepted == 2


def test_session_lifetime_waits_for_pending_verdict():
    """If the session lifetime ends while a delivery is pending, the verdict is sent first, then 421."""
    client = authed_client(deliverer=FakeDeliverer(outcome=None), session_lifetime=100)
    client.transaction()
    client.send(stuff(MESSAGE) + b".\r\nNOOP\r\n")
    client.clock.advance(200)
    assert client.replies() == []
    assert not client.closed
    client.deliverer.calls[0].deferred.callback(Delivered("p", "kept"))
    assert client.replies() == [
        "250 2.0.0 Ok: kept",
        "421 4.4.2 Session lifetime exceeded, closing connection",
    ]
    assert client.closed


def test_session_lifetime_mid_data_delivers_nothing():
    """If the session lifetime ends in the middle of DATA, the session closes and nothing is delivered."""
    client = authed_client(session_lifetime=100)
    client.transaction()
    client.send(b"Subject: x\r\n")
    client.clock.advance(100)
    assert client.replies() == ["421 4.4.2 Session lifetime exceeded, closing connection"]
    client.session.dataReceived(b"\r\n.\r\n")
    assert client.deliverer.calls == []


# -- spool failures (disk full) -------------------------------------------------------------


class _FailingSpool:
    """A spool standing in for SpooledTemporaryFile after it rolled over to a full disk."""

    def __init__(self, fail_write: bool = True, fail_read: bool = False) -> None:
        self.fail_write, self.fail_read = fail_write, fail_read
        self.data = b""
        self.closed = False

    def write(self, data: bytes) -> int:
        if self.fail_write:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.data += data
        return len(data)

    def seek(self, offset: int) -> None:
        if self.fail_read:
            raise OSError(errno.EIO, "Input/output error")

    def read(self) -> bytes:
        return self.data

    def close(self) -> None:
        self.closed = True


def test_disk_full_during_data_answers_452_after_the_dot(monkeypatch):
    """ENOSPC writing the spool neither escapes dataReceived nor ends DATA early: the
    session reads to the real end of data, answers 452 4.3.1 and stays usable."""
    spools: list[_FailingSpool] = []

    def factory(*args, **kwargs):
        spools.append(_FailingSpool())
        return spools[-1]

    monkeypatch.setattr(smtp.tempfile, "SpooledTemporaryFile", factory)
    client = authed_client()
    client.transaction()
    assert client.send(b"Subject: x\r\n\r\nRSET\r\nQUIT\r\n") == []
    assert client.send(b"more\r\n.\r\nNOOP\r\n") == [
        "452 4.3.1 Insufficient system storage",
        "250 2.0.0 Ok",
    ]
    assert client.deliverer.calls == []
    assert spools[0].closed
    assert not client.closed


def test_spool_read_back_failure_answers_451(monkeypatch, logged_errors):
    """An OSError reading the spool back at the final dot becomes 451 4.3.0, not a drop."""
    monkeypatch.setattr(
        smtp.tempfile, "SpooledTemporaryFile", lambda *a, **k: _FailingSpool(fail_write=False, fail_read=True)
    )
    client = authed_client()
    assert client.message() == ["451 4.3.0 Local error in processing, try again later"]
    assert client.deliverer.calls == []
    assert not client.closed
    assert len(logged_errors.take()) == 1
