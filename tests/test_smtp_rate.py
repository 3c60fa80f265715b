"""The per-account message rate at MAIL FROM (451 4.7.1), over StringTransport with a Clock."""

from __future__ import annotations

from twisted.internet.task import Clock

from mailgate.accounts.account import Account
from mailgate.accounts.memory import MemoryAccountStore
from mailgate.ratelimit import AccountRateLimiter, MessageRate

from .smtp_helpers import ACCOUNTS, Client, authed_client, relay_client, tls_client

SLOW = Account(name="slow", max_messages_per_minute=2)
STORE = MemoryAccountStore({**ACCOUNTS, "slow": ("slow-pw", SLOW)})
OVER = "451 4.7.1 Message rate limit exceeded for this account, try again later"


def slow_client(clock: Clock, limiter: AccountRateLimiter) -> Client:
    client = tls_client(store=STORE, clock=clock, message_rate=limiter)
    client.ehlo()
    client.login("slow", "slow-pw")
    return client


def test_over_the_rate_mail_gets_451_and_the_session_goes_on() -> None:
    """Past its rate an account's MAIL is deferred with 451 4.7.1; RCPT then needs MAIL,
    and once time has passed the same session sends again."""
    clock = Clock()
    client = slow_client(clock, AccountRateLimiter(clock))
    for _ in range(2):
        assert client.message(sender="s@example.com")[-1].startswith("250 ")
    assert client.code("MAIL FROM:<s@example.com>") == OVER
    assert client.code("RCPT TO:<x@example.net>").startswith("503 5.5.1")
    assert len(client.deliverer.calls) == 2
    clock.advance(30)
    assert client.message(sender="s@example.com")[-1].startswith("250 ")
    assert len(client.deliverer.calls) == 3


def test_rate_is_per_account_not_per_connection() -> None:
    """A second connection of the same account shares its allowance; another account does not."""
    clock = Clock()
    limiter = AccountRateLimiter(clock)
    first, second = slow_client(clock, limiter), slow_client(clock, limiter)
    other = authed_client("alice", store=STORE, clock=clock, message_rate=limiter)
    assert first.message(sender="s@example.com")[-1].startswith("250 ")
    assert second.message(sender="s@example.com")[-1].startswith("250 ")
    assert first.code("MAIL FROM:<s@example.com>") == OVER
    assert second.code("MAIL FROM:<s@example.com>") == OVER
    for _ in range(5):
        assert other.message()[-1].startswith("250 ")


def test_server_default_applies_to_trusted_relay_clients() -> None:
    """Accounts without their own figure (here the trusted-network relay) get the server default."""
    clock = Clock()
    client = relay_client(clock=clock, message_rate=AccountRateLimiter(clock, MessageRate(1, 1)))
    assert client.message()[-1].startswith("250 ")
    assert client.code("MAIL FROM:<alice@example.com>") == OVER


def test_refused_sender_does_not_use_up_the_allowance() -> None:
    """Only a MAIL that would start a transaction counts: a syntax error or a refused sender does not."""
    clock = Clock()
    bob_rate = Account(name="bob", allowed_senders=("@example.com",), max_messages_per_minute=1)
    store = MemoryAccountStore({"bob": ("hunter2", bob_rate)})
    client = tls_client(store=store, clock=clock, message_rate=AccountRateLimiter(clock))
    client.ehlo()
    client.login("bob")
    assert client.code("MAIL FROM:<eve@example.org>").startswith("553 5.7.1")
    assert client.code("MAIL FROM:bob@example.com bad").startswith("5")
    assert client.message(sender="bob@example.com")[-1].startswith("250 ")
    assert client.code("MAIL FROM:<bob@example.com>") == OVER
