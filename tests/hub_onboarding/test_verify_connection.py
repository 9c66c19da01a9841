"""ro.fp_verify_connection: the opt-out of the verification connect (default: verify)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hub_onboarding import config as cfg
from hub_onboarding.errors import ConfigError
from tests._support.hubs import HubFactory


def test_default_is_to_verify(make_hub: HubFactory) -> None:
    fleet = cfg.parse_config(make_hub().config).fleet
    assert fleet is not None
    assert fleet.verify_connection is True


@pytest.mark.parametrize("value", [True, False])
def test_bool_is_taken(make_hub: HubFactory, value: bool) -> None:
    hub = make_hub(ro={"fp_verify_connection": value})
    fleet = cfg.parse_config(hub.config).fleet
    assert fleet is not None
    assert fleet.verify_connection is value


@pytest.mark.parametrize("value", ["false", 0, None, [], {}])
def test_anything_but_a_bool_names_the_key(make_hub: HubFactory, value: Any) -> None:
    hub = make_hub(ro={"fp_verify_connection": value})
    with pytest.raises(ConfigError, match=r"ro\.fp_verify_connection: expected true or false") as info:
        cfg.parse_config(hub.config)
    assert info.value.key == "ro.fp_verify_connection"


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_hub_without_verification_connect_is_provisioned(tmp_path: Path) -> None:
    """Against the real stand-in: skipping the reconnect still ends PROVISIONED, with the steps saying so."""
    from hub_onboarding.onboarding import HubOnboarding, OnboardingStep, StepEvent
    from hub_onboarding.tools.factory import write_claim_hub
    from iot_core_local.recipes.claims import set_up_fleet_provisioning
    from iot_core_local.server import LocalIotCore

    with LocalIotCore(tmp_path / "cloud") as core:
        claim = set_up_fleet_provisioning(core.client(), "NoVerify")
        config = write_claim_hub(
            tmp_path / "hub",
            endpoint_url=core.endpoint.mqtt_address,
            root_ca_path=core.endpoint.root_ca_path,
            claim_certificate_pem=claim.certificate_pem,
            claim_private_key_pem=claim.private_key_pem,
            template_name=claim.template_name,
            serial="NV-1",
            extra_ro={"fp_verify_connection": False},
        )
        steps: list[StepEvent] = []
        result = HubOnboarding(config, on_step=steps.append).process_device()
    assert result.state == "PROVISIONED"
    assert result.changed
    skipped = [e for e in steps if e.step is OnboardingStep.VERIFY_SKIPPED]
    assert [e.message for e in skipped] == ["verification connect skipped (ro.fp_verify_connection is false)"]
    assert OnboardingStep.VERIFIED not in [e.step for e in steps]
    assert json.loads(config.read_text())["ro"]["fp_verify_connection"] is False
