"""Tests for mailgate.controls: control headers -> Controls (ARCHITECTURE.md §6)."""

from __future__ import annotations

import json

import pytest

from mailgate.controls import (
    MAX_JSON_LENGTH,
    MAX_METADATA,
    MAX_TAGS,
    MAX_VALUE_LENGTH,
    extract_controls,
    is_control_header,
    parse_bool,
)
from mailgate.model import Controls


@pytest.mark.parametrize(
    "value, expected",
    [
        ("true", True),
        ("1", True),
        ("yes", True),
        ("TRUE", True),
        ("Yes", True),
        (" true ", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("FALSE", False),
        ("No", False),
        ("garbage", None),
        ("", None),
        ("2", None),
        ("on", None),
    ],
)
def test_parse_bool(value: str, expected: bool | None) -> None:
    """Booleans accept true/1/yes and false/0/no in any case, and nothing else."""
    assert parse_bool(value) is expected


@pytest.mark.parametrize(
    "value, expected",
    [
        ("true", True),
        ("1", True),
        ("yes", True),
        ("TRUE", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("garbage", None),
    ],
)
def test_boolean_header_values(value: str, expected: bool | None) -> None:
    """A boolean control header takes the parsed value; an unusable one leaves it unset."""
    controls = extract_controls([("X-Mailgate-Track-Opens", value)])
    assert controls.track_opens is expected


# (header name, header value, expected Controls)
ALIASES = [
    ("X-Mailgate-Tag", "welcome", Controls(tags=("welcome",))),
    ("X-PM-Tag", "welcome", Controls(tags=("welcome",))),
    ("X-Mailgun-Tag", "welcome", Controls(tags=("welcome",))),
    ("X-Mailgate-Metadata-Order", "42", Controls(metadata=(("Order", "42"),))),
    ("X-PM-Metadata-order", "42", Controls(metadata=(("order", "42"),))),
    (
        "X-Mailgun-Variables",
        '{"order": 42, "user": "ann", "flags": [1, true], "none": null}',
        Controls(
            metadata=(("order", "42"), ("user", "ann"), ("flags", "[1,true]"), ("none", "null"))
        ),
    ),
    ("X-Mailgate-Stream", "broadcast", Controls(stream="broadcast")),
    ("X-PM-Message-Stream", "broadcast", Controls(stream="broadcast")),
    ("X-Mailgate-Track-Opens", "true", Controls(track_opens=True)),
    ("X-PM-TrackOpens", "false", Controls(track_opens=False)),
    ("X-SMTPeter-TrackOpens", "yes", Controls(track_opens=True)),
    ("X-Mailgate-Track-Clicks", "1", Controls(track_clicks=True)),
    ("X-SMTPeter-TrackClicks", "no", Controls(track_clicks=False)),
    ("X-PM-TrackLinks", "None", Controls(track_clicks=False, track_links_mode="None")),
    ("X-PM-TrackLinks", "HtmlAndText", Controls(track_clicks=True, track_links_mode="HtmlAndText")),
    ("X-PM-TrackLinks", "htmlonly", Controls(track_clicks=True, track_links_mode="HtmlOnly")),
    ("X-PM-TrackLinks", "TextOnly", Controls(track_clicks=True, track_links_mode="TextOnly")),
    ("X-PM-TrackLinks", "false", Controls(track_clicks=False)),
    ("X-Mailgate-Transactional", "yes", Controls(transactional=True)),
    ("X-Bento-Transactional", "false", Controls(transactional=False)),
    ("X-Mailgate-Layout", "receipt", Controls(layout="receipt")),
    ("X-Bento-Layout-Id", "lay_123", Controls(layout="lay_123")),
    ("X-Mailgate-Inline-CSS", "true", Controls(inline_css=True)),
    ("X-SMTPeter-InlineCSS", "0", Controls(inline_css=False)),
    ("X-Mailgate-Keep-Message-ID", "true", Controls(keep_message_id=True)),
    ("X-PM-KeepID", "true", Controls(keep_message_id=True)),
    ("X-SMTPeter-TrackBounces", "true", Controls()),
    ("X-SMTPAPI", '{"category": ["a"]}', Controls(smtpapi='{"category": ["a"]}')),
]


@pytest.mark.parametrize("name, value, expected", ALIASES, ids=[f"{n}={v}" for n, v, _ in ALIASES])
def test_canonical_and_vendor_headers(name: str, value: str, expected: Controls) -> None:
    """Every canonical header and vendor alias sets its Controls field and is a control header."""
    assert is_control_header(name)
    assert extract_controls([(name, value)]) == expected


@pytest.mark.parametrize("name, value, expected", ALIASES, ids=[f"{n}={v}" for n, v, _ in ALIASES])
def test_header_names_are_case_insensitive(name: str, value: str, expected: Controls) -> None:
    """Control header names match in any case (RFC 5322 §1.2.2)."""
    assert is_control_header(name.upper())
    assert is_control_header(name.lower())
    result = extract_controls([(name.lower(), value)])
    # Metadata keys come from header names, so only compare them case-folded.
    assert result.tags == expected.tags
    assert [(k.lower(), v) for k, v in result.metadata] == [
        (k.lower(), v) for k, v in expected.metadata
    ]
    assert result.track_opens == expected.track_opens
    assert result.track_clicks == expected.track_clicks
    assert result.stream == expected.stream


@pytest.mark.parametrize(
    "name",
    ["Subject", "X-Mailer", "X-PM-Unknown-Thing", "X-Mailgun-Track", "List-Unsubscribe", "Bcc"],
)
def test_non_control_headers(name: str) -> None:
    """Ordinary headers (including unknown vendor headers) are not control headers."""
    assert not is_control_header(name)


def test_reserved_namespace_is_control() -> None:
    """Any X-Mailgate-* header, even a misspelt one, is treated as control and never forwarded."""
    assert is_control_header("X-Mailgate-Trak-Opens")
    assert extract_controls([("X-Mailgate-Trak-Opens", "true")]) == Controls()


def test_non_control_headers_ignored() -> None:
    """Headers that are not control headers do not affect the result."""
    assert extract_controls([("Subject", "hi"), ("X-Tag", "t")]) == Controls()


def test_multiple_tags_deduplicated_in_order() -> None:
    """Several tag headers give several tags, deduplicated, first occurrence order kept."""
    headers = [
        ("X-Mailgate-Tag", "b"),
        ("X-Mailgun-Tag", "a"),
        ("X-Mailgate-Tag", "b"),
        ("X-PM-Tag", "c"),
        ("X-Mailgate-Tag", ""),
    ]
    assert extract_controls(headers).tags == ("b", "a", "c")


def test_tag_with_commas_is_one_tag() -> None:
    """A tag value containing commas stays a single tag."""
    assert extract_controls([("X-PM-Tag", "a, b")]).tags == ("a, b",)


def test_values_unfolded_and_trimmed() -> None:
    """Folded values are unfolded (line breaks removed) and trimmed."""
    controls = extract_controls([("X-Mailgate-Stream", " out\r\n bound "), ("X-PM-Tag", " t ")])
    assert controls.stream == "out bound"
    assert controls.tags == ("t",)


def test_canonical_wins_over_alias() -> None:
    """For single-valued controls the canonical header beats a vendor alias wherever it appears."""
    headers = [
        ("X-PM-Message-Stream", "legacy"),
        ("X-Mailgate-Stream", "canonical"),
        ("X-PM-TrackOpens", "false"),
        ("X-Mailgate-Track-Opens", "true"),
    ]
    controls = extract_controls(headers)
    assert controls.stream == "canonical"
    assert controls.track_opens is True


def test_first_valid_value_wins_at_same_rank() -> None:
    """Among headers of equal rank the first valid value wins; invalid ones are skipped."""
    headers = [
        ("X-Mailgate-Track-Clicks", "maybe"),
        ("X-Mailgate-Track-Clicks", "no"),
        ("X-Mailgate-Track-Clicks", "yes"),
    ]
    assert extract_controls(headers).track_clicks is False


def test_metadata_first_key_wins_case_insensitively() -> None:
    """A metadata key set twice (in any case) keeps the first value."""
    headers = [
        ("X-Mailgate-Metadata-Order", "1"),
        ("x-pm-metadata-order", "2"),
        ("X-Mailgun-Variables", '{"ORDER": "3", "other": "x"}'),
    ]
    assert extract_controls(headers).metadata == (("Order", "1"), ("other", "x"))


@pytest.mark.parametrize(
    "value",
    [
        "",
        "not json",
        "[1, 2]",
        '"string"',
        "{",
        "[" * 5000 + "]" * 5000,
        json.dumps({"k": "x" * MAX_JSON_LENGTH}),
    ],
)
def test_bad_json_ignored(value: str) -> None:
    """Invalid, non-object, too deep or too long JSON in X-Mailgun-Variables / X-SMTPAPI is ignored."""
    controls = extract_controls([("X-Mailgun-Variables", value), ("X-SMTPAPI", value)])
    assert controls == Controls()


def test_metadata_empty_key_ignored() -> None:
    """A metadata header with an empty key is ignored."""
    assert extract_controls([("X-Mailgate-Metadata-", "v")]) == Controls()


def test_limits() -> None:
    """Tags and metadata are capped; over-long values are ignored, not truncated."""
    headers = [("X-Mailgate-Tag", f"t{i}") for i in range(MAX_TAGS + 5)]
    headers += [(f"X-Mailgate-Metadata-k{i}", "v") for i in range(MAX_METADATA + 5)]
    headers += [("X-Mailgate-Stream", "s" * (MAX_VALUE_LENGTH + 1))]
    headers += [("X-PM-Tag", "x" * (MAX_VALUE_LENGTH + 1))]
    controls = extract_controls(headers)
    assert controls.tags == tuple(f"t{i}" for i in range(MAX_TAGS))
    assert len(controls.metadata) == MAX_METADATA
    assert controls.stream is None


def test_mailgun_variables_many_members_capped() -> None:
    """A large X-Mailgun-Variables object contributes at most MAX_METADATA entries."""
    value = json.dumps({f"k{i}": i for i in range(200)})
    assert len(extract_controls([("X-Mailgun-Variables", value)]).metadata) == MAX_METADATA


def test_defaults_apply_when_absent() -> None:
    """Account defaults fill every control the message leaves unset."""
    defaults = {
        "X-Mailgate-Tag": "welcome",
        "X-Mailgate-Metadata-Plan": "pro",
        "X-Mailgate-Stream": "outbound",
        "X-Mailgate-Track-Opens": "true",
        "X-Mailgate-Track-Clicks": "false",
        "X-Mailgate-Transactional": "yes",
        "X-Mailgate-Layout": "base",
        "X-Mailgate-Inline-CSS": "1",
        "X-Mailgate-Keep-Message-ID": "no",
    }
    assert extract_controls([], defaults) == Controls(
        tags=("welcome",),
        metadata=(("Plan", "pro"),),
        stream="outbound",
        track_opens=True,
        track_clicks=False,
        transactional=True,
        layout="base",
        inline_css=True,
        keep_message_id=False,
    )


def test_defaults_do_not_override_message() -> None:
    """A value set by the message (canonical or alias) beats the account default."""
    defaults = {
        "X-Mailgate-Tag": "welcome",
        "X-Mailgate-Metadata-Plan": "pro",
        "X-Mailgate-Metadata-Region": "eu",
        "X-Mailgate-Track-Opens": "true",
        "X-Mailgate-Stream": "outbound",
    }
    headers = [
        ("X-PM-Tag", "reset"),
        ("X-PM-Metadata-plan", "free"),
        ("X-PM-TrackOpens", "false"),
    ]
    controls = extract_controls(headers, defaults)
    assert controls.tags == ("reset",)
    assert controls.metadata == (("plan", "free"), ("Region", "eu"))
    assert controls.track_opens is False
    assert controls.stream == "outbound"


def test_default_applies_when_message_value_invalid() -> None:
    """An unusable message value counts as unset, so the default applies."""
    controls = extract_controls(
        [("X-Mailgate-Track-Opens", "perhaps")], {"X-Mailgate-Track-Opens": "yes"}
    )
    assert controls.track_opens is True


def test_default_keys_case_insensitive() -> None:
    """Default keys are header names and therefore case-insensitive."""
    assert extract_controls([], {"x-mailgate-track-clicks": "TRUE"}).track_clicks is True
