"""Crash hygiene: Mosquitto dies with `serve` even on `kill -9`, and a restart stops a stale broker of its
data dir (and nothing else) before its own starts, so one persistence file has one writer."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from iot_core_local.broker import socket_address, wait_accepting
from iot_core_local.server import LocalIotCore
from tests._support.brokers import MOSQUITTO
from tests._support.clients import iot_client
from tests._support.devices import OPEN_POLICY, Credentials, write_credentials

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")

_DEADLINE = 30.0


@contextlib.contextmanager
def _serve(data_dir: Path, log: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any]]]:
    """`iot-core-local serve` as a process, with the endpoint it printed; killed and reaped at the end."""
    with log.open("ab") as stderr:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "iot_core_local", "serve", "--data-dir", str(data_dir)),
                *("--mqtt-port", "0", "--api-port", "0"),
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"serve exited before it was ready:\n{log.read_text(errors='replace')}"
        yield proc, json.loads(line)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(_DEADLINE)
        assert proc.stdout is not None
        proc.stdout.close()


def _broker_pid(data_dir: Path) -> int:
    return int((data_dir / "mosquitto" / "mosquitto.pid").read_text())


def _exits_within(pid: int, timeout: float) -> bool:
    """True once process `pid` has exited. The broker is serve's child, not ours, so we cannot wait for
    it; a pidfd becomes readable when its process exits, which is an event to wait on, not a poll."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(pidfd)


def _device(api_url: str, folder: Path) -> Credentials:
    iot = iot_client(api_url)
    created = iot.create_keys_and_certificate(setAsActive=True)
    iot.create_policy(policyName="open", policyDocument=OPEN_POLICY)
    iot.attach_policy(policyName="open", target=created["certificateArn"])
    return write_credentials(
        folder,
        "device",
        created["certificateId"],
        created["certificatePem"],
        created["keyPair"]["PrivateKey"],
    )


class _Client:
    """paho-mqtt over TLS to a served endpoint (the endpoint dict `serve` printed)."""

    def __init__(self, endpoint: dict[str, Any], creds: Credentials) -> None:
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id="hub-1", protocol=paho.MQTTv5
        )
        self.client.tls_set(ca_certs=endpoint["rootCaPath"], certfile=creds.cert_path, keyfile=creds.key_path)
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.client.on_connect = lambda c, u, f, rc, p: self.events.put(("connack", rc.value))
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.events.put(("suback", codes[0].value))
        self.client.on_publish = lambda c, u, mid, rc, p: self.events.put(("puback", rc.value))
        self.client.on_message = lambda c, u, m: self.events.put(("message", (m.topic, m.payload, m.retain)))
        self.client.connect(endpoint["mqttHost"], endpoint["mqttPort"], keepalive=30)
        self.client.loop_start()
        assert self.next("connack") == 0

    def next(self, kind: str) -> Any:
        got, value = self.events.get(timeout=10)
        assert got == kind, (got, value)
        return value

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_kill_9_of_serve_takes_mosquitto_with_it(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with _serve(data_dir, tmp_path / "serve.log") as (proc, _):
        broker = _broker_pid(data_dir)
        assert b"mosquitto" in Path(f"/proc/{broker}/cmdline").read_bytes()
        proc.kill()
        proc.wait(_DEADLINE)
        assert _exits_within(broker, _DEADLINE), "Mosquitto outlived a kill -9 of serve"


def _plant_stale_broker(data_dir: Path) -> subprocess.Popen[bytes]:
    """A Mosquitto on the data dir's own config and persistence, named by its pid file: what a server
    killed before it could stop its broker leaves behind."""
    config = data_dir / "mosquitto" / "mosquitto.conf"
    stale = subprocess.Popen(
        [str(MOSQUITTO), "-c", str(config.absolute())],
        cwd=config.parent,  # as the server starts it: its socket path is relative to its folder
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    (data_dir / "mosquitto" / "mosquitto.pid").write_text(f"{stale.pid}\n")
    # Once it accepts, it has loaded the persistence file and would write it back at its next autosave.
    address, held = socket_address(config.parent)
    try:
        accepting = wait_accepting(address, stale, _DEADLINE)  # as the server waits for its own broker
    finally:
        if held is not None:
            os.close(held)
    if not accepting:
        stale.kill()
        raise AssertionError(f"the planted Mosquitto never accepted connections (exit {stale.poll()})")
    return stale


@pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")
def test_restart_stops_a_stale_broker_and_keeps_a_retained_message(tmp_path: Path) -> None:
    data_dir, log = tmp_path / "data", tmp_path / "serve.log"
    with _serve(data_dir, log) as (proc, endpoint):
        creds = _device(endpoint["apiUrl"], tmp_path / "device")
        client = _Client(endpoint, creds)
        client.client.publish("hubs/hub-1/state", b"kept", qos=1, retain=True)
        assert client.next("puback") == 0
        client.close()
        first_broker = _broker_pid(data_dir)
        proc.kill()
        proc.wait(_DEADLINE)
    assert _exits_within(first_broker, _DEADLINE)

    stale = _plant_stale_broker(data_dir)
    try:
        with _serve(data_dir, log) as (_, endpoint):
            # serve stopped it before its own broker started (SIGTERM: it saved and exited cleanly).
            assert stale.wait(_DEADLINE) == 0
            assert _broker_pid(data_dir) != stale.pid
            client = _Client(endpoint, creds)
            client.client.subscribe("hubs/hub-1/state", qos=1)
            assert client.next("suback") == 1
            assert client.next("message") == ("hubs/hub-1/state", b"kept", True)
            client.close()
    finally:
        if stale.poll() is None:
            stale.kill()
            stale.wait(_DEADLINE)
    assert "stopping Mosquitto" in log.read_text(errors="replace")


def test_a_pid_file_naming_another_process_kills_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "mosquitto").mkdir(parents=True, mode=0o700)
    data_dir.chmod(0o700)
    with subprocess.Popen(["sleep", "600"]) as unrelated:
        try:
            (data_dir / "mosquitto" / "mosquitto.pid").write_text(f"{unrelated.pid}\n")
            with LocalIotCore(data_dir, key_pool_size=0):
                assert unrelated.poll() is None, "serve signalled a process that is not its Mosquitto"
                assert _broker_pid(data_dir) != unrelated.pid
            assert unrelated.poll() is None
            assert not (data_dir / "mosquitto" / "mosquitto.pid").exists(), (
                "a clean stop removes the pid file"
            )
        finally:
            unrelated.kill()
