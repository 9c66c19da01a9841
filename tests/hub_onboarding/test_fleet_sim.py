"""fleet-sim end to end: a real embedded iot-core-local, real TLS, real Mosquitto, no mocks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hub_onboarding.errors import EXIT_USAGE
from hub_onboarding.tools import fleet_sim

pytestmark = pytest.mark.e2e


def _capture_cloud(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Keep the boto3 client of the embedded cloud so the test can count what onboarding created."""
    seen: dict[str, Any] = {}
    real = fleet_sim.embedded_cloud

    def spy(
        data_dir: Path, template_name: str = fleet_sim.DEFAULT_TEMPLATE, *, plain_iot: bool = False
    ) -> Any:
        cm = real(data_dir, template_name, plain_iot=plain_iot)

        class Wrapper:
            def __enter__(self) -> Any:
                target, iot = cm.__enter__()
                seen["iot"] = iot
                seen["mi"] = target.managed_integrations_client()
                seen["things"] = iot.list_things()["things"]
                return target, iot

            def __exit__(self, *exc: Any) -> Any:
                # counted while the cloud still runs, just before it stops
                iot = seen["iot"]
                seen["things_after"] = [t["thingName"] for t in iot.list_things(maxResults=250)["things"]]
                seen["certificates_after"] = iot.list_certificates(pageSize=250)["certificates"]
                if seen["mi"] is not None:
                    seen["managed_after"] = seen["mi"].list_managed_things()["Items"]
                return cm.__exit__(*exc)

        return Wrapper()

    monkeypatch.setattr(fleet_sim, "embedded_cloud", spy)
    return seen


