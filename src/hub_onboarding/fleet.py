"""FleetProvisioning: the fleet provisioning MQTT API over awscrt's IotIdentityClientV2.

CreateKeysAndCertificate (AWS makes the key) or CreateCertificateFromCsr (the hub makes an EC P-256 key
that never leaves it), then RegisterThing. The V2 request-response client subscribes to `/accepted` and
`/rejected` before it publishes and correlates the answer; each request is bounded by
`operation_timeout` inside awscrt and, as a second guard, by waiting on its future with a deadline.

Every failure becomes a ProvisioningError (`map_request_error`, pure): a `/rejected` answer keeps the
service's statusCode, errorCode and errorMessage in an IdentityError; an answer that is not valid is an
IdentityError too; timeouts and lost connections map to their FP_STATUS codes. No message or log line
contains the private key or the ownership token.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import re
import threading
import time
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from hub_onboarding.certs import Credentials, certificate_id, check_pair, load_certificate
from hub_onboarding.config import DEVICE_CONFIG_CLIENT_ID, DEVICE_CONFIG_MANAGED_THING_ID
from hub_onboarding.errors import (
    CredentialError,
    IdentityError,
    MqttConnectionError,
    ProvisioningError,
    PublishTimeoutError,
    SubscribeTimeoutError,
)

log = logging.getLogger(__name__)

CREATE_KEYS_AND_CERTIFICATE = "CreateKeysAndCertificate"
CREATE_CERTIFICATE_FROM_CSR = "CreateCertificateFromCsr"
REGISTER_THING = "RegisterThing"
_MAX_PEM_CHARS = 64 * 1024
_MAX_TOKEN_CHARS = 16 * 1024
# Extra time on top of awscrt's own operation timeout before we stop waiting for its future.
_FUTURE_GRACE = 5.0
# How often a waiting request checks whether its connection dropped.
_LOST_POLL = 0.05
MAX_CLIENT_ID_BYTES = 128  # AWS IoT Core's limit on an MQTT client id
# The iot-managed-integrations model's pattern for a managed thing id.
MANAGED_THING_ID_PATTERN = re.compile(r"[a-zA-Z0-9:_-]{1,64}")

_CONNECTION_ERRORS = {
    "AWS_ERROR_MQTT_REQUEST_RESPONSE_CLIENT_SHUT_DOWN",
    "AWS_ERROR_MQTT5_OPERATION_FAILED_DUE_TO_OFFLINE_QUEUE_POLICY",
    "AWS_ERROR_MQTT5_CLIENT_TERMINATED",
    "AWS_ERROR_MQTT5_DISCONNECT_RECEIVED",
}


@dataclass(frozen=True)
class IssuedCertificate:
    """A new certificate, its key, and the single-use token that RegisterThing needs."""

    credentials: Credentials
    certificate_id: str
    ownership_token: str = field(repr=False)


@dataclass(frozen=True)
class RegisteredThing:
    thing_name: str
    device_configuration: Mapping[str, str]


class FleetApi(Protocol):
    """The fleet provisioning MQTT API as onboarding uses it: FleetProvisioning, or a test's fake cloud."""

    def create_keys_and_certificate(self) -> IssuedCertificate: ...

    def create_certificate_from_csr(self, csr_pem: bytes, private_key_pem: bytes) -> IssuedCertificate: ...

    def register_thing(
        self, template_name: str, ownership_token: str, parameters: Mapping[str, str]
    ) -> RegisteredThing: ...


_RESPONSE_TOPICS = {
    CREATE_KEYS_AND_CERTIFICATE: "$aws/certificates/create/json",
    CREATE_CERTIFICATE_FROM_CSR: "$aws/certificates/create-from-csr/json",
}


