"""The one exception tree of iot_core_local.

    IotCoreLocalError
    ├── ServerError                 the server itself cannot run (data dir in use, Mosquitto missing)
    │   └── PortUnavailable         a port it was told to listen on is taken or not allowed
    ├── HookDenied                  the pre-provisioning hook refused, failed or did not answer in time
    ├── InvalidFault (ValueError)   a fault switch spec or body that does not parse (CLI --fault, HTTP)
    ├── InvalidQuota (ValueError)   a quota spec that does not parse (CLI --quota, Quotas(...))
    └── ServiceError                an API answer AWS would give; carries the AWS error type and status
        ├── InvalidRequest          400 InvalidRequestException
        │   ├── MalformedPolicy     400 MalformedPolicyException (CreatePolicy)
        │   ├── TemplateError       400 a template body is wrong (CreateProvisioningTemplate)
        │   └── TemplateEvaluationError
        │                           400 a valid template cannot be evaluated with these values
        │                               (RegisterThing, JITP); answered as InvalidParameters
        ├── RegistrationCodeValidation 400 RegistrationCodeValidationException (RegisterCACertificate)
        ├── CertificateValidation   400 CertificateValidationException
        ├── ResourceNotFound        404 ResourceNotFoundException
        ├── UnknownOperation        404 UnknownOperationException (no operation has this method and path)
        ├── CertificateState        406 CertificateStateException
        ├── ResourceAlreadyExists   409 ResourceAlreadyExistsException (with resourceId, resourceArn)
        ├── DeleteConflict          409 DeleteConflictException
        ├── VersionConflict         409 VersionConflictException
        ├── ManagedIntegrationsError    managed integrations' errors (member `Message`):
        │   ├── Validation              400 ValidationException (bad input)
        │   ├── Conflict                409 ConflictException (a duplicate name or serial)
        │   └── ManagedResourceNotFound 404 ResourceNotFoundException with ResourceId, ResourceType
        ├── Throttling              429 ThrottlingException (a request over its rate, quotas.py)
        └── AuthenticationFailure   403 the request's SigV4 signature is missing or wrong:
            ├── MissingAuthenticationToken  403 MissingAuthenticationTokenException (unsigned)
            ├── UnrecognizedClient  403 UnrecognizedClientException (an access key not ours)
            └── InvalidSignature    403 InvalidSignatureException (wrong, stale or malformed)

The control plane turns a ServiceError into the HTTP answer botocore expects; the gateway turns it
into a `/rejected` payload. Status codes follow botocore's model (`service-2.json`), except
ThrottlingException: the model says 400, AWS IoT answers 429 (botocore retries either by its code).
Exceptions that only carry control flow inside one module (a connection to close, a transaction to
roll back, a policy statement to skip) are private to that module and never leave it.
"""

from __future__ import annotations


class IotCoreLocalError(Exception):
    """Base of every error raised by iot_core_local."""


class ServerError(IotCoreLocalError):
    """The server cannot start or keep running (not a client's fault)."""


class PortUnavailable(ServerError):
    """A port (MQTT, ALPN MQTT or API) the server was told to listen on is in use, or needs privileges.

    `service` is "mqtt", "alpn" (the MQTT port for ALPN clients) or "api", so a front end can name its
    own option for that port.
    """

    def __init__(self, service: str, host: str, port: int, problem: str) -> None:
        what = {"mqtt": "MQTT", "alpn": "ALPN MQTT"}.get(service, "API")
        super().__init__(f"the {what} port {port} on {host} {problem}")
        self.service = service
        self.host = host
        self.port = port


class HookDenied(IotCoreLocalError):
    """The pre-provisioning hook refused, timed out, failed, or answered something that is not a verdict."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidFault(IotCoreLocalError, ValueError):
    """A fault for the fault switch that does not parse; a ValueError, as callers of `faults` expect."""


class InvalidQuota(IotCoreLocalError, ValueError):
    """A quota that does not parse or makes no sense (a rate that is not a positive number)."""


class ServiceError(IotCoreLocalError):
    """An error answer of the AWS IoT API, as botocore's model names it."""

    error_type = "InternalFailureException"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, str]:
        """The JSON body of the HTTP error answer (rest-json protocol)."""
        return {"message": self.message}


