"""Managed integrations' (and AWS IoT's) input checks as a QA attacker found them wanting: the model's
Java patterns enforced, the connector filters, lone surrogates, each operation's modeled error type and
member spelling (a body too large, a throttled call, too many tags), sensitive values never echoed, and a
serial unique whatever the managed thing's role."""

from __future__ import annotations

import http.client
import itertools
import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.config
import botocore.exceptions
import pytest

from iot_core_local.control_plane.http import MAX_BODY
from iot_core_local.quotas import Quotas
from iot_core_local.server import LocalIotCore

UPC = "829576019524"
_serials = itertools.count()
# The credential scope names the service a request is for (control_plane/http.py); on loopback the
# signature itself is not checked.
_SIGNED_FOR = (
    "AWS4-HMAC-SHA256 Credential=x/20250101/us-east-1/{}/aws4_request, SignedHeaders=host, Signature=00"
)


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalIotCore]:
    with LocalIotCore(tmp_path_factory.mktemp("mi-input") / "data") as running:
        yield running


@pytest.fixture
def mi(core: LocalIotCore) -> Any:
    return core.endpoint.client(service="iot-managed-integrations")


def serial() -> str:
    return f"QA{next(_serials):06d}"


def raw(
    core: LocalIotCore, method: str, path: str, body: bytes, service: str = "iotmanagedintegrations"
) -> tuple[int, str | None, dict[str, Any]]:
    """(status, x-amzn-ErrorType, JSON body) of one request sent as given (botocore cannot send some)."""
    url = urllib.parse.urlsplit(core.endpoint.api_url)
    connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
    try:
        headers = {"Content-Type": "application/json", "Authorization": _SIGNED_FOR.format(service)}
        connection.request(method, path, body=body, headers=headers)
        answer = connection.getresponse()
        return answer.status, answer.getheader("x-amzn-ErrorType"), json.loads(answer.read())
    finally:
        connection.close()


def failure(call: Any) -> tuple[str, int, str]:
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        call()
    response = caught.value.response
    return (
        response["Error"]["Code"],
        response["ResponseMetadata"]["HTTPStatusCode"],
        response["Error"]["Message"],
    )


def create_hub(mi: Any, sn: str, role: str = "CONTROLLER", **extra: Any) -> str:
    thing_id: str = mi.create_managed_thing(
        Role=role,
        AuthenticationMaterialType="WIFI_SETUP_QR_BAR_CODE",
        AuthenticationMaterial=f"SN:{sn};UPC:{UPC}",
        **extra,
    )["Id"]
    return thing_id


# ---- 1: the model's Java patterns are enforced ----------------------------------------------------------


def test_a_name_outside_the_models_pattern_is_a_validation_exception(mi: Any) -> None:
    code, status, message = failure(lambda: create_hub(mi, serial(), Name="bad/name"))
    assert (code, status) == ("ValidationException", 400)
    assert "Name" in message
    assert "pattern" in message
    thing_id = create_hub(mi, serial(), Name="Wohnzimmer Hub 2 ünï")  # letters and digits of any script
    code, status, message = failure(lambda: mi.update_managed_thing(Identifier=thing_id, Name="bad/name"))
    assert (code, status) == ("ValidationException", 400)
    assert mi.get_managed_thing(Identifier=thing_id)["Name"] == "Wohnzimmer Hub 2 ünï"


# ---- 2: the connector filters -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "member",
    [
        "ParentControllerIdentifierFilter",
        "ConnectorPolicyIdFilter",
        "ConnectorDestinationIdFilter",
        "ConnectorDeviceIdFilter",
    ],
)
def test_a_connector_filter_matches_no_managed_thing_here(mi: Any, member: str) -> None:
    create_hub(mi, serial())
    assert mi.list_managed_things()["Items"]  # the fleet is not empty
    assert mi.list_managed_things(**{member: "zzz"})["Items"] == []


# ---- 3: lone surrogates -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "member"),
    [
        ('"Name": "\\ud800"', "Name"),
        ('"Tags": {"\\ud800": "x"}', "Tags key"),
        ('"Tags": {"k": "\\udc00"}', "Tags"),
    ],
)
def test_a_lone_surrogate_is_refused_before_it_is_stored(core: LocalIotCore, extra: str, member: str) -> None:
    sn = serial()
    body = (
        '{"Role": "CONTROLLER", "AuthenticationMaterialType": "WIFI_SETUP_QR_BAR_CODE", '
        f'"AuthenticationMaterial": "SN:{sn};UPC:{UPC}", {extra}}}'
    )
    status, kind, answer = raw(core, "POST", "/managed-things", body.encode())
    assert (status, kind) == (400, "ValidationException")
    assert answer["Message"].startswith(member)
    assert "surrogate" in answer["Message"]
    listed = core.endpoint.client(service="iot-managed-integrations").list_managed_things(
        SerialNumberFilter=sn
    )
    assert listed["Items"] == []


def test_a_surrogate_pair_is_one_character_and_welcome(core: LocalIotCore) -> None:
    sn = serial()
    body = (
        '{"Role": "CONTROLLER", "AuthenticationMaterialType": "WIFI_SETUP_QR_BAR_CODE", '
        f'"AuthenticationMaterial": "SN:{sn};UPC:{UPC}", "Tags": {{"k": "\\ud83d\\ude00"}}}}'
    )
    status, _, answer = raw(core, "POST", "/managed-things", body.encode())
    assert status == 201, answer