@pytest.mark.timeout(60)
def test_fleet_sim_pre_associates_and_onboards_every_hub(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen = _capture_cloud(monkeypatch)
    code = fleet_sim.main(
        ["--hubs", "5", "--concurrency", "3", "--json", "--serial-prefix", "T", "--work-dir", str(tmp_path)]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["pre_associated"], summary["onboarded"], summary["failed"]) == (5, 5, 0)
    assert (summary["hubs"], summary["concurrency"]) == (5, 3)
    assert summary["latency_p50_ms"] > 0
    assert summary["provisionings_per_s"] > 0
    # In the cloud: one managed thing per serial, ACTIVATED; on each hub, that managed thing's id.
    managed = {t["SerialNumber"]: t for t in seen["managed_after"]}
    assert sorted(managed) == [f"T-{i:06d}" for i in range(5)]
    assert {t["ProvisioningStatus"] for t in managed.values()} == {"ACTIVATED"}
    for config in sorted((tmp_path / "hubs").glob("hub-*/iotmi_config.json")):
        doc = json.loads(config.read_text())
        assert doc["rw"]["iot_provisioning_state"] == "PROVISIONED"
        assert doc["rw"]["managed_thing_id"] == managed[doc["ro"]["SN"]]["Id"]


@pytest.mark.timeout(60)
def test_fleet_sim_plain_iot_onboards_every_hub(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen = _capture_cloud(monkeypatch)
    code = fleet_sim.main(
        [
            "--hubs",
            "5",
            "--concurrency",
            "3",
            "--json",
            "--serial-prefix",
            "T",
            "--work-dir",
            str(tmp_path),
            "--plain-iot",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["pre_associated"], summary["onboarded"], summary["failed"]) == (0, 5, 0)
    # In the cloud: no thing before, one thing per hub after, one certificate per hub plus the claim.
    assert seen["things"] == []
    assert sorted(seen["things_after"]) == [f"hub-T-{i:06d}" for i in range(5)]
    active = [c for c in seen["certificates_after"] if c["status"] == "ACTIVE"]
    assert len(seen["certificates_after"]) == 6
    assert len(active) == 6
    # On the hubs: every config PROVISIONED, each with its own client id.
    configs = sorted((tmp_path / "hubs").glob("hub-*/iotmi_config.json"))
    rws = [json.loads(p.read_text())["rw"] for p in configs]
    assert [rw["iot_provisioning_state"] for rw in rws] == ["PROVISIONED"] * 5
    assert len({rw["client_id"] for rw in rws}) == 5


@pytest.mark.timeout(60)
def test_fleet_sim_exits_non_zero_when_hubs_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A cloud config whose template does not exist: every hub is refused, the exit code says so."""
    from iot_core_local.recipes.claims import set_up_fleet_provisioning
    from iot_core_local.server import LocalIotCore

    with LocalIotCore(tmp_path / "cloud") as core:
        claim = set_up_fleet_provisioning(core.client(), "RealTemplate")
        (tmp_path / "claim.crt").write_text(claim.certificate_pem)
        (tmp_path / "claim.key").write_text(claim.private_key_pem)
        (tmp_path / "claim.key").chmod(0o600)
        cloud = {
            "endpoint_url": core.endpoint.mqtt_address,
            "root_ca_path": str(core.endpoint.root_ca_path),
            "claim_certificate_path": "claim.crt",
            "claim_private_key_path": "claim.key",
            "template_name": "NoSuchTemplate",
        }
        (tmp_path / "cloud.json").write_text(json.dumps(cloud))
        code = fleet_sim.main(
            [
                "--hubs",
                "2",
                "--concurrency",
                "2",
                "--json",
                "--config",
                str(tmp_path / "cloud.json"),
                "--work-dir",
                str(tmp_path / "w"),
            ]
        )
        assert core.client().list_things()["things"] == []
    assert code == fleet_sim.EXIT_FAILED
    summary = json.loads(capsys.readouterr().out)
    assert summary["onboarded"] == 0
    assert summary["failed"] == 2
    # The claim policy covers RealTemplate's topics only, so the hubs are refused at SUBSCRIBE.
    assert sum(summary["errors"].values()) == 2
    assert all(e.startswith("SubscribeTimeoutError") for e in summary["errors"])


def test_cloud_config_errors_name_the_key(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"endpoint_url": "x:8883"}))
    assert fleet_sim.main(["--config", str(tmp_path / "c.json")]) == fleet_sim.EXIT_CONFIG
    with pytest.raises(fleet_sim.CloudConfigError, match="claim_certificate_path"):
        fleet_sim.Target.from_file(tmp_path / "c.json")
    assert fleet_sim.main(["--hubs", "0"]) == EXIT_USAGE


def test_plain_iot_with_a_cloud_config_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--plain-iot chooses what the embedded cloud sets up; with --config there is none to choose for."""
    assert fleet_sim.main(["--config", str(tmp_path / "c.json"), "--plain-iot"]) == EXIT_USAGE
    assert "argument --plain-iot: not allowed with argument --config" in capsys.readouterr().err


@pytest.mark.parametrize("managed", [[], {"region": 7}, {"regio": "eu-west-1"}, {"region": ""}])
def test_a_bad_managed_integrations_object_is_named(tmp_path: Path, managed: Any) -> None:
    for name in ("ca.pem", "claim.crt", "claim.key"):
        (tmp_path / name).write_text("x")
    cloud = {
        "endpoint_url": "x:8883",
        "root_ca_path": "ca.pem",
        "claim_certificate_path": "claim.crt",
        "claim_private_key_path": "claim.key",
        "template_name": "T",
        "managed_integrations": managed,
    }
    (tmp_path / "c.json").write_text(json.dumps(cloud))
    with pytest.raises(fleet_sim.CloudConfigError, match="'managed_integrations' must be an object"):
        fleet_sim.Target.from_file(tmp_path / "c.json")
    cloud["managed_integrations"] = {"region": "eu-west-1"}
    (tmp_path / "c.json").write_text(json.dumps(cloud))
    assert fleet_sim.Target.from_file(tmp_path / "c.json").managed_integrations == {"region": "eu-west-1"}


def test_percentile() -> None:
    assert fleet_sim.percentile([], 50) == 0.0
    assert fleet_sim.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert fleet_sim.percentile([1.0, 2.0, 3.0], 100) == 3.0


@pytest.mark.timeout(60)
def test_hub_onboard_fleet_sim_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    """`hub-onboard fleet-sim ...` hands its arguments to fleet_sim.main (here without the reconnect)."""
    from hub_onboarding import cli

    assert cli.main(["fleet-sim", "--hubs", "2", "--concurrency", "2", "--json", "--no-verify"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["onboarded"] == 2
    assert summary["failed"] == 0


def test_retries_are_counted_from_step_events() -> None:
    from hub_onboarding.onboarding import OnboardingStep, StepEvent

    counter = fleet_sim.RetryCounter()  # what onboard_fleet hands each hub as its on_step
    for step in (
        OnboardingStep.CONFIG_READ,
        OnboardingStep.RETRY,
        OnboardingStep.RECORDED,
        OnboardingStep.RETRY,
    ):
        counter(StepEvent(step, "..."))
    assert counter.count == 2


def test_a_relative_work_dir_is_the_one_named_from_where_fleet_sim_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--work-dir relwd`: every hub onboards (its claim paths were doubled: relwd/hubs/.../relwd/...)."""
    monkeypatch.chdir(tmp_path)
    code = fleet_sim.main(
        ["--hubs", "2", "--concurrency", "2", "--json", "--work-dir", "relwd", "--plain-iot"]
    )
    summary = json.loads(capsys.readouterr().out)
    assert (code, summary["onboarded"], summary["failed"]) == (0, 2, 0)
    configs = sorted((tmp_path / "relwd" / "hubs").glob("hub-*/iotmi_config.json"))
    assert len(configs) == 2
