"""Bounded resources at the gateway and the broker: keep-alive, connection caps, stuck subscribers."""

from __future__ import annotations

import logging
import resource
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mqtt5
import pytest

from iot_core_local.broker import BrokerLimits
from iot_core_local.gateway import GatewayLimits
from iot_core_local.resources import LimitLog, raise_open_file_limit
from iot_core_local.server import LocalIotCore
from tests._support.devices import RawClient, new_device
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
    address = (core.endpoint.mqtt_host, core.endpoint.mqtt_port)
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
def test_subscriber_that_does_not_read_is_closed(fast: LocalIotCore, creds_dir: Path) -> None:
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
        assert fast.gateway.connection("deaf-sub") is None
        deaf.expect_closed(within=10)  # what was in flight, then the end of the connection
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
