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

    def deliver(self, email: OutboundEmail, account: Account, queue_id: str) -> Any:
        mode = account.delivery_mode if account.delivery_mode in self.deliverers else self.default_mode
        return self.deliverers[mode].deliver(email, account, queue_id)
