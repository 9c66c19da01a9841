"""Onboarding with the hub's keys in a PKCS#11 token (a fresh SoftHSM2 token per test) against iot-core-local.

The claim (or DHA) key is imported into the token by the factory; the permanent key is generated in the
token (CSR, the CSR signed there) or the service's key imported into it (CreateKeysAndCertificate). Every
TLS connection the hub makes signs inside the token through awscrt's PKCS#11 support.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hub_onboarding.cli import main
from hub_onboarding.config import TokenKeyType
from hub_onboarding.pkcs11 import Pkcs11CredentialStore
from hub_onboarding.tools import fleet_sim
from hub_onboarding.tools.softhsm import CONF_ENV, SoftHsmToken
from iot_core_local.recipes.claims import ClaimSetup
from iot_core_local.server import LocalIotCore
from tests._support.certificates import certificate_ids, make_rsa_pair, pem_certificate_id
from tests._support.hubs import CloudHubFactory, cloud_claim_hub, read_config, snapshot, write_jitr_cloud_hub
from tests._support.processes import HubProcess, freeze_at_step, run_hub
from tests._support.recovery import assert_key_in_token, connect_through_token, probe_token_key
from tests._support.tokens import MODULE_ENV, ROOM_ENV, build_small_token_module

pytestmark = pytest.mark.e2e


def _private_key_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]


@pytest.mark.parametrize(
    ("method", "key_type", "public_type", "cert_in_token"),
    [
        ("CreateCertificateFromCsr", TokenKeyType.EC_P256, ec.EllipticCurvePublicKey, False),
        ("CreateCertificateFromCsr", TokenKeyType.RSA_2048, rsa.RSAPublicKey, True),
        ("CreateKeysAndCertificate", TokenKeyType.EC_P256, rsa.RSAPublicKey, False),
    ],
)
def test_fleet_provisioning_with_keys_in_the_token(
    cloud: LocalIotCore,
    iot: Any,
    make_cloud_hub: CloudHubFactory,
    softhsm: SoftHsmToken,
    method: str,
    key_type: TokenKeyType,
    public_type: type,
    cert_in_token: bool,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config_path = make_cloud_hub(
        certificate_method=method, token=softhsm.config(key_type), cert_in_token=cert_in_token
    )
    assert _private_key_files(config_path.parent) == [], "the factory put the claim key in the token"
    assert main(["provision", "--config", str(config_path), "--json", "-vv"]) == 0
    printed = capsys.readouterr()
    result = json.loads(printed.out)
    doc = read_config(config_path)
    rw, serial = doc["rw"], doc["ro"]["SN"]
    assert rw["iot_provisioning_state"] == "PROVISIONED"
    label = f"hub-onboarding-{serial}"
    assert rw["iot_permanent_pk_path"] == f"pkcs11:token=hub;object={label};type=private"
    assert result["private_key_path"] == rw["iot_permanent_pk_path"]
    # The key exists only inside the token, sensitive and non-extractable; no file holds a private key.
    store = Pkcs11CredentialStore(softhsm.config(key_type))
    assert store.describe_key(label) == {
        "count": 1,
        "sensitive": [True],
        "extractable": [False],
        "kind": ["RSA" if public_type is rsa.RSAPublicKey else "EC"],
    }
    assert _private_key_files(config_path.parent) == []
    pin = softhsm.pin_path.read_text().strip()
    assert pin not in printed.out + printed.err + config_path.read_text()
    cert_pem = Path(rw["iot_permanent_cert_path"]).read_bytes()
    assert isinstance(x509.load_pem_x509_certificate(cert_pem).public_key(), public_type)
    cert_id = pem_certificate_id(cert_pem)
    assert iot.describe_certificate(certificateId=cert_id)["certificateDescription"]["status"] == "ACTIVE"
    connect_through_token(cloud, softhsm, rw)


def test_jitr_with_the_dha_key_in_the_token(
    cloud: LocalIotCore, iot: Any, tmp_path: Path, softhsm: SoftHsmToken
) -> None:
    jitr = write_jitr_cloud_hub(
        cloud, iot, tmp_path / "hub", "JITR-TOKEN", token=softhsm.config(), cert_in_token=True
    )
    activator = jitr.activator
    activator.start()
    try:
        config_path = jitr.config
        assert main(["provision", "--config", str(config_path)]) == 0
    finally:
        activator.stop()
    doc = read_config(config_path)
    assert doc["ro"]["iot_dha_pk_path"] == "SECURE_STORAGE"
    rw = doc["rw"]
    assert rw["iot_provisioning_state"] == "PROVISIONED"
    assert rw["client_id"] == "hub-JITR-TOKEN"
    assert activator.activated == [pem_certificate_id(jitr.dha_certificate_pem.encode())]
    assert _private_key_files(config_path.parent) == []


def test_reset_deletes_onboardings_token_objects_only(
    iot: Any, make_cloud_hub: CloudHubFactory, softhsm: SoftHsmToken, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = make_cloud_hub(token=softhsm.config())
    assert main(["provision", "--config", str(config_path)]) == 0
    old = pem_certificate_id(Path(read_config(config_path)["rw"]["iot_permanent_cert_path"]).read_bytes())
    capsys.readouterr()
    serial = read_config(config_path)["ro"]["SN"]
    store = Pkcs11CredentialStore(softhsm.config())
    assert store.describe_key(f"hub-onboarding-{serial}")["count"] == 1
    assert main(["reset", "--config", str(config_path), "--yes", "--json"]) == 0
    deleted = json.loads(capsys.readouterr().out)["deleted"]
    assert f"pkcs11:token=hub;object=hub-onboarding-{serial};type=private" in deleted
    assert store.describe_key(f"hub-onboarding-{serial}")["count"] == 0, "onboarding's key is gone"
    assert store.describe_key("claim-key")["count"] == 1, "the factory's claim key stays"
    assert read_config(config_path)["rw"]["iot_provisioning_state"] == "NOT_PROVISIONED"
    # The takeover guard lets the serial onboard again once its old certificate is inactive.
    iot.update_certificate(certificateId=old, newStatus="INACTIVE")
    assert main(["provision", "--config", str(config_path)]) == 0, "and the hub onboards again"


@pytest.mark.parametrize(
    ("breakage", "key"),
    [
        ("wrong PIN, claim key a file", "ro.pkcs11_pin_path"),
        ("wrong PIN", "ro.pkcs11_pin_path"),
        ("PIN file too open", "ro.pkcs11_pin_path"),
        ("no such module", "ro.pkcs11_module_path"),
        ("unloadable module", "ro.pkcs11_module_path"),
        ("token not present", "ro.pkcs11_token_label"),
        ("unknown key object", "ro.iot_claim_pk_path"),
        ("key type the endpoint cannot use", "ro.iot_claim_pk_path"),
    ],
)
def test_token_errors_exit_4_and_write_nothing(
    iot: Any,
    make_cloud_hub: CloudHubFactory,
    softhsm: SoftHsmToken,
    breakage: str,
    key: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if breakage.endswith("claim key a file"):  # only the permanent key would go to the token
        config_path = make_cloud_hub(extra_ro=softhsm.ro())
    else:
        config_path = make_cloud_hub(token=softhsm.config())
    doc = read_config(config_path)
    ro = doc["ro"]
    if breakage.startswith("wrong PIN"):
        softhsm.pin_path.write_text("99999999\n")
    elif breakage == "PIN file too open":
        softhsm.pin_path.chmod(0o640)
    elif breakage == "no such module":
        ro["pkcs11_module_path"] = str(config_path.parent / "libnothing.so")
    elif breakage == "unloadable module":  # a file that is no library at all
        junk = config_path.parent / "libjunk.so"
        junk.write_bytes(b"\x7fELF this is not a shared object" * 8)
        ro["pkcs11_module_path"] = str(junk)
    elif breakage == "token not present":
        ro["pkcs11_token_label"] = "unplugged"
    elif breakage == "unknown key object":
        ro["iot_claim_pk_path"] = "pkcs11:token=hub;object=missing-key;type=private"
    else:  # an RSA-1024 claim pair, the key in the token
        cert_pem, key_pem = make_rsa_pair("weak-claim", 1024)
        Path(ro["iot_claim_cert_path"]).write_bytes(cert_pem)
        Pkcs11CredentialStore(softhsm.config()).import_private_key("claim-key", key_pem)
    config_path.write_text(json.dumps(doc))
    before = snapshot(config_path.parent)
    certificates_before = certificate_ids(iot)
    objects_before = set(snapshot(softhsm.folder))  # one file per object (token.object counts PIN failures)
    assert main(["provision", "--config", str(config_path), "--json"]) == 4
    printed = capsys.readouterr()
    error = json.loads(printed.out)["error"]
    assert error["exit_code"] == 4
    assert error["type"] == "CredentialError"
    assert error["key"] == key
    assert key in error["message"]
    assert "\n" not in error["message"]
    assert "99999999" not in printed.out + printed.err
    assert snapshot(config_path.parent) == before, "nothing written"
    assert set(snapshot(softhsm.folder)) == objects_before, "nothing made in the token"
    assert certificate_ids(iot) == certificates_before, "no certificate minted"


def _small_token(
    tmp_path: Path, softhsm: SoftHsmToken, config_path: Path, room: int, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Point the hub at the tests' small-token module in front of this SoftHSM2 token (tests/_support/
    tokens.py) with room for `room` more objects; the room file's path."""
    module = build_small_token_module(tmp_path / "small-token")
    room_file = tmp_path / "small-token" / "room"
    room_file.write_text(f"{room}\n")
    monkeypatch.setenv(MODULE_ENV, softhsm.module_path)
    monkeypatch.setenv(ROOM_ENV, str(room_file))
    doc = read_config(config_path)
    doc["ro"]["pkcs11_module_path"] = str(module)
    config_path.write_text(json.dumps(doc))
    return room_file


