"""The multipart/form-data encoder (RFC 7578), read back by the stdlib MIME parser."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.providers.multipart import FormFile, encode_form, random_boundary
from mailgate.testing import decode_form


def fixed(value: str = "BOUNDARY"):  # type: ignore[no-untyped-def]
    return lambda: value


def test_exact_encoding() -> None:
    """Text and file parts are framed exactly as RFC 7578 and browsers do it."""
    body, content_type = encode_form(
        [("from", "a@example.com"), ("attachment", FormFile("r.txt", "text/plain", b"hi\r\n"))], fixed()
    )
    assert content_type == "multipart/form-data; boundary=BOUNDARY"
    assert body == (
        b"--BOUNDARY\r\n"
        b'Content-Disposition: form-data; name="from"\r\n'
        b"\r\n"
        b"a@example.com\r\n"
        b"--BOUNDARY\r\n"
        b'Content-Disposition: form-data; name="attachment"; filename="r.txt"\r\n'
        b"Content-Type: text/plain\r\n"
        b"\r\n"
        b"hi\r\n\r\n"
        b"--BOUNDARY--\r\n"
    )


def test_names_are_escaped_not_injected() -> None:
    """A quote or line break in a name or file name cannot end the parameter or add a header."""
    body, content_type = encode_form(
        [('x"; filename="evil', "v"), ("attachment", FormFile('a"\r\nContent-Type: text/html\r\n.txt', "text/plain", b"x"))],
        fixed(),
    )
    assert b'name="x%22; filename=%22evil"\r\n' in body
    assert decode_form(body, content_type) == [
        ('x%22; filename=%22evil', "v"),
        ("attachment", FormFile("a%22%0D%0AContent-Type: text/html%0D%0A.txt", "text/plain", b"x")),
    ]


def test_utf8_values_and_file_names() -> None:
    """Values and file names are sent as UTF-8 (RFC 7578 §5.1), never as RFC 2231 filename*."""
    body, content_type = encode_form([("subject", "Grüße ✓"), ("attachment", FormFile("Über.pdf", "application/pdf", b"%PDF"))], fixed())
    assert 'filename="Über.pdf"'.encode() in body and b"filename*" not in body
    assert decode_form(body, content_type) == [("subject", "Grüße ✓"), ("attachment", FormFile("Über.pdf", "application/pdf", b"%PDF"))]


def test_boundary_found_in_content_is_replaced() -> None:
    """A candidate boundary that occurs in a part is never used."""
    candidates = iter(["taken", "fresh"])
    body, content_type = encode_form([("text", "this mentions --taken inline")], lambda: next(candidates))
    assert content_type.endswith("boundary=fresh")
    assert decode_form(body, content_type) == [("text", "this mentions --taken inline")]


def test_constant_colliding_boundary_is_an_error() -> None:
    """An injected boundary that always collides raises instead of producing a broken body."""
    with pytest.raises(ValueError):
        encode_form([("text", "--x")], fixed("x"))


def test_random_boundaries_differ() -> None:
    """The default boundary is random, so no sender can predict and plant it."""
    assert random_boundary() != random_boundary()


@given(
    st.lists(
        st.tuples(
            st.text(min_size=1, max_size=20),
            st.one_of(
                st.text(max_size=200),
                st.builds(FormFile, st.text(min_size=1, max_size=20), st.sampled_from(["image/png", "application/pdf"]), st.binary(max_size=300)),
            ),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_round_trip_through_an_independent_parser(fields: list[tuple[str, str | FormFile]]) -> None:
    """Any fields, binary files included, come back unchanged from the stdlib parser."""
    body, content_type = encode_form(fields)

    def escaped(text: str) -> str:
        return text.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")

    expected = [
        (escaped(name), FormFile(escaped(value.filename), value.content_type, value.content) if isinstance(value, FormFile) else value)
        for name, value in fields
    ]
    decoded = decode_form(body, content_type)
    # The stdlib unfolds header values, which cannot change names free of CR/LF (escaped above).
    assert [(n, v.content if isinstance(v, FormFile) else v) for n, v in decoded] == [
        (n, v.content if isinstance(v, FormFile) else v) for n, v in expected
    ]
    assert decoded == expected
