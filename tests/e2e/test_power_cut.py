"""Power cut at any point: `hub-onboard provision` SIGKILLed at every step boundary, then run again.

Each case runs the real command in a child process (python -m hub_onboarding.cli provision -vv) against
the module's iot-core-local (real TLS, real Mosquitto) and kills it with SIGKILL from this process:

Where the child is comes from its step events: with `--json`, provision writes each step as a JSON line
on stderr (`{"step": "CERTIFICATE_ISSUED", ...}`, the names of OnboardingStep), never from log wording.

- `test_power_cut_at_every_step` freezes the child at one exact point, then kills it. The freeze is a
  test-only `sitecustomize` in the child (tests/_support/processes.CHILD_SHIM, never part of the
  product): it raises SIGSTOP in the child right after it reports a given step, right after the n-th
  os.replace onto the config (each config write), or right after the fsync of an atomic write's temp file
  (the middle of a write: temp file complete, not yet renamed). The harness sees the child stopped and
  SIGKILLs it. So every kill lands exactly at its boundary, every time.
- `test_power_cut_from_outside_on_step_events` and `test_power_cut_in_the_middle_of_a_config_write` use
  no shim at all: they watch the child's step events or its config folder and SIGKILL the moment the
  step or the temp file appears, wherever the child has got to by then.

After each kill the same command runs again to completion, and every time: iotmi_config.json parses and
keeps all it had (unknown keys too); the hub is PROVISIONED; the key on disk matches the certificate the
config names; that certificate is ACTIVE (boto3) and connects (paho); no step is repeated that need not be
(a saved token finishes RegisterThing instead of a new certificate; after RegisterThing the claim is not
used; after the verification connect nothing connects at all: the hub reaches the cloud through a TCP
proxy that counts connections); at most one extra certificate per interrupted attempt (boto3
list_certificates before and after).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hub_onboarding.onboarding import OnboardingStep as S
from hub_onboarding.tools.softhsm import SoftHsmToken
from iot_core_local.faults import Fault
from iot_core_local.server import LocalIotCore
from tests._support.certificates import certificate_ids
from tests._support.hubs import CloudHubFactory, read_config
from tests._support.network import TcpProxy
from tests._support.processes import HubProcess, freeze_at_step, run_hub
from tests._support.recovery import assert_recovered, probe_token_key

# No test here changes the claim or its template in the cloud: one claim serves the module.
pytestmark = [pytest.mark.e2e, pytest.mark.shared_claim]

METHODS = ["CreateKeysAndCertificate", "CreateCertificateFromCsr"]


@dataclass(frozen=True)
class KillPoint:
    name: str
    freeze: dict[str, Any]  # the shim's spec; "{config}" is replaced by the config's path
    certificates: int  # new certificates in the cloud once the hub is provisioned
    resumed_steps: tuple[S, ...] = ()  # steps the second run must report
    resumed_never: tuple[S, ...] = ()  # steps the second run must not report (not repeated)
    no_network: bool = False  # the second run opens no connection at all
    delay_verify_connect: bool = False  # kill while the verification CONNECT waits for its CONNACK
    notes: list[str] = field(default_factory=list)


def _config_write(n: int) -> dict[str, Any]:
    return {"kind": "replace", "path": "{config}", "nth": n}


def _mid_write(prefix: str, n: int = 1) -> dict[str, Any]:
    return {"kind": "fsync", "prefix": prefix, "nth": n}


AFTER_REGISTER = (S.RESUMED_AFTER_THING_REGISTERED, S.VERIFIED)
AFTER_VERIFIED = (S.RESUMED_AFTER_VERIFIED,)
NO_CLAIM = (S.CLAIM_CONNECTED, S.CERTIFICATE_ISSUED, S.THING_REGISTERED)
NOTHING_AGAIN = (*NO_CLAIM, S.VERIFIED)

KILL_POINTS = [
    # Nothing was issued yet: the second run does everything, once.
    KillPoint("claim connected", freeze_at_step(S.CLAIM_CONNECTED), 1),
    # The cloud issued a certificate the hub never stored: one orphan (never activated), then a new one.
    KillPoint("certificate issued", freeze_at_step(S.CERTIFICATE_ISSUED), 2),
    KillPoint("middle of the key write", _mid_write(".private.pem.key."), 2),
    # Credentials and the token are saved: the second run finishes RegisterThing with that token.
    KillPoint(
        "credentials written",
        freeze_at_step(S.CREDENTIALS_STORED),
        1,
        (S.RESUMED_AFTER_CERTIFICATE_ISSUED, S.THING_REGISTERED),
        (S.CERTIFICATE_ISSUED,),
    ),
    # The service registered the thing, and the hub dies writing that down (the record of RegisterThing's
    # answer, its second progress write, complete but not renamed): the token is spent, and the next run's
    # identical RegisterThing is answered as the first was, so the certificate stays the one.
    KillPoint(
        "RegisterThing answered, answer not yet recorded",
        _mid_write(".onboarding-progress.json.", 2),
        1,
        (S.RESUMED_AFTER_CERTIFICATE_ISSUED, S.THING_REGISTERED),
        (S.CERTIFICATE_ISSUED,),
    ),
    KillPoint("RegisterThing accepted", freeze_at_step(S.THING_REGISTERED), 1, AFTER_REGISTER, NO_CLAIM),
    KillPoint(
        "during the verification connect",
        freeze_at_step(S.THING_REGISTERED),
        1,
        AFTER_REGISTER,
        NO_CLAIM,
        delay_verify_connect=True,
    ),
    KillPoint(
        "verification connected",
        freeze_at_step(S.VERIFIED),
        1,
        AFTER_VERIFIED,
        NOTHING_AGAIN,
        no_network=True,
    ),
    KillPoint("config write 1 (paths)", _config_write(1), 1, AFTER_VERIFIED, NOTHING_AGAIN, no_network=True),
    KillPoint(
        "config write 2 (client_id)", _config_write(2), 1, AFTER_VERIFIED, NOTHING_AGAIN, no_network=True
    ),
    KillPoint(
        "config write 3 (managed_thing_id)",
        _config_write(3),
        1,
        AFTER_VERIFIED,
        NOTHING_AGAIN,
        no_network=True,
    ),
    KillPoint(
        "config write 4 (PROVISIONED)",
        _config_write(4),
        1,
        (S.ALREADY_PROVISIONED,),
        NOTHING_AGAIN,
        no_network=True,
    ),
    KillPoint(
        "middle of config write 1",
        _mid_write(".iotmi_config.json.", 1),
        1,
        AFTER_VERIFIED,
        NOTHING_AGAIN,
        no_network=True,
    ),
    KillPoint(
        "middle of config write 4",
        _mid_write(".iotmi_config.json.", 4),
        1,
        AFTER_VERIFIED,
        NOTHING_AGAIN,
        no_network=True,
    ),
]


@dataclass
class _SignallingFault(Fault):
    """A fault that also tells the test the moment the gateway takes it (the CONNECT has arrived)."""

    taken: threading.Event = field(default_factory=threading.Event)

    def matches(self, operation: str) -> bool:
        found = super().matches(operation)
        if found:
            self.taken.set()
        return found


def _with_unknown_keys(config_path: Path) -> dict[str, Any]:
    """Add keys onboarding does not know (in ro, rw and at the top) that every write must keep."""
    doc = read_config(config_path)
    doc["ro"]["vendor_setting"] = {"nested": [1, 2, 3], "text": "é"}
    doc["rw"]["proxy_state"] = "kept"
    doc["vendor_section"] = {"a": "b"}
    config_path.write_text(json.dumps(doc, indent=2))
    return doc


KILLS: list[str] = []


def _cut(
    cloud: LocalIotCore, iot: Any, config_path: Path, shim_dir: Path, point: KillPoint
) -> tuple[dict[str, Any], set[str]]:
    """Run the hub to `point` and SIGKILL it there; check the state the cut left.

    Returns the config as it was before (with unknown keys added) and the cloud's certificates before."""
    original = _with_unknown_keys(config_path)
    freeze = json.loads(json.dumps(point.freeze).replace("{config}", str(config_path.absolute())))
    before = certificate_ids(iot)

    hub = HubProcess(config_path, shim_dir=shim_dir, freeze=freeze)
    hub.wait_frozen()
    if point.delay_verify_connect:
        # The next CONNECT (the verification one) gets its CONNACK only after 20 s: kill it while it waits.
        held = _SignallingFault("delay", "Connect", remaining=1, seconds=20)
        cloud.faults.arm(held)
        hub.resume()
        assert held.taken.wait(30), "the verification CONNECT reached the gateway"
        assert hub.proc.poll() is None, "the verification connect was still waiting"
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
    return original, before


