"""Bounded resources at the gateway and the broker: keep-alive, connection caps, stuck subscribers."""

from __future__ import annotations

import json
import logging
import resource
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mqtt5
import pytest

from iot_core_local.broker import BrokerLimits
from iot_core_local.cli import EXIT_USAGE, LIMIT_FLAGS, main
from iot_core_local.gateway import GatewayLimits
from iot_core_local.resources import LimitLog, raise_open_file_limit
from iot_core_local.server import LocalIotCore
from tests._support.clients import iot_client
from tests._support.devices import ARN, OPEN_POLICY, RawClient, new_device, write_credentials
from tests._support.logs import watch_log

GATEWAY_LOG = "iot_core_local.gateway"


@pytest.fixture
def creds_dir(tmp_path: Path) -> Path:
    return tmp_path / "creds"


def _core(tmp_path: Path, **limits: Any) -> LocalIotCore:
    return LocalIotCore(tmp_path / "data", gateway_limits=GatewayLimits(**limits), key_pool_size=0)


@pytest.fixture
def fast(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalIotCore]:
    """A server with one limit short enough for a test to wait out (`@pytest.mark.parametrize` it)."""
    with _core(tmp_path, **request.param) as running:
        yield running


def _connack(client: RawClient, keep_alive: int) -> mqtt5.ConnAckPacket:
    client.send(mqtt5.ConnectPacket(f"ka-{keep_alive}", clean_start=True, keep_alive=keep_alive))
    packet = client.receive()
    assert isinstance(packet, mqtt5.ConnAckPacket), packet
    return packet


@pytest.mark.parametrize(("asked", "announced"), [(0, 1200), (1201, 1200), (65535, 1200), (60, None)])
def test_keep_alive_above_1200_or_none_becomes_1200(
    iot_core: LocalIotCore, creds_dir: Path, asked: int, announced: int | None
) -> None:
    # AWS IoT Core's answer: 0 (no keep-alive) and anything above 1,200 s get Server Keep Alive 1,200.
    client = RawClient(iot_core, new_device(iot_core, creds_dir, f"ka-{asked}"))
    try:
        connack = _connack(client, asked)
        assert connack.reason_code == 0
        assert connack.server_keep_alive == announced
    finally:
        client.close()


@pytest.mark.parametrize("fast", [{"max_keep_alive": 1}], indirect=True)
def test_silent_client_is_closed_after_one_and_a_half_keep_alives(
    fast: LocalIotCore, creds_dir: Path
) -> None:
    # Before: keep_alive 0 meant 65,535 s of Server Keep Alive, and an idle connection stayed for good.
    client = RawClient(fast, new_device(fast, creds_dir, "idle"))
    try:
        assert _connack(client, 0).server_keep_alive == 1
        seen = client.expect_closed(within=10)  # closed after 1.5 s of silence
        assert [p.reason_code for p in seen if isinstance(p, mqtt5.DisconnectPacket)] == [
            mqtt5.DisconnectReasonCode.KEEP_ALIVE_TIMEOUT
        ]
    finally:
        client.close()


def _silent_sockets(core: LocalIotCore, count: int) -> list[socket.socket]:
    return _silent_sockets_at((core.endpoint.mqtt_host, core.endpoint.mqtt_port), count)


def _silent_sockets_at(address: tuple[str, int], count: int) -> list[socket.socket]:
    return [socket.create_connection(address, timeout=5) for _ in range(count)]


def _closed_at_once(sock: socket.socket) -> bool:
    """True if the server closed `sock` without a byte (a silent socket is otherwise held for 10 s)."""
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except ConnectionError:
        return False


