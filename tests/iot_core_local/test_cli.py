"""`iot-core-local setup-fleet`/`setup-jitr` when something is in the way: one line, exit 3, nothing
created or overwritten."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from iot_core_local.cli import EXIT_SERVER, main
from iot_core_local.recipes.jitr import DeviceCA
from iot_core_local.server import LocalIotCore


@pytest.mark.parametrize("command", ["setup-fleet", "setup-jitr"])
def test_set_up_without_a_running_server_says_how_to_start_one(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main([command, "--data-dir", str(tmp_path / "cloud"), "--out", str(tmp_path / "hub")]) == EXIT_SERVER
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"start 'iot-core-local serve --data-dir {tmp_path / 'cloud'}' first" in err
    assert not (tmp_path / "hub").exists()


def test_setup_fleet_never_overwrites_a_claim_of_another_cloud(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hub = tmp_path / "hub"
    hub.mkdir(mode=0o700)
    foreign = DeviceCA("Not this cloud's").issue_device("someone")
    (hub / "claim.pem.crt").write_text(foreign.certificate_pem, encoding="utf-8")
    (hub / "claim.pem.key").write_text(foreign.private_key_pem, encoding="utf-8")
    with LocalIotCore(tmp_path / "cloud") as core:
        assert main(["setup-fleet", "--data-dir", str(tmp_path / "cloud"), "--out", str(hub)]) == EXIT_SERVER
        iot: Any = core.client()
        assert iot.list_certificates()["certificates"] == []
    assert "is not a certificate of the cloud" in capsys.readouterr().err
    assert (hub / "claim.pem.crt").read_text(encoding="utf-8") == foreign.certificate_pem


def test_setup_fleet_refuses_half_a_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub = tmp_path / "hub"
    hub.mkdir(mode=0o700)
    (hub / "claim.pem.key").write_text("a key", encoding="utf-8")
    with LocalIotCore(tmp_path / "cloud"):
        assert main(["setup-fleet", "--data-dir", str(tmp_path / "cloud"), "--out", str(hub)]) == EXIT_SERVER
    assert "claim.pem.crt is missing beside" in capsys.readouterr().err
    assert sorted(p.name for p in hub.iterdir()) == ["claim.pem.key"]
