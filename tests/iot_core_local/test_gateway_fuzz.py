"""Fuzzing the MQTT input: random bytes after a valid TLS handshake and CONNECT,
and valid-but-hostile packets and provisioning payloads. The server never crashes, every bad connection
is closed or gets a /rejected answer with statusCode, errorCode and errorMessage, nothing panics or
prints a traceback, and a good client connected throughout keeps working."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import mqtt5
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iot_core_local.recipes.claims import ClaimSetup, set_up_fleet_provisioning
from iot_core_local.server import LocalIotCore
from tests._support.devices import OK, Credentials, RawClient, new_device, write_credentials

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalIotCore]:
    with LocalIotCore(tmp_path_factory.mktemp("fuzz") / "data") as running:
        yield running


@pytest.fixture(scope="module")
def device(core: LocalIotCore, tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    return new_device(core, tmp_path_factory.mktemp("fuzz-device"), "fuzz-device")


@pytest.fixture(scope="module")
def claim(core: LocalIotCore, tmp_path_factory: pytest.TempPathFactory) -> tuple[ClaimSetup, Credentials]:
    setup = set_up_fleet_provisioning(core.client(), "Fuzz")
    folder = tmp_path_factory.mktemp("fuzz-claim")
    return setup, write_credentials(
        folder, "claim", setup.certificate_id, setup.certificate_pem, setup.private_key_pem
    )


@pytest.fixture
def bystander(
    core: LocalIotCore, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> Iterator[RawClient]:
    """A good client connected throughout; afterwards it still works, and nothing went wrong inside."""
    caplog.set_level(logging.INFO)
    client = RawClient(core, new_device(core, tmp_path, "fuzz-bystander"))
    assert client.connect(f"bystander-{uuid.uuid4().hex[:8]}").reason_code == 0
    assert client.subscribe("fuzz/bystander") == [1]
    yield client
    assert client.publish("fuzz/bystander", b"still here") in OK
    assert client.receive_type(mqtt5.PublishPacket).payload == b"still here"
    client.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    _out, err = capfd.readouterr()
    assert "panicked" not in err
    assert "Traceback" not in err


def _connected(core: LocalIotCore, creds: Credentials) -> RawClient:
    client = RawClient(core, creds)
    assert client.connect(f"fuzz-{uuid.uuid4().hex[:12]}").reason_code == 0
    return client


# ---- random bytes after TLS and CONNECT --------------------------------------------------------


@FUZZ
@given(garbage=st.binary(min_size=1, max_size=2048))
def test_random_bytes_after_connect(
    core: LocalIotCore, device: Credentials, bystander: RawClient, garbage: bytes
) -> None:
    client = _connected(core, device)
    try:
        client.send_raw(garbage)
        # Zeros complete whatever frame the garbage started (the gateway refuses one over its
        # maximum size at its header), and a zero byte is packet type 0, reserved: the connection must
        # end, within a deadline.
        client.send_raw(bytes(140 * 1024))
    except (ConnectionError, OSError):
        pass  # already closed by the server
    client.expect_closed(within=5)
    client.close()


@FUZZ
@given(garbage=st.binary(min_size=1, max_size=512))
def test_random_bytes_instead_of_connect(
    core: LocalIotCore, device: Credentials, bystander: RawClient, garbage: bytes
) -> None:
    client = RawClient(core, device)
    with contextlib.suppress(ConnectionError, OSError):
        client.send_raw(garbage + bytes(140 * 1024))
    seen = client.expect_closed(within=5)
    client.close()
    assert not any(isinstance(p, mqtt5.ConnAckPacket) and int(p.reason_code) == 0 for p in seen)
    _no_disconnect_before_connack(seen)


def _no_disconnect_before_connack(seen: list[mqtt5.Packet]) -> None:
    """MQTT 5 [MQTT-3.14.0-1]: the server sends no DISCONNECT until it has sent a CONNACK."""
    connack = next((i for i, p in enumerate(seen) if isinstance(p, mqtt5.ConnAckPacket)), len(seen))
    assert not [p for p in seen[:connack] if isinstance(p, mqtt5.DisconnectPacket)], seen


@pytest.mark.parametrize(
    ("name", "first"),
    [
        ("too large", b"\x10\xff\xff\x7f"),  # a CONNECT of 2 MiB announced: over the packet limit
        ("malformed length", b"\x10\xff\xff\xff\xff\x01"),  # a fifth length byte
    ],
)
def test_a_first_packet_refused_before_connack_is_closed_without_disconnect(
    core: LocalIotCore, device: Credentials, name: str, first: bytes
) -> None:
    client = RawClient(core, device)
    client.send_raw(first)
    seen = client.expect_closed(within=5)
    client.close()
    assert seen == []


# ---- strings that are not UTF-8 (mqtt5 0.8 would panic on them) ---------------------------------


def _raw_connect(client_id: bytes, *, properties: bytes = b"", will: bytes = b"", user: bytes = b"") -> bytes:
    flags = 0x02 | (0x04 if will else 0) | (0x80 if user else 0)
    header = b"\x00\x04MQTT\x05" + bytes([flags]) + b"\x00\x3c" + bytes([len(properties)]) + properties
    body = header + len(client_id).to_bytes(2, "big") + client_id
    if will:
        body += b"\x00" + len(will).to_bytes(2, "big") + will + b"\x00\x01x"
    if user:
        body += len(user).to_bytes(2, "big") + user
    return bytes([0x10, len(body)]) + body


_BAD = b"\xff\xfe\xc3"
_BAD_USER_PROPERTY = b"\x26" + len(_BAD).to_bytes(2, "big") + _BAD + b"\x00\x01v"


@pytest.mark.parametrize(
    ("name", "packet"),
    [
        ("client-id", _raw_connect(_BAD)),
        ("user-property", _raw_connect(b"ok", properties=_BAD_USER_PROPERTY)),
        ("will-topic", _raw_connect(b"ok", will=_BAD)),
        ("user-name", _raw_connect(b"ok", user=_BAD)),
        ("auth-method", _raw_connect(b"ok", properties=b"\x15" + len(_BAD).to_bytes(2, "big") + _BAD)),
    ],
)
def test_non_utf8_connect_is_refused_quietly(
    core: LocalIotCore, device: Credentials, bystander: RawClient, name: str, packet: bytes
) -> None:
    client = RawClient(core, device)
    client.send_raw(packet)
    seen = client.expect_closed()
    client.close()
    assert not any(isinstance(p, mqtt5.ConnAckPacket) for p in seen)


def _subscribe(pattern: bytes) -> bytes:
    body = b"\x00\x07\x00" + len(pattern).to_bytes(2, "big") + pattern + b"\x01"
    return bytes([0x82, len(body)]) + body


def _unsubscribe(pattern: bytes) -> bytes:
    body = b"\x00\x08\x00" + len(pattern).to_bytes(2, "big") + pattern
    return bytes([0xA2, len(body)]) + body


def _publish_with_properties(properties: bytes) -> bytes:
    body = b"\x00\x03a/b" + b"\x00\x05" + bytes([len(properties)]) + properties + b"payload"
    return bytes([0x32, len(body)]) + body


@pytest.mark.parametrize(
    ("name", "packet", "reason"),
    [
        ("subscribe", _subscribe(_BAD), 0x81),
        ("unsubscribe", _unsubscribe(_BAD), 0x81),
        ("publish-user-property", _publish_with_properties(_BAD_USER_PROPERTY), 0x81),
        (
            "publish-content-type",
            _publish_with_properties(b"\x03" + len(_BAD).to_bytes(2, "big") + _BAD),
            0x81,
        ),
        (
            "publish-response-topic",
            _publish_with_properties(b"\x08" + len(_BAD).to_bytes(2, "big") + _BAD),
            0x81,
        ),
        ("publish-topic", b"\x30\x06\x00\x03" + _BAD + b"\x00", 0x90),
    ],
)
def test_non_utf8_strings_close_with_a_reason_and_no_panic(
    core: LocalIotCore, device: Credentials, bystander: RawClient, name: str, packet: bytes, reason: int
) -> None:
    client = _connected(core, device)
    client.send_raw(packet)
    seen = client.expect_closed()
    client.close()
    assert [int(p.reason_code) for p in seen if isinstance(p, mqtt5.DisconnectPacket)] == [reason]


# ---- valid packets, hostile content ---------------------------------------------------------------


def test_huge_topic_and_many_filters(core: LocalIotCore, device: Credentials, bystander: RawClient) -> None:
    # AWS's limits: 8 filters per SUBSCRIBE, 256-byte topics; a reserved topic is not authorized.
    client = _connected(core, device)
    try:
        codes = client.subscribe(*(f"fuzz/many/{i}" for i in range(2000)))
        assert codes == [int(mqtt5.SubAckReasonCode.QUOTA_EXCEEDED)] * 2000
        assert client.publish("$aws/events/presence/connected/x", b"{}") == 135  # the service's own topic
        assert client.publish("$aws/things/x/shadow/update", b"{}") == 131  # a service not served here
        client.send(
            mqtt5.PublishPacket("t/" + "x" * 65000, b"big topic", qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=99)
        )
        seen = client.expect_closed()
        assert [int(p.reason_code) for p in seen if isinstance(p, mqtt5.DisconnectPacket)] == [
            int(mqtt5.DisconnectReasonCode.TOPIC_NAME_INVALID)
        ]
    finally:
        client.close()


CSR_TOPIC = "$aws/certificates/create-from-csr"
KEYS_TOPIC = "$aws/certificates/create"


def _register(setup: ClaimSetup) -> str:
    return f"$aws/provisioning-templates/{setup.template_name}/provision"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
request_bodies = st.dictionaries(
    st.sampled_from(["certificateSigningRequest", "certificateOwnershipToken", "parameters", "x"]),
    json_values,
    max_size=3,
)


def _huge_pem(size: int) -> str:
    body = base64.encodebytes(bytes(size)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


def _deep(n: int, fmt: str) -> bytes:
    if fmt == "json":
        return b'{"a":' * n + b"1" + b"}" * n
    return b"\x81" * n + b"\x00"  # CBOR: an array of an array of ... of 0


# All under AWS's 128 KB (a larger payload closes the connection, as test_gateway shows).
hostile_payloads = st.one_of(
    request_bodies.map(lambda b: ("json", json.dumps(b).encode())),
    request_bodies.map(lambda b: ("cbor", cbor2.dumps(b))),
    st.binary(max_size=512).map(lambda b: ("cbor", b)),
    st.binary(max_size=512).map(lambda b: ("json", b)),
    st.integers(min_value=100, max_value=20_000).map(lambda n: ("json", _deep(n, "json"))),
    st.integers(min_value=100, max_value=60_000).map(lambda n: ("cbor", _deep(n, "cbor"))),
    st.integers(min_value=1_000, max_value=85_000).map(
        lambda n: ("json", json.dumps({"certificateSigningRequest": _huge_pem(n)}).encode())
    ),
    st.sampled_from([b"[]", b"null", b"1", b'"s"', b"\xef\xbb\xbf{}"]).map(lambda b: ("json", b)),
)


@FUZZ
@given(case=hostile_payloads, operation=st.sampled_from(["csr", "register", "keys"]))
def test_hostile_provisioning_payloads_are_rejected(
    core: LocalIotCore,
    claim: tuple[ClaimSetup, Credentials],
    bystander: RawClient,
    case: tuple[str, bytes],
    operation: str,
) -> None:
    setup, creds = claim
    fmt, payload = case
    base = {"csr": CSR_TOPIC, "register": _register(setup), "keys": KEYS_TOPIC}[operation]
    topic = f"{base}/{fmt}"
    client = _connected(core, creds)
    try:
        assert client.subscribe(f"{topic}/accepted", f"{topic}/rejected") == [1, 1]
        assert client.publish(topic, payload) == 0
        answer = client.receive_type(mqtt5.PublishPacket)
    finally:
        client.close()
    decoded: Any = json.loads(answer.payload) if fmt == "json" else cbor2.loads(answer.payload)
    if answer.topic.endswith("/accepted"):
        # Only CreateKeysAndCertificate ignores its payload; any object (or nothing) is a valid request.
        assert operation == "keys"
        return
    assert answer.topic == f"{topic}/rejected"
    assert set(decoded) == {"statusCode", "errorCode", "errorMessage"}
    assert isinstance(decoded["statusCode"], int)
    assert 400 <= decoded["statusCode"] < 500
    assert isinstance(decoded["errorCode"], str)
    assert decoded["errorCode"]
    assert isinstance(decoded["errorMessage"], str)
