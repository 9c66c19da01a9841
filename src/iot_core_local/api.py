"""The control plane: the AWS IoT REST API (rest-json), as boto3 speaks it.

Requests are routed, parsed, validated and answered with botocore's own model of the service
(`botocore/data/iot/2015-05-28/service-2.json`), so a path, a parameter's location, a timestamp's encoding
or an error's status code is never written down twice. Only the operations in `_HANDLERS` do something;
any other operation of the model is recognised and answered "not supported".

Authentication is not checked: any region and any credentials work, as on a developer's machine.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import functools
import hashlib
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
from typing import Any

from botocore.model import OperationModel, ServiceModel, Shape, StructureShape
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from iot_core_local.ca import CertificateAuthority, certificate_id, load_certificate, load_csr
from iot_core_local.errors import (
    CertificateState,
    CertificateValidation,
    DeleteConflict,
    InvalidRequest,
    RegistrationCodeValidation,
    ResourceNotFound,
    ServiceError,
    UnknownOperation,
)
from iot_core_local.faults import FaultInjector
from iot_core_local.faults import from_json as faults_from_json
from iot_core_local.registry import (
    ACCOUNT_ID,
    CACertificate,
    Certificate,
    Policy,
    ProvisioningTemplate,
    Registry,
    Thing,
    certificate_id_from_arn,
)

__all__ = ["CLAIM_TTL", "MAX_BODY", "ControlPlane", "RegistrationCodeValidation", "UnknownOperation"]

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # AWS IoT's largest request (a 64 KiB PEM, a 10 KiB template) fits many times over
# The stand-in's own endpoints (the fault switch); no AWS IoT REST path starts with this.
_LOCAL_PREFIX = "/_local/"
CLAIM_TTL = 300.0  # CreateProvisioningClaim: AWS's temporary claim certificates last five minutes
HOOK_PAYLOAD_VERSION = "2020-04-01"


@functools.cache
def service_model() -> ServiceModel:
    """botocore's model of AWS IoT (loaded once; it is a few megabytes of JSON)."""
    import botocore.session

    return botocore.session.get_session().get_service_model("iot")


# ---- routing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Route:
    operation: OperationModel
    path: re.Pattern[str]
    labels: tuple[str, ...]  # regex group i+1 is the URI label labels[i]
    query: tuple[tuple[str, str | None], ...]  # literal query parts of requestUri ("?a=b", "?c")
    literal_chars: int  # more literal characters = more specific


def _compile_route(operation: OperationModel) -> _Route:
    uri = operation.http["requestUri"]
    path, _, query = uri.partition("?")
    labels: list[str] = []
    pattern = ""
    pos = 0
    for match in re.finditer(r"\{([^}]+)\}", path):
        pattern += re.escape(path[pos : match.start()])
        name = match.group(1)
        greedy = name.endswith("+")
        labels.append(name.rstrip("+"))
        # Labels match the raw (still percent-encoded) path: botocore encodes "/" in a non-greedy label.
        pattern += "(.+)" if greedy else "([^/]+)"
        pos = match.end()
    pattern += re.escape(path[pos:])
    literal_query = tuple(
        (key, value if sep else None)
        for key, sep, value in (part.partition("=") for part in query.split("&") if part)
    )
    literal = len(re.sub(r"\{[^}]+\}", "", path))
    return _Route(operation, re.compile(pattern), tuple(labels), literal_query, literal)


@functools.cache
def _routes() -> dict[str, list[_Route]]:
    model = service_model()
    by_method: dict[str, list[_Route]] = {}
    for name in model.operation_names:
        operation = model.operation_model(name)
        by_method.setdefault(operation.http["method"], []).append(_compile_route(operation))
    for routes in by_method.values():
        routes.sort(key=lambda r: (-len(r.query), -r.literal_chars))
    return by_method


def _route(method: str, path: str, query: Mapping[str, list[str]]) -> tuple[OperationModel, dict[str, str]]:
    for route in _routes().get(method, []):
        match = route.path.fullmatch(path)
        if match is None:
            continue
        if any(
            key not in query or (value is not None and value not in query[key]) for key, value in route.query
        ):
            continue
        labels = {name: urllib.parse.unquote(match.group(i + 1)) for i, name in enumerate(route.labels)}
        return route.operation, labels
    raise UnknownOperation(f"No AWS IoT operation matches {method} {path}")


