"""Queue mode: accept into the spool, then deliver, retry and give up in the background.

:class:`QueueDeliverer` is the :class:`~mailgate.interfaces.IDeliverer` the SMTP
session uses in queue mode: it writes the message durably
(:mod:`mailgate.spool`, through the spool writer process of
:mod:`mailgate.spoolwriter`) and answers ``250 2.0.0 Ok: queued as <id>``; a failed
write answers ``452 4.3.1`` (disk full) or ``451 4.3.0``, never 250
(ARCHITECTURE.md §3, §4).

:class:`QueueRunner` delivers spooled messages through the dispatcher (which
walks the account's route and fails over), then (ARCHITECTURE.md §5):

* delivered: the entry is removed; event ``delivered``;
* transient failure: retried at the time :func:`mailgate.retry.next_attempt`
  picks (backoff with jitter, ``Retry-After`` honoured); event ``deferred``;
* permanent failure, or the queue lifetime is over: event ``failed`` and a DSN
  (RFC 3464) to the envelope sender, itself queued and sent through the
  account's route with the null sender, so it is never bounced again; no DSN
  for a message whose sender was ``<>`` (RFC 3461 §6.2, RFC 5321 §4.5.5).
  Both name only the recipients that no accepted request reached: a message
  sent in several requests may have reached some before one failed (see
  :func:`undelivered_recipients`).

At most ``max_in_flight`` messages are being delivered at once.  A restart
recovers the spool; the per-message journal keeps requests an API already
accepted from being sent again, and the queue id is the idempotency key of
every request, so at worst (a crash between the API's answer and the removal
of the entry) an API sees a repeat it can recognise.

All timing uses the injected clock (twisted.internet.task.Clock in tests).
"""

from __future__ import annotations

import dataclasses
import random as random_module
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgate import replies
from mailgate.accounts.account import Account
from mailgate.dsn import build_dsn
from mailgate.events import EventSink, NullEventSink
from mailgate.ids import new_queue_id
from mailgate.interfaces import IDeliverer
from mailgate.message import MessageParseError, parse_message, without_hidden_headers
from mailgate.model import Controls, OutboundEmail
from mailgate.outcome import Delivered, Failed, Outcome, Retry
from mailgate.replies import Reply, sanitise_text
from mailgate.retry import RetryPolicy, next_attempt
from mailgate.spool import (
    CorruptEntry,
    EntryState,
    Envelope,
    JournalRecord,
    Spool,
    SpoolLocked,
    encode_entry,
    headers_of,
    is_disk_full,
)
from mailgate.spoolwriter import ProcessSpoolWriter, ThreadSpoolWriter

__all__ = ["NotQueued", "QueueDeliverer", "QueueRunner", "Queued", "synchronous"]

# Entry states as the CLI and /metrics show them.
QUEUED = "queued"  # waiting for a free delivery slot (new, recovered or retried now)
DEFERRED = "deferred"  # failed transiently; waiting for its next attempt
SENDING = "sending"  # an attempt is in progress
STATES = (QUEUED, DEFERRED, SENDING)

EXPIRED_STATUS = "4.4.7"  # RFC 3463: delivery time expired
REOPEN_INTERVAL = 10.0  # seconds between attempts to open a spool that could not be opened
# Above this size a message's spool file is encoded (checksummed) in a thread.
ENCODE_INLINE_LIMIT = 64 * 1024


