"""Tests for mailgate.passwords: scrypt, API keys, and CRAM-MD5 states."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate import passwords
from mailgate.passwords import ScryptCost

CHEAP = ScryptCost(ln=4, r=8, p=1)
# RFC 2195 section 2's worked example.
RFC2195_CHALLENGE = b"<1896.697170952@postoffice.reston.mci.net>"
RFC2195_SECRET = "tanstaaftanstaaf"
RFC2195_DIGEST = "b913a602c7eda7a495b4e6e7334d3890"


def test_default_scrypt_cost_follows_owasp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Production hashes passwords at N=2**15, r=8, p=3, and such hashes verify."""
    assert passwords.DEFAULT_SCRYPT_COST == ScryptCost(ln=15, r=8, p=3)
    monkeypatch.setattr(passwords, "SCRYPT_COST", passwords.DEFAULT_SCRYPT_COST)
    stored = passwords.hash_password("correct horse")
    assert stored.startswith("scrypt$ln=15,r=8,p=3$")
    assert passwords.verify_secret(stored, "correct horse")


def test_hash_password_round_trip() -> None:
    """A scrypt hash verifies its password and nothing else."""
    stored = passwords.hash_password("pässword", cost=CHEAP)
    assert passwords.verify_secret(stored, "pässword")
    assert not passwords.verify_secret(stored, "password")
    assert not passwords.verify_secret(stored, "")


def test_hash_password_is_salted() -> None:
    """The same password hashes differently each time."""
    assert passwords.hash_password("x", cost=CHEAP) != passwords.hash_password("x", cost=CHEAP)


def test_scrypt_parameters_are_read_from_the_stored_string() -> None:
    """A hash made at another cost still verifies, whatever the current default."""
    stored = passwords.hash_password("pw", cost=ScryptCost(ln=5, r=4, p=2))
    assert stored.startswith("scrypt$ln=5,r=4,p=2$")
    assert passwords.verify_secret(stored, "pw")


def test_module_cost_setting_is_used_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """hash_password uses SCRYPT_COST when no cost is passed (how tests make hashing cheap)."""
    monkeypatch.setattr(passwords, "SCRYPT_COST", CHEAP)
    assert passwords.hash_password("pw").startswith("scrypt$ln=4,r=8,p=1$")


def test_api_keys() -> None:
    """Generated keys carry the mg_ prefix, are unique, and verify through their SHA-256."""
    key = passwords.generate_api_key()
    assert key.startswith("mg_") and len(key) >= 40 and ":" not in key
    assert key != passwords.generate_api_key()
    stored = passwords.hash_api_key(key)
    assert stored == "sha256$" + hashlib.sha256(key.encode()).hexdigest()
    assert passwords.verify_secret(stored, key)
    assert not passwords.verify_secret(stored, key + "x")
    assert passwords.verify_secret(stored.upper().replace("SHA256$", "sha256$"), key)


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "hunter2",
        "{CRAM-MD5}" + "0" * 64,
        "scrypt$",
        "scrypt$ln=4,r=8,p=1$c2FsdHNhbHQ$",
        "scrypt$ln=4,r=8,p=1$!!!$AAAAAAAAAAAAAAAAAAAAAA",
        "scrypt$ln=4,r=8,p=1$c2FsdHNhbHQ$A",  # impossible base64 length
        "scrypt$ln=4,r=8,p=1$c2Fs$AAAAAAAAAAAAAAAAAAAAAA",  # salt too short
        "scrypt$ln=0,r=8,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAA",
        "scrypt$ln=4,r=8,p=0$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAA",
        "scrypt$ln=4,r=0,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAA",
        "scrypt$ln=40,r=8,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAA",  # 128 TiB
        "scrypt$ln=4,r=8,p=999$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAA",
        "sha256$" + "0" * 63,
        "sha256$" + "g" * 64,
        "SHA256$" + "0" * 64,
        "md5$" + "0" * 32,
        None,
        42,
    ],
)
def test_verify_secret_malformed_is_false(stored: object) -> None:
    """Malformed or unknown stored strings verify nothing and never raise."""
    assert passwords.verify_secret(stored, "hunter2") is False  # type: ignore[arg-type]
    assert passwords.hash_scheme(stored) is None


