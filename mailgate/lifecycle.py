"""Start-up and shutdown order of the whole gateway.

Start: the queue recovers its spool before any listener accepts a message, so
that a message accepted at once is never behind one that was only recovered
into memory later.  Stop (SIGTERM: twistd stops the application service):

0. services in ``stop_first`` stop (systemd hears ``STOPPING=1`` at once);
1. every listener's sessions are told to stop: new connections and idle
   sessions get ``421 4.3.2``; a message being received (DATA) or answered is
   finished first, and its client hears the verdict (with queue mode, only
   after the message is in the spool: no 250 without a spool entry);
2. the listening ports close;
3. once every session has ended, or ``shutdown_grace`` has passed (then the
   rest are cut off; their clients never heard 250 and will retry), the queue
   stops: it starts no new attempt and waits, for what is left of the same
   grace, for those in progress; any still running stay in the spool for the
   next start;
4. everything else stops (HTTP connection pool, control socket).

The grace is one deadline, taken when the stop begins, for stages 1 to 3
together: sessions that take most of it leave the queue only the rest, so that
a stop fits in systemd's ``TimeoutStopSec=`` (etc/mailgate.service) instead of
taking up to twice the grace.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger


class GatewayService(MultiService):
    """A MultiService that starts ``early`` children first and stops in the stages above.

    ``factories``: the SMTP session factories (with ``shutdown()``);
    ``listeners``: the services owning the listening ports.  An ``early``
    service with ``stop_within(seconds)`` (the queue) is stopped with it and
    what is left of the grace; the others with ``stopService()``.
    """

    log = Logger()

    def __init__(self, clock: Any, shutdown_grace: float):
        super().__init__()
        self.clock = clock
        self.shutdown_grace = shutdown_grace
        self.early: list[IService] = []
        self.stop_first: list[IService] = []
        self.listeners: list[IService] = []
        self.factories: list[Any] = []

    def startService(self) -> None:
        Service.startService(self)
        for service in [*self.early, *(s for s in self if s not in self.early)]:
            service.startService()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        Service.stopService(self)
        deadline = self.clock.seconds() + self.shutdown_grace
        self.log.info("stopping: no new connections or messages; finishing messages in progress")
        yield _all(service.stopService() for service in self.stop_first)
        drained = [factory.shutdown() for factory in self.factories]
        yield _all(service.stopService() for service in self.listeners)
        yield self._until(deadline, defer.DeferredList(drained, consumeErrors=True), self._cut_off_sessions)
        for service in self.early:
            stop_within = getattr(service, "stop_within", None)
            if stop_within is not None:  # The queue: only what is left of the grace.
                yield stop_within(max(0.0, deadline - self.clock.seconds()))
            else:
                yield service.stopService()
        done = {*self.early, *self.listeners, *self.stop_first}
        late = [s for s in reversed(list(self)) if s not in done]
        yield _all(service.stopService() for service in late)

    def _cut_off_sessions(self) -> None:
        sessions = [session for factory in self.factories for session in factory.sessions]
        self.log.info("shutdown grace over: closing {count} sessions", count=len(sessions))
        for session in sessions:
            session.transport.abortConnection()

    def _until(self, deadline: float, waiting: defer.Deferred[Any], on_timeout: Any) -> defer.Deferred[Any]:
        """Fires when ``waiting`` does, or at ``deadline`` after calling ``on_timeout``."""
        done: defer.Deferred[None] = defer.Deferred()

        def expire() -> None:
            if not done.called:
                on_timeout()
                done.callback(None)

        timer = self.clock.callLater(max(0.0, deadline - self.clock.seconds()), expire)

        def finished(_: Any) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        waiting.addBoth(finished)
        return done


def _all(results: Sequence[Any] | Any) -> defer.Deferred[Any]:
    return defer.DeferredList([defer.maybeDeferred(lambda r=r: r) for r in results], consumeErrors=True)
