"""MQTT 3.1.1 clients through the gateway, under the rules MQTT 5 clients live by: Mosquitto's own
tools, paho in 3.1.1 mode, awscrt's MQTT 3 client (awsiot `mqtt_connection_builder`) and a raw 3.1.1
client for the exact bytes. 3.1.1 has no reason codes: a refused CONNECT is a CONNACK return code (or
no CONNACK), a refused SUBSCRIBE is SUBACK 0x80, and a refused PUBLISH or any other breach closes the
connection without a DISCONNECT (3.1.1 servers have none)."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import mqtt5
import paho.mqtt.client as paho
import pytest

from iot_core_local.gateway import GatewayLimits
from iot_core_local.recipes.claims import ClaimSetup, set_up_fleet_provisioning
from iot_core_local.server import LocalIotCore
from tests._support.clients import create_keys_and_register, crt_mqtt3_connection, identity_client
from tests._support.devices import (
    ARN,
    OPEN_POLICY,
    Credentials,
    DeviceCA,
    Paho,
    RawClient,
    allow_policy,
    connect_refused_without_connack,
    make_csr,
    mosquitto_tool,
    new_device,
    write_credentials,
)

MQTT311 = paho.MQTTv311
REFUSED_NOT_AUTHORIZED = b"\x20\x02\x00\x05"  # CONNACK, return code 5
REFUSED_IDENTIFIER = b"\x20\x02\x00\x02"  # CONNACK, return code 2
REFUSED_VERSION = b"\x20\x02\x00\x01"  # CONNACK, return code 1


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalIotCore]:
    with LocalIotCore(tmp_path_factory.mktemp("gw311") / "data") as running:
        yield running


@pytest.fixture
def creds_dir(tmp_path: Path) -> Path:
    return tmp_path / "creds"


def _connect(core: LocalIotCore, creds: Credentials, client_id: str, **options: Any) -> RawClient:
    client = RawClient(core, creds, mqtt311=True)
    assert client.connect(client_id, **options).reason_code == 0
    return client


def _answer_bytes(core: LocalIotCore, creds: Credentials, client_id: str, **options: Any) -> bytes:
    """Every byte the gateway sends a 3.1.1 CONNECT before it closes the connection."""
    client = RawClient(core, creds, mqtt311=True)
    try:
        client.send(mqtt5.ConnectPacket(client_id, clean_start=True, keep_alive=60, **options))
        received = b""
        while chunk := client.sock.recv(4096):
            received += chunk
        return received
    finally:
        client.close()


def _closed_silently(client: RawClient) -> bool:
    """The server closed the connection without a word: no DISCONNECT (3.1.1 servers have none), no
    PUBACK; messages delivered before do not count."""
    try:
        seen = client.expect_closed()
    finally:
        client.close()
    return all(isinstance(p, mqtt5.PublishPacket) for p in seen)


# ---- Mosquitto's tools ---------------------------------------------------------------------------


def test_mosquitto_tools_publish_retained_and_subscribe(core: LocalIotCore, creds_dir: Path) -> None:
    creds = new_device(core, creds_dir, "tools")
    published = mosquitto_tool(
        core, creds, "mosquitto_pub", "-i", "tools-pub", "-q", "1", "-r", "-t", "tools/kept", "-m", "v1"
    )
    assert published.returncode == 0, published.stderr
    # The retained message arrives as soon as the subscription is granted: no timing to guess.
    received = mosquitto_tool(
        core, creds, "mosquitto_sub", "-i", "tools-sub", "-q", "1", "-t", "tools/#", "-C", "1", "-W", "10",
        "-F", "%r %q %t %p",
    )  # fmt: skip
    assert received.returncode == 0, received.stderr
    assert received.stdout.split() == ["1", "1", "tools/kept", "v1"]


def test_mosquitto_tools_are_refused_as_aws_refuses_them(core: LocalIotCore, creds_dir: Path) -> None:
    creds = new_device(
        core,
        creds_dir,
        "tools-deny",
        policy=allow_policy(
            ("iot:Connect", f"{ARN}:client/tools-ok"),
            ("iot:Publish", f"{ARN}:topic/tools/open"),
            ("iot:Subscribe", f"{ARN}:topicfilter/tools/open"),
        ),
    )
    refused = mosquitto_tool(core, creds, "mosquitto_pub", "-i", "tools-other", "-t", "tools/open", "-m", "x")
    assert refused.returncode != 0
    assert "not authori" in refused.stderr.lower()  # CONNACK 5, "not authorised"
    denied = mosquitto_tool(
        core, creds, "mosquitto_sub", "-i", "tools-ok", "-t", "tools/closed", "-C", "1", "-W", "5"
    )
    assert "All subscription requests were denied" in denied.stderr  # SUBACK 0x80
    cut = mosquitto_tool(
        core, creds, "mosquitto_pub", "-i", "tools-ok", "-q", "1", "-t", "tools/closed", "-m", "x"
    )
    assert cut.returncode != 0  # disconnected instead of a PUBACK
    allowed = mosquitto_tool(
        core, creds, "mosquitto_pub", "-i", "tools-ok", "-q", "1", "-t", "tools/open", "-m", "x"
    )
    assert allowed.returncode == 0, allowed.stderr


# ---- paho 3.1.1, and 3.1.1 and 5 side by side --------------------------------------------------


def test_paho_311_relays_to_and_from_mqtt5_clients(core: LocalIotCore, creds_dir: Path) -> None:
    creds = new_device(core, creds_dir, "paho311")
    old, new = Paho(core, creds, "paho-311", protocol=MQTT311), RawClient(core, creds)
    try:
        assert old.connect() == 0
        assert new.connect("paho-5").reason_code == 0
        assert old.subscribe("mixed/to311", qos=2) == [1]  # QoS 2 asked, QoS 1 granted, as AWS does
        assert new.subscribe("mixed/to5") == [1]
        assert new.publish("mixed/to311", b"from 5", qos=1) in (0, 16)
        got = old.message()
        assert (got.topic, got.payload, got.qos) == ("mixed/to311", b"from 5", 1)
        assert old.publish("mixed/to5", b"from 3.1.1", qos=1) == 0
        assert old.publish("mixed/to5", b"qos 0", qos=0) is None
        payloads = [new.receive_type(mqtt5.PublishPacket).payload for _ in range(2)]
        assert payloads == [b"from 3.1.1", b"qos 0"]
    finally:
        old.close()
        new.close()


# ---- awscrt's MQTT 3 client, and fleet provisioning over 3.1.1 ----------------------------------


def test_awscrt_mqtt3_client_publishes_and_subscribes(core: LocalIotCore, creds_dir: Path) -> None:
    from awscrt import mqtt

    creds = new_device(core, creds_dir, "crt3")
    connection = crt_mqtt3_connection(core, creds, "crt3")
    messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
    try:
        subscribed, _ = connection.subscribe(
            "crt3/echo", mqtt.QoS.AT_LEAST_ONCE, lambda topic, payload, **kw: messages.put((topic, payload))
        )
        assert subscribed.result(10)["qos"] == mqtt.QoS.AT_LEAST_ONCE
        published, _ = connection.publish("crt3/echo", b"round trip", mqtt.QoS.AT_LEAST_ONCE)
        published.result(10)
        assert messages.get(timeout=5) == ("crt3/echo", b"round trip")
    finally:
        connection.disconnect().result(10)


def test_fleet_provisioning_with_awscrt_mqtt3_then_the_hub_policy(
    core: LocalIotCore, creds_dir: Path
) -> None:

    setup = set_up_fleet_provisioning(core.client(), "Tmpl311")
    claim = write_credentials(
        creds_dir, "claim", setup.certificate_id, setup.certificate_pem, setup.private_key_pem
    )
    connection = crt_mqtt3_connection(core, claim, "claim-311")  # claims may not use hub-* ids
    try:
        issued, registered = create_keys_and_register(
            identity_client(connection), setup.template_name, "SN311"
        )
    finally:
        connection.disconnect().result(10)
    assert registered.thing_name == "hub-SN311"
    assert core.registry.get_certificate(issued.certificate_id).status == "ACTIVE"

    # The provisioned hub reconnects with its new certificate, as its thing; any other id is refused.
    device = write_credentials(
        creds_dir, "device", issued.certificate_id, issued.certificate_pem, issued.private_key
    )
    hub = Paho(core, device, "hub-SN311", protocol=MQTT311)
    try:
        assert hub.connect() == 0
    finally:
        hub.close()
    assert _answer_bytes(core, device, "someone-else") == REFUSED_NOT_AUTHORIZED


@pytest.fixture
def claim(core: LocalIotCore, creds_dir: Path) -> tuple[ClaimSetup, Credentials]:
    setup = set_up_fleet_provisioning(core.client(), f"Tmpl311-{creds_dir.parent.name[-12:]}")
    return setup, write_credentials(
        creds_dir, "claim", setup.certificate_id, setup.certificate_pem, setup.private_key_pem
    )


def _request(client: RawClient, topic: str, payload: bytes) -> tuple[str, Any]:
    assert client.subscribe(f"{topic}/accepted", f"{topic}/rejected") == [1, 1]
    assert client.publish(topic, payload) == 0
    answer = client.receive_type(mqtt5.PublishPacket)
    decoded = cbor2.loads(answer.payload) if topic.endswith("/cbor") else json.loads(answer.payload)
    return answer.topic.rsplit("/", 1)[1], decoded


def test_csr_and_cbor_requests_over_311(core: LocalIotCore, claim: tuple[ClaimSetup, Credentials]) -> None:
    setup, creds = claim
    client = _connect(core, creds, "claim-csr-311")
    try:
        outcome, body = _request(
            client,
            "$aws/certificates/create-from-csr/json",
            json.dumps({"certificateSigningRequest": make_csr()}).encode(),
        )
        assert outcome == "accepted", body
        assert core.registry.get_certificate(body["certificateId"]).status == "PENDING_ACTIVATION"
        outcome, issued = _request(client, "$aws/certificates/create/cbor", b"")
        assert outcome == "accepted", issued
        register = f"$aws/provisioning-templates/{setup.template_name}/provision/cbor"
        token = issued["certificateOwnershipToken"]
        outcome, answer = _request(
            client,
            register,
            cbor2.dumps({"certificateOwnershipToken": token, "parameters": {"SerialNumber": "C311"}}),
        )
        assert outcome == "accepted", answer
        assert answer["thingName"] == "hub-C311"
        outcome, rejected = _request(client, register, cbor2.dumps({"certificateOwnershipToken": "forged"}))
        assert outcome == "rejected"
        assert rejected["statusCode"] == 400
    finally:
        client.close()


def test_each_311_hub_sees_only_its_own_answer(
    core: LocalIotCore, claim: tuple[ClaimSetup, Credentials]
) -> None:
    _, creds = claim
    topic = "$aws/certificates/create/json"
    first, second = _connect(core, creds, "claim-311-a"), _connect(core, creds, "claim-311-b")
    try:
        for client in (first, second):
            assert client.subscribe(f"{topic}/accepted", f"{topic}/rejected") == [1, 1]
        assert first.publish(topic, b"{}") == 0
        assert second.publish(topic, b"{}") == 0
        mine = [json.loads(c.receive_type(mqtt5.PublishPacket).payload) for c in (first, second)]
        assert mine[0]["certificateId"] != mine[1]["certificateId"]
        for client in (first, second):  # neither hub sees the other's private key
            client.sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                client.receive_type(mqtt5.PublishPacket)
    finally:
        first.close()
        second.close()


def test_claim_publishing_outside_provisioning_is_disconnected(
    core: LocalIotCore, claim: tuple[ClaimSetup, Credentials]
) -> None:
    _, creds = claim
    client = _connect(core, creds, "claim-311-stray")
    client.send(mqtt5.PublishPacket("things/hub/data", b"x", qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=1))
    assert _closed_silently(client)


# ---- policies, each way -------------------------------------------------------------------------


def test_policy_denials_each_way(core: LocalIotCore, creds_dir: Path) -> None:
    policy = allow_policy(
        ("iot:Connect", f"{ARN}:client/pol-*"),
        (["iot:Publish", "iot:Subscribe"], [f"{ARN}:topic/ok/*", f"{ARN}:topicfilter/ok/*"]),
        ("iot:Receive", f"{ARN}:topic/ok/a"),
    )
    creds = new_device(core, creds_dir, "pol311", policy=policy)
    assert _answer_bytes(core, creds, "not-pol") == REFUSED_NOT_AUTHORIZED
    assert (
        _answer_bytes(core, creds, "pol-will", will=mqtt5.Will("no/will", payload=b"x"))
        == REFUSED_NOT_AUTHORIZED
    )
    sender = RawClient(core, new_device(core, creds_dir, "pol311-sender"), mqtt311=True)
    client = _connect(core, creds, "pol-1")
    try:
        assert sender.connect("pol-sender").reason_code == 0
        assert client.subscribe("ok/+", "no/a") == [1, 0x80]  # the denied filter alone gets 0x80
        # iot:Receive: ok/b is withheld, ok/a (published after it) arrives.
        assert sender.publish("ok/b", b"withheld") == 0
        assert sender.publish("ok/a", b"delivered") == 0
        got = client.receive_type(mqtt5.PublishPacket)
        assert (got.topic, got.payload) == ("ok/a", b"delivered")
        assert client.publish("ok/a", b"allowed") == 0
        # A retained publish needs iot:RetainPublish too; without it, as any denied publish: closed.
        client.send(
            mqtt5.PublishPacket("ok/a", b"kept", qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=90, retain=True)
        )
        assert _closed_silently(client)
    finally:
        sender.close()
        client.close()
    for qos, packet_id in ((mqtt5.QoS.AT_MOST_ONCE, None), (mqtt5.QoS.AT_LEAST_ONCE, 5)):
        client = _connect(core, creds, "pol-2")
        client.send(mqtt5.PublishPacket("no/a", b"x", qos=qos, packet_id=packet_id))
        assert _closed_silently(client)


# ---- limits, client ids, QoS 2, wills, keep-alive, JITR ------------------------------------------


def test_client_id_rules(core: LocalIotCore, creds_dir: Path) -> None:
    creds = new_device(core, creds_dir, "ids311")
    assert _answer_bytes(core, creds, "x" * 129) == REFUSED_IDENTIFIER
    assert _answer_bytes(core, creds, "") == REFUSED_IDENTIFIER  # the gateway cannot learn Mosquitto's
    _connect(core, creds, "é" * 64).close()  # 128 bytes: accepted
    # One connection per client id, across protocol versions.
    v5 = RawClient(core, creds)
    assert v5.connect("shared-id").reason_code == 0
    v311 = _connect(core, creds, "shared-id")
    seen = v5.expect_closed()
    v5.close()
    assert [p.reason_code for p in seen if isinstance(p, mqtt5.DisconnectPacket)] == [
        mqtt5.DisconnectReasonCode.SESSION_TAKEN_OVER
    ]
    again = RawClient(core, creds)
    try:
        assert again.connect("shared-id").reason_code == 0
        assert _closed_silently(v311)
    finally:
        again.close()


def test_aws_limits(core: LocalIotCore, creds_dir: Path) -> None:
    creds = new_device(core, creds_dir, "limits311")
    client = _connect(core, creds, "limits-311")
    # More than 8 filters in one SUBSCRIBE: all refused (MQTT 5 says "quota exceeded"; 3.1.1 says 0x80).
    assert client.subscribe(*(f"l/{i}" for i in range(9))) == [0x80] * 9
    assert client.subscribe("l/" + "x" * 255, "l/ok") == [0x80, 1]  # a filter over 256 bytes
    for i in range(49):  # 50 subscriptions per connection, "l/ok" included
        assert client.subscribe(f"l/{i}") == [1]
    assert client.subscribe("l/one-too-many") == [0x80]
    client.send(mqtt5.PublishPacket("l/a/b/c/d/e/f/g/h", b"x", qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=1))
    assert _closed_silently(client)  # 8 slashes
    client = _connect(core, creds, "limits-311")
    client.send(mqtt5.PublishPacket("l/big", b"x" * (128 * 1024 + 1)))
    assert _closed_silently(client)


def test_qos2(core: LocalIotCore, creds_dir: Path) -> None:
    client = _connect(core, new_device(core, creds_dir, "qos2-311"), "qos2-311")
    client.send(mqtt5.SubscribePacket(1, [mqtt5.TopicFilter("q/2", max_qos=mqtt5.QoS.EXACTLY_ONCE)]))
    assert client.receive_type(mqtt5.SubAckPacket).reason_codes == [mqtt5.SubAckReasonCode(1)]
    client.send(mqtt5.PublishPacket("q/2", b"x", qos=mqtt5.QoS.EXACTLY_ONCE, packet_id=2))
    assert _closed_silently(client)


def test_will_is_published_when_the_client_drops(core: LocalIotCore, creds_dir: Path) -> None:
    creds = new_device(core, creds_dir, "will311")
    watcher = _connect(core, creds, "will-watcher")
    try:
        assert watcher.subscribe("wills/#") == [1]
        will = mqtt5.Will("wills/dev", payload=b"gone", qos=mqtt5.QoS.AT_LEAST_ONCE)
        dying = _connect(core, creds, "will-dev", will=will)
        dying.sock.close()  # no DISCONNECT: the will goes out
        got = watcher.receive_type(mqtt5.PublishPacket)
        assert (got.topic, got.payload) == ("wills/dev", b"gone")
    finally:
        watcher.close()


def test_revoked_certificate_is_disconnected(core: LocalIotCore, creds_dir: Path) -> None:
    creds = new_device(core, creds_dir, "revoke311")
    client = _connect(core, creds, "revoke-311")
    started = time.monotonic()
    core.client().update_certificate(certificateId=creds.certificate_id, newStatus="REVOKED")
    assert _closed_silently(client)
    assert time.monotonic() - started < 5
    assert connect_refused_without_connack(core, creds, "revoke-311", mqtt311=True)


def test_jitr_certificate_is_registered_then_connects(core: LocalIotCore, creds_dir: Path) -> None:
    iot = core.client()
    device_ca = DeviceCA("JITR 3.1.1 CA")
    iot.register_ca_certificate(
        caCertificate=device_ca.pem, setAsActive=True, allowAutoRegistration=True, certificateMode="SNI_ONLY"
    )
    device = device_ca.device(creds_dir, "jitr-311")
    assert connect_refused_without_connack(core, device, "jitr-311", mqtt311=True)
    assert core.registry.get_certificate(device.certificate_id).status == "PENDING_ACTIVATION"
    # What a JITR activator does, here by hand.
    iot.update_certificate(certificateId=device.certificate_id, newStatus="ACTIVE")
    iot.create_policy(policyName="jitr-311", policyDocument=OPEN_POLICY)
    iot.attach_policy(policyName="jitr-311", target=f"{ARN}:cert/{device.certificate_id}")
    _connect(core, device, "jitr-311").close()


def test_other_protocol_levels_are_refused_with_return_code_1(core: LocalIotCore, creds_dir: Path) -> None:
    creds = new_device(core, creds_dir, "levels")
    mqtt31 = b"\x10\x11\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x03dev"
    level6 = b"\x10\x0f\x00\x04MQTT\x06\x02\x00\x3c\x00\x03dev"
    for connect in (mqtt31, level6):
        client = RawClient(core, creds)
        try:
            client.send_raw(connect)
            assert client.sock.recv(16) == REFUSED_VERSION
        finally:
            client.close()


def test_malformed_311_packet_closes_only_its_connection(core: LocalIotCore, creds_dir: Path) -> None:
    creds = new_device(core, creds_dir, "bad311")
    bystander = _connect(core, creds, "bad-bystander")
    try:
        for bad in (b"\x80\x06\x00\x01\x00\x01a\x01", b"\x30\x03\x00\x01\x00", b"\xf0\x00"):
            client = _connect(core, creds, "bad-311")
            client.send_raw(bad)
            assert _closed_silently(client)
        assert bystander.subscribe("bad/ok") == [1]
    finally:
        bystander.close()


@pytest.fixture
def short_keep_alive(tmp_path: Path) -> Iterator[LocalIotCore]:
    with LocalIotCore(
        tmp_path / "data", gateway_limits=GatewayLimits(max_keep_alive=1), key_pool_size=0
    ) as running:
        yield running


def test_keep_alive_0_gets_the_maximum(short_keep_alive: LocalIotCore, creds_dir: Path) -> None:
    # 3.1.1 cannot announce a Server Keep Alive; the gateway holds the client to the maximum all the same.
    client = RawClient(short_keep_alive, new_device(short_keep_alive, creds_dir, "ka311"), mqtt311=True)
    client.send(mqtt5.ConnectPacket("ka-311", clean_start=True, keep_alive=0))
    assert client.receive() == mqtt5.ConnAckPacket()
    started = time.monotonic()
    assert _closed_silently(client)
    assert 1.4 <= time.monotonic() - started < 5
