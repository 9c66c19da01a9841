"""Two `hub-onboard provision` runs on one config: exactly one onboards (flock on `<config>.lock`); the other
waits and reports the result (exit 0), or gives up with BusyError (exit 6) and a clear message. Never two
certificates (boto3), never a mixed config. All through real processes, real TLS and Mosquitto.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from iot_core_local.server import LocalIotCore

from .conftest import HubFactory, HubProcess, certificate_ids, read_config, snapshot
from .test_power_cut import assert_recovered

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("method", ["CreateKeysAndCertificate", "CreateCertificateFromCsr"])
@pytest.mark.parametrize("runs", [2, 3])
def test_runs_started_at_the_same_moment(
    cloud: LocalIotCore, iot: Any, make_hub: HubFactory, method: str, runs: int
) -> None:
    config_path = make_hub(certificate_method=method)
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
    cloud: LocalIotCore, iot: Any, make_hub: HubFactory, shim_dir: Path
) -> None:
    config_path = make_hub()
    original = read_config(config_path)
    before = certificate_ids(iot)
    # The first run is frozen in the middle of onboarding, holding the lock.
    first = HubProcess(
        config_path,
        shim_dir=shim_dir,
        freeze={"kind": "line", "text": "connected with the claim certificate"},
    )
    first.wait_frozen()
    second = HubProcess(config_path, verbosity="-v")  # waits for the lock (default: 600 s)
    files = snapshot(config_path.parent)
    third = HubProcess(config_path, "--lock-wait", "0.5", verbosity="")
    busy = third.finish(20)
    assert busy.returncode == 6, busy.stderr  # BusyError
    assert f"another hub-onboard is onboarding with {config_path}" in busy.stderr
    assert "wait for it to finish, then run provision again" in busy.stderr
    assert "Traceback" not in busy.stderr
    assert snapshot(config_path.parent) == files, "the run that gave up wrote nothing"
    time.sleep(0.5)
    assert second.proc.poll() is None, "the second run is still waiting for the lock"
    assert "connected with the claim certificate" not in second.stderr
    first.resume()
    done = [first.finish(30), second.finish(30)]
    assert [d.returncode for d in done] == [0, 0], [d.stderr for d in done]
    assert "newly provisioned" in done[0].stdout
    assert "already provisioned" in done[1].stdout
    assert "another run provisioned this hub meanwhile" in done[1].stderr
    cert_id = assert_recovered(cloud, iot, config_path, original)
    assert certificate_ids(iot) - before == {cert_id}


def test_the_waiting_run_takes_over_when_the_first_dies(
    cloud: LocalIotCore, iot: Any, make_hub: HubFactory, shim_dir: Path
) -> None:
    """The lock dies with its holder (flock): the waiting run resumes the dead one's progress."""
    config_path = make_hub()
    original = read_config(config_path)
    before = certificate_ids(iot)
    first = HubProcess(
        config_path, shim_dir=shim_dir, freeze={"kind": "line", "text": "credentials stored in"}
    )
    first.wait_frozen()
    second = HubProcess(config_path)
    time.sleep(0.5)
    assert second.proc.poll() is None
    first.kill()
    done = second.finish(30)
    assert done.returncode == 0, done.stderr
    assert "resuming after CERTIFICATE_ISSUED" in done.stderr
    assert "certificate issued (" not in done.stderr
    cert_id = assert_recovered(cloud, iot, config_path, original)
    assert certificate_ids(iot) - before == {cert_id}
