"""Managed integrations on iot-core-local: boto3's `iot-managed-integrations` client for the control plane,
real MQTT over TLS (RawClient, the claim) for RegisterThing's matching, the gateway for connectivity."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import mqtt5
import pytest

from iot_core_local.errors import Validation
from iot_core_local.gateway.lifecycle import disconnect_reason
from iot_core_local.gateway.wire import Reason
from iot_core_local.managed import CLAIM_DENIED_CLIENT_IDS, parse_material
from iot_core_local.server import LocalIotCore
from tests._support.certificates import make_pair, pem_certificate_id
from tests._support.devices import (
    Credentials,
    DeviceCA,
    Lifecycle,
    RawClient,
    connect_refused_without_connack,
    write_credentials,
)

from .test_provisioning import KEYS_TOPIC, connect_claim, register_topic, request

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


def register(client: RawClient, template: str, sn: str, code: str = UPC, **extra: str) -> tuple[str, Any]:
    """CreateKeysAndCertificate, then RegisterThing with this serial and product code; the answer carries
    the new certificate's id, PEM and key too."""
    outcome, issued = request(client, KEYS_TOPIC, b"")
    assert outcome == "accepted", issued
    body = {
        "certificateOwnershipToken": issued["certificateOwnershipToken"],
        "parameters": {"SerialNumber": sn, "UniversalProductCode": code, **extra},
    }
    outcome, answer = request(client, register_topic(template), json.dumps(body).encode())
    answer["issued"] = issued
    return outcome, answer


def onboard(
    core: LocalIotCore, mi: Any, claim: Credentials, template: str, folder: Path
) -> tuple[str, Credentials]:
    """A hub pre-associated and provisioned through the claim: (managed thing id, its credentials)."""
    sn = serial()
    thing_id = create_hub(mi, sn)
    client = connect_claim(core, claim, sn)
    try:
        outcome, answer = register(client, template, sn)
    finally:
        client.close()
    assert outcome == "accepted", answer
    issued = answer["issued"]
    creds = write_credentials(
        folder, thing_id, issued["certificateId"], issued["certificatePem"], issued["privateKey"]
    )
    return thing_id, creds


@pytest.fixture
def lifecycle(core: LocalIotCore) -> Iterator[Lifecycle]:
    watcher = Lifecycle(core)
    yield watcher
    watcher.close()


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
    assert any(d["Resource"].endswith(f":client/{CLAIM_DENIED_CLIENT_IDS}") for d in denied)
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
    # The serial is sensitive in the model: the answer names the thing that has it, not the serial.
    assert thing_id in error(dup)[2]
    assert sn not in error(dup)[2]

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

    deleted = mi.delete_managed_thing(Identifier=thing_id)["ResponseMetadata"]
    # A 204 has no body (one would be read as the start of the next answer on the kept-alive connection).
    assert (deleted["HTTPStatusCode"], deleted["HTTPHeaders"]["content-length"]) == (204, "0")
    assert deleted["RetryAttempts"] == 0
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


def test_paging_tokens_are_bound_and_survive_deletions(mi: Any) -> None:
    mine = [create_hub(mi, serial()) for _ in range(5)]
    token = mi.list_managed_things(MaxResults=1)["NextToken"]
    calls: list[Callable[[], Any]] = [
        lambda: mi.list_provisioning_profiles(NextToken=token),  # another operation
        lambda: mi.list_managed_things(NextToken=token, RoleFilter="DEVICE"),  # another filter
        lambda: mi.list_managed_things(NextToken="Mg=="),  # an offset, as tokens once were
    ]
    for call in calls:
        with pytest.raises(mi.exceptions.ValidationException) as refused:
            call()
        code, status, message = error(refused)
        assert (code, status) == ("ValidationException", 400)
        assert "pagination token" in message
    # Delete as you go: none of them is left behind.
    deleted = []
    for page in mi.get_paginator("list_managed_things").paginate(
        RoleFilter="CONTROLLER", PaginationConfig={"PageSize": 2}
    ):
        for item in page["Items"]:
            if item["Id"] in mine:
                mi.delete_managed_thing(Identifier=item["Id"])
                deleted.append(item["Id"])
    assert deleted == mine


