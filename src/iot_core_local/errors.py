"""The one exception tree of iot_core_local.

    IotCoreLocalError
    ├── ServerError                 the server itself cannot run (data dir in use, Mosquitto missing)
    │   └── PortUnavailable         a port it was told to listen on is taken or not allowed
    ├── HookDenied                  the pre-provisioning hook refused, failed or did not answer in time
    ├── InvalidFault (ValueError)   a fault switch spec or body that does not parse (CLI --fault, HTTP)
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
        └── VersionConflict         409 VersionConflictException

The control plane turns a ServiceError into the HTTP answer botocore expects; the gateway turns it
into a `/rejected` payload. Status codes follow botocore's model (`service-2.json`). A throttled
request is answered by the fault switch directly (a `/rejected` 429 ThrottlingException), so no class
stands for it. Exceptions that only carry control flow inside one module (a connection to close, a
transaction to roll back, a policy statement to skip) are private to that module and never leave it.
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


class VersionConflict(ServiceError):
    error_type = "VersionConflictException"
    status = 409
