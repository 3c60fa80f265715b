"""Tags and metadata as SES / Resend name-value message tags."""

from __future__ import annotations

from mailgate.model import Controls
from mailgate.providers.tagpairs import tag_pairs


def test_tags_then_metadata_in_order() -> None:
    """The first tag is named ``tag``, later ones ``tag_2``...; metadata keep their keys."""
    controls = Controls(tags=("welcome", "onboarding"), metadata=(("customer", "42"), ("plan", "pro")))
    assert tag_pairs(controls) == [("tag", "welcome"), ("tag_2", "onboarding"), ("customer", "42"), ("plan", "pro")]


def test_characters_outside_the_allowed_set_become_underscores() -> None:
    """Spaces, dots, non-ASCII letters: each becomes ``_`` so the API accepts the tag."""
    controls = Controls(tags=("Password reset",), metadata=(("order.id", "A/42 ü"),))
    assert tag_pairs(controls) == [("tag", "Password_reset"), ("order_id", "A_42__")]


def test_pairs_that_cannot_be_sent_faithfully_are_left_out() -> None:
    """Empty, over-long, or a name already taken: left out, never cut short."""
    controls = Controls(
        tags=("x" * 257, "ok"),
        metadata=(("empty", ""), ("tag_2", "clash"), ("a b", "1"), ("a_b", "2"), ("long", "y" * 256)),
    )
    assert tag_pairs(controls) == [("tag_2", "ok"), ("a_b", "1"), ("long", "y" * 256)]
