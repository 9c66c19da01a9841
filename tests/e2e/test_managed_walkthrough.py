"""README's "Managed integrations, step by step", command by command: the AWS CLI's
`aws iot-managed-integrations ... --endpoint-url` (a real awscli process) against iot-core-local, then the
hub with `hub-onboard`, then offboarding; and the boto3 recipe the README shows, run twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hub_onboarding import cli as hub_cli
from hub_onboarding.errors import IdentityError
from iot_core_local import cli as local_cli
from iot_core_local.recipes.claims import set_up_fleet_provisioning, takeover_guard_arn
from iot_core_local.recipes.managed_integrations import Hub, set_up_managed_integrations
from iot_core_local.server import LocalIotCore
from tests._support.certificates import thing_certificates
from tests._support.devices import Lifecycle
from tests._support.hubs import read_config
from tests.e2e.test_managed_integrations import aws
from tests.e2e.test_walkthroughs import hand_written_config, mode

pytestmark = pytest.mark.e2e

GUARD_ARN = takeover_guard_arn("us-east-1", "123456789012")


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
        watcher = Lifecycle(core)
        try:
            assert hub_cli.main(["provision", "--config", str(config)]) == 0
            # provision returns once the hub sent its DISCONNECT; the gateway reports it a moment later.
            watcher.wait_for((thing_id, False, "CLIENT_INITIATED_DISCONNECT"))
        finally:
            watcher.close()
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


def _two_hubs_with_one_serial(tmp_path: Path, core: LocalIotCore, out: Path) -> list[int]:
    """`hub-onboard provision` for two hubs with the claim in `out` and serial SN-0001, one by one."""
    outcomes = []
    for name, upc in (("first", "111111111111"), ("second", "999999999999")):
        hub = tmp_path / name
        hub.mkdir()
        for file in ("claim.pem.crt", "claim.pem.key"):
            (hub / file).write_bytes((out / file).read_bytes())
        (hub / "claim.pem.key").chmod(0o600)
        config = _hub_config(hub, core, "HubTemplate", upc)
        outcomes.append(hub_cli.main(["provision", "--config", str(config)]))
    return outcomes


def test_setup_fleet_refuses_a_second_hub_with_the_same_serial_by_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cloud, out = tmp_path / "cloud", tmp_path / "claim"
    with LocalIotCore(cloud) as core:
        assert local_cli.main(["setup-fleet", "--data-dir", str(cloud), "--out", str(out)]) == 0
        assert f"takeover guard: {GUARD_ARN} (hosted by iot-core-local)" in capsys.readouterr().out

        assert _two_hubs_with_one_serial(tmp_path, core, out) == [0, IdentityError.exit_code]

        iot = core.client()
        assert iot.describe_thing(thingName="hub-SN-0001")["attributes"] == {"upc": "111111111111"}
        assert len(thing_certificates(iot, "hub-SN-0001")) == 1


def test_setup_fleet_rerun_guards_a_cloud_set_up_without_the_guard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cloud, out = tmp_path / "cloud", tmp_path / "claim"
    with LocalIotCore(cloud) as core:
        iot = core.client()
        # What an older set-up left: a template without a hook and a claim policy without the Deny.
        set_up_fleet_provisioning(iot, "HubTemplate", takeover_guard=False)
        document = json.loads(iot.get_policy(policyName="HubTemplate-claim")["policyDocument"])
        document["Statement"] = [s for s in document["Statement"] if s["Effect"] != "Deny"]
        iot.create_policy_version(
            policyName="HubTemplate-claim", policyDocument=json.dumps(document), setAsDefault=True
        )
        assert "preProvisioningHook" not in iot.describe_provisioning_template(templateName="HubTemplate")

        assert local_cli.main(["setup-fleet", "--data-dir", str(cloud), "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "pre-provisioning hook of template HubTemplate: created" in printed
        assert "version 3 of policy HubTemplate-claim, denying the hubs' client ids: created" in printed

        assert _two_hubs_with_one_serial(tmp_path, core, out) == [0, IdentityError.exit_code]
        assert len(thing_certificates(iot, "hub-SN-0001")) == 1


def test_setup_fleet_keeps_a_hook_of_the_hub_makers_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: setup-fleet named the guard explicitly, which replaced any hook the template had.
    cloud, out = tmp_path / "cloud", tmp_path / "claim"
    own = "arn:aws:lambda:us-east-1:123456789012:function:MyOwnGuard"
    with LocalIotCore(cloud) as core:
        iot = core.client()
        set_up_fleet_provisioning(iot, "HubTemplate", hook_url=own)
        assert local_cli.main(["setup-fleet", "--data-dir", str(cloud), "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert f"pre-provisioning hook: {own} (your own, kept)" in printed
        assert "pre-provisioning hook of template" not in printed
        hook = iot.describe_provisioning_template(templateName="HubTemplate")["preProvisioningHook"]
        assert hook["targetArn"] == own
