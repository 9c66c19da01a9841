"""HubOnboarding's flows against a fake cloud: order of writes, resume after a crash, retries, secrets.

Everything above the MQTT client is real (HubOnboarding, DeviceProvisioner, CertHandler, config, progress);
tests/_support/fake_cloud.py stands in for IotProvisioning's connections and FleetProvisioning's requests,
through the seams HubOnboarding takes (provisioner_factory, clock). The real MQTT path is covered by
tests/e2e against iot-core-local.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hub_onboarding import config as cfgmod
from hub_onboarding.certs import CertHandler
from hub_onboarding.errors import (
    BusyError,
    ConfigError,
    CredentialError,
    IdentityError,
    MqttConnectionError,
    OnboardingError,
    StorageError,
)
from hub_onboarding.lock import onboarding_lock
from hub_onboarding.manifest import Manifest
from hub_onboarding.onboarding import OnboardingStep, StepEvent, Timeouts
from hub_onboarding.progress import ProgressStore, Step
from tests._support.certificates import make_pair, write_private
from tests._support.fake_cloud import FakeCloud
from tests._support.hubs import Hub, HubFactory, Snapshot, snapshot, write_offline_hub


class Crash(BaseException):
    """Stands for a power cut: not an Exception, so nothing in the product catches it."""


@pytest.fixture
def cloud() -> FakeCloud:
    return FakeCloud(make_pair("Fake AWS CA"))


def rw(hub: Hub) -> dict[str, Any]:
    result: dict[str, Any] = hub.doc()["rw"]
    return result


def test_fleet_provisioning_happy_path(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub(
        ro={"fp_template_parameters": {"Room": "hall"}, "vendor": {"keep": True}},
        rw={"other_process": 1},
        top_level_extra=[1],
    )
    steps: list[StepEvent] = []
    result = cloud.onboarding(hub.config, on_step=steps.append).process_device()

    assert result.changed
    assert result.state == "PROVISIONED"
    doc = hub.doc()
    assert doc["ro"]["vendor"] == {"keep": True}
    assert doc["top_level_extra"] == [1]
    assert doc["rw"]["other_process"] == 1
    assert doc["rw"]["iot_provisioning_state"] == "PROVISIONED"
    assert doc["rw"]["client_id"] == "client-SN-0001"
    assert doc["rw"]["managed_thing_id"] == "mt-123"
    assert isinstance(doc["rw"]["metadata"]["last_updated_epoch_time"], int)
    cert_path, key_path = Path(doc["rw"]["iot_permanent_cert_path"]), Path(doc["rw"]["iot_permanent_pk_path"])
    assert cert_path.parent == hub.dir / "certs"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_path.parent.stat().st_mode) == 0o700
    assert key_path.read_bytes() == cloud.issued_keys[0]
    assert cloud.calls == ["connect", "CreateKeysAndCertificate", "RegisterThing", "verify"]
    assert cloud.connections[0][0] == "SN-0001"  # claim connection: client id is the SN
    assert cloud.connections[1][0] == "client-SN-0001"  # verification uses the new identity
    assert cloud.register_params == [
        {"SerialNumber": "SN-0001", "UniversalProductCode": "012345678905", "Room": "hall"}
    ]
    assert not ProgressStore(hub.dir / "certs").path.exists()
    assert [e.step for e in steps] == [
        OnboardingStep.CONFIG_READ,
        OnboardingStep.CLAIM_CONNECTED,
        OnboardingStep.CERTIFICATE_ISSUED,
        OnboardingStep.CREDENTIALS_STORED,
        OnboardingStep.THING_REGISTERED,
        OnboardingStep.VERIFIED,
        OnboardingStep.RECORDED,
    ]
    assert steps[-1].message == "PROVISIONED: client_id 'client-SN-0001', managed_thing_id 'mt-123'"


def test_csr_key_is_made_on_the_hub(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub(ro={"fp_certificate_method": "CreateCertificateFromCsr"})
    cloud.onboarding(hub.config).process_device()
    assert cloud.calls[1] == "CreateCertificateFromCsr"
    assert cloud.issued_keys == []
    key = serialization.load_pem_private_key(Path(rw(hub)["iot_permanent_pk_path"]).read_bytes(), None)
    cert = x509.load_pem_x509_certificate(Path(rw(hub)["iot_permanent_cert_path"]).read_bytes())
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(serialization.Encoding.DER, spki) == cert.public_key().public_bytes(
        serialization.Encoding.DER, spki
    )


def test_provisioned_hub_never_touches_the_network(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub()
    cloud.onboarding(hub.config).process_device()
    calls = list(cloud.calls)
    before = hub.config.read_bytes()
    # even with the claim credentials gone, a second run is a no-op
    (hub.dir / "claim.key").unlink()
    hub2 = cloud.onboarding(hub.config)
    assert hub2.is_provisioned()
    result = hub2.process_device()
    assert not result.changed
    assert result.state == "PROVISIONED"
    assert cloud.calls == calls
    assert hub.config.read_bytes() == before


def test_resume_after_certificate_issued_uses_the_saved_token(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub()
    cloud.fail["RegisterThing"] = [Crash()]
    with pytest.raises(Crash):
        cloud.onboarding(hub.config).process_device()
    saved = ProgressStore(hub.dir / "certs").load()
    assert saved is not None
    assert saved.step is Step.CERTIFICATE_ISSUED
    assert rw(hub)["iot_provisioning_state"] == "NOT_PROVISIONED"

    cloud.onboarding(hub.config).process_device()
    assert cloud.calls.count("CreateKeysAndCertificate") == 1  # no second certificate
    assert cloud.calls.count("RegisterThing") == 2
    assert rw(hub)["iot_provisioning_state"] == "PROVISIONED"


def test_resume_after_register_does_not_need_the_claim(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub()
    cloud.fail["verify"] = [Crash()]
    with pytest.raises(Crash):
        cloud.onboarding(hub.config).process_device()
    assert ProgressStore(hub.dir / "certs").load().step is Step.THING_REGISTERED  # type: ignore[union-attr]
    (hub.dir / "claim.key").unlink()  # the claim credentials are never used again
    cloud.onboarding(hub.config).process_device()
    assert cloud.calls.count("RegisterThing") == 1
    assert cloud.calls[-1] == "verify"
    assert rw(hub)["client_id"] == "client-SN-0001"


@pytest.mark.parametrize("crash_at", [1, 2, 3, 4])
def test_crash_between_config_writes(
    make_hub: HubFactory, cloud: FakeCloud, monkeypatch: pytest.MonkeyPatch, crash_at: int
) -> None:
    hub = make_hub(rw={"other_process": "x"})
    real = cfgmod.update_rw
    count = {"n": 0}

    def flaky(path: Any, changes: Any, **kw: Any) -> Any:
        count["n"] += 1
        if count["n"] == crash_at:
            raise Crash()
        return real(path, changes, **kw)

    monkeypatch.setattr(cfgmod, "update_rw", flaky)
    with pytest.raises(Crash):
        cloud.onboarding(hub.config).process_device()
    assert rw(hub)["iot_provisioning_state"] == "NOT_PROVISIONED"
    monkeypatch.setattr(cfgmod, "update_rw", real)
    cloud.onboarding(hub.config).process_device()
    doc = rw(hub)
    assert doc["iot_provisioning_state"] == "PROVISIONED"
    assert doc["other_process"] == "x"
    assert cloud.calls.count("CreateKeysAndCertificate") == 1
    assert cloud.calls.count("RegisterThing") == 1
    cert = x509.load_pem_x509_certificate(Path(doc["iot_permanent_cert_path"]).read_bytes())
    key = serialization.load_pem_private_key(Path(doc["iot_permanent_pk_path"]).read_bytes(), None)
    assert cert.public_key() == key.public_key()


def test_expired_saved_token_means_a_new_certificate(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub()
    cloud.fail["RegisterThing"] = [Crash()]
    with pytest.raises(Crash):
        cloud.onboarding(hub.config).process_device()
    cloud.clock.advance(3600)  # the hub was off for an hour: the saved token is too old to use
    cloud.onboarding(hub.config).process_device()
    assert cloud.calls.count("CreateKeysAndCertificate") == 2
    assert rw(hub)["iot_provisioning_state"] == "PROVISIONED"


def test_refused_saved_token_starts_over_once(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub()
    cloud.fail["RegisterThing"] = [Crash()]
    with pytest.raises(Crash):
        cloud.onboarding(hub.config).process_device()
    cloud.tokens.clear()  # e.g. the first RegisterThing did reach the cloud and spent the token
    cloud.onboarding(hub.config).process_device()
    assert cloud.calls.count("CreateKeysAndCertificate") == 2
    assert rw(hub)["iot_provisioning_state"] == "PROVISIONED"


def test_throttling_is_retried(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub()
    cloud.fail["RegisterThing"] = [
        IdentityError.from_rejection("RegisterThing", 429, "ThrottlingException", "Rate exceeded")
    ]
    cloud.fail["connect"] = [MqttConnectionError("endpoint down")]
    cloud.onboarding(hub.config).process_device()
    assert rw(hub)["iot_provisioning_state"] == "PROVISIONED"
    assert cloud.calls.count("CreateKeysAndCertificate") == 1  # the retry resumed with the same token


def test_rejection_is_final_and_writes_no_state(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub()
    cloud.fail["RegisterThing"] = [
        IdentityError.from_rejection("RegisterThing", 403, "AccessDenied", "hook refused SN-0001")
    ]
    with pytest.raises(IdentityError) as info:
        cloud.onboarding(hub.config).process_device()
    assert info.value.error_message == "hook refused SN-0001"
    assert info.value.exit_code == 12
    assert rw(hub)["iot_provisioning_state"] == "NOT_PROVISIONED"
    assert "client_id" not in rw(hub)


def test_retry_deadline(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub(ro={"mqtt_retry_timeout_seconds": 0.01})
    cloud.fail["connect"] = [MqttConnectionError("down") for _ in range(50)]
    with pytest.raises(MqttConnectionError, match="gave up after"):
        cloud.onboarding(hub.config).process_device()


def test_missing_device_configuration_falls_back_to_thing_name(
    make_hub: HubFactory, cloud: FakeCloud, caplog: pytest.LogCaptureFixture
) -> None:
    hub = make_hub()
    cloud.device_configuration = {}
    with caplog.at_level(logging.WARNING, logger="hub_onboarding"):
        cloud.onboarding(hub.config).process_device()
    assert rw(hub)["client_id"] == "thing-SN-0001"
    assert rw(hub)["managed_thing_id"] == "thing-SN-0001"
    assert any("ClientId" in r.getMessage() for r in caplog.records)


def test_jitr(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub("JITR")
    result = cloud.onboarding(hub.config).process_device()
    doc = rw(hub)
    assert result.client_id == "dha-device-0001" == doc["client_id"]
    assert doc["iot_permanent_cert_path"] == str(hub.dir / "dha.crt")
    assert doc["iot_permanent_pk_path"] == str(hub.dir / "dha.key")
    assert "managed_thing_id" not in doc
    assert cloud.calls == ["connect"]


def test_jitr_client_id_override(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub("JITR", ro={"client_id": "my-hub"})
    cloud.onboarding(hub.config).process_device()
    assert rw(hub)["client_id"] == "my-hub"
    assert cloud.connections[0][0] == "my-hub"


@pytest.mark.parametrize("method", ["FLEET_PROVISIONING", "JITR"])
def test_bad_credentials_write_nothing_and_send_nothing(
    make_hub: HubFactory, cloud: FakeCloud, method: str
) -> None:
    hub = make_hub(method)
    (hub.dir / ("claim.key" if method == "FLEET_PROVISIONING" else "dha.key")).chmod(0o644)
    listing = sorted(p.name for p in hub.dir.iterdir())
    before = hub.config.read_bytes()
    with pytest.raises(CredentialError, match=r"ro\.iot_"):
        cloud.onboarding(hub.config).process_device()
    assert sorted(p.name for p in hub.dir.iterdir()) == listing  # not even a lock file
    assert hub.config.read_bytes() == before
    assert cloud.calls == []


def test_secrets_never_logged(
    make_hub: HubFactory,
    cloud: FakeCloud,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hub = make_hub()
    cloud.fail["RegisterThing"] = [IdentityError.from_rejection("RegisterThing", 429, "Throttling", "slow")]
    steps: list[StepEvent] = []
    with caplog.at_level(logging.DEBUG):
        cloud.onboarding(hub.config, on_step=steps.append).process_device()
    text = caplog.text + "\n".join(json.dumps(e.to_dict()) for e in steps) + "".join(capsys.readouterr())
    secrets = [b"OWNERSHIP-TOKEN-0-SECRET", hub.claim.key_pem, cloud.issued_keys[0]]
    for secret in secrets:
        body = secret.decode().splitlines()
        needle = body[1] if len(body) > 1 else body[0]  # a line of the PEM body, or the token
        assert needle not in text


def test_lock_held_by_another_run(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub()
    with onboarding_lock(hub.config, timeout=1), pytest.raises(BusyError):
        cloud.onboarding(hub.config, timeouts=Timeouts(lock=0.2)).process_device()
    assert cloud.calls == []


def test_waiter_reports_the_other_runs_result(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub()
    holding = threading.Event()
    release = threading.Event()

    def other_run() -> None:
        with onboarding_lock(hub.config, timeout=1):
            holding.set()
            release.wait(5)
            cfgmod.update_rw(hub.config, {"iot_provisioning_state": "PROVISIONED", "client_id": "other"})

    def on_step(event: StepEvent) -> None:
        if event.step is OnboardingStep.CONFIG_READ:  # the waiter's last step before it takes the lock
            release.set()

    t = threading.Thread(target=other_run)
    t.start()
    holding.wait(5)
    result = cloud.onboarding(hub.config, timeouts=Timeouts(lock=5), on_step=on_step).process_device()
    t.join()
    assert not result.changed
    assert result.client_id == "other"
    assert cloud.calls == []


def test_reset_deletes_only_what_onboarding_created(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub(ro={"x": 1})
    cloud.onboarding(hub.config).process_device()
    ro_before = hub.doc()["ro"]
    deleted = cloud.onboarding(hub.config).reset()
    assert {p.name for p in deleted} == {"certificate.pem.crt", "private.pem.key", "onboarding-files.json"}
    doc = hub.doc()
    assert doc["ro"] == ro_before
    assert set(doc["rw"]) == {"iot_provisioning_state", "metadata"}
    assert (hub.dir / "claim.key").exists()


def test_reset_after_jitr_keeps_the_dha_pair(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub("JITR", ro={"iot_permanent_cert_dir": "."})  # even if the DHA pair sits in the cert dir
    cloud.onboarding(hub.config).process_device()
    cloud.onboarding(hub.config).reset()
    assert (hub.dir / "dha.key").exists()
    assert (hub.dir / "dha.crt").exists()
    assert rw(hub)["iot_provisioning_state"] == "NOT_PROVISIONED"


def test_status(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub()
    cloud.fail["RegisterThing"] = [Crash()]
    with contextlib.suppress(Crash):
        cloud.onboarding(hub.config).process_device()
    info = cloud.onboarding(hub.config).status()
    assert info["state"] == "NOT_PROVISIONED"
    assert info["progress"] == "CERTIFICATE_ISSUED"
    assert "SECRET" not in json.dumps(info)


def test_every_error_is_an_onboarding_error(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub(ro={"SN": ""})
    with pytest.raises(OnboardingError):
        cloud.onboarding(hub.config).process_device()


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (401, "InvalidCertificateOwnershipToken", "The ownership was refused"),
        (403, "Forbidden", "Certificate ownership token expired"),
    ],
)
def test_refused_token_in_other_words_starts_over_once(
    make_hub: HubFactory, cloud: FakeCloud, status: int, code: str, message: str
) -> None:
    # Real AWS need not answer exactly as iot-core-local does (400 + "token"): any 4xx refusal of the token
    # means a new certificate, instead of re-sending the spent token on every run.
    hub = make_hub()
    cloud.fail["RegisterThing"] = [Crash()]
    with pytest.raises(Crash):
        cloud.onboarding(hub.config).process_device()
    cloud.fail["RegisterThing"] = [IdentityError.from_rejection("RegisterThing", status, code, message)]
    cloud.onboarding(hub.config).process_device()
    assert cloud.calls.count("CreateKeysAndCertificate") == 2
    assert rw(hub)["iot_provisioning_state"] == "PROVISIONED"


def test_shared_cert_dir_is_refused_before_any_traffic(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub(ro={"iot_permanent_cert_dir": "."})  # the config's own folder, read by other processes
    hub.dir.chmod(0o755)
    with pytest.raises(CredentialError, match="iot_permanent_cert_dir") as info:
        cloud.onboarding(hub.config).process_device()
    assert str(hub.dir) in info.value.message
    assert stat.S_IMODE(hub.dir.stat().st_mode) == 0o755  # not narrowed
    assert cloud.calls == []  # no certificate minted for nothing
    assert rw(hub)["iot_provisioning_state"] == "NOT_PROVISIONED"


RELATIVE_RO_PATHS = {
    "iot_claim_cert_path": "claim.crt",
    "iot_claim_pk_path": "./claim.key",
    "iot_dha_cert_path": "dha.crt",
    "iot_dha_pk_path": "dha.key",
    "iot_root_ca_path": "ca.pem",
}


@pytest.mark.parametrize("method", ["FLEET_PROVISIONING", "JITR"])
def test_relative_ro_paths_are_relative_to_the_config(
    make_hub: HubFactory, cloud: FakeCloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    hub = make_hub(method)
    doc = hub.doc()
    doc["ro"].update(RELATIVE_RO_PATHS)
    hub.write(doc)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # another hub process, another working directory
    cfg = cfgmod.parse_config(hub.config)
    assert cfg.connection.root_ca_path == str(hub.dir / "ca.pem")
    if cfg.fleet is not None:
        assert Path(cfg.fleet.claim_pk_path).resolve() == hub.dir / "claim.key"
    else:
        assert cfg.jitr is not None
        assert Path(cfg.jitr.dha_pk_path).resolve() == hub.dir / "dha.key"
    cloud.onboarding(hub.config).process_device()
    doc_rw = rw(hub)
    for key in ("iot_permanent_cert_path", "iot_permanent_pk_path"):
        assert Path(doc_rw[key]).is_absolute(), doc_rw[key]
        assert Path(doc_rw[key]).exists(), doc_rw[key]
    if method == "JITR":
        assert doc_rw["iot_permanent_cert_path"] == str(hub.dir / "dha.crt")
    assert list(elsewhere.iterdir()) == []


def test_reset_protects_relative_ro_paths(
    make_hub: HubFactory, cloud: FakeCloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A DHA pair kept where onboarding would put its own files, named relative to the config.
    hub = make_hub(
        "JITR",
        ro={"iot_dha_cert_path": "certs/certificate.pem.crt", "iot_dha_pk_path": "certs/private.pem.key"},
    )
    certs_dir = hub.dir / "certs"
    certs_dir.mkdir(mode=0o700)
    (certs_dir / "certificate.pem.crt").write_bytes(hub.dha.cert_pem)
    write_private(certs_dir / "private.pem.key", hub.dha.key_pem)
    monkeypatch.chdir(tmp_path)
    cloud.onboarding(hub.config).process_device()
    cloud.onboarding(hub.config).reset()
    assert (certs_dir / "private.pem.key").exists()
    assert (certs_dir / "certificate.pem.crt").exists()


def test_resume_through_another_name_for_the_same_folder(
    make_hub: HubFactory, cloud: FakeCloud, tmp_path: Path
) -> None:
    hub = make_hub()
    link = tmp_path / "hub-link"
    link.symlink_to(hub.dir)
    cloud.fail["RegisterThing"] = [Crash()]
    with pytest.raises(Crash):
        cloud.onboarding(link / "iotmi_config.json").process_device()
    # After the power cut the boot script names the real folder (or one with `..`): the same files.
    cloud.onboarding(hub.dir / ".." / "hub" / "iotmi_config.json").process_device()
    assert cloud.calls.count("CreateKeysAndCertificate") == 1  # resumed, no second certificate
    assert rw(hub)["iot_provisioning_state"] == "PROVISIONED"


@pytest.mark.parametrize("name", ["dotdot", "symlink"])
def test_reset_never_deletes_an_ro_file_named_another_way(
    make_hub: HubFactory, cloud: FakeCloud, name: str
) -> None:
    hub = make_hub("JITR")
    certs_dir = hub.dir / "certs"
    certs_dir.mkdir(mode=0o700)
    (certs_dir / "certificate.pem.crt").write_bytes(hub.dha.cert_pem)
    write_private(certs_dir / "private.pem.key", hub.dha.key_pem)
    if name == "symlink":
        (hub.dir / "factory").symlink_to(certs_dir)
        folder = str(hub.dir / "factory")
    else:
        folder = str(certs_dir / ".." / "certs")
    doc = hub.doc()
    doc["ro"].update(
        iot_dha_cert_path=f"{folder}/certificate.pem.crt", iot_dha_pk_path=f"{folder}/private.pem.key"
    )
    hub.write(doc)
    cloud.onboarding(hub.config).process_device()
    cloud.onboarding(hub.config).reset()
    assert (certs_dir / "private.pem.key").read_bytes() == hub.dha.key_pem
    assert (certs_dir / "certificate.pem.crt").exists()
    assert rw(hub)["iot_provisioning_state"] == "NOT_PROVISIONED"


def test_reset_deletes_a_symlink_not_what_it_points_at(
    make_hub: HubFactory, cloud: FakeCloud, tmp_path: Path
) -> None:
    hub = make_hub()
    cloud.onboarding(hub.config).process_device()
    outside = tmp_path / "outside.txt"
    outside.write_text("not onboarding's")
    (hub.dir / "certs" / "onboarding-progress.json").symlink_to(outside)
    cloud.onboarding(hub.config).reset()
    assert outside.read_text() == "not onboarding's"
    assert not (hub.dir / "certs" / "onboarding-progress.json").is_symlink()


def test_two_names_for_one_config_share_one_lock(
    make_hub: HubFactory, cloud: FakeCloud, tmp_path: Path
) -> None:
    hub = make_hub()
    link = tmp_path / "link.json"
    link.symlink_to(hub.config)
    with onboarding_lock(link, timeout=1), pytest.raises(BusyError):
        cloud.onboarding(hub.config, timeouts=Timeouts(lock=0.2)).process_device()
    assert cloud.calls == []


def test_mismatched_pair_is_caught_without_the_verification_connect(
    make_hub: HubFactory, cloud: FakeCloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = make_hub(ro={"fp_verify_connection": False})
    real = cfgmod.update_rw

    def crash_on_first_write(path: Any, changes: Any, **kw: Any) -> Any:
        raise Crash()

    monkeypatch.setattr(cfgmod, "update_rw", crash_on_first_write)
    with pytest.raises(Crash):
        cloud.onboarding(hub.config).process_device()
    monkeypatch.setattr(cfgmod, "update_rw", real)
    key_path = hub.dir / "certs" / "private.pem.key"
    other = make_pair("other").key_pem
    # A key this hub's onboarding wrote (so the folder check passes), but not the recorded pair's.
    Manifest(hub.dir / "certs", hub.config).record({"private.pem.key": other})
    write_private(key_path, other)
    with pytest.raises(CredentialError):
        cloud.onboarding(hub.config).process_device()
    assert rw(hub)["iot_provisioning_state"] == "NOT_PROVISIONED"
    assert "verify" not in cloud.calls


def test_unresumable_record_goes_before_the_files_are_overwritten(
    make_hub: HubFactory, cloud: FakeCloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = make_hub()
    cloud.fail["RegisterThing"] = [Crash()]
    with pytest.raises(Crash):
        cloud.onboarding(hub.config).process_device()  # record 1: endpoint A, token 1, certificate 1
    store = ProgressStore(hub.dir / "certs")
    assert store.load() is not None

    # The endpoint changes: record 1 cannot be resumed; the power goes between the new key and new cert.
    doc = hub.doc()
    endpoint_a = doc["ro"]["endpoint_url"]
    doc["ro"]["endpoint_url"] = "other.example.com"
    hub.write(doc)
    real_write = CertHandler.write_file

    def cut_before_the_certificate(self: CertHandler, path: Path, data: bytes, mode: int) -> None:
        if path.name == "certificate.pem.crt":
            raise Crash()
        real_write(self, path, data, mode)

    monkeypatch.setattr(CertHandler, "write_file", cut_before_the_certificate)
    with pytest.raises(Crash):
        cloud.onboarding(hub.config).process_device()
    monkeypatch.setattr(CertHandler, "write_file", real_write)
    assert store.load() is None  # record 1 no longer names a key that is not its own

    # Back to endpoint A: nothing stale to resume, so a fresh certificate, and a matching pair.
    doc["ro"]["endpoint_url"] = endpoint_a
    hub.write(doc)
    cloud.onboarding(hub.config).process_device()
    assert rw(hub)["iot_provisioning_state"] == "PROVISIONED"
    cert = x509.load_pem_x509_certificate(Path(rw(hub)["iot_permanent_cert_path"]).read_bytes())
    key = serialization.load_pem_private_key(Path(rw(hub)["iot_permanent_pk_path"]).read_bytes(), None)
    assert cert.public_key() == key.public_key()


def test_jitr_retries_refusals_with_the_provisioner_policy(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub("JITR")
    cloud.fail["connect"] = [MqttConnectionError("closed: not active yet") for _ in range(3)]
    steps: list[StepEvent] = []
    cloud.onboarding(hub.config, on_step=steps.append).process_device()
    assert cloud.calls == ["connect"] * 4
    assert [e.step for e in steps].count(OnboardingStep.RETRY) == 3
    assert cloud.clock.sleeps == [0.5, 1.0, 2.0]  # the provisioner's backoff, on the test's clock
    assert any("attempt 4" in e.message for e in steps if e.step is OnboardingStep.JITR_CONNECTED)
    assert rw(hub)["iot_provisioning_state"] == "PROVISIONED"


def test_jitr_gives_up_at_once_on_what_cannot_succeed(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub("JITR")
    final = MqttConnectionError("could not set up the MQTT client: bad CA file")
    final.retriable = False
    cloud.fail["connect"] = [final, *(MqttConnectionError("x") for _ in range(5))]
    with pytest.raises(MqttConnectionError, match="bad CA file"):
        cloud.onboarding(hub.config).process_device()
    assert cloud.calls == ["connect"]


def test_jitr_deadline_says_what_to_check(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub("JITR", ro={"mqtt_retry_timeout_seconds": 0.01})
    cloud.fail["connect"] = [MqttConnectionError("closed") for _ in range(50)]
    with pytest.raises(MqttConnectionError, match=r"JITR: no connection within 0\.01 s after 1 att") as info:
        cloud.onboarding(hub.config).process_device()
    assert "auto-registration" in info.value.message
    assert "last error: closed" in info.value.message


# ------------------------------------------------------------------------------ preflight


@pytest.mark.parametrize(
    ("key", "value", "written"),
    [
        ("iot_claim_cert_path", "certs/certificate.pem.crt", "the new certificate"),
        ("iot_claim_pk_path", "certs/private.pem.key", "the new private key"),
        ("iot_claim_cert_path", "certs/../certs/onboarding-progress.json", "the progress record"),
        ("iot_dha_pk_path", "certs/private.pem.key", "the new private key"),  # fleet would overwrite it
        ("iot_claim_cert_path", "iotmi_config.json", "the config itself"),
        ("iot_root_ca_path", "iotmi_config.json.lock", "its lock file"),
    ],
)
def test_read_paths_that_name_files_onboarding_writes_are_refused(
    make_hub: HubFactory, cloud: FakeCloud, key: str, value: str, written: str
) -> None:
    # The mistake: claim paths naming the permanent files were accepted; onboarding then overwrote the
    # factory claim and the hub could never onboard again.
    hub = make_hub()
    certs = hub.dir / "certs"
    certs.mkdir(mode=0o700)
    target = hub.dir / value
    if not target.exists():  # the factory put its file there (the same bytes as the configured one)
        source = (
            hub.claim.key_pem if "pk" in key else hub.ca.cert_pem if "root" in key else hub.claim.cert_pem
        )
        write_private(target, source)
    doc = hub.doc()
    doc["ro"][key] = value
    if key == "iot_claim_pk_path":
        doc["ro"]["iot_claim_cert_path"] = str(hub.dir / "claim.crt")
    hub.write(doc)
    before = hub.config.read_bytes()
    listing = sorted(str(p) for p in hub.dir.rglob("*"))
    with pytest.raises(ConfigError) as info:
        cloud.onboarding(hub.config).process_device()
    other = "--config" if value.startswith("iotmi_config.json") else "ro.iot_permanent_cert_dir"
    assert info.value.message.startswith(f"ro.{key} and {other}"), info.value.message
    assert written in info.value.message
    assert info.value.key == f"ro.{key}"
    assert info.value.exit_code == 3
    assert cloud.calls == []
    assert hub.config.read_bytes() == before
    assert sorted(str(p) for p in hub.dir.rglob("*")) == listing


def test_a_claim_path_through_a_symlinked_folder_is_still_refused(
    make_hub: HubFactory, cloud: FakeCloud
) -> None:
    hub = make_hub(ro={"iot_permanent_cert_dir": "creds"})
    creds = hub.dir / "creds"
    creds.mkdir(mode=0o700)
    write_private(creds / "private.pem.key", hub.claim.key_pem)
    (hub.dir / "factory").symlink_to(creds)
    doc = hub.doc()
    doc["ro"]["iot_claim_pk_path"] = "factory/private.pem.key"
    hub.write(doc)
    with pytest.raises(
        ConfigError, match=r"^ro.iot_claim_pk_path and ro.iot_permanent_cert_dir name the same"
    ):
        cloud.onboarding(hub.config).process_device()
    assert cloud.calls == []


def _fail_creating_files_in(folder: Path, err: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a read-only mount (EROFS) or a folder we may not write (EACCES) answers, also as root."""
    real_open = os.open
    real_unlink = Path.unlink

    def fake_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_CREAT and Path(os.fsdecode(path)).parent == folder:
            raise OSError(err, os.strerror(err), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    def fake_unlink(self: Path, missing_ok: bool = False) -> None:
        if self.parent == folder:  # EROFS even when the file does not exist
            raise OSError(err, os.strerror(err), str(self))
        real_unlink(self, missing_ok)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(Path, "unlink", fake_unlink)


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES])
def test_an_unwritable_credentials_folder_is_found_before_any_certificate_is_minted(
    make_hub: HubFactory, cloud: FakeCloud, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    # The mistake: a read-only credentials folder gave exit 5 blaming a progress file that does not
    # exist, after CreateKeysAndCertificate: one orphan certificate in the cloud per attempt.
    hub = make_hub()
    certs = hub.dir / "certs"
    certs.mkdir(mode=0o700)
    _fail_creating_files_in(certs, err, monkeypatch)
    before = hub.config.read_bytes()
    with pytest.raises(StorageError) as info:
        cloud.onboarding(hub.config).process_device()
    monkeypatch.undo()
    assert info.value.exit_code == 5
    assert info.value.message.startswith(
        f"the credentials folder {certs} (set by ro.iot_permanent_cert_dir) cannot be written: "
        f"{os.strerror(err)}; onboarding stores its results there, so it stopped before contacting the "
        "cloud (no certificate was created)"
    )
    assert "progress" not in info.value.message
    assert info.value.key == "ro.iot_permanent_cert_dir"
    assert cloud.calls == []
    assert list(certs.iterdir()) == []
    assert hub.config.read_bytes() == before
    assert not (hub.dir / "iotmi_config.json.lock").exists()


@pytest.mark.parametrize("method", ["FLEET_PROVISIONING", "JITR"])
def test_an_unwritable_config_folder_is_found_before_any_traffic(
    make_hub: HubFactory, cloud: FakeCloud, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    hub = make_hub(method, ro={"iot_permanent_cert_dir": "../creds"})
    (hub.dir / "iotmi_config.json.lock").write_text("")  # left by an earlier run: the lock opens fine
    _fail_creating_files_in(hub.dir, errno.EROFS, monkeypatch)
    with pytest.raises(StorageError, match=rf"^the config's folder {hub.dir} cannot be written"):
        cloud.onboarding(hub.config).process_device()
    monkeypatch.undo()
    assert cloud.calls == []


def test_a_jitr_fallback_explains_the_errors_that_follow(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub("FLEET_PROVISIONNING")
    (hub.dir / "dha.key").unlink()
    with pytest.raises(CredentialError) as info:
        cloud.onboarding(hub.config).process_device()
    assert info.value.message.startswith(f"DHA private key: {hub.dir / 'dha.key'} does not exist")
    assert "(from ro.iot_dha_pk_path)" in info.value.message
    assert (
        "(JITR was assumed because ro.iot_provisioning_method is 'FLEET_PROVISIONNING', not a valid "
        "method; did you mean 'FLEET_PROVISIONING'?)" in info.value.message
    )


def test_a_key_open_to_others_names_its_own_setting(make_hub: HubFactory, cloud: FakeCloud) -> None:
    # The mistake: the 0644-key message named the certificate's setting, not iot_claim_pk_path.
    hub = make_hub()
    (hub.dir / "claim.key").chmod(0o644)
    with pytest.raises(CredentialError) as info:
        cloud.onboarding(hub.config).process_device()
    assert "has mode 0644" in info.value.message
    assert info.value.message.endswith("(from ro.iot_claim_pk_path)")
    assert "iot_claim_cert_path" not in info.value.message
    assert info.value.key == "ro.iot_claim_pk_path"
    assert info.value.to_dict()["key"] == "ro.iot_claim_pk_path"


def test_a_mismatched_pair_names_both_settings(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub()
    write_private(hub.dir / "claim.key", make_pair("other").key_pem)
    with pytest.raises(CredentialError, match=r"\(from ro.iot_claim_cert_path and ro.iot_claim_pk_path\)$"):
        cloud.onboarding(hub.config).process_device()


def test_waiting_on_the_lock_is_reported_at_once(make_hub: HubFactory, cloud: FakeCloud) -> None:
    hub = make_hub()
    steps: list[StepEvent] = []
    with onboarding_lock(hub.config, timeout=1), pytest.raises(BusyError):
        cloud.onboarding(hub.config, timeouts=Timeouts(lock=0), on_step=steps.append).process_device()
    waiting = [e for e in steps if e.step is OnboardingStep.WAITING_FOR_LOCK]
    assert len(waiting) == 1
    assert f"(pid {os.getpid()})" in waiting[0].message
    assert "waiting up to 0 s" in waiting[0].message
    assert not waiting[0].is_progress


# ------------------------------------------------------------------------------ reset and status


def test_reset_never_deletes_the_config_even_when_rw_names_it(make_hub: HubFactory, cloud: FakeCloud) -> None:
    # The mistake: reset deleted whatever rw named inside the credentials folder, the config included.
    hub = make_hub(ro={"iot_permanent_cert_dir": "."})
    hub.dir.chmod(0o700)
    cloud.onboarding(hub.config).process_device()
    other = hub.dir / "other-process.json"
    other.write_text("{}")
    doc = hub.doc()
    doc["rw"]["iot_permanent_cert_path"] = str(hub.config)
    doc["rw"]["iot_permanent_pk_path"] = str(other)
    hub.write(doc)
    deleted = cloud.onboarding(hub.config).reset()
    assert hub.config.exists()
    assert other.read_text() == "{}"
    assert {p.name for p in deleted} == {"certificate.pem.crt", "private.pem.key", "onboarding-files.json"}
    assert rw(hub)["iot_provisioning_state"] == "NOT_PROVISIONED"


def test_reset_keeps_a_file_another_process_put_in_place_of_onboardings(
    make_hub: HubFactory, cloud: FakeCloud
) -> None:
    hub = make_hub()
    cloud.onboarding(hub.config).process_device()
    certs = hub.dir / "certs"
    theirs = make_pair("another process")
    (certs / "certificate.pem.crt").unlink()
    (certs / "certificate.pem.crt").write_bytes(theirs.cert_pem)
    deleted = cloud.onboarding(hub.config).reset()
    assert {p.name for p in deleted} == {"private.pem.key", "onboarding-files.json"}
    assert (certs / "certificate.pem.crt").read_bytes() == theirs.cert_pem


def test_reset_knows_the_files_of_every_attempt(make_hub: HubFactory, cloud: FakeCloud) -> None:
    # A power cut after the record of the files and before the files: the next attempt's files are
    # recorded too, and reset deletes whichever is on disk.
    hub = make_hub()
    cloud.fail["RegisterThing"] = [Crash()]
    with pytest.raises(Crash):
        cloud.onboarding(hub.config).process_device()
    cloud.clock.advance(3600)  # the saved token is too old to use: a second certificate, other bytes
    cloud.onboarding(hub.config).process_device()
    assert cloud.calls.count("CreateKeysAndCertificate") == 2
    recorded = json.loads((hub.dir / "certs" / "onboarding-files.json").read_text())["files"]
    assert len(recorded["private.pem.key"]) == 2
    deleted = cloud.onboarding(hub.config).reset()
    assert {p.name for p in deleted} == {"certificate.pem.crt", "private.pem.key", "onboarding-files.json"}
    assert list((hub.dir / "certs").iterdir()) == []


def test_status_shows_the_method_that_will_be_used(make_hub: HubFactory, cloud: FakeCloud) -> None:
    # The mistake: status showed the typo as the method.
    hub = make_hub("FLEET_PROVISIONNING")
    info = cloud.onboarding(hub.config).status()
    assert info["method"] == "JITR"
    assert info["configured_method"] == "FLEET_PROVISIONNING"
    assert "did you mean 'FLEET_PROVISIONING'?" in info["method_note"]
    valid = make_hub("FLEET_PROVISIONING")
    info = cloud.onboarding(valid.config).status()
    assert info["method"] == "FLEET_PROVISIONING"
    assert "configured_method" not in info


def test_a_folder_where_the_progress_record_goes_is_found_before_any_traffic(
    make_hub: HubFactory, cloud: FakeCloud
) -> None:
    hub = make_hub()
    (hub.dir / "certs" / "onboarding-progress.json").mkdir(parents=True)
    (hub.dir / "certs").chmod(0o700)
    with pytest.raises(StorageError, match=r"onboarding-progress.json \(the progress record\) is a folder"):
        cloud.onboarding(hub.config).process_device()
    assert cloud.calls == []


# ------------------------------------------------------------------------- another hub's credentials


def _hub_and_a_second_config_on_its_folder(
    make_hub: HubFactory, cloud: FakeCloud, tmp_path: Path
) -> tuple[Hub, Path, Snapshot, Hub]:
    """Hub A provisioned; hub B's config aimed at A's credentials folder: (A, the folder, its contents, B)."""
    a = make_hub()
    cloud.onboarding(a.config).process_device()
    certs = a.dir / "certs"
    b = write_offline_hub(tmp_path / "hubB", ro={"SN": "SN-0002", "iot_permanent_cert_dir": str(certs)})
    return a, certs, snapshot(certs), b


def test_another_configs_credentials_folder_is_refused_before_any_traffic(
    make_hub: HubFactory, cloud: FakeCloud, tmp_path: Path
) -> None:
    # The mistake: a second config aimed at a provisioned hub's folder overwrote its certificate and key.
    a, certs, before, b = _hub_and_a_second_config_on_its_folder(make_hub, cloud, tmp_path)
    calls = len(cloud.calls)
    with pytest.raises(ConfigError) as info:
        cloud.onboarding(b.config).process_device()
    assert info.value.exit_code == 3
    assert info.value.key == "ro.iot_permanent_cert_dir"
    assert info.value.message == (
        f"ro.iot_permanent_cert_dir {certs} holds another hub's credentials ({certs}/onboarding-files.json "
        f"records them for the config {a.config}): onboarding would overwrite them; set "
        "ro.iot_permanent_cert_dir to a folder of its own (nothing was written, no certificate was created)"
    )
    assert len(cloud.calls) == calls, "no traffic"
    assert snapshot(certs) == before
    assert rw(b)["iot_provisioning_state"] == "NOT_PROVISIONED"


@pytest.mark.parametrize("how", ["moved", "copied"])
def test_a_moved_or_copied_hub_folder_is_its_new_configs_own(
    make_hub: HubFactory, cloud: FakeCloud, tmp_path: Path, how: str
) -> None:
    """A hub folder moved (restored from a backup, mounted elsewhere) or copied keeps its record naming the
    old config: that config is gone, or uses its own folder, so the new one may reset and onboard again."""
    a = make_hub()
    cloud.onboarding(a.config).process_device()
    original = snapshot(a.dir)
    there = tmp_path / "there"
    if how == "moved":
        a.dir.rename(there)
    else:
        shutil.copytree(a.dir, there, symlinks=True)
    config = there / "iotmi_config.json"
    doc = json.loads(config.read_text())
    for key, value in doc["ro"].items():  # the factory's files, named from the config's own folder
        if isinstance(value, str) and value.startswith(str(a.dir)):
            doc["ro"][key] = os.path.relpath(value, a.dir)
    config.write_text(json.dumps(doc))
    deleted = cloud.onboarding(config).reset()
    assert {Path(p).name for p in deleted} >= {"certificate.pem.crt", "private.pem.key"}
    assert cloud.onboarding(config).process_device().thing_name
    if how == "copied":
        assert snapshot(a.dir) == original, "the original hub is untouched"


def test_reset_never_deletes_another_configs_files(
    make_hub: HubFactory, cloud: FakeCloud, tmp_path: Path
) -> None:
    a, certs, before, b = _hub_and_a_second_config_on_its_folder(make_hub, cloud, tmp_path)
    assert cloud.onboarding(b.config).reset() == []
    assert snapshot(certs) == before
    assert cloud.onboarding(a.config).reset()  # its own reset still deletes them
    assert list(certs.iterdir()) == []


@pytest.mark.parametrize("name", ["certificate.pem.crt", "private.pem.key"])
def test_a_credential_file_no_record_lists_is_never_overwritten(
    make_hub: HubFactory, cloud: FakeCloud, name: str
) -> None:
    # e.g. a hub onboarded by other software, whose folder this config names: its pair is not ours.
    hub = make_hub()
    certs = hub.dir / "certs"
    certs.mkdir(mode=0o700)
    theirs = make_pair("another hub")
    write_private(certs / name, theirs.key_pem if name.endswith(".key") else theirs.cert_pem)
    with pytest.raises(ConfigError) as info:
        cloud.onboarding(hub.config).process_device()
    assert info.value.key == "ro.iot_permanent_cert_dir"
    what = "private key" if name.endswith(".key") else "certificate"
    assert info.value.message.startswith(
        f"{certs / name} exists and this config's onboarding did not write it (it is not in "
        f"{certs}/onboarding-files.json): it may be another hub's {what}, which onboarding does not "
        "overwrite; set ro.iot_permanent_cert_dir to a folder of its own, or move the file away if nothing "
        "uses it"
    )
    assert cloud.calls == []
    assert sorted(p.name for p in certs.iterdir()) == [name]


def test_a_record_without_an_owner_is_this_configs_own(make_hub: HubFactory, cloud: FakeCloud) -> None:
    # Records written before owners were recorded: a hub cut short then resumes as before.
    hub = make_hub()
    cloud.fail["RegisterThing"] = [Crash()]
    with pytest.raises(Crash):
        cloud.onboarding(hub.config).process_device()
    record = hub.dir / "certs" / "onboarding-files.json"
    doc = json.loads(record.read_text())
    assert doc.pop("config") == str(hub.config)
    record.write_text(json.dumps(doc))
    assert cloud.onboarding(hub.config).process_device().state == "PROVISIONED"
