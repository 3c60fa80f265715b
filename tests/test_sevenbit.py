"""7-bit downgrade of 8-bit messages (RFC 6152 §3) for raw-MIME relays such as Amazon SES."""

from __future__ import annotations

from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

from hypothesis import given
from hypothesis import strategies as st

from mailgate.sevenbit import to_seven_bit

from .provider_messages import rich_message

EIGHT_BIT = (
    "From: Jörg <joerg@example.com>\r\n"
    "To: =?utf-8?q?Zo=C3=AB?= <zoe@example.org>\r\n"
    "Subject: Grüße aus Köln\r\n"
    "X-Note: héllo\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: multipart/mixed; boundary=BOUND\r\n"
    "\r\n"
    "--BOUND\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Grüße, ça va?\r\n"
    "second line \r\n"
    "--BOUND\r\n"
    "Content-Type: text/plain; charset=iso-8859-1\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
).encode() + "caf\xe9\r\n".encode("latin-1") + (
    "--BOUND\r\n"
    'Content-Type: application/octet-stream; name="données.bin"\r\n'
    'Content-Disposition: attachment; filename="données.bin"\r\n'
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
).encode() + b"\x00\x01\xff\xfe\r\n" + (
    "--BOUND\r\n"
    "Content-Type: message/rfc822\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Subject: Weitergeleitet: Übersicht\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "\r\n"
    "Inhalt äöü\r\n"
    "--BOUND--\r\n"
).encode()


def parsed(raw: bytes):  # type: ignore[no-untyped-def]
    return BytesParser(policy=policy.default).parsebytes(raw)


def test_ascii_message_is_returned_unchanged() -> None:
    """A message that is already 7-bit reaches the relay byte for byte."""
    raw = rich_message()
    assert to_seven_bit(raw) is raw


def test_eight_bit_message_becomes_ascii_with_the_same_content() -> None:
    """Every header and part is encoded; decoded, the message says exactly what it said."""
    out = to_seven_bit(EIGHT_BIT)
    assert out.isascii()
    after = parsed(out)
    assert [str(after[name]) for name in ("from", "to", "subject", "x-note")] == [
        "Jörg <joerg@example.com>",
        "Zoë <zoe@example.org>",
        "Grüße aus Köln",
        "héllo",
    ]
    assert b"To: =?utf-8?q?Zo=C3=AB?= <zoe@example.org>\r\n" in out  # already 7-bit: kept as sent
    parts = list(after.iter_parts())
    assert parts[0]["content-transfer-encoding"] == "quoted-printable"
    # The line break before a boundary belongs to the boundary (RFC 2046 §5.1.1).
    assert parts[0].get_content().replace("\r\n", "\n") == "Grüße, ça va?\nsecond line "
    assert parts[1].get_content() == "café"  # still Latin-1 underneath: the charset is unchanged
    assert parts[1].get_content_charset() == "iso-8859-1"
    assert parts[2]["content-transfer-encoding"] == "base64"
    assert parts[2].get_content() == b"\x00\x01\xff\xfe"
    assert parts[2].get_filename() == "données.bin"
    assert parts[3]["content-transfer-encoding"] == "7bit"
    inner = parts[3].get_content()
    assert str(inner["subject"]) == "Weitergeleitet: Übersicht"
    assert inner.get_content() == "Inhalt äöü"


def test_untouched_lines_keep_their_bytes() -> None:
    """Only what was 8-bit changes: ASCII headers keep their folding and the rest of the body stays."""
    raw = (
        b"Received: from a\r\n\tby b; Sun, 22 Nov 2026 10:00:00 +0000\r\n"
        b"From: a@example.com\r\nSubject: caf\xc3\xa9\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\ncaf\xc3\xa9\r\n"
    )
    out = to_seven_bit(raw)
    assert out.startswith(b"Received: from a\r\n\tby b; Sun, 22 Nov 2026 10:00:00 +0000\r\nFrom: a@example.com\r\n")
    assert b"Subject: =?utf-8?" in out and out.endswith(b"\r\n\r\ncaf=C3=A9\r\n")


