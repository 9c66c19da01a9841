"""The control plane, driven only through boto3 (and raw HTTP for the fuzz test)."""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.client
import json
import socket
import sqlite3
import urllib.parse
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import boto3
import botocore.session
import pytest
from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iot_core_local.ca import CertificateAuthority
from iot_core_local.control_plane import ControlPlane, RestJsonService
from iot_core_local.registry import Registry
from tests._support.clients import iot_client as cp_make_client

ROLE = "arn:aws:iam::123456789012:role/provisioning"
POLICY = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}]}
)
TEMPLATE = json.dumps(
    {
        "Parameters": {"SerialNumber": {"Type": "String"}},
        "Resources": {
            "thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": {"Ref": "SerialNumber"}}},
            "certificate": {
                "Type": "AWS::IoT::Certificate",
                "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"},
            },
        },
    }
)


def _code(call: Callable[[], Any]) -> str:
    with pytest.raises(ClientError) as exc:
        call()
    return str(exc.value.response["Error"]["Code"])


def _error(call: Callable[[], Any]) -> dict[str, Any]:
    with pytest.raises(ClientError) as exc:
        call()
    return dict(exc.value.response["Error"])


def _csr(key: Any | None = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


class _Ca:
    """A customer's own CA (for RegisterCACertificate, RegisterCertificate and JITR)."""

    def __init__(self, name: str = "Customer CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = self._build(self.name, self.key.public_key(), ca=True)

    def _build(self, subject: x509.Name, public_key: Any, *, ca: bool, days: int = 30) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1 + max(0, -days)))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def issue(self, common_name: str = "device", days: int = 30) -> str:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        return (
            self._build(subject, key.public_key(), ca=False, days=days)
            .public_bytes(serialization.Encoding.PEM)
            .decode()
        )


# ---- certificates -------------------------------------------------------------------------------


def test_create_keys_and_certificate(cp_client: Any) -> None:
    created = cp_client.create_keys_and_certificate(setAsActive=True)
    assert created["keyPair"]["PrivateKey"].startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert created["keyPair"]["PublicKey"].startswith("-----BEGIN PUBLIC KEY-----")
    assert created["certificateArn"].endswith(f":cert/{created['certificateId']}")
    description = cp_client.describe_certificate(certificateId=created["certificateId"])[
        "certificateDescription"
    ]
    assert description["status"] == "ACTIVE"
    assert description["certificatePem"] == created["certificatePem"]
    assert description["ownedBy"] == "123456789012"
    assert description["validity"]["notAfter"].year == 2049
    assert isinstance(description["creationDate"], datetime.datetime)
    inactive = cp_client.create_keys_and_certificate()
    assert (
        cp_client.describe_certificate(certificateId=inactive["certificateId"])["certificateDescription"][
            "status"
        ]
        == "INACTIVE"
    )


def test_create_certificate_from_csr(cp_client: Any, cp_ca: CertificateAuthority) -> None:
    created = cp_client.create_certificate_from_csr(certificateSigningRequest=_csr(), setAsActive=True)
    cert = x509.load_pem_x509_certificate(created["certificatePem"].encode())
    cert.verify_directly_issued_by(cp_ca.issuing_ca)
    assert cert.subject.rfc4514_string() == "CN=AWS IoT Certificate"
    by_ca = cp_client.list_certificates_by_ca(caCertificateId=cp_ca.issuing_ca_id)["certificates"]
    assert [c["certificateId"] for c in by_ca] == [created["certificateId"]]
    weak = _error(
        lambda: cp_client.create_certificate_from_csr(
            certificateSigningRequest=_csr(rsa.generate_private_key(65537, 1024))
        )
    )
    assert weak["Code"] == "InvalidRequestException"
    assert "RSA 1024" in weak["Message"]
    garbage = _error(lambda: cp_client.create_certificate_from_csr(certificateSigningRequest="not a csr"))
    assert garbage["Code"] == "InvalidRequestException"
    assert "does not parse" in garbage["Message"]


def test_update_list_and_delete_certificates(cp_client: Any, cp_registry: Registry) -> None:
    seen: list[tuple[str, str]] = []
    cp_registry.add_listener(lambda cid, status: seen.append((cid, status)))
    ids = [cp_client.create_keys_and_certificate(setAsActive=True)["certificateId"] for _ in range(3)]
    cp_client.update_certificate(certificateId=ids[0], newStatus="REVOKED")
    assert seen == [(ids[0], "REVOKED")]
    assert _code(lambda: cp_client.update_certificate(certificateId=ids[0], newStatus="ACTIVE")) == (
        "CertificateStateException"
    )
    assert _code(
        lambda: cp_client.update_certificate(certificateId=ids[1], newStatus="PENDING_ACTIVATION")
    ) == ("InvalidRequestException")
    assert _code(lambda: cp_client.update_certificate(certificateId="0" * 64, newStatus="ACTIVE")) == (
        "ResourceNotFoundException"
    )

    first = cp_client.list_certificates(pageSize=2, ascendingOrder=True)
    assert [c["certificateId"] for c in first["certificates"]] == ids[:2]
    second = cp_client.list_certificates(pageSize=2, marker=first["nextMarker"], ascendingOrder=True)
    assert [c["certificateId"] for c in second["certificates"]] == ids[2:]
    assert "nextMarker" not in second
    paginated = [
        c["certificateId"]
        for page in cp_client.get_paginator("list_certificates").paginate(PaginationConfig={"PageSize": 1})
        for c in page["certificates"]
    ]
    assert sorted(paginated) == sorted(ids)

    assert _code(lambda: cp_client.delete_certificate(certificateId=ids[1])) == "CertificateStateException"
    cp_client.create_policy(policyName="p", policyDocument=POLICY)
    arn = cp_client.describe_certificate(certificateId=ids[0])["certificateDescription"]["certificateArn"]
    cp_client.attach_policy(policyName="p", target=arn)
    assert _code(lambda: cp_client.delete_certificate(certificateId=ids[0])) == "DeleteConflictException"
    cp_client.delete_certificate(certificateId=ids[0], forceDelete=True)
    assert seen[-1] == (ids[0], "DELETED")
    assert _code(lambda: cp_client.describe_certificate(certificateId=ids[0])) == "ResourceNotFoundException"


