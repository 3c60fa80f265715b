"""RFC 3464 delivery status notifications, checked by parsing them back with the stdlib email package."""

from __future__ import annotations

import email
import email.policy
import email.utils
from email.message import EmailMessage, Message
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.dsn import build_dsn
from mailgate.message import parse_message

ARRIVAL = 1795348800.0  # 2026-11-22 12:00:00 UTC
NOW = ARRIVAL + 5 * 86400
ORIGINAL = (
    b"Received: from client.example ([192.0.2.1])\r\n"
    b"\tby mx.example.com (mailgate) with ESMTPSA id QID42;\r\n"
    b"\tSun, 22 Nov 2026 12:00:00 +0000\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: Quarterly report\r\n"
    b"Message-ID: <report-42@example.com>\r\n"
    b"\r\n"
    b"The body must not be in the report.\r\n"
)


def dsn(**overrides: Any) -> bytes:
    arguments: dict[str, Any] = {
        "reporting_mta": "mx.example.com",
        "queue_id": "QID42",
        "envelope_sender": "alice@example.com",
        "recipients": [
            ("bob@example.org", "5.6.0", "554 5.6.0 Rejected by main: HTTP 400: invalid recipient"),
            ("carol@example.net", "4.4.7", "queue lifetime of 5 days expired; last error: API unavailable (HTTP 503)"),
        ],
        "original_headers": ORIGINAL,
        "arrival": ARRIVAL,
        "now": NOW,
    }
    arguments.update(overrides)
    return build_dsn(**arguments)


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert message.defects == []
    return message


def parts(message: EmailMessage) -> tuple[Message, Message, Message]:
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    human, report, headers = message.get_payload()
    return human, report, headers


def test_top_level_fields() -> None:
    """From MAILER-DAEMON, to the envelope sender, auto-replied, with a fresh Message-ID and Date."""
    raw = dsn()
    message = parse(raw)
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.com>"
    assert [a.addr_spec for a in message["To"].addresses] == ["alice@example.com"]
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert email.utils.parsedate_to_datetime(message["Date"]).timestamp() == NOW
    assert message["Message-ID"].startswith("<QID42.") and message["Message-ID"].endswith(".dsn@mx.example.com>")
    assert message["In-Reply-To"] == "<report-42@example.com>"
    assert message["MIME-Version"] == "1.0"
    assert dsn()  # another call...
    assert parse(dsn())["Message-ID"] != message["Message-ID"]  # ...gets its own id
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")


def test_delivery_status_part() -> None:
    """The machine-readable part: per-message fields, then one block per failed recipient."""
    _, report, _ = parts(parse(dsn()))
    assert report.get_content_type() == "message/delivery-status"
    per_message, bob, carol = report.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mx.example.com"
    assert per_message["X-Mailgate-Queue-ID"] == "QID42"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL
    assert per_message["Original-Envelope-Id"] is None
    assert bob["Final-Recipient"] == "rfc822; bob@example.org"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.6.0"
    assert bob["Diagnostic-Code"] == "smtp; 554 5.6.0 Rejected by main: HTTP 400: invalid recipient"
    assert email.utils.parsedate_to_datetime(bob["Last-Attempt-Date"]).timestamp() == NOW
    assert carol["Final-Recipient"] == "rfc822; carol@example.net"
    assert carol["Status"] == "4.4.7"
    # A diagnostic without a reply code gets one matching its status; long ones are folded.
    assert " ".join(carol["Diagnostic-Code"].split()) == (
        "smtp; 451 4.4.7 queue lifetime of 5 days expired; last error: API unavailable (HTTP 503)"
    )


def test_human_readable_part_and_original_headers() -> None:
    """The text explains what failed and why; the headers part holds the original header, not the body."""
    human, _, headers = parts(parse(dsn()))
    text = human.get_content()
    assert human.get_content_type() == "text/plain"
    assert "QID42" in text
    assert "<bob@example.org>: 554 5.6.0 Rejected by main: HTTP 400: invalid recipient" in text
    assert "<carol@example.net>:" in text
    assert headers.get_content_type() == "text/rfc822-headers"
    original = headers.get_payload(decode=True)
    assert original == ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"
    assert b"body must not" not in dsn()


def test_a_report_about_some_recipients_names_no_one_else() -> None:
    """After a partial delivery the queue passes only the recipients nobody reached:
    the report and its explanation name those alone, although the original header
    (attached) still shows the others in To."""
    raw = dsn(recipients=[("carol@example.net", "5.6.0", "554 5.6.0 Rejected by main: HTTP 400: invalid")])
    human, report, headers = parts(parse(raw))
    _, carol = report.get_payload()
    assert carol["Final-Recipient"] == "rfc822; carol@example.net"
    text = human.get_content()
    assert "could not be delivered to the following recipients" in " ".join(text.split())
    assert "<carol@example.net>:" in text and "bob@example.org" not in text
    assert b"bob@example.org" in headers.get_payload(decode=True)


