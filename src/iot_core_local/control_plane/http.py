"""The control plane's HTTP server: one listening socket for every rest-json service it hosts.

A request goes to the service its signature names (the service in the SigV4 credential scope of the
Authorization header: botocore signs AWS IoT requests as `iot`), or, unsigned, to the first hosted service
whose routes match it. `/_local/...` paths are the stand-in's own endpoints (the fault switch), outside
any AWS API. Authentication is not checked: any region and any credentials work, as on a developer's
machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
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

from iot_core_local.ca import CertificateAuthority
from iot_core_local.control_plane import iot
from iot_core_local.control_plane.restjson import Response, RestJsonService, clip
from iot_core_local.errors import InvalidRequest, ServiceError
from iot_core_local.faults import FaultInjector
from iot_core_local.faults import from_json as faults_from_json
from iot_core_local.registry import Registry

__all__ = ["MAX_BODY", "ControlPlane"]

log = logging.getLogger(__name__)

C = TypeVar("C")

MAX_BODY = 1 << 20  # AWS IoT's largest request (a 64 KiB PEM, a 10 KiB template) fits many times over
# The stand-in's own endpoints (the fault switch); no AWS REST path starts with this.
_LOCAL_PREFIX = "/_local/"
# "Credential=AKID/20250101/us-east-1/iot/aws4_request": the fourth part is the service signed for.
_CREDENTIAL_SCOPE = re.compile(r"Credential=[^/,\s]*/[^/,\s]*/[^/,\s]*/([^/,\s]+)/aws4_request")


@dataclass(frozen=True)
class _Hosted:
    service: RestJsonService[Any]
    context: Any  # what the service's handlers are called with


class HostedServices:
    """The services a control plane hosts, and which of them a request is for."""

    def __init__(self) -> None:
        self._in_order: list[_Hosted] = []
        self._by_signing_name: dict[str, _Hosted] = {}

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

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], family: int) -> None:
        self.address_family = family
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

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

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in two writes; without NODELAY, Nagle and delayed ACKs add 40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def version_string(self) -> str:
        return self.server_version

    def _answer(self) -> None:
        started = time.perf_counter()
        operation_name = "-"
        try:
            body = self._read_body()
            url = urllib.parse.urlsplit(self.path)
            if url.path.startswith(_LOCAL_PREFIX):
                operation_name = "_local"
                status, extra_headers, payload = self._local(url.path, body)
                self._send(status, extra_headers, payload)
                log.info("%s %s -> %d", self.command, url.path, status)
                return
            query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
            headers = {k.lower(): v for k, v in self.headers.items()}
            hosted, operation, labels = self.server.control_plane.services.resolve(
                self.command, url.path, query, headers
            )
            operation_name = operation.name
            status, extra_headers, payload = hosted.service.invoke(
                hosted.context, operation, labels, query, headers, body
            )
        except ServiceError as exc:
            status, extra_headers, payload = RestJsonService.error_response(exc)
        except Exception:
            # Never a traceback on the wire; the log keeps it for whoever runs the server.
            log.exception("%s %s failed", self.command, self.path)
            status, extra_headers, payload = RestJsonService.error_response(
                ServiceError("Internal error in iot-core-local")
            )
        self._send(status, extra_headers, payload)
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

    def _read_body(self) -> bytes:
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
        if length > MAX_BODY:
            self.close_connection = True  # the unread body would be taken for the next request
            raise InvalidRequest(f"The request body is larger than {MAX_BODY} bytes")
        return self.rfile.read(length) if length else b""

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
    ) -> None:
        self.registry = registry
        self.faults = faults
        self.ca = ca
        self.host = host
        self.endpoint_address = endpoint_address
        self.claim_ttl = claim_ttl
        self._requested_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.services = HostedServices()
        # Built here, not on the first request: the model is megabytes of JSON and the routes compile once.
        self.host_service(iot.service(), iot.IotBackend(registry, ca, endpoint_address, claim_ttl))

    def host_service(self, service: RestJsonService[C], context: C) -> None:
        """Answer `service`'s operations too, calling its handlers with `context`."""
        if self._server is not None:
            raise RuntimeError("services are added before the control plane starts")
        self.services.add(service, context)

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the control plane is already running")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server = _Server((self.host, self._requested_port), _Handler, family)
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
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the control plane is not running")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
