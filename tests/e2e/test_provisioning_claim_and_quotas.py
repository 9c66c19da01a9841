"""CreateProvisioningClaim's certificate provisions as AWS's SDK samples use it (no policy attached),
may do nothing else, and stops at its expiration; a hub throttled by a real quota retries and succeeds.

The hub is the real one (`HubOnboarding`: awsiotsdk's identity client over awscrt MQTT 5, real TLS,
real Mosquitto). The registry's clock and the quota buckets' clock are the tests' own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mqtt5
import pytest

from hub_onboarding import HubOnboarding
from hub_onboarding.onboarding import OnboardingStep, StepEvent
from hub_onboarding.tools.factory import write_claim_hub
from iot_core_local.quotas import Quotas
from iot_core_local.recipes.claims import ensure_fleet_provisioning
from iot_core_local.server import LocalIotCore
from tests._support.devices import RawClient, make_csr, write_credentials
from tests._support.fake_cloud import FakeClock

pytestmark = pytest.mark.e2e

CLAIM_TTL = 300.0  # AWS's temporary claim certificates last five minutes


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    """The registry's clock (`time`, wall) and the quota buckets' (`now`, monotonic): the test moves both."""
    return FakeClock()


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory, clock: FakeClock) -> Iterator[LocalIotCore]:
    quotas = Quotas().with_rates({"fleet:CreateCertificateFromCsr": 1.0})
    with LocalIotCore(
        tmp_path_factory.mktemp("claims") / "data",
        clock=clock.time,
        quotas=quotas,
        quota_clock=clock.now,
    ) as running:
        yield running


def temporary_claim(core: LocalIotCore, template: str) -> dict[str, Any]:
    iot = core.client()
    ensure_fleet_provisioning(iot, template)  # the template (and the hub policy it attaches)
    claim: dict[str, Any] = iot.create_provisioning_claim(templateName=template)
    assert iot.list_attached_policies(target=core.registry.cert_arn(claim["certificateId"]))["policies"] == []
    return claim


def hub_with(core: LocalIotCore, claim: dict[str, Any], template: str, folder: Path, serial: str) -> Path:
    return write_claim_hub(
        folder,
        endpoint_url=core.endpoint.mqtt_address,
        root_ca_path=core.endpoint.root_ca_path,
        claim_certificate_pem=claim["certificatePem"],
        claim_private_key_pem=claim["keyPair"]["PrivateKey"],
        template_name=template,
        serial=serial,
    )


def test_a_hub_provisions_with_the_temporary_claim_alone(
    core: LocalIotCore, clock: FakeClock, tmp_path: Path
) -> None:
    claim = temporary_claim(core, "SampleTemplate")
    clock.advance(10)
    result = HubOnboarding(
        hub_with(core, claim, "SampleTemplate", tmp_path / "hub", "SN-CLAIM")
    ).process_device()
    assert result.thing_name == "hub-SN-CLAIM"
    iot = core.client()
    principals = iot.list_thing_principals(thingName="hub-SN-CLAIM")["principals"]
    assert len(principals) == 1
    assert claim["certificateId"] not in principals[0]  # the hub's own certificate, not the claim


def test_the_temporary_claim_may_do_nothing_else(
    core: LocalIotCore, clock: FakeClock, tmp_path: Path
) -> None:
    claim = temporary_claim(core, "OnlyThis")
    ensure_fleet_provisioning(core.client(), "NotThis")
    creds = write_credentials(
        tmp_path, "claim", claim["certificateId"], claim["certificatePem"], claim["keyPair"]["PrivateKey"]
    )
    client = RawClient(core, creds)
    try:
        assert client.connect("sample-device").reason_code == 0
        denied = 135  # not authorized
        assert client.subscribe("$aws/provisioning-templates/NotThis/provision/json/accepted") == [denied]
        assert client.subscribe("things/anything/#", "#") == [denied, denied]
        assert client.publish("things/anything/telemetry", b"{}") == denied
        assert client.publish("$aws/provisioning-templates/NotThis/provision/json", b"{}") == denied
        clock.advance(10)
        outcome, issued = client.ask("$aws/certificates/create-from-csr/json", _csr())
        assert outcome == "accepted"
        register = {"certificateOwnershipToken": issued["certificateOwnershipToken"], "parameters": _params()}
        outcome, answer = client.ask(
            "$aws/provisioning-templates/OnlyThis/provision/json", json.dumps(register).encode()
        )
        assert (outcome, answer["thingName"]) == ("accepted", "hub-SN-ONLY")
    finally:
        client.close()


def test_the_temporary_claim_stops_at_its_expiration(
    core: LocalIotCore, clock: FakeClock, tmp_path: Path
) -> None:
    claim = temporary_claim(core, "Expiring")
    assert claim["expiration"].timestamp() == pytest.approx(clock.time() + CLAIM_TTL, abs=1)
    creds = write_credentials(
        tmp_path, "claim", claim["certificateId"], claim["certificatePem"], claim["keyPair"]["PrivateKey"]
    )
    clock.advance(CLAIM_TTL - 1)
    client = RawClient(core, creds)
    try:
        assert client.connect("just-in-time").reason_code == 0
    finally:
        client.close()
    clock.advance(2)  # past its expiration, by the registry's clock
    late = RawClient(core, creds)
    try:
        connack = late.connect("too-late")
        assert connack.reason_code == mqtt5.ConnAckReasonCode.NOT_AUTHORIZED
        late.expect_closed()
    finally:
        late.close()


def test_the_hub_retries_a_request_over_the_real_quota(
    core: LocalIotCore, clock: FakeClock, tmp_path: Path
) -> None:
    """CreateCertificateFromCsr at 1/s: the bucket is empty when the hub asks; it is refilled only when
    the hub says it will retry, so the first answer is the quota's 429 and the retry succeeds."""
    claim = temporary_claim(core, "Throttled")
    clock.advance(10)
    limiter = core.gateway.provisioning.limiter
    assert limiter is not None
    assert limiter.allow("fleet", "CreateCertificateFromCsr")  # someone else took this second's request
    throttled_before = limiter.throttled
    retries: list[StepEvent] = []

    def on_step(event: StepEvent) -> None:
        if event.step == OnboardingStep.RETRY:
            retries.append(event)
            clock.advance(1.0)  # the next second: one request's worth

    config = hub_with(core, claim, "Throttled", tmp_path / "hub", "SN-RETRY")
    result = HubOnboarding(config, on_step=on_step).process_device()
    assert result.thing_name == "hub-SN-RETRY"
    assert limiter.throttled == throttled_before + 1
    assert len(retries) == 1
    assert "Throttling" in retries[0].message or "429" in retries[0].message


