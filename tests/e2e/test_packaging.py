"""Packaging: installed the way a hub image is (`pip install .`, no extras), the commands that need the
stand-in say which extra to install, in one line and exit 3, and touch nothing; and the boot service's
systemd unit verifies and maps the exit codes.

Each command runs as a child Python whose imports of the [server] extra's modules fail, as they do when
the extra is not installed: a meta path finder put first refuses them (the rest of the environment is this
one, so the hub's own dependencies are there).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from hub_onboarding.errors import (
    EXIT_USAGE,
    BusyError,
    ConfigError,
    CredentialError,
    MqttConnectionError,
    ProvisioningError,
    StorageError,
)
from iot_core_local.extra import EXIT_MISSING_EXTRA, INSTALL_COMMAND, SERVER_MODULES

ROOT = Path(__file__).resolve().parents[2]

# Prepended to the child's program: the [server] modules cannot be imported, as without the extra.
WITHOUT_SERVER_EXTRA = f"""
import sys

class _WithoutServerExtra:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {set(SERVER_MODULES)!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _WithoutServerExtra())
"""


def run_without_server_extra(call: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `call` (an expression giving an exit code) in a child Python without the [server] extra."""
    program = WITHOUT_SERVER_EXTRA + f"\nsys.exit({call})\n"
    return subprocess.run(
        [sys.executable, "-c", program], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def assert_names_the_extra(result: subprocess.CompletedProcess[str], command: str) -> None:
    assert result.returncode == EXIT_MISSING_EXTRA, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{command}: needs the [server] extra")
    assert INSTALL_COMMAND in lines[0]
    assert result.stdout == ""


def test_iot_core_local_serve_names_the_extra_and_writes_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    result = run_without_server_extra(
        f"__import__('iot_core_local.cli').cli.main(['serve', '--data-dir', {str(data_dir)!r}])", tmp_path
    )
    assert_names_the_extra(result, "iot-core-local")
    assert not data_dir.exists()


def test_hub_onboard_demo_names_the_extra_and_writes_nothing(tmp_path: Path) -> None:
    keep = tmp_path / "kept"
    result = run_without_server_extra(
        f"__import__('hub_onboarding.cli').cli.main(['demo', '--keep', {str(keep)!r}])", tmp_path
    )
    assert_names_the_extra(result, "hub-onboard demo")
    assert not keep.exists()


def test_fleet_sim_names_the_extra_and_the_alternative(tmp_path: Path) -> None:
    work = tmp_path / "work"
    result = run_without_server_extra(
        f"__import__('hub_onboarding.cli').cli.main(['fleet-sim', '--work-dir', {str(work)!r}])", tmp_path
    )
    assert_names_the_extra(result, "hub-onboard fleet-sim")
    assert "or pass --config CLOUD.json" in result.stderr
    assert not work.exists()


def test_the_hub_commands_work_without_the_extra(tmp_path: Path) -> None:
    """What a hub runs never needs the extra: status of a config answers, and names no extra."""
    config = tmp_path / "iotmi_config.json"
    config.write_text('{"ro": {}, "rw": {"iot_provisioning_state": "NOT_PROVISIONED"}}\n', encoding="utf-8")
    result = run_without_server_extra(
        f"__import__('hub_onboarding.cli').cli.main(['status', '--config', {str(config)!r}])", tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "state: NOT_PROVISIONED" in result.stdout


def test_the_modules_checked_are_the_extras_own() -> None:
    """SERVER_MODULES follows pyproject's [server] extra (each distribution's module has its name)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = project["optional-dependencies"]["server"]
    names = {req.split(">")[0].split("=")[0].split("[")[0].strip() for req in requirements}
    assert names == set(SERVER_MODULES)


# The boot service. `systemd-analyze verify` checks a unit offline (no running systemd needed): every key
# known, every value valid, the dependencies loadable, and the command executable. `make test` installs
# Debian's systemd package where systemd-analyze is missing, as it does Mosquitto.
UNIT = ROOT / "packaging" / "systemd" / "hub-onboarding.service"
SHIPPED_COMMAND = "/usr/local/bin/hub-onboard"


def unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values (a key may repeat), from a unit file's text."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return sections


def verify(unit_text: str, folder: Path) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify on `unit_text`, its command pointed at this environment's hub-onboard."""
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is missing: make test installs it (apt-get install systemd)"
    installed = Path(sys.executable).parent / "hub-onboard"
    command = str(installed) if installed.exists() else f"{sys.executable} -m hub_onboarding.cli"
    path = folder / UNIT.name
    path.write_text(unit_text.replace(SHIPPED_COMMAND, command), encoding="utf-8")
    return subprocess.run(
        [analyze, "verify", "--man=no", str(path)],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_boot_service_verifies(tmp_path: Path) -> None:
    result = verify(UNIT.read_text(encoding="utf-8"), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # no warning either (an unknown key is only a warning)


def test_a_mistake_in_the_unit_would_be_caught(tmp_path: Path) -> None:
    """The check above has teeth: a misspelt key is reported."""
    text = UNIT.read_text(encoding="utf-8").replace("\nRestart=", "\nRestrat=")
    assert "Restrat" in verify(text, tmp_path).stderr


def test_the_boot_service_runs_onboarding_once_before_the_mqtt_proxy() -> None:
    unit = unit_settings(UNIT.read_text(encoding="utf-8"))
    service = unit["Service"]
    assert service["Type"] == ["oneshot"]
    assert service["RemainAfterExit"] == ["yes"]
    assert service["ExecStart"][0].startswith(f"{SHIPPED_COMMAND} provision --config ")
    assert unit["Unit"]["Before"] == ["iotmi-mqtt-proxy.service"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_the_boot_service_restarts_after_transient_failures_only() -> None:
    service = unit_settings(UNIT.read_text(encoding="utf-8"))["Service"]
    assert service["Restart"] == ["on-failure"]
    prevented = {int(code) for code in service["RestartPreventExitStatus"][0].split()}
    # A restart cannot fix a usage, config or credential error; everything else may clear.
    assert prevented == {EXIT_USAGE, ConfigError.exit_code, CredentialError.exit_code}
    for transient in (StorageError, BusyError, ProvisioningError, MqttConnectionError):
        assert transient.exit_code not in prevented


def test_the_boot_service_writes_only_beside_its_config() -> None:
    service = unit_settings(UNIT.read_text(encoding="utf-8"))["Service"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["PrivateTmp"] == ["yes"]
    config = Path(service["ExecStart"][0].split("--config ")[1].split()[0])
    assert service["ReadWritePaths"] == [str(config.parent)]
