"""The device gateway through real clients: TLS, connect rules, policies, relay, JITR/JITP, bad input."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import os
import queue
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mqtt5
import pytest

from iot_core_local.broker import socket_address
from iot_core_local.gateway import GatewayLimits
from iot_core_local.gateway.wire import topic_limit_problem
from iot_core_local.provisioning.jit import EventPublisher
from iot_core_local.server import LocalIotCore
from tests._support.devices import (
    ARN,
    OK,
    Credentials,
    DeviceCA,
    Paho,
    RawClient,
    connect_refused_without_connack,
    device_of_a_registered_ca,
    new_device,
)
from tests._support.logs import watch_log


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalIotCore]:
    with LocalIotCore(tmp_path_factory.mktemp("gw") / "data") as running:
        yield running


@pytest.fixture
def creds_dir(tmp_path: Path) -> Path:
    return tmp_path / "creds"


def test_relay_publish_subscribe_and_retained(core: LocalIotCore, creds_dir: Path) -> None:
    creds = new_device(core, creds_dir, "relay")
    publisher, subscriber = Paho(core, creds, "relay-pub"), Paho(core, creds, "relay-sub")
    try:
        assert publisher.connect() == 0
        assert publisher.publish("home/retained", b"kept", qos=1, retain=True) in OK
        assert subscriber.connect() == 0
        assert subscriber.subscribe("home/#") == [1]
        retained = subscriber.message()
        assert (retained.topic, retained.payload, retained.retain) == ("home/retained", b"kept", True)
        assert publisher.publish("home/live", b"hello", qos=0) is None
        assert publisher.publish("home/live", b"again", qos=1) in OK
        got = [subscriber.message(), subscriber.message()]
        assert sorted(m.payload for m in got) == [b"again", b"hello"]
        assert {m.topic for m in got} == {"home/live"}
    finally:
        publisher.close()
        subscriber.close()


def test_connack_announces_aws_limits(core: LocalIotCore, creds_dir: Path) -> None:
    client = RawClient(core, new_device(core, creds_dir, "limits"))
    try:
        connack = client.connect("limits")
        assert connack.reason_code == 0
        assert connack.max_qos == mqtt5.QoS.AT_LEAST_ONCE
        assert connack.max_packet_size == GatewayLimits().max_packet_size == 136 * 1024
    finally:
        client.close()


@pytest.mark.parametrize("status", ["INACTIVE", "REVOKED", "PENDING_ACTIVATION"])
def test_not_active_certificate_is_closed_without_connack(
    core: LocalIotCore, creds_dir: Path, status: str
) -> None:
    creds = new_device(core, creds_dir, f"st-{status}")
    core.registry.set_certificate_status(creds.certificate_id, status)
    assert connect_refused_without_connack(core, creds, f"st-{status}")


def test_unknown_certificates_are_closed_without_connack(core: LocalIotCore, creds_dir: Path) -> None:
    from tests._support.devices import write_credentials

    # Signed by our issuing CA but never registered: TLS passes, CONNECT is refused.
    pem, key = core.ca.create_keys_and_certificate()
    unregistered = write_credentials(creds_dir, "unregistered", "-", pem, key)
    assert connect_refused_without_connack(core, unregistered, "unregistered")
    # Signed by a CA nobody registered: the TLS handshake itself fails.
    stranger = DeviceCA("Stranger CA").device(creds_dir, "stranger")
    assert connect_refused_without_connack(core, stranger, "stranger")


def test_policy_denies_connect_with_connack_135(core: LocalIotCore, creds_dir: Path) -> None:
    only_a = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{ARN}:client/a"}],
        }
    )
    creds = new_device(core, creds_dir, "connect-policy", policy=only_a)
    client = RawClient(core, creds)
    assert client.connect("b").reason_code == mqtt5.ConnAckReasonCode.NOT_AUTHORIZED
    client.close()
    client = RawClient(core, creds)
    assert client.connect("a").reason_code == 0
    client.close()


def test_certificate_revoked_while_connected_is_disconnected(core: LocalIotCore, creds_dir: Path) -> None:
    creds = new_device(core, creds_dir, "revoke-live")
    client = RawClient(core, creds)
    try:
        assert client.connect("revoke-live").reason_code == 0
        started = time.monotonic()
        core.client().update_certificate(certificateId=creds.certificate_id, newStatus="REVOKED")
        seen = client.expect_closed(within=5)
    finally:
        client.close()
    assert time.monotonic() - started < 5
    assert any(
        isinstance(p, mqtt5.DisconnectPacket)
        and p.reason_code == mqtt5.DisconnectReasonCode.ADMINISTRATIVE_ACTION
        for p in seen
    )
    assert connect_refused_without_connack(core, creds, "revoke-live")


def test_same_client_id_disconnects_the_first(core: LocalIotCore, creds_dir: Path) -> None:
    creds = new_device(core, creds_dir, "takeover")
    first, second = RawClient(core, creds), RawClient(core, creds)
    try:
        assert first.connect("same-id").reason_code == 0
        assert second.connect("same-id").reason_code == 0
        seen = first.expect_closed()
        assert any(
            isinstance(p, mqtt5.DisconnectPacket)
            and p.reason_code == mqtt5.DisconnectReasonCode.SESSION_TAKEN_OVER
            for p in seen
        )
        assert second.subscribe("takeover/x") == [1]  # the new connection is fine
    finally:
        first.close()
        second.close()


def test_qos2_publish_is_refused(core: LocalIotCore, creds_dir: Path) -> None:
    client = RawClient(core, new_device(core, creds_dir, "qos2"))
    assert client.connect("qos2").reason_code == 0
    client.send(mqtt5.PublishPacket("a/b", b"x", qos=mqtt5.QoS.EXACTLY_ONCE, packet_id=1))
    seen = client.expect_closed()
    assert seen
    assert isinstance(seen[-1], mqtt5.DisconnectPacket)
    assert seen[-1].reason_code == mqtt5.DisconnectReasonCode.QOS_NOT_SUPPORTED
    client.close()


def test_subscribe_qos2_is_granted_qos1(core: LocalIotCore, creds_dir: Path) -> None:
    client = RawClient(core, new_device(core, creds_dir, "subqos2"))
    assert client.connect("subqos2").reason_code == 0
    client.send(mqtt5.SubscribePacket(7, [mqtt5.TopicFilter("q/#", max_qos=mqtt5.QoS.EXACTLY_ONCE)]))
    suback = client.receive_type(mqtt5.SubAckPacket)
    assert [int(c) for c in suback.reason_codes] == [1]
    client.close()


def test_claim_certificate_is_refused_outside_its_policy(core: LocalIotCore, creds_dir: Path) -> None:
    from iot_core_local.recipes.claims import claim_policy_document

    claim = new_device(
        core, creds_dir, "claim-only", policy=claim_policy_document("us-east-1", "123456789012", "T")
    )
    client = RawClient(core, claim)
    try:
        assert client.connect("claim-only").reason_code == 0
        assert client.publish("home/lights", b"on") == mqtt5.PubAckReasonCode.NOT_AUTHORIZED
        assert client.publish("$aws/events/certificates/registered/x", b"{}") == 135
        assert client.subscribe("#", "home/+", "$aws/certificates/create/json/accepted") == [135, 135, 1]
        assert client.subscribe("$aws/provisioning-templates/Other/provision/json/accepted") == [135]
        # The connection itself survives refusals.
        assert client.subscribe("$aws/certificates/create-from-csr/json/rejected") == [1]
    finally:
        client.close()


def test_receive_is_checked_on_delivery(core: LocalIotCore, creds_dir: Path) -> None:
    no_receive = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": ["iot:Connect", "iot:Subscribe", "iot:Publish"],
                    "Resource": "*",
                },
                {"Effect": "Allow", "Action": "iot:Receive", "Resource": f"{ARN}:topic/open/*"},
            ],
        }
    )
    client = RawClient(core, new_device(core, creds_dir, "recv", policy=no_receive))
    try:
        assert client.connect("recv").reason_code == 0
        assert client.subscribe("open/#", "closed/#") == [1, 1]
        assert client.publish("closed/x", b"secret") in OK
        assert client.publish("open/x", b"public") in OK
        message = client.receive_type(mqtt5.PublishPacket)
        assert (message.topic, message.payload) == ("open/x", b"public")
    finally:
        client.close()


def _jitr_activator(
    core: LocalIotCore, admin: Credentials, hub_policy: str
) -> tuple[Paho, queue.Queue[dict[str, str]]]:
    """What a customer's rule + Lambda function do: hear the event, activate, attach a policy.

    Each event is queued once its certificate is active and its policy attached.
    """
    events: queue.Queue[dict[str, str]] = queue.Queue()
    listener = Paho(core, admin, "jitr-activator")

    def on_message(client: object, userdata: object, message: object) -> None:
        event = json.loads(message.payload)  # type: ignore[attr-defined]
        iot = core.client()
        iot.update_certificate(certificateId=event["certificateId"], newStatus="ACTIVE")
        iot.attach_policy(policyName=hub_policy, target=f"{ARN}:cert/{event['certificateId']}")
        events.put(event)

    listener.client.on_message = on_message
    assert listener.connect() == 0
    assert listener.subscribe("$aws/events/certificates/registered/#") == [1]
    return listener, events


def test_jitr_round_trip(core: LocalIotCore, creds_dir: Path) -> None:
    iot = core.client()
    device_ca = DeviceCA("JITR CA")
    ca_id = iot.register_ca_certificate(
        caCertificate=device_ca.pem,
        setAsActive=True,
        allowAutoRegistration=True,
        certificateMode="SNI_ONLY",
    )["certificateId"]
    iot.create_policy(
        policyName="jitr-hub",
        policyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]}
        ),
    )
    listener, events = _jitr_activator(core, new_device(core, creds_dir, "jitr-admin"), "jitr-hub")
    device = device_ca.device(creds_dir, "jitr-device-1")
    try:
        # First connect: registered PENDING_ACTIVATION, event published, closed without CONNACK.
        assert connect_refused_without_connack(core, device, "jitr-device-1")
        event = events.get(timeout=5)
        assert event["certificateId"] == device.certificate_id
        assert event["caCertificateId"] == ca_id
        assert event["certificateStatus"] == "PENDING_ACTIVATION"
        assert event["awsAccountId"] == "123456789012"
        assert {"timestamp", "certificateRegistrationTimestamp"} <= set(event)
        assert core.registry.get_certificate(device.certificate_id).status == "ACTIVE"
        # The device's retry connects.
        client = RawClient(core, device)
        assert client.connect("jitr-device-1").reason_code == 0
        client.close()
    finally:
        listener.close()


def test_jitr_event_repeats_while_pending(core: LocalIotCore, creds_dir: Path) -> None:
    iot = core.client()
    device_ca = DeviceCA("JITR pending CA")
    iot.register_ca_certificate(
        caCertificate=device_ca.pem, setAsActive=True, allowAutoRegistration=True, certificateMode="SNI_ONLY"
    )
    admin = new_device(core, creds_dir, "jitr-watch")
    watcher = Paho(core, admin, "jitr-watcher")
    try:
        assert watcher.connect() == 0
        assert watcher.subscribe("$aws/events/certificates/registered/#") == [1]
        device = device_ca.device(creds_dir, "jitr-pending")
        assert connect_refused_without_connack(core, device, "jitr-pending")
        assert connect_refused_without_connack(core, device, "jitr-pending")
        first, second = json.loads(watcher.message().payload), json.loads(watcher.message().payload)
        assert first["certificateId"] == second["certificateId"] == device.certificate_id
        assert core.registry.get_certificate(device.certificate_id).status == "PENDING_ACTIVATION"
    finally:
        watcher.close()


def test_jitp_provisions_on_first_connect(core: LocalIotCore, creds_dir: Path) -> None:
    iot = core.client()
    iot.create_policy(
        policyName="jitp-policy",
        policyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]}
        ),
    )
    body = json.dumps(
        {
            "Parameters": {
                "AWS::IoT::Certificate::CommonName": {"Type": "String"},
                "AWS::IoT::Certificate::Id": {"Type": "String"},
            },
            "Resources": {
                "thing": {
                    "Type": "AWS::IoT::Thing",
                    "Properties": {"ThingName": {"Ref": "AWS::IoT::Certificate::CommonName"}},
                },
                "certificate": {
                    "Type": "AWS::IoT::Certificate",
                    "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"},
                },
                "policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": "jitp-policy"}},
            },
        }
    )
    device_ca = DeviceCA("JITP CA")
    iot.register_ca_certificate(
        caCertificate=device_ca.pem,
        setAsActive=True,
        allowAutoRegistration=True,
        certificateMode="SNI_ONLY",
        registrationConfig={"templateBody": body, "roleArn": "arn:aws:iam::123456789012:role/JITP"},
    )
    device = device_ca.device(creds_dir, "jitp-thing-7")
    client = RawClient(core, device)
    try:
        assert client.connect("jitp-thing-7").reason_code == 0
    finally:
        client.close()
    assert core.registry.get_certificate(device.certificate_id).status == "ACTIVE"
    assert core.registry.list_principal_things(f"{ARN}:cert/{device.certificate_id}") == ["jitp-thing-7"]


def test_certificate_registered_without_ca_connects(core: LocalIotCore, creds_dir: Path) -> None:
    own = DeviceCA("Self managed")
    device = own.device(creds_dir, "no-ca-device")
    iot = core.client()
    arn = iot.register_certificate_without_ca(certificatePem=device.certificate_pem, status="ACTIVE")[
        "certificateArn"
    ]
    iot.create_policy(
        policyName="no-ca",
        policyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]}
        ),
    )
    iot.attach_policy(policyName="no-ca", target=arn)
    # The very next connect: the trust store is rebuilt before the handshake that needs it.
    client = RawClient(core, device)
    try:
        assert client.connect("no-ca-device").reason_code == 0
    finally:
        client.close()


# ---- bad input: only that connection suffers -------------------------------------------------


@pytest.fixture
def bystander(core: LocalIotCore, creds_dir: Path) -> Iterator[RawClient]:
    """A well-behaved client connected throughout a bad-input test; it must notice nothing."""
    client = RawClient(core, new_device(core, creds_dir, "bystander"))
    assert client.connect("bystander").reason_code == 0
    assert client.subscribe("bystander/echo") == [1]
    yield client
    assert client.publish("bystander/echo", b"still here") in OK
    message = client.receive_type(mqtt5.PublishPacket)
    assert message.payload == b"still here"
    client.close()


def _limits(core: LocalIotCore, monkeypatch: pytest.MonkeyPatch, **changes: Any) -> None:
    """Other limits for the connections accepted from now on, until the test ends."""
    monkeypatch.setattr(core.gateway, "limits", dataclasses.replace(core.gateway.limits, **changes))


def test_silent_client_after_tls_is_closed(
    core: LocalIotCore, creds_dir: Path, bystander: RawClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    _limits(core, monkeypatch, connect_timeout=0.5)
    silent = RawClient(core, new_device(core, creds_dir, "silent"))
    started = time.monotonic()
    assert silent.expect_closed(within=5) == []
    assert time.monotonic() - started < 3
    silent.close()


def test_garbage_instead_of_tls(core: LocalIotCore, bystander: RawClient) -> None:
    host, port = core.endpoint.mqtt_host, core.endpoint.mqtt_port
    garbage = socket.create_connection((host, port), timeout=5)
    garbage.sendall(b"\x16\x03\x01\x00\x30" + bytes(range(48)) + b"GET / HTTP/1.1\r\n\r\n")
    try:
        data = garbage.recv(1024)
        while data:
            data = garbage.recv(1024)
    except (ConnectionError, TimeoutError):
        pass
    garbage.close()
    half_open = socket.create_connection((host, port), timeout=5)  # never says anything at all
    half_open.close()


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("malformed", b"\x30\x05\x00\x09abc", mqtt5.DisconnectReasonCode.MALFORMED_PACKET),
        (
            "non-utf8-topic",
            b"\x30\x06\x00\x03\xff\xfe\xfd\x00",
            mqtt5.DisconnectReasonCode.TOPIC_NAME_INVALID,
        ),
        ("bad-varint", b"\x30\xff\xff\xff\xff\x01", mqtt5.DisconnectReasonCode.MALFORMED_PACKET),
        ("huge-header", b"\x30\xff\xff\xff\x7f", mqtt5.DisconnectReasonCode.PACKET_TOO_LARGE),
        ("second-connect", mqtt5.ConnectPacket("again").write(), mqtt5.DisconnectReasonCode.PROTOCOL_ERROR),
    ],
)
def test_bad_packets_close_only_that_connection(
    core: LocalIotCore, creds_dir: Path, bystander: RawClient, name: str, data: bytes, reason: int
) -> None:
    client = RawClient(core, new_device(core, creds_dir, f"bad-{name}"))
    assert client.connect(f"bad-{name}").reason_code == 0
    client.send_raw(data)
    seen = client.expect_closed()
    assert [int(p.reason_code) for p in seen if isinstance(p, mqtt5.DisconnectPacket)] == [int(reason)]
    client.close()


def test_oversize_payload_is_refused(core: LocalIotCore, creds_dir: Path, bystander: RawClient) -> None:
    client = RawClient(core, new_device(core, creds_dir, "oversize"))
    assert client.connect("oversize").reason_code == 0
    client.send(
        mqtt5.PublishPacket("big/topic", b"x" * (128 * 1024 + 1), qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=1)
    )
    seen = client.expect_closed()
    assert [int(p.reason_code) for p in seen if isinstance(p, mqtt5.DisconnectPacket)] == [149]
    client.close()
    # Exactly 128 KB passes.
    ok = RawClient(core, new_device(core, creds_dir, "fullsize"))
    assert ok.connect("fullsize").reason_code == 0
    assert ok.publish("big/topic", b"x" * (128 * 1024)) in OK
    ok.close()


def test_many_bad_clients_at_once_leave_a_good_one_alone(
    core: LocalIotCore, creds_dir: Path, bystander: RawClient
) -> None:
    host, port = core.endpoint.mqtt_host, core.endpoint.mqtt_port

    def attack(i: int) -> None:
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(bytes((i * 7 + j) % 256 for j in range(512)))
                s.settimeout(5)
                while s.recv(1024):
                    pass
        except OSError:
            pass

    threads = [threading.Thread(target=attack, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for i in range(20):
        assert bystander.publish("bystander/other", f"{i}".encode()) in OK
    for t in threads:
        t.join(10)


@pytest.mark.parametrize("beyond", [False, True])
def test_topic_alias_outside_the_connack_maximum_is_refused(
    core: LocalIotCore, creds_dir: Path, bystander: RawClient, beyond: bool
) -> None:
    client = RawClient(core, new_device(core, creds_dir, f"alias-{beyond}"))
    connack = client.connect(f"alias-{beyond}")
    maximum = connack.topic_alias_max or 0
    assert maximum >= 1
    # Within the announced range an alias is set and then used alone.
    assert client.publish("alias/topic", b"set", topic_alias=maximum) in OK
    assert client.publish("", b"used", topic_alias=maximum) in OK
    packet = mqtt5.PublishPacket(
        "alias/other",
        b"x",
        qos=mqtt5.QoS.AT_LEAST_ONCE,
        packet_id=client.packet_id(),
        topic_alias=maximum + 1,
    ).write()
    if not beyond:  # alias 0 (the codec will not write it): patch the alias property's value
        at = packet.index(bytes((0x23, 0, maximum + 1)))
        packet = packet[: at + 1] + b"\x00\x00" + packet[at + 3 :]
    client.send_raw(packet)
    seen = client.expect_closed()
    assert [int(p.reason_code) for p in seen if isinstance(p, mqtt5.DisconnectPacket)] == [
        int(mqtt5.DisconnectReasonCode.TOPIC_ALIAS_INVALID)
    ]
    client.close()


@pytest.mark.parametrize(
    "topic",
    [
        "t/" + "x" * 255,  # 257 bytes
        "t/" + "\u00e9" * 128,  # 130 characters, 258 bytes
        "a/b/c/d/e/f/g/h/i",  # 8 slashes
        "$aws/rules/my_rule/" + "a/" * 8 + "b",  # Basic Ingest: 8 slashes after its prefix
    ],
)
def test_topic_over_aws_limits_is_disconnected_0x90(
    core: LocalIotCore, creds_dir: Path, bystander: RawClient, topic: str
) -> None:
    client = RawClient(core, new_device(core, creds_dir, "long-topic"))
    assert client.connect(f"long-topic-{len(topic)}").reason_code == 0
    # At the limits, a publish goes through (Basic Ingest's `$aws/rules/<rule>/` is not counted).
    assert client.publish("t/" + "x" * 254, b"256 bytes") in OK
    assert client.publish("a/b/c/d/e/f/g/h", b"7 slashes") in OK
    client.send(mqtt5.PublishPacket(topic, b"x", qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=client.packet_id()))
    seen = client.expect_closed()
    assert [int(p.reason_code) for p in seen if isinstance(p, mqtt5.DisconnectPacket)] == [
        int(mqtt5.DisconnectReasonCode.TOPIC_NAME_INVALID)
    ]
    client.close()


def test_subscribe_limits(core: LocalIotCore, creds_dir: Path, bystander: RawClient) -> None:
    client = RawClient(core, new_device(core, creds_dir, "sub-limits"))
    assert client.connect("sub-limits").reason_code == 0
    quota, invalid = (
        int(mqtt5.SubAckReasonCode.QUOTA_EXCEEDED),
        int(mqtt5.SubAckReasonCode.TOPIC_FILTER_INVALID),
    )
    try:
        # More than 8 filters in one SUBSCRIBE: all refused, none counted.
        assert client.subscribe(*(f"lim/nine/{i}" for i in range(9))) == [quota] * 9
        # A filter over 256 bytes or 7 slashes is invalid; its neighbours are granted.
        assert client.subscribe("lim/" + "x" * 253, "lim/ok", "a/b/c/d/e/f/g/h/#") == [invalid, 1, invalid]
        assert client.subscribe("$share/group/a/b/c/d/e/f/g/h") == [1]  # `$share/group/` not counted
        # 50 subscriptions per connection: 2 so far, 48 more fit, the 51st is over quota.
        for start in range(0, 48, 8):
            assert client.subscribe(*(f"lim/{i}" for i in range(start, start + 8))) == [1] * 8
        assert client.subscribe("lim/one-too-many", "lim/ok") == [quota, 1]  # a granted one again is fine
        # Provisioning answer filters count too.
        assert client.subscribe("$aws/certificates/create/json/accepted") == [quota]
        # Unsubscribing frees a place.
        client.send(mqtt5.UnsubscribePacket(client.packet_id(), ["lim/0"]))
        client.receive_type(mqtt5.UnsubAckPacket)
        assert client.subscribe("lim/one-too-many") == [1]
        assert client.publish("lim/one-too-many", b"delivered") in OK
        assert client.receive_type(mqtt5.PublishPacket).payload == b"delivered"
    finally:
        client.close()


def test_provisioning_and_shadow_topics_fit_aws_limits() -> None:
    name = "t" * 36  # the longest provisioning template name
    for topic in (
        f"$aws/provisioning-templates/{name}/provision/json/accepted",
        f"$aws/provisioning-templates/{name}/provision/cbor/rejected",
        "$aws/certificates/create-from-csr/json/accepted",
        f"$aws/events/certificates/registered/{'a' * 64}",
        "$aws/things/thing/shadow/name/shadow/update/accepted",
    ):
        assert topic_limit_problem(topic) is None, topic


def test_client_that_does_not_read_is_throttled_then_closed(
    core: LocalIotCore, creds_dir: Path, bystander: RawClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    _limits(core, monkeypatch, client_drain_timeout=2.0)
    client = RawClient(core, new_device(core, creds_dir, "deaf"))
    try:
        assert client.connect("deaf").reason_code == 0
        assert client.subscribe("deaf/x") == [1]  # answered by the relay: the connection is registered
        connection = core.gateway.connection("deaf")
        assert connection is not None
        # Each PUBLISH to a reserved topic is answered by the gateway itself with PUBACK 135; never read them.
        batch = b"".join(
            mqtt5.PublishPacket("$aws/x", b"", qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=i % 65535 + 1).write()
            for i in range(2000)
        )
        client.sock.settimeout(1.0)
        peak = 0
        sent = 0
        with watch_log(
            "iot_core_local.gateway", lambda m: "'deaf'" in m and "did not read its answers" in m
        ) as closed:
            try:
                while sent < 40 * 1024 * 1024:
                    client.sock.sendall(batch)
                    sent += len(batch)
                    peak = max(peak, connection.writer.transport.get_write_buffer_size())
            except (TimeoutError, ssl.SSLError, OSError):
                pass  # the gateway stopped reading: back-pressure reached the client (or it was closed)
            peak = max(peak, connection.writer.transport.get_write_buffer_size())
            # Bounded: the limit plus what one read's packets are answered with.
            assert peak < 1024 * 1024, peak
            # The kernel's loopback buffers absorb megabytes of answers before the gateway's own buffer fills,
            # so on a loaded machine the gateway may still be working through the input when sending stops.
            assert closed.wait(timeout=60)
        # The log line comes just before the close, from the gateway's thread: wait for the close itself,
        # which the client sees as the end of its stream once it reads what it left unread (or as a reset).
        client.sock.settimeout(10.0)
        try:
            while client.sock.recv(1 << 20):
                pass
        except (ssl.SSLError, ConnectionResetError):
            pass
    finally:
        client.close()  # also on failure: a socket left for gc warns in whichever test comes next
    assert connection.writer.transport.is_closing()


@pytest.mark.parametrize("change", ["revoke", "detach"])
def test_change_during_the_connect_window_is_not_missed(
    core: LocalIotCore, creds_dir: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """A certificate revoked, or a policy detached, while the gateway waits for Mosquitto's CONNACK
    (before the connection is registered to hear of it) still applies to that connection."""
    creds = new_device(core, creds_dir, f"window-{change}")
    iot = core.client()
    arn = f"{ARN}:cert/{creds.certificate_id}"
    gw = core.gateway

    def detach_all() -> None:
        for policy in iot.list_attached_policies(target=arn)["policies"]:
            iot.detach_policy(policyName=policy["policyName"], target=arn)

    async def change_in_the_window(certificate_id: str) -> None:
        if certificate_id != creds.certificate_id:
            return
        heard = gw.changes
        if change == "revoke":
            await asyncio.to_thread(
                iot.update_certificate, certificateId=creds.certificate_id, newStatus="REVOKED"
            )
        else:
            await asyncio.to_thread(detach_all)
        # The registry's listener queued its hop to the loop before the change's HTTP answer came back,
        # so before to_thread queued this coroutine's wake-up: the loop has run it by now.
        assert gw.changes > heard

    monkeypatch.setattr(gw, "connect_window_hook", change_in_the_window)
    client = RawClient(core, creds)
    try:
        assert client.connect(f"window-{change}").reason_code == 0
        if change == "revoke":
            seen = client.expect_closed()
            assert [int(p.reason_code) for p in seen if isinstance(p, mqtt5.DisconnectPacket)] == [
                int(mqtt5.DisconnectReasonCode.ADMINISTRATIVE_ACTION)
            ]
        else:
            assert client.publish("window/topic", b"x") == 135
    finally:
        client.close()


def test_trust_store_rebuilt_in_a_worker_and_kept_if_the_rebuild_fails(
    core: LocalIotCore, creds_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    device = new_device(core, creds_dir, "trusted-before")
    trust = core.gateway.trust_store
    threads: list[str] = []

    def failing_build() -> Any:
        threads.append(threading.current_thread().name)
        raise ssl.SSLError("load_verify_locations failed")

    monkeypatch.setattr(trust, "build", failing_build)
    DeviceCA("Trust Rebuild CA").register(core.client())  # moves the registry's trust generation
    client = RawClient(core, device)  # the next handshake: rebuild fails, the previous context serves
    try:
        assert client.connect("trusted-before").reason_code == 0
    finally:
        client.close()
    assert threads
    assert all(name.startswith("iot-core-local-worker") for name in threads), threads
    assert "could not rebuild the TLS trust store" in caplog.text
    # Once the build works again, the next trust change is picked up.
    monkeypatch.undo()
    own = DeviceCA("After Rebuild")
    later = own.device(creds_dir, "after-rebuild")
    arn = core.client().register_certificate_without_ca(
        certificatePem=later.certificate_pem, status="ACTIVE"
    )["certificateArn"]
    assert arn
    client = RawClient(core, later)
    try:
        assert client.connect("after-rebuild").reason_code in (0, 135)  # TLS accepted it: it is trusted
    finally:
        client.close()


def test_event_publisher_closes_its_socket_when_no_connack_comes(tmp_path: Path) -> None:
    async def scenario() -> bool:
        closed = asyncio.Event()

        async def silent_broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await reader.read(1024):  # takes the CONNECT, never answers
                pass
            closed.set()
            writer.close()

        server = await asyncio.start_unix_server(silent_broker, address)
        publisher = EventPublisher(address, timeout=0.2)
        with pytest.raises(TimeoutError):
            await publisher.publish("$aws/events/x", b"{}")
        try:
            await asyncio.wait_for(closed.wait(), 2)
        except TimeoutError:
            return False
        finally:
            server.close()
        return True

    address, held = socket_address(tmp_path)  # the broker's own way to a socket in a deep folder
    gc.collect()  # what earlier tests in this worker left for the collector warns now, not inside the record
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        try:
            assert asyncio.run(scenario())
        finally:
            if held is not None:
                os.close(held)
        gc.collect()
    # The publisher hung up itself; it did not leave the socket for the garbage collector to find.
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


# ---- IAM-exact publish and connect rules, CAs that stop being ACTIVE ------------------------


def _policy(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def test_retained_publish_needs_retain_publish(core: LocalIotCore, creds_dir: Path) -> None:
    """AWS: a PUBLISH with RETAIN needs iot:Publish and iot:RetainPublish on the topic; without the
    latter it is refused like any unauthorized publish (PUBACK 135) and nothing is retained."""
    publish_only = _policy(
        {"Effect": "Allow", "Action": ["iot:Connect", "iot:Subscribe", "iot:Receive"], "Resource": "*"},
        {"Effect": "Allow", "Action": "iot:Publish", "Resource": f"{ARN}:topic/kept/*"},
        {"Effect": "Allow", "Action": "iot:RetainPublish", "Resource": f"{ARN}:topic/kept/allowed"},
    )
    publisher = RawClient(core, new_device(core, creds_dir, "retain-pub", policy=publish_only))
    subscriber = RawClient(core, new_device(core, creds_dir, "retain-sub"))
    try:
        assert publisher.connect("retain-pub").reason_code == 0
        assert publisher.publish("kept/denied", b"x", retain=True) == 135
        assert publisher.publish("kept/denied", b"live") in OK  # the same topic without RETAIN is fine
        assert publisher.publish("kept/allowed", b"kept", retain=True) in OK
        assert subscriber.connect("retain-sub").reason_code == 0
        assert subscriber.subscribe("kept/#") == [1]
        retained = subscriber.receive_type(mqtt5.PublishPacket)
        assert (retained.topic, retained.payload, retained.retain) == ("kept/allowed", b"kept", True)
        # Nothing else was retained: a marker published now is the next message.
        assert publisher.publish("kept/denied", b"marker") in OK
        assert subscriber.receive_type(mqtt5.PublishPacket).payload == b"marker"
    finally:
        publisher.close()
        subscriber.close()


def test_retained_will_needs_retain_publish(core: LocalIotCore, creds_dir: Path) -> None:
    no_retain = _policy({"Effect": "Allow", "Action": ["iot:Connect", "iot:Publish"], "Resource": "*"})
    creds = new_device(core, creds_dir, "retain-will", policy=no_retain)
    for retain, expected in ((True, mqtt5.ConnAckReasonCode.NOT_AUTHORIZED), (False, 0)):
        client = RawClient(core, creds)
        try:
            will = mqtt5.Will(topic="wills/retain-will", payload=b"gone", retain=retain)
            assert client.connect("retain-will", will=will).reason_code == expected
        finally:
            client.close()


@pytest.mark.parametrize(
    ("client_id", "accepted"),
    [("a" * 128, True), ("é" * 64, True), ("a" * 129, False), ("é" * 64 + "a", False)],
    ids=["128-ascii", "128-bytes-utf8", "129-ascii", "129-bytes-utf8"],
)
def test_client_id_over_128_bytes_is_refused(
    core: LocalIotCore, creds_dir: Path, client_id: str, accepted: bool
) -> None:
    """AWS IoT Core's client id limit is 128 UTF-8 bytes; a longer one gets CONNACK 0x85."""
    client = RawClient(core, new_device(core, creds_dir, f"long-id-{len(client_id.encode())}"))
    try:
        code = client.connect(client_id).reason_code
        if accepted:
            assert code == 0
        else:
            assert code == 0x85 == int(mqtt5.ConnAckReasonCode.CLIENT_ID_NOT_VALID)
            assert client.expect_closed() == []
    finally:
        client.close()


