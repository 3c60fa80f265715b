"""CSS inlining: ``X-Mailgate-Inline-CSS`` / ``X-SMTPeter-InlineCSS`` (or an account default).

Many mail clients (Gmail's apps, Outlook) ignore ``<style>`` blocks, so
senders who write their HTML with a stylesheet ask for it to be moved into
``style`` attributes before sending, as SMTPeter does for its
``X-SMTPeter-InlineCSS`` header
(https://www.smtpeter.com/en/documentation/smtp-headers).  mailgate does it
once, where the message is parsed (:func:`mailgate.message.parse_message`),
so every provider receives the inlined HTML.  Raw-MIME providers forward the
client's bytes unchanged and so the client's HTML.

The work is done by css-inline (https://css-inline.org, a maintained Rust
implementation with Python bindings) with these choices:

* remote stylesheets are never fetched (``load_remote_stylesheets=False``):
  parsing must not do network I/O, and a message must not make mailgate
  request arbitrary URLs; ``<link>`` tags are kept for clients that load them;
* ``@media`` and other at-rules, which cannot be inlined, stay in a
  ``<style>`` block (``keep_at_rules=True``) so responsive layouts still work.

Bounded cost: css-inline's work grows with rules x elements (about 30 ms per
million matching pairs, measured).  Parsing runs on the reactor thread for
small messages, so HTML whose estimate (``{`` count x ``<`` count, an upper
bound on rules x elements, about twice the real product) exceeds
:data:`MAX_WORK` is sent as it is: worst case about 0.17 s per message.

Failure never loses a message: HTML that is too complex, or that css-inline
cannot process, is sent un-inlined (the ``<style>`` block still works in the
clients that honour it) and a warning is logged with the reason.  A permanent reply would be worse: the client would bounce a
deliverable message over presentation.
"""

from __future__ import annotations

import css_inline
from twisted.logger import Logger

__all__ = ["MAX_WORK", "inline_css"]

log = Logger()

#: Upper bound on (number of "{") x (number of "<") in the HTML.
MAX_WORK = 10_000_000

_INLINER = css_inline.CSSInliner(
    load_remote_stylesheets=False,
    keep_at_rules=True,
    keep_link_tags=True,
)


def inline_css(html: str) -> str:
    """``html`` with its ``<style>`` rules moved into ``style`` attributes.

    Returns ``html`` unchanged (and logs a warning) when it is too complex or
    cannot be processed; never raises.
    """
    if "<style" not in html.lower():
        return html  # Nothing to inline; skip the parse and re-serialisation.
    work = html.count("{") * html.count("<")
    if work > MAX_WORK:
        log.warn(
            "CSS not inlined: the HTML is too complex ({rules} rules x {tags} tags)",
            rules=html.count("{"),
            tags=html.count("<"),
        )
        return html
    try:
        return _INLINER.inline(html)
    except Exception as error:  # noqa: BLE001 - presentation must never lose a message
        log.warn("CSS not inlined: {error}", error=f"{type(error).__name__}: {error}")
        return html
