"""Secrets: never in a log line or the output at any verbosity; credential files private from their first
byte whatever the umask; claim credentials unused once provisioned; TLS verification always on.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest

from hub_onboarding import cli
from hub_onboarding import config as cfgmod
from iot_core_local.recipes.claims import ClaimSetup, set_up_fleet_provisioning
from iot_core_local.recipes.jitr import DeviceCA
from iot_core_local.server import LocalIotCore
from tests._support.hubs import CloudHubFactory, read_config, write_jitr_cloud_hub
from tests._support.processes import HubProcess, freeze_at_step, run_hub

pytestmark = pytest.mark.e2e

SRC = Path(__file__).resolve().parents[2] / "src" / "hub_onboarding"


def _pem_lines(pem: str | bytes) -> list[str]:
    """Every base64 line of a PEM body: any one of them in a log means the key leaked."""
    text = pem.decode() if isinstance(pem, bytes) else pem
    return [line for line in text.strip().splitlines() if not line.startswith("-----") and len(line) >= 16]


def test_no_secret_in_any_log_or_output_at_debug(
    cloud: LocalIotCore,
    iot: Any,
    make_cloud_hub: CloudHubFactory,
    claim: ClaimSetup,
    shim_dir: Path,
    tmp_path: Path,
    hook_server: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # the stand-in runs in this process: its own logs are searched too
    texts: list[str] = []
    secrets: dict[str, list[str]] = {"claim key": _pem_lines(claim.private_key_pem)}

    # 1-2. fleet provisioning, both certificate methods
    for method in ("CreateKeysAndCertificate", "CreateCertificateFromCsr"):
        config = make_cloud_hub(certificate_method=method)
        done = run_hub(config, verbosity="-vv")
        assert done.returncode == 0, done.stderr
        texts += [done.stdout, done.stderr]
        key = Path(read_config(config)["rw"]["iot_permanent_pk_path"]).read_text()
        secrets[f"permanent key ({method})"] = _pem_lines(key)

    # 3. a resume after a kill: the token is in the progress record when the kill lands
    config = make_cloud_hub(certificate_method="CreateKeysAndCertificate")
    hub = HubProcess(config, shim_dir=shim_dir, freeze=freeze_at_step("CREDENTIALS_STORED"))
    hub.wait_frozen()
    record_path = config.parent / "certs" / "onboarding-progress.json"
    record = json.loads(record_path.read_text())
    token = record["ownership_token"]
    assert isinstance(token, str)
    assert len(token) >= 16
    assert record_path.stat().st_mode & 0o777 == 0o600, "the record holds a secret: 0600"
    killed = hub.kill()
    texts += [killed.stdout, killed.stderr]
    done = run_hub(config, "--json", verbosity="-vv")
    assert done.returncode == 0, done.stderr
    assert "resuming after CERTIFICATE_ISSUED" in done.stderr
    assert not record_path.exists(), "the record (and its token) is gone once provisioned"
    texts += [done.stdout, done.stderr]
    secrets["ownership token"] = [token]
    secrets["permanent key (resumed)"] = _pem_lines(
        Path(read_config(config)["rw"]["iot_permanent_pk_path"]).read_text()
    )

    # 4. a rejection (the hook refuses), with --json too
    hook = hook_server({"allowProvisioning": False})
    denied = set_up_fleet_provisioning(iot, "SecretsDenyTemplate", hook_url=hook.url)
    config = make_cloud_hub(
        template_name=denied.template_name,
        claim_certificate_pem=denied.certificate_pem,
        claim_private_key_pem=denied.private_key_pem,
    )
    for extra in ((), ("--json",)):
        done = run_hub(config, *extra, verbosity="-vv")
        assert done.returncode == 12, done.stderr
        texts += [done.stdout, done.stderr]
    secrets["claim key (denied)"] = _pem_lines(denied.private_key_pem)

    # 5. JITR
    jitr = write_jitr_cloud_hub(
        cloud, iot, tmp_path / "jitr", "JITR-SECRETS", activator_client_id="secrets-activator"
    )
    config, dha_key, activator = jitr.config, jitr.dha_private_key_pem, jitr.activator
    activator.start()
    try:
        done = run_hub(config, verbosity="-vv")
    finally:
        activator.stop()
    assert done.returncode == 0, done.stderr
    texts += [done.stdout, done.stderr]
    secrets["DHA key"] = _pem_lines(dha_key)

    # status at the end (prints the paths, never the contents)
    done = run_hub(config, "--json", command="status", verbosity="")
    assert done.returncode == 0
    texts += [done.stdout, done.stderr]

    # The product's and the stand-in's log records (botocore's own DEBUG dump of the test's boto3 calls,
    # e.g. the claim key CreateKeysAndCertificate returns to the test, is the test's client, not ours).
    ours = [
        f"{r.name} {r.getMessage()} {r.exc_text or ''}"
        for r in caplog.records
        if r.name.startswith(("hub_onboarding", "iot_core_local"))
    ]
    assert any(r.startswith("iot_core_local.gateway") for r in ours), "the stand-in's logs were captured"
    everything = "\n".join(texts + ours)
    assert "DEBUG hub_onboarding" in everything, "logs captured"
    assert "requesting RegisterThing" in everything, "logs captured"
    assert len(everything) > 5000
    for name, values in secrets.items():
        assert values, name
        for value in values:
            where = [line[:120] for line in everything.splitlines() if value in line]
            assert not where, f"{name} leaked into a log line or the output: {where}"


def test_credentials_private_from_the_first_byte_whatever_the_umask(
    make_cloud_hub: CloudHubFactory, shim_dir: Path
) -> None:
    config = make_cloud_hub(certificate_method="CreateKeysAndCertificate")
    os.chmod(config, 0o640)
    certs = config.parent / "certs"
    # Frozen right after the key's temp file was written and fsynced, before its rename.
    hub = HubProcess(
        config, shim_dir=shim_dir, umask=0o000, freeze={"kind": "fsync", "prefix": ".private.pem.key."}
    )
    hub.wait_frozen()
    (temp,) = [p for p in certs.iterdir() if p.name.startswith(".private.pem.key.")]
    assert temp.stat().st_mode & 0o777 == 0o600
    assert certs.stat().st_mode & 0o777 == 0o700
    assert temp.stat().st_size > 0, "the key is in it already"
    hub.resume()
    assert hub.finish(30).returncode == 0
    rw = read_config(config)["rw"]
    assert Path(rw["iot_permanent_pk_path"]).stat().st_mode & 0o777 == 0o600
    assert Path(rw["iot_permanent_cert_path"]).stat().st_mode & 0o077 in (0, 0o044)
    assert certs.stat().st_mode & 0o777 == 0o700
    assert config.stat().st_mode & 0o777 == 0o640, "the config keeps its mode"
    # The progress record (it holds the token) is 0600 from its first byte too.
    config = make_cloud_hub(certificate_method="CreateCertificateFromCsr")
    hub = HubProcess(
        config,
        shim_dir=shim_dir,
        umask=0o000,
        freeze={"kind": "fsync", "prefix": ".onboarding-progress.json."},
    )
    hub.wait_frozen()
    (temp,) = [p for p in (config.parent / "certs").iterdir() if p.name.startswith(".onboarding-progress")]
    assert temp.stat().st_mode & 0o777 == 0o600
    assert (config.parent / "certs" / "private.pem.key").stat().st_mode & 0o777 == 0o600
    hub.resume()
    assert hub.finish(30).returncode == 0


def _opened(log: Path) -> set[str]:
    return {os.path.abspath(line) for line in log.read_text().splitlines() if line}


def test_claim_credentials_are_never_used_once_provisioned(
    make_cloud_hub: CloudHubFactory, shim_dir: Path, tmp_path: Path
) -> None:
    config = make_cloud_hub()
    assert run_hub(config).returncode == 0
    doc = read_config(config)
    claim_cert, claim_key = Path(doc["ro"]["iot_claim_cert_path"]), Path(doc["ro"]["iot_claim_pk_path"])
    claim_key.write_bytes(b"garbage")
    os.chmod(claim_key, 0o666)
    claim_cert.unlink()
    log = tmp_path / "opened.txt"
    done = run_hub(config, openlog=log, shim_dir=shim_dir)
    assert done.returncode == 0, done.stderr
    assert "already provisioned" in done.stdout
    opened = _opened(log)
    assert str(config.absolute()) in opened, "the open log works"
    assert str(claim_key) not in opened
    assert str(claim_cert) not in opened
    assert claim_key.read_bytes() == b"garbage"
    assert read_config(config) == doc


def test_resume_after_register_thing_does_not_read_the_claim(
    make_cloud_hub: CloudHubFactory, shim_dir: Path, tmp_path: Path
) -> None:
    config = make_cloud_hub()
    doc = read_config(config)
    claim_cert, claim_key = Path(doc["ro"]["iot_claim_cert_path"]), Path(doc["ro"]["iot_claim_pk_path"])
    hub = HubProcess(config, shim_dir=shim_dir, freeze=freeze_at_step("THING_REGISTERED"))
    hub.wait_frozen()
    hub.kill()
    claim_cert.unlink()
    claim_key.unlink()
    log = tmp_path / "opened.txt"
    done = run_hub(config, openlog=log, shim_dir=shim_dir)
    assert done.returncode == 0, done.stderr
    assert "resuming after THING_REGISTERED" in done.stderr
    opened = _opened(log)
    assert str(config.absolute()) in opened
    assert str(claim_cert) not in opened
    assert str(claim_key) not in opened
    assert read_config(config)["rw"]["iot_provisioning_state"] == "PROVISIONED"


# ------------------------------------------------------------------------------ TLS verification

_TLS_OFF = re.compile(
    r"insecure|tls|ssl|verify_peer|verify_cert|no_verify|skip_verif|check_hostname|"
    r"untrusted|cert_reqs|unverified",
    re.IGNORECASE,
)


def test_there_is_no_switch_that_turns_tls_verification_off(capsys: pytest.CaptureFixture[str]) -> None:
    # every command-line flag of every subcommand, as its --help lists them
    flags: list[str] = []
    for command in ("provision", "status", "reset", "demo", "fleet-sim"):
        assert cli.main([command, "--help"]) == 0
        flags += re.findall(r"(?<![\w-])--?[a-zA-Z][\w-]*", capsys.readouterr().out)
    assert "--config" in flags
    assert "--lock-wait" in flags
    assert not [f for f in flags if _TLS_OFF.search(f)], flags
    # every config key the code knows (the string constants of config.py)
    tree = ast.parse((SRC / "config.py").read_text())
    keys = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    ]
    assert cfgmod.ROOT_CA_PATH in keys
    assert cfgmod.SERIAL_NUMBER in keys
    assert not [k for k in keys if _TLS_OFF.search(k)], keys
    # and nothing in the product turns peer verification off in awscrt or ssl
    source = "\n".join(p.read_text() for p in SRC.rglob("*.py"))
    for forbidden in (
        "verify_peer = False",
        "verify_peer=False",
        "CERT_NONE",
        "check_hostname = False",
        "set_verify_peer(False)",
    ):
        assert forbidden not in source


@pytest.mark.parametrize("root_ca", ["another CA", "the system's trust store"])
def test_an_endpoint_the_root_ca_does_not_vouch_for_is_refused_at_once(
    iot: Any, make_cloud_hub: CloudHubFactory, tmp_path: Path, root_ca: str
) -> None:
    """The default budget (300 s) applies: the diagnosis is final in seconds, naming iot_root_ca_path."""
    if root_ca == "another CA":
        other = tmp_path / "other-ca.pem"
        other.write_text(DeviceCA("Not The Endpoint's CA").certificate_pem)
        config = make_cloud_hub(root_ca_path=other)
        trust = f"does not chain to iot_root_ca_path ({other})"
    else:
        config = make_cloud_hub()
        doc = read_config(config)
        del doc["ro"]["iot_root_ca_path"]
        config.write_text(json.dumps(doc))
        trust = "does not chain to the system trust store (iot_root_ca_path is not set)"
    before = {c["certificateId"] for c in iot.list_certificates(pageSize=250)["certificates"]}
    done = run_hub(config, "--json", verbosity="")
    assert done.returncode == 11, done.stderr  # MqttConnectionError
    error = json.loads(done.stdout)["error"]
    assert error["status"] == "FP_STATUS_MQTT_CONNECTION_ERROR"
    assert trust in error["message"]
    assert "set iot_root_ca_path to the CA of this endpoint" in error["message"]
    assert "retrying in" not in done.stderr, "final: another attempt cannot change the trust store"
    assert done.elapsed < 15
    assert read_config(config)["rw"]["iot_provisioning_state"] == "NOT_PROVISIONED"
    assert not (config.parent / "certs").exists(), "nothing was issued or written"
    after = {c["certificateId"] for c in iot.list_certificates(pageSize=250)["certificates"]}
    assert after == before, "nothing minted"
