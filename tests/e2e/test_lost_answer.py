"""A RegisterThing the service accepted whose answer the hub never recorded, under the two flows that
refuse a second registration of one serial: managed integrations (an ACTIVATED managed thing is
AlreadyOnboarded) and the plain recipe's takeover guard (a thing with an ACTIVE certificate is refused).

The hub is killed while it writes RegisterThing's answer down (its second progress write, complete but not
yet renamed), so its record still holds the spent token. Its next run asks again with that token and the
same parameters and is answered as the first time: it onboards with its one certificate, where starting
over with a new certificate would be refused for good (a hub in the field could never onboard again).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from hub_onboarding.onboarding import OnboardingStep as S
from hub_onboarding.tools.factory import write_claim_hub
from iot_core_local.recipes.claims import set_up_fleet_provisioning
from iot_core_local.recipes.managed_integrations import Hub, set_up_managed_integrations
from iot_core_local.recipes.takeover import TakeoverGuard
from iot_core_local.server import LocalIotCore
from tests._support.certificates import pem_certificate_id, thing_certificates
from tests._support.hubs import cloud_claim_hub, read_config
from tests._support.processes import HubProcess, run_hub

pytestmark = pytest.mark.e2e

UPC = "829576019524"
# The shim's freeze: at the fsync of the second atomic write of the progress record (RegisterThing's answer).
ANSWER_BEING_RECORDED = {"kind": "fsync", "prefix": ".onboarding-progress.json.", "nth": 2}


def _die_recording_the_answer(config: Path, shim_dir: Path) -> None:
    hub = HubProcess(config, shim_dir=shim_dir, freeze=ANSWER_BEING_RECORDED)
    hub.wait_frozen()
    assert hub.kill().returncode == -signal.SIGKILL
    assert read_config(config)["rw"]["iot_provisioning_state"] == "NOT_PROVISIONED"


def test_managed_integrations_hub_finishes_with_its_one_certificate(
    cloud: LocalIotCore, iot: Any, tmp_path: Path, shim_dir: Path
) -> None:
    mi = cloud.endpoint.client(service="iot-managed-integrations")
    setup = set_up_managed_integrations(mi, "LostAnswerProfile", [Hub("SN-LOST-1", upc=UPC)])
    config = write_claim_hub(
        tmp_path / "hub",
        endpoint_url=cloud.endpoint.mqtt_address,
        root_ca_path=cloud.endpoint.root_ca_path,
        claim_certificate_pem=setup.claim_certificate_pem,
        claim_private_key_pem=setup.claim_private_key_pem or "",
        template_name=setup.template_name,
        serial="SN-LOST-1",
        upc=UPC,
    )
    _die_recording_the_answer(config, shim_dir)
    (thing,) = mi.list_managed_things(SerialNumberFilter="SN-LOST-1")["Items"]
    assert thing["ProvisioningStatus"] == "ACTIVATED"  # the service did its part before the cut

    again = run_hub(config, json_steps=True)
    assert again.returncode == 0, again.stderr
    assert S.RESUMED_AFTER_CERTIFICATE_ISSUED in again.steps
    assert S.TOKEN_REFUSED not in again.steps
    rw = read_config(config)["rw"]
    assert rw["iot_provisioning_state"] == "PROVISIONED"
    assert rw["managed_thing_id"] == thing["Id"] == rw["client_id"]
    mine = pem_certificate_id(Path(rw["iot_permanent_cert_path"]).read_bytes())
    assert thing_certificates(iot, thing["Id"]) == {mine: "ACTIVE"}


def test_guarded_plain_hub_finishes_with_its_one_certificate(
    cloud: LocalIotCore, iot: Any, tmp_path: Path, shim_dir: Path
) -> None:
    with TakeoverGuard(iot) as guard:
        claim = set_up_fleet_provisioning(iot, "LostAnswerGuarded", hook_url=guard.url)
        config = cloud_claim_hub(cloud, claim, tmp_path / "hub", "SN-LOST-2")
        _die_recording_the_answer(config, shim_dir)
        assert list(thing_certificates(iot, "hub-SN-LOST-2").values()) == ["ACTIVE"]

        again = run_hub(config, json_steps=True)
    assert again.returncode == 0, again.stderr
    assert S.TOKEN_REFUSED not in again.steps
    rw = read_config(config)["rw"]
    mine = pem_certificate_id(Path(rw["iot_permanent_cert_path"]).read_bytes())
    assert thing_certificates(iot, "hub-SN-LOST-2") == {mine: "ACTIVE"}
