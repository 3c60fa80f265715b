"""mailgate's SMTP server session: a hardened subclass of Twisted's ESMTP.

The protocol holds no business logic: it frames bytes, enforces the role and
limits of its listener, authenticates through the cred portal and hands each
finished message to an :class:`~mailgate.interfaces.IDeliverer`, answering the
final dot with the deliverer's verdict.

What stock ``twisted.mail.smtp.ESMTP`` gets wrong, and how this class answers
it (numbers refer to SECURITY.md):

1. STARTTLS command injection: everything buffered after ``STARTTLS`` is
   discarded and all session state is forgotten (RFC 3207 §4.2).
2. AUTH before TLS: AUTH is advertised and accepted only under TLS;
   ``538 5.7.11`` otherwise (RFC 4954 §4).
3. Long DATA lines: the session stays in DATA until the real end of data
   (:mod:`mailgate.framing`), then rejects the message.
4. Unbounded buffers: command lines are capped (512 octets, 12288 for AUTH);
   an unterminated line beyond that closes the session.
5. Crashes: every argument is parsed by code that answers with a reply.
6. Lax AUTH parsing: strict base64, exact PLAIN part counts, authzid checked.
7. No limits: recipients, errors, junk commands, AUTH failures (with growing
   delays), idle timeouts, a TLS handshake timeout, a session lifetime, and a
   message rate per account (``451 4.7.1`` at MAIL); per client and global
   limits on sessions and AUTH failures across connections
   (:mod:`mailgate.admission`).
8. Blanket 550: replies come from the deliverer's outcome (error table).
9. Bare LF/CR and NUL in DATA: rejected (or normalised, by configuration).
10. Header injection through EHLO: the argument must be printable ASCII.
11. ``SMTPServerError.resp`` type trap: Twisted's exceptions are not used.
12. Weak TLS defaults: see :mod:`mailgate.tls`.
13. CRAM-MD5 randomness: see :mod:`mailgate.auth`.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import functools
import ipaddress
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, error, task
from twisted.internet.interfaces import IHandshakeListener, IPushProducer, ITLSTransport
from twisted.logger import Logger
from twisted.mail.smtp import ESMTP, SMTPFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgate import auth, envelope, replies
from mailgate.accounts.account import Account
from mailgate.admission import Admission, in_networks
from mailgate.config import LimitsConfig
from mailgate.framing import DataReader
from mailgate.ids import new_queue_id
from mailgate.interfaces import AccountStoreUnavailable, IAccount, IDeliverer
from mailgate.logging import log_message_outcome
from mailgate.message import MessageParseError, MessageTooLarge
from mailgate.ratelimit import AccountRateLimiter
from mailgate.metrics import Metrics
from mailgate.outcome import Outcome
from mailgate.replies import Reply, sanitise_text

MAX_COMMAND_LINE = 512  # RFC 5321 §4.5.3.1.4, including CRLF.
SPOOL_IN_MEMORY = 1024 * 1024  # DATA beyond this spills from memory to a temp file.
PAUSE_READING_AT = 256 * 1024  # Stop reading while a command is pending and this much is buffered.
CLOSE_GRACE = 10.0  # Seconds a closing connection may take to flush before it is aborted.
_SYNC_COMMANDS = frozenset({b"EHLO", b"HELO", b"STARTTLS", b"QUIT"})
# Commands that move no mail (Postfix's smtpd_junk_command_limit counts the same
# idea): a session may send max_junk_commands of them between accepted messages.
_JUNK_COMMANDS = frozenset({b"NOOP", b"RSET", b"VRFY", b"HELP", b"EHLO", b"HELO"})


@functools.lru_cache(maxsize=4)
def rfc5322_date(second: int) -> str:
    """The Received header's date (RFC 5322 §3.3), formatted once per second."""
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(second).astimezone())


