"""The `iot-core-local serve` process and the LocalIotCore API: start, endpoint file, lock, stop, restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from hub_onboarding.config import parse_endpoint
from iot_core_local.datadir import open_nofollow
from iot_core_local.errors import ServerError
from iot_core_local.server import Endpoint, LocalIotCore, write_json_atomically
from tests._support.clients import iot_client


def _serve_command(data_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "iot_core_local",
        "serve",
        "--data-dir",
        str(data_dir),
        "--mqtt-port",
        "0",
        "--api-port",
        "0",
    ]


def _serve(data_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        _serve_command(data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _mosquitto_pids(data_dir: Path) -> list[int]:
    # Compared as bytes: any process on the machine may have a command line that is not UTF-8, and
    # decoding every one of them would fail the test for a process that has nothing to do with it.
    wanted = os.fsencode(data_dir)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # the process ended while we looked, or it is not ours to read
            continue
        if b"mosquitto" in cmdline and wanted in cmdline:
            pids.append(int(entry.name))
    return pids


def test_serve_writes_endpoint_refuses_second_serve_and_stops_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with _serve(data_dir) as proc:  # leaving the block closes the pipes and reaps the process
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            printed = json.loads(line)
            text = (data_dir / "endpoint.json").read_text()
            on_disk = json.loads(text)
            assert printed == on_disk
            assert text.splitlines() == [line.strip()]  # the same one line (README: `head -1`)
            assert set(on_disk) == {
                "mqttHost",
                "mqttPort",
                "alpnPort",
                "apiUrl",
                "rootCaPath",
                "region",
                "credentialsFile",
            }
            assert on_disk["region"] == "us-east-1"
            assert Path(on_disk["credentialsFile"]) == (data_dir / "credentials").resolve()
            assert on_disk["alpnPort"] is None  # not served unless --alpn-port
            assert on_disk["mqttPort"] > 0
            assert on_disk["apiUrl"].startswith(f"http://{on_disk['mqttHost']}:")
            assert Path(on_disk["rootCaPath"]).is_file()
            assert _mosquitto_pids(data_dir), "serve should run its own Mosquitto"

            iot = iot_client(on_disk["apiUrl"], region="eu-west-1")
            assert iot.list_things()["things"] == []

            second = subprocess.run(
                _serve_command(data_dir),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert second.returncode == 3
            assert "already served" in second.stderr
            assert "Traceback" not in second.stderr
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    assert proc.returncode == 0
    # No waiting needed: the server waits for its Mosquitto child to exit (and reaps it) before it exits.
    assert _mosquitto_pids(data_dir) == [], "Mosquitto must stop with the server"
    assert not (data_dir / "endpoint.json").exists()


def test_sigint_stops_too(tmp_path: Path) -> None:
    with _serve(tmp_path / "data") as proc:
        assert proc.stdout is not None
        json.loads(proc.stdout.readline())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0


def test_bad_port_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "iot_core_local",
            "serve",
            "--data-dir",
            str(tmp_path),
            "--mqtt-port",
            "70000",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "port out of range" in result.stderr


def test_state_survives_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with LocalIotCore(data_dir) as core:
        iot = core.client()
        created = iot.create_keys_and_certificate(setAsActive=True)
        iot.create_thing(thingName="kept")
        iot.create_policy(
            policyName="kept-policy",
            policyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}],
                }
            ),
        )
        root_ca = core.endpoint.root_ca_path.read_bytes()
    with LocalIotCore(data_dir) as core:
        iot = core.client()
        described = iot.describe_certificate(certificateId=created["certificateId"])["certificateDescription"]
        assert described["status"] == "ACTIVE"
        assert iot.describe_thing(thingName="kept")["thingName"] == "kept"
        assert iot.get_policy(policyName="kept-policy")["policyName"] == "kept-policy"
        assert core.endpoint.root_ca_path.read_bytes() == root_ca, "the CA must be kept, not remade"


def test_embedded_second_server_on_same_dir_is_refused(tmp_path: Path) -> None:
    with LocalIotCore(tmp_path / "data") as core:
        assert isinstance(core.endpoint, Endpoint)
        with pytest.raises(ServerError, match="already served"):
            LocalIotCore(tmp_path / "data").start()
        assert core.client().list_things()["things"] == []


def test_data_dir_and_keys_are_private(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with LocalIotCore(tmp_path / "data"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "data").stat().st_mode & 0o077 == 0
    keys = list((tmp_path / "data" / "ca").glob("*.key"))
    assert keys
    for key in keys:
        assert key.stat().st_mode & 0o077 == 0, key


def test_stop_waits_for_worker_threads_before_closing_the_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Work already running in the gateway's threads (a hook, a RegisterThing) finishes against an
    open registry; only then is the registry closed."""
    outcome: list[object] = []
    core = LocalIotCore(tmp_path / "data")
    core.start()
    try:
        gateway, registry, loop = core.gateway, core.registry, core.loop
        started = threading.Event()
        closed = threading.Event()
        close = registry.close

        def close_and_tell() -> None:
            closed.set()
            close()

        monkeypatch.setattr(registry, "close", close_and_tell)

        def slow_worker_job() -> None:
            started.set()
            # A stop() that did not wait for this job would close the registry now. An absence cannot be
            # awaited as an event, so this waits a bounded time for the close that must not come (the
            # only timed wait here; a broken stop() sets `closed` and ends it at once).
            closed.wait(0.5)
            try:
                outcome.append(len(registry.list_policies()))
            except Exception as e:  # a closed database
                outcome.append(e)

        asyncio.run_coroutine_threadsafe(gateway.in_thread(slow_worker_job), loop)
        assert started.wait(5)
    finally:
        core.stop()
    assert outcome == [0]
    assert closed.is_set(), "the registry is closed, after the job"