def test_tag_keys_starting_with_aws_are_reserved(
    mi: Any, profile: tuple[dict[str, Any], Credentials]
) -> None:
    created, _ = profile
    for key in ("aws:x", "AWS:CreatedBy"):
        with pytest.raises(mi.exceptions.InvalidRequestException) as refused:
            mi.tag_resource(ResourceArn=created["Arn"], Tags={"team": "hubs", key: "v"})
        code, status, message = error(refused)
        assert (code, status) == ("InvalidRequestException", 400)
        assert "reserved" in message
        assert key not in message  # tags are sensitive in the model: described, never quoted
    assert mi.list_tags_for_resource(ResourceArn=created["Arn"]).get("tags") in (None, {})
    with pytest.raises(mi.exceptions.ValidationException, match="reserved"):
        create_hub(mi, serial(), Tags={"aws:owner": "me"})
    mi.tag_resource(ResourceArn=created["Arn"], Tags={"awsome": "yes"})  # only the prefix "aws:" is AWS's


def test_a_json_integer_past_pythons_digit_limit_is_a_validation_exception(core: LocalIotCore) -> None:
    body = b'{"Role": "CONTROLLER", "Name": 1' + b"0" * 5000 + b"}"
    request = urllib.request.Request(
        core.endpoint.api_url + "/managed-things",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    with caught.value as answer:
        assert (answer.code, answer.headers["x-amzn-ErrorType"]) == (400, "ValidationException")
        assert b"not valid JSON" in answer.read()


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
        (lambda mi: create_hub(mi, "X1", code="12345"), "UPC is not 12 digits"),
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
        (
            lambda mi: mi.create_provisioning_profile(
                ProvisioningType="JITR",
                Name="NotCa",
                CaCertificate=make_pair("leaf", issuer=make_pair("ca")).cert_pem.decode(),
            ),
            "not a CA certificate",
        ),
        (
            lambda mi: mi.create_provisioning_profile(
                ProvisioningType="JITR",
                Name="Both",
                CaCertificate=make_pair("ca").cert_pem.decode(),
                ClaimCertificate=make_pair("c").cert_pem.decode(),
            ),
            "ClaimCertificate is for a FLEET_PROVISIONING profile",
        ),
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


# ---- matching at RegisterThing --------------------------------------------------------------------


def test_register_thing_matches_the_pre_associated_hub(
    core: LocalIotCore, mi: Any, profile: tuple[dict[str, Any], Credentials]
) -> None:
    created, claim = profile
    template = created["Name"]
    sn = serial()
    client = connect_claim(core, claim, sn)
    try:
        outcome, answer = register(client, template, sn)
        assert (outcome, answer["statusCode"], answer["errorCode"]) == (
            "rejected",
            404,
            "UnknownSerialNumber",
        )
        assert sn in answer["errorMessage"]

        thing_id = create_hub(mi, sn)
        outcome, answer = register(client, template, sn, code="000000000000")
        assert (outcome, answer["statusCode"], answer["errorCode"]) == (
            "rejected",
            403,
            "ProductCodeMismatch",
        )
        assert thing_id not in answer["errorMessage"]
        assert mi.get_managed_thing(Identifier=thing_id)["ProvisioningStatus"] == "PRE_ASSOCIATED"

        # A device cannot choose the managed thing it becomes: the id is a server-side built-in.
        outcome, answer = register(
            client, template, sn, **{"AWS::IoTManagedIntegrations::ManagedThing::Id": "x"}
        )
        assert outcome == "accepted", answer
    finally:
        client.close()
    assert answer["deviceConfiguration"] == {"ClientId": thing_id, "ManagedThingId": thing_id}
    assert answer["thingName"] == thing_id
    got = mi.get_managed_thing(Identifier=thing_id)
    assert got["ProvisioningStatus"] == "ACTIVATED"
    assert got["ActivatedAt"] >= got["CreatedAt"]
    issued = answer["issued"]
    assert mi.get_managed_thing_certificate(Identifier=thing_id)["CertificatePem"] == issued["certificatePem"]
    iot = core.client()
    cert = iot.describe_certificate(certificateId=issued["certificateId"])["certificateDescription"]
    assert cert["status"] == "ACTIVE"
    assert [
        p["policyName"] for p in iot.list_attached_policies(target=cert["certificateArn"])["policies"]
    ] == [f"{template}-hub"]
    assert iot.list_thing_principals(thingName=thing_id)["principals"] == [cert["certificateArn"]]
    assert iot.describe_thing(thingName=thing_id)["attributes"] == {"serialNumber": sn, "upc": UPC}


def test_takeover_is_refused_both_ways(
    core: LocalIotCore, mi: Any, profile: tuple[dict[str, Any], Credentials], tmp_path: Path
) -> None:
    created, claim = profile
    thing_id, hub = onboard(core, mi, claim, created["Name"], tmp_path)
    sn = mi.get_managed_thing(Identifier=thing_id)["SerialNumber"]

    # Another device holding the shared claim registers with the onboarded hub's serial: refused, and
    # the hub keeps its one certificate.
    attacker = connect_claim(core, claim, "attacker-1")
    try:
        outcome, answer = register(attacker, created["Name"], sn)
    finally:
        attacker.close()
    assert (outcome, answer["statusCode"], answer["errorCode"]) == ("rejected", 409, "AlreadyOnboarded")
    assert thing_id not in answer["errorMessage"]
    iot = core.client()
    assert len(iot.list_thing_principals(thingName=thing_id)["principals"]) == 1

    # The claim cannot connect with the hub's client id (it would take the hub's session over).
    client = RawClient(core, claim)
    try:
        assert client.connect(thing_id).reason_code == mqtt5.ConnAckReasonCode.NOT_AUTHORIZED
    finally:
        client.close()
    # The hub itself connects with it, and nothing else does.
    hub_client = RawClient(core, hub)
    try:
        assert hub_client.connect(thing_id).reason_code == 0
    finally:
        hub_client.close()
    other = RawClient(core, hub)
    try:
        assert other.connect("not-the-hub").reason_code == mqtt5.ConnAckReasonCode.NOT_AUTHORIZED
    finally:
        other.close()


def test_a_second_hub_with_an_activated_serial_is_refused_until_recreated(
    core: LocalIotCore, mi: Any, profile: tuple[dict[str, Any], Credentials], tmp_path: Path
) -> None:
    created, claim = profile
    thing_id, _ = onboard(core, mi, claim, created["Name"], tmp_path)
    sn = mi.get_managed_thing(Identifier=thing_id)["SerialNumber"]
    client = connect_claim(core, claim, sn)
    try:
        outcome, answer = register(client, created["Name"], sn)
        assert (outcome, answer["errorCode"]) == ("rejected", "AlreadyOnboarded")
        mi.delete_managed_thing(Identifier=thing_id)
        outcome, answer = register(client, created["Name"], sn)
        assert (outcome, answer["errorCode"]) == ("rejected", "UnknownSerialNumber")
        again = create_hub(mi, sn)
        outcome, answer = register(client, created["Name"], sn)
    finally:
        client.close()
    assert outcome == "accepted", answer
    assert answer["deviceConfiguration"]["ManagedThingId"] == again != thing_id


# ---- lifecycle --------------------------------------------------------------------------------------


def test_connectivity_follows_connect_and_disconnect(
    core: LocalIotCore,
    mi: Any,
    profile: tuple[dict[str, Any], Credentials],
    tmp_path: Path,
    lifecycle: Lifecycle,
) -> None:
    created, claim = profile
    thing_id, hub = onboard(core, mi, claim, created["Name"], tmp_path)
    assert mi.get_managed_thing_connectivity_data(Identifier=thing_id)["Connected"] is False

    client = RawClient(core, hub)
    try:
        assert client.connect(thing_id).reason_code == 0
        lifecycle.wait_for((thing_id, True, None))
        data = mi.get_managed_thing_connectivity_data(Identifier=thing_id)
        assert (data["ManagedThingId"], data["Connected"]) == (thing_id, True)
        assert "DisconnectReason" not in data
        connected_at = data["Timestamp"]
        client.send(mqtt5.DisconnectPacket())
        client.expect_closed()
    finally:
        client.close()
    lifecycle.wait_for((thing_id, False, "CLIENT_INITIATED_DISCONNECT"))
    data = mi.get_managed_thing_connectivity_data(Identifier=thing_id)
    assert (data["Connected"], data["DisconnectReason"]) == (False, "CLIENT_INITIATED_DISCONNECT")
    assert data["Timestamp"] >= connected_at

    first, second = RawClient(core, hub), RawClient(core, hub)
    try:
        assert first.connect(thing_id).reason_code == 0
        assert second.connect(thing_id).reason_code == 0
        lifecycle.wait_for((thing_id, False, "DUPLICATE_CLIENTID"))
        assert mi.get_managed_thing_connectivity_data(Identifier=thing_id)["Connected"] is True
        second.close()  # no DISCONNECT: the connection is lost
        lifecycle.wait_for((thing_id, False, "CONNECTION_LOST"))
    finally:
        first.close()
        second.close()
    assert (
        mi.get_managed_thing_connectivity_data(Identifier=thing_id)["DisconnectReason"] == "CONNECTION_LOST"
    )


def test_delete_while_connected_closes_the_hub_and_removes_everything(
    core: LocalIotCore,
    mi: Any,
    profile: tuple[dict[str, Any], Credentials],
    tmp_path: Path,
    lifecycle: Lifecycle,
) -> None:
    created, claim = profile
    thing_id, hub = onboard(core, mi, claim, created["Name"], tmp_path)
    statuses: list[tuple[str, str]] = []
    core.managed.add_status_listener(lambda i, s: statuses.append((i, s)))
    client = RawClient(core, hub)
    try:
        assert client.connect(thing_id).reason_code == 0
        lifecycle.wait_for((thing_id, True, None))
        mi.delete_managed_thing(Identifier=thing_id)
        seen = client.expect_closed(within=5.0)
    finally:
        client.close()
    assert [p.reason_code for p in seen if isinstance(p, mqtt5.DisconnectPacket)] == [
        mqtt5.DisconnectReasonCode.ADMINISTRATIVE_ACTION
    ]
    lifecycle.wait_for((thing_id, False, "SERVER_INITIATED_DISCONNECT"))
    assert [s for i, s in statuses if i == thing_id] == ["DELETE_IN_PROGRESS", "DELETED"]
    with pytest.raises(mi.exceptions.ResourceNotFoundException):
        mi.get_managed_thing(Identifier=thing_id)
    iot = core.client()
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.describe_thing(thingName=thing_id)
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.describe_certificate(certificateId=hub.certificate_id)
    assert connect_refused_without_connack(core, hub, thing_id)


def test_force_deletes_a_hub_whose_disconnect_never_comes(
    core: LocalIotCore,
    mi: Any,
    profile: tuple[dict[str, Any], Credentials],
    tmp_path: Path,
    lifecycle: Lifecycle,
) -> None:
    created, claim = profile
    thing_id, hub = onboard(core, mi, claim, created["Name"], tmp_path)
    client = RawClient(core, hub)
    try:
        assert client.connect(thing_id).reason_code == 0
        lifecycle.wait_for((thing_id, True, None))
        # The report of its disconnect is lost: the thing waits in DELETE_IN_PROGRESS.
        core.gateway.lifecycle_listeners.remove(core.managed.on_connectivity)
        try:
            mi.delete_managed_thing(Identifier=thing_id)
            client.expect_closed(within=5.0)
            lifecycle.wait_for((thing_id, False, "SERVER_INITIATED_DISCONNECT"))
        finally:
            core.gateway.lifecycle_listeners.insert(0, core.managed.on_connectivity)
    finally:
        client.close()
    assert mi.get_managed_thing(Identifier=thing_id)["ProvisioningStatus"] == "DELETE_IN_PROGRESS"
    listed = mi.list_managed_things(ProvisioningStatusFilter="DELETE_IN_PROGRESS")["Items"]
    assert thing_id in [t["Id"] for t in listed]
    with pytest.raises(mi.exceptions.ConflictException) as stuck:
        mi.delete_managed_thing(Identifier=thing_id)
    assert "Force" in error(stuck)[2]
    mi.delete_managed_thing(Identifier=thing_id, Force=True)
    with pytest.raises(mi.exceptions.ResourceNotFoundException):
        mi.get_managed_thing(Identifier=thing_id)


# ---- other profiles -----------------------------------------------------------------------------------


def test_a_profile_with_a_supplied_claim_certificate(core: LocalIotCore, mi: Any, tmp_path: Path) -> None:
    own = make_pair("factory-claim")
    name = f"Own{next(_serials)}"
    created = mi.create_provisioning_profile(
        ProvisioningType="FLEET_PROVISIONING", Name=name, ClaimCertificate=own.cert_pem.decode()
    )
    assert "ClaimCertificatePrivateKey" not in created
    claim_id = _certificate_id(created["ClaimCertificate"])
    claim = write_credentials(tmp_path, "own", claim_id, own.cert_pem.decode(), own.key_pem.decode())
    thing_id, _ = onboard(core, mi, claim, name, tmp_path)
    assert mi.get_managed_thing(Identifier=thing_id)["ProvisioningStatus"] == "ACTIVATED"
    with pytest.raises(mi.exceptions.ConflictException):
        mi.create_provisioning_profile(
            ProvisioningType="FLEET_PROVISIONING", ClaimCertificate=own.cert_pem.decode()
        )


def test_a_jitr_profile_activates_the_hub_its_dha_serial_names(
    core: LocalIotCore, mi: Any, tmp_path: Path, lifecycle: Lifecycle
) -> None:
    maker = DeviceCA(f"Hub Maker {next(_serials)}")
    name = f"Jitr{next(_serials)}"
    created = mi.create_provisioning_profile(ProvisioningType="JITR", Name=name, CaCertificate=maker.pem)
    assert created["ProvisioningType"] == "JITR"
    assert "ClaimCertificate" not in created
    iot = core.client()
    ca = iot.describe_ca_certificate(certificateId=maker.certificate_id)["certificateDescription"]
    assert (ca["status"], ca["autoRegistrationStatus"]) == ("ACTIVE", "ENABLE")

    sn = serial()
    thing_id = create_hub(mi, sn)
    dha = maker.device(tmp_path, f"hub-{sn}", serial_number=sn)
    stranger = maker.device(tmp_path, "stranger", serial_number="NOBODY")
    # JITR: the first connection registers the certificate and is closed; the service activates it.
    assert connect_refused_without_connack(core, dha, f"hub-{sn}")
    assert connect_refused_without_connack(core, stranger, "stranger")
    client = RawClient(core, dha)
    try:
        assert client.connect(f"hub-{sn}").reason_code == 0
    finally:
        client.close()
    got = mi.get_managed_thing(Identifier=thing_id)
    assert got["ProvisioningStatus"] == "ACTIVATED"
    assert iot.describe_thing(thingName=f"hub-{sn}")["attributes"]["managedThingId"] == thing_id
    assert mi.get_managed_thing_certificate(Identifier=thing_id)["CertificatePem"] == dha.certificate_pem
    pending = iot.describe_certificate(certificateId=stranger.certificate_id)["certificateDescription"]
    assert pending["status"] == "PENDING_ACTIVATION"
    lifecycle.wait_for((f"hub-{sn}", False, "CONNECTION_LOST"))
    assert mi.get_managed_thing_connectivity_data(Identifier=thing_id)["Connected"] is False

    # A hub that connected before its managed thing existed is activated at a later retry.
    late_sn = serial()
    late = maker.device(tmp_path, f"hub-{late_sn}", serial_number=late_sn)
    assert connect_refused_without_connack(core, late, f"hub-{late_sn}")
    late_id = create_hub(mi, late_sn)
    assert connect_refused_without_connack(core, late, f"hub-{late_sn}")  # the retry JITR answers
    client = RawClient(core, late)
    try:
        assert client.connect(f"hub-{late_sn}").reason_code == 0
    finally:
        client.close()
    assert mi.get_managed_thing(Identifier=late_id)["ProvisioningStatus"] == "ACTIVATED"


# ---- restart --------------------------------------------------------------------------------------------


def test_state_survives_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with LocalIotCore(data) as first:
        mi = first.endpoint.client(service="iot-managed-integrations")
        mi.register_custom_endpoint()
        created = mi.create_provisioning_profile(ProvisioningType="FLEET_PROVISIONING", Name="Survivor")
        claim = write_credentials(
            tmp_path,
            "claim",
            _certificate_id(created["ClaimCertificate"]),
            created["ClaimCertificate"],
            created["ClaimCertificatePrivateKey"],
        )
        thing_id, hub = onboard(first, mi, claim, "Survivor", tmp_path)
        waiting_id, waiting = onboard(first, mi, claim, "Survivor", tmp_path)
        pre_id = create_hub(mi, serial())
        watcher = Lifecycle(first)
        client, other = RawClient(first, hub), RawClient(first, waiting)
        assert client.connect(thing_id).reason_code == 0
        assert other.connect(waiting_id).reason_code == 0
        watcher.wait_for((waiting_id, True, None))
        first.gateway.lifecycle_listeners.remove(first.managed.on_connectivity)
        mi.delete_managed_thing(Identifier=waiting_id)  # its disconnect report is lost: stays in progress
        watcher.wait_for((waiting_id, False, "SERVER_INITIATED_DISCONNECT"))
        first.gateway.lifecycle_listeners.insert(0, first.managed.on_connectivity)
        assert mi.get_managed_thing(Identifier=waiting_id)["ProvisioningStatus"] == "DELETE_IN_PROGRESS"
    client.close()
    other.close()
    with LocalIotCore(data) as second:
        mi = second.endpoint.client(service="iot-managed-integrations")
        assert mi.get_custom_endpoint()["EndpointAddress"] == "127.0.0.1"
        assert [p["Name"] for p in mi.list_provisioning_profiles()["Items"]] == ["Survivor"]
        assert mi.get_managed_thing(Identifier=thing_id)["ProvisioningStatus"] == "ACTIVATED"
        assert mi.get_managed_thing(Identifier=pre_id)["ProvisioningStatus"] == "PRE_ASSOCIATED"
        data_after = mi.get_managed_thing_connectivity_data(Identifier=thing_id)
        assert (data_after["Connected"], data_after["DisconnectReason"]) == (
            False,
            "SERVER_INITIATED_DISCONNECT",
        )
        with pytest.raises(mi.exceptions.ResourceNotFoundException):
            mi.get_managed_thing(Identifier=waiting_id)
        again = RawClient(second, hub)
        try:
            assert again.connect(thing_id).reason_code == 0
        finally:
            again.close()


def test_a_profile_whose_hubs_exist_is_not_deleted(
    core: LocalIotCore, mi: Any, profile: tuple[dict[str, Any], Credentials], tmp_path: Path
) -> None:
    created, claim = profile
    thing_id, _ = onboard(core, mi, claim, created["Name"], tmp_path)
    with pytest.raises(mi.exceptions.ConflictException) as busy:
        mi.delete_provisioning_profile(Identifier=created["Id"])
    assert "delete their managed things first" in error(busy)[2]
    assert mi.get_provisioning_profile(Identifier=created["Id"])["Status"] == "CREATED"
    mi.delete_managed_thing(Identifier=thing_id)
    mi.delete_provisioning_profile(Identifier=created["Id"])
    assert connect_refused_without_connack(core, claim, "after-the-profile")


def test_two_hubs_racing_for_one_serial_onboard_one(
    core: LocalIotCore, mi: Any, profile: tuple[dict[str, Any], Credentials]
) -> None:
    created, claim = profile
    sn = serial()
    thing_id = create_hub(mi, sn)
    topic = register_topic(created["Name"])
    clients = [connect_claim(core, claim, f"{sn}-{i}") for i in range(2)]
    try:
        tokens = []
        for client in clients:
            outcome, issued = request(client, KEYS_TOPIC, b"")
            assert outcome == "accepted", issued
            tokens.append(issued["certificateOwnershipToken"])
            assert client.subscribe(f"{topic}/accepted", f"{topic}/rejected") == [1, 1]
        for client, token in zip(clients, tokens, strict=True):
            body = {
                "certificateOwnershipToken": token,
                "parameters": {"SerialNumber": sn, "UniversalProductCode": UPC},
            }
            client.send(mqtt5.PublishPacket(topic, json.dumps(body).encode(), qos=mqtt5.QoS.AT_MOST_ONCE))
        answers = sorted(
            (answer.topic.rsplit("/", 1)[1], json.loads(answer.payload))
            for answer in (client.receive_type(mqtt5.PublishPacket) for client in clients)
        )
    finally:
        for client in clients:
            client.close()
    (won, winner), (lost, loser) = answers
    assert (won, lost) == ("accepted", "rejected")
    assert winner["deviceConfiguration"]["ManagedThingId"] == thing_id
    assert loser["errorCode"] == "AlreadyOnboarded"
    assert len(core.client().list_thing_principals(thingName=thing_id)["principals"]) == 1


@pytest.mark.parametrize(
    ("sent", "client_disconnected", "expected"),
    [
        (None, True, "CLIENT_INITIATED_DISCONNECT"),
        (None, False, "CONNECTION_LOST"),
        (Reason.SESSION_TAKEN_OVER, False, "DUPLICATE_CLIENTID"),
        (Reason.KEEP_ALIVE_TIMEOUT, False, "MQTT_KEEP_ALIVE_TIMEOUT"),
        (Reason.ADMINISTRATIVE_ACTION, False, "SERVER_INITIATED_DISCONNECT"),
        (Reason.SERVER_SHUTTING_DOWN, False, "SERVER_INITIATED_DISCONNECT"),
        (Reason.PROTOCOL_ERROR, False, "CLIENT_ERROR"),
        (Reason.PACKET_TOO_LARGE, False, "CLIENT_ERROR"),
    ],
)
def test_lifecycle_reason_names(sent: Reason | None, client_disconnected: bool, expected: str) -> None:
    assert disconnect_reason(sent, client_disconnected) == expected


def test_a_hub_is_connected_in_the_connectivity_data_as_soon_as_it_has_its_connack(
    core: LocalIotCore, mi: Any, profile: tuple[dict[str, Any], Credentials], tmp_path: Path
) -> None:
    """The gateway records the connect before it sends the CONNACK: a hub (or the demo) asking right
    after connecting never reads the state its previous connection left (QA saw Connected False)."""
    created, claim = profile
    thing_id, hub = onboard(core, mi, claim, created["Name"], tmp_path)
    for _ in range(10):
        client = RawClient(core, hub)
        try:
            assert client.connect(thing_id).reason_code == 0
            assert mi.get_managed_thing_connectivity_data(Identifier=thing_id)["Connected"] is True
            client.send(mqtt5.DisconnectPacket())
            client.expect_closed()
        finally:
            client.close()