def test_register_certificate_without_ca(cp_client: Any) -> None:
    pem = _Ca().issue()
    registered = cp_client.register_certificate_without_ca(certificatePem=pem, status="ACTIVE")
    description = cp_client.describe_certificate(certificateId=registered["certificateId"])[
        "certificateDescription"
    ]
    assert (description["status"], description["certificateMode"]) == ("ACTIVE", "SNI_ONLY")
    again = _error(lambda: cp_client.register_certificate_without_ca(certificatePem=pem))
    assert again["Code"] == "ResourceAlreadyExistsException"
    assert _code(lambda: cp_client.register_certificate_without_ca(certificatePem=_Ca().issue(days=-2))) == (
        "CertificateValidationException"
    )


# ---- CA certificates ----------------------------------------------------------------------------


def _register_ca(client: Any, ca: _Ca, **kwargs: Any) -> str:
    code = client.get_registration_code()["registrationCode"]
    verification = ca.issue(common_name=code)
    return str(
        client.register_ca_certificate(caCertificate=ca.pem, verificationCertificate=verification, **kwargs)[
            "certificateId"
        ]
    )


def test_register_ca_certificate_default_mode(cp_client: Any) -> None:
    code = cp_client.get_registration_code()["registrationCode"]
    assert code == cp_client.get_registration_code()["registrationCode"]
    assert len(code) == 64
    ca = _Ca()
    assert _code(lambda: cp_client.register_ca_certificate(caCertificate=ca.pem)) == "InvalidRequestException"
    wrong_cn = ca.issue(common_name="not the code")
    assert _code(
        lambda: cp_client.register_ca_certificate(caCertificate=ca.pem, verificationCertificate=wrong_cn)
    ) == ("RegistrationCodeValidationException")
    other_signer = _Ca().issue(common_name=code)
    assert (
        _code(
            lambda: cp_client.register_ca_certificate(
                caCertificate=ca.pem, verificationCertificate=other_signer
            )
        )
        == "CertificateValidationException"
    )
    assert (
        _code(
            lambda: cp_client.register_ca_certificate(
                caCertificate=ca.issue(), verificationCertificate=other_signer
            )
        )
        == "CertificateValidationException"
    )  # not a CA certificate

    ca_id = _register_ca(
        cp_client,
        ca,
        setAsActive=True,
        allowAutoRegistration=True,
        registrationConfig={"templateBody": TEMPLATE, "roleArn": ROLE},
    )
    described = cp_client.describe_ca_certificate(certificateId=ca_id)
    assert described["certificateDescription"]["status"] == "ACTIVE"
    assert described["certificateDescription"]["autoRegistrationStatus"] == "ENABLE"
    assert described["certificateDescription"]["certificateMode"] == "DEFAULT"
    assert described["registrationConfig"] == {"templateBody": TEMPLATE, "roleArn": ROLE}
    assert _code(lambda: _register_ca(cp_client, ca)) == "ResourceAlreadyExistsException"
    assert [c["certificateId"] for c in cp_client.list_ca_certificates()["certificates"]] == [ca_id]


def test_register_certificate_with_a_registered_ca(cp_client: Any) -> None:
    ca = _Ca()
    device = ca.issue()
    assert (
        _code(lambda: cp_client.register_certificate(certificatePem=device))
        == "CertificateValidationException"
    )
    ca_id = cp_client.register_ca_certificate(caCertificate=ca.pem, certificateMode="SNI_ONLY")[
        "certificateId"
    ]
    assert _code(lambda: cp_client.register_certificate(certificatePem=device, status="ACTIVE")) == (
        "CertificateStateException"  # its CA is still INACTIVE
    )
    cp_client.update_ca_certificate(
        certificateId=ca_id, newStatus="ACTIVE", newAutoRegistrationStatus="ENABLE"
    )
    registered = cp_client.register_certificate(
        certificatePem=device, caCertificatePem=ca.pem, setAsActive=True
    )
    description = cp_client.describe_certificate(certificateId=registered["certificateId"])[
        "certificateDescription"
    ]
    assert (description["caCertificateId"], description["status"], description["certificateMode"]) == (
        ca_id,
        "ACTIVE",
        "SNI_ONLY",
    )
    by_ca = cp_client.list_certificates_by_ca(caCertificateId=ca_id)["certificates"]
    assert [c["certificateId"] for c in by_ca] == [registered["certificateId"]]
    found = cp_client.register_certificate(certificatePem=ca.issue())  # CA found from the issuer
    assert (
        cp_client.describe_certificate(certificateId=found["certificateId"])["certificateDescription"][
            "caCertificateId"
        ]
        == ca_id
    )
    assert _code(
        lambda: cp_client.register_certificate(certificatePem=_Ca().issue(), caCertificatePem=ca.pem)
    ) == ("CertificateValidationException")


