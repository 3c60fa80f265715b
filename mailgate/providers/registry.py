"""The table of provider types: adding an API is one module and one line here.

:mod:`mailgate.build` and :mod:`mailgate.config` read only this table.
"""

from __future__ import annotations

from mailgate.configvalues import ConfigError
from mailgate.providers import bento, mailgun, postmark, resend, sendgrid, ses, smtp, webhook
from mailgate.providers.providertype import ProviderType

TYPES: dict[str, ProviderType] = {
    entry.name: entry
    for entry in (
        webhook.PROVIDER,
        webhook.CAPTURE,
        postmark.PROVIDER,
        bento.PROVIDER,
        sendgrid.PROVIDER,
        mailgun.PROVIDER,
        resend.PROVIDER,
        ses.PROVIDER,
        smtp.PROVIDER,
    )
}
TYPE_NAMES: tuple[str, ...] = tuple(TYPES)


def lookup(name: str, kind: str) -> ProviderType:
    """The type of provider ``name``; ConfigError naming the key for an unknown type."""
    try:
        return TYPES[kind]
    except KeyError:
        raise ConfigError(f"providers.{name}.type", f"must be one of {', '.join(TYPE_NAMES)}") from None
