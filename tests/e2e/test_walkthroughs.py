"""README's walkthroughs, step by step: serve, set up with one command, write the config by hand,
provision, status, reset; and JITR with `setup-jitr`. Every set-up command runs twice: the second run
reports what exists and creates nothing."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from hub_onboarding import cli as hub_cli
from iot_core_local import cli as local_cli
from iot_core_local.customer_setup import set_up_jitr
from iot_core_local.recipes.jitr import JitrActivator
from iot_core_local.server import LocalIotCore

pytestmark = pytest.mark.e2e


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def hand_written_config(hub: Path, core: LocalIotCore, ro: dict[str, str]) -> Path:
    """iotmi_config.json as the walkthrough writes it: relative credential paths, the stand-in's CA."""
    config = {
        "ro": {
            "endpoint_url": core.endpoint.mqtt_address,
            "iot_root_ca_path": str(core.endpoint.root_ca_path),
            **ro,
        },
        "rw": {"iot_provisioning_state": "NOT_PROVISIONED"},
    }
    path = hub / "iotmi_config.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def test_the_local_walkthrough(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cloud, hub = tmp_path / "cloud", tmp_path / "hub"
    with LocalIotCore(cloud) as core:
        assert local_cli.main(["setup-fleet", "--data-dir", str(cloud), "--out", str(hub)]) == 0
        first = capsys.readouterr().out
        for line in ("policy HubTemplate-hub: created", "policy HubTemplate-claim: created"):
            assert line in first
        assert "template HubTemplate: created" in first
        assert f"endpoint_url {core.endpoint.mqtt_address}" in first
        assert (mode(hub), mode(hub / "claim.pem.crt"), mode(hub / "claim.pem.key")) == (0o700, 0o644, 0o600)

        assert local_cli.main(["setup-fleet", "--data-dir", str(cloud), "--out", str(hub)]) == 0
        second = capsys.readouterr().out
        assert "created" not in second
        assert second.count(": exists") == 4
        assert len(core.client().list_certificates()["certificates"]) == 1  # one claim, not two

        config = hand_written_config(
            hub,
            core,
            {
                "iot_provisioning_method": "FLEET_PROVISIONING",
                "iot_claim_cert_path": "claim.pem.crt",
                "iot_claim_pk_path": "claim.pem.key",
                "fp_template_name": "HubTemplate",
                "SN": "SN-0001",
                "UPC": "012345678905",
            },
        )
        assert hub_cli.main(["provision", "--config", str(config)]) == 0
        assert "PROVISIONED (newly provisioned) client_id=hub-SN-0001" in capsys.readouterr().out
        assert hub_cli.main(["status", "--config", str(config)]) == 0
        assert "state: PROVISIONED" in capsys.readouterr().out
        assert hub_cli.main(["reset", "--config", str(config), "--yes"]) == 0
        assert capsys.readouterr().out.startswith("NOT_PROVISIONED")
        assert (hub / "claim.pem.crt").is_file()  # the factory's claim stays


def test_setup_jitr_registers_a_ca_issues_a_device_and_activates_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cloud, hub = tmp_path / "cloud", tmp_path / "hub"
    with LocalIotCore(cloud) as core:
        config = hub / "iotmi_config.json"

        def onboard_the_hub(activator: JitrActivator) -> None:
            hand_written_config(
                hub,
                core,
                {
                    "iot_provisioning_method": "JITR",
                    "iot_dha_cert_path": "dha.pem.crt",
                    "iot_dha_pk_path": "dha.pem.key",
                    "SN": "SN-0002",
                    "UPC": "012345678905",
                },
            )
            assert hub_cli.main(["provision", "--config", str(config)]) == 0

        set_up_jitr(cloud, hub, "hub-jitr-0001", None, run=onboard_the_hub)
        out = capsys.readouterr().out
        assert "device CA " in out
        assert ": created" in out
        assert "PROVISIONED (newly provisioned) client_id=hub-jitr-0001" in out
        assert (mode(hub / "device-ca"), mode(hub / "device-ca" / "device-ca.key")) == (0o700, 0o600)
        iot: Any = core.client()
        assert [t["thingName"] for t in iot.list_things()["things"]] == ["hub-jitr-0001"]

        # Run again (a restarted activator): the CA, the policies and the device are there already.
        set_up_jitr(cloud, hub, "hub-jitr-0001", None, run=lambda activator: None)
        again = capsys.readouterr().out
        assert "created" not in again
        assert again.count(": exists") == 3
        assert len(iot.list_ca_certificates()["certificates"]) == 1
