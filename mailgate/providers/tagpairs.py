"""Tags and metadata as the name/value message tags of Amazon SES and Resend.

Both APIs take a list of ``{name, value}`` pairs whose names and values
"can only contain ASCII letters (a–z, A–Z), numbers (0–9), underscores (_),
or dashes (-)" and "no more than 256 characters":
https://docs.aws.amazon.com/ses/latest/APIReference-V2/API_MessageTag.html and
https://resend.com/docs/api-reference/emails/send-email (``tags``).

mailgate's controls are looser (a tag such as ``Password reset``), so:

* a metadata entry becomes a pair of its key and value; a tag becomes the
  pair ``tag`` = tag (the second tag ``tag_2``, and so on), tags first;
* every character outside that set becomes ``_``, so ``Password reset`` is
  sent as ``Password_reset``;
* a pair whose name or value is empty or longer than 256 characters, or whose
  name an earlier pair already took, is left out rather than cut short (a
  shortened value would label the message with something it was not given).
"""

from __future__ import annotations

import re

from mailgate.model import Controls

__all__ = ["MAX_LENGTH", "sanitise", "tag_pairs"]

MAX_LENGTH = 256
_OUTSIDE = re.compile(r"[^A-Za-z0-9_-]")


def sanitise(text: str) -> str:
    """``text`` with each character the APIs refuse replaced by ``_``."""
    return _OUTSIDE.sub("_", text)


def tag_pairs(controls: Controls) -> list[tuple[str, str]]:
    """The message's tags and metadata as valid ``(name, value)`` pairs, in order."""
    candidates = [
        ("tag" if index == 0 else f"tag_{index + 1}", tag)
        for index, tag in enumerate(controls.tags)
    ]
    candidates += list(controls.metadata)
    pairs: list[tuple[str, str]] = []
    taken: set[str] = set()
    for raw_name, raw_value in candidates:
        name, value = sanitise(raw_name), sanitise(raw_value)
        if not (0 < len(name) <= MAX_LENGTH and 0 < len(value) <= MAX_LENGTH) or name in taken:
            continue
        taken.add(name)
        pairs.append((name, value))
    return pairs
