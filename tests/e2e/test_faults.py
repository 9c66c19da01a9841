"""Network faults during onboarding: each ends in success after bounded retries, or in its typed error.

Two injectors, both used here:
- iot-core-local's fault switch (`core.faults`, src/iot_core_local/faults.py): throttle, drop, ignore,
  delay and refuse for the next N operations, applied inside the gateway;
- `TcpProxy` (tests/_support/network.py): a TCP forwarder between hub and gateway that can refuse
  connections (endpoint down), cut them (connection lost mid-request) or blackhole them.

Every case runs the real `hub-onboard provision` in a child process against real TLS and Mosquitto, with
small budgets (`mqtt_retry_timeout_seconds`), and checks the elapsed time: nothing hangs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from iot_core_local.recipes.claims import set_up_fleet_provisioning
from iot_core_local.server import LocalIotCore
from tests._support.certificates import certificate_ids, make_pair
from tests._support.hubs import CloudHubFactory, read_config, snapshot
from tests._support.network import TcpProxy, connects
from tests._support.processes import Finished, HubProcess, freeze_at_step, run_hub
from tests._support.recovery import assert_recovered

pytestmark = pytest.mark.e2e

FAULTS: list[str] = []


@pytest.fixture(autouse=True)
def _no_fault_left(cloud: LocalIotCore) -> Iterator[None]:
    cloud.faults.clear()
    yield
    cloud.faults.clear()


def _hub(make_cloud_hub: CloudHubFactory, budget: float, **overrides: Any) -> tuple[Path, dict[str, Any]]:
    config_path = make_cloud_hub(extra_ro={"mqtt_retry_timeout_seconds": budget}, **overrides)
    return config_path, read_config(config_path)


def _provisioned(
    cloud: LocalIotCore, iot: Any, config_path: Path, before: set[str], original: dict[str, Any]
) -> None:
    cert_id = assert_recovered(cloud, iot, config_path, original)
    assert certificate_ids(iot) - before == {cert_id}, "exactly one new certificate"


# ------------------------------------------------------------------------------ endpoint down


def test_endpoint_down_at_start_then_up(
    cloud: LocalIotCore, iot: Any, make_cloud_hub: CloudHubFactory, tcp_proxy: Callable[..., TcpProxy]
) -> None:
    proxy = tcp_proxy(listening=False)
    config_path, original = _hub(make_cloud_hub, 30, endpoint_url=proxy.address)
    before = certificate_ids(iot)
    hub = HubProcess(config_path)
    line = hub.wait_for_line("retrying in", timeout=20)
    assert "nothing listens at the endpoint" in line
    proxy.listen()
    done = hub.finish(40)
    assert done.returncode == 0, done.stderr
    assert done.elapsed < 30
    _provisioned(cloud, iot, config_path, before, original)
    FAULTS.append("endpoint down, then up")


def test_endpoint_stays_down(make_cloud_hub: CloudHubFactory, tcp_proxy: Callable[..., TcpProxy]) -> None:
    proxy = tcp_proxy(listening=False)
    config_path, _ = _hub(make_cloud_hub, 3, endpoint_url=proxy.address)
    # The endpoint under the key a hub maker may use instead: the hint names that key, not endpoint_url.
    doc = json.loads(config_path.read_text())
    doc["ro"]["iot_endpoint_url"] = doc["ro"].pop("endpoint_url")
    config_path.write_text(json.dumps(doc))
    hub_dir = config_path.parent
    files = snapshot(hub_dir)
    done = run_hub(config_path, verbosity="")
    assert done.returncode == 11, done.stderr  # MqttConnectionError
    assert "nothing listens at the endpoint: check iot_endpoint_url and its port" in done.stderr
    gave_up = re.search(r"gave up after \d+ attempt\(s\) in (\d+\.\d) s", done.stderr)
    assert gave_up, done.stderr
    # the time really spent (it stops before a wait that would cross the 3 s budget), rounded
    assert 0 < float(gave_up.group(1)) <= done.elapsed
    assert "mqtt_retry_timeout_seconds" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.elapsed < 12
    after = snapshot(hub_dir)
    after.pop("iotmi_config.json.lock")
    assert after == files, "nothing written but the (empty) lock file"
    FAULTS.append("endpoint stays down")


def test_connack_never_comes(cloud: LocalIotCore, make_cloud_hub: CloudHubFactory) -> None:
    cloud.faults.add("ignore", "Connect", count=20)
    config_path, _ = _hub(make_cloud_hub, 3)
    done = run_hub(config_path, verbosity="")
    assert done.returncode == 11, done.stderr
    assert "could not connect" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.elapsed < 15
    assert read_config(config_path)["rw"]["iot_provisioning_state"] == "NOT_PROVISIONED"
    FAULTS.append("CONNACK never comes")


@pytest.mark.parametrize("kind", ["refuse", "throttle"])
def test_connect_refused_or_throttled_then_accepted(
    cloud: LocalIotCore, iot: Any, make_cloud_hub: CloudHubFactory, kind: str
) -> None:
    cloud.faults.add(kind, "Connect", count=2)
    config_path, original = _hub(make_cloud_hub, 30)
    before = certificate_ids(iot)
    done = run_hub(config_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("retrying in") == 2
    assert cloud.faults.to_json() == []
    _provisioned(cloud, iot, config_path, before, original)
    FAULTS.append(f"Connect {kind}d twice")


# ------------------------------------------------------------------------------ final at once
# Retrying cannot help. Each runs with the default budget (ro.mqtt_retry_timeout_seconds: 300 s): a
# diagnosis in seconds and no retry.


def _final_at_once(done: Finished, exit_code: int, message: str) -> None:
    assert done.returncode == exit_code, done.stderr
    assert message in done.stderr, done.stderr
    assert "retrying in" not in done.stderr
    assert "Traceback" not in done.stderr
    assert done.elapsed < 15


@pytest.mark.parametrize("key", ["endpoint_url", "iot_endpoint_url"])
def test_the_api_port_as_endpoint_is_named_at_once(
    cloud: LocalIotCore, iot: Any, make_cloud_hub: CloudHubFactory, key: str
) -> None:
    api = cloud.endpoint.api_url.split("://", 1)[1].split("/")[0]
    config_path = make_cloud_hub(endpoint_url=api)
    doc = read_config(config_path)
    doc["ro"][key] = doc["ro"].pop("endpoint_url")
    config_path.write_text(json.dumps(doc))
    files = snapshot(config_path.parent)
    before = certificate_ids(iot)
    done = run_hub(config_path, verbosity="")
    _final_at_once(done, 11, f"it answered with HTTP, so this port does not speak MQTT over TLS: check {key}")
    after = snapshot(config_path.parent)
    after.pop("iotmi_config.json.lock")
    assert after == files, "nothing written but the (empty) lock file"
    assert certificate_ids(iot) == before, "nothing minted"
    FAULTS.append(f"API port as {key}")


def test_a_claim_certificate_the_endpoint_does_not_know_is_final(
    iot: Any, make_cloud_hub: CloudHubFactory
) -> None:
    stranger = make_pair("claim from another account")  # self-signed: no registered CA vouches for it
    config_path = make_cloud_hub(
        claim_certificate_pem=stranger.cert_pem.decode(), claim_private_key_pem=stranger.key_pem.decode()
    )
    before = certificate_ids(iot)
    done = run_hub(config_path, "--json", verbosity="")
    _final_at_once(done, 11, "")
    error = json.loads(done.stdout)["error"]
    assert error["type"] == "CertificateRefusedError"
    assert "the endpoint refused this client certificate in the TLS handshake" in error["message"]
    assert "registered in this account and region and ACTIVE" in error["message"]
    assert certificate_ids(iot) == before, "nothing minted"
    assert read_config(config_path)["rw"]["iot_provisioning_state"] == "NOT_PROVISIONED"
    assert not (config_path.parent / "certs").exists(), "nothing written"
    FAULTS.append("unknown claim certificate")


def test_a_template_the_claim_policy_does_not_cover_is_named(
    iot: Any, make_cloud_hub: CloudHubFactory
) -> None:
    """fp_template_name differs from the template the claim policy was written for: RegisterThing's
    subscription is refused, and the message names the template and what to check."""
    config_path = make_cloud_hub(template_name="TemplateWithATypo")
    before = certificate_ids(iot)
    done = run_hub(config_path, verbosity="")
    _final_at_once(done, 13, "RegisterThing: the endpoint refused the subscription to")
    assert "$aws/provisioning-templates/TemplateWithATypo/provision/json/accepted" in done.stderr
    assert "(template 'TemplateWithATypo', fp_template_name)" in done.stderr
    assert "check that this template exists in the account and region" in done.stderr
    assert len(certificate_ids(iot) - before) <= 1, "at most the certificate issued before RegisterThing"
    assert read_config(config_path)["rw"]["iot_provisioning_state"] == "NOT_PROVISIONED"
    FAULTS.append("template the claim policy does not cover")


# ------------------------------------------------------------------------------ mid-request


@pytest.mark.parametrize(
    "operation", ["CreateCertificateFromCsr", "CreateKeysAndCertificate", "RegisterThing"]
)
def test_connection_dropped_in_the_middle_of_a_request(
    cloud: LocalIotCore, iot: Any, make_cloud_hub: CloudHubFactory, operation: str
) -> None:
    method = operation if operation.startswith("Create") else "CreateCertificateFromCsr"
    cloud.faults.add("drop", operation, count=1)
    config_path, original = _hub(make_cloud_hub, 30, certificate_method=method)
    before = certificate_ids(iot)
    done = run_hub(config_path)
    assert done.returncode == 0, done.stderr
    assert "connection was lost during the request" in done.stderr
    if operation == "RegisterThing":
        assert "resuming after CERTIFICATE_ISSUED" in done.stderr
        assert done.stderr.count("certificate issued (") == 1, "the saved token finished RegisterThing"
    _provisioned(cloud, iot, config_path, before, original)
    FAULTS.append(f"drop during {operation}")


def test_proxy_cuts_the_connection_before_register_thing(
    cloud: LocalIotCore,
    iot: Any,
    make_cloud_hub: CloudHubFactory,
    tcp_proxy: Callable[..., TcpProxy],
    shim_dir: Path,
) -> None:
    """TCP-level cut (not the fault switch): the claim connection dies right before RegisterThing."""
    proxy = tcp_proxy()
    config_path, original = _hub(make_cloud_hub, 30, endpoint_url=proxy.address)
    before = certificate_ids(iot)
    hub = HubProcess(config_path, shim_dir=shim_dir, freeze=freeze_at_step("CREDENTIALS_STORED"))
    hub.wait_frozen()
    proxy.cut()
    hub.resume()
    done = hub.finish(40)
    assert done.returncode == 0, done.stderr
    assert "resuming after CERTIFICATE_ISSUED" in done.stderr
    assert proxy.connections >= 3, "claim, claim again, verification"
    _provisioned(cloud, iot, config_path, before, original)
    FAULTS.append("TCP cut before RegisterThing")


# ------------------------------------------------------------------------------ no answer


def test_answer_never_comes_is_a_publish_timeout_then_resumes(
    cloud: LocalIotCore, iot: Any, make_cloud_hub: CloudHubFactory
) -> None:
    cloud.faults.add("ignore", "RegisterThing", count=50)
    config_path, original = _hub(make_cloud_hub, 4)
    before = certificate_ids(iot)
    done = run_hub(config_path)
    assert done.returncode == 14, done.stderr  # PublishTimeoutError
    assert "RegisterThing: no answer within" in done.stderr
    assert "gave up after" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.elapsed < 15, "bounded by mqtt_retry_timeout_seconds (4 s) plus one operation"
    assert read_config(config_path)["rw"]["iot_provisioning_state"] == "NOT_PROVISIONED"
    # The service comes back: the saved token finishes the job; no second certificate.
    cloud.faults.clear()
    again = run_hub(config_path)
    assert again.returncode == 0, again.stderr
    assert "resuming after CERTIFICATE_ISSUED" in again.stderr
    assert "certificate issued (" not in again.stderr
    _provisioned(cloud, iot, config_path, before, original)
    FAULTS.append("answer never comes (PublishTimeoutError), then resumed")


def test_blackholed_connection_ends_in_a_typed_error_within_the_deadline(
    make_cloud_hub: CloudHubFactory, tcp_proxy: Callable[..., TcpProxy], shim_dir: Path
) -> None:
    """The network swallows everything after the claim connect: bounded, typed, nothing PROVISIONED."""
    proxy = tcp_proxy()
    config_path, _ = _hub(make_cloud_hub, 4, endpoint_url=proxy.address)
    hub = HubProcess(
        config_path,
        shim_dir=shim_dir,
        freeze=freeze_at_step("CLAIM_CONNECTED"),
    )
    hub.wait_frozen()
    proxy.blackhole = True
    hub.resume()
    done = hub.finish(30)
    assert done.returncode in (11, 14), done.stderr  # connection error or publish timeout, both typed
    assert "gave up after" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.elapsed < 20
    assert read_config(config_path)["rw"]["iot_provisioning_state"] == "NOT_PROVISIONED"
    FAULTS.append("blackhole")


def test_slow_answer_within_the_deadline_succeeds(
    cloud: LocalIotCore, iot: Any, make_cloud_hub: CloudHubFactory
) -> None:
    cloud.faults.add("delay", "CreateCertificateFromCsr", count=1, seconds=2)
    config_path, original = _hub(make_cloud_hub, 30)
    before = certificate_ids(iot)
    done = run_hub(config_path)
    assert done.returncode == 0, done.stderr
    assert done.elapsed >= 2
    _provisioned(cloud, iot, config_path, before, original)
    FAULTS.append("slow answer (2 s)")


# ------------------------------------------------------------------------------ throttling


@pytest.mark.parametrize("operation", ["CreateCertificateFromCsr", "RegisterThing"])
def test_throttling_is_retried_with_backoff(
    cloud: LocalIotCore, iot: Any, make_cloud_hub: CloudHubFactory, operation: str
) -> None:
    cloud.faults.add("throttle", operation, count=2)
    config_path, original = _hub(make_cloud_hub, 40)
    before = certificate_ids(iot)
    done = run_hub(config_path)
    assert done.returncode == 0, done.stderr
    retries = [line for line in done.stderr.splitlines() if "retrying in" in line]
    assert len(retries) == 2, done.stderr
    assert all("statusCode=429" in line and "Throttling" in line for line in retries)
    if operation == "RegisterThing":
        assert done.stderr.count("certificate issued (") == 1, "throttled RegisterThing keeps its token"
    _provisioned(cloud, iot, config_path, before, original)
    FAULTS.append(f"throttled {operation} x2")


def test_throttling_that_does_not_stop_gives_up_with_the_services_words(
    cloud: LocalIotCore, make_cloud_hub: CloudHubFactory
) -> None:
    cloud.faults.add("throttle", "CreateCertificateFromCsr", count=100)
    config_path, _ = _hub(make_cloud_hub, 3)
    done = run_hub(config_path, verbosity="")
    assert done.returncode == 12, done.stderr  # IdentityError, the service's words kept
    assert "statusCode=429" in done.stderr
    assert "ThrottlingException" in done.stderr
    assert "retry later" in done.stderr
    assert "gave up after" in done.stderr
    assert done.elapsed < 12
    FAULTS.append("throttled beyond the budget")


# ------------------------------------------------------------------------------ server restart


def test_server_restarted_in_the_middle_of_onboarding(tmp_path: Path, shim_dir: Path) -> None:
    data = tmp_path / "cloud"
    core = LocalIotCore(data)
    core.start()
    try:
        mqtt_port, api_url = core.endpoint.mqtt_port, core.endpoint.api_url
        api_port = int(api_url.rsplit(":", 1)[1].split("/")[0])
        iot = core.client()
        claim = set_up_fleet_provisioning(iot, "RestartTemplate")
        from hub_onboarding.tools.factory import write_claim_hub

        config_path = write_claim_hub(
            tmp_path / "hub",
            endpoint_url=core.endpoint.mqtt_address,
            root_ca_path=core.endpoint.root_ca_path,
            claim_certificate_pem=claim.certificate_pem,
            claim_private_key_pem=claim.private_key_pem,
            template_name=claim.template_name,
            serial="SN-RESTART",
            extra_ro={"mqtt_retry_timeout_seconds": 40},
        )
        before = certificate_ids(iot)
        hub = HubProcess(config_path, shim_dir=shim_dir, freeze=freeze_at_step("CREDENTIALS_STORED"))
        hub.wait_frozen()
        core.stop()
        hub.resume()  # RegisterThing meets a server that is gone
        hub.wait_for_step("RETRY")
        core = LocalIotCore(data, mqtt_port=mqtt_port, api_port=api_port)
        core.start()
        done = hub.finish(40)
        assert done.returncode == 0, done.stderr
        assert "RESUMED_AFTER_CERTIFICATE_ISSUED" in done.steps
        assert done.steps.count("CERTIFICATE_ISSUED") == 1, "the token saved before the restart was used"
        iot = core.client()
        rw = read_config(config_path)["rw"]
        assert rw["iot_provisioning_state"] == "PROVISIONED"
        new = certificate_ids(iot) - before
        assert len(new) == 1
        (cert_id,) = new
        assert iot.describe_certificate(certificateId=cert_id)["certificateDescription"]["status"] == "ACTIVE"
        assert connects(core, rw["iot_permanent_cert_path"], rw["iot_permanent_pk_path"], rw["client_id"])
    finally:
        core.stop()
    FAULTS.append("server restarted mid-onboarding")


# ------------------------------------------------------------------------------ slow hook


@pytest.mark.parametrize(("delay", "ok"), [(3.0, True), (6.5, False)])
def test_slow_hook(
    cloud: LocalIotCore, iot: Any, tmp_path: Path, hook_server: Any, delay: float, ok: bool
) -> None:
    from hub_onboarding.tools.factory import write_claim_hub

    hook = hook_server({"allowProvisioning": True}, delay=delay)
    claim = set_up_fleet_provisioning(iot, f"SlowHook{int(delay * 10)}", hook_url=hook.url)
    config_path = write_claim_hub(
        tmp_path / "hub",
        endpoint_url=cloud.endpoint.mqtt_address,
        root_ca_path=cloud.endpoint.root_ca_path,
        claim_certificate_pem=claim.certificate_pem,
        claim_private_key_pem=claim.private_key_pem,
        template_name=claim.template_name,
        serial=f"SN-HOOK-{int(delay * 10)}",
        extra_ro={"mqtt_retry_timeout_seconds": 30},
    )
    done = run_hub(config_path, verbosity="")
    assert hook.requests, "the hook was called"
    assert done.elapsed < 20
    if ok:
        assert done.returncode == 0, done.stderr
        assert read_config(config_path)["rw"]["iot_provisioning_state"] == "PROVISIONED"
    else:
        assert done.returncode == 12, done.stderr  # IdentityError with the service's words
        assert "did not answer within 5 seconds" in done.stderr
        assert "RegisterThing was rejected by the service" in done.stderr
        assert "Traceback" not in done.stderr
        assert read_config(config_path)["rw"]["iot_provisioning_state"] == "NOT_PROVISIONED"
    FAULTS.append(f"hook {delay:g} s")