def test_latin1_header_bytes_do_not_break_it() -> None:
    """Header bytes that are not UTF-8 are read as Latin-1 rather than lost."""
    out = to_seven_bit(b"From: a@example.com\r\nSubject: caf\xe9\r\n\r\nbody\r\n")
    assert out.isascii()
    assert str(parsed(out)["subject"]) == "café"


@given(
    subject=st.text(st.characters(blacklist_categories=["Cs", "Cc"]), max_size=80),
    body=st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\r"), max_size=400),
)
def test_any_utf8_text_message_round_trips(subject: str, body: str) -> None:
    """Whatever UTF-8 text a client sends, the 7-bit form is ASCII and decodes to the same text."""
    raw = (
        "From: a@example.com\r\nSubject: " + subject + "\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n" + body.replace("\n", "\r\n") + "\r\n"
    ).encode("utf-8")
    out = to_seven_bit(raw)
    assert out.isascii()
    message = parsed(out)
    assert message.get_content().replace("\r\n", "\n") == parsed(raw).get_content().replace("\r\n", "\n")
    assert " ".join(str(message["subject"]).split()) == " ".join(subject.split())


NESTED = (
    "From: a@example.com\r\nSubject: nested\r\nMIME-Version: 1.0\r\n"
    'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n'
    "This is a preamble.\r\n"
    "--outer\r\n"
    'Content-Type: multipart/alternative; boundary="inner"\r\n\r\n'
    "--inner\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    "already =C3=A9ncoded and raw é\r\n"
    "--innerX is not a delimiter\r\n"
    "--inner  \r\n"
    "Content-Type: text/html; charset=utf-8\r\n\r\n"
    "<p>Grüße</p>\r\n"
    "--inner--\r\n"
    "--outer\r\n"
    "Content-Type: application/pdf\r\n"
    "Content-Transfer-Encoding: base64\r\n\r\n"
    "JVBERi0xLjQK\r\n"
    "--outer--\r\n"
    "epilogue\r\n"
).encode()


def test_nested_multipart_converts_only_what_is_eight_bit() -> None:
    """Parts are found by their delimiters at every depth; 7-bit parts, preamble and epilogue keep their bytes."""
    out = to_seven_bit(NESTED)
    assert out.isascii()
    assert out.startswith(NESTED[: NESTED.index(b"--inner\r\n")])  # headers, preamble, first delimiters
    assert out.endswith(b"--inner--\r\n--outer\r\nContent-Type: application/pdf\r\n"
                        b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--outer--\r\nepilogue\r\n")
    plain, html = parsed(out).get_payload()[0].get_payload()
    assert plain.get_content() == "already éncoded and raw é\r\n--innerX is not a delimiter"
    assert (html["content-transfer-encoding"], html.get_content()) == ("quoted-printable", "<p>Grüße</p>")


def test_unterminated_multipart_still_converts_its_last_part() -> None:
    """A multipart without its close delimiter: the last part runs to the end and is converted."""
    raw = "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nÄ\r\n".encode()
    out = to_seven_bit(raw)
    assert out.isascii() and parsed(out).get_payload()[0].get_content().strip() == "Ä"


@given(
    st.lists(
        st.one_of(
            st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\r"), max_size=300).map(lambda t: ("text", t)),
            st.binary(max_size=300).map(lambda b: ("binary", b)),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_any_multipart_round_trips(parts: list[tuple[str, object]]) -> None:
    """Whatever mix of 8-bit text and binary parts: ASCII out, and every part decodes to what went in."""
    message = EmailMessage()
    message["From"] = "a@example.com"
    message["Subject"] = "Grüße"
    message.set_content("first part: ü", cte="8bit")
    for kind, value in parts:
        if kind == "text":
            message.add_attachment(str(value), cte="8bit")
        else:
            message.add_attachment(value, maintype="application", subtype="octet-stream", cte="8bit" if bytes(value).isascii() else "base64")
    raw = message.as_bytes(policy=policy.SMTPUTF8)
    out = to_seven_bit(raw)
    assert out.isascii()
    before, after = parsed(raw), parsed(out)
    assert [p.get_content() for p in after.iter_parts()] == [p.get_content() for p in before.iter_parts()]
    assert str(after["subject"]) == "Grüße"
