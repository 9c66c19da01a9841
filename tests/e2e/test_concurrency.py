"""Two `hub-onboard provision` runs on one config: exactly one onboards (flock on `<config>.lock`); the other
waits and reports the result (exit 0), or gives up with BusyError (exit 6) and a clear message. Never two
certificates (boto3), never a mixed config. All through real processes, real TLS and Mosquitto.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from iot_core_local.server import LocalIotCore
from tests._support.certificates import certificate_ids
from tests._support.hubs import CloudHubFactory, read_config, snapshot
from tests._support.processes import HubProcess, freeze_at_step
from tests._support.recovery import assert_recovered

# No test here changes the claim or its template in the cloud: one claim serves the module.
pytestmark = [pytest.mark.e2e, pytest.mark.shared_claim]


@pytest.mark.parametrize("method", ["CreateKeysAndCertificate", "CreateCertificateFromCsr"])
@pytest.mark.parametrize("runs", [2, 3])
def test_runs_started_at_the_same_moment(
    cloud: LocalIotCore, iot: Any, make_cloud_hub: CloudHubFactory, method: str, runs: int
) -> None:
    config_path = make_cloud_hub(certificate_method=method)
    original = read_config(config_path)
    before = certificate_ids(iot)
    hubs = [HubProcess(config_path, verbosity="-v") for _ in range(runs)]
    results = [hub.finish(60) for hub in hubs]
    assert [r.returncode for r in results] == [0] * runs, [r.stderr for r in results]
    outputs = [r.stdout for r in results]
    assert sum("newly provisioned" in out for out in outputs) == 1, outputs
    assert sum("already provisioned" in out for out in outputs) == runs - 1, outputs
    # Exactly one of them talked to the cloud.
    assert sum("connected with the claim certificate" in r.stderr for r in results) == 1
    cert_id = assert_recovered(cloud, iot, config_path, original)
    assert certificate_ids(iot) - before == {cert_id}, "never two certificates"
    client_ids = {out.split("client_id=")[1].split()[0] for out in outputs}
    assert client_ids == {read_config(config_path)["rw"]["client_id"]}, "every run reports the same identity"


def test_the_second_run_waits_and_a_third_gives_up(
    cloud: LocalIotCore, iot: Any, make_cloud_hub: CloudHubFactory, shim_dir: Path
) -> None:
    config_path = make_cloud_hub()
    original = read_config(config_path)
    before = certificate_ids(iot)
    # The first run is frozen in the middle of onboarding, holding the lock.
    first = HubProcess(
        config_path,
        shim_dir=shim_dir,
        freeze=freeze_at_step("CLAIM_CONNECTED"),
    )
    first.wait_frozen()
    second = HubProcess(config_path, verbosity="-v", json_steps=True)  # waits for the lock (default: 600 s)
    second.wait_for_step("WAITING_FOR_LOCK")  # said at once: it waits for the lock
    files = snapshot(config_path.parent)
    third = HubProcess(config_path, "--lock-wait", "0.5", verbosity="")
    busy = third.finish(20)
    assert busy.returncode == 6, busy.stderr  # BusyError
    assert busy.stderr.startswith(
        f"hub-onboard: warning: another hub-onboard (pid {first.proc.pid}) is onboarding with {config_path}; "
        "waiting up to 0.5 s for it to finish"
    ), busy.stderr
    assert f"another hub-onboard (pid {first.proc.pid}) is onboarding with {config_path} (lock" in busy.stderr
    assert "wait for it to finish, then run provision again" in busy.stderr
    assert "Traceback" not in busy.stderr
    assert snapshot(config_path.parent) == files, "the run that gave up wrote nothing"
    # The third run waited out its 0.5 s at the lock meanwhile: the second is still there, not past it.
    assert second.proc.poll() is None, "the second run is still waiting for the lock"
    assert second.steps == ["CONFIG_READ", "WAITING_FOR_LOCK"]
    first.resume()
    done = [first.finish(30), second.finish(30)]
    assert [d.returncode for d in done] == [0, 0], [d.stderr for d in done]
    assert json.loads(done[0].stdout)["changed"] is True  # newly provisioned (--json: the freeze's steps)
    assert json.loads(done[1].stdout)["changed"] is False
    assert done[1].steps == ["CONFIG_READ", "WAITING_FOR_LOCK", "PROVISIONED_MEANWHILE"]
    cert_id = assert_recovered(cloud, iot, config_path, original)
    assert certificate_ids(iot) - before == {cert_id}


def test_the_waiting_run_takes_over_when_the_first_dies(
    cloud: LocalIotCore, iot: Any, make_cloud_hub: CloudHubFactory, shim_dir: Path
) -> None:
    """The lock dies with its holder (flock): the waiting run resumes the dead one's progress."""
    config_path = make_cloud_hub()
    original = read_config(config_path)
    before = certificate_ids(iot)
    first = HubProcess(config_path, shim_dir=shim_dir, freeze=freeze_at_step("CREDENTIALS_STORED"))
    first.wait_frozen()
    second = HubProcess(config_path, json_steps=True)
    second.wait_for_step("WAITING_FOR_LOCK")  # said at once: it waits for the lock
    assert second.proc.poll() is None
    first.kill()
    done = second.finish(30)
    assert done.returncode == 0, done.stderr
    assert "RESUMED_AFTER_CERTIFICATE_ISSUED" in done.steps
    assert "CERTIFICATE_ISSUED" not in done.steps
    cert_id = assert_recovered(cloud, iot, config_path, original)
    assert certificate_ids(iot) - before == {cert_id}