def synchronous(f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    """A ``run_in_thread`` that runs on the calling thread (tests, tools)."""
    return defer.maybeDeferred(f, *args)


@dataclass(frozen=True)
class Queued:
    """The message is safe in the spool."""

    queue_id: str
    provider: str = "queue"

    def reply(self) -> Reply:
        return Reply(250, "2.0.0", f"Ok: queued as {self.queue_id}")


@dataclass(frozen=True)
class NotQueued:
    """The spool could not take the message; the client keeps it."""

    refusal: Reply
    provider: str = "queue"

    def reply(self) -> Reply:
        return self.refusal


@dataclass(eq=False)
class _Entry:
    envelope: Envelope
    state: EntryState
    status: str = QUEUED
    timer: Any = None
    email: OutboundEmail | None = None  # kept from acceptance for the first attempt only
    delete_requested: bool = False
    # A state or journal file may exist (recovered, or an attempt failed).
    extra_files: bool = False
    in_ready: bool = False  # in QueueRunner._ready (which skips forgotten entries)
    # Requests accepted by this process, journaled or not (a failed journal write
    # does not make the API's acceptance untrue): who got the message, for a DSN.
    accepted: dict[str, JournalRecord] = dataclasses.field(default_factory=dict)
    waiters: list[defer.Deferred[str]] = dataclasses.field(default_factory=list)

    @property
    def queue_id(self) -> str:
        return self.envelope.queue_id


class QueueRunner(Service):
    """Delivers the spool (see the module docstring); a Twisted service.

    ``parse(raw, sender, recipients, defaults)`` returns an OutboundEmail or a
    Deferred of one (``mailgate.build.make_parser``); ``run_in_thread(f, *args)``
    runs blocking spool I/O and returns a Deferred.  ``shutdown_grace``: seconds
    :meth:`stopService` waits for attempts in progress; those still running then
    stay in the spool and are tried again at the next start.
    """

    log = Logger()

    def __init__(
        self,
        spool: Spool,
        dispatcher: Any,
        clock: Any,
        policy: RetryPolicy,
        *,
        hostname: str,
        parse: Callable[..., Any] = parse_message,
        run_in_thread: Callable[..., defer.Deferred[Any]] = synchronous,
        events: EventSink | None = None,
        max_in_flight: int = 32,
        shutdown_grace: float = 30.0,
        random: Callable[[], float] = random_module.random,
        writer: ThreadSpoolWriter | ProcessSpoolWriter | None = None,
    ):
        self.spool = spool
        # Shared with QueueDeliverer: messages in, delivered messages out.
        self.writer = writer if writer is not None else ThreadSpoolWriter(spool, run_in_thread)
        self.dispatcher = dispatcher
        self.clock = clock
        self.policy = policy
        self.hostname = hostname
        self.parse = parse
        self.run_in_thread = run_in_thread
        self.events = events if events is not None else NullEventSink()
        self.max_in_flight = max_in_flight
        self.shutdown_grace = shutdown_grace
        self.random = random
        # Insertion order is (nearly) arrival order: recovery adds the oldest first.
        self._entries: dict[str, _Entry] = {}
        self._counts: Counter[str] = Counter()
        self._ready: deque[_Entry] = deque()
        self._in_flight: set[_Entry] = set()
        self._idle_waiters: list[defer.Deferred[None]] = []
        self._accepting = False
        self._reopen_timer: Any = None
        self._closed_logged = False
        self._on_open: list[Callable[[], None]] = []
        self._open_waiters: list[defer.Deferred[bool]] = []

    # -- service ----------------------------------------------------------------

    def startService(self) -> None:
        """Open the spool (lock, recover) and start delivering.

        The state directory is the operator's to create (mailgate never creates
        it).  While it is missing the queue is closed: queue-mode messages are
        answered 451 4.3.0, /readyz says ``state_dir``, and the spool is opened
        as soon as the directory appears (checked every ``REOPEN_INTERVAL``
        seconds and by :meth:`open_spool`)."""
        super().startService()
        self._open_spool()

    def _open_spool(self) -> bool:
        """Open the spool on this thread: at start-up, so that recovery is done
        before any listener accepts a message (mailgate.lifecycle)."""
        if self._accepting or not self.running:
            return self._accepting
        self._cancel_reopen()
        try:
            found = self._lock_and_recover()
        except (OSError, SpoolLocked) as e:
            self._open_failed(e)
            return False
        self._opened(found)
        return True

    def _lock_and_recover(self) -> Any:
        """The blocking part of opening the spool (any thread)."""
        if not self.spool.locked:
            self.spool.lock()
        return self.spool.recover()

    def _open_failed(self, e: Exception) -> None:
        if not self._closed_logged:
            self._closed_logged = True
            self.log.warn(
                "queue closed: cannot open the spool {directory} ({error}); retrying every {interval:g} s",
                directory=str(self.spool.directory),
                error=str(e),
                interval=REOPEN_INTERVAL,
            )
        self._reopen_timer = self.clock.callLater(REOPEN_INTERVAL, self.open_spool)

    def _opened(self, found: Any) -> None:
        now = self.clock.seconds()
        for envelope, state in found.entries:
            entry = _Entry(envelope, state, extra_files=True)
            self._add(entry)
            self._schedule(entry, state.next_attempt, now)
        self.log.info(
            "queue: {count} messages recovered, {corrupt} quarantined, {temporaries} temporary files removed",
            count=len(found.entries),
            corrupt=len(found.quarantined),
            temporaries=found.temporaries_removed,
        )
        self._accepting = True
        callbacks, self._on_open = self._on_open, []
        for callback in callbacks:
            callback()
        self._pump()

    def _cancel_reopen(self) -> None:
        if self._reopen_timer is not None and self._reopen_timer.active():
            self._reopen_timer.cancel()
        self._reopen_timer = None

    def when_open(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the spool is open (now, if it is)."""
        if self._accepting:
            callback()
        else:
            self._on_open.append(callback)

    @property
    def is_open(self) -> bool:
        """The spool is open: queue mode can accept messages."""
        return self._accepting

    def open_spool(self) -> defer.Deferred[bool]:
        """Open the spool now if it is closed and can be; fires with whether it is open.

        The /readyz probe calls this, so that a state directory created by the
        operator is used at once, and so does the retry every ``REOPEN_INTERVAL``
        seconds.  Locking and recovery run in ``run_in_thread``: on a slow or
        hung disk they would otherwise stall every session; callers arriving
        meanwhile share that one attempt.  Before start-up: whether the spool
        could be locked.
        """
        if not self.running:
            return defer.succeed(self.spool.locked)
        if self._accepting:
            return defer.succeed(True)
        waiter: defer.Deferred[bool] = defer.Deferred()
        self._open_waiters.append(waiter)
        if len(self._open_waiters) == 1:
            self._cancel_reopen()
            self.run_in_thread(self._lock_and_recover).addBoth(self._recovered_in_thread)
        return waiter

    def _recovered_in_thread(self, result: Any) -> None:
        if not self.running:
            # Stopped meanwhile: the next start recovers again.
            self.spool.unlock()
            opened = False
        elif self._accepting:
            opened = True  # Opened by a restart meanwhile, which recovered the same entries.
        elif isinstance(result, Failure):
            if not result.check(OSError, SpoolLocked):
                self.log.failure("queue: opening the spool failed", result)
            self._open_failed(result.value)
            opened = False
        else:
            self._opened(result)
            opened = True
        waiters, self._open_waiters = self._open_waiters, []
        for waiter in waiters:
            waiter.callback(opened)

    def stopService(self) -> defer.Deferred[None]:
        """:meth:`stop_within` ``shutdown_grace`` seconds (a runner stopped on its own)."""
        return self.stop_within(self.shutdown_grace)

    def stop_within(self, seconds: float) -> defer.Deferred[None]:
        """Start no new attempt; wait up to ``seconds`` for those in progress.

        Those still running then stay in the spool and are tried again at the
        next start.  The gateway passes what is left of its one shutdown grace
        after the SMTP sessions (mailgate.lifecycle), so that the whole stop
        fits in ``shutdown_grace``.
        """
        super().stopService()
        self._accepting = False
        self._cancel_reopen()
        for entry in self._entries.values():
            if entry.timer is not None and entry.timer.active():
                entry.timer.cancel()
            entry.timer = None
        for entry in self._ready:
            entry.in_ready = False
        self._ready.clear()
        if not self._in_flight:
            self.spool.unlock()
            return defer.succeed(None)
        self.log.info("queue: waiting for {count} deliveries in progress", count=len(self._in_flight))
        idle: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(idle)

        def give_up_waiting() -> None:
            if not idle.called:
                self.log.info(
                    "queue: {count} deliveries still in progress at shutdown stay queued for the next start",
                    count=len(self._in_flight),
                )
                self._idle_waiters.remove(idle)
                idle.callback(None)

        timer = self.clock.callLater(max(0.0, seconds), give_up_waiting)

        def stopped(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            self.spool.unlock()
            return result

        return idle.addBoth(stopped)

    # -- what the queue holds -----------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Cheap figures for /metrics: entries per state and the oldest entry's age in seconds."""
        oldest = next(iter(self._entries.values()), None)
        return {
            "depth_by_state": {state: self._counts[state] for state in STATES},
            "oldest_age": None if oldest is None else max(0.0, self.clock.seconds() - oldest.envelope.arrival),
        }

    def describe(self, queue_id: str | None = None) -> list[dict[str, Any]]:
        """Entries (all, or one) as the queue CLI shows them; never credentials."""
        entries = self._entries.values() if queue_id is None else [self._entries[queue_id]]
        return [_describe(entry.envelope, entry.state, entry.status) for entry in entries]

    def __contains__(self, queue_id: str) -> bool:
        return queue_id in self._entries

    # -- accepting ---------------------------------------------------------------

    def enqueue(self, envelope: Envelope, email: OutboundEmail | None = None) -> None:
        """A message was just written to the spool: deliver it as soon as a slot is free."""
        if not self._accepting:
            return  # Shutting down: it is on disk, the next start delivers it.
        entry = _Entry(envelope, EntryState(), email=email)
        self._add(entry)
        self._make_ready(entry)
        self._pump()
        if entry.in_ready and len(self._ready) > self.max_in_flight:
            # It waits behind a backlog (slow or rate-limited API): keeping every
            # waiting message parsed in memory would grow without bound; the
            # attempt reads it back from the spool instead.
            entry.email = None

    # -- operator actions (queue CLI) ---------------------------------------------

    def retry_now(self, queue_id: str) -> str:
        """Make one entry due now; returns what happened, for the CLI."""
        entry = self._entries[queue_id]
        if entry.status == SENDING:
            return "being delivered now"
        if entry.status == QUEUED:
            return "already waiting for delivery"
        self._make_ready(entry)
        self._pump()
        return "scheduled for immediate delivery"

    def retry_all(self) -> int:
        """Make every deferred entry due now; returns how many."""
        deferred = [entry for entry in self._entries.values() if entry.status == DEFERRED]
        for entry in deferred:
            self._make_ready(entry)
        self._pump()
        return len(deferred)

    def flush(self) -> defer.Deferred[dict[str, int]]:
        """Attempt every entry now and fire with how their attempts ended
        (delivered, deferred, failed, deleted) once all have settled."""
        waiting = []
        for entry in list(self._entries.values()):
            if entry.status == DEFERRED:
                self._make_ready(entry)
            waiter: defer.Deferred[str] = defer.Deferred()
            entry.waiters.append(waiter)
            waiting.append(waiter)
        self._pump()

        def count(results: list[str]) -> dict[str, int]:
            return dict(Counter(results))

        return defer.gatherResults(waiting).addCallback(count)

    def delete(self, queue_id: str) -> str | defer.Deferred[str]:
        """Remove an entry without a DSN (like postsuper -d); one being delivered
        is removed when its attempt ends, whatever the outcome.  The files are
        removed in ``run_in_thread`` (a slow disk must not stall the sessions);
        the answer comes once they are gone."""
        entry = self._entries[queue_id]
        if entry.status == SENDING:
            entry.delete_requested = True
            return "deleted after the delivery attempt in progress ends"
        self._forget(entry, "deleted")

        async def remove() -> str:
            await self._remove_deleted(entry, lambda: self.run_in_thread(self.spool.remove, queue_id))
            return "deleted"

        return defer.ensureDeferred(remove())

    # -- scheduling ----------------------------------------------------------------

    def _add(self, entry: _Entry) -> None:
        self._entries[entry.queue_id] = entry
        self._counts[entry.status] += 1

    def _set_status(self, entry: _Entry, status: str) -> None:
        self._counts[entry.status] -= 1
        entry.status = status
        self._counts[status] += 1

    def _forget(self, entry: _Entry, result: str) -> None:
        if entry.timer is not None and entry.timer.active():
            entry.timer.cancel()
        entry.timer = None
        if self._entries.pop(entry.queue_id, None) is not None:
            self._counts[entry.status] -= 1
        self._notify(entry, result)

    @staticmethod
    def _notify(entry: _Entry, result: str) -> None:
        """Tell ``flush`` how this entry's attempt ended."""
        waiters, entry.waiters = entry.waiters, []
        for waiter in waiters:
            waiter.callback(result)

    def _schedule(self, entry: _Entry, when: float | None, now: float) -> None:
        if when is None or when <= now:
            self._make_ready(entry)
            return
        self._set_status(entry, DEFERRED)
        if self._accepting or self.running:
            entry.timer = self.clock.callLater(when - now, self._due, entry)

    def _due(self, entry: _Entry) -> None:
        entry.timer = None
        self._make_ready(entry)
        self._pump()

    def _make_ready(self, entry: _Entry) -> None:
        if entry.timer is not None and entry.timer.active():
            entry.timer.cancel()
        entry.timer = None
        if entry.status != QUEUED:
            self._set_status(entry, QUEUED)
        if not entry.in_ready:
            entry.in_ready = True
            self._ready.append(entry)

    def _pump(self) -> None:
        while self._accepting and self._ready and len(self._in_flight) < self.max_in_flight:
            entry = self._ready.popleft()
            entry.in_ready = False
            if self._entries.get(entry.queue_id) is not entry or entry.status != QUEUED:
                continue  # deleted, or sent already, while it waited
            self._set_status(entry, SENDING)
            self._in_flight.add(entry)
            d = defer.ensureDeferred(self._attempt(entry))
            d.addErrback(self._attempt_crashed, entry)
            d.addBoth(self._attempt_done, entry)

    def _attempt_crashed(self, failure: Failure, entry: _Entry) -> None:
        # _attempt handles every expected failure; this is a bug in mailgate.  The
        # entry stays in the spool and is tried again later.
        self.log.failure("queue: delivery of {queue_id} failed unexpectedly", failure, queue_id=entry.queue_id)
        if entry.queue_id in self._entries:
            self._schedule(entry, self.clock.seconds() + self.policy.first_retry, self.clock.seconds())
            self._notify(entry, "deferred")

    def _attempt_done(self, _: Any, entry: _Entry) -> None:
        self._in_flight.discard(entry)
        if entry.delete_requested and self._entries.get(entry.queue_id) is entry:
            # The delete came while the outcome was being settled (saving the retry
            # state, queueing a DSN): the entry was rescheduled, and must not be sent again.
            defer.ensureDeferred(self._delete_requested(entry)).addErrback(
                lambda f: self.log.failure("queue: cannot delete {queue_id}", f, queue_id=entry.queue_id)
            )
        if not self._in_flight and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        self._pump()

    # -- one attempt -----------------------------------------------------------------

    async def _attempt(self, entry: _Entry) -> None:
        envelope = entry.envelope
        queue_id = entry.queue_id
        email, entry.email = entry.email, None
        # What a DSN quotes: the message without its control and Bcc headers.
        raw: bytes | None = None if email is None else email.raw
        stored: bytes | None = None
        journal: dict[str, JournalRecord] = {}
        try:
            if email is None:
                # Not fresh from the client: an earlier attempt (before a restart too)
                # may have delivered part of it.
                _, stored = await self.run_in_thread(self.spool.load, queue_id)
                email = await self._parse(envelope, stored)
                raw = email.raw
                journal = await self.run_in_thread(self.spool.read_journal, queue_id)
            account = envelope.account
            if journal:
                # Part of the message was accepted by this provider: failing over now
                # could send the rest twice or split it, so stay with it.
                pinned = next(iter(journal.values())).provider
                account = dataclasses.replace(account, route=(pinned,))
            outcome: Outcome = await self.dispatcher.deliver(
                email,
                account,
                queue_id,
                done={key: record.message_id for key, record in journal.items()},
                on_delivered=lambda key, delivered, remaining, recipients: self._journal(
                    entry, key, delivered, remaining, recipients
                ),
            )
        except FileNotFoundError:
            self.log.warn("queue: message {queue_id} vanished from the spool", queue_id=queue_id)
            self._forget(entry, "deleted")
            return
        except CorruptEntry as e:
            self.log.error(
                "queue: message {queue_id} failed its integrity check ({reason}); quarantined, not delivered",
                queue_id=queue_id,
                reason=str(e),
            )
            await self.run_in_thread(self.spool.quarantine, queue_id)
            self._forget(entry, "failed")
            self._emit("failed", entry, reason="spool entry damaged; quarantined")
            return
        except MessageParseError as e:
            outcome = Failed("mailgate", f"message could not be parsed: {e.reason}", 554, "5.6.0")
            raw = None if stored is None else without_hidden_headers(stored)
        except OSError as e:
            self.log.error("queue: cannot read message {queue_id}: {error}", queue_id=queue_id, error=str(e))
            outcome = Retry("mailgate", "cannot read the queued message", "4.3.0")
        if entry.delete_requested and not isinstance(outcome, Delivered):
            await self._delete_requested(entry)
            return
        await self._settle(entry, outcome, raw)

    async def _delete_requested(self, entry: _Entry) -> None:
        """Carry out a ``delete`` that arrived while the entry was being sent."""
        self._forget(entry, "deleted")
        await self._remove_deleted(entry, None)

    async def _remove_deleted(self, entry: _Entry, remove: Callable[[], defer.Deferred[Any]] | None) -> None:
        """Remove a deleted entry (with ``remove``, else :meth:`_remove`) and say so
        in a ``failed`` event naming only the recipients no accepted request
        reached.  The journal is read first: the removal takes it away."""
        accepted = await self._accepted(entry)
        await (self._remove(entry) if remove is None else remove())
        undelivered = undelivered_recipients(entry.envelope.recipients, accepted.values())
        self._emit("failed", entry, recipients=undelivered, reason="deleted by the operator")

    async def _remove(self, entry: _Entry) -> None:
        """Remove an entry's files.  The common case (delivered at the first attempt,
        one file) goes to the spool writer, with no thread hand-off and no wait."""
        if not entry.extra_files:
            self.writer.remove(entry.queue_id)
            return
        try:
            await self.run_in_thread(self.spool.remove, entry.queue_id)
        except OSError as e:
            # It would be delivered again after a restart (same idempotency key).
            self.log.error("queue: cannot remove {queue_id} from the spool: {error}", queue_id=entry.queue_id, error=str(e))

    def _parse(self, envelope: Envelope, raw: bytes) -> Any:
        """Parse a stored message again.

        A message stored as received (``controls`` is None: it was prepared
        while the session parsed it) is parsed exactly as the session did, with
        its control headers and the account's defaults.  An entry written by an
        earlier version, or a DSN, holds the parsed message (control headers
        already taken out), and its control values are in the envelope.
        """
        if envelope.controls is None:
            return defer.maybeDeferred(
                self.parse, raw, envelope.sender, envelope.recipients, envelope.account.defaults
            )

        def with_controls(email: OutboundEmail) -> OutboundEmail:
            return dataclasses.replace(email, controls=envelope.controls)

        return defer.maybeDeferred(self.parse, raw, envelope.sender, envelope.recipients, {}).addCallback(
            with_controls
        )

    async def _quoted_message(self, entry: _Entry) -> bytes:
        """The message as a DSN quotes it, read back from the spool: parsed, so
        that control and Bcc headers are out (as stored, if it cannot be parsed)."""
        _, raw = await self.run_in_thread(self.spool.load, entry.queue_id)
        try:
            email = await self._parse(entry.envelope, raw)
        except MessageParseError:
            return without_hidden_headers(raw)
        return email.raw

    def _journal(
        self, entry: _Entry, key: str, delivered: Delivered, remaining: int, recipients: tuple[str, ...] | None
    ) -> Any:
        if not remaining:
            return None  # The message is complete; the entry is about to go.
        queue_id = entry.queue_id
        entry.extra_files = True
        record = JournalRecord(key, delivered.provider, delivered.message_id, recipients)
        entry.accepted[key] = record

        def failed(failure: Failure) -> None:
            # Not fatal: without the record a later attempt sends this request again.
            self.log.error(
                "queue: cannot journal a partial delivery of {queue_id}: {error}",
                queue_id=queue_id,
                error=str(failure.value),
            )

        return self.run_in_thread(self.spool.append_journal, queue_id, record).addErrback(failed)

    async def _settle(self, entry: _Entry, outcome: Outcome, raw: bytes | None) -> None:
        now = self.clock.seconds()
        attempts = entry.state.attempts + 1
        if isinstance(outcome, Delivered):
            self._forget(entry, "delivered")
            await self._remove(entry)
            self._emit(
                "delivered",
                entry,
                provider=outcome.provider,
                provider_message_id=outcome.message_id,
                attempts=attempts,
            )
            return
        if isinstance(outcome, Failed):
            last = str(outcome.reply())
            await self._give_up(
                entry, outcome.enhanced, last, last, outcome.provider, attempts, raw, reached=outcome.reached
            )
            return
        when = next_attempt(
            self.policy,
            arrival=entry.envelope.arrival,
            now=now,
            attempts=attempts,
            random=self.random(),
            retry_after=outcome.after,
        )
        if when is None:
            last = str(outcome.reply())
            reason = f"gave up after {attempts} attempts in {_duration(now - entry.envelope.arrival)}; last error: {last}"
            await self._give_up(entry, EXPIRED_STATUS, reason, last, outcome.provider, attempts, raw)
            return
        entry.state = EntryState(
            attempts=attempts,
            next_attempt=when,
            last_error=str(outcome.reply()),
            last_attempt=now,
        )
        entry.extra_files = True
        try:
            await self.run_in_thread(self.spool.write_state, entry.queue_id, entry.state)
        except OSError as e:
            # Only the retry time is lost: after a restart the entry is retried at once.
            self.log.warn("queue: cannot save the retry state of {queue_id}: {error}", queue_id=entry.queue_id, error=str(e))
        self.log.info(
            "queue: message {queue_id} deferred ({reason}); attempt {attempts}, next in {delay:.0f} s",
            queue_id=entry.queue_id,
            reason=entry.state.last_error,
            attempts=attempts,
            delay=when - now,
        )
        self._emit("deferred", entry, provider=outcome.provider, reason=entry.state.last_error, attempts=attempts)
        if entry.queue_id in self._entries:
            self._schedule(entry, when, now)
            self._notify(entry, "deferred")

    async def _give_up(
        self,
        entry: _Entry,
        status: str,
        reason: str,
        diagnostic: str,
        provider: str,
        attempts: int,
        raw: bytes | None,
        reached: tuple[str, ...] = (),
    ) -> None:
        """Permanent failure or lifetime over: event, DSN to the sender, then remove.

        ``reason`` goes to the log and the event; ``diagnostic`` (the last reply)
        and ``status`` to the DSN.  Both name only the recipients no accepted
        request reached, nor ``reached`` (those the failing request itself
        reached: copies of a batch the API accepted); when every recipient was
        reached (what failed carried none of them) the message counts as
        delivered: no DSN, event ``delivered``."""
        envelope = entry.envelope
        accepted = await self._accepted(entry)
        undelivered = undelivered_recipients(envelope.recipients, accepted.values(), reached)
        if not undelivered:
            self.log.info(
                "queue: message {queue_id}: {status} {reason}, but every recipient was reached by an "
                "accepted request; no DSN",
                queue_id=entry.queue_id,
                status=status,
                reason=sanitise_text(reason),
            )
            self._forget(entry, "delivered")
            await self._remove(entry)
            self._emit(
                "delivered",
                entry,
                provider=provider,
                provider_message_id=",".join(record.message_id for record in accepted.values()),
                attempts=attempts,
            )
            return
        self.log.info(
            "queue: message {queue_id} failed permanently after {attempts} attempts: {status} {reason}",
            queue_id=entry.queue_id,
            attempts=attempts,
            status=status,
            reason=sanitise_text(reason),
        )
        bounce: Envelope | None = None
        if envelope.sender:
            try:
                if raw is None:
                    raw = await self._quoted_message(entry)
                bounce = await self._write_dsn(envelope, undelivered, status, diagnostic, raw)
            except (OSError, CorruptEntry) as e:
                # Keep the message: the bounce is owed, and is tried again with it.
                self.log.error(
                    "queue: cannot queue the DSN for {queue_id}: {error}; keeping the message",
                    queue_id=entry.queue_id,
                    error=str(e),
                )
                now = self.clock.seconds()
                entry.state = dataclasses.replace(entry.state, attempts=attempts, last_attempt=now)
                self._schedule(entry, now + self.policy.first_retry, now)
                self._notify(entry, "deferred")
                return
            except ValueError:
                # build_dsn refused its input: a bug, and retrying would not help.
                self.log.failure("queue: no DSN could be built for {queue_id}", queue_id=entry.queue_id)
        self._forget(entry, "failed")
        await self._remove(entry)
        self._emit("failed", entry, recipients=undelivered, provider=provider, reason=reason, attempts=attempts)
        if bounce is not None:
            self.enqueue(bounce)

    async def _accepted(self, entry: _Entry) -> dict[str, JournalRecord]:
        """Every request of ``entry`` an API accepted: its journal on disk (earlier
        attempts, before a restart too) and what this process saw accepted.  An
        unreadable journal proves nothing: the records seen here are all there is."""
        records: dict[str, JournalRecord] = {}
        if entry.extra_files:
            try:
                records = await self.run_in_thread(self.spool.read_journal, entry.queue_id)
            except OSError as e:
                self.log.error(
                    "queue: cannot read the journal of {queue_id}: {error}; its DSN names every recipient "
                    "not known to be delivered",
                    queue_id=entry.queue_id,
                    error=str(e),
                )
        return {**records, **entry.accepted}

    async def _write_dsn(
        self, envelope: Envelope, recipients: Sequence[str], status: str, diagnostic: str, raw: bytes
    ) -> Envelope:
        """Spool the DSN for ``envelope`` about ``recipients``, those it failed for
        (before the message is removed: a crash in between may bounce twice, never
        not at all); returns its envelope."""
        now = self.clock.seconds()
        dsn = build_dsn(
            reporting_mta=self.hostname,
            queue_id=envelope.queue_id,
            envelope_sender=envelope.sender,
            recipients=[(recipient, status, diagnostic) for recipient in recipients],
            original_headers=headers_of(raw),
            arrival=envelope.arrival,
            now=now,
        )
        bounce = Envelope(
            queue_id=new_queue_id(now),
            arrival=now,
            sender="",  # RFC 5321 §4.5.5: notifications use the null reverse-path.
            recipients=(envelope.sender,),
            account=envelope.account,
            controls=Controls(),
        )
        await self.run_in_thread(self.spool.write, bounce, dsn)
        self.log.info(
            "queue: DSN {dsn_id} for {queue_id} queued", dsn_id=bounce.queue_id, queue_id=envelope.queue_id
        )
        return bounce

    def _emit(self, kind: str, entry: _Entry, recipients: Sequence[str] | None = None, **fields: Any) -> None:
        """Send one event; ``recipients`` (default: the whole envelope) are those it concerns."""
        envelope = entry.envelope
        try:
            self.events.emit(
                kind,
                queue_id=envelope.queue_id,
                account=envelope.account.name,
                sender=envelope.sender,
                recipients=envelope.recipients if recipients is None else tuple(recipients),
                **fields,
            )
        except Exception:  # noqa: BLE001 - events are best effort, delivery goes on
            self.log.failure("queue: event sink failed for {queue_id}", queue_id=envelope.queue_id)


@implementer(IDeliverer)
class QueueDeliverer:
    """Queue mode's deliverer: spool durably, then answer 250 (see the module docstring).

    The spool file is written in two phases (:mod:`mailgate.spoolwriter`):
    :meth:`prepare` starts writing the message as received as soon as the final
    dot is read, in parallel with the parse and the checks; :meth:`deliver`
    publishes it once they pass, and the 250 waits for that; :meth:`release`
    takes back what a refused message left prepared.  The message is stored as
    the client sent it (with our Received header), and its envelope has no
    control values (``controls=None``): a later attempt parses it again exactly
    as the session did, control headers included.

    ``refusal(email, account)`` (the dispatcher's) rejects at once a message no
    provider on the route can carry, rather than accepting it only to bounce it.
    """

    log = Logger()

    def __init__(
        self,
        spool: Spool,
        runner: QueueRunner,
        clock: Any,
        *,
        refusal: Callable[[OutboundEmail, Account], Failed | None] | None = None,
        run_in_thread: Callable[..., defer.Deferred[Any]] = synchronous,
        writer: ThreadSpoolWriter | ProcessSpoolWriter | None = None,
    ):
        self.spool = spool
        self.runner = runner
        self.clock = clock
        self.refusal = refusal
        self.run_in_thread = run_in_thread
        self.writer = writer if writer is not None else runner.writer
        self._prepared: dict[str, tuple[Envelope, defer.Deferred[None]]] = {}

    def prepare(
        self, queue_id: str, raw: bytes, sender: str, recipients: tuple[str, ...], account: Account
    ) -> None:
        if not self.runner.is_open:
            return  # deliver() answers; nothing to write into.
        # A failure (even a bug) is kept for deliver(), which answers it with 451.
        self._prepared[queue_id] = self._store(queue_id, sender, recipients, account, None, raw)

    def release(self, queue_id: str) -> None:
        prepared = self._prepared.pop(queue_id, None)
        if prepared is not None:
            prepared[1].addBoth(lambda _: self.writer.discard(queue_id))

    def _store(
        self,
        queue_id: str,
        sender: str,
        recipients: tuple[str, ...],
        account: Account,
        controls: Controls | None,
        raw: bytes,
    ) -> tuple[Envelope, defer.Deferred[None]]:
        """The message's envelope, and its spool file being prepared."""
        envelope = Envelope(queue_id, self.clock.seconds(), sender, recipients, account, controls)
        return envelope, defer.maybeDeferred(self._write, envelope, raw)

    def _write(self, envelope: Envelope, raw: bytes) -> defer.Deferred[None]:
        """Prepare the spool file; its checksum is computed in a thread for a large
        message (hashing megabytes would stall the reactor)."""
        queue_id = envelope.queue_id
        if len(raw) <= ENCODE_INLINE_LIMIT:
            return self.writer.prepare(queue_id, encode_entry(envelope, raw))
        encoded = self.run_in_thread(encode_entry, envelope, raw)
        return encoded.addCallback(lambda data: self.writer.prepare(queue_id, data))

    def deliver(self, email: OutboundEmail, account: Account, queue_id: str) -> defer.Deferred[Any]:
        refused = self.refusal(email, account) if self.refusal is not None else None
        if refused is not None:
            return defer.succeed(refused)
        if not self.runner.is_open:
            # No state directory (yet), or the server is stopping: the client keeps it.
            return defer.succeed(NotQueued(replies.SPOOL_ERROR))
        prepared = self._prepared.pop(queue_id, None)
        if prepared is None:
            # Not prepared (a caller that skips that phase): store the parsed message.
            prepared = self._store(
                queue_id, email.envelope_sender, email.envelope_recipients, account, email.controls, email.raw
            )
        envelope, written = prepared

        def committed(_: None) -> Queued:
            try:
                self.runner.enqueue(envelope, email)
            except Exception:  # noqa: BLE001 - it is on disk: the client hears 250, the next start sends it
                self.log.failure("queue: cannot schedule message {queue_id}; it is delivered after a restart", queue_id=queue_id)
            return Queued(queue_id)

        def failed(failure: Failure) -> NotQueued:
            # What is left in tmp/, if anything (a prepare no process answered).
            self.writer.discard(queue_id)
            error = failure.value
            if isinstance(error, OSError):
                self.log.error(
                    "cannot write message {queue_id} to the spool: {error}", queue_id=queue_id, error=str(error)
                )
                disk_full = is_disk_full(error)
                return NotQueued(replies.SPOOL_WRITE_FAILED if disk_full else replies.SPOOL_ERROR)
            self.log.failure("cannot write message {queue_id} to the spool", failure, queue_id=queue_id)
            return NotQueued(replies.SPOOL_ERROR)

        published = written.addCallback(lambda _: self.writer.commit(queue_id))
        return published.addCallbacks(committed, failed)


def _describe(envelope: Envelope, state: EntryState, status: str) -> dict[str, Any]:
    return {
        "id": envelope.queue_id,
        "state": status,
        "arrival": envelope.arrival,
        "sender": envelope.sender,
        "recipients": list(envelope.recipients),
        "account": envelope.account.name,
        "route": list(envelope.account.route),
        "attempts": state.attempts,
        "last_attempt": state.last_attempt,
        "next_attempt": state.next_attempt,
        "last_error": state.last_error,
    }


def describe_entry(envelope: Envelope, state: EntryState, status: str | None = None) -> dict[str, Any]:
    """An entry as the CLI shows it when no server runs (state from the files)."""
    if status is None:
        status = DEFERRED if state.next_attempt is not None else QUEUED
    return _describe(envelope, state, status)


def undelivered_recipients(
    recipients: Sequence[str], accepted: Iterable[JournalRecord], reached: Iterable[str] = ()
) -> tuple[str, ...]:
    """The envelope ``recipients`` that no accepted request is known to have
    reached, nor ``reached`` (those a failed request reached all the same:
    ``Failed.reached``), in envelope order: those a DSN is owed for (RFC 3464
    §2.3: one per-recipient block for each recipient the report is about).
    Addresses compare case-insensitively, as the adapters match them; a record
    whose recipients are unknown (``None``) reaches nobody, so a journal line of
    an earlier version never drops anyone from a DSN."""
    known = {address.lower() for address in reached}
    known.update(
        address.lower() for record in accepted if record.recipients is not None for address in record.recipients
    )
    return tuple(recipient for recipient in recipients if recipient.lower() not in known)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"
