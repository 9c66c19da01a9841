"""The broker behind the gateway is the gateway's alone: no TCP listener, a Unix socket in a 0700 folder.

Before, Mosquitto listened on a loopback port with anonymous access: any local process could read every
device's traffic, inject commands and forge `$aws/events/...` (a forged JITR registration event
re-activated an INACTIVE certificate).
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from iot_core_local.broker import SOCKET_NAME, open_connection, socket_address
from iot_core_local.errors import ServerError
from iot_core_local.server import LocalIotCore
from tests._support.devices import RawClient, new_device

_NOBODY = 65534
_TCP_LISTEN = "0A"


@pytest.fixture
def iot_core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalIotCore]:
    """The package's `iot_core` fixture, in a shorter folder: mosquitto_sub is given the socket's path
    itself, which must fit in sun_path (107 bytes), and pytest-xdist nests tmp_path one level deeper."""
    with LocalIotCore(tmp_path_factory.mktemp("iso") / "iot-core-local") as core:
        yield core


def _broker_pid(core: LocalIotCore) -> int:
    return int((core.data_dir / "mosquitto" / "mosquitto.pid").read_text())


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _tcp_listeners(inodes: set[str]) -> list[str]:
    """`address:port` of every TCP or TCP6 socket in LISTEN state among `inodes` (from /proc/net)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == _TCP_LISTEN and inode in inodes:
                found.append(local)
    return found


def _mosquitto_sub(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["mosquitto_sub", "-t", "#", "-C", "1", "-W", "2", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        user=user,
    )


def test_mosquitto_has_no_tcp_listener_and_its_socket_folder_is_private(iot_core: LocalIotCore) -> None:
    pid = _broker_pid(iot_core)
    inodes = _socket_inodes(pid)
    assert inodes, "Mosquitto has no socket at all"
    assert _tcp_listeners(inodes) == [], "Mosquitto listens on TCP"
    unix_listeners = [
        line.split()[-1]
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]
        if len(line.split()) >= 8 and line.split()[6] in inodes and line.split()[5] == "01"
    ]
    # Mosquitto bound it relative to its folder; /proc names it as it was bound.
    assert unix_listeners == [SOCKET_NAME]
    folder = iot_core.data_dir / "mosquitto"
    info = folder.stat()
    assert stat.S_IMODE(info.st_mode) == 0o700
    assert info.st_uid == os.getuid()
    assert stat.S_ISSOCK((folder / SOCKET_NAME).lstat().st_mode)
    config = (folder / "mosquitto.conf").read_text(encoding="utf-8").splitlines()
    assert [line for line in config if line.startswith("listener")] == [f"listener 0 {SOCKET_NAME}"]


def test_mosquittos_tools_cannot_reach_the_broker(iot_core: LocalIotCore) -> None:
    # Mosquitto's default port, and the gateway's port (TLS, so a plain MQTT client gets nowhere).
    for port in (1883, iot_core.endpoint.mqtt_port):
        result = _mosquitto_sub("-h", "127.0.0.1", "-p", str(port))
        assert result.returncode != 0, result
    folder = iot_core.data_dir / "mosquitto"
    if os.geteuid() == 0:
        # Another user: the 0700 folder stops them before the socket (root is the only one who could
        # become another user here; as anyone else, the folder's mode above is what the kernel checks).
        address = str(folder / SOCKET_NAME)
        assert len(address) <= 107, "pytest's tmp_path is too deep for a path in sun_path"
        as_nobody = _mosquitto_sub("--unix", address, user=_NOBODY)
        assert as_nobody.returncode != 0
        assert "denied" in (as_nobody.stderr + as_nobody.stdout).lower(), as_nobody
    assert stat.S_IMODE(folder.stat().st_mode) & 0o077 == 0


def test_gateway_traffic_still_flows(iot_core: LocalIotCore, tmp_path: Path) -> None:
    creds = new_device(iot_core, tmp_path / "creds", "isolated")
    subscriber, publisher = RawClient(iot_core, creds), RawClient(iot_core, creds)
    try:
        assert subscriber.connect("iso-sub").reason_code == 0
        assert subscriber.subscribe("iso/#") == [1]
        assert publisher.connect("iso-pub").reason_code == 0
        assert publisher.publish("iso/t", b"through the gateway") == 0
        assert publisher.publish("$aws/events/certificates/registered/forged", b"{}") == 135
        message = subscriber.receive()
        assert getattr(message, "payload", None) == b"through the gateway"
    finally:
        subscriber.close()
        publisher.close()


def test_a_deep_data_dir_is_reached_through_proc(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    address, held = socket_address(deep)
    assert held is not None
    try:
        assert address == f"/proc/self/fd/{held}/{SOCKET_NAME}"
        with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as client:
            server.bind(address)
            server.listen()
            client.connect(address)
        assert (deep / SOCKET_NAME).exists()
    finally:
        os.close(held)
    short, none = socket_address(tmp_path)
    assert (short, none) == (str(tmp_path / SOCKET_NAME), None)


def test_a_deep_data_dir_serves(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)
    with LocalIotCore(deep, key_pool_size=0) as core:
        creds = new_device(core, tmp_path / "creds", "deep")
        client = RawClient(core, creds)
        try:
            assert client.connect("deep").reason_code == 0
            assert client.publish("deep/t", b"x") == 0
        finally:
            client.close()


def test_a_socket_path_too_long_elsewhere_fails_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("iot_core_local.broker.sys.platform", "darwin")
    with pytest.raises(
        ServerError, match=r"too long for Mosquitto's Unix socket.*choose a shorter --data-dir"
    ):
        socket_address(tmp_path / ("d" * 100))


def test_a_full_accept_backlog_is_waited_out_not_refused(tmp_path: Path) -> None:
    # Mosquitto's backlog is 10: a burst of device connections used to get CONNACK 136 (EAGAIN).
    async def scenario(address: str) -> bool:
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(address)
            listener.listen(0)
            listener.setblocking(False)
            fillers = []
            while True:  # fill the backlog until the kernel says EAGAIN
                filler = socket.socket(socket.AF_UNIX)
                filler.setblocking(False)
                try:
                    filler.connect(address)
                except BlockingIOError:
                    filler.close()
                    break
                fillers.append(filler)
            opening = asyncio.create_task(open_connection(address))
            await asyncio.sleep(0)  # its first attempt: EAGAIN
            assert not opening.done()
            accepted = []
            async with asyncio.timeout(10):
                while not opening.done():  # Mosquitto accepting at last
                    accepted.append((await loop.sock_accept(listener))[0])
            _, writer = opening.result()
            writer.close()
            for sock in fillers + accepted:
                sock.close()
            # Every filler, then ours: a connection in the backlog, not asyncio's unconnected socket.
            return len(accepted) == len(fillers) + 1

    address, held = socket_address(tmp_path)
    try:
        assert asyncio.run(scenario(address))
    finally:
        if held is not None:
            os.close(held)
