"""The one exception tree of hub_onboarding, and the FP_STATUS codes of the hub SDK.

    OnboardingError                  exit 1   base; also "something unexpected went wrong"
    ├── ConfigError                  exit 3   iotmi_config.json missing, unreadable or invalid (names the key)
    ├── CredentialError              exit 4   a certificate or key is unreadable, mismatched, expired,
    │                                         encrypted, symlinked or readable by others
    ├── StorageError                 exit 5   writing the config or the credentials failed (disk full,
    │                                         read-only folder); nothing half-written is left behind
    ├── BusyError                    exit 6   another onboarding holds the lock on this config
    └── ProvisioningError            exit 10  the provisioning exchange failed (status FP_STATUS_*)
        ├── MqttConnectionError      exit 11  FP_STATUS_MQTT_CONNECTION_ERROR
        │   └── CertificateRefusedError  exit 11  (the endpoint refused the certificate; final for a claim)
        ├── IdentityError            exit 12  FP_STATUS_IDENTITY_ERROR: the service rejected a request
        │                                     (keeps status_code, error_code, error_message) or answered
        │                                     with something that is not a valid answer
        ├── SubscribeTimeoutError    exit 13  FP_STATUS_SUBSCRIBE_TIMEOUT_ERROR
        └── PublishTimeoutError      exit 14  FP_STATUS_PUBLISH_TIMEOUT_ERROR (includes "no answer in time")

Exit code 0 is success and 2 is a command-line usage error (argparse's convention). Every message says
what to do about it. No message ever contains a private key or a certificate ownership token: they are
built from the service's error fields, paths and key names only.
"""

from __future__ import annotations

import enum
from typing import ClassVar

__all__ = [
    "EXIT_OK",
    "EXIT_USAGE",
    "FP_STATUS_IDENTITY_ERROR",
    "FP_STATUS_MQTT_CONNECTION_ERROR",
    "FP_STATUS_OK",
    "FP_STATUS_PUBLISH_TIMEOUT_ERROR",
    "FP_STATUS_SUBSCRIBE_TIMEOUT_ERROR",
    "BusyError",
    "CertificateRefusedError",
    "ConfigError",
    "CredentialError",
    "FpStatus",
    "IdentityError",
    "MqttConnectionError",
    "OnboardingError",
    "ProvisioningError",
    "PublishTimeoutError",
    "StorageError",
    "SubscribeTimeoutError",
]

EXIT_OK = 0
EXIT_USAGE = 2

# The service's words are shown to the user; cap them so a hostile or broken answer cannot flood a log.
_MAX_SERVICE_TEXT = 512


class FpStatus(enum.IntEnum):
    """The provisioning library's status codes, as the hub SDK names them."""

    FP_STATUS_OK = 0
    FP_STATUS_MQTT_CONNECTION_ERROR = 1
    FP_STATUS_IDENTITY_ERROR = 2
    FP_STATUS_SUBSCRIBE_TIMEOUT_ERROR = 3
    FP_STATUS_PUBLISH_TIMEOUT_ERROR = 4


FP_STATUS_OK = FpStatus.FP_STATUS_OK
FP_STATUS_MQTT_CONNECTION_ERROR = FpStatus.FP_STATUS_MQTT_CONNECTION_ERROR
FP_STATUS_IDENTITY_ERROR = FpStatus.FP_STATUS_IDENTITY_ERROR
FP_STATUS_SUBSCRIBE_TIMEOUT_ERROR = FpStatus.FP_STATUS_SUBSCRIBE_TIMEOUT_ERROR
FP_STATUS_PUBLISH_TIMEOUT_ERROR = FpStatus.FP_STATUS_PUBLISH_TIMEOUT_ERROR


