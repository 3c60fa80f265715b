"""systemd readiness notifications (``Type=notify``) without libsystemd.

With ``Type=notify`` systemd holds back units ordered after mailgate, and
``systemctl start`` returns, only once mailgate says ``READY=1``; ``STOPPING=1``
tells it the stop was our own idea.  The protocol is small (sd_notify(3),
"NOTES"): one datagram of newline-separated ``KEY=VALUE`` assignments sent to
the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``; a name starting with ``@``
lives in the Linux abstract namespace.  Without ``$NOTIFY_SOCKET`` (not started by systemd)
every call is a no-op, and a socket that went away is logged, never raised: a
notification is a courtesy to the service manager, not a reason to stop
serving mail.

With ``WatchdogSec=`` in the unit, systemd sets ``$WATCHDOG_USEC`` and expects
``WATCHDOG=1`` at least that often (sd_watchdog_enabled(3), systemd.service(5));
:class:`SystemdNotifier` sends it every half of that interval from the reactor,
so a reactor stuck on something (a blocking call, a busy loop) stops the
keep-alives, and systemd kills the process (SIGABRT) and restarts it
(``Restart=on-failure``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Mapping
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceCollection, Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mailgate.listeners import describe_address

log = Logger()

# sd_notify() blocks until the datagram is queued; systemd drains its socket at
# once, so this only bounds the pathological case instead of hanging the reactor.
SEND_TIMEOUT = 5.0


def notify_address(environ: Mapping[str, str]) -> str | None:
    """The socket address ``$NOTIFY_SOCKET`` names, ready for ``sendto``; None when unset.

    ``@name`` is an abstract-namespace socket (a leading NUL byte).  Other forms
    systemd may pass (``vsock:``) are not supported and are reported once.
    """
    value = environ.get("NOTIFY_SOCKET", "")
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    log.warn("NOTIFY_SOCKET={value!r} is not an AF_UNIX socket path: systemd notifications disabled", value=value)
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds within which systemd expects ``WATCHDOG=1`` from this process; None when it does not.

    As sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` is the interval in
    microseconds, and when ``$WATCHDOG_PID`` is set, only that process is
    watched (a child that inherited the environment is not).
    """
    value = environ.get("WATCHDOG_USEC", "")
    if not value:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    try:
        usec = int(value)
    except ValueError:
        usec = 0
    if usec <= 0:
        log.warn("WATCHDOG_USEC={value!r} is not a positive number: systemd watchdog disabled", value=value)
        return None
    return usec / 1_000_000


class Notifier:
    """Sends notifications to one systemd notification socket (or nowhere).

    ``watchdog``: the watchdog interval in seconds (:func:`watchdog_interval`),
    or None when systemd watches nothing.
    """

    def __init__(self, address: str | None, watchdog: float | None = None):
        self.address = address
        self.watchdog = watchdog if address is not None else None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, pid: int | None = None) -> Notifier:
        environ = os.environ if environ is None else environ
        return cls(notify_address(environ), watchdog_interval(environ, os.getpid() if pid is None else pid))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; True when it was delivered.

        A value must not contain a newline (it would start a new assignment), so
        newlines become spaces.
        """
        if self.address is None:
            return False
        message = "\n".join(assignment.replace("\n", " ") for assignment in assignments)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(SEND_TIMEOUT)
                sock.sendto(message.encode("utf-8"), self.address)
        except OSError as e:
            log.warn(
                "systemd notification {state} not delivered to {socket}: {error}",
                state=assignments[0] if assignments else "",
                socket=self.address.replace("\0", "@"),
                error=str(e),
            )
            return False
        return True


def endpoint_services(service: Any) -> Iterator[StreamServerEndpointService]:
    """Every listening-endpoint service in a service tree, depth first."""
    if isinstance(service, StreamServerEndpointService):
        yield service
    if IServiceCollection.providedBy(service):
        for child in service:
            yield from endpoint_services(child)


class SystemdNotifier(Service):
    """Says ``READY=1`` once every listener of its parent is bound, ``STOPPING=1`` on stop,
    and ``WATCHDOG=1`` every half watchdog interval in between (when systemd asks for it).

    Add it to the top-level service, anywhere: it looks for the listeners one
    reactor turn after start-up, when every sibling has started (twistd binds
    the ports in ``privilegedStartService``), so a listener added after it is
    waited for too.  The ``STATUS=`` line names the bound addresses, which
    ``systemctl status mailgate`` shows.
    """

    def __init__(self, notifier: Notifier, clock: Any):
        self.notifier = notifier
        self.clock = clock
        self.ready: defer.Deferred[None] | None = None
        self._pending: Any = None
        self._keepalive: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        if self.notifier.enabled:
            self.ready = defer.Deferred()
            self._pending = self.clock.callLater(0, self._watch_listeners)
        if self.notifier.watchdog is not None:
            # Half the interval, as sd_watchdog_enabled(3) recommends: one late
            # turn of the reactor does not yet count as hung.
            self._keepalive = LoopingCall(self.notifier.send, "WATCHDOG=1")
            self._keepalive.clock = self.clock
            self._keepalive.start(self.notifier.watchdog / 2, now=True).addErrback(
                lambda failure: log.failure("systemd watchdog keep-alives stopped", failure)
            )

    def _watch_listeners(self) -> None:
        self._pending = None
        top = self.parent
        while top is not None and getattr(top, "parent", None) is not None:
            top = top.parent
        listeners = list(endpoint_services(top))
        waiting = [service._waitingForPort for service in listeners if service._waitingForPort is not None]
        bound = defer.gatherResults(waiting, consumeErrors=True)
        bound.addCallback(self._all_bound)
        assert self.ready is not None
        bound.chainDeferred(self.ready)

    def _all_bound(self, ports: list[Any]) -> None:
        if not self.running:
            return
        if any(port is None for port in ports):
            # StreamServerEndpointService logged why and left None in place of the
            # port; without READY=1 systemd fails the start after TimeoutStartSec.
            self.notifier.send("STATUS=A listener failed to start; see the log")
            return
        where = ", ".join(describe_address(port.getHost()) for port in ports)
        self.notifier.send("READY=1", f"STATUS=Listening on {where}" if where else "STATUS=Running")

    def stopService(self) -> Any:
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        if self._keepalive is not None and self._keepalive.running:
            # systemd stops watching once it hears STOPPING=1 (or sends SIGTERM);
            # TimeoutStopSec= bounds the stop instead.
            self._keepalive.stop()
        self._keepalive = None
        if self.running:
            self.notifier.send("STOPPING=1", "STATUS=Shutting down")
        return super().stopService()
