"""Graceful shutdown of SMTP sessions (SIGTERM): idle sessions and new connections
get 421 4.3.2, a message being received or answered is finished first."""

from __future__ import annotations

from typing import Any

from twisted.cred.portal import Portal
from twisted.internet import address
from twisted.internet.task import Clock

from mailgate.accounts.memory import MemoryAccountStore
from mailgate.auth import AccountRealm, AccountStoreChecker
from mailgate.message import parse_message
from mailgate.smtp import SMTPSessionFactory

from .smtp_helpers import (
    ACCOUNTS,
    DEFAULT_OUTCOME,
    MESSAGE,
    Client,
    FakeDeliverer,
    TLSStringTransport,
    make_policy,
    stuff,
)

SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"


def factory(deliverer: FakeDeliverer) -> SMTPSessionFactory:
    portal = Portal(AccountRealm(), [AccountStoreChecker(MemoryAccountStore(ACCOUNTS))])
    return SMTPSessionFactory(make_policy("submission"), portal, deliverer, Clock(), parse_message)


def open_session(f: SMTPSessionFactory) -> tuple[Client, list[str]]:
    session = f.buildProtocol(address.IPv4Address("TCP", "192.0.2.10", 40000))
    transport = TLSStringTransport(peerAddress=address.IPv4Address("TCP", "192.0.2.10", 40000))
    transport.protocol = session
    session.makeConnection(transport)
    client = Client(session, transport, f.clock, f.deliverer)
    return client, client.replies()


def close(client: Client) -> None:
    client.session.connectionLost(None)


def ready(client: Client) -> None:
    client.ehlo()
    client.starttls()
    client.ehlo()
    client.login()


def test_idle_sessions_are_closed_with_421_and_new_ones_refused() -> None:
    """An idle session hears 421 4.3.2 and is closed; a connection arriving during
    shutdown is greeted with 421 4.3.2 instead of 220; shutdown() fires once all are gone."""
    f = factory(FakeDeliverer())
    client, greeting = open_session(f)
    assert greeting[0].startswith("220 ")
    done = f.shutdown()
    assert client.replies() == [SHUTTING_DOWN] and client.closed
    assert done.called and f.sessions == set()  # this transport closes at once
    late, greeting = open_session(f)
    assert greeting == [SHUTTING_DOWN] and late.closed


def test_message_in_data_is_finished_before_closing() -> None:
    """A client in the middle of DATA may finish: it gets its 250, then 421 4.3.2."""
    f = factory(FakeDeliverer())
    client, _ = open_session(f)
    ready(client)
    client.transaction()
    client.send(b"Subject: half\r\n")
    done = f.shutdown()
    assert client.replies() == [] and not client.closed
    replies = client.send(stuff(MESSAGE) + b".\r\n")
    assert replies == [str(DEFAULT_OUTCOME.reply()), SHUTTING_DOWN]
    assert client.closed and len(f.deliverer.calls) == 1
    assert done.called


def test_pending_verdict_is_sent_before_closing() -> None:
    """A message whose delivery (or spooling) is still running gets its verdict first;
    a command pipelined after the dot is not executed."""
    deliverer = FakeDeliverer(outcome=None)
    f = factory(deliverer)
    client, _ = open_session(f)
    ready(client)
    client.transaction()
    assert client.send(stuff(MESSAGE) + b".\r\nMAIL FROM:<alice@example.com>\r\n") == []
    f.shutdown()
    assert client.replies() == [] and not client.closed
    deliverer.calls[0].deferred.callback(DEFAULT_OUTCOME)
    assert client.replies() == [str(DEFAULT_OUTCOME.reply()), SHUTTING_DOWN]
    assert client.closed and len(deliverer.calls) == 1


def test_factory_forgets_closed_sessions() -> None:
    """Sessions are tracked only while connected (no leak on a long-running server)."""
    f = factory(FakeDeliverer())
    clients: list[Any] = [open_session(f)[0] for _ in range(3)]
    assert len(f.sessions) == 3
    for client in clients:
        close(client)
    assert f.sessions == set()
    assert f.shutdown().called
