"""Expected failures from the filesystem, the lock and awscrt end in a typed error (no traceback, exit 1)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from hub_onboarding import _files
from hub_onboarding.certs import check_pair
from hub_onboarding.cli import main
from hub_onboarding.config import Endpoint
from hub_onboarding.errors import MqttConnectionError, StorageError
from hub_onboarding.mqtt import ConnectionSettings, IotProvisioning
from hub_onboarding.progress import ProgressStore
from tests._support.certificates import make_pair, write_private
from tests._support.hubs import HubFactory


def _fail_unlink_of(monkeypatch: pytest.MonkeyPatch, names: set[str]) -> None:
    real = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self.name in names:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        real(self, missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)


def test_progress_clear_that_fails_is_a_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ProgressStore(tmp_path / "missing").clear()  # nothing to delete is fine
    store = ProgressStore(tmp_path)
    store.path.write_text("{}")
    _fail_unlink_of(monkeypatch, {store.path.name})
    with pytest.raises(StorageError, match="cannot delete the onboarding progress record") as info:
        store.clear()
    assert str(store.path) in info.value.message
    assert info.value.exit_code == 5


def test_delete_that_fails_midway_is_a_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for f in files:
        f.write_text("x")
    _fail_unlink_of(monkeypatch, {"b"})
    with pytest.raises(StorageError) as info:
        _files.delete_files(files)
    message = info.value.message
    assert f"cannot delete {files[1]}" in message
    assert f"deleted so far: {files[0]}" in message
    assert "run reset again" in message
    assert not files[0].exists()
    assert files[1].exists()
    assert files[2].exists()


def test_reset_that_cannot_delete_exits_5_without_a_traceback(
    make_hub: HubFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    hub = make_hub()
    certs_dir = hub.dir / "certs"
    certs_dir.mkdir(mode=0o700)
    write_private(certs_dir / "private.pem.key", make_pair().key_pem)
    _fail_unlink_of(monkeypatch, {"private.pem.key"})
    assert main(["reset", "--config", str(hub.config), "--yes"]) == 5
    err = capsys.readouterr().err
    assert "private.pem.key" in err
    assert "Traceback" not in err


def test_mqtt_client_that_does_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from awscrt import mqtt5

    class Client:
        def start(self) -> None:
            raise RuntimeError("AWS_ERROR_OOM")

        def stop(self) -> None:
            pass

    monkeypatch.setattr(mqtt5, "Client", lambda options: Client())
    pair = make_pair("hub")
    creds = check_pair(pair.cert_pem, pair.key_pem, "claim", check_validity=False)
    iot = IotProvisioning(ConnectionSettings(Endpoint("iot.example.com"), None, 60, connect_timeout=1))
    with pytest.raises(MqttConnectionError, match="could not start the MQTT client") as info:
        iot.connect("hub", creds)
    assert "AWS_ERROR_OOM" in info.value.message
    assert info.value.retriable is False