def _administratively_closed(client: RawClient) -> bool:
    seen = client.expect_closed(within=5)
    return any(
        isinstance(p, mqtt5.DisconnectPacket)
        and p.reason_code == mqtt5.DisconnectReasonCode.ADMINISTRATIVE_ACTION
        for p in seen
    )


def test_ca_set_inactive_disconnects_its_devices(core: LocalIotCore, creds_dir: Path) -> None:
    ca_id, device = device_of_a_registered_ca(core, creds_dir, "ca-off")
    other = RawClient(core, new_device(core, creds_dir, "ca-off-bystander"))  # signed by another CA
    client = RawClient(core, device)
    try:
        assert client.connect("ca-off-device").reason_code == 0
        assert other.connect("ca-off-bystander").reason_code == 0
        started = time.monotonic()
        core.client().update_ca_certificate(certificateId=ca_id, newStatus="INACTIVE")
        assert _administratively_closed(client)
        assert time.monotonic() - started < 5
        assert other.subscribe("ca-off/still") == [1]  # a device of another CA is untouched
    finally:
        client.close()
        other.close()
    assert connect_refused_without_connack(core, device, "ca-off-device")
    core.client().delete_ca_certificate(certificateId=ca_id)
    assert connect_refused_without_connack(core, device, "ca-off-device")


