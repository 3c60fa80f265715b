"""Spool writers: how queue mode gets a message's file durable (two phases).

Both writers offer the same four calls, each for one queue id:

* ``prepare(name, data)``: write and fsync ``tmp/<name>``; started when the
  final dot is read, in parallel with the parse and the checks;
* ``commit(name)``: publish it (rename into ``messages/``, fsync the directory,
  grouped with other commits); fires when the client may hear 250;
* ``discard(name)``: the message was refused after all; remove the prepared file;
* ``remove(name)``: the message was delivered; remove its file (a message with
  no state or journal file: the queue's common case).

``prepare`` and ``commit`` return Deferreds that fail with OSError when the
message is not durable (:func:`mailgate.spoolfiles.publish_batch`).

:class:`ProcessSpoolWriter` is the server's: the spool writer process
(:mod:`mailgate.spoolchild`), started with the server and restarted if it dies.
:class:`ThreadSpoolWriter` does the same in the thread pool, for callers with no
reactor to spawn a process from (tests of the queue, on a Clock).
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgate import spoolfiles
from mailgate.spool import Spool
from mailgate.spoolchild import DISCARD, PREPARE, PUBLISH, REMOVE, decode_replies, encode_request

# Run the child from the same source tree as the server, whatever sys.path the
# child would have: -I ignores PYTHON* variables and the user's site directory.
_CHILD_CODE = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from mailgate.spoolchild import main; sys.exit(main(sys.argv[1:]))"
)
_SOURCE_ROOT = str(Path(spoolfiles.__file__).resolve().parent.parent)

STOP_TIMEOUT = 10.0  # seconds the process has to finish its last batch at shutdown


class ThreadSpoolWriter:
    """The two phases in the reactor's thread pool; commits are grouped: while
    ``parallel`` batches are being published, new commits wait and form the next
    batch, so a directory fsync is shared by every message of a batch."""

    log = Logger()
    usable = True  # see ProcessSpoolWriter.usable

    def __init__(self, spool: Spool, run_in_thread: Callable[..., defer.Deferred[Any]], parallel: int = 4):
        self.spool = spool
        self.run_in_thread = run_in_thread
        self.parallel = parallel
        self._waiting: list[tuple[str, defer.Deferred[None]]] = []
        self._batches = 0
        self._removals: list[str] = []
        self._removing = False

    def prepare(self, name: str, data: bytes) -> defer.Deferred[None]:
        return self.run_in_thread(spoolfiles.prepare_file, self.spool.tmp, name, data)

    def commit(self, name: str) -> defer.Deferred[None]:
        done: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((name, done))
        if self._batches < self.parallel:
            self._next_batch()
        return done

    def discard(self, name: str) -> None:
        self.run_in_thread(spoolfiles.discard_file, self.spool.tmp, name).addErrback(
            lambda f: self.log.failure("cannot discard the prepared message {name}", f, name=name)
        )

    def remove(self, name: str) -> None:
        """Batched: one thread hand-off for the removals that queued up meanwhile."""
        self._removals.append(name)
        if not self._removing:
            self._remove_batch()

    def _remove_batch(self, _: Any = None) -> None:
        batch, self._removals = self._removals, []
        self._removing = bool(batch)
        if batch:
            self.run_in_thread(self.spool.remove_many, batch).addBoth(self._remove_batch)

    def _next_batch(self) -> None:
        batch, self._waiting = self._waiting, []
        if not batch:
            return
        self._batches += 1
        names = [name for name, _ in batch]
        published = self.run_in_thread(spoolfiles.publish_batch, self.spool.tmp, self.spool.messages, names)

        def report(result: Any) -> None:
            self._batches -= 1
            errors = result if isinstance(result, list) else [result.value] * len(batch)
            for (_, done), error in zip(batch, errors, strict=True):
                if error is None:
                    done.callback(None)
                else:
                    done.errback(error)
            self._next_batch()

        published.addBoth(report)


@dataclass(eq=False)
class _Request:
    op: bytes
    name: str
    data: bytes
    done: defer.Deferred[None] = field(default_factory=defer.Deferred)
    sent: int = 0  # to how many processes: a request is sent to a second one at most
    child: _Child | None = None  # the process it was last sent to


class _Child(ProcessProtocol):
    def __init__(self, writer: ProcessSpoolWriter, locked: bool):
        self.writer = writer
        self.locked = locked  # holds the spool lock (see ProcessSpoolWriter._current)
        self.buffer = bytearray()
        self.gone = False
        self.stopping = False  # told to finish and exit
        self.stopped: list[defer.Deferred[None]] = []
        self.kill_timer: Any = None

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.writer._received(self, data)

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == 1:  # No more answers can come: as good as gone.
            self.writer._ended(self, "closed its output")

    def processEnded(self, reason: Failure) -> None:
        self.writer._ended(self, str(reason.value))


class ProcessSpoolWriter(Service):
    """The spool writer process and the requests it has not answered yet.

    Every request is answered or fails: if the process ends with requests
    pending, they are sent again to a new one (both phases can be repeated
    safely, see :func:`mailgate.spoolfiles.publish_batch`).  A publish that no
    process answered (the second one died too, or the server is stopping) is
    settled in the thread pool with the same idempotent call, so that its
    client hears the truth: 250 if the message is in the queue, 451 if it is
    not, never 451 for a message a restart would deliver.  Other requests fail
    with EIO then (a prepare: the client hears 451).  The server and the
    process share a pipe: when the server dies (even by kill -9) the process
    reads end of input, finishes what it read, and exits.

    ``usable`` is False while no process can be started or they keep dying
    (/readyz reports the state directory as not ready); a process is started
    with the service and asked a first, empty question, so that this shows at
    start-up rather than with the first message.
    """

    log = Logger()

    def __init__(self, spool: Spool, reactor: Any, python: str = sys.executable):
        self.spool = spool
        self.tmp = str(spool.tmp)
        self.messages = str(spool.messages)
        self.reactor = reactor
        self.python = python
        self._child: _Child | None = None
        self._pending: dict[tuple[bytes, str], _Request] = {}
        self.restarts = 0
        self.replayed = 0
        self.usable = True

    # -- the four calls ----------------------------------------------------------

    def prepare(self, name: str, data: bytes) -> defer.Deferred[None]:
        return self._request(PREPARE, name, data)

    def commit(self, name: str) -> defer.Deferred[None]:
        return self._request(PUBLISH, name)

    def discard(self, name: str) -> None:
        self._request(DISCARD, name).addErrback(
            lambda f: self.log.warn(
                "cannot discard the prepared message {name}: {error}", name=name, error=str(f.value)
            )
        )

    def remove(self, name: str) -> None:
        self._request(REMOVE, name).addErrback(
            lambda f: self.log.warn(
                "cannot remove the delivered message {name} from the spool: {error}; it is delivered "
                "again (same idempotency key) after a restart",
                name=name,
                error=str(f.value),
            )
        )

    # -- the process -------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        # Discarding a name that is never prepared: nothing to do but answer.
        self._request(DISCARD, "startupcheck").addErrback(
            lambda f: self.log.error(
                "the spool writer process cannot run: {error}; queue mode answers 451 until it can",
                error=str(f.value),
            )
        )

    def stopService(self) -> defer.Deferred[None]:
        """Close the process's input; it exits once it has answered what it read."""
        Service.stopService(self)
        child, self._child = self._child, None  # a restarted service starts a new one
        if child is None:
            return defer.succeed(None)
        return self._retire(child)

    def _retire(self, child: _Child) -> defer.Deferred[None]:
        stopped: defer.Deferred[None] = defer.Deferred()
        child.stopped.append(stopped)
        if not child.stopping:
            child.stopping = True
            child.transport.closeStdin()
            child.kill_timer = self.reactor.callLater(STOP_TIMEOUT, self._kill, child)
        return stopped

    def _kill(self, child: _Child) -> None:
        self.log.warn("the spool writer process did not stop within {seconds:g} s; killing it", seconds=STOP_TIMEOUT)
        try:
            child.transport.signalProcess("KILL")
        except Exception:  # noqa: BLE001 - already gone (ProcessExitedAlready)
            pass
        self._ended(child, "killed")

    def _current(self) -> _Child:
        """The process to send to, started if need be; raises OSError."""
        child = self._child
        if child is not None and not child.locked and self.spool.lock_descriptor is not None:
            # The spool was opened (and locked) after this process started: one
            # that holds the lock takes over, so that a server restarted after a
            # crash waits for it (Spool.lock) before recovering the spool.
            self._child = None
            self._retire(child)
            child = None
        if child is None:
            child = self._spawn()
        return child

    def _spawn(self) -> _Child:
        descriptors: dict[int, Any] = {0: "w", 1: "r", 2: 2}
        lock = self.spool.lock_descriptor
        if lock is not None:
            # The process holds the spool lock as long as it lives.
            descriptors[3] = lock
        child = _Child(self, locked=lock is not None)
        self.reactor.spawnProcess(
            child,
            self.python,
            [self.python, "-I", "-c", _CHILD_CODE, _SOURCE_ROOT, self.tmp, self.messages],
            env={},
            childFDs=descriptors,
        )
        self._child = child
        return child

    def _request(self, op: bytes, name: str, data: bytes = b"") -> defer.Deferred[None]:
        request = _Request(op, name, data)
        if (op, name) in self._pending:
            request.done.errback(OSError(errno.EBUSY, f"a {op.decode()} request for {name} is pending"))
        else:
            self._pending[(op, name)] = request
            self._send(request)
        return request.done

    def _send(self, request: _Request) -> None:
        if not self.running:
            self._unanswered(request, OSError(errno.ESHUTDOWN, "the server is stopping"))
            return
        try:
            child = self._current()
        except OSError as e:
            self.usable = False
            self.log.error("cannot start the spool writer process: {error}", error=str(e))
            self._unanswered(request, e)
            return
        request.sent += 1
        request.child = child
        child.transport.write(encode_request(request.op, request.name, request.data))
        # A transport writes its buffer on the reactor's next turn, which for a
        # prepare comes only after the parse; hand the request over now instead,
        # so the process writes while the parse runs.  What the pipe does not
        # take stays buffered, and the reactor writes it as usual.
        pipe = getattr(child.transport, "pipes", {}).get(0)
        if pipe is not None:
            pipe.doWrite()

    def _unanswered(self, request: _Request, error: OSError) -> None:
        """No process will answer ``request``: settle a publish in the thread
        pool (see the class docstring); fail anything else with ``error``."""
        if self._pending.get((request.op, request.name)) is request:
            del self._pending[(request.op, request.name)]
        if request.op != PUBLISH:
            request.done.errback(error)
            return

        def settled(results: list[OSError | None]) -> None:
            (result,) = results
            if result is None:
                request.done.callback(None)
            else:
                request.done.errback(result)

        published = threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), spoolfiles.publish_batch, self.tmp, self.messages, [request.name]
        )
        published.addCallbacks(settled, request.done.errback)

    def _received(self, child: _Child, data: bytes) -> None:
        if child.gone:
            return
        child.buffer += data
        for op, name, error in decode_replies(child.buffer):
            request = self._pending.pop((op, name), None)
            if request is None:
                self.log.warn("the spool writer process answered a request never made: {op} {name}", op=op, name=name)
            elif error:
                request.done.errback(OSError(error, os.strerror(error)))
            else:
                self.usable = True
                request.done.callback(None)

    def _ended(self, child: _Child, why: str) -> None:
        if child.gone:
            return
        child.gone = True
        if child.kill_timer is not None and child.kill_timer.active():
            child.kill_timer.cancel()
        if self._child is child:
            self._child = None
        stopped, child.stopped = child.stopped, []
        for waiter in stopped:
            waiter.callback(None)
        pending = [request for request in self._pending.values() if request.child is child]
        if child.stopping:
            if not pending:
                return  # A clean stop.
            self.log.error(
                "the spool writer process was stopped with {count} requests unanswered", count=len(pending)
            )
        else:
            self.restarts += 1
            self.log.error(
                "the spool writer process ended ({why}) with {count} requests unanswered; "
                "they and later ones go to a new process",
                why=why,
                count=len(pending),
            )
        for request in pending:
            if request.sent >= 2:
                self.usable = False
                self._unanswered(request, OSError(errno.EIO, "the spool writer process ended twice before answering"))
            else:
                self.replayed += 1
                self._send(request)  # Settled at once if the service is stopped.