def _finish(
    cloud: LocalIotCore,
    iot: Any,
    config_path: Path,
    shim_dir: Path,
    point: KillPoint,
    proxy: TcpProxy,
    original: dict[str, Any],
    before: set[str],
    token: SoftHsmToken | None = None,
) -> str:
    """Run the hub again after the cut: it finishes as `point` says; returns its certificate id."""
    connections = proxy.connections
    second = run_hub(config_path, shim_dir=shim_dir, json_steps=True)
    assert second.returncode == 0, second.stderr
    assert "Traceback" not in second.stderr
    for step in point.resumed_steps:
        assert step in second.steps, f"{step} expected in the second run: {second.steps}"
    for step in point.resumed_never:
        assert step not in second.steps, f"{step} repeated in the second run: {second.steps}"
    if point.no_network:
        assert proxy.connections == connections, "the second run connected to nothing"
    cert_id = assert_recovered(cloud, iot, config_path, original, token=token)
    new = certificate_ids(iot) - before
    assert len(new) == point.certificates, f"new certificates: {len(new)}"
    assert cert_id in new
    for orphan in new - {cert_id}:
        status = iot.describe_certificate(certificateId=orphan)["certificateDescription"]["status"]
        assert status != "ACTIVE", "a certificate the hub never stored is never activated"
    return cert_id


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("point", KILL_POINTS, ids=[p.name for p in KILL_POINTS])
def test_power_cut_at_every_step(
    cloud: LocalIotCore,
    iot: Any,
    make_cloud_hub: CloudHubFactory,
    tcp_proxy: Callable[..., TcpProxy],
    shim_dir: Path,
    point: KillPoint,
    method: str,
) -> None:
    proxy = tcp_proxy()  # counts every connection the hub opens
    config_path = make_cloud_hub(certificate_method=method, endpoint_url=proxy.address)
    original, before = _cut(cloud, iot, config_path, shim_dir, point)
    _finish(cloud, iot, config_path, shim_dir, point, proxy, original, before)
    KILLS.append(f"{point.name}/{method}")


