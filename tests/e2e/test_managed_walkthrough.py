"""README's "Managed integrations, step by step", command by command: the AWS CLI's
`aws iot-managed-integrations ... --endpoint-url` (a real awscli process) against iot-core-local, then the
hub with `hub-onboard`, then offboarding; and the boto3 recipe the README shows, run twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub_onboarding import cli as hub_cli
from hub_onboarding.errors import IdentityError
from iot_core_local import cli as local_cli
from iot_core_local.customer_setup import set_up_fleet
from iot_core_local.recipes.managed_integrations import Hub, set_up_managed_integrations
from iot_core_local.recipes.takeover import TakeoverGuard
from iot_core_local.server import LocalIotCore
from tests._support.hubs import read_config
from tests.e2e.test_managed_integrations import aws
from tests.e2e.test_walkthroughs import hand_written_config, mode

pytestmark = pytest.mark.e2e


def _hub_config(hub: Path, core: LocalIotCore, template: str, upc: str = "012345678905") -> Path:
    """The walkthrough's hand-written config of a fleet provisioning hub, SN-0001, its claim in `hub`."""
    return hand_written_config(
        hub,
        core,
        {
            "iot_provisioning_method": "FLEET_PROVISIONING",
            "iot_claim_cert_path": "claim.pem.crt",
            "iot_claim_pk_path": "claim.pem.key",
            "fp_template_name": template,
            "SN": "SN-0001",
            "UPC": upc,
        },
    )


def test_the_managed_integrations_walkthrough_with_the_aws_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cloud, hub = tmp_path / "cloud", tmp_path / "hub"
    with LocalIotCore(cloud) as core:
        assert aws(core, "register-custom-endpoint")["EndpointAddress"] == core.endpoint.mqtt_host
        profile = aws(
            core,
            "create-provisioning-profile",
            "--provisioning-type",
            "FLEET_PROVISIONING",
            "--name",
            "HubProfile",
        )
        hub.mkdir(mode=0o700)
        (hub / "claim.pem.crt").write_text(profile["ClaimCertificate"])
        (hub / "claim.pem.key").write_text(profile["ClaimCertificatePrivateKey"])
        (hub / "claim.pem.key").chmod(0o600)
        thing_id = aws(
            core,
            "create-managed-thing",
            "--role",
            "CONTROLLER",
            "--authentication-material-type",
            "WIFI_SETUP_QR_BAR_CODE",
            "--authentication-material",
            "SN:SN-0001;UPC:012345678905",
            "--query",
            "Id",
        )
        assert aws(core, "get-managed-thing", "--identifier", thing_id, "--query", "ProvisioningStatus") == (
            "PRE_ASSOCIATED"
        )

        config = _hub_config(hub, core, "HubProfile")
        assert hub_cli.main(["provision", "--config", str(config)]) == 0
        out = capsys.readouterr().out
        assert f"client_id={thing_id} managed_thing_id={thing_id}" in out
        assert read_config(config)["rw"]["managed_thing_id"] == thing_id

        status, activated = aws(
            core, "get-managed-thing", "--identifier", thing_id, "--query", "[ProvisioningStatus,ActivatedAt]"
        )
        assert status == "ACTIVATED"
        assert activated
        connectivity = aws(core, "get-managed-thing-connectivity-data", "--identifier", thing_id)
        assert connectivity["ManagedThingId"] == thing_id
        assert connectivity["Connected"] is False  # the hub's verification connect is over

        assert aws(core, "delete-managed-thing", "--identifier", thing_id) is None
        listed = aws(core, "list-managed-things", "--serial-number-filter", "SN-0001")["Items"]
        assert [t["ProvisioningStatus"] for t in listed if t["Id"] == thing_id] in (
            [],
            ["DELETE_IN_PROGRESS"],
        )
        assert hub_cli.main(["reset", "--config", str(config), "--yes"]) == 0
        assert capsys.readouterr().out.startswith("NOT_PROVISIONED")


def test_the_readme_recipe_runs_twice(tmp_path: Path) -> None:
    with LocalIotCore(tmp_path / "cloud") as core:
        mi = core.endpoint.client(core.region, service="iot-managed-integrations")
        hubs = [Hub("SN-0001", upc="012345678905")]
        first = set_up_managed_integrations(mi, "HubProfile", hubs, claim_folder=tmp_path / "hub")
        again = set_up_managed_integrations(mi, "HubProfile", hubs, claim_folder=tmp_path / "hub")
    assert [str(s).split(":")[0] for s in first.steps] == [
        "custom endpoint",
        "provisioning profile HubProfile",
        "claim certificate of HubProfile",
        "managed thing SN-0001",
    ]
    assert all(step.created for step in first.steps)
    assert not any(step.created for step in again.steps)
    assert f"saved in {tmp_path / 'hub' / 'claim.pem.crt'}" in str(again.steps[2])
    assert (mode(tmp_path / "hub"), mode(tmp_path / "hub" / "claim.pem.key")) == (0o700, 0o600)