def test_update_and_delete_ca_certificate(cp_client: Any) -> None:
    cp_client.create_provisioning_template(
        templateName="jitp", templateBody=TEMPLATE, provisioningRoleArn=ROLE, type="JITP", enabled=True
    )
    ca_id = cp_client.register_ca_certificate(
        caCertificate=_Ca().pem, certificateMode="SNI_ONLY", setAsActive=True
    )["certificateId"]
    cp_client.update_ca_certificate(certificateId=ca_id, registrationConfig={"templateName": "jitp"})
    assert cp_client.describe_ca_certificate(certificateId=ca_id)["registrationConfig"] == {
        "templateName": "jitp"
    }
    assert [
        c["certificateId"] for c in cp_client.list_ca_certificates(templateName="jitp")["certificates"]
    ] == [ca_id]
    assert (
        _code(lambda: cp_client.delete_provisioning_template(templateName="jitp"))
        == "DeleteConflictException"
    )
    assert (
        _code(
            lambda: cp_client.update_ca_certificate(
                certificateId=ca_id, registrationConfig={"templateName": "nope"}
            )
        )
        == "ResourceNotFoundException"
    )
    cp_client.update_ca_certificate(certificateId=ca_id, removeAutoRegistration=True)
    assert "registrationConfig" not in cp_client.describe_ca_certificate(certificateId=ca_id)
    assert _code(lambda: cp_client.delete_ca_certificate(certificateId=ca_id)) == "CertificateStateException"
    cp_client.update_ca_certificate(certificateId=ca_id, newStatus="INACTIVE")
    cp_client.delete_ca_certificate(certificateId=ca_id)
    assert (
        _code(lambda: cp_client.describe_ca_certificate(certificateId=ca_id)) == "ResourceNotFoundException"
    )


# ---- policies -----------------------------------------------------------------------------------


def test_policies(cp_client: Any) -> None:
    created = cp_client.create_policy(policyName="hub", policyDocument=POLICY)
    assert created["policyArn"] == "arn:aws:iot:us-east-1:123456789012:policy/hub"
    assert created["policyVersionId"] == "1"
    got = cp_client.get_policy(policyName="hub")
    assert (got["policyDocument"], got["defaultVersionId"]) == (POLICY, "1")
    assert _code(lambda: cp_client.create_policy(policyName="hub", policyDocument=POLICY)) == (
        "ResourceAlreadyExistsException"
    )
    malformed = _error(lambda: cp_client.create_policy(policyName="bad", policyDocument="{not json"))
    assert malformed["Code"] == "MalformedPolicyException"
    assert _code(lambda: cp_client.get_policy(policyName="missing")) == "ResourceNotFoundException"
    assert _code(lambda: cp_client.create_policy(policyName="bad name!", policyDocument=POLICY)) == (
        "InvalidRequestException"
    )

    cert = cp_client.create_keys_and_certificate()
    arn = cert["certificateArn"]
    cp_client.attach_policy(policyName="hub", target=arn)
    cp_client.attach_principal_policy(policyName="hub", principal=arn)  # legacy call, same attachment
    assert [p["policyName"] for p in cp_client.list_attached_policies(target=arn)["policies"]] == ["hub"]
    assert [p["policyName"] for p in cp_client.list_principal_policies(principal=arn)["policies"]] == ["hub"]
    assert cp_client.list_targets_for_policy(policyName="hub")["targets"] == [arn]
    assert _code(lambda: cp_client.delete_policy(policyName="hub")) == "DeleteConflictException"
    assert (
        _code(lambda: cp_client.attach_policy(policyName="missing", target=arn))
        == "ResourceNotFoundException"
    )
    assert (
        _code(lambda: cp_client.attach_policy(policyName="hub", target="not-an-arn"))
        == "InvalidRequestException"
    )
    cp_client.detach_policy(policyName="hub", target=arn)
    assert cp_client.list_attached_policies(target=arn)["policies"] == []
    cp_client.create_policy(policyName="another", policyDocument=POLICY)
    assert [p["policyName"] for p in cp_client.list_policies(ascendingOrder=True)["policies"]] == [
        "another",
        "hub",
    ]
    cp_client.delete_policy(policyName="hub")
    assert _code(lambda: cp_client.delete_policy(policyName="hub")) == "ResourceNotFoundException"


# ---- things -------------------------------------------------------------------------------------


