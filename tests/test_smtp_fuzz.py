"""Property tests: arbitrary client input never crashes the session or breaks its replies."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.smtp_helpers import b64, plain, relay_client, tls_client

COMMANDS = st.sampled_from(
    [
        b"EHLO client.test",
        b"HELO x",
        b"EHLO",
        b"EHLO a\x00b",
        b"NOOP",
        b"RSET",
        b"QUIT",
        b"HELP",
        b"VRFY x",
        b"EXPN x",
        b"STARTTLS",
        b"STARTTLS x",
        b"AUTH",
        b"AUTH PLAIN",
        b"AUTH LOGIN",
        b"AUTH CRAM-MD5",
        b"AUTH PLAIN =",
        b"AUTH PLAIN " + plain("alice", "s3cret"),
        b"AUTH PLAIN " + plain("alice", "bad"),
        b"AUTH PLAIN " + b64("a\0b"),
        b"*",
        b64("alice"),
        b64("s3cret"),
        b"MAIL FROM:<alice@example.com>",
        b"MAIL FROM:<> SIZE=99999999999",
        b"MAIL FROM:<\xc3\xa9@x.example>",
        b"MAIL FROM:<a@b> BODY=8BITMIME X=1",
        b"MAIL FROM:",
        b"RCPT TO:<b@example.net>",
        b'RCPT TO:<"\xe2\x98\x83"@x.example>',
        b"RCPT TO:<>",
        b"DATA",
        b"Subject: x",
        b"",
        b".",
        b"..",
        b"\x00.",
        b"A" * 1200,
        b"\xff\xfe",
        b"N\xc3\x96OP",
    ]
)
SEPARATORS = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""])
SCRIPTS = st.lists(st.tuples(COMMANDS, SEPARATORS), max_size=30).map(
    lambda items: b"".join(command + separator for command, separator in items)
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    script=SCRIPTS,
    cuts=st.lists(st.integers(min_value=1, max_value=64), max_size=40),
    role=st.sampled_from(["submissions", "submission", "relay"]),
)
def test_arbitrary_dialogues_never_crash(script, cuts, role):
    """Any mix of commands, junk and line endings, in any packet split, gets well-formed replies and no crash."""
    if role == "relay":
        client = relay_client(max_errors=1000, auth_failure_delay=0, cram_md5=True)
    else:
        client = tls_client(role, max_errors=1000, auth_failure_delay=0, cram_md5=True)
    position = 0
    for cut in cuts or [len(script)]:
        chunk = script[position : position + cut]
        position += cut
        client.send(chunk)  # replies are checked for form by the helper
        client.clock.advance(1)
        client.replies()
        assert len(client.session._buffer) <= 12288 + 64
    client.send(script[position:])
    client.clock.advance(10)
    client.replies()
    # One message at most per final dot the client sent.
    assert len(client.deliverer.calls) <= script.count(b"\r\n.\r\n")