def test_eight_bit_original_headers_are_declared() -> None:
    """Raw UTF-8 in the original header is kept and declared 8bit."""
    raw = dsn(original_headers="Subject: Grüße\r\nFrom: a@example.com\r\n\r\nbody".encode())
    _, _, headers = parts(parse(raw))
    assert headers["Content-Transfer-Encoding"] == "8bit"
    assert "Grüße".encode() in headers.get_payload(decode=True)




def test_eight_bit_report_declares_eight_bit_at_the_top() -> None:
    """A multipart holding an 8bit part is itself 8bit (RFC 2045 §6.4): a 7bit
    top level with 8-bit octets inside is a lie a strict relay rejects."""
    raw = dsn(original_headers="Subject: Grüße\r\nFrom: a@example.com\r\n\r\nbody".encode())
    message = parse(raw)
    assert message["Content-Transfer-Encoding"] == "8bit"
    assert parse(dsn())["Content-Transfer-Encoding"] == "7bit"


def test_delete_character_is_not_eight_bit() -> None:
    """DEL (0x7f) is a 7-bit octet: it does not make the report 8bit."""
    message = parse(dsn(original_headers=b"Subject: a\x7fb\r\nFrom: a@example.com\r\n\r\n"))
    _, _, headers = parts(message)
    assert (message["Content-Transfer-Encoding"], headers["Content-Transfer-Encoding"]) == ("7bit", "7bit")


def test_bare_lf_original_is_normalised() -> None:
    """An original with LF line endings still yields a CRLF report with only the header."""
    raw = dsn(original_headers=b"Subject: x\nFrom: a@example.com\n\nbody\n")
    assert b"\n" not in raw.replace(b"\r\n", b"")
    _, _, headers = parts(parse(raw))
    assert headers.get_payload(decode=True) == b"Subject: x\r\nFrom: a@example.com\r\n"


def test_header_injection_is_impossible() -> None:
    """CR/LF in a recipient, a diagnostic, the sender or the queue id cannot add a field or a part."""
    raw = dsn(
        queue_id="Q1\r\nBcc: victim@example.net",
        envelope_sender="alice@example.com\r\nBcc: victim@example.net",
        recipients=[
            ("bob@example.org\r\nAction: delivered", "5.0.0", "554 5.0.0 bad\r\n\r\n--x\r\nInjected: yes"),
        ],
    )
    message = parse(raw)
    assert message["Bcc"] is None
    assert len(message.get_all("To")) == 1
    _, report, _ = parts(message)
    per_message, bob = report.get_payload()
    assert per_message["X-Mailgate-Queue-ID"] == "Q1Bccvictimexamplenet"
    assert bob.get_all("Action") == ["failed"]
    assert bob["Injected"] is None
    assert "\n" not in bob["Final-Recipient"]


def test_refuses_the_null_sender_and_nonsense() -> None:
    """Never a DSN to <>; at least one recipient; statuses must be 4.x.x or 5.x.x."""
    with pytest.raises(ValueError, match="null reverse-path"):
        dsn(envelope_sender="")
    with pytest.raises(ValueError, match="at least one"):
        dsn(recipients=[])
    with pytest.raises(ValueError, match="not an RFC 3463 failure status"):
        dsn(recipients=[("b@example.org", "2.0.0", "ok")])


def test_mailgate_parses_its_own_dsn() -> None:
    """The DSN goes out through the account's route: mailgate's own parser reads it
    without error, as a message to the sender with the report as an attachment."""
    email_ = parse_message(dsn(), "", ("alice@example.com",))
    assert email_.subject == "Undelivered Mail Returned to Sender"
    assert [a.address for a in email_.to] == ["alice@example.com"]
    assert email_.text is not None and "QID42" in email_.text


@given(
    address=st.text(min_size=1, max_size=60),
    diagnostic=st.text(max_size=2000),
    headers=st.binary(max_size=3000),
)
def test_any_input_gives_a_well_formed_report(address: str, diagnostic: str, headers: bytes) -> None:
    """Whatever the inputs, the result parses without defects into exactly three parts
    and one recipient block, with lines of at most 998 octets."""
    raw = dsn(recipients=[(address, "5.0.0", diagnostic)], original_headers=headers)
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    _, report, _ = parts(parse(raw))
    _, recipient = report.get_payload()
    assert recipient["Action"] == "failed" and recipient["Status"] == "5.0.0"
