"""`hub-onboard demo`: the whole story with no arguments, ending in a PROVISIONED config."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hub_onboarding.cli import main

pytestmark = pytest.mark.e2e


def test_demo_tells_the_managed_integrations_story(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    thing_id = re.search(r"managed thing SN-DEMO-0001: created, id ([0-9a-f]{32}) PRE_ASSOCIATED", out)
    assert thing_id is not None
    mt = thing_id.group(1)
    for line in (
        "provisioning profile DemoHubProfile: created",
        f"hub: thing registered: {mt}",
        f"{mt} ACTIVATED since",
        f"rw.client_id {mt}, rw.managed_thing_id {mt}",
        "GetManagedThingConnectivityData: Connected True",
        "the cloud closed the hub's connection",
        "GetManagedThing: ResourceNotFoundException",
        "hub-onboard reset: NOT_PROVISIONED",
    ):
        assert line in out
    assert out.index("PRE_ASSOCIATED") < out.index("ACTIVATED since") < out.index("Connected True")
    assert "PRIVATE KEY" not in out


def test_demo_plain_iot_provisions_a_simulated_hub_and_refuses_a_takeover(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo", "--plain-iot"]) == 0
    out = capsys.readouterr().out
    for step in ("starting iot-core-local", "claim certificate", "thing registered", "the cloud now has"):
        assert step in out
    assert "refused by the takeover guard (statusCode 403)" in out
    config = json.loads(out[out.index("{", out.index("resulting iotmi_config.json")) :])
    assert config["rw"]["iot_provisioning_state"] == "PROVISIONED"
    assert config["rw"]["client_id"] == "hub-SN-DEMO-0001"
    assert len(re.findall(r"certificate [0-9a-f]{16}\.\.\. ACTIVE", out)) == 1  # the intruder got none
    assert "PRIVATE KEY" not in out


def test_demo_keep_leaves_the_hub_and_the_cloud_to_look_at(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kept = tmp_path / "kept"
    assert main(["demo", "--keep", str(kept)]) == 0
    out = capsys.readouterr().out
    assert f"kept in {kept.resolve()}" in out
    config_path = kept.resolve() / "hub" / "iotmi_config.json"
    assert str(config_path) in out
    rw = json.loads(config_path.read_text(encoding="utf-8"))["rw"]
    assert rw["iot_provisioning_state"] == "PROVISIONED"
    assert Path(rw["iot_permanent_cert_path"]).is_file()
    assert Path(rw["iot_permanent_pk_path"]).is_file()
    # The stand-in's data stays too, and was stopped cleanly (its endpoint file goes on a clean stop).
    assert (kept / "cloud" / "registry.sqlite3").is_file()
    assert (kept / "cloud" / "ca" / "root-ca.pem").is_file()
    assert not (kept / "cloud" / "endpoint.json").exists()
    # Serving the kept cloud again as printed puts it on the port the kept hub's config names.
    port = json.loads(config_path.read_text(encoding="utf-8"))["ro"]["endpoint_url"].rsplit(":", 1)[1]
    assert re.search(rf"iot-core-local serve --data-dir \S+ --mqtt-port {port} --api-port \d+\)", out)
    # What status reads afterwards is the kept hub.
    assert main(["status", "--config", str(config_path)]) == 0
    assert "state: PROVISIONED" in capsys.readouterr().out
    # The hub stays onboarded; offboarding is printed as the commands to run.
    assert f"delete-managed-thing --identifier {rw['managed_thing_id']}" in out
    # ... with what the AWS CLI needs on a machine without an AWS set-up (it refused: no region).
    assert (
        f"AWS_SHARED_CREDENTIALS_FILE={kept / 'cloud' / 'credentials'} AWS_DEFAULT_REGION=us-east-1 aws "
        in out
    )
    assert (kept / "cloud" / "credentials").is_file()


def test_demo_keep_refuses_a_folder_with_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mine.txt").write_text("not the demo's", encoding="utf-8")
    assert main(["demo", "--keep", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "is not empty" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_demo_pkcs11_without_its_needs_names_the_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # One line that says which command needs what (it lacked the "hub-onboard demo" prefix the [server]
    # extra's line has), exit 3, before anything starts.
    from hub_onboarding.tools import softhsm

    monkeypatch.setattr(softhsm, "missing_softhsm", lambda: "python-pkcs11 is required: pip install ...")
    assert main(["demo", "--pkcs11"]) == 3
    err = capsys.readouterr().err
    assert err == "hub-onboard demo --pkcs11: python-pkcs11 is required: pip install ...\n"
