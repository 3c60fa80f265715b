"""CSS inlining at parse time: the headers and account default that ask for it, its bounds, its failures."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import css_inline
import pytest
from twisted.logger import LogLevel, globalLogPublisher

from mailgate import inlinecss
from mailgate.inlinecss import MAX_WORK, inline_css
from mailgate.message import parse_message

STYLED = (
    "<html><head><style>p { color: red } @media (max-width: 600px) { p { color: blue } }</style>"
    '<link rel="stylesheet" href="http://127.0.0.1:9/remote.css"></head>'
    "<body><p>Hello</p></body></html>"
)


def message(*headers: str, html: str = STYLED) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return (
        f"From: a@example.com\r\nTo: b@example.org\r\n{head}MIME-Version: 1.0\r\n"
        f"Content-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n"
    ).encode()


@pytest.fixture
def warnings() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.warn and event.get("log_namespace") == "mailgate.inlinecss":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


@pytest.mark.parametrize("header", ["X-Mailgate-Inline-CSS: true", "X-SMTPeter-InlineCSS: 1"])
def test_header_inlines_the_css(header: str, warnings: list[dict[str, Any]]) -> None:
    """The canonical header and SMTPeter's alias move rules into style attributes; @media stays."""
    email = parse_message(message(header), "a@example.com", ("b@example.org",))
    assert email.html is not None
    assert '<p style="color: red;">Hello</p>' in email.html
    assert "@media (max-width: 600px)" in email.html
    # The remote stylesheet was neither fetched (that would have failed and left the
    # HTML alone with a warning) nor dropped.
    assert 'href="http://127.0.0.1:9/remote.css"' in email.html
    assert warnings == []
    assert not any(name.lower().startswith(("x-mailgate", "x-smtpeter")) for name, _ in email.headers)


def test_without_header_the_html_is_untouched() -> None:
    """No header and no account default: the HTML is exactly what the client sent."""
    email = parse_message(message(), "a@example.com", ("b@example.org",))
    assert email.html == STYLED + "\n"


def test_account_default_and_header_override() -> None:
    """An account default turns inlining on; the message's own header can turn it off."""
    defaults = {"X-Mailgate-Inline-CSS": "true"}
    on = parse_message(message(), "a@example.com", ("b@example.org",), defaults)
    off = parse_message(message("X-Mailgate-Inline-CSS: false"), "a@example.com", ("b@example.org",), defaults)
    assert on.html is not None and 'style="color: red;"' in on.html
    assert off.html == STYLED + "\n"


def test_text_only_message_is_unaffected() -> None:
    """Inlining concerns HTML only: a text message is unchanged."""
    raw = b"From: a@example.com\r\nTo: b@example.org\r\nX-Mailgate-Inline-CSS: true\r\n\r\np { color: red }\r\n"
    email = parse_message(raw, "a@example.com", ("b@example.org",))
    assert (email.text, email.html) == ("p { color: red }\n", None)


def test_too_complex_html_is_sent_as_is(warnings: list[dict[str, Any]]) -> None:
    """HTML beyond the work bound is not inlined (bounded parse time) and a warning says why."""
    rules = 2000
    tags = MAX_WORK // rules + 10
    html = "<style>" + "*{color:red}" * rules + "</style>" + "<b>" * tags
    assert inline_css(html) is html
    [event] = warnings
    assert "too complex" in event["log_format"]


def test_inliner_failure_keeps_the_message(monkeypatch: pytest.MonkeyPatch, warnings: list[dict[str, Any]]) -> None:
    """A css-inline error never loses a message: the HTML goes out un-inlined, with a warning."""

    class Failing:
        def inline(self, html: str) -> str:
            raise css_inline.InlineError("broken stylesheet")

    monkeypatch.setattr(inlinecss, "_INLINER", Failing())
    email = parse_message(message("X-Mailgate-Inline-CSS: yes"), "a@example.com", ("b@example.org",))
    assert email.html == STYLED + "\n"
    [event] = warnings
    assert "broken stylesheet" in event["error"]


def test_html_without_style_block_is_returned_unchanged() -> None:
    """Nothing to inline means no re-serialisation of the client's HTML."""
    html = '<p style="color: red">x</p>'
    assert inline_css(html) is html