def test_setup_managed_pre_associates_and_a_hub_onboards_with_its_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cloud, hub = tmp_path / "cloud", tmp_path / "hub"
    command = ["setup-managed", "--data-dir", str(cloud), "--out", str(hub), "--hub", "SN-0001:012345678905"]
    with LocalIotCore(cloud) as core:
        assert local_cli.main(command) == 0
        first = capsys.readouterr().out
        assert "managed thing SN-0001: created" in first
        assert f"saved in {hub / 'claim.pem.crt'}" in first
        assert "fp_template_name HubProfile" in first
        assert (mode(hub), mode(hub / "claim.pem.key")) == (0o700, 0o600)

        assert local_cli.main(command) == 0
        again = capsys.readouterr().out
        assert "created" not in again
        assert again.count(": exists") == 4

        config = _hub_config(hub, core, "HubProfile")
        assert hub_cli.main(["provision", "--config", str(config)]) == 0
        mi = core.endpoint.client(core.region, service="iot-managed-integrations")
        (thing,) = mi.list_managed_things(SerialNumberFilter="SN-0001")["Items"]
        assert thing["ProvisioningStatus"] == "ACTIVATED"
        assert read_config(config)["rw"]["managed_thing_id"] == thing["Id"]


def test_setup_managed_into_a_folder_without_the_claim_fails_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The profile exists and its claim was saved elsewhere: a folder no hub can onboard from is an error."""
    cloud = tmp_path / "cloud"
    with LocalIotCore(cloud) as core:
        first = ["setup-managed", "--data-dir", str(cloud), "--out", str(tmp_path / "hub")]
        assert local_cli.main(first) == 0
        capsys.readouterr()
        other = tmp_path / "other"
        command = [
            "setup-managed",
            "--data-dir",
            str(cloud),
            "--out",
            str(other),
            "--hub",
            "SN-0009:012345678905",
        ]
        assert local_cli.main(command) == 3
        printed = capsys.readouterr()
        err = printed.err.strip()
        assert "created" not in printed.out  # refused before anything is made
        mi = core.endpoint.client(core.region, service="iot-managed-integrations")
        assert mi.list_managed_things(SerialNumberFilter="SN-0009")["Items"] == []
    assert err.count("\n") == 0, err
    assert err.startswith(f"iot-core-local setup-managed: {other} does not hold the claim of provisioning")
    assert "use the --out folder given then" in err
    assert "delete-provisioning-profile --identifier HubProfile" in err
    assert not list(other.glob("claim.*"))


@pytest.mark.parametrize("bad", ["SN-0001", "SN-0001:12ab", "SN-0001:1234567", ":012345678905"])
def test_setup_managed_names_a_bad_hub(tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str) -> None:
    assert (
        local_cli.main(["setup-managed", "--data-dir", str(tmp_path), "--out", str(tmp_path), "--hub", bad])
        == 2
    )
    assert "SERIAL:UPC" in capsys.readouterr().err


def test_setup_fleet_with_the_takeover_guard_refuses_a_second_hub_with_the_same_serial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cloud, out = tmp_path / "cloud", tmp_path / "claim"
    with LocalIotCore(cloud) as core:
        outcomes: list[int] = []

        def two_hubs(guard: TakeoverGuard) -> None:
            for name, upc in (("first", "111111111111"), ("second", "999999999999")):
                hub = tmp_path / name
                hub.mkdir()
                for file in ("claim.pem.crt", "claim.pem.key"):
                    (hub / file).write_bytes((out / file).read_bytes())
                (hub / "claim.pem.key").chmod(0o600)
                config = _hub_config(hub, core, "HubTemplate", upc)
                outcomes.append(hub_cli.main(["provision", "--config", str(config)]))

        set_up_fleet(cloud, out, "HubTemplate", takeover_guard=True, run=two_hubs)
        assert "takeover guard: listening on http://127.0.0.1:" in capsys.readouterr().out
        assert outcomes == [0, IdentityError.exit_code]
        assert core.client().describe_thing(thingName="hub-SN-0001")["attributes"] == {"upc": "111111111111"}