# ---- the data dir: links are not followed, a dir others can write to is refused -----------------


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n", encoding="utf-8")
    return victim


@pytest.mark.parametrize("name", ["serve.lock", "endpoint.json", "registry.sqlite3"])
def test_a_symlink_planted_in_the_data_dir_is_refused_and_not_followed(tmp_path: Path, name: str) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    victim = _victim(tmp_path)
    (data / name).symlink_to(victim)
    with pytest.raises(ServerError, match=f"{name} is a symbolic link.*remove it"):
        LocalIotCore(data).start()
    assert victim.read_text(encoding="utf-8") == "precious\n"
    assert sorted(p.name for p in data.iterdir()) == [name]  # nothing else created or started


def test_the_lock_is_opened_without_following_a_link(tmp_path: Path) -> None:
    # A link planted after the start-up check (a race) meets the open itself, which the lock goes through.
    victim = _victim(tmp_path)
    (tmp_path / "serve.lock").symlink_to(victim)
    with pytest.raises(ServerError, match=r"serve\.lock is a symbolic link"):
        open_nofollow(tmp_path / "serve.lock", os.O_RDWR | os.O_CREAT)
    assert victim.read_text(encoding="utf-8") == "precious\n"


def test_endpoint_json_is_written_without_following_a_link(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    target = tmp_path / "endpoint.json"
    target.symlink_to(victim)
    with pytest.raises(ServerError, match=r"endpoint\.json is a symbolic link"):
        write_json_atomically(target, {"mqttHost": "127.0.0.1"})
    assert victim.read_text(encoding="utf-8") == "precious\n"
    assert target.is_symlink()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722])
def test_a_data_dir_writable_by_others_is_refused_naming_the_fix(tmp_path: Path, mode: int) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(mode)
    with pytest.raises(ServerError, match=f"{data} can be written by group or others .*chmod go-w"):
        LocalIotCore(data).start()
    assert list(data.iterdir()) == []
    assert stat.S_IMODE(data.stat().st_mode) == mode  # refused, never narrowed behind the owner's back


def test_a_data_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a folder to another user needs root")
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    os.chown(data, 65534, 65534)
    with pytest.raises(ServerError, match=f"{data} belongs to another user .*use a data dir of your own"):
        LocalIotCore(data).start()
    assert list(data.iterdir()) == []


def test_a_data_dir_readable_by_others_is_accepted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)  # what `mkdir` makes under the usual umask: nobody else can write to it
    with LocalIotCore(data) as core:
        assert core.client().list_things()["things"] == []


@pytest.mark.parametrize(
    ("host", "address"),
    [("::1", "[::1]:8883"), ("127.0.0.1", "127.0.0.1:8883"), ("localhost", "localhost:8883")],
)
def test_mqtt_address_brackets_ipv6_as_the_hub_reads_it(host: str, address: str) -> None:
    endpoint = Endpoint(host, 8883, "http://127.0.0.1:1", Path("root.pem"))
    assert endpoint.mqtt_address == address
    parsed = parse_endpoint(endpoint.mqtt_address, "ro.endpoint_url")
    assert (parsed.host, parsed.port) == (host, 8883)


@pytest.mark.parametrize("mistake", ["writable by others", "planted lock link"])
def test_serve_refuses_an_unsafe_data_dir_in_one_line_exit_3(tmp_path: Path, mistake: str) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    victim = _victim(tmp_path)
    if mistake == "writable by others":
        data.chmod(0o777)
        expected = "can be written by group or others"
    else:
        (data / "serve.lock").symlink_to(victim)
        expected = "serve.lock is a symbolic link"
    done = subprocess.run(_serve_command(data), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert str(data) in lines[0]
    assert expected in lines[0]
    assert done.stdout == ""
    assert victim.read_text(encoding="utf-8") == "precious\n"
    assert not (data / "ca").exists()