def _close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def test_connections_beyond_the_cap_are_closed_before_tls_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: 1,000 silent sockets exhausted the descriptors, and every failure logged a traceback.
    # The kernel hands connections to accept() in arrival order, so the first three are the ones held.
    with _core(tmp_path, max_connections=3) as core:
        held = _silent_sockets(core, 3)
        refused = _silent_sockets(core, 20)
        try:
            assert all(_closed_at_once(sock) for sock in refused)
            assert all(_still_open(sock) for sock in held)
            assert core.gateway.refused_connections.total == 20
            lines = [r for r in caplog.records if "max_connections" in r.getMessage()]
            assert len(lines) == 1  # the first refusal, at once; the next one after the interval
            assert lines[0].levelno == logging.WARNING
            assert "1 time(s)" in lines[0].getMessage()
        finally:
            _close_all(held + refused)


def test_handshakes_in_flight_per_address_are_capped(tmp_path: Path) -> None:
    # Loopback is exempt by default (every local client shares it); the test opts in.
    with _core(tmp_path, max_handshakes_per_address=4, cap_handshakes_on_loopback=True) as core:
        held = _silent_sockets(core, 4)  # each waits in its TLS handshake (10 s)
        refused = _silent_sockets(core, 3)
        try:
            assert all(_closed_at_once(sock) for sock in refused)
            assert all(_still_open(sock) for sock in held)
            assert core.gateway.refused_handshakes.total == 3
            assert core.gateway.refused_connections.total == 0
        finally:
            _close_all(held + refused)


