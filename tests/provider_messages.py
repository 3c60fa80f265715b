"""Messages shared by the provider adapters' golden tests and end-to-end tests.

The rich message exercises every mapped field at once: UTF-8 subject and
names, text and HTML bodies, Cc, a Bcc recipient known only from the envelope,
Reply-To, a download attachment, an inline image referenced by ``cid:``, and
the control headers for tag, metadata, stream and tracking.
"""

from __future__ import annotations

from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY

SENDER = "alice@example.com"
# bob is To, carol Cc, dave only in the envelope (Bcc).
RECIPIENTS = ("bob@example.org", "carol@example.net", "dave.hidden@example.com")
PDF = b"%PDF-1.4\n% test attachment\n" + bytes(range(256))
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16 + b"test-image"
TEXT = "Hello Bob,\nthe report is attached.\n"
HTML = '<p>Hello <b>Bob</b>,</p><p><img src="cid:logo@example.com"> the report is attached.</p>\n'
SUBJECT = "Grüße ✓ Quarterly report"

MINIMAL = (
    b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: hi\r\n"
    b"Message-ID: <min-1@example.com>\r\n\r\nHello\r\n"
)


def rich_message(**extra_headers: str) -> bytes:
    message = EmailMessage()
    message["From"] = "Ålice Exämple <alice@example.com>"
    message["To"] = "Bob <bob@example.org>"
    message["Cc"] = "carol@example.net"
    message["Bcc"] = "dave.hidden@example.com"
    message["Reply-To"] = "Support Team <support@example.com>"
    message["Subject"] = SUBJECT
    message["Message-ID"] = "<report-42@example.com>"
    message["Date"] = "Sun, 22 Nov 2026 10:00:00 +0000"
    message["X-Campaign"] = "q4"
    message["X-Mailgate-Tag"] = "reports"
    message["X-Mailgate-Metadata-Customer"] = "42"
    message["X-Mailgate-Stream"] = "broadcast"
    message["X-Mailgate-Track-Opens"] = "true"
    message["X-Mailgate-Track-Clicks"] = "true"
    for name, value in extra_headers.items():
        message[name.replace("_", "-")] = value
    message.set_content(TEXT)
    message.add_alternative(HTML, subtype="html")
    html_part = message.get_payload()[1]
    html_part.add_related(PNG, maintype="image", subtype="png", cid="<logo@example.com>", filename="logo.png")
    message.add_attachment(PDF, maintype="application", subtype="pdf", filename="report.pdf")
    return message.as_bytes(policy=SMTP_POLICY)
