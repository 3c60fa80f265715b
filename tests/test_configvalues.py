"""Tests for mailgate.configvalues: errors naming keys, sizes, and secret references."""

from __future__ import annotations

import pytest

from mailgate.configvalues import ConfigError, parse_size, resolve_secret


def test_config_error_names_the_key() -> None:
    """str(ConfigError) is "key: message", and keeps both as attributes."""
    error = ConfigError("accounts.alice.max_recipients", "must be a positive integer")
    assert str(error) == "accounts.alice.max_recipients: must be a positive integer"
    assert error.key == "accounts.alice.max_recipients"
    assert error.message == "must be a positive integer"


def test_config_error_with_source_names_the_file() -> None:
    """A ConfigError with a source puts the file name first."""
    error = ConfigError("accounts.bob", "unknown key", source="/etc/mailgate/accounts.toml")
    assert str(error) == "/etc/mailgate/accounts.toml: accounts.bob: unknown key"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1),
        (10485760, 10485760),
        ("100", 100),
        ("100B", 100),
        ("512KB", 512_000),
        ("1MB", 1_000_000),
        ("2GB", 2_000_000_000),
        ("1KiB", 1024),
        ("10MiB", 10 * 1024 * 1024),
        ("1GiB", 1024**3),
        ("1.5KiB", 1536),
        (" 10 MiB ", 10 * 1024 * 1024),
    ],
)
def test_parse_size_accepts_bytes_and_units(value: object, expected: int) -> None:
    """Sizes are ints or numbers with decimal (KB) or binary (KiB) units."""
    assert parse_size(value, "limits.max_message_size") == expected


@pytest.mark.parametrize(
    "value",
    [0, -1, True, 1.5, None, "", "0KB", "-1MB", "10mb", "10 MiBs", "ten MB", "1e6", ["1MB"]],
)
def test_parse_size_refuses_anything_else(value: object) -> None:
    """Zero, negatives, booleans, floats and unknown units raise ConfigError naming the key."""
    with pytest.raises(ConfigError) as info:
        parse_size(value, "limits.max_message_size")
    assert info.value.key == "limits.max_message_size"


def test_resolve_secret_inline() -> None:
    """A plain string is the secret itself."""
    assert resolve_secret("s3cret", "providers.main.token") == "s3cret"


def test_resolve_secret_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """"env:NAME" reads the environment variable."""
    monkeypatch.setenv("MG_TEST_TOKEN", "from-env")
    assert resolve_secret("env:MG_TEST_TOKEN", "providers.main.token") == "from-env"


def test_resolve_secret_unset_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unset variable raises ConfigError naming the key and the variable."""
    monkeypatch.delenv("MG_TEST_MISSING", raising=False)
    with pytest.raises(ConfigError) as info:
        resolve_secret("env:MG_TEST_MISSING", "providers.main.token")
    assert str(info.value) == (
        "providers.main.token: environment variable MG_TEST_MISSING is not set"
    )


def test_resolve_secret_from_file_strips_one_newline(tmp_path) -> None:
    """"file:PATH" reads the file without its final line ending."""
    secret_file = tmp_path / "token"
    secret_file.write_text("from-file\r\n")
    assert resolve_secret(f"file:{secret_file}", "k") == "from-file"


def test_resolve_secret_relative_file_uses_base_dir(tmp_path) -> None:
    """A relative file path is taken from base_dir when one is given."""
    (tmp_path / "token").write_text("relative\n")
    assert resolve_secret("file:token", "k", base_dir=tmp_path) == "relative"


def test_resolve_secret_missing_file(tmp_path) -> None:
    """An unreadable file raises ConfigError naming the file."""
    with pytest.raises(ConfigError) as info:
        resolve_secret(f"file:{tmp_path / 'absent'}", "k")
    assert "absent" in info.value.message


@pytest.mark.parametrize("value", ["", "env:", "file:", 42, None])
def test_resolve_secret_refuses_empty_and_non_strings(value: object) -> None:
    """Empty secrets, empty references and non-strings raise ConfigError."""
    with pytest.raises(ConfigError):
        resolve_secret(value, "k")


def test_resolve_secret_empty_file_does_not_echo(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Errors about a secret's source never contain a secret value."""
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError) as info:
        resolve_secret(f"file:{tmp_path / 'empty'}", "k")
    assert "is empty" in str(info.value)
    monkeypatch.setenv("MG_TEST_EMPTY", "")
    with pytest.raises(ConfigError):
        resolve_secret("env:MG_TEST_EMPTY", "k")
