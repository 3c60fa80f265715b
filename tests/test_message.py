"""Tests for mailgate.message: raw MIME -> OutboundEmail (ARCHITECTURE.md §1, §6)."""

from __future__ import annotations

import email.utils
from email import policy
from email.message import EmailMessage

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailgate import message as message_module
from mailgate.message import (
    MAX_DEPTH,
    MAX_PARSE_WORK,
    MAX_PARTS,
    MessageParseError,
    parse_message,
    text_to_html,
)
from mailgate.model import Attachment, Controls, EmailAddress, OutboundEmail

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 4


def serialise(msg: EmailMessage) -> bytes:
    """Bytes as an SMTP client sends them: CRLF line endings."""
    return msg.as_bytes(policy=policy.SMTP)


def crlf(text: str) -> bytes:
    """A hand-written message with CRLF line endings."""
    return text.replace("\n", "\r\n").encode("utf-8")


def rich_message() -> bytes:
    msg = EmailMessage()
    msg["From"] = "Zoë Ünïcode <zoe@example.com>"
    msg["To"] = "Ann Ångström <Ann@Example.com>, team: bob@example.com, carl@example.com;"
    msg["Cc"] = "Dörte <dorte@example.com>"
    msg["Bcc"] = "hidden@example.com"
    msg["Reply-To"] = "Support <support@example.com>"
    msg["Subject"] = "Grüße aus Köln — 🎉"
    msg["Message-ID"] = "<rich.1@example.com>"
    msg["Date"] = "Tue, 02 Jan 2024 10:00:00 +0000"
    msg["X-Custom"] = "one"
    msg["Received"] = "from client by gateway"
    msg["X-Custom"] = "two"
    msg["List-Unsubscribe"] = "<mailto:unsub@example.com>"
    msg["X-PM-Tag"] = "welcome"
    msg["X-Mailgate-Metadata-Order"] = "42"
    msg.set_content("Hallo Welt\n")
    msg.add_alternative('<p>Hallo <img src="cid:logo@example.com"></p>\n', subtype="html")
    html_part = msg.get_payload()[1]
    html_part.add_related(PNG, "image", "png", cid="<logo@example.com>", filename="logo.png")
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="Prüfbericht 2024.pdf")
    return serialise(msg)


def test_rich_message_every_field() -> None:
    """A rich multipart message maps to the exact model, Bcc from the envelope only."""
    raw = rich_message()
    assert b"hidden@example.com" in raw
    assert b"filename*=" in raw  # the PDF name really is RFC 2231 encoded
    recipients = [
        "ann@example.COM",
        "bob@example.com",
        "carl@example.com",
        "DORTE@example.com",
        "secret@example.net",
    ]
    email_ = parse_message(raw, "bounce@example.com", recipients)

    assert email_.envelope_sender == "bounce@example.com"
    assert email_.envelope_recipients == tuple(recipients)
    assert email_.from_ == EmailAddress("zoe@example.com", "Zoë Ünïcode")
    assert email_.reply_to == (EmailAddress("support@example.com", "Support"),)
    assert email_.to == (
        EmailAddress("Ann@Example.com", "Ann Ångström"),
        EmailAddress("bob@example.com", ""),
        EmailAddress("carl@example.com", ""),
    )
    assert email_.cc == (EmailAddress("dorte@example.com", "Dörte"),)
    assert email_.bcc == (EmailAddress("secret@example.net", ""),)
    assert email_.subject == "Grüße aus Köln — 🎉"
    assert email_.text == "Hallo Welt\n"
    assert email_.html == '<p>Hallo <img src="cid:logo@example.com"></p>\n'
    assert email_.attachments == (
        Attachment(
            filename="logo.png",
            content_type="image/png",
            content=PNG,
            content_id="logo@example.com",
            inline=True,
        ),
        Attachment(
            filename="Prüfbericht 2024.pdf",
            content_type="application/pdf",
            content=PDF,
            content_id=None,
            inline=False,
        ),
    )
    assert email_.attachments[0].content == PNG
    assert email_.attachments[1].content == PDF
    assert email_.headers == (
        ("X-Custom", "one"),
        ("X-Custom", "two"),
        ("List-Unsubscribe", "<mailto:unsub@example.com>"),
    )
    assert email_.message_id == "rich.1@example.com"
    assert email_.date == "Tue, 02 Jan 2024 10:00:00 +0000"
    assert email_.controls == Controls(tags=("welcome",), metadata=(("Order", "42"),))
    assert b"Bcc" not in email_.raw and b"hidden@example.com" not in email_.raw
    assert b"X-PM-Tag" not in email_.raw and b"X-Mailgate-" not in email_.raw
    assert email_.raw == raw.replace(b"Bcc: hidden@example.com\r\n", b"").replace(
        b"X-PM-Tag: welcome\r\nX-Mailgate-Metadata-Order: 42\r\n", b""
    )
    assert email_.inline_parts == email_.attachments[:1]
    assert email_.download_attachments == email_.attachments[1:]


