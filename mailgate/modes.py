"""Delivery mode per message: the listener's, unless the account overrides it.

ARCHITECTURE.md §3: ``sync`` answers the final dot with the API's verdict;
``queue`` answers once the message is in the spool.  The SMTP session sees one
:class:`~mailgate.interfaces.IDeliverer` and needs no special case.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from mailgate.accounts.account import Account
from mailgate.interfaces import IDeliverer
from mailgate.model import OutboundEmail


@implementer(IDeliverer)
class ModeDeliverer:
    """Hands each message to ``deliverers[mode]``, mode = account's or ``default_mode``."""

    def __init__(self, default_mode: str, deliverers: dict[str, IDeliverer]):
        if default_mode not in deliverers:
            raise ValueError(f"no deliverer for mode {default_mode!r}")
        self.default_mode = default_mode
        self.deliverers = deliverers

    def _for(self, account: Account) -> IDeliverer:
        return self.deliverers[account.delivery_mode if account.delivery_mode in self.deliverers else self.default_mode]

    def prepare(self, queue_id: str, raw: bytes, sender: str, recipients: tuple[str, ...], account: Account) -> None:
        self._for(account).prepare(queue_id, raw, sender, recipients, account)

    def release(self, queue_id: str) -> None:
        for deliverer in self.deliverers.values():
            deliverer.release(queue_id)  # Only the one that prepared it holds anything.

    def deliver(self, email: OutboundEmail, account: Account, queue_id: str) -> Any:
        return self._for(account).deliver(email, account, queue_id)
