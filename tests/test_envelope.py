"""MAIL FROM / RCPT TO argument parsing (mailgate.envelope)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate import replies
from mailgate.envelope import EnvelopeError, Path, parse_mail_from, parse_rcpt_to

GOOD_MAIL = [
    (b"FROM:<a@b.example>", Path("a@b.example")),
    (b"from:<a@b.example>", Path("a@b.example")),
    (b"From: <a@b.example>", Path("a@b.example")),  # a space after the colon is tolerated
    (b"FROM:<>", Path("")),
    (b"FROM:<A.B+tag@Example.COM>", Path("A.B+tag@example.com")),  # domain folded, local kept
    (b"FROM:<a@b.example.>", Path("a@b.example")),
    (b"FROM:a@b.example", Path("a@b.example")),  # brackets omitted
    (b"FROM:a@b.example SIZE=100", Path("a@b.example", {"SIZE": "100"})),
    (
        b"FROM:<a@b.example> SIZE=100 BODY=8BITMIME",
        Path("a@b.example", {"SIZE": "100", "BODY": "8BITMIME"}),
    ),
    (b"FROM:<a@b.example>  size=1", Path("a@b.example", {"SIZE": "1"})),
    (b"FROM:<a@b.example> AUTH=<>", Path("a@b.example", {"AUTH": "<>"})),
    (b"FROM:<a@b.example> SMTPUTF8", Path("a@b.example", {"SMTPUTF8": None})),
    (b'FROM:<"john doe"@b.example>', Path('"john doe"@b.example')),
    (b'FROM:<"a>b"@b.example>', Path('"a>b"@b.example')),
    (b'FROM:<"a\\"b"@b.example>', Path('"a\\"b"@b.example')),
    (
        b"FROM:<@relay.example,@other.example:a@b.example>",
        Path("a@b.example"),
    ),  # source route ignored
    (b"FROM:<a@[192.0.2.1]>", Path("a@[192.0.2.1]")),
    (b"FROM:<a@[IPv6:2001:db8::1]>", Path("a@[ipv6:2001:db8::1]")),
    (b"FROM:<a%c.example@b.example>", Path("a%c.example@b.example")),
    (b"FROM:<c.example!a@b.example>", Path("c.example!a@b.example")),
    (b"FROM:<" + b"l" * 64 + b"@b.example>", Path("l" * 64 + "@b.example")),
]


@pytest.mark.parametrize("argument, expected", GOOD_MAIL)
def test_good_mail_from(argument, expected):
    """Valid MAIL FROM arguments parse into the address and upper-cased parameters."""
    assert parse_mail_from(argument) == expected


BAD_MAIL = [
    (b"", replies.PARAM_SYNTAX),
    (b"TO:<a@b.example>", replies.PARAM_SYNTAX),
    (b"FROM<a@b.example>", replies.PARAM_SYNTAX),
    (b"FROM:", replies.BAD_SENDER_SYNTAX),
    (b"FROM:<a@b.example", replies.BAD_SENDER_SYNTAX),
    (b"FROM:<a@b.example>SIZE=1", replies.PARAM_SYNTAX),
    (b"FROM:<a>", replies.BAD_SENDER_SYNTAX),
    (b"FROM:<@b.example>", replies.BAD_SENDER_SYNTAX),
    (b"FROM:<a@>", replies.BAD_SENDER_SYNTAX),
    (b"FROM:<a b@c.example>", replies.BAD_SENDER_SYNTAX),
    (b"FROM:<a..b@c.example>", replies.BAD_SENDER_SYNTAX),
    (b"FROM:<.a@c.example>", replies.BAD_SENDER_SYNTAX),
    (b"FROM:<a@-c.example>", replies.BAD_SENDER_SYNTAX),
    (b"FROM:<a@c_d.example>", replies.BAD_SENDER_SYNTAX),
    (b"FROM:<a@c..example>", replies.BAD_SENDER_SYNTAX),
    (b"FROM:<a@[1.2.3.4>", replies.BAD_SENDER_SYNTAX),
    (b'FROM:<"unterminated@c.example>', replies.BAD_SENDER_SYNTAX),
    (b"FROM:<a\x01@c.example>", replies.BAD_SENDER_SYNTAX),
    (b"FROM:<@relay.example>", replies.BAD_SENDER_SYNTAX),  # route without mailbox
    (b"FROM:<" + b"l" * 65 + b"@b.example>", replies.BAD_SENDER_SYNTAX),
    (
        b"FROM:<a@" + b"d" * 63 + b"." + b"e" * 63 + b"." + b"f" * 63 + b"." + b"g" * 63 + b">",
        replies.BAD_SENDER_SYNTAX,
    ),  # path over 256 octets
    (b"FROM:<a@b.example> SIZE", None),  # parses; the session validates SIZE's value
    (b"FROM:<a@b.example> =1", replies.PARAM_SYNTAX),
    (b"FROM:<a@b.example> SIZE=a=b", replies.PARAM_SYNTAX),
    (b"FROM:<a@b.example> -X=1", replies.PARAM_SYNTAX),
    (b"FROM:<j\xc3\xb6rg@b.example>", replies.NEEDS_SMTPUTF8),
    (b'FROM:<"j\xc3\xb6rg"@b.example>', replies.NEEDS_SMTPUTF8),
    (b"FROM:<a@b\xc3\xa9.example>", replies.NEEDS_SMTPUTF8),
    (b"FROM:<a@b.example> X=\xff", replies.NEEDS_SMTPUTF8),
]


@pytest.mark.parametrize("argument, reply", [case for case in BAD_MAIL if case[1] is not None])
def test_bad_mail_from(argument, reply):
    """Invalid MAIL FROM arguments raise EnvelopeError carrying the precise reply."""
    with pytest.raises(EnvelopeError) as info:
        parse_mail_from(argument)
    assert info.value.reply == reply


def test_mail_param_without_value_parses():
    """A parameter without a value is returned with None for the session to judge."""
    assert parse_mail_from(b"FROM:<a@b.example> SIZE").params == {"SIZE": None}


GOOD_RCPT = [
    (b"TO:<b@c.example>", Path("b@c.example")),
    (b"to:<b@C.Example>", Path("b@c.example")),
    (b"TO: <b@c.example>", Path("b@c.example")),
    (b"TO:b@c.example", Path("b@c.example")),
    (b"TO:<@x.example:b@c.example>", Path("b@c.example")),
    (b"TO:<b@c.example> NOTIFY=NEVER", Path("b@c.example", {"NOTIFY": "NEVER"})),
    (b'TO:<"quoted local"@c.example>', Path('"quoted local"@c.example')),
]


@pytest.mark.parametrize("argument, expected", GOOD_RCPT)
def test_good_rcpt_to(argument, expected):
    """Valid RCPT TO arguments parse into the address and parameters."""
    assert parse_rcpt_to(argument) == expected


BAD_RCPT = [
    (b"FROM:<b@c.example>", replies.PARAM_SYNTAX),
    (b"TO:<>", replies.BAD_RECIPIENT_SYNTAX),  # the null path is only a reverse-path
    (b"TO:", replies.BAD_RECIPIENT_SYNTAX),
    (b"TO:<postmaster>", replies.BAD_RECIPIENT_SYNTAX),
    (b"TO:<b@c.example", replies.BAD_RECIPIENT_SYNTAX),
    (b"TO:<b@c.example>x", replies.PARAM_SYNTAX),
    (b"TO:<\xe2\x98\x83@c.example>", replies.NEEDS_SMTPUTF8),
    (b'TO:<"\xe2\x98\x83"@c.example>', replies.NEEDS_SMTPUTF8),
]


@pytest.mark.parametrize("argument, reply", BAD_RCPT)
def test_bad_rcpt_to(argument, reply):
    """Invalid RCPT TO arguments raise EnvelopeError carrying the precise reply."""
    with pytest.raises(EnvelopeError) as info:
        parse_rcpt_to(argument)
    assert info.value.reply == reply


def test_reply_codes_of_envelope_errors():
    """The envelope replies carry the codes of the error table."""
    assert (replies.BAD_SENDER_SYNTAX.code, replies.BAD_SENDER_SYNTAX.enhanced) == (553, "5.1.7")
    assert (replies.BAD_RECIPIENT_SYNTAX.code, replies.BAD_RECIPIENT_SYNTAX.enhanced) == (
        553,
        "5.1.3",
    )
    assert (replies.NEEDS_SMTPUTF8.code, replies.NEEDS_SMTPUTF8.enhanced) == (553, "5.6.7")
    assert (replies.PARAM_SYNTAX.code, replies.PARAM_SYNTAX.enhanced) == (501, "5.5.4")


@settings(max_examples=500, deadline=None)
@given(argument=st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(argument):
    """Any argument either parses or raises EnvelopeError; nothing else escapes."""
    for parse, keyword in ((parse_mail_from, b"FROM:"), (parse_rcpt_to, b"TO:")):
        for candidate in (argument, keyword + argument, keyword + b"<" + argument + b">"):
            try:
                path = parse(candidate)
            except EnvelopeError as e:
                assert e.reply.code in (501, 553)
            else:
                assert path.address.isascii()
                assert "\r" not in path.address and "\n" not in path.address
