"""The pre-provisioning hook client: POST AWS's hook input to an http(s) URL, read the verdict.

In AWS the hook is a Lambda function; here a template's `preProvisioningHook.targetArn` may be an
`http://` or `https://` URL instead, so a test or a developer can run the hook as a tiny web server. One
Lambda function is hosted in-process: the takeover guard (`recipes.claims.TAKEOVER_GUARD_FUNCTION` of this
server's region and account), which the customer recipe's templates name by default, answered from the
registry by the rule the Lambda function runs in AWS (`recipes.takeover.takeover_decision`). Any other
Lambda ARN is refused at RegisterThing (fail closed), as AWS refuses a hook it cannot invoke.
AWS gives the hook 5 seconds and rejects the request on anything but a well-formed answer; so does this.
Blocking (http.client): the provisioning service calls it from its own pool of hook threads.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING

from .errors import HookDenied
from .model import CertificateStatus

if TYPE_CHECKING:
    from .registry import Registry

__all__ = ["HookResult", "HostedFunctions", "call_hook", "hosted_functions", "is_http_target"]

log = logging.getLogger(__name__)

_MAX_ANSWER = 64 * 1024
# arn:aws:lambda:REGION:ACCOUNT:function:NAME, with an optional version or alias (the same code here).
_LAMBDA_ARN = re.compile(
    r"arn:aws:lambda:([a-z0-9-]+):(\d{12}):function:([A-Za-z0-9_-]{1,64})(?::[A-Za-z0-9$_-]+)?"
)

HostedFunction = Callable[[Mapping[str, object]], object]


@dataclass(frozen=True)
class HookResult:
    parameter_overrides: dict[str, str] = field(default_factory=dict)


def is_http_target(target: str) -> bool:
    return target.startswith(("http://", "https://"))


@dataclass(frozen=True)
class HostedFunctions:
    """The Lambda functions answered in-process, by name, for ARNs of this region and account only."""

    region: str
    account: str
    functions: Mapping[str, HostedFunction]

    def find(self, target: str) -> HostedFunction | None:
        match = _LAMBDA_ARN.fullmatch(target)
        if match is None or (match[1], match[2]) != (self.region, self.account):
            return None
        return self.functions.get(match[3])

    def arns(self) -> list[str]:
        return [f"arn:aws:lambda:{self.region}:{self.account}:function:{name}" for name in self.functions]


def hosted_functions(registry: Registry) -> HostedFunctions:
    """The takeover guard over `registry`: what `recipes.takeover.lambda_handler` answers in AWS."""
    from .recipes.claims import TAKEOVER_GUARD_FUNCTION
    from .recipes.takeover import takeover_decision
    from .registry import ACCOUNT_ID, certificate_id_from_arn

    def active_certificates(thing_name: str) -> list[str]:
        if registry.find_thing(thing_name) is None:
            return []
        active = []
        for principal in registry.list_thing_principals(thing_name):
            certificate_id = certificate_id_from_arn(principal)
            certificate = registry.find_certificate(certificate_id) if certificate_id is not None else None
            if certificate is not None and certificate.status == CertificateStatus.ACTIVE:
                active.append(certificate.certificate_id)
        return active

    def guard(hook_input: Mapping[str, object]) -> object:
        return takeover_decision(hook_input, active_certificates)

    return HostedFunctions(registry.region, ACCOUNT_ID, {TAKEOVER_GUARD_FUNCTION: guard})


def call_hook(
    url: str,
    hook_input: Mapping[str, object],
    timeout: float,
    *,
    limit: float | None = None,
    hosted: HostedFunctions | None = None,
) -> HookResult:
    """POST `hook_input` as JSON; return the overrides if the hook allows, raise HookDenied otherwise.

    `url` may also name one of the `hosted` functions, called in this thread instead.

    `limit` is the hook's time limit as the message names it, when the caller already spent part of it
    (waiting for a free hook thread) and `timeout` is what is left.

    `timeout` bounds the whole exchange (connect, TLS, sending, status line, headers, body), not each
    socket operation: a socket timeout restarts with every byte, so a hook that trickles its headers one
    byte at a time would hold the caller for ever. Connecting and the TLS handshake get what is left of
    the deadline; after that a watchdog cuts the socket when the deadline passes, wherever the exchange
    is. Redirects are not followed: they would re-send the certificate somewhere the template does not name.
    """
    if not is_http_target(url):
        function = hosted.find(url) if hosted is not None else None
        if function is None:
            known = ", ".join(hosted.arns()) if hosted is not None else "none"
            raise HookDenied(
                f"Pre-provisioning hook target {url!r} is neither an http:// or https:// URL nor a Lambda "
                f"function iot-core-local hosts ({known})"
            )
        return _call_hosted(url, function, hook_input)
    parts = urllib.parse.urlsplit(url)
    deadline = _Deadline(timeout)
    late = HookDenied(f"Pre-provisioning hook did not answer within {limit or timeout:g} seconds")
    try:
        connection = _connection(parts, deadline)
        try:
            connection.connect()
            with _Watchdog(connection, deadline):
                status, body = _exchange(connection, parts, hook_input)
        finally:
            connection.close()
    except TimeoutError:
        raise late from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        if deadline.passed():
            raise late from None  # the watchdog cut the socket: whatever broke, time ran out first
        raise HookDenied(f"Pre-provisioning hook could not be reached: {e}") from None
    if deadline.passed():
        raise late
    if status != HTTPStatus.OK:
        raise HookDenied(f"Pre-provisioning hook failed with HTTP status {status}")
    return _verdict(body)


class _Deadline:
    def __init__(self, timeout: float) -> None:
        self.end = time.monotonic() + timeout
        self.cut = False  # the watchdog fired

    def remaining(self) -> float:
        """Seconds left; TimeoutError once none are."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    def passed(self) -> bool:
        return self.cut or time.monotonic() >= self.end


