"""The takeover guard: a pre-provisioning hook that refuses a serial whose hub is already onboarded.

Every hub of a line holds the same claim, and RegisterThing's parameters are whatever the hub sends. A
template alone cannot tell a new hub from one that sends another hub's serial: it names the thing after
the serial and would attach a second ACTIVE certificate to it (and merge its attributes). AWS's answer is
a pre-provisioning hook, which sees the request before anything is created. `takeover_verdict` is that
hook's logic, through any boto3 IoT client: it refuses when the serial's thing has an ACTIVE certificate
already, and allows a new serial, or one whose certificates were all deactivated (a hub re-onboarding
after a reset). Two hubs sending one new serial at the same instant can both pass in AWS: the check and
the creation are not one transaction there (iot-core-local's hosted guard judges and registers in one step
on its event loop, so there one of them wins).

In AWS the hook is a Lambda function (`lambda_handler` below is its whole body, with `boto3.client("iot")`
and `iot:ListThingPrincipals` and `iot:DescribeCertificate` in its role), deployed under the name
`claims.TAKEOVER_GUARD_FUNCTION` that the recipe's templates name by default. iot-core-local hosts that
function itself, answering it in-process from its registry with the same rule (`takeover_decision`).
A hook may also be an http:// URL there: `TakeoverGuard` serves the verdict on a loopback port for as long
as it is open.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from iot_core_local.model import CertificateStatus
from iot_core_local.recipes.claims import SERIAL_NUMBER_PARAMETER, TAKEOVER_GUARD_FUNCTION, THING_PREFIX

__all__ = [
    "TAKEOVER_GUARD_FUNCTION",
    "TakeoverGuard",
    "lambda_handler",
    "takeover_decision",
    "takeover_verdict",
]

log = logging.getLogger(__name__)

_MAX_REQUEST = 64 * 1024  # AWS's hook input: ids, a certificate PEM and a few parameters
_MAX_HANDLERS = 16  # requests answered at once; more are refused (the provisioning service retries)
_REQUEST_TIMEOUT = 10.0  # a caller that sends nothing for this long is dropped


def takeover_verdict(
    iot: Any, hook_input: Mapping[str, Any], thing_prefix: str = THING_PREFIX
) -> dict[str, Any]:
    """The hook's answer to AWS's hook input, looking the certificates up through a boto3 IoT client."""
    return takeover_decision(
        hook_input, lambda thing_name: _active_certificates(iot, thing_name), thing_prefix
    )


def takeover_decision(
    hook_input: Mapping[str, Any],
    active_certificates: Callable[[str], Sequence[str]],
    thing_prefix: str = THING_PREFIX,
) -> dict[str, Any]:
    """The guard's rule, whoever looks the certificates up: refuse a serial whose thing has an ACTIVE
    certificate (`active_certificates(thing_name)`: their ids, none for a thing that does not exist).

    Fails closed: a request without a serial, or a lookup that fails, is refused (the hub retries later;
    a takeover is never let through because a lookup failed).
    """
    parameters = hook_input.get("parameters")
    serial = parameters.get(SERIAL_NUMBER_PARAMETER) if isinstance(parameters, Mapping) else None
    if not isinstance(serial, str) or not serial:
        log.warning("takeover guard: refused a request without %s", SERIAL_NUMBER_PARAMETER)
        return {"allowProvisioning": False}
    thing_name = thing_prefix + serial
    try:
        active = active_certificates(thing_name)
    except Exception:
        log.exception("takeover guard: could not read the certificates of thing %s; refusing", thing_name)
        return {"allowProvisioning": False}
    if active:
        log.warning(
            "takeover guard: refused serial %r: thing %s has ACTIVE certificate %s",
            serial,
            thing_name,
            active[0],
        )
        return {"allowProvisioning": False}
    return {"allowProvisioning": True}


def _active_certificates(iot: Any, thing_name: str) -> list[str]:
    """The ids of the ACTIVE certificates attached to `thing_name` (none when the thing does not exist)."""
    active: list[str] = []
    request: dict[str, Any] = {"thingName": thing_name}
    while True:
        try:
            page = iot.list_thing_principals(**request)
        except iot.exceptions.ResourceNotFoundException:
            return active
        for arn in page.get("principals", []):
            if ":cert/" not in arn:
                continue  # an IAM principal or a Cognito identity: not a hub's certificate
            certificate_id = arn.rsplit("/", 1)[1]
            description = iot.describe_certificate(certificateId=certificate_id)["certificateDescription"]
            if description["status"] == CertificateStatus.ACTIVE:
                active.append(certificate_id)
        token = page.get("nextToken")
        if not token:
            return active
        request["nextToken"] = token


def lambda_handler(event: Mapping[str, Any], context: object) -> dict[str, Any]:
    """The pre-provisioning hook as an AWS Lambda function (its role may list and describe certificates)."""
    import boto3

    return takeover_verdict(boto3.client("iot"), event)


class _GuardServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True

    def __init__(self, verdict: Any) -> None:
        self.verdict = verdict
        self.slots = threading.BoundedSemaphore(_MAX_HANDLERS)
        super().__init__(("127.0.0.1", 0), _GuardHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # One thread per request, at most _MAX_HANDLERS of them: a flood is refused, never queued.
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _GuardHandler(BaseHTTPRequestHandler):
    server: _GuardServer
    timeout = _REQUEST_TIMEOUT

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_REQUEST:
            self._answer(413 if length > _MAX_REQUEST else 411, {"message": "bad Content-Length"})
            return
        try:
            hook_input = json.loads(self.rfile.read(length))
        except ValueError:
            self._answer(400, {"message": "the body is not JSON"})
            return
        if not isinstance(hook_input, dict):
            self._answer(400, {"message": "the body is not a JSON object"})
            return
        self._answer(200, self.server.verdict(hook_input))

    def _answer(self, status: int, document: Mapping[str, Any]) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the verdicts are logged; the access log would only repeat them


class TakeoverGuard:
    """`takeover_verdict` served on a loopback port, for iot-core-local (whose hooks may be http:// URLs).

        with TakeoverGuard(iot) as guard:
            set_up_fleet_provisioning(iot, "HubTemplate", hook_url=guard.url)
            ... hubs onboard ...

    The template keeps naming the URL after the guard closes: RegisterThing under it is then refused
    (the hook cannot be reached), never allowed unchecked.
    """

    def __init__(self, iot: Any, thing_prefix: str = THING_PREFIX) -> None:
        self._server = _GuardServer(lambda hook_input: takeover_verdict(iot, hook_input, thing_prefix))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/takeover-guard"
        self._thread = threading.Thread(target=self._server.serve_forever, name="takeover-guard", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> TakeoverGuard:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
