"""Start-up and shutdown order of the gateway (mailgate.lifecycle)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.task import Clock

from mailgate.lifecycle import GatewayService


class Recording(Service):
    def __init__(self, name: str, log: list[str], stop_result: Any = None):
        self.name = name
        self.log = log
        self.stop_result = stop_result

    def startService(self) -> None:
        super().startService()
        self.log.append(f"start {self.name}")

    def stopService(self) -> Any:
        super().stopService()
        self.log.append(f"stop {self.name}")
        return self.stop_result


class Factory:
    def __init__(self, log: list[str]):
        self.log = log
        self.sessions: set[Any] = set()
        self.drained: defer.Deferred[None] = defer.Deferred()

    def shutdown(self) -> defer.Deferred[None]:
        self.log.append("sessions told")
        return self.drained


def gateway(log: list[str]) -> tuple[GatewayService, Factory, Clock]:
    clock = Clock()
    top = GatewayService(clock, shutdown_grace=30)
    listener, queue, events, notifier = (Recording(n, log) for n in ("listener", "queue", "events", "notifier"))
    for service in (listener, queue, events, notifier):
        service.setServiceParent(top)
    top.listeners.append(listener)
    top.early.append(queue)
    top.stop_first.append(notifier)
    factory = Factory(log)
    top.factories.append(factory)
    return top, factory, clock


def test_queue_starts_first_and_stops_after_the_sessions() -> None:
    """The queue recovers before the listeners start; on stop: notifier, listeners,
    sessions drained, then the queue, then the rest (events)."""
    log: list[str] = []
    top, factory, _ = gateway(log)
    top.startService()
    assert log[0] == "start queue"
    log.clear()
    stopped = top.stopService()
    assert log == ["stop notifier", "sessions told", "stop listener"]
    factory.drained.callback(None)
    assert log[3:] == ["stop queue", "stop events"]
    assert stopped.called


def test_sessions_that_do_not_finish_are_cut_off_after_the_grace() -> None:
    """A session still open when the grace ends is aborted, and the shutdown goes on."""
    log: list[str] = []
    top, factory, clock = gateway(log)

    class Session:
        class transport:
            aborted = False

            @classmethod
            def abortConnection(cls) -> None:
                cls.aborted = True

    factory.sessions.add(Session())
    top.startService()
    stopped = top.stopService()
    clock.advance(29)
    assert not stopped.called
    clock.advance(1)
    assert Session.transport.aborted and stopped.called
    assert log[-2:] == ["stop queue", "stop events"]


class StoppableQueue(Recording):
    """A queue service that says how long it was given to stop."""

    def __init__(self, log: list[str], clock: Clock):
        super().__init__("queue", log)
        self.clock = clock
        self.given: list[float] = []

    def stop_within(self, seconds: float) -> Any:
        self.given.append(seconds)
        super().stopService()
        return task.deferLater(self.clock, seconds, lambda: None)


def test_the_queue_gets_only_what_the_sessions_left_of_the_grace() -> None:
    """One deadline for the whole stop: sessions that take 25 s of a 30 s grace leave
    the queue 5 s, and the stop is over 30 s after it began (not 25 + 30)."""
    log: list[str] = []
    clock = Clock()
    top = GatewayService(clock, shutdown_grace=30)
    factory = Factory(log)
    top.factories.append(factory)
    queue = StoppableQueue(log, clock)
    queue.setServiceParent(top)
    top.early.append(queue)
    top.startService()
    stopped = top.stopService()
    clock.advance(25)
    factory.drained.callback(None)
    assert queue.given == [5]
    clock.advance(4.9)
    assert not stopped.called
    clock.advance(0.1)
    assert stopped.called


def test_a_stuck_delivery_does_not_extend_the_grace(tmp_path: Path) -> None:
    """With the real queue: a session cut off at the grace leaves the queue nothing, so
    an API that never answers does not add another grace; its message stays in the
    spool for the next start."""
    from tests.test_queue import PENDING, Harness, ScriptedTransport

    h = Harness(tmp_path / "queue", {"p1": ScriptedTransport(PENDING)})
    h.accept()
    top = GatewayService(h.clock, shutdown_grace=30)
    factory = Factory([])
    top.factories.append(factory)
    h.runner.setServiceParent(top)
    top.early.append(h.runner)
    top.startService()
    began = h.clock.seconds()
    stopped = top.stopService()
    h.clock.advance(29.9)
    assert not stopped.called
    h.clock.advance(0.1)
    assert stopped.called and h.clock.seconds() - began == 30
    assert h.spool.ids() == ["AAAAAAAAAAAAAAAAAAAAAA"] and not h.spool.locked
