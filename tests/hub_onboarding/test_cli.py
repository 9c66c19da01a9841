"""`hub-onboard` through main(argv): exit codes, JSON output, reset's guard, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hub_onboarding.cli import main
from tests._support.hubs import HubFactory


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["provision"]) == 2  # --config is required
    assert main(["bogus"]) == 2
    assert main(["--help"]) == 0
    assert "provision" in capsys.readouterr().out


@pytest.mark.parametrize("wait", ["-1", "nan", "inf", "soon"])
def test_a_lock_wait_that_is_no_number_of_seconds_is_a_usage_error(
    make_hub: HubFactory, capsys: pytest.CaptureFixture[str], wait: str
) -> None:
    hub = make_hub()
    assert main(["provision", "--config", str(hub.config), f"--lock-wait={wait}"]) == 2
    assert "argument --lock-wait:" in capsys.readouterr().err.splitlines()[-1]
    assert hub.doc()["rw"]["iot_provisioning_state"] == "NOT_PROVISIONED"


def test_status(make_hub: HubFactory, capsys: pytest.CaptureFixture[str]) -> None:
    hub = make_hub()
    assert main(["status", "--config", str(hub.config)]) == 0
    assert "state: NOT_PROVISIONED" in capsys.readouterr().out
    assert main(["status", "--config", str(hub.config), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["state"] == "NOT_PROVISIONED"
    assert info["method"] == "FLEET_PROVISIONING"


def test_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--config", str(tmp_path / "nope.json")]) == 3
    err = capsys.readouterr().err
    assert "does not exist" in err
    assert "Traceback" not in err


def test_provision_config_error_json(make_hub: HubFactory, capsys: pytest.CaptureFixture[str]) -> None:
    hub = make_hub(ro={"UPC": 7})
    assert main(["provision", "--config", str(hub.config), "--json"]) == 3
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False
    assert out["error"]["type"] == "ConfigError"
    assert out["error"]["key"] == "ro.UPC"


def test_provision_credential_error(make_hub: HubFactory, capsys: pytest.CaptureFixture[str]) -> None:
    hub = make_hub()
    (hub.dir / "claim.key").chmod(0o644)
    assert main(["provision", "--config", str(hub.config)]) == 4
    err = capsys.readouterr().err
    assert "chmod 600" in err
    assert "Traceback" not in err


def test_provision_already_provisioned_is_a_no_op(
    make_hub: HubFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    hub = make_hub(rw={"iot_provisioning_state": "PROVISIONED", "client_id": "c1"})
    assert main(["provision", "--config", str(hub.config), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"]
    assert out["changed"] is False
    assert out["client_id"] == "c1"
    assert main(["provision", "--config", str(hub.config)]) == 0
    assert "already provisioned" in capsys.readouterr().out


def test_provision_json_writes_each_step_as_a_json_line_on_stderr(
    make_hub: HubFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    hub = make_hub()
    (hub.dir / "claim.key").chmod(0o644)  # fails right after the config was read: one step, then the error
    assert main(["provision", "--config", str(hub.config), "--json"]) == 4
    captured = capsys.readouterr()
    assert json.loads(captured.out)["ok"] is False  # stdout: the one result document, as before
    steps = [json.loads(line) for line in captured.err.splitlines() if line.startswith("{")]
    assert steps == [
        {"step": "CONFIG_READ", "message": "config valid: FLEET_PROVISIONING via iot.example.com:8883"}
    ]
    hub = make_hub(rw={"iot_provisioning_state": "PROVISIONED", "client_id": "c1"})
    assert main(["provision", "--config", str(hub.config), "--json"]) == 0
    (line,) = capsys.readouterr().err.splitlines()
    assert json.loads(line) == {
        "step": "ALREADY_PROVISIONED",
        "message": "already PROVISIONED; nothing to do",
    }


def test_reset_needs_yes(make_hub: HubFactory, capsys: pytest.CaptureFixture[str]) -> None:
    hub = make_hub(rw={"iot_provisioning_state": "PROVISIONED", "client_id": "c1"})
    before = hub.config.read_bytes()
    assert main(["reset", "--config", str(hub.config)]) == 2
    assert "--yes" in capsys.readouterr().err
    assert hub.config.read_bytes() == before


def test_reset(make_hub: HubFactory, capsys: pytest.CaptureFixture[str]) -> None:
    hub = make_hub(rw={"iot_provisioning_state": "PROVISIONED", "client_id": "c1"})
    certs = hub.dir / "certs"
    certs.mkdir(mode=0o700)
    (certs / "certificate.pem.crt").write_text("x")
    (certs / "private.pem.key").write_text("y")
    assert main(["reset", "--config", str(hub.config), "--yes", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["deleted"]) == 2
    assert hub.doc()["rw"]["iot_provisioning_state"] == "NOT_PROVISIONED"
    assert "client_id" not in hub.doc()["rw"]


def test_provision_network_error_exit_code(make_hub: HubFactory, capsys: pytest.CaptureFixture[str]) -> None:
    """The real awscrt path against a closed port: a typed error within the retry deadline."""
    hub = make_hub(ro={"endpoint_url": "127.0.0.1:1", "mqtt_retry_timeout_seconds": 1})
    start = time.monotonic()
    assert main(["provision", "--config", str(hub.config), "--json"]) == 11
    assert time.monotonic() - start < 10
    out = json.loads(capsys.readouterr().out)
    assert out["error"]["status"] == "FP_STATUS_MQTT_CONNECTION_ERROR"
    assert "CONNECTION_REFUSED" in out["error"]["message"]


def test_status_does_not_import_awscrt(make_hub: HubFactory) -> None:
    hub = make_hub()
    code = (
        "import sys; from hub_onboarding.cli import main; "
        "rc = main(['status', '--config', sys.argv[1]]); "
        "assert 'awscrt' not in sys.modules and 'awsiot' not in sys.modules, 'eager import'; "
        "sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(hub.config)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr


def test_public_api() -> None:
    import hub_onboarding

    for name in hub_onboarding.__all__:
        assert getattr(hub_onboarding, name) is not None
    assert hub_onboarding.HubOnboarding.__name__ == "HubOnboarding"


def test_exit_codes_are_defined_once() -> None:
    # errors.py is the one home of the exit codes; the commands use its constants instead of copies.
    import ast

    import hub_onboarding
    from hub_onboarding import errors
    from hub_onboarding.tools import fleet_sim

    package = Path(hub_onboarding.__file__).parent
    shared = {"EXIT_OK", "EXIT_USAGE", "EXIT_UNEXPECTED"}
    modules = sorted(package.rglob("*.py"))
    assert package / "tools" / "fleet_sim.py" in modules
    for module in modules:
        if module.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Assign):
                names = {t.id for t in node.targets if isinstance(t, ast.Name)}
                assert not names & shared, f"{module.name} defines its own {names & shared}"
        # the codes come from errors.py, imported by name
        tree = ast.parse(module.read_text())
        imported = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "hub_onboarding.errors"
            for alias in node.names
        }
        used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)} & shared
        assert used <= imported, f"{module.name} uses {used - imported} without importing it from errors"
    assert errors.ConfigError.exit_code == fleet_sim.EXIT_CONFIG


def test_json_errors_carry_the_key_for_credential_errors(
    make_hub: HubFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    # The mistake: --json errors carried `key` for ConfigError but not for CredentialError.
    hub = make_hub()
    (hub.dir / "claim.key").chmod(0o644)
    assert main(["provision", "--config", str(hub.config), "--json"]) == 4
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["type"] == "CredentialError"
    assert error["key"] == "ro.iot_claim_pk_path"


def test_status_shows_the_method_that_will_be_used(
    make_hub: HubFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    hub = make_hub("FLEET_PROVISIONNING")
    assert main(["status", "--config", str(hub.config)]) == 0
    out = capsys.readouterr().out
    assert (
        "method: JITR (JITR was assumed because ro.iot_provisioning_method is 'FLEET_PROVISIONNING', "
        "not a valid method; did you mean 'FLEET_PROVISIONING'?)\n" in out
    )
    assert main(["status", "--config", str(hub.config), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["method"], info["configured_method"]) == ("JITR", "FLEET_PROVISIONNING")


@pytest.mark.parametrize("command", ["provision", "status", "reset"])
def test_a_fifo_as_config_is_refused_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    # The mistake: a FIFO given as --config hung provision and status forever.
    fifo = tmp_path / "iotmi_config.json"
    os.mkfifo(fifo)
    assert main([command, "--config", str(fifo), *(["--yes"] if command == "reset" else [])]) == 3
    err = capsys.readouterr().err
    assert f"config path {fifo} is a FIFO (named pipe), not a regular file" in err
    assert not (tmp_path / "iotmi_config.json.lock").exists()


def test_warnings_read_as_short_lines_without_verbose(
    make_hub: HubFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    hub = make_hub("FLEET_PROVISIONNING", drop=("iot_dha_cert_path",))
    assert main(["provision", "--config", str(hub.config)]) == 3
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == (
        "hub-onboard: warning: ro.iot_provisioning_method is invalid ('FLEET_PROVISIONNING'); falling back "
        "to JITR; did you mean 'FLEET_PROVISIONING'?"
    )
    assert lines[-1].startswith("hub-onboard: error: ro.iot_dha_cert_path: missing")
