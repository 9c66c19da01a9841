"""Bad input: a table of cases driven through the command line (`hub_onboarding.cli.main`), each giving a
clear message naming the problem, its documented exit code (errors.py), no traceback, and no write.

The hub folder (config, claim credentials, everything under it: names, bytes, permission bits, link
targets) is snapshotted before and after each case and must be identical. Tests run as root in CI, where
permission bits do not stop reads or writes: the unreadable config, the read-only folder and the full disk
are simulated by making the file-system call raise the errno the kernel would give (EACCES, EROFS,
ENOSPC), in addition to setting the real permission bits (which a non-root run then honours).

docs/reliability.md points at this table.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hub_onboarding.cli import main
from hub_onboarding.lock import onboarding_lock
from iot_core_local.server import LocalIotCore
from tests._support.certificates import certificate_ids, make_pair, write_private
from tests._support.hubs import CloudHubFactory, read_config, snapshot
from tests._support.processes import HubProcess, run_hub
from tests._support.recovery import assert_recovered

# No test here changes the claim or its template in the cloud: one claim serves the module.
pytestmark = [pytest.mark.e2e, pytest.mark.shared_claim]


class BadHub:
    """A factory-fresh fleet-provisioning hub, and ways to break it."""

    def __init__(self, config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.config = config
        self.dir = config.parent
        self.doc = read_config(config)
        self.claim_cert = Path(self.doc["ro"]["iot_claim_cert_path"])
        self.claim_key = Path(self.doc["ro"]["iot_claim_pk_path"])
        self.monkeypatch = monkeypatch
        self.argv: list[str] | None = None

    def ro(self, **changes: Any) -> None:
        doc = read_config(self.config)
        for key, value in changes.items():
            if value is DELETE:
                doc["ro"].pop(key, None)
            else:
                doc["ro"][key] = value
        self.config.write_text(json.dumps(doc, indent=2))

    def raw(self, data: bytes) -> None:
        self.config.write_bytes(data)

    def replace_file(self, path: Path, data: bytes, mode: int = 0o600) -> None:
        path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(path, mode)

    def claim_pair(self, cert_pem: bytes, key_pem: bytes) -> None:
        self.replace_file(self.claim_cert, cert_pem, 0o644)
        self.replace_file(self.claim_key, key_pem)

    def folder_instead_of(self, path: Path) -> None:
        path.unlink()
        path.mkdir(mode=0o700)

    def fail_os_call(self, name: str, err: int, matches: Callable[[Any], bool]) -> None:
        """Make os.<name> raise OSError(err) for arguments `matches` accepts (everything else unchanged)."""
        real = getattr(os, name)

        def fake(*args: Any, **kwargs: Any) -> Any:
            if matches(args[0]):
                raise OSError(err, os.strerror(err))
            return real(*args, **kwargs)

        self.monkeypatch.setattr(os, name, fake)


DELETE = object()
Setup = Callable[[BadHub], None]


@dataclass(frozen=True)
class Case:
    name: str
    setup: Setup
    exit_code: int
    message: str
    key: str | None = None  # the config setting the --json error names, when the case checks it


def _expired(hub: BadHub) -> None:
    pair = make_pair("claim", days_valid=10, starts_in_days=-20)
    hub.claim_pair(pair.cert_pem, pair.key_pem)


def _not_yet_valid(hub: BadHub) -> None:
    pair = make_pair("claim", days_valid=10, starts_in_days=5)
    hub.claim_pair(pair.cert_pem, pair.key_pem)


def _mismatched(hub: BadHub) -> None:
    hub.replace_file(hub.claim_key, make_pair("other").key_pem)


def _encrypted(hub: BadHub) -> None:
    pair = make_pair("claim", password=b"secret-passphrase")
    hub.claim_pair(pair.cert_pem, pair.key_pem)


def _symlinked_key(hub: BadHub) -> None:
    real = hub.claim_key.with_name("real.pem.key")
    os.rename(hub.claim_key, real)
    os.symlink(real, hub.claim_key)


def _fifo_cert(hub: BadHub) -> None:
    hub.claim_cert.unlink()
    os.mkfifo(hub.claim_cert)


def _unreadable_config(hub: BadHub) -> None:
    os.chmod(hub.config, 0)  # honoured when not root
    # As root, the open itself is made to fail the way it fails for anyone else: EACCES.
    hub.fail_os_call("open", errno.EACCES, lambda p: _same(p, hub.config))


def _read_only_folder(hub: BadHub) -> None:
    os.chmod(hub.dir, 0o500)  # honoured when not root
    # As root, the kernel would still refuse a read-only mount: EROFS on any create in the folder.
    hub.fail_os_call("open", errno.EROFS, lambda p: _inside(p, hub.dir) and not Path(p).exists())
    hub.fail_os_call("mkdir", errno.EROFS, lambda p: _inside(p, hub.dir))


def _read_only_credentials_folder(err: int) -> Setup:
    """The credentials folder exists but takes no new file: EROFS (read-only mount) or EACCES."""

    def setup(hub: BadHub) -> None:
        certs = hub.dir / "certs"
        certs.mkdir(mode=0o700)
        hub.fail_os_call("open", err, lambda p: _inside(p, certs) and not Path(p).exists())

    return setup


def _fifo_config(hub: BadHub) -> None:
    fifo = hub.dir / "fifo.json"
    os.mkfifo(fifo)
    hub.argv = ["provision", "--config", str(fifo)]


def _claim_at_permanent(key: str, name: str) -> Setup:
    """The factory put a claim file where onboarding writes its own (certs/...) and named it there."""

    def setup(hub: BadHub) -> None:
        certs = hub.dir / "certs"
        certs.mkdir(mode=0o700)
        source = hub.claim_key if key == "iot_claim_pk_path" else hub.claim_cert
        write_private(certs / name, source.read_bytes())
        hub.ro(**{key: f"certs/{name}"})

    return setup


def _planted_lock_symlink(hub: BadHub) -> None:
    (hub.dir / "iotmi_config.json.lock").symlink_to(hub.dir / "victim")


def _same(path: Any, other: Path) -> bool:
    with contextlib.suppress(TypeError, ValueError):
        return Path(os.fsdecode(path)).absolute() == other.absolute()
    return False


def _inside(path: Any, folder: Path) -> bool:
    with contextlib.suppress(TypeError, ValueError):
        return Path(os.fsdecode(path)).absolute().is_relative_to(folder.absolute())
    return False


def _argv(*argv: str) -> Setup:
    def setup(hub: BadHub) -> None:
        hub.argv = [a.replace("{config}", str(hub.config)).replace("{dir}", str(hub.dir)) for a in argv]

    return setup


def _ro(**changes: Any) -> Setup:
    return lambda hub: hub.ro(**changes)


def _raw(data: bytes) -> Setup:
    return lambda hub: hub.raw(data)


PEM_CA = "-----BEGIN CERTIFICATE-----"
CASES = [
    # the config file itself (exit 3)
    Case("config missing", _argv("provision", "--config", "{config}.missing"), 3, "does not exist"),
    Case("config empty", _raw(b""), 3, "is empty"),
    Case("config only whitespace", _raw(b" \n\t\n"), 3, "is empty"),
    Case("config not JSON", _raw(b"{ro: nope"), 3, "is not valid JSON (line 1"),
    Case("config truncated JSON", _raw(b'{"ro": {"SN": "x"'), 3, "is not valid JSON"),
    Case("config not UTF-8", _raw(b'\xff\xfe{"ro": {}}'), 3, "is not UTF-8"),
    Case("config unreadable (EACCES)", _unreadable_config, 3, "is not readable by this user"),
    Case("config is a folder", _argv("provision", "--config", "{dir}"), 3, "is a folder"),
    Case("config a JSON array", _raw(b"[1, 2]"), 3, "must hold a JSON object"),
    Case("ro missing", _raw(b'{"rw": {}}'), 3, "ro: missing or not an object"),
    Case("ro a string", _raw(b'{"ro": "x"}'), 3, "ro: missing or not an object"),
    Case(
        "rw a list",
        lambda h: h.raw(json.dumps({"ro": h.doc["ro"], "rw": []}).encode()),
        3,
        "rw: must be an object",
    ),
    Case(
        "rw state unknown",
        lambda h: h.raw(json.dumps({"ro": h.doc["ro"], "rw": {"iot_provisioning_state": "MAYBE"}}).encode()),
        3,
        "rw.iot_provisioning_state: expected NOT_PROVISIONED or PROVISIONED",
    ),
    # wrong types and values (exit 3, naming the key)
    Case("SN a number", _ro(SN=12345), 3, "ro.SN: expected a string, got int"),
    Case("UPC a list", _ro(UPC=["0123"]), 3, "ro.UPC: expected a string, got list"),
    Case(
        "retry timeout a string",
        _ro(mqtt_retry_timeout_seconds="10"),
        3,
        "ro.mqtt_retry_timeout_seconds: expected a number",
    ),
    Case(
        "retry timeout a bool",
        _ro(mqtt_retry_timeout_seconds=True),
        3,
        "ro.mqtt_retry_timeout_seconds: expected a number",
    ),
    Case(
        "retry timeout negative",
        _ro(mqtt_retry_timeout_seconds=-1),
        3,
        "ro.mqtt_retry_timeout_seconds: expected seconds",
    ),
    Case(
        "keep-alive out of range",
        _ro(mqtt_keep_alive_interval=5),
        3,
        "ro.mqtt_keep_alive_interval: expected whole seconds from 30 to 1200",
    ),
    Case(
        "template parameters a list",
        _ro(fp_template_parameters=["a"]),
        3,
        "ro.fp_template_parameters: expected an object",
    ),
    Case(
        "template parameter not a string",
        _ro(fp_template_parameters={"Room": 3}),
        3,
        "ro.fp_template_parameters: value of 'Room' must be a string",
    ),
    Case(
        "template parameters override SN",
        _ro(fp_template_parameters={"SerialNumber": "x"}),
        3,
        "is set from ro.SN / ro.UPC",
    ),
    Case(
        "config is a FIFO",
        _fifo_config,
        3,
        "config path {dir}/fifo.json is a FIFO (named pipe), not a regular file",
    ),
    # method (exit 3)
    Case(
        "unknown provisioning method (falls back to JITR)",
        _ro(iot_provisioning_method="FLEET"),
        3,
        "ro.iot_dha_cert_path: missing; JITR needs",
        key="ro.iot_dha_cert_path",
    ),
    Case(
        "provisioning method typo",
        _ro(iot_provisioning_method="FLEET_PROVISIONNING"),
        3,
        "(JITR was assumed because ro.iot_provisioning_method is 'FLEET_PROVISIONNING', not a valid "
        "method; did you mean 'FLEET_PROVISIONING'?)",
        key="ro.iot_dha_cert_path",
    ),
    # read paths that are files onboarding writes (exit 3, naming both keys)
    Case(
        "claim certificate path is the permanent certificate",
        _claim_at_permanent("iot_claim_cert_path", "certificate.pem.crt"),
        3,
        "ro.iot_claim_cert_path and ro.iot_permanent_cert_dir (default: certs beside the config) name "
        "the same file {dir}/certs/certificate.pem.crt",
        key="ro.iot_claim_cert_path",
    ),
    Case(
        "claim key path is the permanent key",
        _claim_at_permanent("iot_claim_pk_path", "private.pem.key"),
        3,
        "ro.iot_claim_pk_path and ro.iot_permanent_cert_dir (default: certs beside the config) name "
        "the same file {dir}/certs/private.pem.key",
        key="ro.iot_claim_pk_path",
    ),
    Case(
        "unknown certificate method",
        _ro(fp_certificate_method="CreateKeys"),
        3,
        "ro.fp_certificate_method: expected CreateKeysAndCertificate or CreateCertificateFromCsr",
    ),
    # missing values (exit 3)
    Case("SN missing", _ro(SN=DELETE), 3, "ro.SN: missing; fleet provisioning needs it"),
    Case("SN empty", _ro(SN="  "), 3, "ro.SN: is empty"),
    Case("SN too long", _ro(SN="S" * 129), 3, "ro.SN: longer than 128 characters"),
    Case("UPC missing", _ro(UPC=DELETE), 3, "ro.UPC: missing"),
    Case("template name missing", _ro(fp_template_name=DELETE), 3, "ro.fp_template_name: missing"),
    Case(
        "template name invalid",
        _ro(fp_template_name="my template!"),
        3,
        "ro.fp_template_name: must be 1 to 36 characters",
    ),
    Case("endpoint missing", _ro(endpoint_url=DELETE), 3, "ro.endpoint_url: missing"),
    Case(
        "endpoint with a scheme",
        _ro(endpoint_url="mqtts://iot.example.com"),
        3,
        "ro.endpoint_url: expected a host name or host:port without scheme or path",
    ),
    Case(
        "endpoint port not a number",
        _ro(endpoint_url="iot.example.com:88x"),
        3,
        "ro.endpoint_url: port must be a number from 1 to 65535",
    ),
    Case(
        "claim certificate path missing",
        _ro(iot_claim_cert_path=DELETE),
        3,
        "ro.iot_claim_cert_path: missing",
    ),
    Case("claim key path a number", _ro(iot_claim_pk_path=7), 3, "ro.iot_claim_pk_path: expected a string"),
    Case(
        "root CA file missing",
        _ro(iot_root_ca_path="/nonexistent/AmazonRootCA1.pem"),
        3,
        "ro.iot_root_ca_path: /nonexistent/AmazonRootCA1.pem does not exist",
    ),
    Case(
        "root CA not a PEM certificate",
        lambda h: h.ro(iot_root_ca_path=str(h.claim_key)),
        3,
        "holds no PEM certificate",
    ),
    Case(
        "credentials folder is a file",
        lambda h: h.ro(iot_permanent_cert_dir=str(h.claim_cert)),
        3,
        "ro.iot_permanent_cert_dir",
    ),
    Case(
        "SECURE_STORAGE with no handler installed",
        _ro(iot_claim_cert_path="SECURE_STORAGE", iot_claim_pk_path="SECURE_STORAGE"),
        3,
        "ro.secure_storage_handler",
    ),
    # credentials (exit 4, naming the file and the config key)
    Case(
        "claim certificate file missing",
        lambda h: h.claim_cert.unlink(),
        4,
        "claim certificate: {claim_cert} does not exist",
    ),
    Case(
        "claim key file missing",
        lambda h: h.claim_key.unlink(),
        4,
        "claim private key: {claim_key} does not exist",
    ),
    Case("claim certificate and key do not match", _mismatched, 4, "does not belong to the certificate"),
    Case("claim certificate expired", _expired, 4, "claim certificate expired on"),
    Case("claim certificate not yet valid", _not_yet_valid, 4, "not valid yet"),
    Case("claim key encrypted", _encrypted, 4, "the key is encrypted"),
    Case(
        "claim key readable by others",
        lambda h: os.chmod(h.claim_key, 0o644),
        4,
        "has mode 0644, readable or writable by other users; run 'chmod 600 {claim_key}' (0600 or "
        "narrower is accepted) (from ro.iot_claim_pk_path)",
        key="ro.iot_claim_pk_path",
    ),
    Case("claim key group-writable", lambda h: os.chmod(h.claim_key, 0o620), 4, "has mode 0620"),
    Case(
        "claim key is a folder", lambda h: h.folder_instead_of(h.claim_key), 4, "is a folder, not a PEM file"
    ),
    Case("claim certificate is a folder", lambda h: h.folder_instead_of(h.claim_cert), 4, "is a folder"),
    Case("claim certificate is a FIFO", _fifo_cert, 4, "is not a regular file"),
    Case("claim key is a symlink", _symlinked_key, 4, "is a symbolic link"),
    Case(
        "claim certificate garbage",
        lambda h: h.replace_file(h.claim_cert, b"hello", 0o644),
        4,
        "not a PEM X.509 certificate",
    ),
    Case(
        "claim key garbage",
        lambda h: h.replace_file(h.claim_key, b"-----BEGIN PRIVATE KEY-----\nAAAA\n"),
        4,
        "not a PEM private key",
    ),
    Case(
        "claim key huge", lambda h: h.replace_file(h.claim_key, b"A" * 200_000), 4, "too large for a PEM file"
    ),
    Case(
        "claim certificate is the CA of another chain",
        lambda h: h.replace_file(h.claim_cert, Path(h.doc["ro"]["iot_root_ca_path"]).read_bytes(), 0o644),
        4,
        "does not belong to the certificate",
    ),
    # storage (exit 5)
    Case(
        "read-only config folder (EROFS)",
        _read_only_folder,
        5,
        "cannot be written: Read-only file system; onboarding stores its results there, so it stopped "
        "before contacting the cloud (no certificate was created)",
    ),
    Case(
        "read-only credentials folder (EROFS)",
        _read_only_credentials_folder(errno.EROFS),
        5,
        "the credentials folder {dir}/certs (set by ro.iot_permanent_cert_dir) cannot be written: "
        "Read-only file system; onboarding stores its results there, so it stopped before contacting "
        "the cloud (no certificate was created)",
        key="ro.iot_permanent_cert_dir",
    ),
    Case(
        "credentials folder not writable (EACCES)",
        _read_only_credentials_folder(errno.EACCES),
        5,
        "the credentials folder {dir}/certs (set by ro.iot_permanent_cert_dir) cannot be written: "
        "Permission denied",
        key="ro.iot_permanent_cert_dir",
    ),
    Case(
        "lock file a planted symlink",
        _planted_lock_symlink,
        5,
        "the lock file {dir}/iotmi_config.json.lock is a symbolic link (to {dir}/victim); onboarding "
        "does not follow it",
    ),
    # command line (exit 2)
    Case("no --config", _argv("provision"), 2, "--config"),
    Case("unknown command", _argv("onboard", "--config", "{config}"), 2, "invalid choice"),
    Case("reset without --yes", _argv("reset", "--config", "{config}"), 2, "run again with --yes"),
    Case(
        "lock wait not a number",
        _argv("provision", "--config", "{config}", "--lock-wait", "soon"),
        2,
        "argument --lock-wait: not a number of seconds: 'soon'",
    ),
]

TRIED: list[str] = []


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(
    case: Case,
    iot: Any,
    make_cloud_hub: CloudHubFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = make_cloud_hub()
    hub = BadHub(config, monkeypatch)
    certificates = certificate_ids(iot)
    try:
        case.setup(hub)
        before = snapshot(hub.dir)
        code = main(hub.argv or ["provision", "--config", str(config)])
        out = capsys.readouterr()
        monkeypatch.undo()
        after = snapshot(hub.dir)
    finally:
        monkeypatch.undo()
        os.chmod(hub.dir, 0o755)
    message = case.message.format(claim_cert=hub.claim_cert, claim_key=hub.claim_key, dir=hub.dir)
    assert code == case.exit_code, out.err
    assert message in out.err, out.err
    assert "Traceback" not in out.err + out.out
    if code != 2:
        assert out.err.rstrip().splitlines()[-1].startswith("hub-onboard: error: "), "one clear last line"
    assert after == before, "a bad input writes nothing"
    assert certificate_ids(iot) == certificates, "a bad input mints no certificate"
    TRIED.append(case.name)


@pytest.mark.parametrize(
    "case",
    [
        c
        for c in CASES
        if c.name
        in (
            "config missing",
            "config not JSON",
            "SN missing",
            "claim certificate and key do not match",
            "claim key readable by others",
            "claim key is a symlink",
            "claim certificate expired",
            "config is a FIFO",
            "provisioning method typo",
            "claim certificate path is the permanent certificate",
            "claim key path is the permanent key",
            "lock file a planted symlink",
        )
    ],
    ids=lambda c: c.name,
)
def test_bad_input_in_a_real_process(
    case: Case, iot: Any, make_cloud_hub: CloudHubFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same cases through a real `hub-onboard` process, with --json: the error is machine-readable too."""
    config = make_cloud_hub()
    hub = BadHub(config, monkeypatch)
    case.setup(hub)
    before = snapshot(hub.dir)
    certificates = certificate_ids(iot)
    argv = (hub.argv or ["provision", "--config", str(config)])[1:]
    # A hang (the FIFO config did hang) ends in run_hub's timeout, as a failure.
    done = run_hub(Path(argv[1]), *argv[2:], "--json", verbosity="")
    assert done.returncode == case.exit_code, done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["exit_code"] == case.exit_code
    message = case.message.format(claim_cert=hub.claim_cert, claim_key=hub.claim_key, dir=hub.dir)
    assert message in error["message"]
    if case.key is not None:
        assert error["key"] == case.key
    assert "Traceback" not in done.stderr
    assert snapshot(hub.dir) == before
    assert certificate_ids(iot) == certificates
    TRIED.append(f"process:{case.name}")