def test_ca_set_inactive_during_the_connect_window_is_not_missed(
    core: LocalIotCore, creds_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca_id, device = device_of_a_registered_ca(core, creds_dir, "ca-window")
    iot = core.client()
    gw = core.gateway

    async def change_in_the_window(certificate_id: str) -> None:
        if certificate_id == device.certificate_id:
            heard = gw.changes
            await asyncio.to_thread(iot.update_ca_certificate, certificateId=ca_id, newStatus="INACTIVE")
            assert gw.changes > heard  # the listener's hop ran before the HTTP answer came back

    monkeypatch.setattr(gw, "connect_window_hook", change_in_the_window)
    client = RawClient(core, device)
    try:
        assert client.connect("ca-window-device").reason_code == 0
        assert _administratively_closed(client)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("topic", "service"),
    [
        ("$aws/things/dev-thing/shadow/get", "the Device Shadow service"),
        ("$aws/things/dev-thing/shadow/name/config/update", "the Device Shadow service"),
        ("$aws/things/dev-thing/jobs/start-next", "the Jobs service"),
        ("$aws/rules/MyRule/telemetry", "Basic Ingest ($aws/rules)"),
    ],
)
def test_an_unserved_aws_service_is_named_not_blamed_on_the_policy(
    core: LocalIotCore, creds_dir: Path, topic: str, service: str
) -> None:
    """AWS's shadow and jobs samples publish there; with a policy that allows it, the answer says the
    stand-in does not serve the service (131 and a reason), not NOT_AUTHORIZED."""
    client = RawClient(core, new_device(core, creds_dir, "unserved"))
    quiet = RawClient(core, new_device(core, creds_dir, "unserved-quiet"))
    try:
        noted = core.gateway.unserved_requests.total  # logged once per interval, counted every time
        assert client.connect("unserved").reason_code == 0
        pid = client.packet_id()
        client.send(mqtt5.PublishPacket(topic, b"{}", qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=pid))
        puback = client.receive_type(mqtt5.PubAckPacket)
        assert core.gateway.unserved_requests.total == noted + 1
        assert puback.reason_code == mqtt5.PubAckReasonCode.IMPLEMENTATION_SPECIFIC_ERROR
        assert (
            puback.reason_str
            == f"iot-core-local does not serve {service} ({topic!r}); it serves fleet provisioning"
        )
        # A client that asked for no problem information gets the code alone (MQTT 5, 3.1.2.11.7).
        assert quiet.connect("unserved-quiet", request_problem_info=False).reason_code == 0
        assert quiet.publish(topic, b"{}") == mqtt5.PubAckReasonCode.IMPLEMENTATION_SPECIFIC_ERROR
        # The service's own topics stay refused as before, and the connection stays up.
        assert (
            client.publish("$aws/events/presence/connected/x", b"{}") == mqtt5.PubAckReasonCode.NOT_AUTHORIZED
        )
        assert client.publish("home/still-connected", b"x") in OK
    finally:
        client.close()
        quiet.close()