OUTSIDE_STEPS = [
    S.CLAIM_CONNECTED,
    S.CERTIFICATE_ISSUED,
    S.CREDENTIALS_STORED,
    S.THING_REGISTERED,
    S.VERIFIED,
    S.RECORDED,
]
# Once the credentials and the token are saved, a kill costs no new certificate (unless the token was spent).
_TOKEN_SAVED = {S.CREDENTIALS_STORED, S.THING_REGISTERED, S.VERIFIED, S.RECORDED}


@pytest.mark.parametrize("step", OUTSIDE_STEPS)
def test_power_cut_from_outside_on_step_events(
    cloud: LocalIotCore, iot: Any, make_cloud_hub: CloudHubFactory, step: S
) -> None:
    """No shim: SIGKILL as soon as the step shows on stderr, wherever the child has got to by then."""
    config_path = make_cloud_hub(certificate_method="CreateKeysAndCertificate")
    original = _with_unknown_keys(config_path)
    before = certificate_ids(iot)
    hub = HubProcess(config_path, json_steps=True)
    hub.wait_for_step(step)
    killed = hub.kill()
    assert killed.returncode in (-signal.SIGKILL, 0)
    read_config(config_path)  # parses at every moment
    second = run_hub(config_path, json_steps=True)
    assert second.returncode == 0, second.stderr
    new = certificate_ids(iot) - before
    # The one race a cut from outside can hit: the service accepted RegisterThing (token spent) and the
    # kill landed before the hub recorded the answer. The hub then starts over, once, and says why.
    spent = S.TOKEN_REFUSED in second.steps
    cert_id = assert_recovered(cloud, iot, config_path, original, token_spent_before_cut=new if spent else ())
    assert cert_id in new
    assert len(new) <= 2
    if step in _TOKEN_SAVED:
        # The token was saved before the step was reported: no new certificate, unless it was spent.
        assert len(new) == (2 if spent else 1)
        assert spent or S.CERTIFICATE_ISSUED not in second.steps
    KILLS.append(f"outside:{step}")


