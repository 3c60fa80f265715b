"""An independent AWS Signature Version 4 check for the SES tests.

Written from the specification
(https://docs.aws.amazon.com/IAM/latest/UserGuide/create-signed-request.html),
not from botocore, so that a test comparing the two catches a signing mistake
that a test asking botocore twice could not.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping

_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request, "
    r"SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=(?P<signature>[0-9a-f]{64})"
)


def parse_authorization(value: str) -> dict[str, str]:
    match = _AUTHORIZATION.fullmatch(value)
    assert match is not None, f"not a SigV4 Authorization header: {value!r}"
    return match.groupdict()


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


def expected_signature(method: str, path: str, headers: Mapping[str, str], body: bytes, secret: str) -> str:
    """The signature the ``Authorization`` header in ``headers`` should carry.

    ``headers`` are the request's headers with lower-case names, as received.
    """
    authorization = parse_authorization(headers["authorization"])
    signed = authorization["signed"].split(";")
    canonical = "\n".join(
        [
            method,
            path,
            "",  # no query string
            "".join(f"{name}:{' '.join(headers[name].split())}\n" for name in signed),
            authorization["signed"],
            hashlib.sha256(body).hexdigest(),
        ]
    )
    scope = f"{authorization['date']}/{authorization['region']}/{authorization['service']}/aws4_request"
    string_to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", headers["x-amz-date"], scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = _hmac(f"AWS4{secret}".encode(), authorization["date"])
    for part in (authorization["region"], authorization["service"], "aws4_request"):
        key = _hmac(key, part)
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