# ---- request parsing and validation -------------------------------------------------------------


def _bad(member: str, problem: str) -> InvalidRequest:
    return InvalidRequest(f"{member} {problem}")


def _scalar_from_text(shape: Shape, text: str, member: str) -> Any:
    """A value from the URI, the query string or a header."""
    kind = shape.type_name
    if kind in ("integer", "long"):
        try:
            return int(text)
        except ValueError:
            raise _bad(member, f"must be an integer, not {text!r}") from None
    if kind in ("double", "float"):
        try:
            return float(text)
        except ValueError:
            raise _bad(member, f"must be a number, not {text!r}") from None
    if kind == "boolean":
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        raise _bad(member, f"must be true or false, not {text!r}")
    if kind == "timestamp":
        try:
            return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
        except ValueError:
            try:
                return float(text)
            except ValueError:
                raise _bad(member, f"must be a timestamp, not {text!r}") from None
    return text


def _from_json(shape: Shape, value: Any, member: str) -> Any:
    """A JSON body value checked against its shape (types only; constraints come later)."""
    kind = shape.type_name
    if kind == "structure":
        assert isinstance(shape, StructureShape)
        if not isinstance(value, dict):
            raise _bad(member, "must be a JSON object")
        result: dict[str, Any] = {}
        for name, member_shape in shape.members.items():
            key = member_shape.serialization.get("name", name)
            if key in value and value[key] is not None:
                result[name] = _from_json(member_shape, value[key], f"{member}.{name}" if member else name)
        return result
    if kind == "list":
        if not isinstance(value, list):
            raise _bad(member, "must be a JSON array")
        item_shape = shape.member  # type: ignore[attr-defined]
        return [_from_json(item_shape, item, f"{member}[{i}]") for i, item in enumerate(value)]
    if kind == "map":
        if not isinstance(value, dict):
            raise _bad(member, "must be a JSON object")
        value_shape = shape.value  # type: ignore[attr-defined]
        return {str(k): _from_json(value_shape, v, f"{member}.{k}") for k, v in value.items()}
    if kind == "string":
        if not isinstance(value, str):
            raise _bad(member, "must be a string")
        return value
    if kind == "boolean":
        if not isinstance(value, bool):
            raise _bad(member, "must be true or false")
        return value
    if kind in ("integer", "long"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(member, "must be an integer")
        return value
    if kind in ("double", "float", "timestamp"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _bad(member, "must be a number")
        if not math.isfinite(value):
            raise _bad(member, "must be a finite number")
        return value
    if kind == "blob":
        if not isinstance(value, str):
            raise _bad(member, "must be a base64 string")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(member, "must be valid base64") from None
    return value


@functools.cache
def _python_pattern(pattern: str) -> re.Pattern[str] | None:
    # The model's patterns are Java regexes; \p{C} ("other": controls, format...) is the only Java-only
    # class among those this subset meets. A pattern Python cannot read is skipped, not enforced wrongly.
    translated = pattern.replace(r"\p{C}", r"\x00-\x1f\x7f-\x9f")
    try:
        return re.compile(translated)
    except re.error:
        return None


def _validate(shape: Shape, value: Any, member: str) -> None:
    """Required members, lengths, ranges, patterns and enums, as the model states them."""
    meta = shape.metadata
    kind = shape.type_name
    if kind == "structure":
        assert isinstance(shape, StructureShape)
        for name in shape.required_members:
            if value.get(name) is None:
                raise InvalidRequest(f"{_join(member, name)} is required")
        for name, item in value.items():
            _validate(shape.members[name], item, _join(member, name))
        return
    if kind in ("string", "list", "map", "blob"):
        size = len(value)
        if "min" in meta and size < meta["min"]:
            unit = "characters" if kind == "string" else "items" if kind != "blob" else "bytes"
            raise _bad(member, f"must have at least {meta['min']} {unit}")
        if "max" in meta and size > meta["max"]:
            unit = "characters" if kind == "string" else "items" if kind != "blob" else "bytes"
            raise _bad(member, f"must have at most {meta['max']} {unit}")
    if kind == "string":
        if "enum" in meta and value not in meta["enum"]:
            raise _bad(member, f"must be one of {', '.join(meta['enum'])}, not {value!r}")
        pattern = _python_pattern(meta["pattern"]) if "pattern" in meta else None
        if pattern is not None and not pattern.fullmatch(value):
            raise _bad(member, f"{_clip(value)!r} does not match the pattern {meta['pattern']}")
    elif kind in ("integer", "long"):
        if "min" in meta and value < meta["min"]:
            raise _bad(member, f"must be at least {meta['min']}")
        if "max" in meta and value > meta["max"]:
            raise _bad(member, f"must be at most {meta['max']}")
    elif kind == "list":
        for i, item in enumerate(value):
            _validate(shape.member, item, f"{member}[{i}]")  # type: ignore[attr-defined]
    elif kind == "map":
        for key, item in value.items():
            _validate(shape.key, key, f"{member} key")  # type: ignore[attr-defined]
            _validate(shape.value, item, f"{member}.{key}")  # type: ignore[attr-defined]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _parse_request(
    operation: OperationModel,
    labels: Mapping[str, str],
    query: Mapping[str, list[str]],
    headers: Mapping[str, str],
    body: bytes,
) -> dict[str, Any]:
    shape = operation.input_shape
    if shape is None:
        return {}
    assert isinstance(shape, StructureShape)
    payload_member = shape.serialization.get("payload")
    document: Any = {}
    if body.strip():
        try:
            document = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if payload_member is None and not isinstance(document, dict):
        raise InvalidRequest("The request body must be a JSON object")
    params: dict[str, Any] = {}
    for name, member in shape.members.items():
        location = member.serialization.get("location")
        wire = member.serialization.get("name", name)
        if location == "uri":
            if wire in labels:
                params[name] = _scalar_from_text(member, labels[wire], name)
        elif location == "querystring":
            if wire in query:
                if member.type_name == "list":
                    item_shape = member.member  # type: ignore[attr-defined]
                    params[name] = [_scalar_from_text(item_shape, v, name) for v in query[wire]]
                else:
                    params[name] = _scalar_from_text(member, query[wire][0], name)
        elif location == "header":
            if wire.lower() in headers:
                params[name] = _scalar_from_text(member, headers[wire.lower()], name)
        elif location is None:
            if name == payload_member:
                if body.strip():
                    params[name] = _from_json(member, document, name)
            elif isinstance(document, dict) and document.get(wire) is not None:
                params[name] = _from_json(member, document[wire], name)
    _validate(shape, params, "")
    return params


# ---- response serialisation ---------------------------------------------------------------------


def _to_json(shape: Shape, value: Any) -> Any:
    kind = shape.type_name
    if kind == "structure":
        assert isinstance(shape, StructureShape)
        return {
            member.serialization.get("name", name): _to_json(member, value[name])
            for name, member in shape.members.items()
            if value.get(name) is not None
        }
    if kind == "list":
        return [_to_json(shape.member, item) for item in value]  # type: ignore[attr-defined]
    if kind == "map":
        return {k: _to_json(shape.value, v) for k, v in value.items()}  # type: ignore[attr-defined]
    if kind == "timestamp":
        # rest-json bodies carry epoch seconds, which botocore turns back into datetimes.
        return value.timestamp() if isinstance(value, datetime.datetime) else float(value)
    if kind == "blob":
        return base64.b64encode(value).decode()
    return value


def _serialise_response(
    operation: OperationModel, output: Mapping[str, Any]
) -> tuple[int, dict[str, str], bytes]:
    status = int(operation.http.get("responseCode", 200))
    headers: dict[str, str] = {}
    shape = operation.output_shape
    if shape is None:
        return status, headers, b"{}"
    assert isinstance(shape, StructureShape)
    body: dict[str, Any] = {}
    for name, member in shape.members.items():
        value = output.get(name)
        if value is None:
            continue
        location = member.serialization.get("location")
        wire = member.serialization.get("name", name)
        if location == "statusCode":
            status = int(value)
        elif location == "header":
            headers[wire] = str(value).lower() if isinstance(value, bool) else str(value)
        elif name == shape.serialization.get("payload"):
            return status, headers, json.dumps(_to_json(member, value)).encode()
        else:
            body[wire] = _to_json(member, value)
    return status, headers, json.dumps(body).encode()


# ---- pagination ---------------------------------------------------------------------------------


def _page(
    items: list[Any], params: Mapping[str, Any], default_size: int = 250
) -> tuple[list[Any], str | None]:
    """One page of `items` and the token for the next, from pageSize/maxResults and marker/nextToken.

    Tokens are base64 offsets (the model's Marker pattern is base64): cheap, and stable enough for a
    registry that changes slowly while someone pages through it.
    """
    start, size = _page_bounds(params, default_size)
    end = start + size
    return items[start:end], _token(end) if end < len(items) else None


def _page_bounds(params: Mapping[str, Any], default_size: int = 250) -> tuple[int, int]:
    """(offset, page size) from pageSize/maxResults and marker/nextToken."""
    size = params.get("pageSize") or params.get("maxResults") or default_size
    token = params.get("marker") or params.get("nextToken")
    start = 0
    if token:
        try:
            start = int(base64.b64decode(token, validate=True).decode("ascii"))
        except (binascii.Error, ValueError, UnicodeDecodeError):
            raise InvalidRequest(f"The pagination token {_clip(token)!r} is not valid") from None
        if start < 0:
            raise InvalidRequest(f"The pagination token {_clip(token)!r} is not valid")
    return start, int(size)


def _token(offset: int) -> str:
    return base64.b64encode(str(offset).encode()).decode()


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


def _validate_template_body(body: str) -> None:
    """templates.validate_template, if the template engine is installed (it raises TemplateError)."""
    try:
        from iot_core_local.templates import validate_template
    except ImportError:  # pragma: no cover - only while the engine is being written
        log.warning("templates.py is missing: template bodies are stored unchecked")
        return
    validate_template(body)


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

Handler = Callable[["ControlPlane", dict[str, Any]], Mapping[str, Any]]
_HANDLERS: dict[str, Handler] = {}


def _operation(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _HANDLERS[name] = fn
        return fn

    return register


def _initial_status(params: Mapping[str, Any]) -> str:
    return "ACTIVE" if params.get("setAsActive") else "INACTIVE"


# certificates


@_operation("CreateKeysAndCertificate")
def _create_keys_and_certificate(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    cert_pem, key_pem = cp.ca.create_keys_and_certificate()
    cert = cp.registry.add_certificate(
        cert_pem, _initial_status(params), ca_certificate_id=cp.ca.issuing_ca_id
    )
    return {
        "certificateArn": cert.arn,
        "certificateId": cert.certificate_id,
        "certificatePem": cert.pem,
        "keyPair": {"PublicKey": _public_key_pem(cert_pem), "PrivateKey": key_pem},
    }


@_operation("CreateCertificateFromCsr")
def _create_certificate_from_csr(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    csr = load_csr(params["certificateSigningRequest"])
    issued = cp.ca.sign_csr(csr)
    pem = issued.public_bytes(serialization.Encoding.PEM).decode()
    # The issuing CA's id, as the MQTT provisioning API records it: ListCertificatesByCA finds both.
    cert = cp.registry.add_certificate(pem, _initial_status(params), ca_certificate_id=cp.ca.issuing_ca_id)
    return {"certificateArn": cert.arn, "certificateId": cert.certificate_id, "certificatePem": cert.pem}


_REGISTER_STATUSES = ("ACTIVE", "INACTIVE", "REVOKED")


def _register_status(params: Mapping[str, Any]) -> str:
    status = params.get("status")
    if status is None:
        return _initial_status(params)
    if status not in _REGISTER_STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(_REGISTER_STATUSES)}, not {status!r}")
    return str(status)


@_operation("RegisterCertificate")
def _register_certificate(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    cert = load_certificate(params["certificatePem"])
    _check_validity(cert, "certificate")
    status = _register_status(params)
    ca: CACertificate | None
    if params.get("caCertificatePem"):
        ca_cert = load_certificate(params["caCertificatePem"])
        ca = cp.registry.find_ca_certificate(certificate_id(ca_cert))
        if ca is None:
            raise CertificateValidation("The CA certificate in caCertificatePem is not registered")
        if not _signed_by(cert, ca_cert):
            raise CertificateValidation(
                "The certificate is not signed by the CA certificate in caCertificatePem"
            )
    else:
        ca = cp.registry.find_ca_for(cert)
        if ca is None:
            raise CertificateValidation(
                "The certificate is not signed by a registered CA certificate: register its CA first "
                "(RegisterCACertificate) or use RegisterCertificateWithoutCA"
            )
    if status == "ACTIVE" and ca.status != "ACTIVE":
        raise CertificateState(f"The CA certificate {ca.certificate_id} is {ca.status}; activate it first")
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    added = cp.registry.add_certificate(pem, status, ca_certificate_id=ca.certificate_id, mode=ca.mode)
    return {"certificateArn": added.arn, "certificateId": added.certificate_id}


@_operation("RegisterCertificateWithoutCA")
def _register_certificate_without_ca(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    cert = load_certificate(params["certificatePem"])
    _check_validity(cert, "certificate")
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    added = cp.registry.add_certificate(pem, _register_status(params), mode="SNI_ONLY")
    return {"certificateArn": added.arn, "certificateId": added.certificate_id}


@_operation("DescribeCertificate")
def _describe_certificate(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    cert = cp.registry.get_certificate(params["certificateId"])
    return {"certificateDescription": _certificate_description(cert)}


_INTERNAL_STATUSES = ("PENDING_TRANSFER", "PENDING_ACTIVATION", "REGISTER_INACTIVE")


@_operation("UpdateCertificate")
def _update_certificate(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    status = params["newStatus"]
    if status in _INTERNAL_STATUSES:
        raise InvalidRequest(f"newStatus {status} is used internally by AWS IoT and cannot be set")
    # Through the registry, so its listeners fire: the gateway disconnects a certificate leaving ACTIVE.
    cp.registry.set_certificate_status(params["certificateId"], status)
    return {}


@_operation("ListCertificates")
@_operation("ListCertificatesByCA")
def _list_certificates(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    # Paged in SQL, PEMs left out: a page costs its own rows, not the whole table's.
    start, size = _page_bounds(params)
    certs = cp.registry.list_certificates(
        params.get("caCertificateId"),
        ascending=bool(params.get("ascendingOrder")),
        offset=start,
        limit=size + 1,
        with_pem=False,
    )
    marker = _token(start + size) if len(certs) > size else None
    return {"certificates": [_certificate_summary(c) for c in certs[:size]], "nextMarker": marker}


@_operation("DeleteCertificate")
def _delete_certificate(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    cp.registry.delete_certificate(params["certificateId"], force=bool(params.get("forceDelete")))
    return {}


# CA certificates


def _registration_config(cp: ControlPlane, value: Mapping[str, Any] | None) -> dict[str, str] | None:
    if value is None:
        return None
    config = {k: str(v) for k, v in value.items() if v is not None}
    if "templateName" in config:
        template = cp.registry.get_template(config["templateName"])
        if template.template_type != "JITP":
            raise InvalidRequest(
                f"registrationConfig.templateName {template.name} is a {template.template_type} template; "
                "a CA needs a JITP template"
            )
    if config.get("templateBody"):
        _validate_template_body(config["templateBody"])
    return config or None


@_operation("RegisterCACertificate")
def _register_ca_certificate(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
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
        if common_name != cp.registry.registration_code():
            raise RegistrationCodeValidation(
                "The common name of verificationCertificate is not the registration code "
                "(GetRegistrationCode)"
            )
        if not _signed_by(verifier, ca_cert):
            raise CertificateValidation("verificationCertificate is not signed by caCertificate")
        _check_validity(verifier, "verification certificate")
    config = _registration_config(cp, params.get("registrationConfig"))
    pem = ca_cert.public_bytes(serialization.Encoding.PEM).decode()
    ca = cp.registry.add_ca_certificate(
        pem,
        status=_initial_status(params),
        auto_registration=bool(params.get("allowAutoRegistration")),
        registration_config=config,
        mode=mode,
    )
    return {"certificateArn": ca.arn, "certificateId": ca.certificate_id}


@_operation("GetRegistrationCode")
def _get_registration_code(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    return {"registrationCode": cp.registry.registration_code()}


@_operation("UpdateCACertificate")
def _update_ca_certificate(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    auto = params.get("newAutoRegistrationStatus")
    config = _registration_config(cp, params.get("registrationConfig"))
    remove = bool(params.get("removeAutoRegistration"))
    if remove and config is not None:
        raise InvalidRequest("registrationConfig and removeAutoRegistration cannot be used together")
    cp.registry.update_ca_certificate(
        params["certificateId"],
        status=params.get("newStatus"),
        auto_registration=None if auto is None else auto == "ENABLE",
        registration_config=config,
        remove_registration_config=remove,
    )
    return {}


@_operation("DescribeCACertificate")
def _describe_ca_certificate(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    ca = cp.registry.get_ca_certificate(params["certificateId"])
    return {"certificateDescription": _ca_description(ca), "registrationConfig": ca.registration_config}


@_operation("ListCACertificates")
def _list_ca_certificates(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    cas = cp.registry.list_ca_certificates()
    if params.get("templateName"):
        cas = [
            ca for ca in cas if (ca.registration_config or {}).get("templateName") == params["templateName"]
        ]
    page, marker = _page(_ordered(cas, params), params)
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
def _delete_ca_certificate(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    cp.registry.delete_ca_certificate(params["certificateId"])
    return {}


# policies


def _generation_id(policy: Policy) -> str:
    return hashlib.sha256(f"{policy.name}\0{policy.created}\0{policy.document}".encode()).hexdigest()


@_operation("CreatePolicy")
def _create_policy(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    policy = cp.registry.create_policy(params["policyName"], params["policyDocument"])
    return {
        "policyName": policy.name,
        "policyArn": policy.arn,
        "policyDocument": policy.document,
        "policyVersionId": policy.version_id,
    }


@_operation("GetPolicy")
def _get_policy(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    policy = cp.registry.get_policy(params["policyName"])
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
def _list_policies(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    policies = cp.registry.list_policies()  # by name, as AWS lists them
    if params.get("ascendingOrder") is False:
        policies.reverse()
    page, marker = _page(policies, params)
    return {"policies": [_policy_summary(p) for p in page], "nextMarker": marker}


@_operation("DeletePolicy")
def _delete_policy(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    cp.registry.delete_policy(params["policyName"])
    return {}


@_operation("AttachPolicy")
def _attach_policy(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    cp.registry.attach_policy(params["policyName"], params["target"])
    return {}


@_operation("DetachPolicy")
def _detach_policy(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    cp.registry.detach_policy(params["policyName"], params["target"])
    return {}


@_operation("AttachPrincipalPolicy")
def _attach_principal_policy(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    cp.registry.attach_policy(params["policyName"], params["principal"])
    return {}


@_operation("DetachPrincipalPolicy")
def _detach_principal_policy(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    cp.registry.detach_policy(params["policyName"], params["principal"])
    return {}


def _check_known_principal(cp: ControlPlane, principal: str) -> None:
    cid = certificate_id_from_arn(principal)
    if cid is not None:
        cp.registry.get_certificate(cid)


@_operation("ListAttachedPolicies")
def _list_attached_policies(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    _check_known_principal(cp, params["target"])
    page, marker = _page(cp.registry.list_attached_policies(params["target"]), params)
    return {"policies": [_policy_summary(p) for p in page], "nextMarker": marker}


@_operation("ListPrincipalPolicies")
def _list_principal_policies(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    _check_known_principal(cp, params["principal"])
    policies = cp.registry.list_attached_policies(params["principal"])
    if params.get("ascendingOrder") is False:
        policies.reverse()
    page, marker = _page(policies, params)
    return {"policies": [_policy_summary(p) for p in page], "nextMarker": marker}


@_operation("ListTargetsForPolicy")
def _list_targets_for_policy(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    page, marker = _page(cp.registry.list_targets_for_policy(params["policyName"]), params)
    return {"targets": page, "nextMarker": marker}


# things


@_operation("CreateThing")
def _create_thing(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    attributes = (params.get("attributePayload") or {}).get("attributes")
    thing = cp.registry.create_thing(
        params["thingName"], thing_type_name=params.get("thingTypeName"), attributes=attributes
    )
    return {"thingName": thing.name, "thingArn": thing.arn, "thingId": thing.thing_id}


@_operation("DescribeThing")
def _describe_thing(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    thing = cp.registry.get_thing(params["thingName"])
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
def _list_things(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    things = cp.registry.list_things()
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
    page, token = _page(things, params)
    return {"things": [_thing_summary(t) for t in page], "nextToken": token}


@_operation("UpdateThing")
def _update_thing(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    if params.get("removeThingType") and params.get("thingTypeName"):
        raise InvalidRequest("thingTypeName and removeThingType cannot be used together")
    payload = params.get("attributePayload") or {}
    cp.registry.update_thing(
        params["thingName"],
        thing_type_name=params.get("thingTypeName"),
        attributes=payload.get("attributes"),
        merge=bool(payload.get("merge", False)),
        remove_thing_type=bool(params.get("removeThingType")),
        expected_version=params.get("expectedVersion"),
    )
    return {}


@_operation("DeleteThing")
def _delete_thing(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    # AWS: "Returns successfully ... if you specify a thing that doesn't exist."
    with contextlib.suppress(ResourceNotFound):
        cp.registry.delete_thing(params["thingName"], expected_version=params.get("expectedVersion"))
    return {}


@_operation("AttachThingPrincipal")
def _attach_thing_principal(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    cp.registry.attach_thing_principal(params["thingName"], params["principal"])
    return {}


@_operation("DetachThingPrincipal")
def _detach_thing_principal(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    cp.registry.detach_thing_principal(params["thingName"], params["principal"])
    return {}


@_operation("ListThingPrincipals")
def _list_thing_principals(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    page, token = _page(cp.registry.list_thing_principals(params["thingName"]), params)
    return {"principals": page, "nextToken": token}


@_operation("ListPrincipalThings")
def _list_principal_things(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    _check_known_principal(cp, params["principal"])
    page, token = _page(cp.registry.list_principal_things(params["principal"]), params)
    return {"things": page, "nextToken": token}


# provisioning templates


@_operation("CreateProvisioningTemplate")
def _create_provisioning_template(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    template_type = params.get("type", "FLEET_PROVISIONING")
    hook = _hook(params.get("preProvisioningHook"), template_type)
    _validate_template_body(params["templateBody"])
    template = cp.registry.create_template(
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
def _describe_provisioning_template(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    template = cp.registry.get_template(params["templateName"])
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
def _list_provisioning_templates(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    page, token = _page(cp.registry.list_templates(), params)
    return {"templates": [_template_summary(t) for t in page], "nextToken": token}


@_operation("UpdateProvisioningTemplate")
def _update_provisioning_template(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    name = params["templateName"]
    template = cp.registry.get_template(name)
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
    cp.registry.update_template(name, **changes)
    return {}


@_operation("CreateProvisioningTemplateVersion")
def _create_provisioning_template_version(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    name = params["templateName"]
    cp.registry.get_template(name)
    if params.get("setAsDefault") is False:
        raise InvalidRequest(
            "iot-core-local keeps only the default version of a template; use setAsDefault=true"
        )
    _validate_template_body(params["templateBody"])
    template = cp.registry.update_template(name, body=params["templateBody"])
    return {
        "templateArn": template.arn,
        "templateName": template.name,
        "versionId": template.version_id,
        "isDefaultVersion": True,
    }


@_operation("DeleteProvisioningTemplate")
def _delete_provisioning_template(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    name = params["templateName"]
    with cp.registry.transaction():
        cp.registry.get_template(name)
        for ca in cp.registry.list_ca_certificates():
            if (ca.registration_config or {}).get("templateName") == name:
                raise DeleteConflict(
                    f"Provisioning template {name} is used by CA certificate {ca.certificate_id}"
                )
        cp.registry.delete_template(name)
    return {}


@_operation("CreateProvisioningClaim")
def _create_provisioning_claim(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    template = cp.registry.get_template(params["templateName"])
    if template.template_type != "FLEET_PROVISIONING":
        raise InvalidRequest(f"Provisioning template {template.name} is not a FLEET_PROVISIONING template")
    expiration = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=cp.claim_ttl)
    cert_pem, key_pem = cp.ca.create_keys_and_certificate(not_after=expiration)
    cert = cp.registry.add_certificate(cert_pem, "ACTIVE", ca_certificate_id=cp.ca.issuing_ca_id)
    return {
        "certificateId": cert.certificate_id,
        "certificatePem": cert.pem,
        "keyPair": {"PublicKey": _public_key_pem(cert_pem), "PrivateKey": key_pem},
        "expiration": expiration.timestamp(),
    }


# endpoint

_ENDPOINT_TYPES = ("iot:Data", "iot:Data-ATS", "iot:CredentialProvider", "iot:Jobs")


@_operation("DescribeEndpoint")
def _describe_endpoint(cp: ControlPlane, params: dict[str, Any]) -> Mapping[str, Any]:
    endpoint_type = params.get("endpointType", "iot:Data")
    if endpoint_type not in _ENDPOINT_TYPES:
        raise InvalidRequest(
            f"endpointType must be one of {', '.join(_ENDPOINT_TYPES)}, not {endpoint_type!r}"
        )
    return {"endpointAddress": cp.endpoint_address()}


SUPPORTED_OPERATIONS = frozenset(_HANDLERS)


# ---- HTTP ---------------------------------------------------------------------------------------


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
            operation, labels = _route(self.command, url.path, query)
            operation_name = operation.name
            handler = _HANDLERS.get(operation.name)
            if handler is None:
                raise InvalidRequest(f"Operation {operation.name} is not supported by iot-core-local")
            headers = {k.lower(): v for k, v in self.headers.items()}
            params = _parse_request(operation, labels, query, headers, body)
            output = handler(self.server.control_plane, params)
            status, extra_headers, payload = _serialise_response(operation, output)
        except ServiceError as exc:
            status, extra_headers, payload = self._error(exc)
        except Exception:
            # Never a traceback on the wire; the log keeps it for whoever runs the server.
            log.exception("%s %s failed", self.command, self.path)
            status, extra_headers, payload = self._error(ServiceError("Internal error in iot-core-local"))
        self._send(status, extra_headers, payload)
        log.info(
            "%s %s %s -> %d (%.1f ms)",
            operation_name,
            self.command,
            urllib.parse.urlsplit(self.path).path,
            status,
            (time.perf_counter() - started) * 1000,
        )

    def _local(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """The stand-in's own endpoints, outside AWS's API: `/_local/faults` (see faults.py)."""
        faults = self.server.control_plane.faults
        if path.rstrip("/") != _LOCAL_PREFIX + "faults" or faults is None:
            return 404, {}, json.dumps({"message": f"No such local endpoint: {_clip(path)}"}).encode()
        if self.command == "POST":
            try:
                data = json.loads(body or b"null")
                fault = faults.arm(faults_from_json(data))
            except ValueError as e:  # JSONDecodeError is a ValueError
                return 400, {}, json.dumps({"message": f"Bad fault: {e}"}).encode()
            log.info("fault armed over HTTP: %s", fault.describe())
            return 200, {}, json.dumps({"fault": fault.to_json(), "faults": faults.to_json()}).encode()
        if self.command == "DELETE":
            faults.clear()
            log.info("faults cleared over HTTP")
        elif self.command not in ("GET", "HEAD"):
            return 405, {}, json.dumps({"message": "Use GET, POST or DELETE"}).encode()
        return 200, {}, json.dumps({"faults": faults.to_json()}).encode()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            self.close_connection = True
            raise InvalidRequest("Transfer-Encoding is not supported; send Content-Length")
        text = self.headers.get("Content-Length", "0") or "0"
        try:
            length = int(text)
        except ValueError:
            self.close_connection = True
            raise InvalidRequest(f"Content-Length {_clip(text)!r} is not a number") from None
        if length < 0:
            self.close_connection = True
            raise InvalidRequest("Content-Length is negative")
        if length > MAX_BODY:
            self.close_connection = True  # the unread body would be taken for the next request
            raise InvalidRequest(f"The request body is larger than {MAX_BODY} bytes")
        return self.rfile.read(length) if length else b""

    @staticmethod
    def _error(exc: ServiceError) -> tuple[int, dict[str, str], bytes]:
        return exc.status, {"x-amzn-ErrorType": exc.error_type}, json.dumps(exc.body()).encode()

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
        log.debug("%s - " + format, self.address_string(), *args)


def _request_id() -> str:
    return str(uuid.uuid4())


class ControlPlane:
    """The HTTP control plane. `start()` binds (port 0 picks a free port); `stop()` closes everything."""

    def __init__(
        self,
        registry: Registry,
        ca: CertificateAuthority,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        endpoint_address: Callable[[], str] = lambda: "127.0.0.1",
        claim_ttl: float = CLAIM_TTL,
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

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the control plane is already running")
        service_model()  # load the model now, not on the first request
        _routes()
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
