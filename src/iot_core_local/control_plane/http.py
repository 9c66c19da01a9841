"""The control plane's HTTP server: one listening socket for every rest-json service it hosts.

A request goes to the service its signature names (the service in the SigV4 credential scope of the
Authorization header: botocore signs AWS IoT requests as `iot`), or, unsigned, to the first hosted service
whose routes match it. `/_local/...` paths are the stand-in's own endpoints (the fault switch, only when
enabled), outside any AWS API.

The control plane has an owner: bound to any address but loopback (or with `require_signature`), every
request, `/_local/...` included, must carry a valid SigV4 signature made with the data dir's key pair
(credentials.py, checked by signature.py); on loopback, by default, any credentials work, as on a
developer's machine. Every hosted service's operations are throttled by the account's quotas
(quotas.py): a request over its rate gets ThrottlingException.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import re
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

from botocore.model import OperationModel

from iot_core_local.addresses import bracketed, is_loopback
from iot_core_local.ca import CertificateAuthority
from iot_core_local.control_plane import iot
from iot_core_local.control_plane.restjson import Response, RestJsonService, clip
from iot_core_local.control_plane.signature import verify
from iot_core_local.credentials import AccessKey
from iot_core_local.errors import InvalidRequest, ServiceError, Throttling
from iot_core_local.faults import FaultInjector
from iot_core_local.faults import from_json as faults_from_json
from iot_core_local.quotas import RateLimiter
from iot_core_local.registry import Registry
from iot_core_local.resources import LimitLog

__all__ = ["MAX_BODY", "ControlPlane", "ControlPlaneLimits", "DeadlineSocketReader"]

log = logging.getLogger(__name__)

C = TypeVar("C")

# How often the server drops the implicit policy of expired CreateProvisioningClaim certificates (seconds).
CLAIM_EXPIRY_INTERVAL = 1.0

MAX_BODY = 1 << 20  # AWS IoT's largest request (a 64 KiB PEM, a 10 KiB template) fits many times over
# How much of a refused (too large) body is read and dropped so that its sender gets the answer; past it
# the connection is closed on the sender, who then may see a reset instead.
_DRAIN_LIMIT = 64 * MAX_BODY
# The stand-in's own endpoints (the fault switch); no AWS REST path starts with this.
_LOCAL_PREFIX = "/_local/"
# "Credential=AKID/20250101/us-east-1/iot/aws4_request": the fourth part is the service signed for.
_CREDENTIAL_SCOPE = re.compile(r"Credential=[^/,\s]*/[^/,\s]*/[^/,\s]*/([^/,\s]+)/aws4_request")


@dataclass(frozen=True)
class ControlPlaneLimits:
    """What one client can hold of the control plane: a thread for a while, a connection."""

    # A request's whole head and body must arrive within this, from the moment the server waits for it
    # (an idle keep-alive connection is closed after it too): a half-sent request frees its thread.
    request_timeout: float = 10.0
    # Connections served at once, each by a thread; beyond it a new one is answered 503 and closed.
    max_connections: int = 64
    limit_log_interval: float = 10.0  # a limit that is hit is logged once per interval, with a count

    def __post_init__(self) -> None:
        for name in ("request_timeout", "max_connections", "limit_log_interval"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"ControlPlaneLimits.{name} must be positive, not {value!r}")


# What a connection over the cap gets: botocore retries a 503 with backoff.
_BUSY_BODY = b'{"message": "Too many connections to the control plane; retry later."}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


class DeadlineSocketReader(io.RawIOBase):
    """A socket's reading side under one deadline for a whole request, however slowly it trickles in.

    A socket timeout alone bounds each recv: a client sending a byte every few seconds would hold the
    thread for good. Here every recv gets only the time left until the request's deadline.
    """

    def __init__(self, sock: socket.socket, clock: Callable[[], float] = time.monotonic) -> None:
        self.sock = sock
        self.clock = clock
        self.deadline: float | None = None  # None: no request being read
        self.received = 0  # bytes since the deadline was set: 0 means an idle connection, not a slow one

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.deadline is not None:
            left = self.deadline - self.clock()
            if left <= 0:
                raise TimeoutError("request not received in time")
            self.sock.settimeout(left)
        count = self.sock.recv_into(buffer)
        self.received += count
        return count


@dataclass(frozen=True)
class _Hosted:
    service: RestJsonService[Any]
    context: Any  # what the service's handlers are called with


class HostedServices:
    """The services a control plane hosts, and which of them a request is for."""

    def __init__(self) -> None:
        self._in_order: list[_Hosted] = []
        self._by_signing_name: dict[str, _Hosted] = {}

    @property
    def signing_names(self) -> frozenset[str]:
        """The names a request may be signed for: a credential scope naming another is refused."""
        return frozenset(self._by_signing_name)

    def add(self, service: RestJsonService[C], context: C) -> None:
        if service.signing_name in self._by_signing_name:
            raise ValueError(f"a service signed as {service.signing_name!r} is already hosted")
        hosted = _Hosted(service, context)
        self._in_order.append(hosted)
        self._by_signing_name[service.signing_name] = hosted

    def resolve(
        self, method: str, path: str, query: Mapping[str, list[str]], headers: Mapping[str, str]
    ) -> tuple[_Hosted, OperationModel, dict[str, str]]:
        """The service, operation and URI labels of a request.

        Raises the first service's UnknownOperation when no service has the route.
        """
        signed = _signing_name(headers.get("authorization", ""))
        hosted = self._by_signing_name.get(signed) if signed else None
        if hosted is not None:
            return hosted, *hosted.service.route(method, path, query)
        for candidate in self._in_order:
            found = candidate.service.match(method, path, query)
            if found is not None:
                return candidate, *found
        first = self._in_order[0]
        return first, *first.service.route(method, path, query)


def _signing_name(authorization: str) -> str | None:
    found = _CREDENTIAL_SCOPE.search(authorization) if authorization else None
    return found.group(1) if found else None


def _local_answer(status: int, document: Mapping[str, Any]) -> Response:
    return Response(status, {}, json.dumps(document).encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    control_plane: ControlPlane

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        family: int,
        limits: ControlPlaneLimits,
    ) -> None:
        self.address_family = family
        self.limits = limits
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        interval = limits.limit_log_interval
        self.refused = LimitLog(log, "control plane: connections answered 503 (max_connections)", interval)
        self.timed_out = LimitLog(
            log, "control plane: requests not received in time (request_timeout)", interval
        )
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            full = len(self._connections) >= self.limits.max_connections
            if not full:
                self._connections.add(request)
        if full:
            self._refuse(request, client_address)
            return
        super().process_request(request, client_address)

    def _refuse(self, request: socket.socket, client_address: Any) -> None:
        # Counted before the answer goes out, so whoever sees the 503 also sees it counted.
        self.refused.hit(f"from {client_address[0] if isinstance(client_address, tuple) else client_address}")
        # On the accepting thread: one non-blocking write, never a wait for the client.
        with contextlib.suppress(OSError):
            request.setblocking(False)
            request.send(_BUSY)
        super().shutdown_request(request)  # not ours: it was never counted

    def service_actions(self) -> None:
        # serve_forever calls this between requests and at least every poll_interval: housekeeping that
        # needs no thread of its own.
        self.control_plane.expire_claims()

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback to stderr by default. A client that hangs up, or stop()
        # closing a keep-alive connection under its thread, is not an error; anything else is logged.
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.debug("control plane: connection from %s ended: %s", client_address, exc)
        else:
            log.exception("control plane: error while serving %s", client_address)

    def close_connections(self) -> None:
        # Keep-alive connections would otherwise keep their threads reading after stop().
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: boto3 pools its connections
    server: _Server
    server_version = "iot-core-local"
    unread = 0  # bytes of a refused request's body still to drain after the answer

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in two writes; without NODELAY, Nagle and delayed ACKs add 40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = DeadlineSocketReader(self.connection)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        # From the wait for the request line to the last byte of the body, one deadline; the answer
        # is then written under a plain socket timeout of the same length.
        timeout = self.server.limits.request_timeout
        self.reader.deadline = time.monotonic() + timeout
        self.reader.received = 0
        try:
            super().handle_one_request()
        except TimeoutError:
            self.close_connection = True
            self._timed_out()
        finally:
            self.reader.deadline = None

    def log_error(self, format: str, *args: Any) -> None:
        if format.startswith("Request timed out"):  # http.server's words for a request too slow
            self._timed_out()
            return
        super().log_error(format, *args)

    def _timed_out(self) -> None:
        # An idle keep-alive connection (boto3's pool) closed after the timeout is no attack: not logged.
        if self.reader.received:
            self.server.timed_out.hit(f"from {self.client_address[0]}")

    def version_string(self) -> str:
        return self.server_version

    def _answer(self) -> None:
        started = time.perf_counter()
        operation_name = "-"
        hosted: _Hosted | None = None
        operation: OperationModel | None = None
        self.unread = 0
        try:
            length = self._content_length()
            if length > MAX_BODY:
                # Answered as the operation models bad input (its service's error and member names),
                # before the body is read: the body is then drained, after the answer, up to a bound.
                self.close_connection = True  # the unread body would be taken for the next request
                self.unread = length
                hosted, operation = self._operation_of()
                raise InvalidRequest(f"The request body is larger than {MAX_BODY} bytes")  # noqa: TRY301
            body = self.rfile.read(length) if length else b""
            self.reader.deadline = None
            self.connection.settimeout(self.server.limits.request_timeout)  # for writing the answer
            url = urllib.parse.urlsplit(self.path)
            control_plane = self.server.control_plane
            if control_plane.access_key is not None and control_plane.signatures_required:
                # Before anything else, /_local/ included: the bound address decides, not the caller's.
                now = control_plane.clock()
                verify(
                    control_plane.access_key,
                    self.command,
                    self.path,
                    self.headers.items(),
                    body,
                    now=now,
                    region=control_plane.registry.region,
                    services=control_plane.services.signing_names,
                )
            if url.path.startswith(_LOCAL_PREFIX):
                operation_name = "_local"
                status, extra_headers, payload = self._local(url.path, body)
                self._send(status, extra_headers, payload)
                log.info("%s %s -> %d", self.command, url.path, status)
                return
            query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
            headers = {k.lower(): v for k, v in self.headers.items()}
            hosted, operation, labels = control_plane.services.resolve(self.command, url.path, query, headers)
            operation_name = operation.name
            control_plane.take_quota(hosted.service.signing_name, operation.name)
            status, extra_headers, payload = hosted.service.invoke(
                hosted.context, operation, labels, query, headers, body
            )
        except ServiceError as exc:
            if hosted is None:
                status, extra_headers, payload = RestJsonService.error_response(exc)
            else:
                error = exc if operation is None else hosted.service.operation_error(operation, exc)
                status, extra_headers, payload = hosted.service.error_answer(error)
        except TimeoutError:
            raise  # a body not received in time: handle_one_request closes the connection, no answer
        except Exception:
            # Never a traceback on the wire; the log keeps it for whoever runs the server.
            log.exception("%s %s failed", self.command, self.path)
            status, extra_headers, payload = RestJsonService.error_response(
                ServiceError("Internal error in iot-core-local")
            )
        self._send(status, extra_headers, payload)
        if self.unread:
            self._drain()
        log.info(
            "%s %s %s -> %d (%.1f ms)",
            operation_name,
            self.command,
            urllib.parse.urlsplit(self.path).path,
            status,
            (time.perf_counter() - started) * 1000,
        )

    def _local(self, path: str, body: bytes) -> Response:
        """The stand-in's own endpoints, outside AWS's API: `/_local/faults`, the switch of faults.py."""
        faults = self.server.control_plane.faults
        if path.rstrip("/") != _LOCAL_PREFIX + "faults" or faults is None:
            return _local_answer(404, {"message": f"No such local endpoint: {clip(path)}"})
        if self.command == "POST":
            try:
                data = json.loads(body or b"null")
                fault = faults.arm(faults_from_json(data))
            except ValueError as e:  # JSONDecodeError is a ValueError
                return _local_answer(400, {"message": f"Bad fault: {e}"})
            log.info("fault armed over HTTP: %s", fault.describe())
            return _local_answer(200, {"fault": fault.to_json(), "faults": faults.to_json()})
        if self.command == "DELETE":
            faults.clear()
            log.info("faults cleared over HTTP")
        elif self.command not in ("GET", "HEAD"):
            return _local_answer(405, {"message": "Use GET, POST or DELETE"})
        return _local_answer(200, {"faults": faults.to_json()})

    def _content_length(self) -> int:
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            self.close_connection = True
            raise InvalidRequest("Transfer-Encoding is not supported; send Content-Length")
        text = self.headers.get("Content-Length", "0") or "0"
        try:
            length = int(text)
        except ValueError:
            self.close_connection = True
            raise InvalidRequest(f"Content-Length {clip(text)!r} is not a number") from None
        if length < 0:
            self.close_connection = True
            raise InvalidRequest("Content-Length is negative")
        return length

    def _operation_of(self) -> tuple[_Hosted | None, OperationModel | None]:
        """The service and operation of the request whose body is not read: (None, None) if none."""
        url = urllib.parse.urlsplit(self.path)
        if url.path.startswith(_LOCAL_PREFIX):
            return None, None
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            hosted, operation, _ = self.server.control_plane.services.resolve(
                self.command, url.path, query, headers
            )
        except ServiceError:
            return None, None
        return hosted, operation

    def _drain(self) -> None:
        """Read and drop the body of a refused request, up to `_DRAIN_LIMIT` bytes and within the request's
        deadline: a client (http.client, botocore) sends its whole body before it reads the answer, and
        closing on unread bytes resets the connection, so it would get a broken pipe, not the answer."""
        left = min(self.unread, _DRAIN_LIMIT)
        self.unread = 0
        with contextlib.suppress(OSError):  # TimeoutError too: a client that stops sending is let go
            while left > 0:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)

    def _send(self, status: int, headers: Mapping[str, str], payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("x-amzn-RequestId", _request_id())
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _answer

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a request line or header too long, a malformed request line, an
        unsupported version) as the AWS JSON error every client of this API parses, not an HTML page."""
        self.log_error("code %d, message %s", code, message)
        text = message or self.responses.get(code, ("Bad request",))[0]
        kind = "InvalidRequestException" if code < 500 else "ServiceUnavailableException"
        payload = json.dumps({"message": text}).encode()
        self.close_connection = True  # what follows a refused request line cannot be trusted
        # Before a valid request line http.server assumes HTTP/0.9 and would send the body alone: always a
        # status line, so any client (and the hub's TLS probe, told an HTTP port from a TLS one) sees HTTP.
        self.request_version = "HTTP/1.1"
        self.send_response(code, text)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("x-amzn-ErrorType", kind)
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        # http.server logs every request line through here; formatted only when someone listens.
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s - %s", self.address_string(), format % args)