def test_power_cut_in_the_middle_of_a_config_write(
    cloud: LocalIotCore, iot: Any, make_cloud_hub: CloudHubFactory
) -> None:
    """No shim: watch the config folder and SIGKILL the moment a temp file of an atomic write appears.

    The kill has landed mid-write when that temp file is still there afterwards (written, never renamed).
    """
    hits = 0
    for attempt in range(4):
        config_path = make_cloud_hub(certificate_method="CreateCertificateFromCsr")
        original = _with_unknown_keys(config_path)
        config_bytes = config_path.read_bytes()
        folder = config_path.parent
        hub = HubProcess(config_path, verbosity="")
        # Watching another process's files: nothing signals a temp file's creation (no inotify in the
        # standard library), so this loop polls the folder, without pause so as to catch the short window,
        # until the temp file shows, the child ends, or the deadline passes.
        deadline = time.monotonic() + 30
        temp: str | None = None
        while temp is None and hub.proc.poll() is None and time.monotonic() < deadline:
            temp = next((n for n in os.listdir(folder) if n.startswith(".iotmi_config.json.")), None)
        if temp is not None:
            os.kill(hub.proc.pid, signal.SIGKILL)
        hub.finish(10)
        if temp is not None and (folder / temp).exists():
            hits += 1
            # The config is a whole document as of some write before the interrupted one: the poll may
            # have caught the first of the run's writes (then it is the original, byte for byte) or a
            # later one (then only rw has moved on); never a half-written file.
            now = config_path.read_bytes()
            if now != config_bytes:
                before_doc, now_doc = json.loads(config_bytes), json.loads(now)
                assert {k: v for k, v in now_doc.items() if k != "rw"} == {
                    k: v for k, v in before_doc.items() if k != "rw"
                }
                assert isinstance(now_doc["rw"], dict)
        read_config(config_path)
        second = run_hub(config_path)
        assert second.returncode == 0, second.stderr
        assert_recovered(cloud, iot, config_path, original)
        if hits and attempt >= 1:
            break
    assert hits >= 1, "the kill never landed between a temp file's creation and its rename"
    KILLS.extend(["outside:mid-config-write"] * hits)


def test_two_cuts_in_a_row_then_success(
    cloud: LocalIotCore, iot: Any, make_cloud_hub: CloudHubFactory, shim_dir: Path
) -> None:
    """Cut after the credentials, cut again after RegisterThing, then finish: still one certificate."""
    config_path = make_cloud_hub(certificate_method="CreateKeysAndCertificate")
    original = _with_unknown_keys(config_path)
    before = certificate_ids(iot)
    for step in (S.CREDENTIALS_STORED, S.THING_REGISTERED):
        hub = HubProcess(config_path, shim_dir=shim_dir, freeze=freeze_at_step(step))
        hub.wait_frozen()
        hub.kill()
    second = run_hub(config_path, json_steps=True)
    assert second.returncode == 0, second.stderr
    assert S.RESUMED_AFTER_THING_REGISTERED in second.steps
    cert_id = assert_recovered(cloud, iot, config_path, original)
    assert certificate_ids(iot) - before == {cert_id}
    KILLS.extend(["double-1", "double-2"])