# ------------------------------------------------------------------------------ full disk


def _full_disk(hub: BadHub, temp_prefix: str, nth: int = 1) -> None:
    """ENOSPC on the fsync of an atomic write's temp file in the hub folder (where a full disk shows),
    from the `nth` such write on (the earlier ones find room)."""
    real = os.fsync
    seen = 0

    def fsync(fd: int) -> None:
        nonlocal seen
        name = os.readlink(f"/proc/self/fd/{fd}")
        if _inside(name, hub.dir) and Path(name).name.startswith(temp_prefix):
            seen += 1
            if seen >= nth:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    hub.monkeypatch.setattr(os, "fsync", fsync)


def test_full_disk_writing_the_credentials(
    iot: Any,
    make_cloud_hub: CloudHubFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = make_cloud_hub()
    hub = BadHub(config, monkeypatch)
    before = snapshot(hub.dir)
    _full_disk(hub, ".private.pem.key.")
    code = main(["provision", "--config", str(config)])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 5, err  # StorageError
    assert "No space left on device; nothing was left half-written" in err
    assert "Traceback" not in err
    after = snapshot(hub.dir)
    # What remains: the lock file (never deleted, empty) and the empty 0700 credentials folder.
    assert after.pop("iotmi_config.json.lock") == ("file", 0o600, b"")
    assert after.pop("certs") == ("dir", 0o700, b"")
    # and the record of the files it was about to write (written first, so reset knows them)
    assert after.pop("certs/onboarding-files.json")[1] == 0o600
    assert after == before
    TRIED.append("full disk writing the credentials")


def test_full_disk_writing_the_config_then_space_comes_back(
    cloud: LocalIotCore,
    iot: Any,
    make_cloud_hub: CloudHubFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = make_cloud_hub()
    hub = BadHub(config, monkeypatch)
    original = read_config(config)
    config_bytes = config.read_bytes()
    certificates = certificate_ids(iot)
    _full_disk(hub, ".iotmi_config.json.")
    code = main(["provision", "--config", str(config), "-v"])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 5, err
    assert f"could not write {config}: the disk is full; the file was left as it was" in err
    assert config.read_bytes() == config_bytes, "the config is untouched"
    assert not [p for p in hub.dir.iterdir() if p.name.endswith(".tmp")], "no temp file left"
    # Space is back: the next run resumes after the verification and writes the config; no new certificate.
    assert main(["provision", "--config", str(config), "-v"]) == 0
    err = capsys.readouterr().err
    assert "resuming after VERIFIED" in err
    assert "certificate issued" not in err
    cert_id = assert_recovered(cloud, iot, config, original)
    assert certificate_ids(iot) - certificates == {cert_id}
    TRIED.append("full disk writing the config")


def test_full_disk_recording_register_things_answer_then_space_comes_back(
    cloud: LocalIotCore,
    iot: Any,
    make_cloud_hub: CloudHubFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The disk fills just as the hub records RegisterThing's answer (its second progress write): the
    message says the cloud registered the hub, and once there is room the next run finishes with the
    same certificate (the same RegisterThing is answered again)."""
    config = make_cloud_hub(serial="SN-FULL-REGISTER")
    hub = BadHub(config, monkeypatch)
    original = read_config(config)
    certificates = certificate_ids(iot)
    # The first progress write (the issued certificate and its token) finds room; the second does not.
    _full_disk(hub, ".onboarding-progress.json.", nth=2)
    code = main(["provision", "--config", str(config)])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 5, err
    assert "No space left on device; the cloud registered thing hub-SN-FULL-REGISTER with this hub's" in err
    assert "run provision again once there is room, and it finishes with the same certificate" in err
    assert "nothing was left half-written" not in err
    assert main(["provision", "--config", str(config)]) == 0
    cert_id = assert_recovered(cloud, iot, config, original)
    assert certificate_ids(iot) - certificates == {cert_id}
    TRIED.append("full disk recording RegisterThing's answer")


# ------------------------------------------------------------------ real filesystems, real processes


def _in_a_read_only_mount(folder: Path, argv: list[str]) -> list[str]:
    """argv run in a private mount namespace where `folder` is bind-mounted read-only: a real EROFS.

    The mount lives and dies with the child (unshare -m); a user namespace (-r) when not root.
    """
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.fail("unshare (util-linux) is needed for a real read-only mount")
    script = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" "$1" && shift && exec "$@"'
    user_ns = [] if os.geteuid() == 0 else ["-r"]
    return [unshare, "-m", *user_ns, "sh", "-c", script, "sh", str(folder), *argv]


def test_read_only_credentials_folder_in_a_real_process(iot: Any, make_cloud_hub: CloudHubFactory) -> None:
    # The mistake: exit 5 blaming a progress file that does not exist (unlink answers EROFS even for a
    # missing file), after CreateKeysAndCertificate: one orphan certificate per attempt.
    config = make_cloud_hub()
    certs = config.parent / "certs"
    certs.mkdir(mode=0o700)
    before = snapshot(config.parent)
    certificates = certificate_ids(iot)
    argv = [sys.executable, "-m", "hub_onboarding.cli", "provision", "--config", str(config), "--json"]
    # subprocess.run's timeout bounds a hang: the child is another process, with no event to wait on.
    done = subprocess.run(
        _in_a_read_only_mount(certs, argv), capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 5 and "mount" in done.stderr and "hub-onboard" not in done.stderr:
        pytest.fail(f"could not make a read-only mount here: {done.stderr}")
    assert done.returncode == 5, done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["message"].startswith(
        f"the credentials folder {certs} (set by ro.iot_permanent_cert_dir) cannot be written: "
        "Read-only file system; onboarding stores its results there, so it stopped before contacting the "
        "cloud (no certificate was created)"
    )
    assert error["key"] == "ro.iot_permanent_cert_dir"
    assert "progress" not in error["message"]
    assert certificate_ids(iot) == certificates, "no certificate minted"
    assert snapshot(config.parent) == before, "nothing written"
    TRIED.append("process:read-only credentials folder (a real read-only mount)")


def test_waiting_on_the_lock_says_so_at_once_in_a_real_process(
    iot: Any, make_cloud_hub: CloudHubFactory
) -> None:
    # The mistake: a second provision waiting on the lock printed nothing for up to 600 s.
    config = make_cloud_hub()
    certificates = certificate_ids(iot)
    with onboarding_lock(config, timeout=0):  # this test process is the holder: its pid is in the file
        hub = HubProcess(config, "--lock-wait", "30", verbosity="")
        try:
            line = hub.wait_for_line("is onboarding with", timeout=60)
        finally:
            hub.proc.kill()
            hub.finish(60)
    assert f"another hub-onboard (pid {os.getpid()}) is onboarding with {config}" in line
    assert "waiting up to 30 s for it to finish" in line
    assert certificate_ids(iot) == certificates
    TRIED.append("process:lock wait message")


def test_reset_keeps_the_config_named_by_rw_in_a_real_process(
    iot: Any, make_cloud_hub: CloudHubFactory
) -> None:
    # The mistake: reset deleted whatever rw named inside the credentials folder, the config included.
    config = make_cloud_hub()
    config.parent.chmod(0o700)
    doc = read_config(config)
    doc["ro"]["iot_permanent_cert_dir"] = "."
    config.write_text(json.dumps(doc))
    assert run_hub(config, verbosity="").returncode == 0
    doc = read_config(config)
    doc["rw"]["iot_permanent_pk_path"] = str(config)
    config.write_text(json.dumps(doc))
    done = run_hub(config, "--yes", "--json", command="reset", verbosity="")
    assert done.returncode == 0, done.stderr
    deleted = {Path(p).name for p in json.loads(done.stdout)["deleted"]}
    assert deleted == {"certificate.pem.crt", "private.pem.key", "onboarding-files.json"}
    assert read_config(config)["rw"]["iot_provisioning_state"] == "NOT_PROVISIONED"
    assert Path(read_config(config)["ro"]["iot_claim_pk_path"]).exists()
    TRIED.append("process:reset with rw naming the config")
