"""AWS Signature Version 4, checked on the receiving side with botocore's own signer.

The expected signature is computed by `botocore.auth.SigV4Auth` from the request as it arrived (method,
path and query as sent, the headers the client says it signed, the body), with the date and credential
scope the client used, then compared in constant time. So what botocore, boto3 and the AWS CLI sign is
accepted by construction, and a request changed on the way (another body, another header) is not.

Answers, as AWS's front door gives them (403, the type in `x-amzn-ErrorType`, which botocore reads):
no Authorization header: MissingAuthenticationTokenException; an access key id that is not the data
dir's: UnrecognizedClientException; a malformed header, a date more than 15 minutes from the server's
clock, or a signature that does not match: InvalidSignatureException.
"""

from __future__ import annotations

import calendar
import hmac
import re
import time
from collections.abc import Iterable

from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest, HTTPHeaders
from botocore.credentials import Credentials

from ..credentials import AccessKey
from ..errors import InvalidSignature, MissingAuthenticationToken, UnrecognizedClient

__all__ = ["MAX_CLOCK_SKEW", "verify"]

MAX_CLOCK_SKEW = 15 * 60.0  # AWS refuses a signature dated more than 15 minutes from its clock

_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=(?P<credential>[^,\s]+)\s*,\s*"
    r"SignedHeaders=(?P<signed>[^,\s]+)\s*,\s*Signature=(?P<signature>[0-9a-f]{64})\s*"
)
_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method."
)


class _AsReceived(SigV4Auth):
    """botocore's signer, signing exactly the headers the client named in SignedHeaders."""

    def __init__(self, key: AccessKey, service: str, region: str, signed: HTTPHeaders) -> None:
        super().__init__(Credentials(key.access_key_id, key.secret_access_key), service, region)
        self._signed = signed

    def headers_to_sign(self, request: AWSRequest) -> HTTPHeaders:
        return self._signed


def verify(
    key: AccessKey,
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    *,
    now: float | None = None,
) -> str:
    """Check the request's signature; return the service it was signed for (e.g. `iot`).

    `target` is the request line's path and query as received. Raises an AuthenticationFailure.
    """
    received = HTTPHeaders()
    for name, value in headers:
        received.add_header(name.lower(), value)
    authorization = received.get("authorization")
    if not authorization:
        raise MissingAuthenticationToken("Missing Authentication Token")
    found = _AUTHORIZATION.fullmatch(authorization.strip())
    if found is None:
        raise InvalidSignature(
            "The Authorization header is not an AWS4-HMAC-SHA256 signature with Credential, "
            "SignedHeaders and Signature"
        )
    parts = found["credential"].split("/")
    if len(parts) != 5 or parts[4] != "aws4_request" or not all(parts):
        raise InvalidSignature("Credential should be AccessKeyId/yyyyMMdd/region/service/aws4_request")
    access_key_id, day, region, service, _ = parts
    if not hmac.compare_digest(access_key_id.encode(), key.access_key_id.encode()):
        raise UnrecognizedClient("The security token included in the request is invalid.")
    timestamp = _checked_date(received.get("x-amz-date"), day, time.time() if now is None else now)

    signed = HTTPHeaders()
    names = found["signed"].split(";")
    if "host" not in names:
        raise InvalidSignature("SignedHeaders must include host")
    for name in names:
        values = received.get_all(name)
        if not values:
            raise InvalidSignature(f"The signed header {name!r} is not in the request")
        for value in values:
            signed.add_header(name, value)

    host = received.get("host", "")
    request = AWSRequest(method=method, url=f"http://{host}{target}", data=body)
    content_sha = received.get("x-amz-content-sha256")
    if content_sha is not None:
        request.headers["X-Amz-Content-SHA256"] = content_sha
    request.context["timestamp"] = timestamp
    signer = _AsReceived(key, service, region, signed)
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    if not hmac.compare_digest(expected, found["signature"]):
        raise InvalidSignature(_MISMATCH)
    return service


def _checked_date(amz_date: str | None, scope_day: str, now: float) -> str:
    if not amz_date:
        raise InvalidSignature("The request has no X-Amz-Date header; sign it with SigV4")
    try:
        signed_at = calendar.timegm(time.strptime(amz_date, SIGV4_TIMESTAMP))
    except ValueError:
        raise InvalidSignature(f"X-Amz-Date {amz_date[:32]!r} is not yyyyMMddTHHmmssZ") from None
    if amz_date[:8] != scope_day:
        raise InvalidSignature("The Credential's date is not the day of X-Amz-Date")
    if abs(now - signed_at) > MAX_CLOCK_SKEW:
        server = time.strftime(SIGV4_TIMESTAMP, time.gmtime(now))
        raise InvalidSignature(
            f"Signature expired or not yet current: {amz_date} is more than 15 minutes from the "
            f"server's time {server}; check this machine's clock"
        )
    return amz_date