def _one_line_error(stdout: str, pin: str) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(stdout)["error"]
    assert error["exit_code"] == 4
    assert error["type"] == "CredentialError"
    assert error["key"] == "ro.pkcs11_token_label"
    assert "ro.pkcs11_token_label" in error["message"]
    assert "is full" in error["message"]
    assert "delete objects it no longer needs" in error["message"]
    assert "\n" not in error["message"]
    assert pin not in stdout
    return error


@pytest.mark.parametrize("method", ["CreateCertificateFromCsr", "CreateKeysAndCertificate"])
def test_a_full_token_exits_4_before_any_traffic(
    iot: Any,
    make_cloud_hub: CloudHubFactory,
    softhsm: SoftHsmToken,
    method: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The token answers CKR_DEVICE_MEMORY to whatever would store the permanent key: check_ready's trial
    key finds it before the claim connects, so no certificate is minted (CreateKeysAndCertificate's used
    to be, and left certs/ and its record behind)."""
    config_path = make_cloud_hub(certificate_method=method, token=softhsm.config())
    room_file = _small_token(tmp_path, softhsm, config_path, 0, monkeypatch)
    before = snapshot(config_path.parent)
    certificates_before = certificate_ids(iot)
    objects_before = set(snapshot(softhsm.folder))
    done = run_hub(config_path, "--json")
    assert done.returncode == 4, done.stderr
    pin = softhsm.pin_path.read_text().strip()
    _one_line_error(done.stdout, pin)
    assert pin not in done.stderr
    assert snapshot(config_path.parent) == before, "nothing written, not even the lock file"
    assert certificate_ids(iot) == certificates_before, "no certificate minted"
    assert set(snapshot(softhsm.folder)) == objects_before, "nothing made in the token"
    assert room_file.read_text().strip() == "0"


def test_a_token_that_fills_up_after_the_check_leaves_nothing_on_the_hub(
    iot: Any,
    make_cloud_hub: CloudHubFactory,
    softhsm: SoftHsmToken,
    shim_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CreateKeysAndCertificate, the token filled by someone else between the room check and the import
    of the service's key: exit 4 naming the token, the minted certificate named as left unused (it stays
    PENDING_ACTIVATION), and nothing written on the hub but the lock file."""
    config_path = make_cloud_hub(certificate_method="CreateKeysAndCertificate", token=softhsm.config())
    room_file = _small_token(tmp_path, softhsm, config_path, 2, monkeypatch)
    before = snapshot(config_path.parent)
    certificates_before = certificate_ids(iot)
    objects_before = set(snapshot(softhsm.folder))
    hub = HubProcess(config_path, "--json", shim_dir=shim_dir, freeze=freeze_at_step("CERTIFICATE_ISSUED"))
    hub.wait_frozen()
    assert room_file.read_text().strip() == "2", "the room check gave back what it took"
    room_file.write_text("0\n")  # another application filled the token meanwhile
    hub.resume()
    done = hub.finish()
    assert done.returncode == 4, done.stderr
    error = _one_line_error(done.stdout, softhsm.pin_path.read_text().strip())
    (minted,) = certificate_ids(iot) - certificates_before
    assert f"certificate {minted} was issued" in error["message"]
    assert "PENDING_ACTIVATION" in error["message"]
    status = iot.describe_certificate(certificateId=minted)["certificateDescription"]["status"]
    assert status == "PENDING_ACTIVATION"
    after = snapshot(config_path.parent)
    after.pop(config_path.name + ".lock")
    assert after == before, "no certs/ folder, no record, no progress"
    assert set(snapshot(softhsm.folder)) == objects_before, "nothing left in the token"


def test_reset_keeps_a_dha_object_and_objects_ro_names(
    make_cloud_hub: CloudHubFactory, softhsm: SoftHsmToken, capsys: pytest.CaptureFixture[str]
) -> None:
    """Reset deletes `hub-onboarding-<SN>` only when no ro setting names it: a factory that put its DHA key
    under that very label keeps it, and the default DHA objects stay whatever happens."""
    config_path = make_cloud_hub(token=softhsm.config())
    doc = read_config(config_path)
    label = f"hub-onboarding-{doc['ro']['SN']}"
    store = Pkcs11CredentialStore(softhsm.config())
    store.import_private_key(label, make_rsa_pair("factory-dha", 2048)[1])
    store.import_private_key("dha-key", make_rsa_pair("default-dha", 2048)[1])
    doc["ro"]["iot_dha_pk_path"] = f"pkcs11:token=hub;object={label};type=private"
    config_path.write_text(json.dumps(doc))
    assert main(["reset", "--config", str(config_path), "--yes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == []
    assert store.describe_key(label)["count"] == 1, "the object ro names stays"
    assert store.describe_key("dha-key")["count"] == 1, "the default DHA object stays"
    assert store.describe_key("claim-key")["count"] == 1, "the factory's claim key stays"


@pytest.mark.timeout(120)
def test_fleet_sim_with_keys_in_tokens(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """fleet-sim --pkcs11: each simulated hub has its own token; three onboard at once (the module is
    initialised for threads: awscrt signs handshakes on its threads meanwhile)."""
    monkeypatch.setenv(CONF_ENV, "")  # fleet-sim points this process at its SoftHSM2 folder; undone after
    code = fleet_sim.main(
        [
            "--hubs",
            "4",
            "--concurrency",
            "3",
            "--json",
            "--pkcs11",
            "--serial-prefix",
            "P",
            "--work-dir",
            str(tmp_path),
        ]
    )
    summary = json.loads(capsys.readouterr().out)
    assert code == 0, summary.get("errors")  # each failed hub: its exit code and message
    assert summary["onboarded"] == 4
    for i, config in enumerate(sorted((tmp_path / "hubs").glob("hub-*/iotmi_config.json"))):
        doc = read_config(config)
        label = f"hub-{i:06d}"
        assert doc["ro"]["pkcs11_token_label"] == label
        assert doc["rw"]["iot_provisioning_state"] == "PROVISIONED"
        assert (
            doc["rw"]["iot_permanent_pk_path"]
            == f"pkcs11:token={label};object=hub-onboarding-P-{i:06d};type=private"
        )
        assert _private_key_files(config.parent) == []


def test_demo_shows_the_token_path(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv(CONF_ENV, "")  # the demo points this process at its SoftHSM2 folder; undone after
    kept = tmp_path / "kept"
    assert main(["demo", "--pkcs11", "--keep", str(kept)]) == 0
    out = capsys.readouterr().out
    assert "initialising a SoftHSM2 token 'hub'" in out
    uri = "pkcs11:token=hub;object=hub-onboarding-SN-DEMO-0001;type=private"
    assert f"{uri}: 1 object, sensitive True, extractable False" in out
    assert "private key files beside the config: 0" in out
    config = json.loads((kept / "hub" / "iotmi_config.json").read_text(encoding="utf-8"))
    assert config["rw"]["iot_provisioning_state"] == "PROVISIONED"
    assert config["rw"]["iot_permanent_pk_path"] == uri
    assert config["ro"]["iot_claim_pk_path"] == "pkcs11:token=hub;object=claim-key;type=private"
    assert "PRIVATE KEY" not in out
    # The reset it prints works as printed from a new shell, which has no SOFTHSM2_CONF of its own.
    (reset,) = [line.strip() for line in out.splitlines() if "hub-onboard reset --config" in line]
    assert reset.startswith(f"{CONF_ENV}={kept.resolve() / 'softhsm' / 'softhsm2.conf'} hub-onboard reset")
    env = {k: v for k, v in os.environ.items() if k != CONF_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(["sh", "-c", reset], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    config = json.loads((kept / "hub" / "iotmi_config.json").read_text(encoding="utf-8"))
    assert config["rw"]["iot_provisioning_state"] == "NOT_PROVISIONED"


# ------------------------------------------------------------- two configs, one SN, one token (QA F1)


def _onboarded_and_a_second_config(
    cloud: LocalIotCore,
    claim: ClaimSetup,
    make_cloud_hub: CloudHubFactory,
    softhsm: SoftHsmToken,
    tmp_path: Path,
    second_method: str,
) -> tuple[Path, Path]:
    """A hub onboarded by CSR with its key in the token, and a second config on the same hub (its own
    folder) with the same SN and the same token, never onboarded."""
    first = make_cloud_hub(token=softhsm.config())
    assert run_hub(first).returncode == 0
    serial = read_config(first)["ro"]["SN"]
    second = cloud_claim_hub(
        cloud, claim, tmp_path / "second", serial, certificate_method=second_method, token=softhsm.config()
    )
    return first, second


def _token_objects(softhsm: SoftHsmToken) -> dict[str, Any]:
    """The token's object files and their bytes (token.object, which counts logins, left out)."""
    return {k: v for k, v in snapshot(softhsm.folder).items() if not k.endswith("token.object")}


def _first_hub_intact(cloud: LocalIotCore, softhsm: SoftHsmToken, first: Path) -> None:
    """The first hub is PROVISIONED, its key alone under its label, and it still connects through it."""
    doc = read_config(first)
    rw = doc["rw"]
    assert rw["iot_provisioning_state"] == "PROVISIONED"
    assert_key_in_token(softhsm, first, rw, doc["ro"]["SN"])
    probe = probe_token_key(softhsm, f"hub-onboarding-{doc['ro']['SN']}")
    assert probe is not None
    assert probe.signed_for(Path(rw["iot_permanent_cert_path"]).read_bytes()), "the first hub's own key"
    connect_through_token(cloud, softhsm, rw)


@pytest.mark.parametrize("second_method", ["CreateCertificateFromCsr", "CreateKeysAndCertificate"])
def test_a_second_config_with_the_same_sn_and_token_is_refused_before_any_traffic(
    cloud: LocalIotCore,
    iot: Any,
    claim: ClaimSetup,
    make_cloud_hub: CloudHubFactory,
    softhsm: SoftHsmToken,
    tmp_path: Path,
    second_method: str,
) -> None:
    """QA F1 B (CreateKeysAndCertificate imported the service's key over the first hub's) and C (CSR
    reused the first hub's key as "left in token" and got a certificate for it): exit 3 naming ro.SN
    and the token, before the claim connects; nothing minted, written or touched in the token."""
    first, second = _onboarded_and_a_second_config(
        cloud, claim, make_cloud_hub, softhsm, tmp_path, second_method
    )
    before = snapshot(second.parent)
    certificates_before = certificate_ids(iot)
    objects_before = _token_objects(softhsm)
    done = run_hub(second, "--json")
    assert done.returncode == 3, done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["type"] == "ConfigError"
    assert error["key"] == "ro.SN"
    assert "ro.pkcs11_token_label" in error["message"]
    assert "another config holds this SN's key in this token" in error["message"]
    assert "use another ro.SN, or reset that config first" in error["message"]
    assert "\n" not in error["message"]
    assert "CLAIM_CONNECTED" not in done.stderr, "refused before any traffic"
    assert certificate_ids(iot) == certificates_before, "no certificate minted"
    assert snapshot(second.parent) == before, "nothing written, not even the lock file"
    assert _token_objects(softhsm) == objects_before, "nothing made, changed or deleted in the token"
    _first_hub_intact(cloud, softhsm, first)


def test_reset_of_a_second_config_with_the_same_sn_leaves_the_first_hubs_key(
    cloud: LocalIotCore,
    claim: ClaimSetup,
    make_cloud_hub: CloudHubFactory,
    softhsm: SoftHsmToken,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """QA F1 A: reset of a config that never onboarded deleted `hub-onboarding-<SN>`, the live key of
    another config with that SN in the same token. Its reset now deletes only its own objects, says
    what it left, and the first hub still connects through its key."""
    first, second = _onboarded_and_a_second_config(
        cloud, claim, make_cloud_hub, softhsm, tmp_path, "CreateCertificateFromCsr"
    )
    objects_before = _token_objects(softhsm)
    assert main(["reset", "--config", str(second), "--yes", "--json"]) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out)["deleted"] == []
    assert "another config made them" in printed.err
    assert _token_objects(softhsm) == objects_before, "nothing deleted in the token"
    _first_hub_intact(cloud, softhsm, first)
    # The first config's own reset still deletes its key.
    assert main(["reset", "--config", str(first), "--yes", "--json"]) == 0
    serial = read_config(first)["ro"]["SN"]
    assert (
        f"pkcs11:token=hub;object=hub-onboarding-{serial};type=private"
        in json.loads(capsys.readouterr().out)["deleted"]
    )
    assert Pkcs11CredentialStore(softhsm.config()).describe_key(f"hub-onboarding-{serial}")["count"] == 0


def test_a_rerun_after_a_cut_at_key_in_token_needs_no_room(
    cloud: LocalIotCore,
    iot: Any,
    make_cloud_hub: CloudHubFactory,
    softhsm: SoftHsmToken,
    shim_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """QA F2: a CSR run cut right after it made its pair in the token; the token is full by then. The
    rerun reuses that pair, so it needs no room: it must not make a trial key (which the full token
    refuses, exit 4) but onboard with the pair it left."""
    config_path = make_cloud_hub(token=softhsm.config())
    room_file = _small_token(tmp_path, softhsm, config_path, 2, monkeypatch)
    hub = HubProcess(config_path, "--json", shim_dir=shim_dir, freeze=freeze_at_step("KEY_IN_TOKEN"))
    hub.wait_frozen()
    hub.kill()
    assert room_file.read_text().strip() == "0", "the pair took the last room"
    serial = read_config(config_path)["ro"]["SN"]
    left = probe_token_key(softhsm, f"hub-onboarding-{serial}")
    assert left is not None
    done = run_hub(config_path, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    rw = read_config(config_path)["rw"]
    assert rw["iot_provisioning_state"] == "PROVISIONED"
    assert left.signed_for(Path(rw["iot_permanent_cert_path"]).read_bytes()), "the pair left was reused"
    assert room_file.read_text().strip() == "0"
    connect_through_token(cloud, softhsm, rw)