@pytest.mark.parametrize("fast", [{"client_drain_timeout": 1.0}], indirect=True)
def test_subscriber_that_does_not_read_is_closed(
    fast: LocalIotCore, creds_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: Mosquitto held ~100 MB for each subscriber that never read, and never disconnected it.
    creds = new_device(fast, creds_dir, "flood")
    deaf = RawClient(fast, creds)
    publisher = RawClient(fast, creds)
    try:
        assert deaf.connect("deaf-sub").reason_code == 0
        # QoS 0: Mosquitto's in-flight window (a QoS 1 subscriber that never acknowledges) does not
        # stop the flow, so only the gateway's drain timeout can.
        deaf.send(mqtt5.SubscribePacket(1, [mqtt5.TopicFilter("flood/#", max_qos=mqtt5.QoS.AT_MOST_ONCE)]))
        assert deaf.receive_type(mqtt5.SubAckPacket).reason_codes == [
            mqtt5.SubAckReasonCode.GRANTED_QOS_AT_MOST_ONCE
        ]
        assert publisher.connect("flooder").reason_code == 0
        payload = b"x" * 64 * 1024
        with watch_log(GATEWAY_LOG, lambda m: "'deaf-sub'" in m and "did not read" in m) as closed:
            # Far more than every socket buffer on the way; stops as soon as the gateway gave up.
            for i in range(4000):
                if closed.seen.is_set():
                    break
                publisher.publish("flood/x", payload, qos=0)
                if i % 50 == 49:  # a round trip now and then, so the flood does not outrun the broker
                    assert publisher.publish("flood/x", payload, qos=1) == 0
            assert closed.wait(timeout=10)
        # One line per interval for every such close (resources.LimitLog), naming the last connection.
        assert fast.gateway.stuck_clients.total == 1
        lines = [r for r in caplog.records if "did not read" in r.getMessage() and r.levelno >= logging.INFO]
        assert len(lines) == 1
        assert lines[0].levelno == logging.WARNING
        assert "1 time(s) in the last" in lines[0].getMessage()
        deaf.expect_closed(within=10)  # what was in flight, then the end of the connection
        # Unregistered before the socket closes (the warning above comes earlier, from the drain timeout).
        assert fast.gateway.connection("deaf-sub") is None
        # The publisher and the broker are unharmed.
        assert publisher.publish("flood/x", b"after", qos=1) == 0
    finally:
        deaf.close()
        publisher.close()


def test_broker_queues_are_bounded_in_messages_and_bytes(iot_core: LocalIotCore) -> None:
    conf = (iot_core.data_dir / "mosquitto" / "mosquitto.conf").read_text(encoding="utf-8").splitlines()
    limits = BrokerLimits()
    assert f"max_queued_messages {limits.max_queued_messages}" in conf
    assert f"max_queued_bytes {limits.max_queued_bytes}" in conf
    assert f"max_inflight_messages {limits.max_inflight_messages}" in conf
    with pytest.raises(ValueError, match="max_queued_bytes"):
        BrokerLimits(max_queued_bytes=0)  # Mosquitto's "no maximum" is not a bound


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_subscriber_that_does_not_read_costs_mosquitto_a_bounded_queue(
    tmp_path: Path, creds_dir: Path
) -> None:
    # Before: Mosquitto held ~100 MB for each subscriber that never read. Here the gateway's own drain
    # timeout is out of reach, so only Mosquitto's per-client bounds can stop the growth: 48 MB
    # published to the deaf subscriber must cost Mosquitto a small fraction of that, the rest dropped.
    limits = BrokerLimits(max_queued_messages=100, max_queued_bytes=256 * 1024)
    with LocalIotCore(
        tmp_path / "data",
        gateway_limits=GatewayLimits(client_drain_timeout=600.0),
        broker_limits=limits,
        key_pool_size=0,
    ) as core:
        broker = int((core.data_dir / "mosquitto" / "mosquitto.pid").read_text())
        creds = new_device(core, creds_dir, "queue")
        deaf, publisher = RawClient(core, creds), RawClient(core, creds)
        try:
            assert deaf.connect("deaf-queue").reason_code == 0
            assert deaf.subscribe("queue/#") == [1]  # QoS 1: queued by Mosquitto while in flight
            assert publisher.connect("queue-flooder").reason_code == 0
            before = _rss_mb(broker)
            payload = b"q" * 64 * 1024
            for i in range(768):  # 48 MB
                # A round trip now and then, so the flood does not outrun the broker; the last PUBACK
                # comes once Mosquitto has queued or dropped everything before it.
                qos = 1 if i % 16 == 15 else 0
                assert publisher.publish("queue/x", payload, qos=qos) in (0, None)
            grown = _rss_mb(broker) - before
            assert core.gateway.connection("deaf-queue") is not None  # still connected: the queue held
        finally:
            deaf.close()
            publisher.close()
        # Mosquitto says so itself (log_type notice): it dropped what exceeded the queue.
        assert (
            "Outgoing messages are being dropped"
            in (core.data_dir / "mosquitto" / "mosquitto.log").read_text()
        )
    assert grown < 12, f"Mosquitto grew by {grown:.1f} MB for one subscriber that does not read"


def test_serve_flags_set_the_limits(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    command = [sys.executable, "-m", "iot_core_local", "serve", "--data-dir", str(data_dir)]
    flags = ["--max-keep-alive", "30", "--max-queued-messages", "7", "--max-queued-bytes", "70000"]
    with subprocess.Popen(
        [*command, "--mqtt-port", "0", "--api-port", "0", "--max-connections", "5", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    ) as proc:
        try:
            assert proc.stdout is not None
            endpoint = json.loads(proc.stdout.readline())
            conf = (data_dir / "mosquitto" / "mosquitto.conf").read_text(encoding="utf-8").splitlines()
            assert "max_queued_messages 7" in conf
            assert "max_queued_bytes 70000" in conf
            iot = iot_client(endpoint["apiUrl"])
            created = iot.create_keys_and_certificate(setAsActive=True)
            iot.create_policy(policyName="open", policyDocument=OPEN_POLICY)
            iot.attach_policy(policyName="open", target=created["certificateArn"])
            creds = write_credentials(
                tmp_path,
                "flags",
                created["certificateId"],
                created["certificatePem"],
                created["keyPair"]["PrivateKey"],
            )
            context = ssl.create_default_context(cafile=endpoint["rootCaPath"])
            context.load_cert_chain(creds.cert_path, creds.key_path)
            address = (endpoint["mqttHost"], endpoint["mqttPort"])
            with (
                socket.create_connection(address, timeout=5) as raw,
                context.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                tls.sendall(mqtt5.ConnectPacket("flags", clean_start=True, keep_alive=0).write())
                connack, _ = mqtt5.read(memoryview(tls.recv(4096)))
                assert isinstance(connack, mqtt5.ConnAckPacket)
                assert connack.server_keep_alive == 30
                # max_connections 5: this one and four more; the sixth is closed before TLS.
                held = _silent_sockets_at(address, 5)
                try:
                    assert all(_still_open(sock) for sock in held[:4])
                    assert _closed_at_once(held[4])
                finally:
                    _close_all(held)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0


@pytest.mark.parametrize(
    ("flag", "value"), [("--max-connections", "0"), ("--max-queued-bytes", "-1"), ("--max-keep-alive", "x")]
)
def test_a_limit_flag_out_of_range_is_a_usage_error(
    flag: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--data-dir", str(tmp_path / "d"), flag, value]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err.splitlines()[-1]
    assert not (tmp_path / "d").exists()


def test_the_limit_flags_default_to_the_limits_own_defaults() -> None:
    # cli.py writes them out (it must parse without the [server] extra); they must not drift.
    for flag, owner, default, *_ in LIMIT_FLAGS:
        limits = GatewayLimits() if owner == "gateway" else BrokerLimits()
        assert getattr(limits, flag.replace("-", "_")) == default, flag


def test_open_file_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert raise_open_file_limit() == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if hard != resource.RLIM_INFINITY:
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    assert soft <= resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_limit_log_writes_one_line_per_interval_with_the_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    limit = LimitLog(logging.getLogger("test.limits"), "refused", 10.0, clock=clock)
    with caplog.at_level(logging.WARNING, "test.limits"):
        for _ in range(1000):
            limit.hit()
        clock.now = 10.0
        limit.hit("the last one")
    messages = [r.getMessage() for r in caplog.records if r.name == "test.limits"]
    assert messages == [
        "refused: 1 time(s) in the last 10 s",
        "refused: 1000 time(s) in the last 10 s (last: the last one)",
    ]
    assert limit.total == 1001


def _counting(prefix: str, count: int) -> Callable[[str], bool]:
    """A log match true once `count` records starting with `prefix` were seen (each is written at
    INFO or DEBUG: one per event, whether or not it makes the interval's line)."""
    seen = 0

    def match(message: str) -> bool:
        nonlocal seen
        if message.startswith(prefix):
            seen += 1
        return seen >= count

    return match


def test_failed_tls_handshakes_are_logged_once_per_interval(
    iot_core: LocalIotCore, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: one INFO line per connection; one local client sending non-TLS bytes for 5 s made 16,280
    # lines (2.6 MB). Now one line per interval, the count and the last connection, and each at DEBUG.
    caplog.set_level(logging.INFO)
    address = (iot_core.endpoint.mqtt_host, iot_core.endpoint.mqtt_port)
    flood = 30
    prefix = "connections closed in the TLS handshake"
    with watch_log(GATEWAY_LOG, _counting(prefix, flood), level=logging.DEBUG) as all_seen:
        for _ in range(flood):
            with socket.create_connection(address, timeout=5) as sock:
                sock.sendall(b"\x16\x03\x01\x00\x05garbage-not-tls" * 4)
                assert _closed_at_once(sock)
        assert all_seen.wait(timeout=10)
    assert iot_core.gateway.failed_handshakes.total == flood
    lines = [r for r in caplog.records if r.name == GATEWAY_LOG and r.levelno >= logging.INFO]
    assert [r.getMessage().split(":")[0] for r in lines] == [
        prefix + " (no TLS, no or untrusted client certificate, or timed out)"
    ]
    assert lines[0].levelno == logging.INFO
    assert "1 time(s) in the last" in lines[0].getMessage()


def test_connections_closed_before_connect_are_logged_once_per_interval(
    iot_core: LocalIotCore, creds_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A client with a certificate the TLS layer trusts (a revoked one, say) closing before its CONNECT,
    # or sending something else, used to write a line per connection too.
    caplog.set_level(logging.INFO)
    creds = new_device(iot_core, creds_dir, "quiet")
    flood = 20
    prefix = "connections closed before a valid CONNECT"
    with watch_log(GATEWAY_LOG, _counting(prefix, flood), level=logging.DEBUG) as all_seen:
        for i in range(flood):
            client = RawClient(iot_core, creds)
            if i % 2:
                client.send_raw(b"\x30\x02\x00\x00")  # a PUBLISH first
            client.close()
        assert all_seen.wait(timeout=10)
    assert iot_core.gateway.closed_before_connect.total == flood
    lines = [r for r in caplog.records if r.name == GATEWAY_LOG and r.levelno >= logging.INFO]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].getMessage().startswith(prefix)
    assert "1 time(s) in the last" in lines[0].getMessage()


def test_connections_refused_for_their_certificate_are_logged_once_per_interval(
    iot_core: LocalIotCore, creds_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    creds = new_device(iot_core, creds_dir, "revoked", status="REVOKED")
    flood = 10
    prefix = "connections refused for their certificate"
    with watch_log(GATEWAY_LOG, _counting(prefix, flood), level=logging.DEBUG) as all_seen:
        for i in range(flood):
            client = RawClient(iot_core, creds)
            try:
                client.send(mqtt5.ConnectPacket(f"revoked-{i}", clean_start=True, keep_alive=30))
                client.expect_closed(within=5)
            finally:
                client.close()
        assert all_seen.wait(timeout=10)
    lines = [r for r in caplog.records if r.name == GATEWAY_LOG and r.levelno >= logging.INFO]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].getMessage().startswith(prefix)
    assert "certificate is REVOKED" in lines[0].getMessage()  # the first one's detail, at once


def test_refusals_of_an_active_certificate_and_rejected_requests_are_logged_once_per_interval(
    iot_core: LocalIotCore, creds_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Every hub holds the fleet's claim: before, a hub could write a line per CONNECT its policy refuses
    # and per request answered /rejected (310 lines in 3.3 s from one connection), as an outsider could
    # before the pre-authentication closes were counted.
    caplog.set_level(logging.INFO)
    creds = new_device(iot_core, creds_dir, "narrow")
    iot = iot_core.client()
    document = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
            {"Effect": "Deny", "Action": "iot:Connect", "Resource": f"{ARN}:client/victim-*"},
            {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": f"{ARN}:topic/$aws/*"},
            {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": f"{ARN}:topicfilter/$aws/*"},
        ],
    }
    iot.create_policy(policyName="narrow-claim", policyDocument=json.dumps(document))
    iot.attach_policy(policyName="narrow-claim", target=f"{ARN}:cert/{creds.certificate_id}")
    flood = 10
    refused = "connections of an ACTIVE certificate closed before CONNACK"
    with watch_log(GATEWAY_LOG, _counting(refused, flood), level=logging.DEBUG) as all_refused:
        for i in range(flood):
            client = RawClient(iot_core, creds)
            try:
                assert client.connect(f"victim-{i}").reason_code == mqtt5.ConnAckReasonCode.NOT_AUTHORIZED
            finally:
                client.close()
        assert all_refused.wait(timeout=10)
    rejected = "provisioning requests answered /rejected"
    client = RawClient(iot_core, creds)
    try:
        assert client.connect("narrow-ok").reason_code == 0
        with watch_log(GATEWAY_LOG, _counting(rejected, flood), level=logging.DEBUG) as all_rejected:
            for _ in range(flood):  # a token that was never issued: /rejected 400 each time
                kind, _ = client.ask(
                    "$aws/provisioning-templates/NoSuchTemplate/provision/json",
                    json.dumps({"certificateOwnershipToken": "x", "parameters": {}}).encode(),
                )
                assert kind == "rejected"
            assert all_rejected.wait(timeout=10)
    finally:
        client.close()
    lines = [r.getMessage() for r in caplog.records if r.name == GATEWAY_LOG and r.levelno >= logging.INFO]
    assert len([m for m in lines if m.startswith(refused)]) == 1, lines
    assert len([m for m in lines if m.startswith(rejected)]) == 1, lines
    assert not [m for m in lines if "victim-" in m and not m.startswith(refused)]
