"""Shared field mapping for JSON APIs: envelope-true recipients, forwarded headers, names, limits."""

from __future__ import annotations

from mailgate.message import parse_message
from mailgate.model import Attachment, EmailAddress
from mailgate.providers.mapping import (
    Recipients,
    attachment_name,
    base64_size,
    bodies,
    check_limits,
    forwarded_headers,
    split_recipients,
)


def test_recipients_follow_the_envelope_and_are_unique() -> None:
    """Header-only addresses are dropped, duplicates kept once, the rest of the envelope is Bcc."""
    raw = b"From: a@example.com\r\nTo: B <b@example.org>, outsider@example.org, b@example.org\r\nCc: B@example.org, c@example.org\r\n\r\nx\r\n"
    email = parse_message(raw, "a@example.com", ("b@example.org", "c@example.org", "d@example.org"))
    assert split_recipients(email) == [
        Recipients(
            (EmailAddress("b@example.org", "B"),),
            (EmailAddress("c@example.org"),),
            (EmailAddress("d@example.org"),),
        )
    ]


def test_without_require_to_an_all_blind_message_is_one_group() -> None:
    """APIs that accept Bcc without To get one request."""
    email = parse_message(b"From: a@example.com\r\n\r\nx\r\n", "a@example.com", ("x@example.org", "y@example.org"))
    assert split_recipients(email, require_to=False) == [
        Recipients((), (), (EmailAddress("x@example.org"), EmailAddress("y@example.org")))
    ]


def test_forwarded_headers_drop_signatures_and_honour_reserved() -> None:
    """DKIM/ARC/Authentication-Results never pass; reserved names are the API's own."""
    raw = (
        b"From: a@example.com\r\nARC-Seal: i=1\r\nAuthentication-Results: mx; spf=pass\r\n"
        b"List-Unsubscribe: <mailto:u@example.com>\r\nX-Other: 1\r\n\r\nx\r\n"
    )
    email = parse_message(raw, "a@example.com", ("b@example.org",))
    assert forwarded_headers(email, frozenset({"x-other"})) == [("List-Unsubscribe", "<mailto:u@example.com>")]


def test_nameless_parts_get_names_from_their_type() -> None:
    """APIs require file names: a nameless part gets one with a fitting extension."""
    assert attachment_name(Attachment(None, "application/pdf", b""), 0) == "attachment-1.pdf"
    assert attachment_name(Attachment(None, "image/png", b"", "c@x", inline=True), 1) == "inline-2.png"
    assert attachment_name(Attachment(None, "application/x-unknown-thing", b""), 2) == "attachment-3.bin"
    assert attachment_name(Attachment("a.txt", "text/plain", b""), 0) == "a.txt"


def test_limits_at_the_boundary() -> None:
    """Exactly at a limit passes; one over answers 452 4.5.3 or 552 5.3.4."""
    assert [base64_size(n) for n in (0, 1, 2, 3, 4)] == [0, 4, 4, 4, 8]
    assert check_limits("p", "P", 50, 100, 50, 100) is None
    over = check_limits("p", "P", 51, 100, 50, 100)
    assert over is not None and str(over.reply()) == "452 4.5.3 Rejected by p: P accepts at most 50 recipients per message; this one has 51"
    big = check_limits("p", "P", 1, 101, 50, 100)
    assert big is not None and (big.code, big.enhanced) == (552, "5.3.4")


TEXT_WITH_EMPTY_HTML = (
    b"From: a@example.com\r\nTo: b@example.org\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
    b"--b\r\nContent-Type: text/plain\r\n\r\nHello text\r\n"
    b"--b\r\nContent-Type: text/html\r\n\r\n\r\n--b--\r\n"
)
EMPTY_HTML_ONLY = b"From: a@example.com\r\nTo: b@example.org\r\nMIME-Version: 1.0\r\nContent-Type: text/html\r\n\r\n"


def test_bodies_treat_an_empty_part_as_absent() -> None:
    """An empty HTML part never hides the text (clients would show a blank message),
    and a message with no body at all gets the one-space text the APIs require."""
    def of(raw: bytes) -> tuple[str | None, str | None]:
        return bodies(parse_message(raw, "a@example.com", ("b@example.org",)))

    assert of(TEXT_WITH_EMPTY_HTML) == ("Hello text", None)
    assert of(EMPTY_HTML_ONLY) == (" ", None)
    assert of(b"From: a@example.com\r\nContent-Type: text/html\r\n\r\n<p>x</p>") == (None, "<p>x</p>")
    assert of(b"From: a@example.com\r\n\r\nhi") == ("hi", None)