def test_bcc_header_never_used() -> None:
    """With no extra envelope recipient, bcc is empty even though a Bcc: header exists."""
    raw = crlf("From: a@example.com\nTo: b@example.com\nBcc: c@example.com\n\nhi\n")
    email_ = parse_message(raw, "a@example.com", ["B@EXAMPLE.COM"])
    assert email_.bcc == ()
    assert all(name.lower() != "bcc" for name, _ in email_.headers)
    assert email_.raw == crlf("From: a@example.com\nTo: b@example.com\n\nhi\n")


def test_bcc_envelope_order_and_duplicates() -> None:
    """Bcc keeps envelope order and lists a repeated envelope address once."""
    raw = crlf("To: a@example.com\n\nhi\n")
    email_ = parse_message(raw, "", ["z@example.com", "a@example.com", "y@x", "Z@example.com"])
    assert email_.bcc == (EmailAddress("z@example.com"), EmailAddress("y@x"))
    assert email_.envelope_sender == ""


@pytest.mark.parametrize("raw", [b"hello\r\n", b"\r\nhello\r\n"])
def test_minimal_message(raw: bytes) -> None:
    """A message that is only a body is text/plain with empty header fields."""
    email_ = parse_message(raw, "s@example.com", ["r@example.com"])
    assert email_.text == "hello\n"
    assert email_.html is None
    assert email_.from_ is None
    assert email_.to == email_.cc == email_.reply_to == ()
    assert email_.bcc == (EmailAddress("r@example.com"),)
    assert email_.subject == ""
    assert email_.attachments == ()
    assert email_.headers == ()
    assert email_.message_id is None and email_.date is None
    assert email_.controls == Controls()
    assert email_.raw == raw


def test_empty_message() -> None:
    """Empty input still yields a model with an empty text body."""
    email_ = parse_message(b"", "", ["r@example.com"])
    assert email_.text == ""
    assert email_.raw == b""


def test_text_only() -> None:
    """A text/plain message has text and no html (html is never synthesised)."""
    msg = EmailMessage()
    msg["Subject"] = "plain"
    msg.set_content("line 1\nline 2\n")
    email_ = parse_message(serialise(msg), "", [])
    assert email_.text == "line 1\nline 2\n"
    assert email_.html is None
    assert email_.attachments == ()


def test_html_only() -> None:
    """A text/html message has html and no text."""
    msg = EmailMessage()
    msg.set_content("<b>bold</b>\n", subtype="html")
    email_ = parse_message(serialise(msg), "", [])
    assert email_.text is None
    assert email_.html == "<b>bold</b>\n"


def test_quoted_printable_and_base64_bodies() -> None:
    """Transfer encodings are decoded and the declared charset honoured."""
    raw = crlf(
        "Content-Type: multipart/alternative; boundary=b\n\n"
        "--b\nContent-Type: text/plain; charset=iso-8859-1\n"
        "Content-Transfer-Encoding: quoted-printable\n\nK=F6ln =\nsoft\n"
        "--b\nContent-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: base64\n\n"
        "PHA+S8O2bG48L3A+\n--b--\n"
    )
    email_ = parse_message(raw, "", [])
    assert email_.text == "Köln soft"  # the CRLF before a boundary belongs to it
    assert email_.html == "<p>Köln</p>"


@pytest.mark.parametrize(
    "from_header, expected",
    [
        ("Joe <joe@example.com", EmailAddress("joe@example.com", "Joe")),
        ('"Unbalanced <u@example.com>', None),
        ("<<<@@>>>", None),
        ("=?utf-8?q?broken <x@example.com>", None),
        ("", None),
        ("undisclosed-recipients:;", None),
    ],
)
def test_malformed_from(from_header: str, expected: EmailAddress | None) -> None:
    """A malformed From: never crashes; well-formed parts are recovered where the parser can."""
    raw = crlf(f"From: {from_header}\nTo: r@example.com\n\nbody\n")
    email_ = parse_message(raw, "s@example.com", ["r@example.com"])
    assert isinstance(email_, OutboundEmail)
    if expected is not None:
        assert email_.from_ == expected
    else:
        assert email_.from_ is None or isinstance(email_.from_, EmailAddress)
    assert email_.to == (EmailAddress("r@example.com"),)