def test_things(cp_client: Any) -> None:
    created = cp_client.create_thing(thingName="hub-1", attributePayload={"attributes": {"model": "x1"}})
    assert created["thingArn"].endswith(":thing/hub-1")
    assert (
        cp_client.create_thing(thingName="hub-1", attributePayload={"attributes": {"model": "x1"}})["thingId"]
        == created["thingId"]
    )
    conflict = _error(lambda: cp_client.create_thing(thingName="hub-1", thingTypeName="other"))
    assert conflict["Code"] == "ResourceAlreadyExistsException"
    described = cp_client.describe_thing(thingName="hub-1")
    assert (described["defaultClientId"], described["attributes"], described["version"]) == (
        "hub-1",
        {"model": "x1"},
        1,
    )

    cp_client.update_thing(thingName="hub-1", attributePayload={"attributes": {"fw": "2"}, "merge": True})
    assert cp_client.describe_thing(thingName="hub-1")["attributes"] == {"model": "x1", "fw": "2"}
    cp_client.update_thing(thingName="hub-1", attributePayload={"attributes": {"fw": "3"}})
    assert cp_client.describe_thing(thingName="hub-1")["attributes"] == {"fw": "3"}
    assert _code(lambda: cp_client.update_thing(thingName="hub-1", thingTypeName="t", expectedVersion=1)) == (
        "VersionConflictException"
    )
    assert (
        _code(lambda: cp_client.update_thing(thingName="nope", thingTypeName="t"))
        == "ResourceNotFoundException"
    )

    for i in range(2, 5):
        cp_client.create_thing(thingName=f"hub-{i}", attributePayload={"attributes": {"fw": str(i)}})
    page = cp_client.list_things(maxResults=3)
    assert len(page["things"]) == 3
    rest = cp_client.list_things(maxResults=3, nextToken=page["nextToken"])
    assert len(rest["things"]) == 1
    assert [
        t["thingName"] for t in cp_client.list_things(attributeName="fw", attributeValue="3")["things"]
    ] == [
        "hub-1",
        "hub-3",
    ]

    cert = cp_client.create_keys_and_certificate()
    arn = cert["certificateArn"]
    cp_client.attach_thing_principal(thingName="hub-1", principal=arn)
    assert cp_client.list_thing_principals(thingName="hub-1")["principals"] == [arn]
    assert cp_client.list_principal_things(principal=arn)["things"] == ["hub-1"]
    assert _code(lambda: cp_client.attach_thing_principal(thingName="nope", principal=arn)) == (
        "ResourceNotFoundException"
    )
    missing_cert = arn[:-64] + "0" * 64
    assert _code(lambda: cp_client.attach_thing_principal(thingName="hub-1", principal=missing_cert)) == (
        "ResourceNotFoundException"
    )
    assert _code(lambda: cp_client.delete_thing(thingName="hub-1")) == "InvalidRequestException"
    assert (
        _code(lambda: cp_client.delete_certificate(certificateId=cert["certificateId"]))
        == "DeleteConflictException"
    )
    cp_client.detach_thing_principal(thingName="hub-1", principal=arn)
    cp_client.delete_thing(thingName="hub-1")
    cp_client.delete_thing(thingName="hub-1")  # AWS: deleting a missing thing succeeds
    assert _code(lambda: cp_client.describe_thing(thingName="hub-1")) == "ResourceNotFoundException"
    assert _code(lambda: cp_client.list_thing_principals(thingName="hub-1")) == "ResourceNotFoundException"


# ---- provisioning templates and claims ----------------------------------------------------------


def test_provisioning_templates(cp_client: Any) -> None:
    hook = {"targetArn": "http://127.0.0.1:9/hook", "payloadVersion": "2020-04-01"}
    created = cp_client.create_provisioning_template(
        templateName="fleet",
        templateBody=TEMPLATE,
        provisioningRoleArn=ROLE,
        enabled=True,
        description="hubs",
        preProvisioningHook=hook,
    )
    assert created["templateArn"].endswith(":provisioningtemplate/fleet")
    assert created["defaultVersionId"] == 1
    described = cp_client.describe_provisioning_template(templateName="fleet")
    assert (described["templateBody"], described["enabled"], described["type"]) == (
        TEMPLATE,
        True,
        "FLEET_PROVISIONING",
    )
    assert described["preProvisioningHook"] == hook
    assert (
        _code(
            lambda: cp_client.create_provisioning_template(
                templateName="fleet", templateBody=TEMPLATE, provisioningRoleArn=ROLE
            )
        )
        == "ResourceAlreadyExistsException"
    )

    cp_client.update_provisioning_template(
        templateName="fleet", enabled=False, removePreProvisioningHook=True
    )
    described = cp_client.describe_provisioning_template(templateName="fleet")
    assert described["enabled"] is False
    assert "preProvisioningHook" not in described
    version = cp_client.create_provisioning_template_version(
        templateName="fleet", templateBody=TEMPLATE, setAsDefault=True
    )
    assert version["versionId"] == 2
    assert [t["templateName"] for t in cp_client.list_provisioning_templates()["templates"]] == ["fleet"]
    assert _code(lambda: cp_client.update_provisioning_template(templateName="nope", enabled=True)) == (
        "ResourceNotFoundException"
    )
    cp_client.delete_provisioning_template(templateName="fleet")
    assert (
        _code(lambda: cp_client.describe_provisioning_template(templateName="fleet"))
        == "ResourceNotFoundException"
    )
    assert (
        _code(lambda: cp_client.delete_provisioning_template(templateName="fleet"))
        == "ResourceNotFoundException"
    )


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ("{not json", "JSON"),
        ("[]", "object"),
        (json.dumps({"Parameters": {}}), "Resources"),
        (json.dumps({"Resources": {}, "Outputs": {}}), "Outputs"),
    ],
)
def test_bad_template_body_is_named(cp_client: Any, body: str, words: str) -> None:
    error = _error(
        lambda: cp_client.create_provisioning_template(
            templateName="bad", templateBody=body, provisioningRoleArn=ROLE
        )
    )
    assert error["Code"] == "InvalidRequestException"
    assert words in error["Message"]