CSR, CREATE_KEYS = "CreateCertificateFromCsr", "CreateKeysAndCertificate"
# With the permanent key in a PKCS#11 token: (method, kill point). Every kill point of the file test but
# the key file's write (there is no key file), for both methods, and the token's own: the key is made in
# the token before the CSR is sent (a cut there costs nothing: the next run reuses the pair), or imported
# after CreateKeysAndCertificate (a cut there leaves the key under the hub's label; the next run replaces
# it); the certificate, the one file, half-written.
_MID_CERT_WRITE = _mid_write(".certificate.pem.crt.")
TOKEN_CASES = [
    *[
        (method, point)
        for point in KILL_POINTS
        if point.name != "middle of the key write"
        for method in METHODS
    ],
    (CSR, KillPoint("key pair made in the token", freeze_at_step(S.KEY_IN_TOKEN), 1)),
    (CSR, KillPoint("middle of the certificate write", _MID_CERT_WRITE, 2)),
    (CREATE_KEYS, KillPoint("key imported into the token", freeze_at_step(S.KEY_IN_TOKEN), 2)),
    (CREATE_KEYS, KillPoint("middle of the certificate write", _MID_CERT_WRITE, 2)),
]
# Cuts before the progress record is first saved: there is no record yet.
_BEFORE_RECORD = {
    "claim connected",
    "certificate issued",
    "key pair made in the token",
    "key imported into the token",
    "middle of the certificate write",
}
# Cuts before any key is in the token (with CreateKeysAndCertificate the service's key is imported only
# after the certificate is issued).
_NO_KEY_YET = {
    (CSR, "claim connected"),
    (CREATE_KEYS, "claim connected"),
    (CREATE_KEYS, "certificate issued"),
}
# The one kind of key the next run must not reuse: the service's key, imported, whose certificate was never
# recorded (that certificate is lost with it; a new CreateKeysAndCertificate brings another key). Any other
# key left is reused: a whole pair made in the token, or the recorded one.
_KEY_REPLACED = {
    (CREATE_KEYS, "key imported into the token"),
    (CREATE_KEYS, "middle of the certificate write"),
}


@pytest.mark.parametrize(("method", "point"), TOKEN_CASES, ids=[f"{p.name}/{m}" for m, p in TOKEN_CASES])
def test_power_cut_at_every_step_with_the_key_in_a_token(
    cloud: LocalIotCore,
    iot: Any,
    make_cloud_hub: CloudHubFactory,
    tcp_proxy: Callable[..., TcpProxy],
    shim_dir: Path,
    softhsm: SoftHsmToken,
    method: str,
    point: KillPoint,
) -> None:
    """The same cuts, the claim and permanent keys in a SoftHSM2 token: the record names the key's URI,
    a pair left by the cut is reused or replaced, never two keys under the hub's label."""
    proxy = tcp_proxy()
    config_path = make_cloud_hub(
        certificate_method=method, endpoint_url=proxy.address, token=softhsm.config()
    )
    original, before = _cut(cloud, iot, config_path, shim_dir, point)
    serial = original["ro"]["SN"]
    label = f"hub-onboarding-{serial}"
    record = config_path.parent / "certs" / "onboarding-progress.json"
    assert record.exists() == (point.name not in _BEFORE_RECORD)
    if record.exists():
        saved = json.loads(record.read_text())
        assert saved["private_key_path"] == f"pkcs11:token={softhsm.label};object={label};type=private", (
            "the record names the token object"
        )
    left = probe_token_key(softhsm, label)  # at most one key under the label, even mid-way
    assert (left is None) == ((method, point.name) in _NO_KEY_YET)

    _finish(cloud, iot, config_path, shim_dir, point, proxy, original, before, token=softhsm)
    if left is not None:
        cert_pem = Path(read_config(config_path)["rw"]["iot_permanent_cert_path"]).read_bytes()
        replaced = (method, point.name) in _KEY_REPLACED
        assert left.signed_for(cert_pem) != replaced, (
            "the key left by the cut was replaced" if replaced else "the key left by the cut was reused"
        )
    KILLS.append(f"token:{point.name}/{method}")
