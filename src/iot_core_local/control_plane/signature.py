"""AWS Signature Version 4, checked on the receiving side with botocore's own signer.

The expected signature is computed by `botocore.auth.SigV4Auth` from the request as it arrived (method,
path and query as sent, the headers the client says it signed, the body), with the date and credential
scope the client used, then compared in constant time. So what botocore, boto3 and the AWS CLI sign is
accepted by construction, and a request changed on the way (another body, another header) is not.

Answers, as AWS's front door gives them (403, the type in `x-amzn-ErrorType`, which botocore reads):
no Authorization header: MissingAuthenticationTokenException; an access key id that is not the data
dir's: UnrecognizedClientException; a malformed header, a credential scope of another region or of a
service this server does not host, a date more than 5 minutes from the server's clock, an
X-Amz-Content-SHA256 that is unsigned or not the body's hash, or a signature that does not match:
InvalidSignatureException.

The payload hash is always computed here from the body received, never taken from the client's
X-Amz-Content-SHA256 header: otherwise a captured request with another body and that header added would
still verify. (AWS accepts UNSIGNED-PAYLOAD and streaming payloads only for S3, not for these services.)
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import re
import time
from collections.abc import Collection, Iterable

from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest, HTTPHeaders
from botocore.credentials import Credentials

from ..credentials import AccessKey
from ..errors import InvalidSignature, MissingAuthenticationToken, UnrecognizedClient

__all__ = ["MAX_CLOCK_SKEW", "verify"]

MAX_CLOCK_SKEW = 5 * 60.0  # AWS refuses a signature dated more than 5 minutes from its clock

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
    region: str | None = None,
    services: Collection[str] | None = None,
) -> str:
    """Check the request's signature; return the service it was signed for (e.g. `iot`).

    `target` is the request line's path and query as received. `region`: the server's region, the only
    one a credential scope may name; `services`: the signing names hosted (None: any). Raises an
    AuthenticationFailure.
    """
    received = HTTPHeaders()
    for name, value in headers:
        received.add_header(name.lower(), value)
    copies = received.get_all("authorization") or []
    if len(copies) > 1:
        # Which copy a proxy or another server would read is anyone's guess: refuse, never pick one.
        raise InvalidSignature("The request has more than one Authorization header; send exactly one")
    authorization = copies[0] if copies else None
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
    access_key_id, day, scope_region, service, _ = parts
    if not hmac.compare_digest(access_key_id.encode(), key.access_key_id.encode()):
        raise UnrecognizedClient("The security token included in the request is invalid.")
    _check_scope(scope_region, service, region, services)
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

    body_sha = _checked_body_hash(received.get("x-amz-content-sha256"), names, body)

    host = received.get("host", "")
    request = AWSRequest(method=method, url=f"http://{host}{target}", data=body)
    # Never the client's header: botocore would take it as the payload hash instead of hashing the body.
    request.headers["X-Amz-Content-SHA256"] = body_sha
    request.context["timestamp"] = timestamp
    signer = _AsReceived(key, service, scope_region, signed)
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    if not hmac.compare_digest(expected, found["signature"]):
        raise InvalidSignature(_MISMATCH)
    return service


def _check_scope(
    scope_region: str, service: str, region: str | None, services: Collection[str] | None
) -> None:
    # AWS's own wording for a scope of another region or service (botocore users recognise it).
    if region is not None and scope_region != region:
        raise InvalidSignature(
            f"Credential should be scoped to a valid region. (the server's region is {region}; "
            "give the client region_name or AWS_REGION to match)"
        )
    if services is not None and service not in services:
        raise InvalidSignature(
            "Credential should be scoped to correct service. "
            f"(this server hosts {', '.join(sorted(services))})"
        )


def _checked_body_hash(content_sha: str | None, signed_names: list[str], body: bytes) -> str:
    """sha256(body) in hex; a client's X-Amz-Content-SHA256, if sent, must be signed and be that hash
    (UNSIGNED-PAYLOAD and STREAMING-* are S3's alone)."""
    body_sha = hashlib.sha256(body).hexdigest()
    if content_sha is not None:
        if "x-amz-content-sha256" not in signed_names:
            raise InvalidSignature("X-Amz-Content-SHA256 is sent but not among the SignedHeaders")
        if not hmac.compare_digest(content_sha.strip().lower().encode(), body_sha.encode()):
            raise InvalidSignature(
                "X-Amz-Content-SHA256 is not the SHA-256 of the body received "
                "(UNSIGNED-PAYLOAD is accepted only by S3)"
            )
    return body_sha


def _checked_date(amz_date: str | None, scope_day: str, now: float) -> str:
    if not amz_date:
        raise InvalidSignature("The request has no X-Amz-Date header; sign it with SigV4")
    try:
        signed_at = calendar.timegm(time.strptime(amz_date, SIGV4_TIMESTAMP))
    except ValueError:
        raise InvalidSignature(f"X-Amz-Date {amz_date[:32]!r} is not yyyyMMddTHHmmssZ") from None
    if amz_date[:8] != scope_day:
        raise InvalidSignature("The Credential's date is not the day of X-Amz-Date")
    server = time.strftime(SIGV4_TIMESTAMP, time.gmtime(now))
    # AWS's wording, with the bound it measures against; the fix is a clock, not the request.
    if now - signed_at > MAX_CLOCK_SKEW:
        earliest = time.strftime(SIGV4_TIMESTAMP, time.gmtime(now - MAX_CLOCK_SKEW))
        raise InvalidSignature(
            f"Signature expired: {amz_date} is now earlier than {earliest} ({server} - 5 min.); "
            "check this machine's clock"
        )
    if signed_at - now > MAX_CLOCK_SKEW:
        latest = time.strftime(SIGV4_TIMESTAMP, time.gmtime(now + MAX_CLOCK_SKEW))
        raise InvalidSignature(
            f"Signature not yet current: {amz_date} is still later than {latest} ({server} + 5 min.); "
            "check this machine's clock"
        )
    return amz_date