def test_template_name_and_hook_constraints(cp_client: Any) -> None:
    error = _error(
        lambda: cp_client.create_provisioning_template(
            templateName="bad name", templateBody=TEMPLATE, provisioningRoleArn=ROLE
        )
    )
    assert error["Code"] == "InvalidRequestException"
    assert "templateName" in error["Message"]
    assert (
        _code(
            lambda: cp_client.create_provisioning_template(
                templateName="jitp",
                templateBody=TEMPLATE,
                provisioningRoleArn=ROLE,
                type="JITP",
                preProvisioningHook={"targetArn": "http://x"},
            )
        )
        == "InvalidRequestException"
    )


def test_provisioning_claim(cp_client: Any, cp_ca: CertificateAuthority) -> None:
    assert (
        _code(lambda: cp_client.create_provisioning_claim(templateName="fleet"))
        == "ResourceNotFoundException"
    )
    cp_client.create_provisioning_template(
        templateName="fleet", templateBody=TEMPLATE, provisioningRoleArn=ROLE
    )
    claim = cp_client.create_provisioning_claim(templateName="fleet")
    cert = x509.load_pem_x509_certificate(claim["certificatePem"].encode())
    cert.verify_directly_issued_by(cp_ca.issuing_ca)
    now = datetime.datetime.now(datetime.UTC)
    assert now < claim["expiration"] <= now + datetime.timedelta(minutes=5, seconds=5)
    assert abs((cert.not_valid_after_utc - claim["expiration"]).total_seconds()) < 1
    assert claim["keyPair"]["PrivateKey"].startswith("-----BEGIN RSA PRIVATE KEY-----")
    status = cp_client.describe_certificate(certificateId=claim["certificateId"])["certificateDescription"][
        "status"
    ]
    assert status == "ACTIVE"


def test_describe_endpoint(cp_client: Any) -> None:
    assert cp_client.describe_endpoint(endpointType="iot:Data-ATS")["endpointAddress"] == "localhost"
    assert cp_client.describe_endpoint()["endpointAddress"] == "localhost"


# ---- protocol edges -----------------------------------------------------------------------------