def test_aws_iot_refuses_a_lone_surrogate_as_its_invalid_request(core: LocalIotCore) -> None:
    status, kind, answer = raw(
        core, "POST", "/policies/SurrogatePolicy", b'{"policyDocument": "\\ud800"}', service="iot"
    )
    assert (status, kind) == (400, "InvalidRequestException")
    assert answer["message"].startswith("policyDocument")
    assert "surrogate" in answer["message"]


# ---- 4: each operation's modeled error, in its service's spelling ---------------------------------------


def test_too_many_tags_is_tag_resources_invalid_request(mi: Any, core: LocalIotCore) -> None:
    thing_id = create_hub(mi, serial())
    arn = mi.get_managed_thing(Identifier=thing_id)["Arn"]
    mi.tag_resource(ResourceArn=arn, Tags={f"t{i}": "v" for i in range(50)})
    code, status, message = failure(lambda: mi.tag_resource(ResourceArn=arn, Tags={"one-more": "v"}))
    assert (code, status) == ("InvalidRequestException", 400)  # TagResource models no ValidationException
    assert "at most 50 tags" in message
    body = json.dumps({"Tags": {"another": "v"}}).encode()
    _, kind, answer = raw(core, "POST", "/tags/" + urllib.parse.quote(arn, safe=""), body)
    assert kind == "InvalidRequestException"
    assert "Message" in answer


@pytest.mark.parametrize(
    ("service", "path", "kind", "member"),
    [
        ("iotmanagedintegrations", "/managed-things", "ValidationException", "Message"),
        ("iot", "/things/TooLarge", "InvalidRequestException", "message"),
    ],
)
def test_a_body_too_large_gets_the_operations_answer_not_a_broken_pipe(
    core: LocalIotCore, service: str, path: str, kind: str, member: str
) -> None:
    body = b"x" * (12 * 1024 * 1024)  # http.client sends it all before it reads the answer
    status, error_type, answer = raw(core, "POST", path, body, service=service)
    assert (status, error_type) == (400, kind)
    assert str(MAX_BODY) in answer[member]


def test_sensitive_values_are_never_echoed(mi: Any) -> None:
    _, _, message = failure(
        lambda: mi.create_provisioning_profile(
            ProvisioningType="JITR", Name="Secret1", CaCertificate="garbage"
        )
    )
    assert "CaCertificate" in message
    assert "garbage" not in message
    assert "ParseError" not in message
    pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    _, _, message = failure(
        lambda: mi.create_provisioning_profile(ProvisioningType="FLEET_PROVISIONING", ClaimCertificate=pem)
    )
    assert "ClaimCertificate" in message
    assert "ParseError" not in message
    assert "kind" not in message
    material = "SN:s3cr3t-serial;WPA:hunter2;UPC:" + UPC
    _, _, message = failure(
        lambda: mi.create_managed_thing(
            Role="CONTROLLER",
            AuthenticationMaterialType="WIFI_SETUP_QR_BAR_CODE",
            AuthenticationMaterial=material,
        )
    )
    assert "AuthenticationMaterial" in message
    assert "hunter2" not in message
    assert "s3cr3t" not in message
    _, _, message = failure(lambda: create_hub(mi, "s3cr3t-2", Owner="not an owner!"))
    assert "Owner" in message
    assert "not an owner" not in message
    _, _, message = failure(lambda: create_hub(mi, serial(), Tags={"aws:hunter2": "v"}))
    assert "hunter2" not in message


@pytest.fixture(scope="module")
def throttled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalIotCore]:
    # A clock that never moves: each bucket holds its one request, then throttles every other.
    quotas = Quotas().with_rates({"iotmanagedintegrations:ListManagedThings": 1.0, "iot:ListThings": 1.0})
    with LocalIotCore(
        tmp_path_factory.mktemp("mi-throttled") / "data", quotas=quotas, quota_clock=lambda: 0.0
    ) as running:
        yield running


@pytest.mark.parametrize(
    ("service", "path", "member"),
    [("iotmanagedintegrations", "/managed-things", "Message"), ("iot", "/things", "message")],
)
def test_a_throttled_answer_spells_its_member_as_the_service_does(
    throttled: LocalIotCore, service: str, path: str, member: str
) -> None:
    answers = [raw(throttled, "GET", path, b"", service=service) for _ in range(2)]
    assert answers[0][0] == 200
    status, kind, body = answers[1]
    assert (status, kind) == (429, "ThrottlingException")
    assert body == {member: "Rate exceeded"}


# ---- 5: a serial is unique among live managed things, whatever their role -----------------------------


def test_a_second_live_thing_with_a_serial_is_a_conflict_whatever_its_role(mi: Any, tmp_path: Path) -> None:
    sn = serial()
    device = create_hub(mi, sn, role="DEVICE")
    got = mi.get_managed_thing(Identifier=device)
    assert (got["SerialNumber"], got["ProvisioningStatus"]) == (sn, "UNASSOCIATED")  # only hubs are matched
    code, status, message = failure(lambda: create_hub(mi, sn, role="DEVICE"))
    assert (code, status) == ("ConflictException", 409)
    assert device in message
    assert failure(lambda: create_hub(mi, sn))[0] == "ConflictException"
    mi.delete_managed_thing(Identifier=device)
    assert mi.get_managed_thing(Identifier=create_hub(mi, sn))["ProvisioningStatus"] == "PRE_ASSOCIATED"
