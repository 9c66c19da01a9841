"""Managed integrations on iot-core-local: boto3's `iot-managed-integrations` client for the control plane,
real MQTT over TLS (RawClient, the claim) for RegisterThing's matching, the gateway for connectivity."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from iot_core_local.errors import Validation
from iot_core_local.managed import CLAIM_DENIED_CLIENT_IDS, parse_material
from iot_core_local.server import LocalIotCore
from tests._support.certificates import pem_certificate_id
from tests._support.devices import Credentials, RawClient, make_csr, write_credentials

from .test_provisioning import CSR_TOPIC, register_topic, request

UPC = "829576019524"
_serials = iter(range(1_000_000))


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalIotCore]:
    with LocalIotCore(tmp_path_factory.mktemp("mi") / "data") as running:
        yield running


@pytest.fixture
def mi(core: LocalIotCore) -> Any:
    return core.endpoint.client(service="iot-managed-integrations")


def serial() -> str:
    return f"SN{next(_serials):08d}"


def create_hub(mi: Any, sn: str, code: str = UPC, **extra: Any) -> str:
    thing_id: str = mi.create_managed_thing(
        Role="CONTROLLER",
        AuthenticationMaterialType="WIFI_SETUP_QR_BAR_CODE",
        AuthenticationMaterial=f"SN:{sn};UPC:{code};",
        **extra,
    )["Id"]
    return thing_id


def error(exc: pytest.ExceptionInfo[botocore.exceptions.ClientError]) -> tuple[str, int, str]:
    response = exc.value.response
    return (
        response["Error"]["Code"],
        response["ResponseMetadata"]["HTTPStatusCode"],
        response["Error"]["Message"],
    )


@pytest.fixture
def profile(mi: Any, core: LocalIotCore, tmp_path: Path) -> tuple[dict[str, Any], Credentials]:
    created = mi.create_provisioning_profile(
        ProvisioningType="FLEET_PROVISIONING", Name=f"Prof{next(_serials)}"
    )
    claim_id = _certificate_id(created["ClaimCertificate"])
    creds = write_credentials(
        tmp_path, "claim", claim_id, created["ClaimCertificate"], created["ClaimCertificatePrivateKey"]
    )
    return created, creds


def _certificate_id(pem: str) -> str:
    return pem_certificate_id(pem.encode())


def register(client: RawClient, template: str, sn: str, code: str = UPC) -> tuple[str, Any]:
    """CreateCertificateFromCsr, then RegisterThing with this serial and product code."""
    outcome, issued = request(
        client, CSR_TOPIC, json.dumps({"certificateSigningRequest": make_csr()}).encode()
    )
    assert outcome == "accepted", issued
    body = {
        "certificateOwnershipToken": issued["certificateOwnershipToken"],
        "parameters": {"SerialNumber": sn, "UniversalProductCode": code},
    }
    outcome, answer = request(client, register_topic(template), json.dumps(body).encode())
    answer["certificateId"] = issued["certificateId"]
    return outcome, answer


# ---- control plane --------------------------------------------------------------------------------


def test_custom_endpoint_is_registered_once(core: LocalIotCore, tmp_path: Path) -> None:
    with LocalIotCore(tmp_path / "data") as fresh:
        mi = fresh.endpoint.client(service="iot-managed-integrations", region="eu-west-1")
        with pytest.raises(mi.exceptions.ResourceNotFoundException) as missing:
            mi.get_custom_endpoint()
        assert missing.value.response["ResourceType"] == "CustomEndpoint"
        assert mi.register_custom_endpoint()["EndpointAddress"] == "127.0.0.1"
        assert mi.get_custom_endpoint()["EndpointAddress"] == "127.0.0.1"
        with pytest.raises(mi.exceptions.ConflictException):
            mi.register_custom_endpoint()


def test_a_profile_stands_on_its_iot_resources(mi: Any, core: LocalIotCore) -> None:
    name = f"Stand{next(_serials)}"
    created = mi.create_provisioning_profile(
        ProvisioningType="FLEET_PROVISIONING", Name=name, Tags={"a": "1"}
    )
    assert created["ResponseMetadata"]["HTTPStatusCode"] == 201
    assert (
        created["Arn"]
        == f"arn:aws:iotmanagedintegrations:us-east-1:123456789012:provisioning-profile/{created['Id']}"
    )
    assert created["Status"] == "CREATED"
    assert created["ClaimCertificatePrivateKey"].startswith("-----BEGIN RSA PRIVATE KEY-----")
    iot = core.client()
    template = iot.describe_provisioning_template(templateName=name)
    assert template["enabled"]
    assert template["type"] == "FLEET_PROVISIONING"
    assert set(json.loads(template["templateBody"])["Parameters"]) >= {"SerialNumber", "UniversalProductCode"}
    claim_id = _certificate_id(created["ClaimCertificate"])
    policies = [
        p["policyName"]
        for p in iot.list_attached_policies(
            target=iot.describe_certificate(certificateId=claim_id)["certificateDescription"][
                "certificateArn"
            ]
        )["policies"]
    ]
    assert policies == [f"{name}-claim"]
    claim_policy = json.loads(iot.get_policy(policyName=f"{name}-claim")["policyDocument"])
    denied = [s for s in claim_policy["Statement"] if s["Effect"] == "Deny"]
    assert denied[0]["Resource"].endswith(f":client/{CLAIM_DENIED_CLIENT_IDS}")
    iot.get_policy(policyName=f"{name}-hub")

    got = mi.get_provisioning_profile(Identifier=created["Id"])
    assert "ClaimCertificatePrivateKey" not in got
    assert got["ClaimCertificate"] == created["ClaimCertificate"]
    assert got["Tags"] == {"a": "1"}
    listed = [p["Name"] for p in mi.list_provisioning_profiles()["Items"]]
    assert name in listed

    with pytest.raises(mi.exceptions.ConflictException):
        mi.create_provisioning_profile(ProvisioningType="FLEET_PROVISIONING", Name=name)

    mi.delete_provisioning_profile(Identifier=created["Id"])
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.describe_provisioning_template(templateName=name)
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.describe_certificate(certificateId=claim_id)
    with pytest.raises(mi.exceptions.ResourceNotFoundException) as gone:
        mi.get_provisioning_profile(Identifier=created["Id"])
    assert gone.value.response["ResourceId"] == created["Id"]
    assert gone.value.response["ResourceType"] == "ProvisioningProfile"


def test_client_token_makes_creation_idempotent(mi: Any) -> None:
    name = f"Tok{next(_serials)}"
    first = mi.create_provisioning_profile(ProvisioningType="FLEET_PROVISIONING", Name=name, ClientToken=name)
    again = mi.create_provisioning_profile(ProvisioningType="FLEET_PROVISIONING", Name=name, ClientToken=name)
    assert again["Id"] == first["Id"]
    assert again["ClaimCertificatePrivateKey"] == first["ClaimCertificatePrivateKey"]
    with pytest.raises(mi.exceptions.ConflictException):
        mi.create_provisioning_profile(
            ProvisioningType="FLEET_PROVISIONING", Name=name + "x", ClientToken=name
        )

    sn = serial()
    token = f"t{sn}"
    a = create_hub(mi, sn, ClientToken=token)
    assert create_hub(mi, sn, ClientToken=token) == a
    assert len(mi.list_managed_things(SerialNumberFilter=sn)["Items"]) == 1


def test_managed_things_are_created_read_listed_updated_and_deleted(mi: Any) -> None:
    sn = serial()
    thing_id = create_hub(mi, sn, Name="Living room hub", Tags={"site": "lab"})
    assert len(thing_id) == 32
    assert int(thing_id, 16) >= 0
    got = mi.get_managed_thing(Identifier=thing_id)
    assert got["ProvisioningStatus"] == "PRE_ASSOCIATED"
    assert (got["Role"], got["SerialNumber"], got["UniversalProductCode"]) == ("CONTROLLER", sn, UPC)
    assert got["Name"] == "Living room hub"
    assert "ActivatedAt" not in got

    with pytest.raises(mi.exceptions.ConflictException) as dup:
        create_hub(mi, sn)
    assert sn in error(dup)[2]

    mi.update_managed_thing(Identifier=thing_id, Brand="Acme", Name="Kitchen hub")
    got = mi.get_managed_thing(Identifier=thing_id)
    assert (got["Brand"], got["Name"]) == ("Acme", "Kitchen hub")

    ean_id = mi.create_managed_thing(
        Role="CONTROLLER",
        AuthenticationMaterialType="WIFI_SETUP_QR_BAR_CODE",
        AuthenticationMaterial=f"SN:{serial()};EAN:4006381333931",
    )["Id"]
    assert mi.get_managed_thing(Identifier=ean_id)["InternationalArticleNumber"] == "4006381333931"
    device_id = mi.create_managed_thing(
        Role="DEVICE", AuthenticationMaterialType="ZIGBEE_QR_BAR_CODE", AuthenticationMaterial="Z:0011"
    )["Id"]
    assert mi.get_managed_thing(Identifier=device_id)["ProvisioningStatus"] == "UNASSOCIATED"

    by_serial = mi.list_managed_things(SerialNumberFilter=sn)["Items"]
    assert [t["Id"] for t in by_serial] == [thing_id]
    devices = mi.list_managed_things(RoleFilter="DEVICE")["Items"]
    assert device_id in [t["Id"] for t in devices]
    assert thing_id not in [t["Id"] for t in devices]
    pre = mi.list_managed_things(ProvisioningStatusFilter="PRE_ASSOCIATED")["Items"]
    assert thing_id in [t["Id"] for t in pre]
    assert device_id not in [t["Id"] for t in pre]

    # Paging: every item once, in pages of MaxResults.
    everything = [t["Id"] for t in mi.list_managed_things()["Items"]]
    paged, token = [], None
    while True:
        page = mi.list_managed_things(MaxResults=2, **({"NextToken": token} if token else {}))
        assert len(page["Items"]) <= 2
        paged += [t["Id"] for t in page["Items"]]
        token = page.get("NextToken")
        if not token:
            break
    assert paged == everything
    assert [
        p["Id"]
        for p in mi.get_paginator("list_managed_things")
        .paginate(PaginationConfig={"PageSize": 3})
        .build_full_result()["Items"]
    ] == everything

    assert mi.delete_managed_thing(Identifier=thing_id)["ResponseMetadata"]["HTTPStatusCode"] == 204
    with pytest.raises(mi.exceptions.ResourceNotFoundException) as gone:
        mi.get_managed_thing(Identifier=thing_id)
    assert (gone.value.response["ResourceId"], gone.value.response["ResourceType"]) == (
        thing_id,
        "ManagedThing",
    )
    create_hub(mi, sn)  # the serial is free again


def test_tags_on_profiles_and_managed_things(mi: Any, profile: tuple[dict[str, Any], Credentials]) -> None:
    created, _ = profile
    thing_arn = mi.get_managed_thing(Identifier=create_hub(mi, serial()))["Arn"]
    for arn in (created["Arn"], thing_arn):
        mi.tag_resource(ResourceArn=arn, Tags={"team": "hubs", "floor": "2"})
        mi.untag_resource(ResourceArn=arn, TagKeys=["floor"])
        assert mi.list_tags_for_resource(ResourceArn=arn)["tags"] == {"team": "hubs"}
    unknown = thing_arn[:-32] + "0" * 32
    with pytest.raises(mi.exceptions.ResourceNotFoundException):
        mi.list_tags_for_resource(ResourceArn=unknown)
    with pytest.raises(mi.exceptions.InvalidRequestException):
        mi.tag_resource(ResourceArn="arn:aws:iot:us-east-1:1:thing/x", Tags={"a": "b"})


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (
            lambda mi: mi.create_managed_thing(
                Role="HUB",
                AuthenticationMaterialType="WIFI_SETUP_QR_BAR_CODE",
                AuthenticationMaterial="SN:1;UPC:829576019524",
            ),
            "Role must be one of",
        ),
        (lambda mi: create_hub(mi, "X1", code="12345"), "UPC '12345' is not 12 digits"),
        (
            lambda mi: mi.create_managed_thing(
                Role="CONTROLLER",
                AuthenticationMaterialType="WIFI_SETUP_QR_BAR_CODE",
                AuthenticationMaterial="SN:X2;UPC:829576019524;EAN:4006381333931",
            ),
            "exactly one of UPC",
        ),
        (
            lambda mi: mi.create_managed_thing(
                Role="CONTROLLER",
                AuthenticationMaterialType="WIFI_SETUP_QR_BAR_CODE",
                AuthenticationMaterial="UPC:829576019524",
            ),
            "needs SN",
        ),
        (lambda mi: mi.get_managed_thing(Identifier="bad id!"), "Identifier"),
        (
            lambda mi: mi.create_provisioning_profile(ProvisioningType="FLEET_PROVISIONING", Name="x" * 37),
            "Name must have at most 36",
        ),
        (
            lambda mi: mi.create_provisioning_profile(ProvisioningType="JITR", Name="NoCa"),
            "needs CaCertificate",
        ),
        (
            lambda mi: mi.create_provisioning_profile(
                ProvisioningType="FLEET_PROVISIONING", ClaimCertificate="not a pem"
            ),
            "ClaimCertificate",
        ),
        (lambda mi: mi.list_managed_things(MaxResults=1001), "MaxResults must be at most 1000"),
        (lambda mi: mi.list_managed_things(NextToken="@@"), "NextToken"),
    ],
)
def test_bad_input_is_a_modeled_validation_exception(mi: Any, call: Any, fragment: str) -> None:
    with pytest.raises(mi.exceptions.ValidationException) as bad:
        call(mi)
    code, status, message = error(bad)
    assert (code, status) == ("ValidationException", 400)
    assert fragment in message


def test_material_parsing() -> None:
    assert parse_material("SN:123456789524;UPC:829576019524").serial == "123456789524"
    assert parse_material("SN:A B-1;EAN:12345678;").ean == "12345678"
    with pytest.raises(Validation, match="twice"):
        parse_material("SN:1;SN:2;UPC:829576019524")
    with pytest.raises(Validation, match="is not SN:<serial>"):
        parse_material("SN:1;MAC:00:11;UPC:829576019524")