def _raw(
    plane: ControlPlane, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", plane.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_error_answers_on_the_wire(cp_plane: ControlPlane) -> None:
    status, headers, body = _raw(cp_plane, "POST", "/things/x", b"{broken")
    assert status == 400
    assert headers["x-amzn-errortype"] == "InvalidRequestException"
    assert "not valid JSON" in json.loads(body)["message"]

    status, headers, body = _raw(cp_plane, "GET", "/no/such/route")
    assert status == 404
    assert "No AWS IoT operation matches GET /no/such/route" in json.loads(body)["message"]

    status, headers, body = _raw(cp_plane, "GET", "/dimensions")  # in the model, not implemented
    assert status == 400
    assert json.loads(body)["message"] == "Operation ListDimensions is not supported by iot-core-local"

    status, _, body = _raw(cp_plane, "POST", "/provisioning-templates", b"{}")
    assert status == 400
    assert "templateName is required" in json.loads(body)["message"]

    status, _, body = _raw(cp_plane, "GET", "/certificates/xyz")  # botocore itself would refuse to send it
    assert status == 400
    assert "certificateId" in json.loads(body)["message"]

    status, _, body = _raw(cp_plane, "GET", "/things?maxResults=abc")
    assert status == 400
    assert "maxResults" in json.loads(body)["message"]

    status, _, body = _raw(cp_plane, "POST", "/things/x", b"x" * 10, {"Content-Length": str(2 << 20)})
    assert status == 400

    _raw(cp_plane, "POST", "/things/dup", b"{}")
    status, headers, body = _raw(cp_plane, "POST", "/things/dup", b'{"thingTypeName": "other"}')
    assert status == 409
    assert json.loads(body)["resourceArn"].endswith(":thing/dup")


def test_a_json_integer_past_pythons_digit_limit_is_a_400_not_a_500(cp_plane: ControlPlane) -> None:
    # int() refuses more than 4,300 digits with a ValueError: bad input, as any other unparsable body.
    huge = b"1" + b"0" * 5000
    for path, body in (
        ("/things/big", b'{"thingTypeName": ' + huge + b"}"),
        ("/policies/big", b'{"policyDocument": ' + huge + b"}"),
    ):
        status, headers, answer = _raw(cp_plane, "POST", path, body)
        assert status == 400
        assert headers["x-amzn-errortype"] == "InvalidRequestException"
        message = json.loads(answer)["message"]
        assert message == "The request body is not valid JSON: it has an integer of more than 4300 digits"


def test_unexpected_errors_stay_clean(
    cp_client: Any, cp_plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(cp_plane.registry, "list_things", explode)
    status, headers, body = _raw(cp_plane, "GET", "/things")
    assert status == 500
    assert headers["x-amzn-errortype"] == "InternalFailureException"
    assert b"secret internal detail" not in body
    assert b"Traceback" not in body


def test_forged_pagination_tokens_are_invalid_requests(cp_client: Any) -> None:
    # The old offsets (base64 of a number), past 64 bits or not, and anything else not handed out.
    cp_client.create_keys_and_certificate()
    for marker in (
        base64.b64encode(str(2**63).encode()).decode(),
        base64.b64encode(str(2**63 - 1).encode()).decode(),
        base64.b64encode(b"2").decode(),
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ):
        for call in (
            lambda m=marker: cp_client.list_certificates(marker=m),
            lambda m=marker: cp_client.list_certificates_by_ca(caCertificateId="0" * 64, marker=m),
            lambda m=marker: cp_client.list_things(nextToken=m),
            lambda m=marker: cp_client.list_policies(marker=m),
        ):
            error = _error(call)
            assert error["Code"] == "InvalidRequestException"
            assert "pagination token" in error["Message"]


def test_deleting_while_paging_skips_nothing(cp_client: Any) -> None:
    """The usual clean-up loop (page with boto3's paginator, delete what each page lists) removes every
    item: a page resumes after the last item handed out, not at an offset the deletions have moved."""
    for i in range(8):
        cp_client.create_thing(thingName=f"zz-del-{i}")
    deleted = []
    for page in cp_client.get_paginator("list_things").paginate(PaginationConfig={"PageSize": 2}):
        for thing in page["things"]:
            cp_client.delete_thing(thingName=thing["thingName"])
            deleted.append(thing["thingName"])
    assert deleted == [f"zz-del-{i}" for i in range(8)]
    assert cp_client.list_things()["things"] == []
    for ascending in (True, False):
        names = [f"zz-pol-{i}" for i in range(7)]
        for name in names:
            cp_client.create_policy(policyName=name, policyDocument=POLICY)
        listed = []
        for page in cp_client.get_paginator("list_policies").paginate(
            ascendingOrder=ascending, PaginationConfig={"PageSize": 3}
        ):
            for policy in page["policies"]:
                cp_client.delete_policy(policyName=policy["policyName"])
                listed.append(policy["policyName"])
        assert listed == (names if ascending else names[::-1])
        assert cp_client.list_policies()["policies"] == []

    for ascending in (True, False):
        ids = [cp_client.create_keys_and_certificate()["certificateId"] for _ in range(6)]
        gone = []
        for page in cp_client.get_paginator("list_certificates").paginate(
            ascendingOrder=ascending, PaginationConfig={"PageSize": 2}
        ):
            for cert in page["certificates"]:
                cp_client.delete_certificate(certificateId=cert["certificateId"])
                gone.append(cert["certificateId"])
        assert gone == (ids if ascending else ids[::-1])
        assert cp_client.list_certificates()["certificates"] == []


def test_creating_while_paging_repeats_nothing(cp_client: Any) -> None:
    ids = [cp_client.create_keys_and_certificate()["certificateId"] for _ in range(4)]
    first = cp_client.list_certificates(pageSize=2, ascendingOrder=False)
    assert [c["certificateId"] for c in first["certificates"]] == ids[:1:-1]
    newer = cp_client.create_keys_and_certificate()["certificateId"]  # lands before the resume point
    rest = cp_client.list_certificates(pageSize=2, ascendingOrder=False, marker=first["nextMarker"])
    assert [c["certificateId"] for c in rest["certificates"]] == ids[1::-1]
    assert newer not in [c["certificateId"] for c in rest["certificates"]]


def test_a_token_is_valid_only_for_its_operation_and_parameters(cp_client: Any) -> None:
    for i in range(3):
        cp_client.create_thing(thingName=f"t{i}", attributePayload={"attributes": {"k": "v"}})
        cp_client.create_policy(policyName=f"p{i}", policyDocument=POLICY)
        cp_client.create_keys_and_certificate()
    token = cp_client.list_things(maxResults=1)["nextToken"]
    assert [t["thingName"] for t in cp_client.list_things(maxResults=1, nextToken=token)["things"]] == ["t1"]
    marker = cp_client.list_policies(pageSize=1)["nextMarker"]
    cert_marker = cp_client.list_certificates(pageSize=1)["nextMarker"]
    for call in (
        lambda: cp_client.list_policies(marker=token),  # another operation
        lambda: cp_client.list_things(nextToken=marker),
        lambda: cp_client.list_things(nextToken=token, attributeName="k"),  # another filter
        lambda: cp_client.list_policies(marker=marker, ascendingOrder=False),  # another order
        lambda: cp_client.list_certificates(marker=cert_marker, ascendingOrder=True),
        lambda: cp_client.list_certificates_by_ca(caCertificateId="0" * 64, marker=cert_marker),
        lambda: cp_client.list_things(nextToken=token[:-2] + ("AA" if token[-2:] != "AA" else "BB")),
    ):
        error = _error(call)
        assert error["Code"] == "InvalidRequestException"
        assert "pagination token" in error["Message"]
        assert "same parameters" in error["Message"]


def test_a_second_service_is_hosted_by_registering_it(
    cp_registry: Registry, cp_ca: CertificateAuthority
) -> None:
    # AWS IoT and managed integrations both have GET /destinations/{...}: the signature's service decides.
    model = botocore.session.get_session().get_service_model("iot-managed-integrations")
    seen: list[tuple[str, str]] = []

    def get_managed_thing(context: str, params: dict[str, Any]) -> dict[str, Any]:
        seen.append((context, params["Identifier"]))
        return {"Id": params["Identifier"], "Name": "hub"}

    def get_destination(context: str, params: dict[str, Any]) -> dict[str, Any]:
        return {"Name": params["Name"], "DeliveryDestinationArn": "arn:x"}

    plane = ControlPlane(cp_registry, cp_ca, port=0)
    plane.host_service(
        RestJsonService[str](
            model, {"GetManagedThing": get_managed_thing, "GetDestination": get_destination}
        ),
        "context",
    )
    plane.start()
    try:
        with pytest.raises(RuntimeError):
            plane.host_service(RestJsonService[str](model, {}), "late")
        managed = boto3.client(
            "iot-managed-integrations",
            endpoint_url=plane.url,
            region_name="us-east-1",
            aws_access_key_id="x",
            aws_secret_access_key="x",
        )
        thing = managed.get_managed_thing(Identifier="thing-1")
        assert (thing["Id"], thing["Name"]) == ("thing-1", "hub")
        assert seen == [("context", "thing-1")]
        assert managed.get_destination(Name="d1")["DeliveryDestinationArn"] == "arn:x"
        iot = cp_make_client(plane.url)
        unsupported = _error(lambda: iot.get_topic_rule_destination(arn="arn:aws:iot:us-east-1:1:d/x"))
        assert (
            unsupported["Message"] == "Operation GetTopicRuleDestination is not supported by iot-core-local"
        )
        assert iot.create_thing(thingName="still-iot")["thingName"] == "still-iot"
        # Unsigned, a request goes to the first service with the route: AWS IoT, hosted first.
        status, _, body = _raw(plane, "GET", "/destinations/d1")
        assert (status, json.loads(body)["message"]) == (
            400,
            "Operation GetTopicRuleDestination is not supported by iot-core-local",
        )
        status, _, body = _raw(plane, "GET", "/managed-things/thing-2")
        assert status == 200
        assert json.loads(body) == {"Id": "thing-2", "Name": "hub"}
        status, _, body = _raw(plane, "GET", "/nowhere")
        assert (status, json.loads(body)["message"]) == (404, "No AWS IoT operation matches GET /nowhere")
    finally:
        plane.stop()


def test_state_survives_a_restart(tmp_path: Path, cp_ca: CertificateAuthority) -> None:
    path = tmp_path / "restart.sqlite3"

    def serve() -> Generator[Any, None, None]:
        registry = Registry(path)
        plane = ControlPlane(registry, cp_ca, port=0)
        plane.start()
        try:
            yield cp_make_client(plane.url)
        finally:
            plane.stop()
            registry.close()

    first = serve()
    client = next(first)
    cert = client.create_keys_and_certificate(setAsActive=True)
    client.create_thing(thingName="kept", attributePayload={"attributes": {"a": "b"}})
    client.attach_thing_principal(thingName="kept", principal=cert["certificateArn"])
    client.create_policy(policyName="kept", policyDocument=POLICY)
    client.create_provisioning_template(templateName="kept", templateBody=TEMPLATE, provisioningRoleArn=ROLE)
    code = client.get_registration_code()["registrationCode"]
    first.close()

    second = serve()
    client = next(second)
    assert (
        client.describe_certificate(certificateId=cert["certificateId"])["certificateDescription"]["status"]
        == "ACTIVE"
    )
    assert client.describe_thing(thingName="kept")["attributes"] == {"a": "b"}
    assert client.list_thing_principals(thingName="kept")["principals"] == [cert["certificateArn"]]
    assert client.get_policy(policyName="kept")["policyDocument"] == POLICY
    assert client.describe_provisioning_template(templateName="kept")["templateBody"] == TEMPLATE
    assert client.get_registration_code()["registrationCode"] == code
    second.close()


_METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"])
_SEGMENTS = st.sampled_from(
    [
        "things",
        "certificates",
        "cacertificate",
        "cacertificates",
        "policies",
        "target-policies",
        "attached-policies",
        "provisioning-templates",
        "provisioning-claim",
        "principals",
        "keys-and-certificate",
        "endpoint",
        "registrationcode",
        "certificate",
        "register",
        "register-no-ca",
        "policy-targets",
        "principal-policies",
        "certificates-by-ca",
        "versions",
        "x",
        "%2F",
        "..",
        "a" * 64,
        "0" * 64,
        "%00",
        "%ZZ",
        "\u00e9",
    ]
)
_QUERY = st.dictionaries(
    st.sampled_from(
        [
            "maxResults",
            "pageSize",
            "nextToken",
            "marker",
            "setAsActive",
            "newStatus",
            "forceDelete",
            "isAscendingOrder",
            "endpointType",
            "expectedVersion",
            "x",
        ]
    ),
    st.text(max_size=8),
    max_size=3,
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=10,
)
_BODY_KEYS = st.sampled_from(
    [
        "certificateSigningRequest",
        "certificatePem",
        "caCertificate",
        "policyDocument",
        "target",
        "templateName",
        "templateBody",
        "provisioningRoleArn",
        "attributePayload",
        "registrationConfig",
        "thingTypeName",
        "preProvisioningHook",
        "enabled",
        "status",
    ]
)
_BODIES = st.one_of(
    st.binary(max_size=64),
    _JSON.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(_BODY_KEYS, _JSON, max_size=5).map(lambda v: json.dumps(v).encode()),
)


def test_fuzz_never_500_and_the_server_keeps_serving(cp_plane: ControlPlane) -> None:
    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(method=_METHODS, segments=st.lists(_SEGMENTS, max_size=4), query=_QUERY, body=_BODIES)
    def one_request(method: str, segments: list[str], query: dict[str, str], body: bytes) -> None:
        path = "/" + "/".join(urllib.parse.quote(s, safe="%") for s in segments)
        if query:
            path += "?" + urllib.parse.urlencode(query)
        status, _, payload = _raw(cp_plane, method, path, body, {"Content-Type": "application/json"})
        assert status < 500, (method, path, body, payload)
        if status >= 400:
            assert "message" in json.loads(payload)

    one_request()

    # Garbage at the socket level: a TLS hello, a lying Content-Length, a request cut short.
    for junk in (
        b"\x16\x03\x01garbage\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 50\r\n\r\nshort",
        b"POST",
    ):
        with socket.create_connection(("127.0.0.1", cp_plane.port), timeout=5) as sock:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            with contextlib.suppress(TimeoutError):
                sock.recv(4096)

    client = cp_make_client(cp_plane.url)
    assert client.create_thing(thingName="still-here")["thingName"] == "still-here"
    assert client.describe_thing(thingName="still-here")["version"] == 1


def test_list_certificates_pages_in_sql_without_pems(
    tmp_path: Path, cp_ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The registry's SQL is watched through sqlite3's own trace hook, on the connection the registry opens.
    opened: list[sqlite3.Connection] = []
    connect = sqlite3.connect

    def recording_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        connection: sqlite3.Connection = connect(*args, **kwargs)
        opened.append(connection)
        return connection

    with monkeypatch.context() as patch:
        patch.setattr(sqlite3, "connect", recording_connect)
        registry = Registry(tmp_path / "traced.sqlite3")
    (connection,) = opened
    statements: list[str] = []
    plane = ControlPlane(registry, cp_ca, port=0)
    plane.start()
    try:
        client = cp_make_client(plane.url)
        ids = [client.create_keys_and_certificate(setAsActive=True)["certificateId"] for _ in range(5)]
        connection.set_trace_callback(statements.append)
        for order in (True, False):
            paged = [
                c["certificateId"]
                for page in client.get_paginator("list_certificates").paginate(
                    ascendingOrder=order, PaginationConfig={"PageSize": 2}
                )
                for c in page["certificates"]
            ]
            assert paged == (ids if order else ids[::-1])
        by_ca = client.list_certificates_by_ca(caCertificateId="0" * 64)
        assert by_ca["certificates"] == []
        connection.set_trace_callback(None)
    finally:
        plane.stop()
        registry.close()
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT") and "FROM certificates" in s]
    assert selects
    for statement in selects:
        assert "LIMIT" in statement, statement  # one page of rows, not the table
        assert " pem" not in statement, statement  # summaries do not carry PEMs


def _deeply_nested_template(depth: int) -> str:
    expr: Any = "x"
    for _ in range(depth):
        expr = {"Fn::Join": ["", [expr]]}
    return json.dumps({"Resources": {}, "DeviceConfiguration": {"v": expr}}, separators=(",", ":"))


def test_templates_nested_past_the_limit_are_a_400_naming_it(cp_client: Any) -> None:
    deep = _deeply_nested_template(200)  # a RecursionError (HTTP 500) before the limit existed
    cp_client.create_provisioning_template(templateName="ok", templateBody=TEMPLATE, provisioningRoleArn=ROLE)
    calls: dict[str, Callable[[], Any]] = {
        "create": lambda: cp_client.create_provisioning_template(
            templateName="deep", templateBody=deep, provisioningRoleArn=ROLE
        ),
        "version": lambda: cp_client.create_provisioning_template_version(
            templateName="ok", templateBody=deep
        ),
    }
    for name, call in calls.items():
        with pytest.raises(ClientError) as caught:
            call()
        error = caught.value.response["Error"]
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400, name
        assert error["Code"] == "InvalidRequestException", name
        assert "nests functions more than 32 deep, the limit" in error["Message"], name
    assert [t["templateName"] for t in cp_client.list_provisioning_templates()["templates"]] == ["ok"]
    assert cp_client.describe_provisioning_template(templateName="ok")["defaultVersionId"] == 1