class OnboardingError(Exception):
    """Base of every error hub_onboarding raises on purpose.

    `key` is the config setting the error is about ("ro.iot_claim_pk_path"), when there is one: the
    `--json` output carries it, so a supervisor can point at the entry to fix.
    """

    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.key = key

    def amend(self, message: str, key: str | None = None) -> None:
        """Replace the message (and set the key when given), for a caller that knows more context."""
        self.message = message
        self.args = (message,)
        if key is not None:
            self.key = key

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready description (for `hub-onboard --json`); never contains secrets."""
        data: dict[str, object] = {
            "type": type(self).__name__,
            "message": self.message,
            "exit_code": self.exit_code,
        }
        if self.key is not None:
            data["key"] = self.key
        return data


class ConfigError(OnboardingError):
    """iotmi_config.json is missing, unreadable, not JSON, or a key has a wrong value."""

    exit_code: ClassVar[int] = 3

    def to_dict(self) -> dict[str, object]:
        return {**super().to_dict(), "key": self.key}  # always present, None for the file as a whole


class CredentialError(OnboardingError):
    """A certificate or private key cannot be used as it is.

    `part` says which of a pair the problem is with ("certificate", "private key"; None: the pair, e.g.
    a key that does not belong to its certificate), so the caller can name that file's own setting.
    """

    exit_code: ClassVar[int] = 4

    def __init__(self, message: str, key: str | None = None, *, part: str | None = None) -> None:
        super().__init__(message, key)
        self.part = part


class StorageError(OnboardingError):
    """Writing the config, the credentials or the progress record failed."""

    exit_code: ClassVar[int] = 5


class BusyError(OnboardingError):
    """Another process is onboarding with the same config and did not finish in time."""

    exit_code: ClassVar[int] = 6


class ProvisioningError(OnboardingError):
    """The exchange with AWS IoT Core failed; `status` is the hub SDK's FP_STATUS code."""

    exit_code: ClassVar[int] = 10
    status: ClassVar[FpStatus] = FpStatus.FP_STATUS_MQTT_CONNECTION_ERROR
    # Worth another attempt after a backoff (network trouble, throttling); set per instance.
    retriable: bool = True

    def to_dict(self) -> dict[str, object]:
        return {**super().to_dict(), "status": self.status.name}


class MqttConnectionError(ProvisioningError):
    """Could not connect to the endpoint, or the connection was lost during a request."""

    exit_code: ClassVar[int] = 11
    status: ClassVar[FpStatus] = FpStatus.FP_STATUS_MQTT_CONNECTION_ERROR


class CertificateRefusedError(MqttConnectionError):
    """The endpoint's chain checked out, but it refused the hub's certificate in the TLS handshake.

    Final for the claim certificate (it is what it is until someone registers or activates it); during
    JITR the first attempts are refused by design while the cloud registers and activates the
    certificate, so there it is retried; the verification connect right after RegisterThing retries it
    too (a new certificate may take a moment to be known everywhere)."""

    retriable = False


class SubscribeTimeoutError(ProvisioningError):
    """The subscription to a response topic failed or was not acknowledged in time."""

    exit_code: ClassVar[int] = 13
    status: ClassVar[FpStatus] = FpStatus.FP_STATUS_SUBSCRIBE_TIMEOUT_ERROR


class PublishTimeoutError(ProvisioningError):
    """A request could not be published, or its answer did not come in time."""

    exit_code: ClassVar[int] = 14
    status: ClassVar[FpStatus] = FpStatus.FP_STATUS_PUBLISH_TIMEOUT_ERROR


def _clean(text: object) -> str | None:
    """The service's text as a short printable string (None when absent or not a string)."""
    if not isinstance(text, str):
        return None
    printable = "".join(ch if ch.isprintable() else "?" for ch in text[:_MAX_SERVICE_TEXT])
    return printable + ("..." if len(text) > _MAX_SERVICE_TEXT else "")


REGISTER_THING_OPERATION = "RegisterThing"
INVALID_IDENTITY_CODE = "InvalidIdentity"  # our code for an identity the hub refuses (no service sends it)
_MAX_SHOWN_IDENTITY = 80  # characters of a refused identity shown in the message


# The config key a refusal is about, by errorCode (lowercase), for `--json`'s `error.key`.
_REJECTION_KEYS = {
    "unknownserialnumber": "ro.SN",
    "productcodemismatch": "ro.UPC",
    "alreadyonboarded": "ro.SN",
}

# Managed integrations' refusals at RegisterThing, by errorCode (lowercase): each names the config key or
# the cloud-side step that fixes it. A status code alone would mislead (404 is also "no such template").
_REJECTION_HINTS = {
    "unknownserialnumber": (
        "no managed thing is pre-associated with this hub's serial number: check ro.SN, or create the "
        "managed thing (CreateManagedThing, Role CONTROLLER, AuthenticationMaterial SN:<SN>;UPC:<UPC>) first"
    ),
    "productcodemismatch": (
        "the managed thing of this serial number was created with another product code: check ro.UPC "
        "against its AuthenticationMaterial"
    ),
    "alreadyonboarded": (
        "a hub with this serial number is already onboarded: offboard it (DeleteManagedThing) and create "
        "the managed thing again before onboarding this hub, or check ro.SN"
    ),
}