def refused_subscription(operation: str, template_name: str | None) -> SubscribeTimeoutError:
    """The final error for a SUBSCRIBE the endpoint refused: which topics, which template, what to check."""
    template = template_name or "<fp_template_name>"
    provision = f"$aws/provisioning-templates/{template}/provision/json"
    topics = _RESPONSE_TOPICS.get(operation, provision)
    error = SubscribeTimeoutError(
        f"{operation}: the endpoint refused the subscription to {topics}/accepted and /rejected "
        f"(template {template!r}, fp_template_name): check that this template exists in the account and "
        f"region, and that the claim certificate's policy allows iot:Subscribe and iot:Receive on "
        f"{provision}/* and $aws/certificates/create*/json/*"
    )
    error.retriable = False  # an authorization answer: the same subscription is refused again
    return error


def map_request_error(
    exc: BaseException, operation: str, timeout: float, template_name: str | None = None
) -> ProvisioningError:
    """Turn what an IotIdentityClientV2 future raised into one of our typed errors (pure).

    `template_name` (fp_template_name) is named when the endpoint refuses a subscription."""
    if isinstance(exc, ProvisioningError):
        return exc
    if isinstance(exc, concurrent.futures.TimeoutError | TimeoutError):
        return PublishTimeoutError(
            f"{operation}: no answer within {timeout:g} s; the endpoint may be "
            "overloaded or the connection stalled; try again"
        )
    modeled = getattr(exc, "modeled_error", None)
    if modeled is not None:
        return IdentityError.from_rejection(
            operation,
            getattr(modeled, "status_code", None),
            getattr(modeled, "error_code", None),
            getattr(modeled, "error_message", None),
        )
    inner = getattr(exc, "inner_error", None) or exc
    name = getattr(inner, "name", None)
    if name == "AWS_ERROR_MQTT_REQUEST_RESPONSE_SUBSCRIBE_FAILURE":
        # The broker refused the SUBSCRIBE (a SUBACK failure). A silent broker shows up as a request
        # timeout instead.
        return refused_subscription(operation, template_name)
    if name in ("AWS_ERROR_MQTT_REQUEST_RESPONSE_TIMEOUT", "AWS_ERROR_MQTT_TIMEOUT"):
        return PublishTimeoutError(f"{operation}: no answer within {timeout:g} s; try again")
    if name == "AWS_ERROR_MQTT_REQUEST_RESPONSE_PUBLISH_FAILURE":
        # The broker refused the PUBLISH (a PUBACK failure, e.g. not authorized): like a refused
        # subscription, the same request will be refused again, so it is not retried.
        refused = PublishTimeoutError(
            f"{operation}: the request could not be published; check that the claim certificate's policy "
            "allows iot:Publish on the provisioning topics"
        )
        refused.retriable = False
        return refused
    if name in _CONNECTION_ERRORS or (
        isinstance(name, str) and name.startswith(("AWS_IO_", "AWS_ERROR_MQTT5"))
    ):
        return MqttConnectionError(
            f"{operation}: the connection was lost during the request ({name}); check the network and retry"
        )
    # The answer came but could not be decoded (not JSON, not an object...): the type of the problem
    # only, never the payload itself, which may hold a private key.
    what = f"{name}" if isinstance(name, str) else type(inner).__name__
    return IdentityError.malformed(operation, f"could not decode it: {what}")