def test_address_fallback_when_parser_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the structured header parser raises, addresses come from email.utils.getaddresses."""
    raw = crlf("From: Joe <joe@example.com>\nTo: a@example.com, B <b@example.com>\n\nx\n")

    class Exploding:
        @property
        def addresses(self) -> tuple[()]:
            raise IndexError("stdlib bug")

    monkeypatch.setattr(
        message_module._CachingHeaderFactory, "__call__", lambda self, name, value: Exploding()
    )
    email_ = parse_message(raw, "", ["a@example.com", "b@example.com"])
    assert email_.from_ == EmailAddress("joe@example.com", "Joe")
    assert email_.to == (EmailAddress("a@example.com"), EmailAddress("b@example.com", "B"))
    assert email_.bcc == ()


@pytest.mark.parametrize(
    "body, expected",
    [
        ("Köln".encode(), "Köln"),  # mislabelled UTF-8
        ("Köln".encode("latin-1"), "Köln"),  # not UTF-8: Latin-1
    ],
)
def test_unknown_charset(body: bytes, expected: str) -> None:
    """An unknown charset falls back to UTF-8, then Latin-1, without raising."""
    raw = b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\n" + body
    assert parse_message(raw, "", []).text == expected


@pytest.mark.parametrize("charset", ["idna", "rot13", "zlib_codec", "undefined", "punycode"])
def test_non_text_codecs_not_used(charset: str) -> None:
    """Charset labels naming non-text or unsafe codecs are ignored, not executed."""
    raw = f"Content-Type: text/plain; charset={charset}\r\n\r\nabc".encode()
    assert parse_message(raw, "", []).text == "abc"


def test_declared_charset_with_bad_bytes() -> None:
    """Invalid bytes in a known charset become replacement characters."""
    raw = b"Content-Type: text/plain; charset=utf-8\r\n\r\nK\xf6ln"
    assert parse_message(raw, "", []).text == "K\ufffdln"


def test_utf8_headers_rfc6532() -> None:
    """Raw UTF-8 header bytes (RFC 6532) decode to text, not surrogate escapes."""
    raw = "Subject: Grüße\r\nFrom: Zoë <zoe@example.com>\r\nX-Note: Köln\r\n\r\nx".encode()
    email_ = parse_message(raw, "", [])
    assert email_.subject == "Grüße"
    assert email_.from_ == EmailAddress("zoe@example.com", "Zoë")
    assert email_.headers == (("X-Note", "Köln"),)


def test_subject_unfolded_and_no_line_breaks() -> None:
    """Folded subjects are unfolded; line breaks hidden in encoded words become spaces."""
    raw = crlf("Subject: a long\n  folded subject\nX-A: =?utf-8?q?x=0D=0AInjected=3A_1?=\n\nx\n")
    email_ = parse_message(raw, "", [])
    assert email_.subject == "a long  folded subject"
    assert email_.headers == (("X-A", "x Injected: 1"),)


def test_headers_filtered_ordered_unfolded() -> None:
    """Structural, trace and control headers are dropped; others kept in order, unfolded, decoded."""
    raw = crlf(
        "Received: from a\n by b\nReturn-Path: <x@y>\nX-B: 1\nMIME-Version: 1.0\n"
        "Content-Type: text/plain\nContent-Language: de\nX-A: folded\n value\n"
        "Resent-Bcc: r@example.com\nX-B: 2\nKeywords: =?utf-8?q?K=C3=B6ln?=\n"
        "X-Mailgate-Internal: secret\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n"
        "Message-ID:\n <id.1@example.com>\n\nbody\n"
    )
    email_ = parse_message(raw, "", [])
    assert email_.headers == (
        ("X-B", "1"),
        ("X-A", "folded value"),
        ("X-B", "2"),
        ("Keywords", "Köln"),
    )
    assert email_.message_id == "id.1@example.com"
    assert email_.date == "Mon, 1 Jan 2024 00:00:00 +0000"
    assert b"Resent-Bcc" not in email_.raw and b"X-Mailgate-Internal" not in email_.raw
    assert b"Received: from a\r\n by b\r\n" in email_.raw


@pytest.mark.parametrize(
    "value, expected",
    [("<a@b>", "a@b"), ("  <a@b>  ", "a@b"), ("a@b", "a@b"), ("<a@b> (c)", "a@b"), ("", None)],
)
def test_message_id(value: str, expected: str | None) -> None:
    """Message-ID loses its angle brackets; an empty one is None."""
    raw = crlf(f"Message-ID: {value}\n\nx\n")
    assert parse_message(raw, "", []).message_id == expected


def test_message_rfc822_attachment() -> None:
    """An attached message is one attachment holding its bytes, named message.eml by default."""
    inner = EmailMessage()
    inner["Subject"] = "inner"
    inner["From"] = "inner@example.com"
    inner.set_content("inner body\n")
    inner.add_attachment(b"data", maintype="application", subtype="octet-stream", filename="d.bin")
    outer = EmailMessage()
    outer["Subject"] = "outer"
    outer.set_content("see attached\n")
    outer.add_attachment(inner)
    email_ = parse_message(serialise(outer), "", [])
    assert email_.text == "see attached\n"
    assert len(email_.attachments) == 1
    attached = email_.attachments[0]
    assert attached.content_type == "message/rfc822"
    assert attached.filename == "message.eml"
    assert attached.inline is False
    reparsed = parse_message(attached.content, "", [])
    assert reparsed.subject == "inner"
    assert reparsed.text == "inner body\n"
    assert [a.filename for a in reparsed.attachments] == ["d.bin"]


def test_text_attachment_is_not_body() -> None:
    """text/plain and text/html parts with Content-Disposition: attachment are attachments."""
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=b\n\n"
        "--b\nContent-Type: text/plain\n\nbody\n"
        '--b\nContent-Type: text/plain\nContent-Disposition: attachment; filename="notes.txt"\n\n'
        "notes\n"
        "--b\nContent-Type: text/html\nContent-Disposition: attachment\n\n<p>page</p>\n--b--\n"
    )
    email_ = parse_message(raw, "", [])
    assert email_.text == "body"
    assert email_.html is None
    assert email_.attachments == (
        Attachment("notes.txt", "text/plain", b"notes"),
        Attachment(None, "text/html", b"<p>page</p>"),
    )


def test_only_attachment_text_body_is_none() -> None:
    """A single text part marked as attachment gives no text body."""
    raw = crlf('Content-Type: text/plain\nContent-Disposition: attachment; filename="a.txt"\n\nx')
    email_ = parse_message(raw, "", [])
    assert email_.text is None
    assert email_.attachments == (Attachment("a.txt", "text/plain", b"x"),)


def test_inline_rules() -> None:
    """Inline means a Content-ID plus inline disposition, or a Content-ID inside multipart/related."""
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=b\n\n"
        "--b\nContent-Type: text/plain\n\nbody\n"
        "--b\nContent-Type: image/gif\nContent-ID: <a@x>\nContent-Disposition: inline\n\nA\n"
        "--b\nContent-Type: image/gif\nContent-Disposition: inline\n\nB\n"
        "--b\nContent-Type: image/gif\nContent-ID: <c@x>\n\nC\n"
        "--b\nContent-Type: image/GIF\nContent-ID: d@x\nContent-Disposition: attachment\n\nD\n"
        "--b--\n"
    )
    email_ = parse_message(raw, "", [])
    assert [(a.content_id, a.inline, a.content) for a in email_.attachments] == [
        ("a@x", True, b"A"),
        (None, False, b"B"),
        ("c@x", False, b"C"),
        ("d@x", False, b"D"),
    ]
    assert email_.attachments[3].content_type == "image/gif"


def test_filename_from_content_type_name() -> None:
    """Without a Content-Disposition filename, the Content-Type name parameter is used."""
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=b\n\n--b\n\nbody\n"
        '--b\nContent-Type: application/pdf; name="=?utf-8?q?r=C3=A9sum=C3=A9.pdf?="\n'
        "Content-Transfer-Encoding: base64\n\nJVBERg==\n--b--\n"
    )
    (attachment,) = parse_message(raw, "", []).attachments
    assert attachment.filename == "résumé.pdf"
    assert attachment.content == b"%PDF"


def nested(depth: int) -> bytes:
    head = "".join(
        f"Content-Type: multipart/mixed; boundary=b{i}\n\n--b{i}\n" for i in range(depth)
    )
    tail = "".join(f"--b{i}--\n" for i in reversed(range(depth)))
    return crlf(head + "Content-Type: text/plain\n\nx\n" + tail)


def test_nesting_at_limit_accepted() -> None:
    """MIME nesting up to MAX_DEPTH parses."""
    assert parse_message(nested(MAX_DEPTH), "", []).text == "x"


def test_nesting_beyond_limit_rejected() -> None:
    """MIME nesting deeper than MAX_DEPTH raises MessageParseError."""
    with pytest.raises(MessageParseError) as info:
        parse_message(nested(MAX_DEPTH + 1), "", [])
    assert str(MAX_DEPTH) in info.value.reason


def test_attached_message_nesting_counts() -> None:
    """Nesting inside attached messages counts towards the depth limit."""
    raw = b"x\r\n"
    for _ in range(MAX_DEPTH + 2):
        raw = b"Content-Type: message/rfc822\r\n\r\n" + raw
    with pytest.raises(MessageParseError):
        parse_message(raw, "", [])


def test_recursion_error_becomes_parse_error() -> None:
    """Nesting deep enough to exhaust the interpreter's recursion raises MessageParseError."""
    raw = b"x\r\n"
    for _ in range(3000):
        raw = b"Content-Type: message/rfc822\r\n\r\n" + raw
    with pytest.raises(MessageParseError):
        parse_message(raw, "", [])


