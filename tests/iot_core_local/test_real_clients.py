"""Issue 11's limits and AWS rules as real clients see them: paho-mqtt (MQTT 5 and 3.1.1), awsiotsdk on
awscrt (MQTT 5 and its MQTT 3 connection, with IotIdentityClientV2) and Mosquitto's tools in 3.1.1 mode.

The other files show these points with `RawClient`, which sees every byte; here each is shown through
clients other people use, asserting what those clients report: CONNACK properties and reason codes,
PUBACK codes, DISCONNECT reasons, the `/rejected` documents IotIdentityClientV2 parses.

paho runs without its thread: each test drives `loop()` until the event it waits for, so a client that
must stop reading simply is not looped, and nothing is left running after a test.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from iot_core_local.gateway import GatewayLimits
from iot_core_local.quotas import Quotas
from iot_core_local.recipes.claims import set_up_fleet_provisioning
from iot_core_local.server import LocalIotCore
from tests._support.clients import crt_mqtt3_connection, identity_client, register_thing
from tests._support.devices import (
    ARN,
    OK,
    Credentials,
    allow_policy,
    device_of_a_registered_ca,
    make_csr,
    mosquitto_tool,
    new_device,
    write_credentials,
)
from tests._support.fake_cloud import FakeClock
from tests._support.logs import watch_log

GATEWAY_LOG = "iot_core_local.gateway"
CSR_RATE = 2.0  # CreateCertificateFromCsr per second: a third request within a second is throttled


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory, clock: FakeClock) -> Iterator[LocalIotCore]:
    # One server for the module: its drain timeout short enough to wait out (the default is 30 s), and
    # one quota on a clock the tests move, so throttling depends on no real time; nothing else throttled.
    with LocalIotCore(
        tmp_path_factory.mktemp("real") / "data",
        gateway_limits=GatewayLimits(client_drain_timeout=1.0),
        quotas=Quotas({"fleet:CreateCertificateFromCsr": CSR_RATE}),
        quota_clock=clock.now,
    ) as running:
        yield running


@pytest.fixture
def creds_dir(tmp_path: Path) -> Path:
    return tmp_path / "creds"


# ---- paho, driven by hand -----------------------------------------------------------------------


class PahoProbe:
    """paho-mqtt 2.x over TLS with a device certificate, looped by the test; what it heard, on events."""

    def __init__(
        self,
        core: LocalIotCore,
        creds: Credentials,
        client_id: str,
        protocol: MQTTProtocolVersion = paho.MQTTv5,
    ) -> None:
        self.core = core
        self.client_id = client_id
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        self.client.tls_set(
            ca_certs=str(core.endpoint.root_ca_path), certfile=creds.cert_path, keyfile=creds.key_path
        )
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connack: tuple[ReasonCode, Any] | None = None
        self.disconnect_reason: ReasonCode | None = None
        self.subacks: list[list[int]] = []
        self.acks: dict[int, int] = {}  # message id -> PUBACK reason code (0 for QoS 0 once written)
        self.messages: list[paho.MQTTMessage] = []
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.subacks.append([x.value for x in codes])
        self.client.on_publish = lambda c, u, mid, rc, p: self.acks.__setitem__(mid, rc.value)
        self.client.on_message = lambda c, u, message: self.messages.append(message)

    def _on_connect(self, c: Any, u: Any, flags: Any, reason: ReasonCode, properties: Any) -> None:
        self.connack = (reason, properties)
        self.connected.set()

    def _on_disconnect(self, c: Any, u: Any, flags: Any, reason: ReasonCode, properties: Any) -> None:
        self.disconnect_reason = reason
        self.disconnected.set()

    def loop_until(self, done: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
        """Run paho's network loop until `done()`; fail naming `what` if that takes over `timeout`."""
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"{self.client_id}: {what} within {timeout} s"
            self.client.loop(timeout=0.05)

    def connect(self, keepalive: int = 30) -> int:
        """Connect; the CONNACK's reason code (paho gives 3.1.1 return codes as MQTT 5 reason codes)."""
        self.client.connect(self.core.endpoint.mqtt_host, self.core.endpoint.mqtt_port, keepalive=keepalive)
        self.loop_until(self.connected.is_set, "a CONNACK")
        assert self.connack is not None
        return int(self.connack[0].value)

    def subscribe(self, pattern: str, qos: int = 1) -> list[int]:
        before = len(self.subacks)
        self.client.subscribe(pattern, qos)
        self.loop_until(lambda: len(self.subacks) > before, f"a SUBACK for {pattern}")
        return self.subacks[-1]

    def send(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Publish without waiting; the message id."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        return int(info.mid)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Publish; the PUBACK's reason code (QoS 0: 0 once the message is written)."""
        mid = self.send(topic, payload, qos, retain)
        self.loop_until(lambda: mid in self.acks, f"the PUBACK of {topic}")
        return self.acks.pop(mid)

    def wait_messages(self, count: int, timeout: float = 5.0) -> list[paho.MQTTMessage]:
        self.loop_until(lambda: len(self.messages) >= count, f"{count} message(s)", timeout)
        return self.messages

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()  # writes DISCONNECT and closes the socket, if still connected
        sock = self.client.socket()
        if sock is not None:
            sock.close()


@contextlib.contextmanager
def paho_clients(*clients: PahoProbe) -> Iterator[None]:
    try:
        yield
    finally:
        for client in clients:
            client.close()


# ---- awscrt --------------------------------------------------------------------------------------


@dataclass
class Crt5:
    """An awscrt MQTT 5 client (awsiot mqtt5_client_builder) and its lifecycle, as futures."""

    client: Any
    connected: Future[tuple[bool, Any]]  # (success, lifecycle data) of the first attempt
    disconnected: Future[tuple[float, Any]]  # (time.monotonic(), LifecycleDisconnectData) of the first
    stopped: threading.Event

    def stop(self) -> None:
        self.client.stop()
        assert self.stopped.wait(5), "the awscrt client did not stop within 5 s"


def _settle(future: Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def crt5(core: LocalIotCore, creds: Credentials, client_id: str, **options: Any) -> Crt5:
    """Started; wait on `connected`."""
    from awscrt import mqtt5 as crt_mqtt5
    from awsiot import mqtt5_client_builder

    connected: Future[tuple[bool, Any]] = Future()
    disconnected: Future[tuple[float, Any]] = Future()
    stopped = threading.Event()
    client = mqtt5_client_builder.mtls_from_path(
        cert_filepath=creds.cert_path,
        pri_key_filepath=creds.key_path,
        endpoint=core.endpoint.mqtt_host,
        port=core.endpoint.mqtt_port,
        ca_filepath=str(core.endpoint.root_ca_path),
        client_id=client_id,
        session_behavior=crt_mqtt5.ClientSessionBehaviorType.CLEAN,
        on_lifecycle_connection_success=lambda data: _settle(connected, (True, data)),
        on_lifecycle_connection_failure=lambda data: _settle(connected, (False, data)),
        on_lifecycle_disconnection=lambda data: _settle(disconnected, (time.monotonic(), data)),
        on_lifecycle_stopped=lambda data: stopped.set(),
        **options,
    )
    client.start()
    return Crt5(client, connected, disconnected, stopped)


@contextlib.contextmanager
def identity_over(protocol: str, core: LocalIotCore, creds: Credentials, client_id: str) -> Iterator[Any]:
    """IotIdentityClientV2 over awscrt's MQTT 5 client or its MQTT 3.1.1 connection."""
    if protocol == "mqtt5":
        client = crt5(core, creds, client_id)
        try:
            ok, data = client.connected.result(10)
            assert ok, f"awscrt MQTT 5 could not connect as {client_id}: {data.exception}"
            yield identity_client(client.client)
        finally:
            client.stop()
    else:
        connection = crt_mqtt3_connection(core, creds, client_id)
        try:
            yield identity_client(connection)
        finally:
            connection.disconnect().result(10)


def _service_error(caught: pytest.ExceptionInfo[Any]) -> tuple[int, str, str]:
    """(statusCode, errorCode, errorMessage) of the `/rejected` document awsiotsdk parsed."""
    error = caught.value.modeled_error
    assert error is not None, f"no /rejected answer, but {caught.value.inner_error!r}"
    return error.status_code, error.error_code, error.error_message


# ---- Mosquitto's tools ---------------------------------------------------------------------------


def publish_311(
    core: LocalIotCore, creds: Credentials, client_id: str, topic: str, message: str, *options: str
) -> subprocess.CompletedProcess[str]:
    """mosquitto_pub at QoS 1: it exits 0 once the PUBACK came, non-zero if the connection closed first."""
    return mosquitto_tool(
        core, creds, "mosquitto_pub", "-i", client_id, "-q", "1", "-t", topic, "-m", message, *options
    )


# ---- point 3: server keep-alive at most 1,200 s; a subscriber that does not read is closed ------


@pytest.mark.parametrize(("asked", "announced"), [(0, 1200), (1201, 1200), (65535, 1200), (60, None)])
def test_paho_is_told_a_server_keep_alive_of_at_most_1200(
    core: LocalIotCore, creds_dir: Path, asked: int, announced: int | None
) -> None:
    # AWS IoT Core: 0 (no keep-alive) and anything above 1,200 s get Server Keep Alive 1,200.
    client = PahoProbe(core, new_device(core, creds_dir, f"ka-{asked}"), f"ka-paho-{asked}")
    with paho_clients(client):
        assert client.connect(keepalive=asked) == 0
        assert client.connack is not None
        assert getattr(client.connack[1], "ServerKeepAlive", None) == announced


def test_awscrt_negotiates_a_keep_alive_of_1200(core: LocalIotCore, creds_dir: Path) -> None:
    client = crt5(core, new_device(core, creds_dir, "ka-crt"), "ka-crt", keep_alive_interval_sec=3600)
    try:
        ok, data = client.connected.result(10)
        assert ok, data.exception
        assert data.connack_packet.server_keep_alive_sec == 1200
        assert data.negotiated_settings.server_keep_alive_sec == 1200  # what awscrt pings by
    finally:
        client.stop()


def test_a_paho_subscriber_that_does_not_read_is_disconnected(core: LocalIotCore, creds_dir: Path) -> None:
    # Before: Mosquitto held ~100 MB for each subscriber that never read, and never disconnected it.
    creds = new_device(core, creds_dir, "deaf")
    deaf, flooder = PahoProbe(core, creds, "deaf-paho"), PahoProbe(core, creds, "flooder-paho")
    with paho_clients(deaf, flooder):
        assert deaf.connect() == 0
        # QoS 0: Mosquitto's in-flight window does not stop the flow, so only the gateway's timeout can.
        assert deaf.subscribe("deaf/#", qos=0) == [0]
        assert flooder.connect() == 0
        # From here the deaf client's loop is not run: paho reads nothing more from its socket.
        payload = b"x" * 64 * 1024
        sent = 0
        with watch_log(GATEWAY_LOG, lambda m: "'deaf-paho'" in m and "did not read" in m) as closed:
            # Far more than every socket buffer on the way; stops as soon as the gateway gave up.
            while not closed.seen.is_set() and sent < 4000:
                # A PUBACK now and then, so the flood does not outrun the broker.
                assert flooder.publish("deaf/x", payload, qos=1 if sent % 50 == 49 else 0) in OK
                sent += 1
            assert closed.wait(timeout=10), f"the gateway kept a subscriber that read nothing ({sent} sent)"
        # The deaf client reads again: what was in flight, then the end of its connection.
        deaf.loop_until(deaf.disconnected.is_set, "the end of the connection", timeout=10)
        assert deaf.disconnect_reason is not None
        assert deaf.disconnect_reason.is_failure  # dropped by the server, not a clean disconnect
        assert len(deaf.messages) < sent  # what could not be delivered was dropped
        assert core.gateway.connection("deaf-paho") is None
        assert flooder.publish("deaf/x", b"after", qos=1) in OK  # the publisher and broker unharmed


# ---- point 5: iot:RetainPublish, client ids over 128 bytes, a CA set INACTIVE --------------------


def _retain_policy(prefix: str) -> str:
    # iot:Publish on the whole prefix, iot:RetainPublish on `allowed` only.
    return allow_policy(
        (["iot:Connect", "iot:Subscribe", "iot:Receive"], "*"),
        ("iot:Publish", f"{ARN}:topic/{prefix}/*"),
        ("iot:RetainPublish", f"{ARN}:topic/{prefix}/allowed"),
    )


def _retained_then_marker(subscriber: PahoProbe, publisher: PahoProbe, prefix: str) -> list[tuple[Any, ...]]:
    """Subscribe to `prefix/#`, then publish a marker: what arrived up to it (retained ones come first)."""
    assert subscriber.subscribe(f"{prefix}/#") == [1]
    assert publisher.publish(f"{prefix}/denied", b"marker") in OK
    subscriber.loop_until(lambda: any(m.payload == b"marker" for m in subscriber.messages), "the marker")
    return [(m.topic, m.payload, m.retain) for m in subscriber.messages]


def test_paho_retained_publish_needs_retain_publish(core: LocalIotCore, creds_dir: Path) -> None:
    """A PUBLISH with RETAIN needs iot:RetainPublish as well as iot:Publish: PUBACK 135 without it."""
    creds = new_device(core, creds_dir, "retain5", policy=_retain_policy("kept5"))
    publisher = PahoProbe(core, creds, "retain5-pub")
    subscriber = PahoProbe(core, new_device(core, creds_dir, "retain5-sub"), "retain5-sub")
    with paho_clients(publisher, subscriber):
        assert publisher.connect() == 0
        assert publisher.publish("kept5/denied", b"x", retain=True) == 135  # not authorized
        assert publisher.publish("kept5/denied", b"live") in OK  # the same topic without RETAIN is fine
        assert publisher.publish("kept5/allowed", b"kept", retain=True) in OK
        assert subscriber.connect() == 0
        assert _retained_then_marker(subscriber, publisher, "kept5") == [
            ("kept5/allowed", b"kept", True),
            ("kept5/denied", b"marker", False),  # nothing was retained on kept5/denied
        ]


def test_mqtt311_retained_publish_needs_retain_publish(core: LocalIotCore, creds_dir: Path) -> None:
    """3.1.1 has no PUBACK reason code: a retained publish without iot:RetainPublish closes the
    connection, as AWS IoT Core closes a 3.1.1 client for any publish it refuses."""
    creds = new_device(core, creds_dir, "retain311", policy=_retain_policy("kept311"))
    denied = publish_311(core, creds, "r311-a", "kept311/denied", "x", "-r")
    assert denied.returncode != 0, "mosquitto_pub's retained publish was acknowledged"
    allowed = publish_311(core, creds, "r311-b", "kept311/allowed", "kept", "-r")
    assert allowed.returncode == 0, allowed.stderr
    live = publish_311(core, creds, "r311-c", "kept311/denied", "live")
    assert live.returncode == 0, live.stderr

    publisher = PahoProbe(core, creds, "retain311-pub", protocol=paho.MQTTv311)
    subscriber = PahoProbe(core, creds, "retain311-sub", protocol=paho.MQTTv311)
    marker = PahoProbe(core, creds, "retain311-marker", protocol=paho.MQTTv311)
    with paho_clients(publisher, subscriber, marker):
        assert publisher.connect() == 0
        mid = publisher.send("kept311/denied", b"x", qos=1, retain=True)
        publisher.loop_until(publisher.disconnected.is_set, "the connection closed")
        assert mid not in publisher.acks  # closed instead of a PUBACK
        assert subscriber.connect() == 0
        assert marker.connect() == 0
        assert _retained_then_marker(subscriber, marker, "kept311") == [
            ("kept311/allowed", b"kept", True),
            ("kept311/denied", b"marker", False),
        ]


@pytest.mark.parametrize("protocol", [paho.MQTTv5, paho.MQTTv311], ids=["mqtt5", "mqtt311"])
@pytest.mark.parametrize(
    ("client_id", "accepted"),
    [("é" * 64, True), ("a" * 129, False), ("é" * 64 + "a", False)],
    ids=["128-bytes", "129-ascii", "129-bytes-utf8"],
)
def test_paho_client_id_over_128_bytes_is_refused(
    core: LocalIotCore, creds_dir: Path, client_id: str, accepted: bool, protocol: MQTTProtocolVersion
) -> None:
    """AWS IoT Core's client id limit is 128 UTF-8 bytes: CONNACK 0x85 (3.1.1: return code 2, which paho
    reports as 0x85 too)."""
    client = PahoProbe(core, new_device(core, creds_dir, "long-id"), client_id, protocol=protocol)
    with paho_clients(client):
        code = client.connect()
        if accepted:
            assert code == 0
        else:
            assert code == 0x85, client.connack
            client.loop_until(client.disconnected.is_set, "the connection closed after CONNACK 0x85")


def test_awscrt_client_id_over_128_bytes_is_refused(core: LocalIotCore, creds_dir: Path) -> None:
    from awscrt.mqtt5 import ConnectReasonCode

    client = crt5(core, new_device(core, creds_dir, "long-id-crt"), "a" * 129)
    try:
        ok, data = client.connected.result(10)
        assert not ok
        assert data.connack_packet.reason_code == ConnectReasonCode.CLIENT_IDENTIFIER_NOT_VALID
    finally:
        client.stop()


def test_mosquitto_pub_client_id_over_128_bytes_is_identifier_rejected(
    core: LocalIotCore, creds_dir: Path
) -> None:
    creds = new_device(core, creds_dir, "long-id-tool")
    refused = mosquitto_tool(core, creds, "mosquitto_pub", "-i", "a" * 129, "-t", "ids/x", "-m", "x")
    assert refused.returncode != 0
    assert "identifier rejected" in refused.stderr  # CONNACK return code 2
    accepted = publish_311(core, creds, "é" * 64, "ids/x", "x")
    assert accepted.returncode == 0, accepted.stderr


def test_ca_set_inactive_disconnects_awscrt_and_paho_devices(core: LocalIotCore, creds_dir: Path) -> None:
    from awscrt.mqtt5 import DisconnectReasonCode

    ca_id, device = device_of_a_registered_ca(core, creds_dir, "ca-off")
    sdk = crt5(core, device, "ca-off-crt")
    old = PahoProbe(core, device, "ca-off-311", protocol=paho.MQTTv311)
    new = PahoProbe(core, device, "ca-off-5")
    bystander = PahoProbe(core, new_device(core, creds_dir, "ca-off-bystander"), "ca-off-bystander")
    try:
        with paho_clients(old, new, bystander):
            ok, data = sdk.connected.result(10)
            assert ok, data.exception
            assert old.connect() == 0
            assert new.connect() == 0
            assert bystander.connect() == 0  # its certificate comes from another CA
            started = time.monotonic()
            core.client().update_ca_certificate(certificateId=ca_id, newStatus="INACTIVE")
            new.loop_until(new.disconnected.is_set, "DISCONNECT after the CA went INACTIVE")
            assert new.disconnect_reason is not None
            assert new.disconnect_reason.value == 152  # administrative action
            old.loop_until(old.disconnected.is_set, "the connection closed after the CA went INACTIVE")
            at, lifecycle = sdk.disconnected.result(5)
            assert lifecycle.disconnect_packet is not None, lifecycle.exception
            assert lifecycle.disconnect_packet.reason_code == DisconnectReasonCode.ADMINISTRATIVE_ACTION
            assert at - started < 5
            assert time.monotonic() - started < 5
            assert bystander.publish("ca-off/still", b"here") in OK  # a device of another CA is untouched
    finally:
        sdk.stop()
    again = PahoProbe(core, device, "ca-off-again")
    with paho_clients(again):
        with contextlib.suppress(OSError):  # refused during TLS, or closed before any CONNACK
            again.client.connect(core.endpoint.mqtt_host, core.endpoint.mqtt_port, keepalive=30)
            again.loop_until(
                lambda: (
                    again.connected.is_set() or again.disconnected.is_set() or again.client.socket() is None
                ),
                "the reconnect refused",
            )
        assert not again.connected.is_set(), f"a device of an INACTIVE CA was answered {again.connack}"


# ---- points 6 and 7: a throttled request, a template past the nesting limit, over MQTT ---------

_claims = iter(range(1_000_000))


@pytest.fixture
def claim(core: LocalIotCore, creds_dir: Path) -> tuple[str, Credentials]:
    """A fleet provisioning template of its own and the claim that may use it."""
    setup = set_up_fleet_provisioning(core.client(), f"Real{next(_claims)}")
    return setup.template_name, write_credentials(
        creds_dir, "claim", setup.certificate_id, setup.certificate_pem, setup.private_key_pem
    )


@pytest.mark.parametrize("protocol", ["mqtt5", "mqtt311"])
def test_awsiotsdk_sees_a_throttled_request_rejected_429(
    core: LocalIotCore, clock: FakeClock, claim: tuple[str, Credentials], protocol: str
) -> None:
    from awsiot import V2ServiceException, iotidentity

    _, creds = claim
    request = iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=make_csr())
    with identity_over(protocol, core, creds, f"quota-{protocol}") as identity:
        clock.advance(10)  # a full bucket: a second's worth, CSR_RATE requests
        for _ in range(int(CSR_RATE)):
            assert identity.create_certificate_from_csr(request).result(10).certificate_id
        with pytest.raises(V2ServiceException) as caught:
            identity.create_certificate_from_csr(request).result(10)
        status, code, message = _service_error(caught)
        assert (status, code) == (429, "ThrottlingException")
        assert "CreateCertificateFromCsr" in message
        clock.advance(1 / CSR_RATE)  # one request's worth back
        assert identity.create_certificate_from_csr(request).result(10).certificate_id


@pytest.mark.parametrize("protocol", ["mqtt5", "mqtt311"])
def test_awsiotsdk_sees_a_template_past_the_nesting_limit_rejected_400(
    core: LocalIotCore, claim: tuple[str, Credentials], protocol: str
) -> None:
    from awsiot import V2ServiceException, iotidentity

    template, creds = claim
    # A body stored before the limit existed (straight into the registry, as an older version wrote it):
    # RegisterThing checks it again, where 200 nested Fn::Sub were a RecursionError (500).
    expr: Any = {"Ref": "SerialNumber"}
    for _ in range(200):
        expr = {"Fn::Sub": ["${V}", {"V": expr}]}
    deep = {
        "Parameters": {"SerialNumber": {"Type": "String"}},
        "Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": expr}}},
    }
    core.registry.update_template(template, body=json.dumps(deep, separators=(",", ":")))
    serial = f"deep-{protocol}"
    with identity_over(protocol, core, creds, serial) as identity:
        issued = identity.create_keys_and_certificate(iotidentity.CreateKeysAndCertificateRequest()).result(
            10
        )
        with pytest.raises(V2ServiceException) as caught:
            register_thing(identity, template, issued.certificate_ownership_token, serial)
    status, code, message = _service_error(caught)
    assert (status, code) == (400, "InvalidRequest")
    assert "nests functions more than 32 deep, the limit" in message
    assert core.registry.find_thing(serial) is None