def _text(value: object, operation: str, field_name: str, limit: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise IdentityError.malformed(operation, f"{field_name} is missing or not a string")
    if len(value) > limit:
        raise IdentityError.malformed(operation, f"{field_name} is longer than {limit} characters")
    return value


def validate_issued(
    operation: str, response: Any, private_key_pem: bytes | None = None, csr_pem: bytes | None = None
) -> IssuedCertificate:
    """Check an /accepted answer of CreateKeysAndCertificate or CreateCertificateFromCsr (pure).

    An empty `private_key_pem` with `csr_pem`: the key is in a token, so the certificate must carry the
    CSR's public key (the token signed the CSR; the returned Credentials hold no key)."""
    cert_pem = _text(getattr(response, "certificate_pem", None), operation, "certificatePem", _MAX_PEM_CHARS)
    token = _text(
        getattr(response, "certificate_ownership_token", None),
        operation,
        "certificateOwnershipToken",
        _MAX_TOKEN_CHARS,
    )
    cert_id = getattr(response, "certificate_id", None)
    if private_key_pem is None:
        private_key_pem = _text(
            getattr(response, "private_key", None), operation, "privateKey", _MAX_PEM_CHARS
        ).encode()
    try:
        if not private_key_pem and csr_pem is not None:
            creds = _check_against_csr(cert_pem.encode(), csr_pem)
        else:
            creds = check_pair(cert_pem.encode(), private_key_pem, "new", check_validity=False)
    except CredentialError as exc:
        raise IdentityError.malformed(operation, exc.message) from None
    if cert_id != creds.certificate_id:
        # AWS's id is the SHA-256 of the DER; we trust what we can compute.
        log.warning(
            "%s: certificateId %r differs from the certificate's SHA-256 %s",
            operation,
            cert_id if isinstance(cert_id, str) else None,
            creds.certificate_id,
        )
    return IssuedCertificate(creds, creds.certificate_id, token)


def _check_against_csr(cert_pem: bytes, csr_pem: bytes) -> Credentials:
    """The issued certificate must be for the CSR's key (a key in a token cannot be compared itself)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = load_certificate(cert_pem, "new certificate")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    csr_key = x509.load_pem_x509_csr(csr_pem).public_key().public_bytes(*spki)
    if cert.public_key().public_bytes(*spki) != csr_key:
        raise CredentialError("the certificate is not for the key the CSR named")
    return Credentials(cert_pem, b"", certificate_id(cert))


def validate_registered(response: Any) -> RegisteredThing:
    """Check RegisterThing's /accepted answer (pure)."""
    thing = _text(getattr(response, "thing_name", None), REGISTER_THING, "thingName", 128)
    config = getattr(response, "device_configuration", None)
    if config is None:
        config = {}
    if not isinstance(config, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in config.items()
    ):
        raise IdentityError.malformed(REGISTER_THING, "deviceConfiguration is not an object of strings")
    check_identity(config, thing)
    return RegisteredThing(thing, dict(config))


def client_id_problem(client_id: str) -> str | None:
    """Why `client_id` cannot be an MQTT client id at AWS IoT Core, or None (pure)."""
    if not client_id:
        return "is empty"
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in client_id):
        # MQTT's UTF-8 strings exclude control characters, and a lone surrogate is not UTF-8 at all.
        return "holds control characters or is not UTF-8"
    if len(client_id.encode()) > MAX_CLIENT_ID_BYTES:
        return f"is longer than AWS IoT Core's {MAX_CLIENT_ID_BYTES} bytes"
    return None


def check_identity(device_configuration: Mapping[str, str], thing_name: str | None = None) -> None:
    """Refuse a ClientId or ManagedThingId the hub would store but could not use (pure); without a
    ClientId the hub connects as `thing_name`, which must then be a client id.

    Checked before anything of RegisterThing's answer is stored: the caller then discards what it wrote.
    """
    client_id = device_configuration.get(DEVICE_CONFIG_CLIENT_ID)
    field = f"deviceConfiguration.{DEVICE_CONFIG_CLIENT_ID}"
    if client_id is None and thing_name is not None:
        client_id, field = thing_name, "thingName (the client id: there is no ClientId)"
    if client_id is not None and (why := client_id_problem(client_id)) is not None:
        raise IdentityError.invalid_identity(field, client_id, why)
    managed = device_configuration.get(DEVICE_CONFIG_MANAGED_THING_ID)
    if managed is not None and not MANAGED_THING_ID_PATTERN.fullmatch(managed):
        why = "is not 1-64 of [a-zA-Z0-9:_-] (the iot-managed-integrations model's ManagedThingId)"
        raise IdentityError.invalid_identity(
            f"deviceConfiguration.{DEVICE_CONFIG_MANAGED_THING_ID}", managed, why
        )