def test_verify_secret_odd_candidates_are_false() -> None:
    """Candidates that are not encodable strings are refused without raising."""
    stored = passwords.hash_api_key("k")
    assert passwords.verify_secret(stored, "\udcff") is False
    assert passwords.verify_secret(stored, None) is False  # type: ignore[arg-type]


def test_hash_scheme() -> None:
    """hash_scheme names each well-formed scheme."""
    assert passwords.hash_scheme(passwords.hash_password("a", cost=CHEAP)) == "scrypt"
    assert passwords.hash_scheme(passwords.hash_api_key("a")) == "sha256"
    assert passwords.hash_scheme(passwords.cram_md5_state("a")) == "cram-md5"


def test_decoy_hash_matches_nothing_at_the_same_cost() -> None:
    """A decoy is well formed, matches no password, and costs what the model costs."""
    model = passwords.hash_password("pw", cost=ScryptCost(ln=5, r=4, p=2))
    decoy = passwords.decoy_hash(model)
    assert decoy.startswith("scrypt$ln=5,r=4,p=2$") and decoy != model
    assert passwords.hash_scheme(decoy) == "scrypt"
    assert not passwords.verify_secret(decoy, "pw")
    assert passwords.hash_scheme(passwords.decoy_hash(passwords.hash_api_key("k"))) == "sha256"
    ln, r, p = passwords.SCRYPT_COST
    assert passwords.decoy_hash().startswith(f"scrypt$ln={ln},r={r},p={p}$")


def test_cram_md5_state_matches_dovecot() -> None:
    """The state is Dovecot's: `doveadm pw -s CRAM-MD5 -p password` output."""
    assert passwords.cram_md5_state("password") == (
        "cram-md5$9186d855e11eba527a7a52ca82b313e180d62234f0acc9051b527243d41e2740"
    )


def test_cram_md5_rfc2195_example() -> None:
    """The worked example of RFC 2195 verifies from the stored state."""
    stored = passwords.cram_md5_state(RFC2195_SECRET)
    assert passwords.verify_cram_md5(stored, RFC2195_CHALLENGE, RFC2195_DIGEST)
    assert passwords.verify_cram_md5(stored, RFC2195_CHALLENGE, RFC2195_DIGEST.upper())
    assert not passwords.verify_cram_md5(stored, RFC2195_CHALLENGE + b"x", RFC2195_DIGEST)


@pytest.mark.parametrize("length", [0, 1, 55, 56, 63, 64, 65, 100, 1000])
def test_cram_md5_key_lengths(length: int) -> None:
    """Keys of every size around the 64-byte block, longer ones hashed first, give HMAC-MD5."""
    secret = "k" * length
    challenge = b"<%d.1@example.com>" % length
    expected = hmac.new(secret.encode(), challenge, "md5").hexdigest()
    assert passwords.verify_cram_md5(passwords.cram_md5_state(secret), challenge, expected)


@settings(max_examples=300, database=None, deadline=None)
@given(secret=st.text(max_size=120), challenge=st.binary(max_size=300))
def test_cram_md5_equals_hmac(secret: str, challenge: bytes) -> None:
    """For any secret and challenge, the stored state verifies exactly hmac's HMAC-MD5."""
    stored = passwords.cram_md5_state(secret)
    digest = hmac.new(secret.encode("utf-8"), challenge, "md5").hexdigest()
    assert passwords.verify_cram_md5(stored, challenge, digest)
    wrong = hmac.new(secret.encode("utf-8") + b"!", challenge, "md5").hexdigest()
    assert not passwords.verify_cram_md5(stored, challenge, wrong)


@pytest.mark.parametrize(
    ("stored", "challenge", "digest"),
    [
        ("cram-md5$" + "0" * 63, b"<1@x>", "0" * 32),
        ("{CRAM-MD5}" + "0" * 64, b"<1@x>", "0" * 32),
        (None, b"<1@x>", "0" * 32),
        ("cram-md5$" + "0" * 64, "<1@x>", "0" * 32),
        ("cram-md5$" + "0" * 64, b"<1@x>", "é" * 32),
        ("cram-md5$" + "0" * 64, b"<1@x>", None),
        ("cram-md5$" + "0" * 64, b"<1@x>", ""),
    ],
)
def test_verify_cram_md5_malformed_is_false(stored: object, challenge: object, digest: object) -> None:
    """Malformed states, challenges or digests are refused without raising."""
    assert passwords.verify_cram_md5(stored, challenge, digest) is False  # type: ignore[arg-type]
