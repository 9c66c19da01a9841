"""`iot-core-local serve` on a port another program holds: one line naming the port and its flag, exit 3."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from iot_core_local.cli import EXIT_SERVER
from iot_core_local.errors import PortUnavailable, ServerError
from iot_core_local.server import LocalIotCore, port_problem


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port with a listener on it, as another program would hold it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def _serve(data_dir: Path, *ports: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "iot_core_local", "serve", "--data-dir", str(data_dir), *ports]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    ("flag", "others", "service"),
    [
        ("--api-port", ["--mqtt-port"], "API"),
        ("--mqtt-port", ["--api-port"], "MQTT"),
        ("--alpn-port", ["--mqtt-port", "--api-port"], "ALPN MQTT"),
    ],
)
def test_a_taken_port_is_named_with_its_flag_in_one_line(
    tmp_path: Path, taken_port: int, flag: str, others: list[str], service: str
) -> None:
    data_dir = tmp_path / "data"
    done = _serve(data_dir, flag, str(taken_port), *(arg for other in others for arg in (other, "0")))
    assert done.returncode == EXIT_SERVER
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"iot-core-local: cannot start: the {service} port {taken_port} on 127.0.0.1 is already in use "
        f"by another program ({flag}); stop that program or choose another {flag} (0: any free port)"
    ]
    # Checked before anything started: no CA minted, no registry, no Mosquitto, no endpoint file.
    assert sorted(p.name for p in data_dir.iterdir()) == ["serve.lock"]


def test_the_python_api_raises_port_unavailable_and_leaves_nothing_running(
    tmp_path: Path, taken_port: int
) -> None:
    threads_before = set(threading.enumerate())
    core = LocalIotCore(tmp_path / "data", mqtt_port=taken_port)
    with pytest.raises(PortUnavailable) as caught:
        core.start()
    assert isinstance(caught.value, ServerError)
    assert (caught.value.service, caught.value.port) == ("mqtt", taken_port)
    assert set(threading.enumerate()) <= threads_before
    with pytest.raises(ServerError, match="not running"):
        _ = core.endpoint
    # The data dir is free again: the next start takes it.
    with LocalIotCore(tmp_path / "data") as again:
        assert again.endpoint.mqtt_port != taken_port


def test_a_bind_that_fails_on_the_port_itself_is_named() -> None:
    in_use = port_problem("api", "127.0.0.1", 8080, OSError(errno.EADDRINUSE, "Address already in use"))
    assert str(in_use) == "the API port 8080 on 127.0.0.1 is already in use by another program"
    privileged = port_problem("mqtt", "127.0.0.1", 883, OSError(errno.EACCES, "Permission denied"))
    assert privileged is not None
    assert "the MQTT port 883 on 127.0.0.1 needs privileges" in str(privileged)
    assert port_problem("api", "10.9.9.9", 8080, OSError(errno.EADDRNOTAVAIL, "not here")) is None