class FleetProvisioning:
    """CreateKeysAndCertificate / CreateCertificateFromCsr and RegisterThing on one connected client."""

    def __init__(
        self,
        mqtt5_client: Any,
        operation_timeout: float = 30.0,
        *,
        lost: threading.Event | None = None,
        template_name: str | None = None,
    ) -> None:
        from awscrt import mqtt_request_response
        from awsiot import iotidentity

        self._iotidentity = iotidentity
        self._timeout = operation_timeout
        self._template_name = template_name  # named in a refused subscription's message
        # Set by the connection when it drops: awscrt would otherwise keep the request queued until its
        # operation timeout and then report a subscribe failure, which is not what happened.
        self._lost = lost
        options = mqtt_request_response.ClientOptions(
            # one request at a time, each needing its /accepted and /rejected subscriptions
            max_request_response_subscriptions=2,
            max_streaming_subscriptions=0,
            operation_timeout_in_seconds=max(1, math.ceil(operation_timeout)),
        )
        self._client = iotidentity.IotIdentityClientV2(mqtt5_client, options)

    def _wait(
        self, future: concurrent.futures.Future[Any], operation: str, template_name: str | None = None
    ) -> Any:
        deadline = time.monotonic() + self._timeout + _FUTURE_GRACE
        while self._lost is not None and not future.done():
            if self._lost.is_set():
                raise self._connection_lost(operation)
            if time.monotonic() >= deadline:
                break
            concurrent.futures.wait([future], timeout=_LOST_POLL)
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except Exception as exc:
            if self._lost is not None and self._lost.is_set():
                raise self._connection_lost(operation) from None
            raise map_request_error(
                exc, operation, self._timeout, template_name or self._template_name
            ) from None

    @staticmethod
    def _connection_lost(operation: str) -> MqttConnectionError:
        return MqttConnectionError(
            f"{operation}: the connection was lost during the request; check the network and retry"
        )

    def create_keys_and_certificate(self) -> IssuedCertificate:
        log.debug("requesting %s", CREATE_KEYS_AND_CERTIFICATE)
        try:
            future = self._client.create_keys_and_certificate(
                self._iotidentity.CreateKeysAndCertificateRequest()
            )
        except Exception as exc:
            raise map_request_error(
                exc, CREATE_KEYS_AND_CERTIFICATE, self._timeout, self._template_name
            ) from None
        return validate_issued(CREATE_KEYS_AND_CERTIFICATE, self._wait(future, CREATE_KEYS_AND_CERTIFICATE))

    def create_certificate_from_csr(self, csr_pem: bytes, private_key_pem: bytes) -> IssuedCertificate:
        log.debug("requesting %s", CREATE_CERTIFICATE_FROM_CSR)
        try:
            future = self._client.create_certificate_from_csr(
                self._iotidentity.CreateCertificateFromCsrRequest(
                    certificate_signing_request=csr_pem.decode()
                )
            )
        except Exception as exc:
            raise map_request_error(
                exc, CREATE_CERTIFICATE_FROM_CSR, self._timeout, self._template_name
            ) from None
        return validate_issued(
            CREATE_CERTIFICATE_FROM_CSR,
            self._wait(future, CREATE_CERTIFICATE_FROM_CSR),
            private_key_pem,
            csr_pem,
        )

    def register_thing(
        self, template_name: str, ownership_token: str, parameters: Mapping[str, str]
    ) -> RegisteredThing:
        log.debug(
            "requesting %s with template %r and parameters %s",
            REGISTER_THING,
            template_name,
            sorted(parameters),
        )
        try:
            future = self._client.register_thing(
                self._iotidentity.RegisterThingRequest(
                    template_name=template_name,
                    certificate_ownership_token=ownership_token,
                    parameters=dict(parameters),
                )
            )
        except Exception as exc:
            raise map_request_error(exc, REGISTER_THING, self._timeout, template_name) from None
        return validate_registered(self._wait(future, REGISTER_THING, template_name))