def test_an_unserved_service_is_not_authorized_when_the_policy_denies_it(
    core: LocalIotCore, creds_dir: Path
) -> None:
    policy = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
                {"Effect": "Allow", "Action": "iot:Publish", "Resource": "arn:aws:iot:*:*:topic/home/*"},
            ],
        }
    )
    client = RawClient(core, new_device(core, creds_dir, "unserved-denied", policy=policy))
    try:
        assert client.connect("unserved-denied").reason_code == 0
        assert client.publish("$aws/things/x/shadow/get", b"{}") == mqtt5.PubAckReasonCode.NOT_AUTHORIZED
    finally:
        client.close()


def test_an_unserved_service_closes_an_mqtt311_client(core: LocalIotCore, creds_dir: Path) -> None:
    client = RawClient(core, new_device(core, creds_dir, "unserved-311"), mqtt311=True)
    try:
        noted = core.gateway.unserved_requests.total
        assert client.connect("unserved-311").reason_code == 0
        client.send(
            mqtt5.PublishPacket("$aws/things/x/shadow/get", b"{}", qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=1)
        )
        assert client.expect_closed() == []  # 3.1.1 has no PUBACK code: closed, as AWS does for refusals
        assert core.gateway.unserved_requests.total == noted + 1
    finally:
        client.close()


def test_enhanced_authentication_is_refused_with_bad_authentication_method(
    core: LocalIotCore, creds_dir: Path
) -> None:
    """Identity is the client certificate: a CONNECT naming an AUTH method gets 0x8C (MQTT 5, 4.12)."""
    client = RawClient(core, new_device(core, creds_dir, "enhanced-auth"))
    try:
        connack = client.connect("enhanced-auth", authentication_method="SCRAM-SHA-1")
        assert connack.reason_code == mqtt5.ConnAckReasonCode.BAD_AUTHENTICATION_METHOD
        client.expect_closed()
    finally:
        client.close()
