"""Suite-wide guards: a test fails when mailgate logged an error it did not expect.

Tests that provoke an error on purpose take the ``logged_errors`` fixture and
assert on (and thereby accept) what was logged (magic-wormhole's pattern).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.logger import LogLevel, globalLogPublisher

from mailgate import passwords


class LoggedErrors:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.accepted = False

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if "log_failure" in event or (level is not None and level >= LogLevel.error):
            self.events.append(event)

    def take(self) -> list[dict[str, Any]]:
        """Return the errors logged so far and accept them."""
        self.accepted = True
        events, self.events = self.events, []
        return events


@pytest.fixture(autouse=True)
def logged_errors() -> Iterator[LoggedErrors]:
    observer = LoggedErrors()
    globalLogPublisher.addObserver(observer)
    try:
        yield observer
    finally:
        globalLogPublisher.removeObserver(observer)
    if observer.events:
        from twisted.logger import formatEvent

        details = []
        for event in observer.events:
            failure = event.get("log_failure")
            details.append(formatEvent(event) + ("\n" + failure.getTraceback() if failure else ""))
        pytest.fail("unexpected errors were logged:\n" + "\n".join(details))


@pytest.fixture(autouse=True)
def cheap_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hash test passwords with a low scrypt cost: the stored string records the cost,
    so verification follows it; production keeps :data:`passwords.SCRYPT_COST`."""
    monkeypatch.setattr(passwords, "SCRYPT_COST", passwords.ScryptCost(ln=10, r=8, p=1))
