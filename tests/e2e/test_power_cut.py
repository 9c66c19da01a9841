"""Power cut at any point: `hub-onboard provision` SIGKILLed at every step boundary, then run again.

Each case runs the real command in a child process (python -m hub_onboarding.cli provision -vv) against
the module's iot-core-local (real TLS, real Mosquitto) and kills it with SIGKILL from this process:

- `test_power_cut_at_every_step` freezes the child at one exact point, then kills it. The freeze is a
  test-only `sitecustomize` in the child (conftest._SHIM, never part of the product): it raises SIGSTOP
  in the child right after the product writes a given log line, right after the n-th os.replace onto
  the config (each config write), or right after the fsync of an atomic write's temp file (the middle of
  a write: temp file complete, not yet renamed). The harness sees the child stopped, checks where it is,
  and SIGKILLs it. So every kill lands exactly at its boundary, every time.
- `test_power_cut_from_outside_on_log_lines` and `test_power_cut_in_the_middle_of_a_config_write` use no
  shim at all: they watch the child's stderr or its config folder (a tight polling loop) and SIGKILL the
  moment the line or the temp file appears, wherever the child has got to by then.

After each kill the same command runs again to completion, and every time: iotmi_config.json parses and
keeps all it had (unknown keys too); the hub is PROVISIONED; the key on disk matches the certificate the
config names; that certificate is ACTIVE (boto3) and connects (paho); no step is repeated that need not be
(a saved token finishes RegisterThing instead of a new certificate; after RegisterThing the claim is not
used); at most one extra certificate per interrupted attempt (boto3 list_certificates before and after).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from iot_core_local.server import LocalIotCore

from .conftest import (
    HubFactory,
    HubProcess,
    certificate_ids,
    connects,
    key_matches_certificate,
    pem_certificate_id,
    read_config,
    run_hub,
)

pytestmark = pytest.mark.e2e

METHODS = ["CreateKeysAndCertificate", "CreateCertificateFromCsr"]
CLAIM_LINE = "connected with the claim certificate"
ISSUED_LINE = "certificate issued ("
STORED_LINE = "credentials stored in"
REGISTERED_LINE = "thing registered:"
VERIFIED_LINE = "connected with the new certificate"


@dataclass(frozen=True)
class KillPoint:
    name: str
    freeze: dict[str, Any]  # the shim's spec; "{config}" is replaced by the config's path
    certificates: int  # new certificates in the cloud once the hub is provisioned
    resumed_logs: tuple[str, ...] = ()  # lines the second run must write
    resumed_never: tuple[str, ...] = ()  # lines the second run must not write (steps not repeated)
    delay_verify_connect: bool = False  # kill while the verification CONNECT waits for its CONNACK
    notes: list[str] = field(default_factory=list)


def _line(text: str) -> dict[str, Any]:
    return {"kind": "line", "text": text}


def _config_write(n: int) -> dict[str, Any]:
    return {"kind": "replace", "path": "{config}", "nth": n}


def _mid_write(prefix: str, n: int = 1) -> dict[str, Any]:
    return {"kind": "fsync", "prefix": prefix, "nth": n}


AFTER_REGISTER = ("resuming after THING_REGISTERED",)
NO_CLAIM = (CLAIM_LINE, ISSUED_LINE, REGISTERED_LINE)
NO_NETWORK = (*NO_CLAIM, "connecting to")

KILL_POINTS = [
    # Nothing was issued yet: the second run does everything, once.
    KillPoint("claim connected", _line(CLAIM_LINE), 1),
    # The cloud issued a certificate the hub never stored: one orphan (never activated), then a new one.
    KillPoint("certificate issued", _line(ISSUED_LINE), 2),
    KillPoint("middle of the key write", _mid_write(".private.pem.key."), 2),
    # Credentials and the token are saved: the second run finishes RegisterThing with that token.
    KillPoint(
        "credentials written",
        _line(STORED_LINE),
        1,
        ("resuming after CERTIFICATE_ISSUED", REGISTERED_LINE),
        (ISSUED_LINE,),
    ),
    KillPoint(
        "RegisterThing accepted", _line(REGISTERED_LINE), 1, (*AFTER_REGISTER, VERIFIED_LINE), NO_CLAIM
    ),
    KillPoint(
        "during the verification connect",
        _line(REGISTERED_LINE),
        1,
        (*AFTER_REGISTER, VERIFIED_LINE),
        NO_CLAIM,
        delay_verify_connect=True,
    ),
    KillPoint("verification connected", _line(VERIFIED_LINE), 1, ("resuming after VERIFIED",), NO_NETWORK),
    KillPoint("config write 1 (paths)", _config_write(1), 1, ("resuming after VERIFIED",), NO_NETWORK),
    KillPoint("config write 2 (client_id)", _config_write(2), 1, ("resuming after VERIFIED",), NO_NETWORK),
    KillPoint(
        "config write 3 (managed_thing_id)", _config_write(3), 1, ("resuming after VERIFIED",), NO_NETWORK
    ),
    KillPoint("config write 4 (PROVISIONED)", _config_write(4), 1, ("already PROVISIONED",), NO_NETWORK),
    KillPoint(
        "middle of config write 1",
        _mid_write(".iotmi_config.json.", 1),
        1,
        ("resuming after VERIFIED",),
        NO_NETWORK,
    ),
    KillPoint(
        "middle of config write 4",
        _mid_write(".iotmi_config.json.", 4),
        1,
        ("resuming after VERIFIED",),
        NO_NETWORK,
    ),
]


def _with_unknown_keys(config_path: Path) -> dict[str, Any]:
    """Add keys onboarding does not know (in ro, rw and at the top) that every write must keep."""
    doc = read_config(config_path)
    doc["ro"]["vendor_setting"] = {"nested": [1, 2, 3], "text": "é"}
    doc["rw"]["proxy_state"] = "kept"
    doc["vendor_section"] = {"a": "b"}
    config_path.write_text(json.dumps(doc, indent=2))
    return doc


def assert_recovered(
    cloud: LocalIotCore,
    iot: Any,
    config_path: Path,
    original: dict[str, Any],
    token_spent_before_cut: Iterable[str] = (),
) -> str:
    """Everything a hub must be after a power cut and one more run; returns the certificate id."""
    doc = read_config(config_path)  # parses
    assert doc["ro"] == original["ro"], "ro is never written"
    for key, value in original.items():
        if key not in ("ro", "rw"):
            assert doc[key] == value, f"unknown top-level key {key} kept"
    rw = doc["rw"]
    for key, value in original["rw"].items():
        if key not in ONBOARDING_RW_KEYS:
            assert rw[key] == value, f"unknown rw key {key} kept"
    assert rw["iot_provisioning_state"] == "PROVISIONED"
    serial = original["ro"]["SN"]
    assert rw["client_id"] == f"hub-{serial}"
    assert rw["managed_thing_id"] == f"mt-{serial}"
    cert_pem = Path(rw["iot_permanent_cert_path"]).read_bytes()
    key_path = Path(rw["iot_permanent_pk_path"])
    assert key_matches_certificate(cert_pem, key_path.read_bytes()), "the key on disk is the certificate's"
    assert key_path.stat().st_mode & 0o077 == 0
    cert_id = pem_certificate_id(cert_pem)
    described = iot.describe_certificate(certificateId=cert_id)["certificateDescription"]
    assert described["status"] == "ACTIVE"
    principals = {
        p.rsplit("/", 1)[1] for p in iot.list_thing_principals(thingName=rw["client_id"])["principals"]
    }
    assert cert_id in principals
    # Besides it, only a certificate whose RegisterThing the service accepted just before the cut, before
    # the hub could record the answer: its token is then spent, so the hub had to start over.
    assert principals - {cert_id} <= set(token_spent_before_cut), "the thing has no stray certificate"
    assert connects(cloud, rw["iot_permanent_cert_path"], key_path, rw["client_id"])
    return cert_id


ONBOARDING_RW_KEYS = {
    "iot_provisioning_state",
    "client_id",
    "managed_thing_id",
    "iot_permanent_cert_path",
    "iot_permanent_pk_path",
    "metadata",
}
KILLS: list[str] = []


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("point", KILL_POINTS, ids=[p.name for p in KILL_POINTS])
def test_power_cut_at_every_step(
    cloud: LocalIotCore, iot: Any, make_hub: HubFactory, shim_dir: Path, point: KillPoint, method: str
) -> None:
    config_path = make_hub(certificate_method=method)
    original = _with_unknown_keys(config_path)
    freeze = json.loads(json.dumps(point.freeze).replace("{config}", str(config_path.absolute())))
    before = certificate_ids(iot)

    hub = HubProcess(config_path, shim_dir=shim_dir, freeze=freeze)
    if point.delay_verify_connect:
        hub.wait_frozen()
        # The next CONNECT (the verification one) gets its CONNACK only after 20 s: kill it while it waits.
        cloud.faults.add("delay", "Connect", count=1, seconds=20)
        hub.resume()
        hub.wait_for_line("connecting to")
        time.sleep(0.3)  # TCP, TLS and CONNECT done; the CONNACK is held back
        assert hub.proc.poll() is None, "the verification connect was still waiting"
    else:
        hub.wait_frozen()
    killed = hub.kill()
    cloud.faults.clear()
    assert killed.returncode == -signal.SIGKILL
    # The state the cut left: the config still parses, keeps its unknown keys and is not yet PROVISIONED
    # (except after the last config write).
    left = read_config(config_path)
    assert left["ro"] == original["ro"]
    assert left["rw"]["proxy_state"] == "kept"
    provisioned = left["rw"].get("iot_provisioning_state") == "PROVISIONED"
    assert provisioned == (point.name == "config write 4 (PROVISIONED)")
    after_kill = certificate_ids(iot)
    assert len(after_kill - before) <= 1, "at most one certificate per interrupted attempt"

    second = run_hub(config_path, shim_dir=shim_dir)
    assert second.returncode == 0, second.stderr
    assert "Traceback" not in second.stderr
    for text in point.resumed_logs:
        assert text in second.stderr, f"{text!r} expected in the second run:\n{second.stderr}"
    for text in point.resumed_never:
        assert text not in second.stderr, f"{text!r} repeated in the second run:\n{second.stderr}"
    cert_id = assert_recovered(cloud, iot, config_path, original)
    new = certificate_ids(iot) - before
    assert len(new) == point.certificates, f"new certificates: {len(new)}"
    assert cert_id in new
    for orphan in new - {cert_id}:
        status = iot.describe_certificate(certificateId=orphan)["certificateDescription"]["status"]
        assert status != "ACTIVE", "a certificate the hub never stored is never activated"
    KILLS.append(f"{point.name}/{method}")


OUTSIDE_LINES = [CLAIM_LINE, ISSUED_LINE, STORED_LINE, REGISTERED_LINE, VERIFIED_LINE, "PROVISIONED:"]


@pytest.mark.parametrize("line", OUTSIDE_LINES)
def test_power_cut_from_outside_on_log_lines(
    cloud: LocalIotCore, iot: Any, make_hub: HubFactory, line: str
) -> None:
    """No shim: SIGKILL as soon as the line shows on stderr, wherever the child has got to by then."""
    config_path = make_hub(certificate_method="CreateKeysAndCertificate")
    original = _with_unknown_keys(config_path)
    before = certificate_ids(iot)
    hub = HubProcess(config_path)
    hub.wait_for_line(line)
    killed = hub.kill()
    assert killed.returncode in (-signal.SIGKILL, 0)
    read_config(config_path)  # parses at every moment
    second = run_hub(config_path)
    assert second.returncode == 0, second.stderr
    new = certificate_ids(iot) - before
    # The one race a cut from outside can hit: the service accepted RegisterThing (token spent) and the
    # kill landed before the hub recorded the answer. The hub then starts over, once, and says why.
    spent = "ownership token refused" in second.stderr
    cert_id = assert_recovered(cloud, iot, config_path, original, token_spent_before_cut=new if spent else ())
    assert cert_id in new
    assert len(new) <= 2
    if line in (STORED_LINE, REGISTERED_LINE, VERIFIED_LINE, "PROVISIONED:"):
        # The token was saved before the line was written: no new certificate, unless it was spent.
        assert len(new) == (2 if spent else 1)
        assert spent or ISSUED_LINE not in second.stderr
    KILLS.append(f"outside:{line}")


def test_power_cut_in_the_middle_of_a_config_write(
    cloud: LocalIotCore, iot: Any, make_hub: HubFactory
) -> None:
    """No shim: poll the config folder and SIGKILL the moment a temp file of an atomic write appears.

    The kill has landed mid-write when that temp file is still there afterwards (written, never renamed).
    """
    hits = 0
    for attempt in range(4):
        config_path = make_hub(certificate_method="CreateCertificateFromCsr")
        original = _with_unknown_keys(config_path)
        config_bytes = config_path.read_bytes()
        folder = config_path.parent
        hub = HubProcess(config_path, verbosity="")
        deadline = time.monotonic() + 30
        temp: str | None = None
        while temp is None and hub.proc.poll() is None and time.monotonic() < deadline:
            temp = next((n for n in os.listdir(folder) if n.startswith(".iotmi_config.json.")), None)
        if temp is not None:
            os.kill(hub.proc.pid, signal.SIGKILL)
        hub.finish(10)
        if temp is not None and (folder / temp).exists():
            hits += 1
            # The config is the one before the interrupted write, byte for byte.
            assert config_path.read_bytes() == config_bytes
        read_config(config_path)
        second = run_hub(config_path)
        assert second.returncode == 0, second.stderr
        assert_recovered(cloud, iot, config_path, original)
        if hits and attempt >= 1:
            break
    assert hits >= 1, "the kill never landed between a temp file's creation and its rename"
    KILLS.extend(["outside:mid-config-write"] * hits)


def test_two_cuts_in_a_row_then_success(
    cloud: LocalIotCore, iot: Any, make_hub: HubFactory, shim_dir: Path
) -> None:
    """Cut after the credentials, cut again after RegisterThing, then finish: still one certificate."""
    config_path = make_hub(certificate_method="CreateKeysAndCertificate")
    original = _with_unknown_keys(config_path)
    before = certificate_ids(iot)
    for text in (STORED_LINE, REGISTERED_LINE):
        hub = HubProcess(config_path, shim_dir=shim_dir, freeze=_line(text))
        hub.wait_frozen()
        hub.kill()
    second = run_hub(config_path)
    assert second.returncode == 0, second.stderr
    assert "resuming after THING_REGISTERED" in second.stderr
    cert_id = assert_recovered(cloud, iot, config_path, original)
    assert certificate_ids(iot) - before == {cert_id}
    KILLS.extend(["double-1", "double-2"])
