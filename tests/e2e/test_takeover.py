"""The plain IoT recipe refuses a takeover (issue 9 point 5), with real hubs against iot-core-local.

Every hub holds the same claim. With the takeover guard as the template's pre-provisioning hook (the
recipe's default, the Lambda function iot-core-local hosts; or `TakeoverGuard`'s URL), a hub
sending an onboarded hub's serial is refused before anything changes (the thing keeps its one certificate
and its attributes); the claim cannot connect with a provisioned hub's client id; and a hub whose old
certificate was deactivated onboards again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hub_onboarding import HubOnboarding, IdentityError
from iot_core_local.recipes.claims import ClaimSetup, set_up_fleet_provisioning
from iot_core_local.recipes.takeover import TakeoverGuard
from iot_core_local.server import LocalIotCore
from tests._support.certificates import pem_certificate_id, thing_certificates
from tests._support.hubs import cloud_claim_hub, read_config
from tests._support.network import connects

pytestmark = pytest.mark.e2e


@pytest.fixture(params=["default", "guard-url"])
def guarded(request: pytest.FixtureRequest, iot: Any) -> Iterator[ClaimSetup]:
    # One template per kind for the module's tests, as for a factory's lines.
    if request.param == "default":
        # What the README's walkthrough runs: no hook named, the recipe's default guards the template.
        yield set_up_fleet_provisioning(iot, "DefaultTemplate")
        return
    # Each test has its own guard, so the recipe's rerun points the template at it.
    with TakeoverGuard(iot) as guard:
        yield set_up_fleet_provisioning(iot, "GuardedTemplate", hook_url=guard.url)


def _serial(claim: ClaimSetup, serial: str) -> str:
    """`serial`, made the template's own: the module's tests share one cloud."""
    return f"{serial}-{claim.template_name}"


def test_a_hub_sending_an_onboarded_serial_is_refused_and_changes_nothing(
    cloud: LocalIotCore, iot: Any, guarded: ClaimSetup, tmp_path: Path
) -> None:
    victim = _serial(guarded, "SN-VICTIM")
    owner = cloud_claim_hub(cloud, guarded, tmp_path / "owner", victim, upc="111111111111")
    HubOnboarding(owner).process_device()
    owner_cert = pem_certificate_id(Path(read_config(owner)["rw"]["iot_permanent_cert_path"]).read_bytes())

    intruder = cloud_claim_hub(cloud, guarded, tmp_path / "intruder", victim, upc="999999999999")
    with pytest.raises(IdentityError) as refused:
        HubOnboarding(intruder).process_device()

    assert refused.value.status_code == 403
    # What the hub says points at the usual cause: a hub reset without offboarding its old certificate.
    assert "make the old certificate INACTIVE in the cloud first" in str(refused.value)
    assert read_config(intruder)["rw"]["iot_provisioning_state"] == "NOT_PROVISIONED"
    assert thing_certificates(iot, f"hub-{victim}") == {owner_cert: "ACTIVE"}
    assert iot.describe_thing(thingName=f"hub-{victim}")["attributes"] == {"upc": "111111111111"}
    # The owner still connects as itself.
    rw = read_config(owner)["rw"]
    assert connects(cloud, rw["iot_permanent_cert_path"], rw["iot_permanent_pk_path"], rw["client_id"])


def test_the_claim_cannot_connect_as_a_provisioned_hub(
    cloud: LocalIotCore, guarded: ClaimSetup, tmp_path: Path
) -> None:
    cert, key = tmp_path / "claim.crt", tmp_path / "claim.key"
    cert.write_text(guarded.certificate_pem)
    key.write_text(guarded.private_key_pem)
    key.chmod(0o600)
    assert connects(cloud, cert, key, "SN-FACTORY-0001")  # as a factory-fresh hub: its serial
    assert not connects(cloud, cert, key, "hub-SN-FACTORY-0001")  # as a provisioned hub's client id


def test_a_hub_whose_certificate_was_deactivated_onboards_again(
    cloud: LocalIotCore, iot: Any, guarded: ClaimSetup, tmp_path: Path
) -> None:
    reborn = _serial(guarded, "SN-REBORN")
    first = cloud_claim_hub(cloud, guarded, tmp_path / "first", reborn, upc="111111111111")
    HubOnboarding(first).process_device()
    old = pem_certificate_id(Path(read_config(first)["rw"]["iot_permanent_cert_path"]).read_bytes())
    iot.update_certificate(certificateId=old, newStatus="INACTIVE")  # the maker offboards the hub

    again = cloud_claim_hub(cloud, guarded, tmp_path / "again", reborn, upc="111111111111")
    assert HubOnboarding(again).process_device().state == "PROVISIONED"
    new = pem_certificate_id(Path(read_config(again)["rw"]["iot_permanent_cert_path"]).read_bytes())
    assert thing_certificates(iot, f"hub-{reborn}") == {old: "INACTIVE", new: "ACTIVE"}