class InvalidRequest(ServiceError):
    error_type = "InvalidRequestException"
    status = 400


class MalformedPolicy(InvalidRequest):
    """CreatePolicy's answer to a bad document (botocore: MalformedPolicyException, 400)."""

    error_type = "MalformedPolicyException"
    status = 400


class TemplateError(InvalidRequest):
    """The template body is wrong (CreateProvisioningTemplate answers 400)."""


class TemplateEvaluationError(InvalidRequest):
    """The template cannot be evaluated with these values (RegisterThing answers /rejected, 400)."""


class RegistrationCodeValidation(ServiceError):
    """RegisterCACertificate: the verification certificate does not carry the registration code."""

    error_type = "RegistrationCodeValidationException"
    status = 400


class UnknownOperation(ServiceError):
    """No operation of the model has this method and path."""

    error_type = "UnknownOperationException"
    status = 404


class CertificateValidation(ServiceError):
    error_type = "CertificateValidationException"
    status = 400


class ResourceNotFound(ServiceError):
    error_type = "ResourceNotFoundException"
    status = 404


class CertificateState(ServiceError):
    error_type = "CertificateStateException"
    status = 406


class ResourceAlreadyExists(ServiceError):
    error_type = "ResourceAlreadyExistsException"
    status = 409

    def __init__(self, message: str, resource_id: str | None = None, resource_arn: str | None = None) -> None:
        super().__init__(message)
        self.resource_id = resource_id
        self.resource_arn = resource_arn

    def body(self) -> dict[str, str]:
        body = super().body()
        if self.resource_id is not None:
            body["resourceId"] = self.resource_id
        if self.resource_arn is not None:
            body["resourceArn"] = self.resource_arn
        return body


class DeleteConflict(ServiceError):
    error_type = "DeleteConflictException"
    status = 409


class VersionsLimitExceeded(ServiceError):
    """CreatePolicyVersion on a policy with five versions (AWS's limit)."""

    error_type = "VersionsLimitExceededException"
    status = 409


class VersionConflict(ServiceError):
    error_type = "VersionConflictException"
    status = 409


class ManagedIntegrationsError(ServiceError):
    """Managed integrations' errors: its model spells the member `Message`, AWS IoT's `message`."""

    def body(self) -> dict[str, str]:
        return {"Message": self.message}


class Validation(ManagedIntegrationsError):
    """Managed integrations' answer to bad input (its model says ValidationException, not AWS IoT's
    InvalidRequestException)."""

    error_type = "ValidationException"
    status = 400


class Conflict(ManagedIntegrationsError):
    """Managed integrations: the request conflicts with what exists (a profile name, a hub's serial)."""

    error_type = "ConflictException"
    status = 409


class ManagedResourceNotFound(ManagedIntegrationsError):
    """Managed integrations' ResourceNotFoundException, which names the resource's id and type."""

    error_type = "ResourceNotFoundException"
    status = 404

    def __init__(self, message: str, resource_id: str, resource_type: str) -> None:
        super().__init__(message)
        self.resource_id = resource_id
        self.resource_type = resource_type

    def body(self) -> dict[str, str]:
        return {**super().body(), "ResourceId": self.resource_id, "ResourceType": self.resource_type}


class Throttling(ServiceError):
    """A request over its operation's rate for the account (quotas.py)."""

    error_type = "ThrottlingException"
    status = 429


class AuthenticationFailure(ServiceError):
    """The control plane requires a valid SigV4 signature and this request has none."""

    error_type = "AccessDeniedException"
    status = 403


class MissingAuthenticationToken(AuthenticationFailure):
    error_type = "MissingAuthenticationTokenException"


class UnrecognizedClient(AuthenticationFailure):
    error_type = "UnrecognizedClientException"


class InvalidSignature(AuthenticationFailure):
    error_type = "InvalidSignatureException"
