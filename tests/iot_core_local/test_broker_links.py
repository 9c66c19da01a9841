"""The broker's own files in the data dir are written without following a symbolic link planted there
after the server's start-time check: mosquitto.conf used to be written (and chmod'ed) through one, and
mosquitto.stderr opened through one, so a link made either write into a file of the planter's choice."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from iot_core_local.broker import Broker
from iot_core_local.errors import ServerError


@pytest.mark.parametrize("name", ["mosquitto.conf", "mosquitto.stderr"])
def test_a_link_planted_at_a_broker_file_is_refused_not_followed(tmp_path: Path, name: str) -> None:
    directory = tmp_path / "broker"
    directory.mkdir(mode=0o700)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    (directory / name).symlink_to(victim)
    broker = Broker(directory)
    try:
        with pytest.raises(ServerError, match="symbolic link"):
            broker.start()
    finally:
        broker.stop()
    assert victim.read_text() == "precious\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert (directory / name).is_symlink()  # refused, and left for the owner to look at


def test_the_broker_starts_and_writes_its_files_when_no_link_is_there(tmp_path: Path) -> None:
    directory = tmp_path / "broker"
    broker = Broker(directory)
    try:
        broker.start()
        assert broker.address
        config = directory / "mosquitto.conf"
        assert not config.is_symlink()
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert "listener 0" in config.read_text()
        assert stat.S_IMODE((directory / "mosquitto.stderr").stat().st_mode) == 0o600
    finally:
        broker.stop()
