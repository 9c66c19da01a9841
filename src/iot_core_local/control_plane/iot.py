"""The AWS IoT operations the stand-in answers, as handlers of the rest-json machinery.

Each handler gets the `IotBackend` (registry, CA, endpoint, claim lifetime) and the request's parameters,
parsed and validated against botocore's model of AWS IoT (`botocore/data/iot/2015-05-28/service-2.json`);
it returns the output members by name. `service()` binds them to that model; any other operation of the
model is answered "not supported".
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from iot_core_local.ca import CertificateAuthority, certificate_id, load_certificate, load_csr
from iot_core_local.control_plane.restjson import Cursor, HandlerTable, Pager, RestJsonService, SortKey
from iot_core_local.errors import (
    CertificateState,
    CertificateValidation,
    DeleteConflict,
    InvalidRequest,
    RegistrationCodeValidation,
    ResourceNotFound,
)
from iot_core_local.model import (
    CACertificate,
    CaStatus,
    Certificate,
    CertificateStatus,
    Policy,
    ProvisioningTemplate,
    Thing,
)
from iot_core_local.registry import ACCOUNT_ID, Registry, certificate_id_from_arn
from iot_core_local.templates import validate_template  # raises TemplateError, an InvalidRequest

__all__ = ["CLAIM_TTL", "HOOK_PAYLOAD_VERSION", "SUPPORTED_OPERATIONS", "IotBackend", "service"]


CLAIM_TTL = 300.0  # CreateProvisioningClaim: AWS's temporary claim certificates last five minutes
HOOK_PAYLOAD_VERSION = "2020-04-01"


@dataclass(frozen=True)
class IotBackend:
    """What the AWS IoT handlers work on."""

    registry: Registry
    ca: CertificateAuthority
    endpoint_address: Callable[[], str]  # DescribeEndpoint's answer, read when asked
    claim_ttl: float = CLAIM_TTL


# AWS IoT's list operations name their page size pageSize or maxResults, their position marker or nextToken.
_PAGER = Pager(size_params=("pageSize", "maxResults"), token_params=("marker", "nextToken"))


T = TypeVar("T")


def _page(
    items: list[T],
    params: Mapping[str, Any],
    operation: str,
    key: Callable[[T], SortKey],
    *,
    descending: bool = False,
) -> tuple[list[T], str | None]:
    return _PAGER.page(items, params, operation, key, descending=descending)


# The sort keys pages resume after, in the order the registry lists: by name, or by creation then id.
def _by_name(item: Policy | Thing) -> SortKey:
    return (item.name,)


def _by_value(item: str) -> SortKey:
    return (item,)


def _by_creation(item: Certificate | CACertificate) -> SortKey:
    return (item.created, item.certificate_id)


def _ordered(items: list[Any], params: Mapping[str, Any]) -> list[Any]:
    # The registry lists oldest first; AWS lists newest first unless isAscendingOrder=true.
    return items if params.get("ascendingOrder") else list(reversed(items))


# ---- views of registry values -------------------------------------------------------------------


def _validity(pem: str) -> dict[str, float]:
    cert = load_certificate(pem)
    return {
        "notBefore": cert.not_valid_before_utc.timestamp(),
        "notAfter": cert.not_valid_after_utc.timestamp(),
    }


def _certificate_description(cert: Certificate) -> dict[str, Any]:
    return {
        "certificateArn": cert.arn,
        "certificateId": cert.certificate_id,
        "caCertificateId": cert.ca_certificate_id,
        "status": cert.status,
        "certificatePem": cert.pem,
        "ownedBy": ACCOUNT_ID,
        "creationDate": cert.created,
        "lastModifiedDate": cert.last_modified,
        "customerVersion": cert.customer_version,
        "transferData": {},
        "generationId": cert.generation_id,
        "validity": _validity(cert.pem),
        "certificateMode": cert.mode,
    }


def _certificate_summary(cert: Certificate) -> dict[str, Any]:
    return {
        "certificateArn": cert.arn,
        "certificateId": cert.certificate_id,
        "status": cert.status,
        "certificateMode": cert.mode,
        "creationDate": cert.created,
    }


def _ca_description(ca: CACertificate) -> dict[str, Any]:
    return {
        "certificateArn": ca.arn,
        "certificateId": ca.certificate_id,
        "status": ca.status,
        "certificatePem": ca.pem,
        "ownedBy": ACCOUNT_ID,
        "creationDate": ca.created,
        "autoRegistrationStatus": "ENABLE" if ca.auto_registration else "DISABLE",
        "lastModifiedDate": ca.last_modified,
        "customerVersion": ca.customer_version,
        "generationId": ca.generation_id,
        "validity": _validity(ca.pem),
        "certificateMode": ca.mode,
    }


def _policy_summary(policy: Policy) -> dict[str, str]:
    return {"policyName": policy.name, "policyArn": policy.arn}


def _thing_summary(thing: Thing) -> dict[str, Any]:
    return {
        "thingName": thing.name,
        "thingTypeName": thing.thing_type_name,
        "thingArn": thing.arn,
        "attributes": thing.attributes,
        "version": thing.version,
    }


def _template_summary(template: ProvisioningTemplate) -> dict[str, Any]:
    return {
        "templateArn": template.arn,
        "templateName": template.name,
        "description": template.description,
        "creationDate": template.created,
        "lastModifiedDate": template.last_modified,
        "enabled": template.enabled,
        "type": template.template_type,
    }


def _public_key_pem(cert_pem: str) -> str:
    key = load_certificate(cert_pem).public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def _check_validity(cert: x509.Certificate, what: str) -> None:
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc < now:
        raise CertificateValidation(f"The {what} expired on {cert.not_valid_after_utc.isoformat()}")
    if cert.not_valid_before_utc > now:
        raise CertificateValidation(f"The {what} is not valid before {cert.not_valid_before_utc.isoformat()}")


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _hook(value: Mapping[str, Any] | None, template_type: str) -> dict[str, str] | None:
    if value is None:
        return None
    if template_type != "FLEET_PROVISIONING":
        raise InvalidRequest("preProvisioningHook is only supported by FLEET_PROVISIONING templates")
    version = value.get("payloadVersion", HOOK_PAYLOAD_VERSION)
    if version != HOOK_PAYLOAD_VERSION:
        raise InvalidRequest(
            f"preProvisioningHook.payloadVersion must be {HOOK_PAYLOAD_VERSION}, not {version!r}"
        )
    return {"targetArn": value["targetArn"], "payloadVersion": version}


# ---- operations ---------------------------------------------------------------------------------

_HANDLERS: HandlerTable[IotBackend] = HandlerTable()
_operation = _HANDLERS.operation


def _initial_status(params: Mapping[str, Any]) -> str:
    return CertificateStatus.ACTIVE if params.get("setAsActive") else CertificateStatus.INACTIVE


# certificates


@_operation("CreateKeysAndCertificate")
def _create_keys_and_certificate(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    cert_pem, key_pem = backend.ca.create_keys_and_certificate()
    cert = backend.registry.add_certificate(
        cert_pem, _initial_status(params), ca_certificate_id=backend.ca.issuing_ca_id
    )
    return {
        "certificateArn": cert.arn,
        "certificateId": cert.certificate_id,
        "certificatePem": cert.pem,
        "keyPair": {"PublicKey": _public_key_pem(cert_pem), "PrivateKey": key_pem},
    }


@_operation("CreateCertificateFromCsr")
def _create_certificate_from_csr(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    csr = load_csr(params["certificateSigningRequest"])
    issued = backend.ca.sign_csr(csr)
    pem = issued.public_bytes(serialization.Encoding.PEM).decode()
    # The issuing CA's id, as the MQTT provisioning API records it: ListCertificatesByCA finds both.
    cert = backend.registry.add_certificate(
        pem, _initial_status(params), ca_certificate_id=backend.ca.issuing_ca_id
    )
    return {"certificateArn": cert.arn, "certificateId": cert.certificate_id, "certificatePem": cert.pem}


_REGISTER_STATUSES = (CertificateStatus.ACTIVE, CertificateStatus.INACTIVE, CertificateStatus.REVOKED)


def _register_status(params: Mapping[str, Any]) -> str:
    status = params.get("status")
    if status is None:
        return _initial_status(params)
    if status not in _REGISTER_STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(_REGISTER_STATUSES)}, not {status!r}")
    return str(status)


@_operation("RegisterCertificate")
def _register_certificate(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    cert = load_certificate(params["certificatePem"])
    _check_validity(cert, "certificate")
    status = _register_status(params)
    ca: CACertificate | None
    if params.get("caCertificatePem"):
        ca_cert = load_certificate(params["caCertificatePem"])
        ca = backend.registry.find_ca_certificate(certificate_id(ca_cert))
        if ca is None:
            raise CertificateValidation("The CA certificate in caCertificatePem is not registered")
        if not _signed_by(cert, ca_cert):
            raise CertificateValidation(
                "The certificate is not signed by the CA certificate in caCertificatePem"
            )
    else:
        ca = backend.registry.find_ca_for(cert)
        if ca is None:
            raise CertificateValidation(
                "The certificate is not signed by a registered CA certificate: register its CA first "
                "(RegisterCACertificate) or use RegisterCertificateWithoutCA"
            )
    if status == CertificateStatus.ACTIVE and ca.status != CaStatus.ACTIVE:
        raise CertificateState(f"The CA certificate {ca.certificate_id} is {ca.status}; activate it first")
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    added = backend.registry.add_certificate(pem, status, ca_certificate_id=ca.certificate_id, mode=ca.mode)
    return {"certificateArn": added.arn, "certificateId": added.certificate_id}


@_operation("RegisterCertificateWithoutCA")
def _register_certificate_without_ca(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    cert = load_certificate(params["certificatePem"])
    _check_validity(cert, "certificate")
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    added = backend.registry.add_certificate(pem, _register_status(params), mode="SNI_ONLY")
    return {"certificateArn": added.arn, "certificateId": added.certificate_id}


@_operation("DescribeCertificate")
def _describe_certificate(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    cert = backend.registry.get_certificate(params["certificateId"])
    return {"certificateDescription": _certificate_description(cert)}


_INTERNAL_STATUSES = (
    CertificateStatus.PENDING_TRANSFER,
    CertificateStatus.PENDING_ACTIVATION,
    CertificateStatus.REGISTER_INACTIVE,
)


@_operation("UpdateCertificate")
def _update_certificate(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    status = params["newStatus"]
    if status in _INTERNAL_STATUSES:
        raise InvalidRequest(f"newStatus {status} is used internally by AWS IoT and cannot be set")
    # Through the registry, so its listeners fire: the gateway disconnects a certificate leaving ACTIVE.
    backend.registry.set_certificate_status(params["certificateId"], status)
    return {}


@_operation("ListCertificates")
@_operation("ListCertificatesByCA")
def _list_certificates(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    # Paged in SQL, PEMs left out: a page costs its own rows, not the whole table's.
    operation = "ListCertificatesByCA" if "caCertificateId" in params else "ListCertificates"
    ascending = bool(params.get("ascendingOrder"))
    size = _PAGER.size(params)
    cursor = _PAGER.cursor(params, operation)

    def rows(offset: int, limit: int) -> list[Certificate]:
        return backend.registry.list_certificates(
            params.get("caCertificateId"), ascending=ascending, offset=offset, limit=limit, with_pem=False
        )

    start = 0 if cursor is None else _resume_offset(rows, cursor, descending=not ascending)
    certs = rows(start, size + 1)
    marker = None
    if len(certs) > size:
        marker = _PAGER.token(params, operation, _by_creation(certs[size - 1]), start + size)
    return {"certificates": [_certificate_summary(c) for c in certs[:size]], "nextMarker": marker}


def _resume_offset(rows: Callable[[int, int], list[Certificate]], cursor: Cursor, *, descending: bool) -> int:
    """The SQL offset of the first certificate after `cursor.last`, read a row or two at a time.

    Nothing changed since the token (the usual case): the last certificate is still at the token's
    position - 1, one query. Else a binary search over the offsets: certificates deleted or created before
    the resume point move it, and the page must neither skip nor repeat one.
    """
    hint = cursor.position - 1
    if hint >= 0:
        found = rows(hint, 1)
        if found and _by_creation(found[0]) == cursor.last:
            return hint + 1

    def after(offset: int) -> bool:  # whether the row at `offset` (if any) comes after the cursor
        found = rows(offset, 1)
        if not found:
            return True
        key = _by_creation(found[0])
        return key <= cursor.last if descending else key >= cursor.last

    low, high = 0, 1
    while not after(high - 1):  # gallop to a bound, then bisect: O(log n) one-row queries
        low, high = high, high * 2
    while low < high:
        middle = (low + high) // 2
        if after(middle):
            high = middle
        else:
            low = middle + 1
    found = rows(low, 1)
    return low + 1 if found and _by_creation(found[0]) == cursor.last else low


@_operation("DeleteCertificate")
def _delete_certificate(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    backend.registry.delete_certificate(params["certificateId"], force=bool(params.get("forceDelete")))
    return {}


# CA certificates


def _registration_config(backend: IotBackend, value: Mapping[str, Any] | None) -> dict[str, str] | None:
    if value is None:
        return None
    config = {k: str(v) for k, v in value.items() if v is not None}
    if "templateName" in config:
        template = backend.registry.get_template(config["templateName"])
        if template.template_type != "JITP":
            raise InvalidRequest(
                f"registrationConfig.templateName {template.name} is a {template.template_type} template; "
                "a CA needs a JITP template"
            )
    if config.get("templateBody"):
        validate_template(config["templateBody"])
    return config or None


@_operation("RegisterCACertificate")
def _register_ca_certificate(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    ca_cert = load_certificate(params["caCertificate"])
    try:
        is_ca = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    except ValueError as exc:  # an extension that does not parse
        raise CertificateValidation(f"caCertificate has a malformed extension: {exc}") from None
    if not is_ca:
        raise CertificateValidation(
            "caCertificate is not a CA certificate (it lacks basicConstraints CA:TRUE)"
        )
    _check_validity(ca_cert, "CA certificate")
    mode = params.get("certificateMode", "DEFAULT")
    verification = params.get("verificationCertificate")
    if mode == "SNI_ONLY":
        if verification:
            raise InvalidRequest("verificationCertificate must be empty when certificateMode is SNI_ONLY")
    else:
        if not verification:
            raise InvalidRequest("verificationCertificate is required when certificateMode is DEFAULT")
        verifier = load_certificate(verification)
        names = verifier.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        common_name = str(names[0].value) if names else ""
        if common_name != backend.registry.registration_code():
            raise RegistrationCodeValidation(
                "The common name of verificationCertificate is not the registration code "
                "(GetRegistrationCode)"
            )
        if not _signed_by(verifier, ca_cert):
            raise CertificateValidation("verificationCertificate is not signed by caCertificate")
        _check_validity(verifier, "verification certificate")
    config = _registration_config(backend, params.get("registrationConfig"))
    pem = ca_cert.public_bytes(serialization.Encoding.PEM).decode()
    ca = backend.registry.add_ca_certificate(
        pem,
        status=_initial_status(params),
        auto_registration=bool(params.get("allowAutoRegistration")),
        registration_config=config,
        mode=mode,
    )
    return {"certificateArn": ca.arn, "certificateId": ca.certificate_id}


@_operation("GetRegistrationCode")
def _get_registration_code(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    return {"registrationCode": backend.registry.registration_code()}


@_operation("UpdateCACertificate")
def _update_ca_certificate(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    auto = params.get("newAutoRegistrationStatus")
    config = _registration_config(backend, params.get("registrationConfig"))
    remove = bool(params.get("removeAutoRegistration"))
    if remove and config is not None:
        raise InvalidRequest("registrationConfig and removeAutoRegistration cannot be used together")
    backend.registry.update_ca_certificate(
        params["certificateId"],
        status=params.get("newStatus"),
        auto_registration=None if auto is None else auto == "ENABLE",
        registration_config=config,
        remove_registration_config=remove,
    )
    return {}


@_operation("DescribeCACertificate")
def _describe_ca_certificate(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    ca = backend.registry.get_ca_certificate(params["certificateId"])
    return {"certificateDescription": _ca_description(ca), "registrationConfig": ca.registration_config}


@_operation("ListCACertificates")
def _list_ca_certificates(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    cas = backend.registry.list_ca_certificates()
    if params.get("templateName"):
        cas = [
            ca for ca in cas if (ca.registration_config or {}).get("templateName") == params["templateName"]
        ]
    descending = not params.get("ascendingOrder")
    page, marker = _page(
        _ordered(cas, params), params, "ListCACertificates", _by_creation, descending=descending
    )
    summaries = [
        {
            "certificateArn": ca.arn,
            "certificateId": ca.certificate_id,
            "status": ca.status,
            "creationDate": ca.created,
        }
        for ca in page
    ]
    return {"certificates": summaries, "nextMarker": marker}


@_operation("DeleteCACertificate")
def _delete_ca_certificate(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    backend.registry.delete_ca_certificate(params["certificateId"])
    return {}


# policies


def _generation_id(policy: Policy) -> str:
    return hashlib.sha256(f"{policy.name}\0{policy.created}\0{policy.document}".encode()).hexdigest()


@_operation("CreatePolicy")
def _create_policy(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    policy = backend.registry.create_policy(params["policyName"], params["policyDocument"])
    return {
        "policyName": policy.name,
        "policyArn": policy.arn,
        "policyDocument": policy.document,
        "policyVersionId": policy.version_id,
    }


@_operation("GetPolicy")
def _get_policy(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    policy = backend.registry.get_policy(params["policyName"])
    return {
        "policyName": policy.name,
        "policyArn": policy.arn,
        "policyDocument": policy.document,
        "defaultVersionId": policy.version_id,
        "creationDate": policy.created,
        "lastModifiedDate": policy.last_modified,
        "generationId": _generation_id(policy),
    }


@_operation("ListPolicies")
def _list_policies(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    policies = backend.registry.list_policies()  # by name, as AWS lists them
    descending = params.get("ascendingOrder") is False
    if descending:
        policies.reverse()
    page, marker = _page(policies, params, "ListPolicies", _by_name, descending=descending)
    return {"policies": [_policy_summary(p) for p in page], "nextMarker": marker}


@_operation("DeletePolicy")
def _delete_policy(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    backend.registry.delete_policy(params["policyName"])
    return {}


@_operation("CreatePolicyVersion")
def _create_policy_version(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    name = params["policyName"]
    version = backend.registry.create_policy_version(
        name, params["policyDocument"], bool(params.get("setAsDefault", False))
    )
    return {
        "policyArn": backend.registry.arn(f"policy/{name}"),
        "policyDocument": version.document,
        "policyVersionId": version.version_id,
        "isDefaultVersion": version.is_default,
    }


@_operation("ListPolicyVersions")
def _list_policy_versions(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    versions = backend.registry.list_policy_versions(params["policyName"])
    return {
        "policyVersions": [
            {"versionId": v.version_id, "isDefaultVersion": v.is_default, "createDate": v.created}
            for v in versions
        ]
    }


@_operation("GetPolicyVersion")
def _get_policy_version(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    name = params["policyName"]
    version = backend.registry.get_policy_version(name, params["policyVersionId"])
    return {
        "policyArn": backend.registry.arn(f"policy/{name}"),
        "policyName": name,
        "policyDocument": version.document,
        "policyVersionId": version.version_id,
        "isDefaultVersion": version.is_default,
        "creationDate": version.created,
        "lastModifiedDate": version.created,
        "generationId": hashlib.sha256(
            f"{name}\0{version.version_id}\0{version.document}".encode()
        ).hexdigest(),
    }


@_operation("SetDefaultPolicyVersion")
def _set_default_policy_version(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    backend.registry.set_default_policy_version(params["policyName"], params["policyVersionId"])
    return {}


@_operation("DeletePolicyVersion")
def _delete_policy_version(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    backend.registry.delete_policy_version(params["policyName"], params["policyVersionId"])
    return {}


@_operation("AttachPolicy")
def _attach_policy(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    backend.registry.attach_policy(params["policyName"], params["target"])
    return {}


@_operation("DetachPolicy")
def _detach_policy(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    backend.registry.detach_policy(params["policyName"], params["target"])
    return {}


@_operation("AttachPrincipalPolicy")
def _attach_principal_policy(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    backend.registry.attach_policy(params["policyName"], params["principal"])
    return {}


@_operation("DetachPrincipalPolicy")
def _detach_principal_policy(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    backend.registry.detach_policy(params["policyName"], params["principal"])
    return {}


def _check_known_principal(backend: IotBackend, principal: str) -> None:
    cid = certificate_id_from_arn(principal)
    if cid is not None:
        backend.registry.get_certificate(cid)


@_operation("ListAttachedPolicies")
def _list_attached_policies(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    _check_known_principal(backend, params["target"])
    policies = backend.registry.list_attached_policies(params["target"])
    page, marker = _page(policies, params, "ListAttachedPolicies", _by_name)
    return {"policies": [_policy_summary(p) for p in page], "nextMarker": marker}


@_operation("ListPrincipalPolicies")
def _list_principal_policies(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    _check_known_principal(backend, params["principal"])
    policies = backend.registry.list_attached_policies(params["principal"])
    descending = params.get("ascendingOrder") is False
    if descending:
        policies.reverse()
    page, marker = _page(policies, params, "ListPrincipalPolicies", _by_name, descending=descending)
    return {"policies": [_policy_summary(p) for p in page], "nextMarker": marker}


@_operation("ListTargetsForPolicy")
def _list_targets_for_policy(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    # Sorted here (the registry lists them as attached): a sort key to resume after.
    targets = sorted(backend.registry.list_targets_for_policy(params["policyName"]))
    page, marker = _page(targets, params, "ListTargetsForPolicy", _by_value)
    return {"targets": page, "nextMarker": marker}


# things


@_operation("CreateThing")
def _create_thing(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    attributes = (params.get("attributePayload") or {}).get("attributes")
    thing = backend.registry.create_thing(
        params["thingName"], thing_type_name=params.get("thingTypeName"), attributes=attributes
    )
    return {"thingName": thing.name, "thingArn": thing.arn, "thingId": thing.thing_id}


@_operation("DescribeThing")
def _describe_thing(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    thing = backend.registry.get_thing(params["thingName"])
    return {
        "defaultClientId": thing.name,
        "thingName": thing.name,
        "thingId": thing.thing_id,
        "thingArn": thing.arn,
        "thingTypeName": thing.thing_type_name,
        "attributes": thing.attributes,
        "version": thing.version,
    }


@_operation("ListThings")
def _list_things(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    things = backend.registry.list_things()
    if params.get("thingTypeName"):
        things = [t for t in things if t.thing_type_name == params["thingTypeName"]]
    name = params.get("attributeName")
    if name:
        wanted = params.get("attributeValue")
        prefix = bool(params.get("usePrefixAttributeValue"))

        def keep(thing: Thing) -> bool:
            value = thing.attributes.get(name)
            if value is None:
                return False
            if wanted is None:
                return True
            return value.startswith(wanted) if prefix else value == wanted

        things = [t for t in things if keep(t)]
    page, token = _page(things, params, "ListThings", _by_name)
    return {"things": [_thing_summary(t) for t in page], "nextToken": token}


@_operation("UpdateThing")
def _update_thing(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    if params.get("removeThingType") and params.get("thingTypeName"):
        raise InvalidRequest("thingTypeName and removeThingType cannot be used together")
    payload = params.get("attributePayload") or {}
    backend.registry.update_thing(
        params["thingName"],
        thing_type_name=params.get("thingTypeName"),
        attributes=payload.get("attributes"),
        merge=bool(payload.get("merge", False)),
        remove_thing_type=bool(params.get("removeThingType")),
        expected_version=params.get("expectedVersion"),
    )
    return {}


@_operation("DeleteThing")
def _delete_thing(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    # AWS: "Returns successfully ... if you specify a thing that doesn't exist."
    with contextlib.suppress(ResourceNotFound):
        backend.registry.delete_thing(params["thingName"], expected_version=params.get("expectedVersion"))
    return {}


@_operation("AttachThingPrincipal")
def _attach_thing_principal(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    backend.registry.attach_thing_principal(params["thingName"], params["principal"])
    return {}


@_operation("DetachThingPrincipal")
def _detach_thing_principal(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    backend.registry.detach_thing_principal(params["thingName"], params["principal"])
    return {}


@_operation("ListThingPrincipals")
def _list_thing_principals(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    principals = sorted(backend.registry.list_thing_principals(params["thingName"]))
    page, token = _page(principals, params, "ListThingPrincipals", _by_value)
    return {"principals": page, "nextToken": token}


@_operation("ListPrincipalThings")
def _list_principal_things(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    _check_known_principal(backend, params["principal"])
    things = sorted(backend.registry.list_principal_things(params["principal"]))
    page, token = _page(things, params, "ListPrincipalThings", _by_value)
    return {"things": page, "nextToken": token}


# provisioning templates


@_operation("CreateProvisioningTemplate")
def _create_provisioning_template(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    template_type = params.get("type", "FLEET_PROVISIONING")
    hook = _hook(params.get("preProvisioningHook"), template_type)
    validate_template(params["templateBody"])
    template = backend.registry.create_template(
        params["templateName"],
        params["templateBody"],
        role_arn=params["provisioningRoleArn"],
        enabled=bool(params.get("enabled", False)),
        description=params.get("description"),
        hook=hook,
        template_type=template_type,
    )
    return {
        "templateArn": template.arn,
        "templateName": template.name,
        "defaultVersionId": template.version_id,
    }


@_operation("DescribeProvisioningTemplate")
def _describe_provisioning_template(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    template = backend.registry.get_template(params["templateName"])
    return {
        "templateArn": template.arn,
        "templateName": template.name,
        "description": template.description,
        "creationDate": template.created,
        "lastModifiedDate": template.last_modified,
        "defaultVersionId": template.version_id,
        "templateBody": template.body,
        "enabled": template.enabled,
        "provisioningRoleArn": template.role_arn,
        "preProvisioningHook": template.hook,
        "type": template.template_type,
    }


@_operation("ListProvisioningTemplates")
def _list_provisioning_templates(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    page, token = _page(
        backend.registry.list_templates(),
        params,
        "ListProvisioningTemplates",
        lambda t: (t.created, t.name),
    )
    return {"templates": [_template_summary(t) for t in page], "nextToken": token}


@_operation("UpdateProvisioningTemplate")
def _update_provisioning_template(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    name = params["templateName"]
    template = backend.registry.get_template(name)
    changes: dict[str, object] = {}
    if "description" in params:
        changes["description"] = params["description"]
    if "enabled" in params:
        changes["enabled"] = params["enabled"]
    if "provisioningRoleArn" in params:
        changes["role_arn"] = params["provisioningRoleArn"]
    if "defaultVersionId" in params and params["defaultVersionId"] != template.version_id:
        # Only the current version is kept, so it is the only one that can be the default.
        raise ResourceNotFound(
            f"Version {params['defaultVersionId']} of provisioning template {name} does not exist"
        )
    if params.get("removePreProvisioningHook"):
        if "preProvisioningHook" in params:
            raise InvalidRequest("preProvisioningHook and removePreProvisioningHook cannot be used together")
        changes["hook"] = None
    elif "preProvisioningHook" in params:
        changes["hook"] = _hook(params["preProvisioningHook"], template.template_type)
    backend.registry.update_template(name, **changes)
    return {}


@_operation("CreateProvisioningTemplateVersion")
def _create_provisioning_template_version(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    name = params["templateName"]
    backend.registry.get_template(name)
    if params.get("setAsDefault") is False:
        raise InvalidRequest(
            "iot-core-local keeps only the default version of a template; use setAsDefault=true"
        )
    validate_template(params["templateBody"])
    template = backend.registry.update_template(name, body=params["templateBody"])
    return {
        "templateArn": template.arn,
        "templateName": template.name,
        "versionId": template.version_id,
        "isDefaultVersion": True,
    }


@_operation("DeleteProvisioningTemplate")
def _delete_provisioning_template(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    name = params["templateName"]
    with backend.registry.transaction():
        backend.registry.get_template(name)
        for ca in backend.registry.list_ca_certificates():
            if (ca.registration_config or {}).get("templateName") == name:
                raise DeleteConflict(
                    f"Provisioning template {name} is used by CA certificate {ca.certificate_id}"
                )
        backend.registry.delete_template(name)
    return {}


@_operation("CreateProvisioningClaim")
def _create_provisioning_claim(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    template = backend.registry.get_template(params["templateName"])
    if template.template_type != "FLEET_PROVISIONING":
        raise InvalidRequest(f"Provisioning template {template.name} is not a FLEET_PROVISIONING template")
    # The certificate's notAfter is real time (every TLS stack checks it against its clock); what the
    # registry enforces, and answers, is by its own clock, which tests advance.
    not_after = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=backend.claim_ttl)
    expires = backend.registry.clock() + backend.claim_ttl  # read together: the two agree
    cert_pem, key_pem = backend.ca.create_keys_and_certificate(not_after=not_after)
    # No policy is attached: the registry grants it an implicit one, its template's provisioning topics
    # only, until it expires (Registry.policy_documents).
    cert = backend.registry.add_provisioning_claim(
        cert_pem, template.name, expires, ca_certificate_id=backend.ca.issuing_ca_id
    )
    return {
        "certificateId": cert.certificate_id,
        "certificatePem": cert.pem,
        "keyPair": {"PublicKey": _public_key_pem(cert_pem), "PrivateKey": key_pem},
        "expiration": expires,
    }


# endpoint

_ENDPOINT_TYPES = ("iot:Data", "iot:Data-ATS", "iot:CredentialProvider", "iot:Jobs")


@_operation("DescribeEndpoint")
def _describe_endpoint(backend: IotBackend, params: dict[str, Any]) -> Mapping[str, Any]:
    endpoint_type = params.get("endpointType", "iot:Data")
    if endpoint_type not in _ENDPOINT_TYPES:
        raise InvalidRequest(
            f"endpointType must be one of {', '.join(_ENDPOINT_TYPES)}, not {endpoint_type!r}"
        )
    return {"endpointAddress": backend.endpoint_address()}


SUPPORTED_OPERATIONS = frozenset(_HANDLERS)


@functools.cache
def service() -> RestJsonService[IotBackend]:
    """AWS IoT as botocore models it, with these handlers (built once: the model is megabytes of JSON)."""
    import botocore.session

    return RestJsonService(botocore.session.get_session().get_service_model("iot"), _HANDLERS)