class IdentityError(ProvisioningError):
    """The service rejected a request (its /rejected answer) or gave an answer that is not valid.

    `status_code`, `error_code` and `error_message` are the service's own words (None when the
    answer had none, e.g. a malformed /accepted payload).
    """

    exit_code: ClassVar[int] = 12
    status: ClassVar[FpStatus] = FpStatus.FP_STATUS_IDENTITY_ERROR

    def __init__(
        self,
        message: str,
        *,
        operation: str,
        status_code: int | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(message, key)
        self.operation = operation
        self.status_code = status_code
        self.error_code = error_code
        self.error_message = error_message
        self.retriable = is_throttling(status_code, error_code) or (
            status_code is not None and status_code >= 500
        )

    @classmethod
    def from_rejection(
        cls, operation: str, status_code: object, error_code: object, error_message: object
    ) -> IdentityError:
        """Build from the fields of a /rejected payload, whatever their types turned out to be."""
        code = status_code if isinstance(status_code, int) and not isinstance(status_code, bool) else None
        err = _clean(error_code)
        msg = _clean(error_message)
        words = f"statusCode={code} errorCode={err} errorMessage={msg!r}"
        by_code = _REJECTION_HINTS.get((err or "").lower())
        key = _REJECTION_KEYS.get((err or "").lower())
        if by_code is not None:
            hint = by_code  # the service said which rule refused the hub: more precise than any status
        elif is_throttling(code, err):
            hint = "the service is throttling requests; retry later"
        elif is_token_refusal(code, err, msg):
            hint = "the certificate ownership token was refused; run provision again to get a new certificate"
        elif code == 403 or (err or "").lower() in ("accessdenied", "access_denied", "accessdeniedexception"):
            key = "ro.SN"  # what a hook judges first: the serial (a takeover guard refuses an onboarded one)
            hint = (
                "the template or its pre-provisioning hook refused this hub; check ro.SN, ro.UPC and "
                "ro.fp_template_parameters and the hook's rules (a takeover guard refuses a serial whose "
                "thing still has an ACTIVE certificate: after a reset, make the old certificate "
                "INACTIVE in the cloud first)"
            )
        elif code == 404 or (err or "").lower().startswith("resourcenotfound"):
            key = "ro.fp_template_name"
            hint = "check fp_template_name: the template does not exist in this account and region"
        else:
            hint = "check the provisioning template, its parameters and the claim certificate's policy"
        return cls(
            f"{operation} was rejected by the service ({words}): {hint}",
            operation=operation,
            status_code=code,
            error_code=err,
            error_message=msg,
            key=key,
        )

    @classmethod
    def malformed(cls, operation: str, what: str) -> IdentityError:
        """The answer arrived but is not what the fleet provisioning API promises."""
        return cls(
            f"{operation} returned an invalid answer ({what}); the endpoint may not be AWS IoT Core "
            "or the template's DeviceConfiguration is wrong",
            operation=operation,
            error_code="InvalidResponse",
        )

    @classmethod
    def invalid_identity(cls, field: str, value: str, why: str) -> IdentityError:
        """RegisterThing's answer names the hub with a value it cannot use (`field`: where in the answer)."""
        shown = repr(value[:_MAX_SHOWN_IDENTITY])
        if len(value) > _MAX_SHOWN_IDENTITY:
            shown += f"... ({len(value)} characters)"
        return cls(
            f"{REGISTER_THING_OPERATION} returned {field} {shown}, which {why}; "
            "nothing was stored: fix the provisioning template (or the service's answer), then provision "
            "again",
            operation=REGISTER_THING_OPERATION,
            error_code=INVALID_IDENTITY_CODE,
        )

    @property
    def invalid_identity_answer(self) -> bool:
        """True when the service's answer named the hub with a client id or managed thing id it cannot use."""
        return self.error_code == INVALID_IDENTITY_CODE and self.status_code is None

    @property
    def token_refused(self) -> bool:
        """True when the service refused the certificate ownership token (spent, expired or unknown)."""
        return is_token_refusal(self.status_code, self.error_code, self.error_message)

    def to_dict(self) -> dict[str, object]:
        return {
            **super().to_dict(),
            "operation": self.operation,
            "status_code": self.status_code,
            "error_code": self.error_code,
            "error_message": self.error_message,
        }


def is_throttling(status_code: int | None, error_code: str | None) -> bool:
    """True for the answers AWS gives when a caller goes too fast."""
    return status_code == 429 or "throttl" in (error_code or "").lower()


TOKEN_ERROR_CODE = "InvalidCertificateOwnershipToken"  # noqa: S105 (an error code, not a secret)


def is_token_refusal(status_code: int | None, error_code: str | None, error_message: str | None) -> bool:
    """True when a rejection says the certificate ownership token was refused.

    Any 4xx answer (AWS documents the error code; iot-core-local sends 400 and the word "token" in its
    message) whose errorCode is InvalidCertificateOwnershipToken or whose errorMessage mentions the token.
    Throttling is never a refusal, even if its message mentions a token bucket: it is worth a retry.
    """
    if status_code is None or not 400 <= status_code < 500 or is_throttling(status_code, error_code):
        return False
    return error_code == TOKEN_ERROR_CODE or "token" in (error_message or "").lower()
