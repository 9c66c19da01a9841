"""Config parsing, validation (a table of bad configs), atomic writes, the lock."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from hub_onboarding import config as cfg
from hub_onboarding.errors import ConfigError, StorageError
from tests._support.hubs import HubFactory

# (id, changes to ro, keys dropped from ro, the key the error must name)
BAD_RO: list[tuple[str, dict[str, Any], tuple[str, ...], str]] = [
    ("no endpoint", {}, ("endpoint_url",), "ro.endpoint_url"),
    ("endpoint not a string", {"endpoint_url": 42}, (), "ro.endpoint_url"),
    ("endpoint empty", {"endpoint_url": " "}, (), "ro.endpoint_url"),
    ("endpoint with scheme", {"endpoint_url": "mqtts://iot.example.com"}, (), "ro.endpoint_url"),
    ("endpoint with path", {"endpoint_url": "iot.example.com/mqtt"}, (), "ro.endpoint_url"),
    ("endpoint port not a number", {"endpoint_url": "iot.example.com:abc"}, (), "ro.endpoint_url"),
    ("endpoint port zero", {"endpoint_url": "iot.example.com:0"}, (), "ro.endpoint_url"),
    ("endpoint port too big", {"endpoint_url": "iot.example.com:70000"}, (), "ro.endpoint_url"),
    ("endpoint empty host", {"endpoint_url": ":8883"}, (), "ro.endpoint_url"),
    ("bare ipv6", {"endpoint_url": "::1:8883"}, (), "ro.endpoint_url"),
    ("sh_endpoint_url bad", {"sh_endpoint_url": "a b"}, ("endpoint_url",), "ro.sh_endpoint_url"),
    ("SN missing", {}, ("SN",), "ro.SN"),
    ("SN empty", {"SN": ""}, (), "ro.SN"),
    ("SN not a string", {"SN": 12345}, (), "ro.SN"),
    ("SN too long", {"SN": "x" * 129}, (), "ro.SN"),
    ("UPC missing", {}, ("UPC",), "ro.UPC"),
    ("UPC list", {"UPC": ["1"]}, (), "ro.UPC"),
    ("template missing", {}, ("fp_template_name",), "ro.fp_template_name"),
    ("template bad characters", {"fp_template_name": "my template!"}, (), "ro.fp_template_name"),
    ("template too long", {"fp_template_name": "t" * 37}, (), "ro.fp_template_name"),
    ("claim cert missing", {}, ("iot_claim_cert_path",), "ro.iot_claim_cert_path"),
    ("claim key not a string", {"iot_claim_pk_path": True}, (), "ro.iot_claim_pk_path"),
    ("half secure storage", {"iot_claim_pk_path": "SECURE_STORAGE"}, (), "ro.iot_claim_pk_path"),
    ("unknown certificate method", {"fp_certificate_method": "MakeMeACert"}, (), "ro.fp_certificate_method"),
    ("template parameters not an object", {"fp_template_parameters": "a=b"}, (), "ro.fp_template_parameters"),
    (
        "template parameter not a string",
        {"fp_template_parameters": {"Room": 3}},
        (),
        "ro.fp_template_parameters",
    ),
    (
        "template parameter overrides SN",
        {"fp_template_parameters": {"SerialNumber": "x"}},
        (),
        "ro.fp_template_parameters",
    ),
    ("root CA missing file", {"iot_root_ca_path": "/nonexistent/ca.pem"}, (), "ro.iot_root_ca_path"),
    ("root CA is a folder", {"iot_root_ca_path": "/"}, (), "ro.iot_root_ca_path"),
    ("keep alive too short", {"mqtt_keep_alive_interval": 5}, (), "ro.mqtt_keep_alive_interval"),
    ("keep alive too long", {"mqtt_keep_alive_interval": 5000}, (), "ro.mqtt_keep_alive_interval"),
    ("keep alive a bool", {"mqtt_keep_alive_interval": True}, (), "ro.mqtt_keep_alive_interval"),
    ("keep alive fractional", {"mqtt_keep_alive_interval": 60.5}, (), "ro.mqtt_keep_alive_interval"),
    ("retry timeout negative", {"mqtt_retry_timeout_seconds": -1}, (), "ro.mqtt_retry_timeout_seconds"),
    ("retry timeout a string", {"mqtt_retry_timeout_seconds": "300"}, (), "ro.mqtt_retry_timeout_seconds"),
    ("SECURE_STORAGE for the root CA", {"iot_root_ca_path": "SECURE_STORAGE"}, (), "ro.iot_root_ca_path"),
    # JITR's keys are checked where present, even when the method is fleet provisioning
    ("DHA key SECURE_STORAGE under fleet", {"iot_dha_pk_path": "SECURE_STORAGE"}, (), "ro.iot_dha_pk_path"),
    ("client id override too long under fleet", {"client_id": "c" * 200}, (), "ro.client_id"),
]


@pytest.mark.parametrize(("changes", "drop", "key"), [c[1:] for c in BAD_RO], ids=[c[0] for c in BAD_RO])
def test_bad_ro_value_names_the_key(
    make_hub: HubFactory, changes: dict[str, Any], drop: tuple[str, ...], key: str
) -> None:
    hub = make_hub(ro=changes, drop=drop)
    before = hub.config.read_bytes()
    with pytest.raises(ConfigError) as info:
        cfg.parse_config(hub.config)
    assert info.value.key == key
    assert key in info.value.message
    assert info.value.exit_code == 3
    assert hub.config.read_bytes() == before  # validation writes nothing


BAD_JITR: list[tuple[str, dict[str, Any], tuple[str, ...], str]] = [
    ("no DHA cert", {}, ("iot_dha_cert_path",), "ro.iot_dha_cert_path"),
    ("no DHA key", {}, ("iot_dha_pk_path",), "ro.iot_dha_pk_path"),
    ("DHA key SECURE_STORAGE", {"iot_dha_pk_path": "SECURE_STORAGE"}, (), "ro.iot_dha_pk_path"),
    ("client id override too long", {"client_id": "c" * 200}, (), "ro.client_id"),
    # fleet provisioning's keys are checked where present, even when the method is JITR
    ("SN too long under JITR", {"SN": "x" * 129}, (), "ro.SN"),
    ("template bad characters under JITR", {"fp_template_name": "my template!"}, (), "ro.fp_template_name"),
    ("unknown certificate method under JITR", {"fp_certificate_method": "X"}, (), "ro.fp_certificate_method"),
    (
        "verify connection not a bool under JITR",
        {"fp_verify_connection": "no"},
        (),
        "ro.fp_verify_connection",
    ),
]


@pytest.mark.parametrize(("changes", "drop", "key"), [c[1:] for c in BAD_JITR], ids=[c[0] for c in BAD_JITR])
def test_bad_jitr_value_names_the_key(
    make_hub: HubFactory, changes: dict[str, Any], drop: tuple[str, ...], key: str
) -> None:
    hub = make_hub("JITR", ro=changes, drop=drop)
    with pytest.raises(ConfigError) as info:
        cfg.parse_config(hub.config)
    assert info.value.key == key


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"rw": {}}', "ro"),
        ('{"ro": []}', "ro"),
        ('{"ro": {}, "rw": 3}', "rw"),
        ('{"ro": {}, "rw": {"iot_provisioning_state": "HALF_DONE"}}', "rw.iot_provisioning_state"),
    ],
)
def test_bad_file_shape(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "iotmi_config.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        cfg.provisioning_state(cfg.read_document(path))
    assert problem in info.value.message


def test_missing_and_folder_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        cfg.read_document(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="is a folder"):
        cfg.read_document(tmp_path)
    path = tmp_path / "c.json"
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match="UTF-8"):
        cfg.read_document(path)
    if os.geteuid() != 0:  # root reads anything
        path.write_text("{}")
        path.chmod(0)
        with pytest.raises(ConfigError, match="not readable"):
            cfg.read_document(path)


@pytest.mark.parametrize(
    ("value", "host", "port"),
    [
        ("iot.example.com", "iot.example.com", 8883),
        ("iot.example.com:443", "iot.example.com", 443),
        ("127.0.0.1:18883", "127.0.0.1", 18883),
        ("[::1]:9000", "::1", 9000),
        ("[::1]", "::1", 8883),
    ],
)
def test_parse_endpoint(value: str, host: str, port: int) -> None:
    assert cfg.parse_endpoint(value, "ro.endpoint_url") == cfg.Endpoint(host, port)


@pytest.mark.parametrize("key", ["endpoint_url", "iot_endpoint_url", "sh_endpoint_url"])
def test_endpoint_spellings(make_hub: HubFactory, key: str) -> None:
    hub = make_hub(ro={key: "a.example.com:1234"}, drop=("endpoint_url",) if key != "endpoint_url" else ())
    parsed = cfg.parse_config(hub.config)
    assert parsed.connection.endpoint == cfg.Endpoint("a.example.com", 1234)
    assert parsed.connection.endpoint_key == key


@pytest.mark.parametrize("method", [None, "SOMETHING_ELSE", 7])
def test_missing_or_invalid_method_falls_back_to_jitr(
    make_hub: HubFactory, method: Any, caplog: pytest.LogCaptureFixture
) -> None:
    hub = make_hub(
        ro={"iot_provisioning_method": method} if method is not None else {},
        drop=("iot_provisioning_method",) if method is None else (),
    )
    with caplog.at_level(logging.WARNING, logger="hub_onboarding"):
        parsed = cfg.parse_config(hub.config)
    assert parsed.method is cfg.ProvisioningMethod.JITR
    assert any("falling back to JITR" in r.getMessage() for r in caplog.records)
    assert parsed.warnings


def test_defaults(make_hub: HubFactory) -> None:
    hub = make_hub(ro={"fp_template_parameters": {"Room": "kitchen"}})
    parsed = cfg.parse_config(hub.config)
    assert parsed.method is cfg.ProvisioningMethod.FLEET_PROVISIONING
    assert parsed.jitr is None
    assert parsed.fleet is not None
    assert parsed.fleet.certificate_method is cfg.CertificateMethod.CREATE_KEYS_AND_CERTIFICATE
    assert parsed.fleet.verify_connection is True
    assert parsed.connection.keep_alive == 300
    assert parsed.connection.retry_timeout == 300.0
    assert parsed.permanent_cert_dir == hub.dir / "certs"
    assert parsed.fleet.register_parameters() == {
        "SerialNumber": "SN-0001",
        "UniversalProductCode": "012345678905",
        "Room": "kitchen",
    }


def test_jitr_does_not_need_fp_keys(make_hub: HubFactory) -> None:
    hub = make_hub("JITR", drop=("SN", "UPC", "fp_template_name", "iot_claim_cert_path", "iot_claim_pk_path"))
    parsed = cfg.parse_config(hub.config)
    assert parsed.method is cfg.ProvisioningMethod.JITR
    assert parsed.fleet is None
    assert parsed.jitr is not None
    assert parsed.jitr.dha_cert_path == str(hub.dir / "dha.crt")
    assert parsed.jitr.dha_pk_path == str(hub.dir / "dha.key")
    assert parsed.jitr.client_id_override is None


def test_fleet_section(make_hub: HubFactory) -> None:
    hub = make_hub(
        ro={
            "fp_certificate_method": "CreateCertificateFromCsr",
            "fp_verify_connection": False,
            "iot_claim_pk_path": "claim.key",  # relative: taken from the config's folder
            "mqtt_retry_timeout_seconds": 12.5,
        }
    )
    parsed = cfg.parse_config(hub.config)
    assert parsed.fleet == cfg.FleetConfig(
        claim_cert_path=str(hub.dir / "claim.crt"),
        claim_pk_path=str(hub.dir / "claim.key"),
        template_name="HubTemplate",
        serial_number="SN-0001",
        upc="012345678905",
        certificate_method=cfg.CertificateMethod.CREATE_CERTIFICATE_FROM_CSR,
        template_parameters={},
        verify_connection=False,
    )
    assert parsed.connection == cfg.ConnectionConfig(
        endpoint=cfg.Endpoint("iot.example.com", 8883),
        endpoint_key="endpoint_url",
        root_ca_path=str(hub.dir / "ca.pem"),
        keep_alive=300,
        retry_timeout=12.5,
    )
    assert parsed.secure_storage_handler is None
    assert parsed.warnings == ()


def test_jitr_section_with_client_id_override(make_hub: HubFactory) -> None:
    hub = make_hub("JITR", ro={"client_id": "hub-7", "secure_storage_handler": "tpm"})
    parsed = cfg.parse_config(hub.config)
    assert parsed.jitr == cfg.JitrConfig(str(hub.dir / "dha.crt"), str(hub.dir / "dha.key"), "hub-7")
    assert parsed.secure_storage_handler == "tpm"


def test_keep_alive_from_rw(make_hub: HubFactory) -> None:
    hub = make_hub(rw={"mqtt_keep_alive_interval": 60})
    assert cfg.parse_config(hub.config).connection.keep_alive == 60


def test_update_rw_is_atomic_keeps_unknown_keys_and_mode(make_hub: HubFactory) -> None:
    hub = make_hub(
        ro={"vendor_key": {"nested": [1, 2]}}, rw={"other_process": "keep me"}, extra_section={"x": 1}
    )
    hub.config.chmod(0o640)
    cfg.update_rw(hub.config, {"client_id": "abc"}, clock=lambda: 1700000000.7)
    doc = hub.doc()
    assert doc["ro"]["vendor_key"] == {"nested": [1, 2]}
    assert doc["extra_section"] == {"x": 1}
    assert doc["rw"]["other_process"] == "keep me"
    assert doc["rw"]["client_id"] == "abc"
    assert doc["rw"]["metadata"]["last_updated_epoch_time"] == 1700000000
    assert stat.S_IMODE(hub.config.stat().st_mode) == 0o640
    assert [p.name for p in hub.dir.iterdir() if p.name.endswith(".tmp")] == []


def test_failed_write_leaves_the_file_as_it_was(
    make_hub: HubFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = make_hub()
    before = hub.config.read_bytes()

    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", full_disk)
    with pytest.raises(StorageError, match="disk is full"):
        cfg.update_rw(hub.config, {"client_id": "x"})
    assert hub.config.read_bytes() == before
    assert [p.name for p in hub.dir.iterdir() if p.name.endswith(".tmp")] == []


def test_reset_rw_keeps_ro_and_top_level(make_hub: HubFactory) -> None:
    hub = make_hub(rw={"iot_provisioning_state": "PROVISIONED", "client_id": "c", "junk": 1}, other={"a": 1})
    ro_before = hub.doc()["ro"]
    cfg.reset_rw(hub.config, clock=lambda: 5.0)
    doc = hub.doc()
    assert doc["ro"] == ro_before
    assert doc["other"] == {"a": 1}
    assert doc["rw"] == {
        "iot_provisioning_state": "NOT_PROVISIONED",
        "metadata": {"last_updated_epoch_time": 5},
    }


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "1" + "0" * 400])
@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("ro", "mqtt_keep_alive_interval"),
        ("rw", "mqtt_keep_alive_interval"),
        ("ro", "mqtt_retry_timeout_seconds"),
    ],
)
def test_non_finite_numbers_are_config_errors(
    make_hub: HubFactory, capsys: pytest.CaptureFixture[str], literal: str, section: str, key: str
) -> None:
    # Python's json reads NaN, Infinity and 1e400 (inf); they must end in ConfigError (exit 3) naming the
    # key, never in a ValueError/OverflowError traceback.
    from hub_onboarding.cli import main

    hub = make_hub()
    doc = hub.doc()
    doc[section][key] = "@NUMBER@"
    hub.config.write_text(json.dumps(doc).replace('"@NUMBER@"', literal))
    with pytest.raises(ConfigError) as info:
        cfg.parse_config(hub.config)
    assert info.value.key == f"{section}.{key}"
    assert main(["provision", "--config", str(hub.config)]) == 3
    err = capsys.readouterr().err
    assert f"{section}.{key}" in err
    assert "Traceback" not in err


def test_write_through_a_symlinked_config_keeps_the_link(make_hub: HubFactory, tmp_path: Path) -> None:
    hub = make_hub(rw={"other": 1})
    target_dir = tmp_path / "real"
    target_dir.mkdir()
    target = target_dir / "iotmi_config.json"
    hub.config.rename(target)
    hub.config.symlink_to(target)
    target.chmod(0o640)
    cfg.update_rw(hub.config, {"client_id": "c"})
    assert hub.config.is_symlink()
    assert os.readlink(hub.config) == str(target)
    rw = json.loads(target.read_text())["rw"]
    assert rw["client_id"] == "c"
    assert rw["other"] == 1
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert [p.name for p in target_dir.iterdir()] == ["iotmi_config.json"]  # no temp file left anywhere
    assert sorted(p.name for p in hub.dir.iterdir() if p.name.startswith(".")) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_write_keeps_owner_and_group(make_hub: HubFactory) -> None:
    hub = make_hub()
    os.chown(hub.config, 65534, 65534)
    cfg.update_rw(hub.config, {"client_id": "c"})
    st = hub.config.stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    assert cfg.read_document(hub.config)["rw"]["client_id"] == "c"


def test_write_as_another_user_ignores_eperm(make_hub: HubFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = make_hub()
    calls: list[tuple[int, int]] = []

    def fake_fchown(fd: int, uid: int, gid: int) -> None:
        calls.append((uid, gid))
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    class Owned:  # the config belongs to someone else; our temp file to us
        def __init__(self, st: os.stat_result) -> None:
            self.st = st

        def __getattr__(self, name: str) -> Any:
            return {"st_uid": self.st.st_uid + 1}.get(name, getattr(self.st, name))

    monkeypatch.setattr(os, "fchown", fake_fchown)
    monkeypatch.setattr(Path, "stat", lambda self, **kw: Owned(os.stat(self)))
    cfg.update_rw(hub.config, {"client_id": "c"})
    assert calls
    assert cfg.read_document(hub.config)["rw"]["client_id"] == "c"


@pytest.mark.parametrize(
    ("typo", "closest"),
    [
        ("FLEET_PROVISIONNING", "FLEET_PROVISIONING"),
        ("fleet_provisioning", "FLEET_PROVISIONING"),
        ("FLEET", "FLEET_PROVISIONING"),
        ("JITTR", "JITR"),
        ("jitr", "JITR"),
    ],
)
def test_a_typo_in_the_method_is_warned_first_and_explained_in_the_error(
    make_hub: HubFactory, caplog: pytest.LogCaptureFixture, typo: str, closest: str
) -> None:
    # The mistake: FLEET_PROVISIONNING gave only "ro.iot_dha_cert_path: missing" and no warning at all.
    hub = make_hub(ro={"iot_provisioning_method": typo}, drop=("iot_dha_cert_path", "iot_dha_pk_path"))
    with caplog.at_level(logging.WARNING, logger="hub_onboarding"), pytest.raises(ConfigError) as info:
        cfg.parse_config(hub.config)
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        f"ro.iot_provisioning_method is invalid ({typo!r}); falling back to JITR; did you mean {closest!r}?"
    ]
    assert info.value.key == "ro.iot_dha_cert_path"
    assert info.value.message.startswith("ro.iot_dha_cert_path: missing")
    assert (
        f"(JITR was assumed because ro.iot_provisioning_method is {typo!r}, not a valid method; "
        f"did you mean {closest!r}?)" in info.value.message
    )


def test_a_missing_method_is_explained_in_the_error(make_hub: HubFactory) -> None:
    hub = make_hub(drop=("iot_provisioning_method", "iot_dha_cert_path"))
    with pytest.raises(ConfigError, match=r"JITR was assumed because ro\.iot_provisioning_method is missing"):
        cfg.parse_config(hub.config)


def test_method_choice_names_what_will_be_used(make_hub: HubFactory) -> None:
    choice = cfg.method_choice({"iot_provisioning_method": "FLEET_PROVISIONNING"})
    assert choice.method is cfg.ProvisioningMethod.JITR
    assert choice.configured == "FLEET_PROVISIONNING"
    assert choice.assumed
    valid = cfg.method_choice({"iot_provisioning_method": "FLEET_PROVISIONING"})
    assert valid.method is cfg.ProvisioningMethod.FLEET_PROVISIONING
    assert not valid.assumed
    assert valid.warning is None


def test_parse_config_warns_once_per_read(make_hub: HubFactory, caplog: pytest.LogCaptureFixture) -> None:
    hub = make_hub(ro={"iot_provisioning_method": "JTR"})
    with caplog.at_level(logging.WARNING, logger="hub_onboarding"):
        parsed = cfg.parse_config(hub.config, warn=False)
    assert caplog.records == []
    assert parsed.method_note is not None
    assert parsed.warnings  # still carried for a caller that shows them itself


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_config_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    # The mistake: a FIFO given as --config hung provision and status forever (no writer ever comes).
    if kind == "fifo":
        path = tmp_path / "iotmi_config.json"
        os.mkfifo(path)
        word = "a FIFO (named pipe)"
    else:
        path = Path(os.devnull)
        word = "a character device"
    with pytest.raises(ConfigError) as info:
        cfg.read_document(path)
    assert info.value.exit_code == 3
    assert f"config path {path} is {word}, not a regular file" in info.value.message


def test_a_root_ca_that_is_a_fifo_is_refused(make_hub: HubFactory) -> None:
    hub = make_hub()
    fifo = hub.dir / "ca.fifo"
    os.mkfifo(fifo)
    hub.write({**hub.doc(), "ro": {**hub.doc()["ro"], "iot_root_ca_path": str(fifo)}})
    with pytest.raises(
        ConfigError, match=r"ro.iot_root_ca_path: .* is a FIFO \(named pipe\), not a PEM file"
    ):
        cfg.parse_config(hub.config)


def test_read_paths_are_every_ro_file_onboarding_reads(make_hub: HubFactory) -> None:
    hub = make_hub(
        ro={
            "iot_claim_cert_path": "SECURE_STORAGE",
            "iot_claim_pk_path": "SECURE_STORAGE",
            "iot_dha_cert_path": "dha.crt",
        }
    )
    parsed = cfg.parse_config(hub.config)
    assert parsed.read_paths == {  # relative ones taken from the config's folder; SECURE_STORAGE is no path
        "iot_dha_cert_path": str(hub.dir / "dha.crt"),
        "iot_dha_pk_path": str(hub.dir / "dha.key"),
        "iot_root_ca_path": str(hub.dir / "ca.pem"),
    }


def _sparse(path: Path, size: int) -> None:
    """A file of `size` bytes that takes no disk (and no memory unless something reads it whole)."""
    with path.open("wb") as fh:
        fh.truncate(size)


def test_a_huge_config_is_refused_before_it_is_read(tmp_path: Path) -> None:
    # The mistake: a 2 GB config was read whole (4.2 GB of RAM) before it was refused as not JSON.
    path = tmp_path / "iotmi_config.json"
    _sparse(path, 2 * 1024**3)
    with pytest.raises(ConfigError) as info:
        cfg.read_document(path)
    assert info.value.exit_code == 3
    assert info.value.message == (
        f"config file {path} is 2147483648 bytes, more than the 1 MiB limit for iotmi_config.json "
        "(a real one is a few KiB); pass the path of iotmi_config.json itself"
    )


def test_a_huge_root_ca_is_refused_naming_the_key_and_the_limit(make_hub: HubFactory) -> None:
    # The mistake: a 2 GB iot_root_ca_path was read whole (2.1 GB of RAM) before it was refused.
    hub = make_hub()
    big = hub.dir / "big.crt"
    _sparse(big, 2 * 1024**3)
    hub.write({**hub.doc(), "ro": {**hub.doc()["ro"], "iot_root_ca_path": str(big)}})
    with pytest.raises(ConfigError) as info:
        cfg.parse_config(hub.config)
    assert info.value.key == "ro.iot_root_ca_path"
    assert info.value.message.startswith(
        f"ro.iot_root_ca_path: {big} is 2147483648 bytes, more than the 1 MiB limit for a CA bundle"
    )


def test_a_root_ca_bundle_of_real_size_is_accepted(make_hub: HubFactory) -> None:
    # Mozilla's bundle of every public root is about 220 KiB: a bundle that size must pass.
    hub = make_hub()
    bundle = hub.dir / "bundle.pem"
    pem = Path(hub.doc()["ro"]["iot_root_ca_path"]).read_bytes()
    bundle.write_bytes(pem * (300 * 1024 // len(pem) + 1))
    hub.write({**hub.doc(), "ro": {**hub.doc()["ro"], "iot_root_ca_path": str(bundle)}})
    assert cfg.parse_config(hub.config).connection.root_ca_path == str(bundle)