def _request_id() -> str:
    return str(uuid.uuid4())


class ControlPlane:
    """The HTTP control plane. `start()` binds (port 0 picks a free port); `stop()` closes everything.

    It hosts AWS IoT from the start; `host_service` adds another rest-json service before `start()`.
    """

    def __init__(
        self,
        registry: Registry,
        ca: CertificateAuthority,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        endpoint_address: Callable[[], str] = lambda: "127.0.0.1",
        claim_ttl: float = iot.CLAIM_TTL,
        faults: FaultInjector | None = None,
        limits: ControlPlaneLimits | None = None,
        access_key: AccessKey | None = None,
        require_signature: bool = False,
        limiter: RateLimiter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`faults`: the switch `/_local/faults` arms (None: that path is 404 like any unknown one).
        Signatures are required when `require_signature` or when `host` is not loopback; then
        `access_key` is the only key pair accepted, dated by `clock` (epoch s). `limiter`: the quotas.
        """
        self.limits = limits if limits is not None else ControlPlaneLimits()
        self.signatures_required = require_signature or not is_loopback(host)
        if self.signatures_required and access_key is None:
            raise ValueError(f"a control plane on {host} requires signatures: give it the access key")
        self.access_key = access_key
        self.limiter = limiter
        self.clock = clock
        self.registry = registry
        self.faults = faults
        self.ca = ca
        self.host = host
        self.endpoint_address = endpoint_address
        self.claim_ttl = claim_ttl
        self._requested_port = port
        self._claims_checked = -math.inf
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.services = HostedServices()
        # Built here, not on the first request: the model is megabytes of JSON and the routes compile once.
        self.host_service(iot.service(), iot.IotBackend(registry, ca, endpoint_address, claim_ttl))

    def expire_claims(self) -> None:
        """At most once a second (from the server's loop): CreateProvisioningClaim certificates past their
        expiration lose their implicit policy, on connections already open too (`Registry.
        expire_provisioning_claims`)."""
        now = time.monotonic()
        if now - self._claims_checked < CLAIM_EXPIRY_INTERVAL:
            return
        self._claims_checked = now
        try:
            expired = self.registry.expire_provisioning_claims()
        except Exception:
            log.exception("control plane: expiring provisioning claims failed")
            return
        if expired:
            log.info("provisioning claims expired: %s", ", ".join(expired))

    def take_quota(self, service: str, operation: str) -> None:
        """Throttling (ThrottlingException) when `operation` is over the account's rate."""
        if self.limiter is not None and not self.limiter.allow(service, operation):
            raise Throttling("Rate exceeded")  # the member's spelling is the service's (error_answer)

    def host_service(self, service: RestJsonService[C], context: C) -> None:
        """Answer `service`'s operations too, calling its handlers with `context`."""
        if self._server is not None:
            raise RuntimeError("services are added before the control plane starts")
        self.services.add(service, context)

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the control plane is already running")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server = _Server((self.host, self._requested_port), _Handler, family, self.limits)
        server.control_plane = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="iot-core-local-api", daemon=True
        )
        self._thread.start()
        log.info("control plane listening on %s", self.url)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.close_connections()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    @property
    def refused_connections(self) -> LimitLog:
        """Connections answered 503 because `max_connections` were being served."""
        if self._server is None:
            raise RuntimeError("the control plane is not running")
        return self._server.refused

    @property
    def timed_out_requests(self) -> LimitLog:
        """Connections closed because a request did not arrive within `request_timeout`."""
        if self._server is None:
            raise RuntimeError("the control plane is not running")
        return self._server.timed_out

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the control plane is not running")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{bracketed(self.host)}:{self.port}"

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
