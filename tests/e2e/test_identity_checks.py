"""The hub checks the identity the service hands it (issue 9 point 6), against iot-core-local.

A template whose DeviceConfiguration returns a client id or managed thing id the hub cannot use: the real
hub (awscrt, real TLS, hub-onboard's command line) gets an IdentityError naming the value, its config is
byte for byte what it was, and no certificate, key or record of the attempt is left on disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hub_onboarding.cli import main
from hub_onboarding.errors import IdentityError
from iot_core_local.recipes.claims import create_claim, ensure_fleet_provisioning, hub_template_body
from iot_core_local.server import LocalIotCore
from tests._support.hubs import cloud_claim_hub, snapshot

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("name", "device_configuration", "named"),
    [
        ("LongClientId", {"ClientId": "c" * 129}, "'" + "c" * 80 + "'... (129 characters)"),
        ("CtrlClientId", {"ClientId": "hub\u0007bell"}, "'hub\\x07bell'"),
        ("EmptyClientId", {"ClientId": ""}, "ClientId ''"),
        ("SlashMtId", {"ManagedThingId": "mt/../1"}, "ManagedThingId 'mt/../1'"),
    ],
)
def test_an_unusable_identity_from_the_service_writes_nothing(
    cloud: LocalIotCore,
    iot: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    device_configuration: dict[str, str],
    named: str,
) -> None:
    resources = ensure_fleet_provisioning(iot, name)
    body = json.loads(hub_template_body(resources.hub_policy_name))
    body["DeviceConfiguration"].update(device_configuration)
    iot.create_provisioning_template_version(
        templateName=name, templateBody=json.dumps(body), setAsDefault=True
    )
    claim = create_claim(iot, resources)
    config = cloud_claim_hub(cloud, claim, tmp_path / "hub", f"SN-{name}")
    before = snapshot(tmp_path / "hub")

    assert main(["provision", "--config", str(config)]) == IdentityError.exit_code

    err = capsys.readouterr().err
    assert named in err
    assert "Traceback" not in err
    after = snapshot(tmp_path / "hub")
    # Only the onboarding lock file and the (empty) credentials folder are new: rw is unchanged and
    # nothing of the attempt is kept.
    new = {path: entry for path, entry in after.items() if path not in before}
    assert all(entry[0] == "dir" or path.endswith(".lock") for path, entry in new.items()), new
    assert {path: after[path] for path in before} == before
    # The service did register the thing: the refusal is the hub's own.
    assert iot.describe_thing(thingName=f"hub-SN-{name}")["thingName"] == f"hub-SN-{name}"