class _HTTPSConnection(http.client.HTTPSConnection):
    """TLS started with what is left of the deadline (http.client would give it the whole timeout again)."""

    def __init__(self, host: str, port: int | None, deadline: _Deadline) -> None:
        self.deadline = deadline
        self.tls = ssl.create_default_context()
        super().__init__(host, port, timeout=deadline.remaining(), context=self.tls)

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        assert self.sock is not None
        self.sock.settimeout(self.deadline.remaining())
        self.sock = self.tls.wrap_socket(self.sock, server_hostname=self.host)


def _connection(parts: urllib.parse.SplitResult, deadline: _Deadline) -> http.client.HTTPConnection:
    if parts.scheme == "https":
        return _HTTPSConnection(parts.hostname or "", parts.port, deadline)
    return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=deadline.remaining())


class _Watchdog:
    """Shuts the connection's socket down when the deadline passes, which ends any read or write in
    progress at once (a socket timeout alone would not: it restarts with every byte received)."""

    def __init__(self, connection: http.client.HTTPConnection, deadline: _Deadline) -> None:
        self.connection = connection
        self.deadline = deadline
        self.timer = threading.Timer(deadline.remaining(), self._cut)
        self.timer.daemon = True

    def _cut(self) -> None:
        self.deadline.cut = True
        sock = self.connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                # The plain socket's shutdown, also for TLS: SSLSocket.shutdown would drop its TLS state
                # under the reading thread's feet.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def __enter__(self) -> None:
        self.timer.start()

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()


def _exchange(
    connection: http.client.HTTPConnection, parts: urllib.parse.SplitResult, hook_input: Mapping[str, object]
) -> tuple[int, bytes]:
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    connection.request(
        "POST", path, body=json.dumps(hook_input).encode(), headers={"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    body = bytearray()
    while len(body) <= _MAX_ANSWER:
        chunk = response.read1(8192)
        if not chunk:
            break
        body += chunk
    return response.status, bytes(body)


def _call_hosted(target: str, function: HostedFunction, hook_input: Mapping[str, object]) -> HookResult:
    try:
        answer = function(hook_input)
    except Exception:
        log.exception("pre-provisioning hook %s failed; refusing", target)
        raise HookDenied("Pre-provisioning hook function failed") from None
    return _verdict_of(answer)


def _verdict(body: bytes) -> HookResult:
    try:
        answer = json.loads(body)
    except ValueError:
        raise HookDenied("Pre-provisioning hook answered something that is not JSON") from None
    return _verdict_of(answer)


def _verdict_of(answer: object) -> HookResult:
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