def test_too_many_parts() -> None:
    """More than MAX_PARTS parts raises MessageParseError."""
    parts = "".join("--b\nContent-Type: text/plain\n\nx\n" for _ in range(MAX_PARTS))
    raw = crlf(f"Content-Type: multipart/mixed; boundary=b\n\n{parts}--b--\n")
    with pytest.raises(MessageParseError) as info:
        parse_message(raw, "", [])
    assert str(MAX_PARTS) in info.value.reason


def test_parse_work_bound() -> None:
    """Many lines inside many nested multiparts are refused before the slow stdlib parse."""
    head = "".join(f"Content-Type: multipart/mixed; boundary=b{i}\n\n--b{i}\n" for i in range(20))
    lines = MAX_PARSE_WORK // 20 + 1
    raw = crlf(head + "Content-Type: text/plain\n\n") + b"x\r\n" * lines
    with pytest.raises(MessageParseError) as info:
        parse_message(raw, "", [])
    assert "complex" in info.value.reason


def test_parse_work_bound_admits_large_attachment() -> None:
    """A 10 MiB base64 attachment in an ordinary structure is well within the work bound."""
    line = b"QUJD" * 19 + b"\r\n"
    raw = (
        crlf(
            "Content-Type: multipart/mixed; boundary=b\n\n--b\n\nhi\n--b\n"
            "Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
        )
        + line * (10 * 1024 * 1024 // len(line))
        + b"--b--\r\n"
    )
    email_ = parse_message(raw, "", [])
    assert email_.text == "hi"
    assert len(email_.attachments[0].content) == 10 * 1024 * 1024 // len(line) * 57


def test_unexpected_error_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected exception becomes MessageParseError with the original as its cause."""

    def boom(*args: object) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(message_module, "_walk", boom)
    with pytest.raises(MessageParseError) as info:
        parse_message(b"x", "", [])
    assert isinstance(info.value.__cause__, KeyError)


def test_non_bytes_is_type_error() -> None:
    """Passing text instead of bytes is a programming error, reported as TypeError."""
    with pytest.raises(TypeError):
        parse_message("From: x", "", [])  # type: ignore[arg-type]


def test_bytearray_accepted() -> None:
    """bytearray input is accepted like bytes."""
    assert parse_message(bytearray(b"hi"), "", []).text == "hi"


def test_broken_multipart_is_attachment() -> None:
    """A multipart with no usable boundary is kept as an octet-stream attachment, not lost."""
    raw = crlf("Content-Type: multipart/mixed\n\nsome text\n")
    email_ = parse_message(raw, "", [])
    assert email_.text is None
    assert email_.attachments == (
        Attachment(None, "application/octet-stream", crlf("some text\n")),
    )


# --- raw filtering -------------------------------------------------------------


def test_raw_untouched_without_removals() -> None:
    """When nothing is removed, raw is the input object itself."""
    raw = crlf("From: a@example.com\nSubject: s\n\nBcc: not-a-header\n")
    assert parse_message(raw, "", []).raw is raw


def test_raw_filter_folded_and_body_exact() -> None:
    """Folded Bcc/control fields go with their continuation lines; body bytes are untouched."""
    body = b"Bcc: in body stays\r\nX-PM-Tag: also stays\r\n\r\n\x00\xff binary \r\n.\r\n"
    raw = (
        b"From: a@example.com\r\nBcc: one@example.com,\r\n\ttwo@example.com\r\n"
        b'x-pm-tag: t\r\nSubject: s\r\nX-SMTPAPI: {"a":\r\n 1}\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + body
    )
    email_ = parse_message(raw, "", [])
    assert email_.raw == (
        b"From: a@example.com\r\nSubject: s\r\n"
        b"Content-Type: application/octet-stream\r\n\r\n" + body
    )
    assert email_.controls == Controls(tags=("t",), smtpapi='{"a": 1}')


def test_raw_filter_lf_only_and_no_body() -> None:
    """The filter handles LF-only line endings and a message without a body."""
    raw = b"Subject: s\nBCC: x@y\n  z@y\nX-Other: 1"
    assert parse_message(raw, "", []).raw == b"Subject: s\nX-Other: 1"


def test_raw_filter_stops_where_parser_stops() -> None:
    """A non-header line ends the header block for the filter as for the parser."""
    raw = crlf("Subject: s\nnot a header line\nBcc: x@y\n\nbody\n")
    email_ = parse_message(raw, "", [])
    assert email_.raw == raw
    assert email_.text == "not a header line\nBcc: x@y\n\nbody\n"


CONTROL_HEADERS = [
    ("X-Mailgate-Tag", "t", Controls(tags=("t",))),
    ("X-PM-Tag", "t", Controls(tags=("t",))),
    ("X-Mailgun-Tag", "t", Controls(tags=("t",))),
    ("X-Mailgate-Metadata-K", "v", Controls(metadata=(("K", "v"),))),
    ("X-PM-Metadata-K", "v", Controls(metadata=(("K", "v"),))),
    ("X-Mailgun-Variables", '{"K": "v"}', Controls(metadata=(("K", "v"),))),
    ("X-Mailgate-Stream", "s", Controls(stream="s")),
    ("X-PM-Message-Stream", "s", Controls(stream="s")),
    ("X-Mailgate-Track-Opens", "yes", Controls(track_opens=True)),
    ("X-PM-TrackOpens", "true", Controls(track_opens=True)),
    ("X-SMTPeter-TrackOpens", "false", Controls(track_opens=False)),
    ("X-Mailgate-Track-Clicks", "no", Controls(track_clicks=False)),
    ("X-PM-TrackLinks", "HtmlOnly", Controls(track_clicks=True, track_links_mode="HtmlOnly")),
    ("X-SMTPeter-TrackClicks", "1", Controls(track_clicks=True)),
    ("X-Mailgate-Transactional", "true", Controls(transactional=True)),
    ("X-Bento-Transactional", "true", Controls(transactional=True)),
    ("X-Mailgate-Layout", "l", Controls(layout="l")),
    ("X-Bento-Layout-Id", "l", Controls(layout="l")),
    ("X-Mailgate-Inline-CSS", "true", Controls(inline_css=True)),
    ("X-SMTPeter-InlineCSS", "true", Controls(inline_css=True)),
    ("X-Mailgate-Keep-Message-ID", "true", Controls(keep_message_id=True)),
    ("X-PM-KeepID", "true", Controls(keep_message_id=True)),
    ("X-SMTPeter-TrackBounces", "true", Controls()),
    ("X-SMTPAPI", '{"category": "c"}', Controls(smtpapi='{"category": "c"}')),
    ("X-Mailgate-Track-Opens", "garbage", Controls()),
]


@pytest.mark.parametrize(
    "name, value, expected", CONTROL_HEADERS, ids=[f"{n}={v}" for n, v, _ in CONTROL_HEADERS]
)
def test_control_headers_extracted_and_stripped(name: str, value: str, expected: Controls) -> None:
    """Each control header sets Controls and is removed from headers and raw, whatever its value."""
    raw = crlf(f"Subject: s\n{name}: {value}\nX-Keep: k\n\nbody\n")
    email_ = parse_message(raw, "", [])
    assert email_.controls == expected
    assert email_.headers == (("X-Keep", "k"),)
    assert email_.raw == crlf("Subject: s\nX-Keep: k\n\nbody\n")


def test_account_defaults_only_when_absent() -> None:
    """Account defaults apply to controls the message does not set, and not to the others."""
    defaults = {"X-Mailgate-Track-Opens": "true", "X-Mailgate-Tag": "welcome"}
    raw = crlf("X-PM-Tag: reset\n\nbody\n")
    email_ = parse_message(raw, "", [], defaults)
    assert email_.controls == Controls(tags=("reset",), track_opens=True)
    assert parse_message(crlf("\nbody\n"), "", [], defaults).controls == Controls(
        tags=("welcome",), track_opens=True
    )


# --- text_to_html ---------------------------------------------------------------


def test_text_to_html() -> None:
    """Plain text becomes an escaped HTML document with <br> breaks and kept spacing."""
    result = text_to_html("a <b> & c\r\n  indented\tx  y\n\nend")
    assert result.startswith("<!DOCTYPE html>")
    assert "<html>" in result and result.rstrip().endswith("</body></html>")
    assert (
        "a &lt;b&gt; &amp; c<br>\n&nbsp;&nbsp;indented&nbsp;&nbsp;x&nbsp;&nbsp;y<br>\n<br>\nend"
        in result
    )


def test_text_to_html_no_markup_injection() -> None:
    """Text cannot close the wrapper or inject tags."""
    result = text_to_html("</div></body><script>alert(1)</script>")
    assert "<script>" not in result and "</div></body><" not in result.split("<div", 1)[1][:60]


# --- properties -----------------------------------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_crash(raw: bytes) -> None:
    """Arbitrary bytes give an OutboundEmail or a deliberate MessageParseError, nothing else."""
    try:
        result = parse_message(raw, "s@example.com", ["r@example.com"])
    except MessageParseError as exc:
        # A wrapped unexpected exception would be a bug: only recursion is expected.
        assert exc.__cause__ is None or isinstance(exc.__cause__, RecursionError)
    else:
        assert isinstance(result, OutboundEmail)


MIME_ISH = st.lists(
    st.sampled_from(
        [
            b"From: a@example.com\r\n",
            b"To: =?utf-8?q?x?= <b@example.com>, broken <\r\n",
            b"Bcc: c@example.com\r\n",
            b"X-PM-Tag: t\r\n",
            b" folded\r\n",
            b"Content-Type: multipart/mixed; boundary=b\r\n",
            b"Content-Type: message/rfc822\r\n",
            b"Content-Type: text/plain; charset=bogus\r\n",
            b"Content-Transfer-Encoding: base64\r\n",
            b"Content-Disposition: attachment; filename*=utf-8''%FF\r\n",
            b"Content-ID: <x@y>\r\n",
            b"--b\r\n",
            b"--b--\r\n",
            b"\r\n",
            b"\xff\xfe\x00 junk =?x?q?=ZZ?=\r\n",
            b"QUJD\r\n",
        ]
    ),
    max_size=40,
).map(b"".join)


@settings(max_examples=200, deadline=None)
@given(MIME_ISH)
def test_mime_like_bytes_never_crash(raw: bytes) -> None:
    """MIME-shaped junk gives an OutboundEmail or a deliberate MessageParseError."""
    try:
        result = parse_message(raw, "", ["r@example.com"])
    except MessageParseError as exc:
        assert exc.__cause__ is None or isinstance(exc.__cause__, RecursionError)
    else:
        # The byte-level filter and the parser agree on what the headers are.
        forwarded = email.message_from_bytes(result.raw, policy=policy.default)
        assert forwarded.get_all("bcc") is None
        assert all(not name.lower().startswith("x-pm-") for name in forwarded)
        assert all(not name.lower().startswith("x-pm-") for name, _ in result.headers)


LOCAL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
ADDRESS = st.builds(lambda local, domain: f"{local}@{domain}.example", LOCAL, LOCAL)
SUBJECT = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Co", "Cn")),
    max_size=120,
).map(lambda s: " ".join(s.split()))


@settings(max_examples=200, deadline=None)
@given(
    subject=SUBJECT,
    to=st.lists(ADDRESS, max_size=4),
    cc=st.lists(ADDRESS, max_size=4),
    extra=st.lists(ADDRESS, max_size=4),
    data=st.data(),
)
def test_round_trip(
    subject: str, to: list[str], cc: list[str], extra: list[str], data: st.DataObject
) -> None:
    """Generated messages keep their subject, and bcc is envelope minus (To ∪ Cc)."""
    msg = EmailMessage()
    msg["From"] = "sender@example.com"
    if to:
        msg["To"] = ", ".join(to)
    if cc:
        msg["Cc"] = ", ".join(email.utils.formataddr(("Name Ü", a)) for a in cc)
    msg["Subject"] = subject
    msg.set_content("body\n")
    envelope = data.draw(st.permutations(to + cc + extra))
    # Envelope addresses may differ in case from the headers.
    envelope = [a.upper() if data.draw(st.booleans()) else a for a in envelope]
    # No folding: CPython's folder can encode the comma between two addresses as
    # "=?utf-8?q?=2C?=" (an encoded word, not a separator), which would make this
    # test about the stdlib's serialiser instead of our parser.
    raw = msg.as_bytes(policy=policy.SMTP.clone(max_line_length=None))
    email_ = parse_message(raw, "sender@example.com", envelope)
    assert email_.subject == subject
    in_headers = {a.lower() for a in to + cc}
    expected: list[str] = []
    for rcpt in envelope:
        if rcpt.lower() not in in_headers and rcpt.lower() not in {e.lower() for e in expected}:
            expected.append(rcpt)
    assert [a.address for a in email_.bcc] == expected
    assert [a.address for a in email_.to] == to
    assert [a.address for a in email_.cc] == cc


_WORD = st.text(alphabet="abcXYZ019!#$%&'*+/?^_`{|}~-", min_size=1, max_size=6)
_ADDR = st.builds(
    lambda local, domain: f"{local}@{domain}",
    st.lists(st.text(alphabet="abz09!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=5), min_size=1, max_size=3).map(".".join),
    st.lists(st.text(alphabet="abz09-", min_size=1, max_size=5), min_size=1, max_size=3).map(".".join),
)
_MAILBOX = st.one_of(
    _ADDR,
    _ADDR.map(lambda a: f"<{a}>"),
    st.tuples(st.lists(_WORD, min_size=1, max_size=3).map(" ".join), _ADDR).map(lambda p: f"{p[0]} <{p[1]}>"),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_MAILBOX, min_size=1, max_size=4), st.sampled_from([",", ", ", ",\r\n "]))
def test_simple_mailbox_fast_path_agrees_with_stdlib(mailboxes: list[str], separator: str) -> None:
    """The fast path for plain address lists gives exactly what the RFC 5322 parser gives."""
    from email.policy import default

    from mailgate.message import simple_mailboxes

    value = separator.join(mailboxes)
    fast = simple_mailboxes(value)
    header = default.header_fetch_parse("To", value)
    assert fast == [(a.display_name, a.addr_spec) for a in header.addresses]


def test_author_addresses_cover_every_sender_header() -> None:
    """Every mailbox of every From, Sender and Resent-From field is listed, so a sender
    restriction cannot be dodged with a second From or a Sender header."""
    raw = crlf(
        "From: Bob <bob@example.com>, ceo@bank.example\n"
        "From: other@evil.example\n"
        "Sender: relay@example.net\n"
        "Resent-From: =?utf-8?q?R=C3=A9?= <re@example.org>\n"
        "Subject: x\n\nbody\n"
    )
    email_ = parse_message(raw, "bob@example.com", ["a@example.org"])
    assert email_.from_ == EmailAddress("bob@example.com", "Bob")
    assert email_.author_addresses == (
        "bob@example.com",
        "ceo@bank.example",
        "other@evil.example",
        "relay@example.net",
        "re@example.org",
    )


# --- the Content-Type / Content-Transfer-Encoding fast path -------------------

_HEADER_PIECES = [
    *"abcdef012 \t\"\\;=/*'%-_.?()",
    "boundary",
    "charset",
    "name",
    "text/",
    "multipart/",
    "utf-8",
    "=?utf-8?q?x?=",
    "\r\n ",
    "é",
]


def _observed(message: EmailMessage) -> object:
    """What the feed parser, the body walk and the decoder read from the two headers."""
    try:
        return (
            message.get_content_type(),
            message.get_content_maintype(),
            message.get_boundary(),
            message.get_content_charset(),
            message.get_param("name"),
            str(message.get("content-transfer-encoding", "")).strip().lower(),
        )
    except Exception as exc:  # the stock parser has bugs of its own; they must match too
        return ("raised", type(exc).__name__)


@settings(max_examples=2000, deadline=None)
@given(
    st.lists(st.sampled_from(_HEADER_PIECES), max_size=20).map("".join),
    st.lists(st.sampled_from(_HEADER_PIECES), max_size=6).map("".join),
)
def test_plain_string_fast_path_answers_like_the_structured_parser(content_type: str, encoding: str) -> None:
    """For every value, well-formed or not, the fast path's answers equal policy.default's."""
    stock = EmailMessage(policy=policy.default)
    fast = message_module._ParsedMessage(policy=policy.default)
    for parsed in (stock, fast):
        parsed._headers.append(("Content-Type", content_type))
        parsed._headers.append(("Content-Transfer-Encoding", encoding))
    assert _observed(fast) == _observed(stock)


def test_fast_path_is_taken_for_typical_mime_headers() -> None:
    """The common forms are read as plain strings (else the speed-up silently vanishes)."""
    fast = message_module._ParsedMessage(policy=policy.default)
    fast._headers.append(("Content-Type", 'multipart/alternative;\r\n boundary="----=_Part_1_2.3"'))
    fast._headers.append(("Content-Transfer-Encoding", "quoted-printable"))
    assert type(fast.get("content-type")) is str
    assert type(fast.get("content-transfer-encoding")) is str
    assert fast.get_boundary() == "----=_Part_1_2.3"
