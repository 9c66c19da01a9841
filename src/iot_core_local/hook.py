"""The pre-provisioning hook client: POST AWS's hook input to an http(s) URL, read the verdict.

In AWS the hook is a Lambda function; here a template's `preProvisioningHook.targetArn` may be an
`http://` or `https://` URL instead, so a test or a developer can run the hook as a tiny web server.
AWS gives the hook 5 seconds and rejects the request on anything but a well-formed answer; so does this.
Blocking (urllib): the gateway calls it from a worker thread.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

from .errors import HookDenied

__all__ = ["HookResult", "call_hook", "is_http_target"]

_MAX_ANSWER = 64 * 1024


@dataclass(frozen=True)
class HookResult:
    parameter_overrides: dict[str, str] = field(default_factory=dict)


def is_http_target(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def call_hook(url: str, hook_input: Mapping[str, object], timeout: float) -> HookResult:
    """POST `hook_input` as JSON; return the overrides if the hook allows, raise HookDenied otherwise.

    `timeout` bounds the whole exchange, not each socket operation, so a hook that trickles its
    answer byte by byte is cut off as surely as one that never answers. Redirects are not followed:
    they would re-send the certificate somewhere the template does not name.
    """
    if not is_http_target(url):
        raise HookDenied(f"Pre-provisioning hook target {url!r} is not an http:// or https:// URL")
    parts = urllib.parse.urlsplit(url)
    deadline = time.monotonic() + timeout
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    try:
        connection = connection_class(parts.hostname or "", parts.port, timeout=timeout)
        try:
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            connection.request(
                "POST",
                path,
                body=json.dumps(hook_input).encode(),
                headers={"Content-Type": "application/json"},
            )
            _shrink_timeout(connection, deadline)
            response = connection.getresponse()
            body = bytearray()
            while len(body) <= _MAX_ANSWER:
                _shrink_timeout(connection, deadline)
                chunk = response.read1(8192)
                if not chunk:
                    break
                body += chunk
        finally:
            connection.close()
    except TimeoutError:
        raise HookDenied(f"Pre-provisioning hook did not answer within {timeout:g} seconds") from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise HookDenied(f"Pre-provisioning hook could not be reached: {e}") from None
    if response.status != HTTPStatus.OK:
        raise HookDenied(f"Pre-provisioning hook failed with HTTP status {response.status}")
    return _verdict(bytes(body))


def _shrink_timeout(connection: http.client.HTTPConnection, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    if connection.sock is not None:
        connection.sock.settimeout(remaining)


def _verdict(body: bytes) -> HookResult:
    try:
        answer = json.loads(body)
    except ValueError:
        raise HookDenied("Pre-provisioning hook answered something that is not JSON") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("allowProvisioning"), bool):
        raise HookDenied("Pre-provisioning hook answer has no boolean allowProvisioning")
    if not answer["allowProvisioning"]:
        raise HookDenied("Pre-provisioning hook denied the request")
    overrides = answer.get("parameterOverrides", {})
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in overrides.items()
    ):
        raise HookDenied("Pre-provisioning hook parameterOverrides must map strings to strings")
    return HookResult(dict(overrides))