def _csr() -> bytes:
    return json.dumps({"certificateSigningRequest": make_csr()}).encode()


def _params() -> dict[str, str]:
    return {"SerialNumber": "SN-ONLY", "UniversalProductCode": "012345678905"}


@pytest.mark.parametrize("client_id", ["hub-SN-VICTIM", "8d1a17b8662ae1071dc22b2b7ecdb3c4"])
def test_the_temporary_claim_cannot_take_a_hubs_session_over(
    core: LocalIotCore, clock: FakeClock, tmp_path: Path, client_id: str
) -> None:
    """A provisioned hub's client id (the plain recipe's `hub-<serial>`, or a managed thing id) is not the
    temporary claim's to use: connecting with it would close the hub's own connection."""
    claim = temporary_claim(core, "NoTakeover")
    creds = write_credentials(
        tmp_path, "claim", claim["certificateId"], claim["certificatePem"], claim["keyPair"]["PrivateKey"]
    )
    client = RawClient(core, creds)
    try:
        assert client.connect(client_id).reason_code == mqtt5.ConnAckReasonCode.NOT_AUTHORIZED
    finally:
        client.close()


def test_the_implicit_policy_denies_the_managed_recipe_s_client_ids_too() -> None:
    from iot_core_local.managed import CLAIM_DENIED_CLIENT_IDS
    from iot_core_local.policy import PROVISIONED_CLIENT_IDS

    assert CLAIM_DENIED_CLIENT_IDS in PROVISIONED_CLIENT_IDS