def client_ip(peer: Any) -> str:
    """The client's address as text.  Behind a ``haproxy:`` listener the transport
    already answers with the proxied client (:mod:`mailgate.proxyprotocol`).  An
    IPv4 client of a dual-stack socket (systemd's ``ListenStream=25``) appears as
    ``::ffff:a.b.c.d``; it is given in its IPv4 form, so that logs, Received
    headers and per-client limits know one address per client."""
    host = getattr(peer, "host", None)
    if host is None:
        return str(peer)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return str(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(host)


@dataclass(frozen=True)
class SessionPolicy:
    """Everything a session needs to know about its listener (ARCHITECTURE.md "Listener")."""

    role: str
    hostname: str
    tls: Any = None  # IOpenSSLServerConnectionCreator for STARTTLS (relay/submission)
    trusted_networks: tuple[Any, ...] = ()
    limits: LimitsConfig = LimitsConfig()
    cram_md5: bool = False
    listener: str = ""  # The listener's name in logs and metrics (never its address).

    @property
    def implicit_tls(self) -> bool:
        return self.role == "submissions"


class _Stop:
    """Returned by a command handler that already replied and must stop reading."""


STOP = _Stop()


@implementer(IHandshakeListener, IPushProducer)
class SMTPSession(ESMTP):
    """One SMTP connection.  See the module docstring for what it hardens."""

    log = Logger()

    def __init__(
        self,
        policy: SessionPolicy,
        portal: Any,
        deliverer: IDeliverer,
        clock: Any,
        parse: Callable[..., Any],
        trusted_account: Account | None = None,
        message_rate: AccountRateLimiter | None = None,
        metrics: Metrics | None = None,
        admission: Admission | None = None,
        route_recipient_limit: Callable[[Account], int | None] | None = None,
    ):
        super().__init__(chal={}, contextFactory=policy.tls)
        # The most recipients any provider of an account's route takes in one
        # message (None: no such limit); see smtp_RCPT.
        self.route_recipient_limit = route_recipient_limit
        self.metrics = metrics if metrics is not None else Metrics()
        # Shared by all listeners in a gateway (build.py); a private one otherwise.
        self.admission = admission if admission is not None else Admission(policy.limits, clock)
        self._admitted = False
        self._junk_commands = 0
        self.policy = policy
        self.portal = portal
        self.deliverer = deliverer
        self.clock = clock
        self.callLater = clock.callLater  # TimeoutMixin schedules through the injected clock.
        self.parse = parse
        self.trusted_account = trusted_account
        self.message_rate = message_rate
        self.timeout = policy.limits.command_timeout
        # A bytearray: consumed lines are deleted from the front, which CPython does
        # in O(1), so a read holding many pipelined lines is processed in linear time.
        self._buffer = bytearray()
        self._processing = False
        self._producer_paused = False  # The transport's send buffer is full (IPushProducer).
        self._producer_registered = False
        self._connection_lost = False
        self._abort_timer: Any = None
        self._blocked = False
        self._reading_paused = False
        self._closing = False
        self._shutting_down = False
        self._errors = 0
        self._auth_failures = 0
        self._auth: Any = None
        self._tls_active = False
        self._handshake_timer: Any = None
        self._lifetime_timer: Any = None
        self._lifetime_expired = False
        self._reader: DataReader | None = None
        self._spool: Any = None
        self.account: Account | None = None
        self.peer_ip = ""
        self.messages_accepted = 0
        self.messages_rejected = 0
        self._started = 0.0
        self._end_reason: str | None = None
        self._reset_session()

    # -- connection lifecycle ------------------------------------------------

    def connectionMade(self) -> None:
        self.peer_ip = client_ip(self.transport.getPeer())
        self._started = self.clock.seconds()
        self.metrics.connection_opened(self.policy.listener)
        if getattr(self.factory, "shutting_down", False):
            # Before admission: a stopping server's answer is 4.3.2 whatever the load
            # (SECURITY.md, SIGTERM), and a refused session takes no rate token.
            self._close_with(replies.SHUTTING_DOWN)
            return
        refusal = self.admission.open_session(self.peer_ip)
        if refusal is not None:
            # Shed load and over-eager clients at the door (README.rst "Defences and
            # limits"); the session-end line gives the reply as the reason.
            self._close_with(refusal)
            return
        self._admitted = True
        self.setTimeout(self.policy.limits.command_timeout)
        self._lifetime_timer = self.clock.callLater(self.policy.limits.session_lifetime, self._lifetime_over)
        # Replies are produced in answer to input: a client that never reads them must
        # not grow our send buffer without limit, so the transport may pause us (and we
        # then stop reading).  On STARTTLS Twisted moves the registration itself.
        self.transport.registerProducer(self, True)
        self._producer_registered = True
        if self.policy.implicit_tls:
            self._tls_active = True
            self._start_handshake_timer()
        self._send(Reply(220, "", f"{self.policy.hostname} ESMTP mailgate"))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._closing = True
        self._connection_lost = True
        self._producer_registered = False  # The transport forgets its producer on close.
        self.setTimeout(None)
        if self._admitted:
            self._admitted = False
            self.admission.close_session(self.peer_ip)
        for timer in (self._handshake_timer, self._lifetime_timer, self._abort_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._discard_data()
        self._log_session_end(reason)
        session_closed = getattr(self.factory, "session_closed", None)
        if session_closed is not None:
            session_closed(self)

    def _log_session_end(self, reason: Failure | None) -> None:
        """The one line per session: who, where, how it went and why it ended."""
        if self._end_reason is None:
            clean = reason is None or reason.check(error.ConnectionDone) is not None
            self._end_reason = "client closed the connection" if clean else (
                f"connection lost: {replies.sanitise_text(reason.getErrorMessage(), 200)}"  # type: ignore[union-attr]
            )
        self.metrics.session_ended(self.policy.listener, self._tls_active)
        self.log.info(
            "session end: peer={peer} listener={listener} tls={tls} account={account} "
            "messages={messages} rejected={rejected} duration={duration:.3f}s reason={reason}",
            peer=self.peer_ip,
            listener=self.policy.listener,
            tls=self._tls_active,
            account=self.account.name if self.account is not None else "-",
            messages=self.messages_accepted,
            rejected=self.messages_rejected,
            duration=self.clock.seconds() - self._started,
            reason=self._end_reason,
        )

    def shutdown(self) -> None:
        """The server is stopping: close now with 421 4.3.2 unless a message is being
        received or answered; that one is finished first (its verdict is sent), and
        the next command is answered 421 4.3.2."""
        self._shutting_down = True
        self._close_if_shutting_down()

    def _close_if_shutting_down(self) -> bool:
        if self._shutting_down and not self._blocked and self._reader is None:
            self._close_with(replies.SHUTTING_DOWN)
            return True
        return False

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake finished; stop its timer."""
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None

    def _start_handshake_timer(self) -> None:
        self._handshake_timer = self.clock.callLater(
            self.policy.limits.tls_handshake_timeout, self._handshake_timed_out
        )

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        self._end_reason = "TLS handshake timeout"
        self._closing = True
        self.transport.abortConnection()

    def _lifetime_over(self) -> None:
        self._lifetime_timer = None
        if self._blocked:
            # A verdict is pending (delivery, AUTH): send it first, then close, so a
            # message that was accepted is never answered 421 (and sent twice).
            self._lifetime_expired = True
            return
        self._close_with(replies.SESSION_TOO_LONG)

    def timeoutConnection(self) -> None:
        self._close_with(replies.IDLE_TIMEOUT)

    def _close_with(self, reply: Reply) -> None:
        if self._closing:
            return
        self._end_reason = str(reply)
        self._send(reply)
        self._disconnect()

    def _disconnect(self) -> None:
        """Close after flushing the replies; abort a peer that will not take them.

        A transport does not close while a producer is registered, so we unregister
        first; a client that never reads would still stall the flush forever, hence
        the grace timer (the timer is set first: loseConnection may call
        connectionLost at once, which cancels it)."""
        self._closing = True
        self.setTimeout(None)
        if self._abort_timer is None:
            self._abort_timer = self.clock.callLater(CLOSE_GRACE, self._abort_stalled_close)
        if self._producer_registered:
            self._producer_registered = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()

    def _abort_stalled_close(self) -> None:
        self._abort_timer = None
        if not self._connection_lost:
            self._end_reason = f"{self._end_reason or 'closing'}; aborted: replies not read within {CLOSE_GRACE:g} s"
            self.transport.abortConnection()

    # -- IPushProducer: the transport throttles our replies ------------------------

    def pauseProducing(self) -> None:
        """The transport's send buffer is full: stop answering until the client has
        read some replies (and stop reading once PAUSE_READING_AT is buffered)."""
        self._producer_paused = True
        self._flow_control()

    def resumeProducing(self) -> None:
        self._producer_paused = False
        self._flow_control()
        if not self._blocked and not self._closing:
            self._process()

    def stopProducing(self) -> None:
        """The connection is gone: nothing more is read, answered or delivered."""
        self._producer_paused = True
        self._closing = True

    # -- output ----------------------------------------------------------------

    def _send(self, reply: Reply) -> None:
        if not self._closing:
            self.transport.writeSequence([line + b"\r\n" for line in reply.lines()])

    def _fail(self, reply: Reply) -> None:
        """Send an error reply and enforce the per-session error limit (SECURITY.md 7)."""
        self._errors += 1
        if self._errors > self.policy.limits.max_errors:
            self._close_with(replies.TOO_MANY_ERRORS)
        else:
            self._send(reply)

    # -- input framing -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.resetTimeout()
        self._buffer += data
        self._process()

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while self._buffer and not self._blocked and not self._closing and not self._producer_paused:
                if self._reader is not None:
                    self._feed_data()
                    continue
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    if len(self._buffer) > auth.MAX_AUTH_LINE:
                        self._buffer = bytearray()
                        self._send(replies.LINE_TOO_LONG)
                        self._close_with(replies.TOO_MANY_ERRORS)
                    break
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 2]  # O(1) in CPython: the start pointer moves.
                self._line(line)
        finally:
            self._processing = False
        self._flow_control()

    def _flow_control(self) -> None:
        """Stop reading from a client that keeps sending while a reply is pending,
        or that does not read our replies (the transport paused us as a producer)."""
        if self._closing:
            return  # loseConnection already stopped reading; never resume now.
        # Only past PAUSE_READING_AT: under TLS the transport pauses us while the
        # handshake holds our greeting, and reading must go on for it to finish.
        waiting = self._blocked or self._producer_paused
        should_pause = waiting and len(self._buffer) > PAUSE_READING_AT
        if should_pause and not self._reading_paused:
            self.transport.pauseProducing()
            self._reading_paused = True
        elif not should_pause and self._reading_paused:
            self.transport.resumeProducing()
            self._reading_paused = False

    def _line(self, line: bytes) -> None:
        if b"\n" in line or b"\r" in line:
            # RFC 5321 §2.3.8: a bare LF is never a line ending; the whole thing is one bad line.
            self._fail(replies.BARE_LF_COMMAND)
            return
        if self._auth is not None:
            if len(line) + 2 > auth.MAX_AUTH_LINE:
                self._auth = None  # An over-long response ends the exchange.
                self._fail(replies.LINE_TOO_LONG)
                return
            self._await(self._auth_response(line))
            return
        verb, _, argument = line.partition(b" ")
        verb = verb.upper()
        limit = auth.MAX_AUTH_LINE if verb == b"AUTH" else MAX_COMMAND_LINE
        if len(line) + 2 > limit:
            # The AUTH cap must hold however the line arrives: a complete line in
            # one read would otherwise escape the unterminated-buffer check.
            self._fail(replies.LINE_TOO_LONG)
            return
        if not verb.isalpha() or not verb.isascii():
            self._fail(replies.BAD_SYNTAX)
            return
        if verb in _JUNK_COMMANDS and self._junk():
            return
        handler = getattr(self, "smtp_" + verb.decode("ascii"), None)
        if handler is None:
            self._fail(replies.NOT_IMPLEMENTED if verb in (b"EXPN", b"ETRN", b"TURN") else replies.BAD_SYNTAX)
            return
        self._await(handler(argument.strip(b" ")))
        if self._buffer and not self._closing and self._pipelining_violated(verb):
            self._close_with(replies.PIPELINING_VIOLATION)

    def _junk(self) -> bool:
        """Count a command that moves no mail; past the limit, close and return True."""
        self._junk_commands += 1
        if self._junk_commands > self.policy.limits.max_junk_commands:
            self._close_with(replies.TOO_MANY_JUNK_COMMANDS)
            return True
        return False

    def _pipelining_violated(self, verb: bytes) -> bool:
        """RFC 2920 §3.1: without PIPELINING no command may follow another unanswered;
        EHLO/HELO/QUIT must end a group; input after a refused DATA would be read as
        commands, so it ends the session instead (the pipelining half of smuggling)."""
        if verb == b"DATA":
            return self._reader is None
        return not self._esmtp or verb in _SYNC_COMMANDS

    def _await(self, result: Any) -> None:
        """Answer a handler's result: a Reply, nothing, or a Deferred of a Reply."""
        if isinstance(result, Reply):
            if result.code >= 400:
                self._fail(result)
            else:
                self._send(result)
        elif isinstance(result, defer.Deferred):
            self._blocked = True
            self.setTimeout(None)  # Our own slowness is not the client's idle time.
            result.addCallback(self._await_done)
            result.addErrback(self._internal_error)

    def _await_done(self, reply: Any) -> None:
        if isinstance(reply, Reply):
            self._send(reply)
        self._unblock()

    def _internal_error(self, failure: Failure) -> None:
        self.log.failure("internal error in SMTP session from {peer}", failure, peer=self.peer_ip)
        self._send(replies.LOCAL_ERROR)
        self._unblock()

    def _unblock(self) -> None:
        self._blocked = False
        if self._closing or self._close_if_shutting_down():
            return
        if self._lifetime_expired:
            self._close_with(replies.SESSION_TOO_LONG)
            return
        self.setTimeout(self.policy.limits.data_timeout if self._reader else self.policy.limits.command_timeout)
        self._process()

    # -- session state ---------------------------------------------------------

    def _reset_session(self) -> None:
        """Forget HELO and the transaction (EHLO, STARTTLS per RFC 3207 §4.2)."""
        self._helo: str | None = None
        self._esmtp = False
        self._reset_transaction()

    def _reset_transaction(self) -> None:
        self._sender: envelope.Path | None = None
        self._recipients: list[str] = []
        self._transaction_account: Account | None = None

    def _discard_data(self) -> None:
        self._reader = None
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    def _mail_account(self) -> Account | Reply:
        """Who is sending: the login, or the trusted-network account on a relay listener."""
        if self.account is not None:
            return self.account
        if self.policy.role != "relay" and not self._tls_active:
            return replies.TLS_REQUIRED
        if self.policy.role == "relay" and self.trusted_account is not None and self._peer_trusted():
            return self.trusted_account
        return replies.AUTH_REQUIRED

    def _peer_trusted(self) -> bool:
        return in_networks(self.peer_ip, self.policy.trusted_networks)

    def _max_size(self, account: Account) -> int:
        limit = self.policy.limits.max_message_size
        if account.max_message_size is not None:
            limit = min(limit, account.max_message_size)
        return limit

    # -- commands (RFC 5321 §4.1.1) -------------------------------------------

    def _greet(self, argument: bytes, esmtp: bool) -> Reply:
        if not argument or len(argument) > 255 or not all(0x21 <= b <= 0x7E for b in argument):
            # SECURITY.md 10: the argument lands in our Received header; it must be
            # a plain domain or address literal, no spaces or control characters.
            return replies.HELO_SYNTAX
        self._reset_transaction()
        self._helo = argument.decode("ascii")
        self._esmtp = esmtp
        greeting = f"{self.policy.hostname} greets {self._helo} [{self.peer_ip}]"
        if not esmtp:
            return Reply(250, "", greeting)
        return Reply(250, "", "\n".join([greeting, *self._extensions()]))

    def _extensions(self) -> list[str]:
        extensions = [
            f"SIZE {self.policy.limits.max_message_size}",
            "8BITMIME",
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
        ]
        if self._starttls_available():
            extensions.append("STARTTLS")
        if self._tls_active and self.account is None:
            extensions.append("AUTH " + " ".join(auth.mechanism_names(self.policy.cram_md5)))
        return extensions

    def _starttls_available(self) -> bool:
        return (
            not self._tls_active
            and self.policy.tls is not None
            and ITLSTransport.providedBy(self.transport)
        )

    def smtp_EHLO(self, argument: bytes) -> Reply:
        return self._greet(argument, esmtp=True)

    def smtp_HELO(self, argument: bytes) -> Reply:
        return self._greet(argument, esmtp=False)

    def smtp_NOOP(self, argument: bytes) -> Reply:
        return replies.OK

    def smtp_RSET(self, argument: bytes) -> Reply:
        if argument:
            return replies.PARAM_SYNTAX
        self._reset_transaction()
        return replies.RESET_OK

    def smtp_VRFY(self, argument: bytes) -> Reply:
        return replies.VRFY_NO if argument else replies.PARAM_SYNTAX

    def smtp_HELP(self, argument: bytes) -> Reply:
        return replies.HELP

    def smtp_QUIT(self, argument: bytes) -> _Stop:
        self._end_reason = "quit"
        self._send(replies.SERVICE_CLOSING)
        self._disconnect()
        return STOP

    def smtp_BDAT(self, argument: bytes) -> _Stop:
        """RFC 3030 BDAT, though CHUNKING is not offered: its client sends the chunk
        without waiting for a reply, and those octets would be read as commands
        (smuggling); there is no safe way to go on, so close."""
        self._close_with(replies.BDAT_REFUSED)
        return STOP

    def smtp_STARTTLS(self, argument: bytes) -> Reply | _Stop:
        if argument:
            return replies.PARAM_SYNTAX
        if self._tls_active:
            return replies.TLS_ALREADY
        if not self._starttls_available():
            return replies.TLS_UNAVAILABLE
        self._send(replies.READY_TLS)
        # RFC 3207 §4.2: discard anything sent before the handshake and forget
        # everything learnt so far (SECURITY.md 1).
        self._buffer = bytearray()
        self._reset_session()
        self._auth = None
        self._tls_active = True
        self.transport.startTLS(self.policy.tls)
        self._start_handshake_timer()
        return STOP

    def smtp_AUTH(self, argument: bytes) -> Any:
        if not argument:
            return replies.AUTH_NEEDS_ARGUMENT
        if not self._esmtp:
            return replies.EHLO_FIRST
        if not self._tls_active:
            return replies.ENCRYPTION_REQUIRED
        if self.account is not None:
            return replies.ALREADY_AUTHENTICATED
        if self._sender is not None:
            return replies.AUTH_IN_TRANSACTION
        if self.admission.auth_blocked(self.peer_ip):
            return self._refuse_throttled_auth()
        name, _, initial = argument.partition(b" ")
        mechanism = auth.new_mechanism(
            name.decode("ascii", "replace"), self.policy.hostname, self.policy.cram_md5
        )
        if mechanism is None:
            return replies.UNKNOWN_MECHANISM
        decoded: bytes | None = None
        if initial:
            if not mechanism.allows_initial_response:
                return replies.AUTH_NO_INITIAL_RESPONSE
            if initial == b"=":
                decoded = b""  # RFC 4954 §4: "=" is an empty initial response.
            else:
                result = auth.decode_response(initial)
                if isinstance(result, auth.Refused):
                    return result.reply
                decoded = result
        return self._auth_step(mechanism, mechanism.start(decoded))

    def _auth_response(self, line: bytes) -> Any:
        mechanism = self._auth
        self._auth = None
        decoded = auth.decode_response(line)
        if isinstance(decoded, auth.Refused):
            return decoded.reply
        return self._auth_step(mechanism, mechanism.respond(decoded))

    def _auth_step(self, mechanism: Any, step: auth.Step) -> Any:
        if isinstance(step, auth.Challenge):
            self._auth = mechanism
            self._send(Reply(334, "", base64.b64encode(step.data).decode("ascii")))
            return None
        if isinstance(step, auth.Refused):
            return step.reply
        if not self.admission.auth_attempt(self.peer_ip):
            return self._refuse_throttled_auth()  # Spent by this client's parallel sessions.
        if step.credentials is None:
            return self._auth_failed(mechanism.name)
        login = self.portal.login(step.credentials, None, IAccount)
        login.addCallbacks(
            self._logged_in, self._login_failed, callbackArgs=(mechanism.name,), errbackArgs=(mechanism.name,)
        )
        return login

    def _logged_in(self, result: tuple[Any, Account, Callable[[], None]], mechanism: str) -> Reply:
        _, account, _ = result
        self.admission.auth_not_failed(self.peer_ip)
        self.account = account
        self.metrics.auth_result(mechanism, "success")
        self.log.info(
            "AUTH {mechanism} success: account={account} peer={peer}",
            mechanism=mechanism,
            account=account.name,
            peer=self.peer_ip,
        )
        return replies.AUTH_OK

    def _login_failed(self, failure: Failure, mechanism: str) -> Any:
        if failure.check(UnauthorizedLogin):
            return self._auth_failed(mechanism)
        self.admission.auth_not_failed(self.peer_ip)  # An outage, not a wrong password.
        self.metrics.auth_result(mechanism, "error")
        if failure.check(AccountStoreUnavailable):
            # The store logged the cause; this is an outage, not a bug: no traceback.
            self.log.info(
                "AUTH {mechanism} deferred: {reason}; peer={peer}",
                mechanism=mechanism,
                reason=str(failure.value),
                peer=self.peer_ip,
            )
            return replies.AUTH_TEMPFAIL
        self.log.failure("AUTH {mechanism} error: account store failed; peer={peer}", failure, mechanism=mechanism, peer=self.peer_ip)
        return replies.AUTH_TEMPFAIL

    def _refuse_throttled_auth(self) -> Any:
        """This client used up its failed-login budget (:mod:`mailgate.admission`):
        refuse without looking at the credentials, after the longest per-session delay."""
        self.log.info("AUTH refused for {peer}: too many recent failures from this address", peer=self.peer_ip)
        delay = self.policy.limits.auth_failure_delay * self.policy.limits.max_auth_failures
        return task.deferLater(self.clock, delay, self._close_with, replies.AUTH_THROTTLED)

    def _auth_failed(self, mechanism: str) -> Any:
        """Answer a failed login slowly, and close after too many (SECURITY.md 7)."""
        self._auth_failures += 1
        self.metrics.auth_result(mechanism, "failure")  # Charged by auth_attempt already.
        self.log.info(
            "AUTH {mechanism} failure {count}: peer={peer}",
            mechanism=mechanism,
            count=self._auth_failures,
            peer=self.peer_ip,
        )
        if self._auth_failures >= self.policy.limits.max_auth_failures:
            self._close_with(replies.TOO_MANY_AUTH_FAILURES)
            return STOP
        delay = self.policy.limits.auth_failure_delay * self._auth_failures
        return task.deferLater(self.clock, delay, lambda: replies.AUTH_FAILED)

    def smtp_MAIL(self, argument: bytes) -> Reply:
        if self._helo is None:
            return replies.EHLO_FIRST
        if self._sender is not None:
            return replies.NESTED_MAIL
        account = self._mail_account()
        if isinstance(account, Reply):
            return account
        try:
            path = envelope.parse_mail_from(argument)
        except envelope.EnvelopeError as e:
            return e.reply
        for name, value in path.params.items():
            if name == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    return replies.PARAM_SYNTAX
                if int(value) > self._max_size(account):
                    return replies.MESSAGE_TOO_BIG
            elif name == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return replies.PARAM_SYNTAX
            elif name != "AUTH":  # RFC 4954 §5: AUTH= may be ignored by a relay like us.
                return replies.PARAM_NOT_RECOGNISED
        if not account.sender_allowed(path.address):
            return replies.SENDER_NOT_ALLOWED
        if self.message_rate is not None and not self.message_rate.allow(account):
            # RFC 3463 4.7.1 at MAIL: the client keeps the message and slows down.
            self.log.info(
                "account {account} over its message rate; MAIL from {peer} deferred",
                account=account.name,
                peer=self.peer_ip,
            )
            return replies.MESSAGE_RATE_EXCEEDED
        self._sender = path
        self._recipients = []
        self._transaction_account = account
        return replies.SENDER_OK

    def smtp_RCPT(self, argument: bytes) -> Reply:
        if self._sender is None or self._transaction_account is None:
            return replies.NEED_MAIL
        try:
            path = envelope.parse_rcpt_to(argument)
        except envelope.EnvelopeError as e:
            return e.reply
        if path.params:
            return replies.PARAM_NOT_RECOGNISED
        if any(existing.lower() == path.address.lower() for existing in self._recipients):
            # One copy per address, as RFC 5321 §3.3 allows; repeating it moves no mail.
            return STOP if self._junk() else replies.RECIPIENT_OK
        limit = self._transaction_account.max_recipients or self.policy.limits.max_recipients
        if self.route_recipient_limit is not None:
            # A provider limit refused only at the final dot would be a 4xx for the
            # whole message, retried by the client forever; refused here, the client
            # sends the rest in another transaction (RFC 5321 §4.5.3.1.10).
            limit = min(limit, self.route_recipient_limit(self._transaction_account) or limit)
        if len(self._recipients) >= limit:
            return replies.TOO_MANY_RECIPIENTS
        self._recipients.append(path.address)
        return replies.RECIPIENT_OK

    def smtp_DATA(self, argument: bytes) -> Reply | None:
        if argument:
            return replies.PARAM_SYNTAX
        if self._sender is None or self._transaction_account is None:
            return replies.NEED_MAIL
        if not self._recipients:
            return replies.NEED_RCPT
        self._spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
        self._reader = DataReader(
            self._spool, self._max_size(self._transaction_account), self.policy.limits.line_endings
        )
        self.setTimeout(self.policy.limits.data_timeout)
        self._send(replies.START_DATA)
        return None

    # -- end of data -------------------------------------------------------------

    def _feed_data(self) -> None:
        assert self._reader is not None
        data, self._buffer = bytes(self._buffer), bytearray()
        leftover = self._reader.feed(data)
        if leftover is None:
            return
        self._buffer = bytearray(leftover)
        self._await(self._end_of_data())

    def _end_of_data(self) -> Any:
        reader, spool = self._reader, self._spool
        assert reader is not None and spool is not None
        self._reader = self._spool = None
        sender, recipients, account = self._sender, self._recipients, self._transaction_account
        self._reset_transaction()
        self.setTimeout(self.policy.limits.command_timeout)
        assert sender is not None and account is not None
        queue_id = new_queue_id()
        verdict = functools.partial(self._verdict, queue_id, account, len(recipients), self.clock.seconds())
        if reader.error is not None:
            spool.close()
            return verdict(reader.error, size=reader.size)
        try:
            spool.seek(0)
            raw = self._received_header(queue_id) + spool.read()
        except OSError as e:
            self.log.error("cannot read back the spooled message from {peer}: {error}", peer=self.peer_ip, error=e)
            return verdict(replies.LOCAL_ERROR)
        finally:
            spool.close()
        # In flight from here to the verdict: the admission control sheds new
        # connections while too many messages wait, instead of failing these.
        self.admission.delivery_started()
        pending = defer.maybeDeferred(
            self._deliver, queue_id, raw, sender.address, tuple(recipients), account, verdict
        )
        return pending.addBoth(self._delivery_finished, queue_id)

    def _delivery_finished(self, result: Any, queue_id: str) -> Any:
        self.admission.delivery_finished()
        try:
            self.deliverer.release(queue_id)
        except Exception:  # noqa: BLE001 - the verdict stands; at worst a prepared file waits for recovery
            self.log.failure("cannot release message {queue_id}", queue_id=queue_id)
        return result

    def _received_header(self, queue_id: str) -> bytes:
        """RFC 5321 §4.4 trace header.  Recipients are deliberately omitted: naming
        them would disclose Bcc recipients to every other recipient."""
        protocol = "ESMTP" if self._esmtp else "SMTP"
        if self._tls_active:
            protocol += "S"
        if self.account is not None:
            protocol += "A"  # RFC 3848
        date = rfc5322_date(int(self.clock.seconds()))
        # RFC 5321 §4.1.3 address literal: "[192.0.2.1]" or "[IPv6:2001:db8::1]".
        literal = f"IPv6:{self.peer_ip}" if ":" in self.peer_ip else self.peer_ip
        return (
            f"Received: from {self._helo} ([{literal}])\r\n"
            f"\tby {self.policy.hostname} (mailgate) with {protocol} id {queue_id};\r\n"
            f"\t{date}\r\n"
        ).encode("ascii", "replace")

    @defer.inlineCallbacks
    def _deliver(
        self,
        queue_id: str,
        raw: bytes,
        sender: str,
        recipients: tuple[str, ...],
        account: Account,
        verdict: Callable[..., Reply],
    ) -> Any:
        # Queue mode starts writing the spool file now, in parallel with the parse;
        # whatever the verdict, release() takes back what deliver() did not use.
        self.deliverer.prepare(queue_id, raw, sender, recipients, account)
        try:
            email_ = yield self.parse(raw, sender, recipients, account.defaults)
        except MessageParseError as e:
            refusal = replies.MESSAGE_TOO_BIG if isinstance(e, MessageTooLarge) else replies.UNPARSABLE_MESSAGE
            reply = Reply(refusal.code, refusal.enhanced, sanitise_text(f"{refusal.text}: {e.reason}"))
            return verdict(reply, size=len(raw), note=str(e))
        except Exception:  # noqa: BLE001 - a parser bug is ours: retry later, never a drop
            self.log.failure("parser failed on message {queue_id} from {peer}", queue_id=queue_id, peer=self.peer_ip)
            return verdict(replies.LOCAL_ERROR, size=len(raw))
        if self._closing:
            # The client left while we parsed (possibly in a thread): it will not
            # hear a verdict, so it will retry; delivering now would duplicate.
            self.log.info(
                "message {queue_id} abandoned: account={account} peer={peer}: client disconnected before the verdict",
                queue_id=queue_id,
                account=account.name,
                peer=self.peer_ip,
            )
            return None
        if account.allowed_senders:
            # Every From mailbox and every Sender/Resent-* address, not only the first
            # From: otherwise a second From or a Sender header would slip through.
            authors = email_.author_addresses or ("",)
            if not all(account.sender_allowed(address) for address in authors):
                return verdict(replies.FROM_NOT_ALLOWED, size=len(raw))
        outcome = yield self.deliverer.deliver(email_, account, queue_id)
        return verdict(outcome.reply(), size=len(raw), outcome=outcome)

    def _verdict(
        self,
        queue_id: str,
        account: Account,
        recipients: int,
        started: float,
        reply: Reply,
        size: int | None = None,
        outcome: Outcome | None = None,
        note: str | None = None,
    ) -> Reply:
        """Count and log (one line) the reply to a message's final dot, and return it."""
        self.metrics.message_answered(reply)
        if reply.is_success:
            self.messages_accepted += 1
            self._junk_commands = 0
        else:
            self.messages_rejected += 1
        log_message_outcome(
            self.log,
            queue_id=queue_id,
            account=account.name,
            reply=reply,
            outcome=outcome,
            attempt=1,
            duration=self.clock.seconds() - started,
            recipients=recipients,
            size=size,
            peer=self.peer_ip,
            note=note,
        )
        return reply


class SMTPSessionFactory(SMTPFactory):
    """Builds :class:`SMTPSession` objects for one listener and keeps track of
    them, so that a stopping server can let each finish (:meth:`shutdown`)."""

    protocol = SMTPSession  # type: ignore[assignment]
    noisy = False  # The listener's own line says where it listens.

    def __init__(
        self,
        policy: SessionPolicy,
        portal: Any,
        deliverer: IDeliverer,
        clock: Any,
        parse: Callable[..., Any],
        trusted_account: Account | None = None,
        message_rate: AccountRateLimiter | None = None,
        metrics: Metrics | None = None,
        admission: Admission | None = None,
        route_recipient_limit: Callable[[Account], int | None] | None = None,
    ):
        super().__init__(portal)
        self.route_recipient_limit = route_recipient_limit
        self.policy = policy
        self.deliverer = deliverer
        self.clock = clock
        self.parse = parse
        self.trusted_account = trusted_account
        self.message_rate = message_rate
        self.metrics = metrics if metrics is not None else Metrics()
        self.admission = admission if admission is not None else Admission(policy.limits, clock)
        self.sessions: set[SMTPSession] = set()
        self.shutting_down = False
        self._drained: list[defer.Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> SMTPSession:
        session = SMTPSession(
            self.policy,
            self.portal,
            self.deliverer,
            self.clock,
            self.parse,
            self.trusted_account,
            self.message_rate,
            self.metrics,
            admission=self.admission,
            route_recipient_limit=self.route_recipient_limit,
        )
        session.factory = self
        self.sessions.add(session)
        return session

    def session_closed(self, session: SMTPSession) -> None:
        self.sessions.discard(session)
        if not self.sessions and self._drained:
            waiters, self._drained = self._drained, []
            for waiter in waiters:
                waiter.callback(None)

    def shutdown(self) -> defer.Deferred[None]:
        """Answer new connections and idle sessions 421 4.3.2; let a session in DATA
        or awaiting its verdict finish that message.  Fires when every session is gone."""
        self.shutting_down = True
        for session in list(self.sessions):
            session.shutdown()
        if not self.sessions:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._drained.append(waiter)
        return waiter
