"""Quotas as AWS applies them (quotas.py): token buckets per account on an injected clock, a throttled
fleet provisioning request answered /rejected 429 ThrottlingException, a throttled API call a
ThrottlingException botocore parses, and the thing name and attribute limits."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.config
import pytest
from botocore.exceptions import ClientError

from iot_core_local.errors import InvalidQuota, InvalidRequest
from iot_core_local.quotas import AWS_DEFAULT_RATES, Quotas, RateLimiter, parse_quota
from iot_core_local.recipes.claims import set_up_fleet_provisioning
from iot_core_local.server import LocalIotCore
from tests._support.devices import RawClient, make_csr, write_credentials
from tests._support.fake_cloud import FakeClock

CSR_TOPIC = "$aws/certificates/create-from-csr/json"


# ---- the buckets, pure ----------------------------------------------------------------------------


def test_a_bucket_holds_one_second_and_refills_at_its_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(Quotas({"fleet:RegisterThing": 10.0}), clock.now)
    assert [limiter.allow("fleet", "RegisterThing") for _ in range(11)] == [True] * 10 + [False]
    clock.advance(0.1)  # one token back at 10/s
    assert limiter.allow("fleet", "RegisterThing")
    assert not limiter.allow("fleet", "RegisterThing")
    clock.advance(60)  # never more than a second's worth
    assert sum(limiter.allow("fleet", "RegisterThing") for _ in range(20)) == 10
    assert limiter.throttled == 1 + 1 + 10


def test_operations_have_their_own_buckets_and_fall_back_to_the_service_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(Quotas({"iot:*": 2.0, "iot:DescribeThing": 5.0}), clock.now)
    assert [limiter.allow("iot", "ListThings") for _ in range(3)] == [True, True, False]
    assert [limiter.allow("iot", "CreateThing") for _ in range(3)] == [True, True, False]
    assert sum(limiter.allow("iot", "DescribeThing") for _ in range(10)) == 5
    assert all(limiter.allow("other", "Anything") for _ in range(100))  # no rate for it: not throttled


def test_a_rate_below_one_still_lets_one_request_through_per_period() -> None:
    clock = FakeClock()
    limiter = RateLimiter(Quotas({"fleet:*": 0.5}), clock.now)
    assert [limiter.allow("fleet", "CreateKeysAndCertificate") for _ in range(2)] == [True, False]
    clock.advance(1.0)
    assert not limiter.allow("fleet", "CreateKeysAndCertificate")
    clock.advance(1.0)
    assert limiter.allow("fleet", "CreateKeysAndCertificate")


def test_aws_defaults_and_overrides() -> None:
    quotas = Quotas()
    assert quotas.rate("fleet", "RegisterThing") == 10.0
    assert quotas.rate("fleet", "CreateKeysAndCertificate") == 10.0
    assert quotas.rate("fleet", "CreateCertificateFromCsr") == 50.0
    assert quotas.rate("iot", "DescribeThing") == 350.0
    assert quotas.rate("iot", "ListThings") == 10.0
    assert quotas.rate("iotmanagedintegrations", "CreateManagedThing") == 10.0
    raised = quotas.with_rates(dict([parse_quota("fleet:RegisterThing=50")]))
    assert raised.rate("fleet", "RegisterThing") == 50.0
    assert quotas.rate("fleet", "RegisterThing") == 10.0  # the defaults are left alone
    assert Quotas.off().rate("fleet", "RegisterThing") is None
    assert dict(Quotas().rates) == dict(AWS_DEFAULT_RATES)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("RegisterThing=5", "SERVICE:OPERATION=RATE"),
        ("fleet:RegisterThing", "SERVICE:OPERATION=RATE"),
        ("fleet:RegisterThing=fast", "RATE is a number"),
        ("fleet:RegisterThing=0", "positive number"),
        ("fleet:RegisterThing=-1", "positive number"),
        ("fleet:RegisterThing=inf", "positive number"),
    ],
)
def test_bad_quota_specs(spec: str, problem: str) -> None:
    with pytest.raises(InvalidQuota, match=problem):
        parse_quota(spec)


# ---- through real clients -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory, clock: FakeClock) -> Iterator[LocalIotCore]:
    quotas = Quotas().with_rates({"fleet:CreateCertificateFromCsr": 2.0, "iot:ListThings": 1.0})
    with LocalIotCore(
        tmp_path_factory.mktemp("quotas") / "data", quotas=quotas, quota_clock=clock.now
    ) as running:
        yield running


def no_retries(core: LocalIotCore) -> Any:
    """A boto3 client that shows the first answer: boto3 would otherwise retry a throttled call."""
    import boto3

    return boto3.client(
        "iot",
        endpoint_url=core.endpoint.api_url,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",  # loopback: signatures are not checked
        config=botocore.config.Config(retries={"total_max_attempts": 1}),
    )


def test_a_throttled_api_call_is_a_throttling_exception(core: LocalIotCore, clock: FakeClock) -> None:
    iot = no_retries(core)
    clock.advance(10)
    assert iot.list_things()["things"] == []
    with pytest.raises(ClientError) as caught:
        iot.list_things()
    error = caught.value.response
    assert error["Error"]["Code"] == "ThrottlingException"
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 429
    iot.describe_endpoint(endpointType="iot:Data-ATS")  # another operation: its own bucket
    clock.advance(1.0)
    assert iot.list_things()["things"] == []


def test_a_throttled_provisioning_request_is_rejected_429(
    core: LocalIotCore, clock: FakeClock, tmp_path: Path
) -> None:
    setup = set_up_fleet_provisioning(core.client(), "Quota")
    creds = write_credentials(
        tmp_path, "claim", setup.certificate_id, setup.certificate_pem, setup.private_key_pem
    )
    client = RawClient(core, creds)
    try:
        assert client.connect("quota-hub").reason_code == 0
        clock.advance(10)
        body = json.dumps({"certificateSigningRequest": make_csr()}).encode()
        outcomes = [client.ask(CSR_TOPIC, body) for _ in range(3)]
        assert [outcome for outcome, _ in outcomes] == ["accepted", "accepted", "rejected"]
        rejected = outcomes[2][1]
        assert (rejected["statusCode"], rejected["errorCode"]) == (429, "ThrottlingException")
        assert "CreateCertificateFromCsr" in rejected["errorMessage"]
        clock.advance(0.5)  # one token back at 2/s
        assert client.ask(CSR_TOPIC, body)[0] == "accepted"
    finally:
        client.close()


def test_quotas_off_by_default_in_the_python_api(tmp_path: Path) -> None:
    with LocalIotCore(tmp_path / "data") as core:
        iot = no_retries(core)
        assert all(iot.list_things()["things"] == [] for _ in range(15))  # over AWS's 10/s, not throttled


# ---- thing names and attributes -------------------------------------------------------------------


def test_thing_name_and_attribute_limits(core: LocalIotCore) -> None:
    iot = core.client()

    def refused(**kwargs: Any) -> str:
        with pytest.raises(ClientError) as caught:
            iot.create_thing(**kwargs)
        assert caught.value.response["Error"]["Code"] == "InvalidRequestException"
        return str(caught.value.response["Error"]["Message"])

    refused(thingName="t" * 129)
    assert "at most 3 attributes" in refused(
        thingName="four", attributePayload={"attributes": {f"a{i}": "v" for i in range(4)}}
    )
    iot.create_thing(thingName="three", attributePayload={"attributes": {f"a{i}": "v" for i in range(3)}})
    iot.create_thing(thingName="t" * 128)
    with pytest.raises(ClientError) as caught:  # a fourth by merging: refused, the thing unchanged
        iot.update_thing(thingName="three", attributePayload={"attributes": {"a3": "v"}, "merge": True})
    assert caught.value.response["Error"]["Code"] == "InvalidRequestException"
    assert len(iot.describe_thing(thingName="three")["attributes"]) == 3


def test_attribute_limits_in_the_registry(core: LocalIotCore) -> None:
    registry = core.registry
    with pytest.raises(InvalidRequest, match="800 characters"):
        registry.create_thing("long", attributes={"a": "v" * 801})
    assert registry.create_thing("long-ok", attributes={"a": "v" * 800}).attributes == {"a": "v" * 800}
    with pytest.raises(InvalidRequest, match="1-128 characters"):
        registry.create_thing("badname", attributes={"a b": "v"})
    fifty = {f"a{i}": "v" for i in range(50)}
    assert registry.create_thing("typed", thing_type_name="Hub", attributes=fifty).attributes == fifty
    with pytest.raises(InvalidRequest, match="at most 50 attributes"):
        registry.create_thing("typed-51", thing_type_name="Hub", attributes={**fifty, "a50": "v"})


def test_register_thing_with_too_many_attributes_is_rejected_400(
    core: LocalIotCore, clock: FakeClock, tmp_path: Path
) -> None:
    iot = core.client()
    body = {
        "Parameters": {"SerialNumber": {"Type": "String"}},
        "Resources": {
            "thing": {
                "Type": "AWS::IoT::Thing",
                "Properties": {
                    "ThingName": {"Ref": "SerialNumber"},
                    "AttributePayload": {f"a{i}": "v" for i in range(4)},
                },
            }
        },
    }
    iot.create_provisioning_template(
        templateName="FourAttributes",
        templateBody=json.dumps(body),
        provisioningRoleArn="arn:aws:iam::123456789012:role/Provisioning",
        enabled=True,
    )
    claim = iot.create_provisioning_claim(templateName="FourAttributes")
    creds = write_credentials(
        tmp_path, "claim", claim["certificateId"], claim["certificatePem"], claim["keyPair"]["PrivateKey"]
    )
    client = RawClient(core, creds)
    try:
        assert client.connect("four-attributes").reason_code == 0
        clock.advance(10)
        csr = json.dumps({"certificateSigningRequest": make_csr()}).encode()
        outcome, issued = client.ask(CSR_TOPIC, csr)
        assert outcome == "accepted"
        register = json.dumps(
            {
                "certificateOwnershipToken": issued["certificateOwnershipToken"],
                "parameters": {"SerialNumber": "x1"},
            }
        ).encode()
        outcome, answer = client.ask("$aws/provisioning-templates/FourAttributes/provision/json", register)
    finally:
        client.close()
    assert (outcome, answer["statusCode"], answer["errorCode"]) == ("rejected", 400, "InvalidRequest")
    assert "at most 3 attributes" in answer["errorMessage"]
    assert core.registry.find_thing("x1") is None
