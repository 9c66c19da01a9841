"""The gateway's MQTT 3.1.1 codec (gateway/mqtt311.py) as pure logic: round trips, strict validation,
arbitrary bytes, and a cross-check against paho-mqtt's own 3.1.1 encoder and decoder over loopback."""

from __future__ import annotations

import re
import select
import socket
from collections.abc import Iterator
from typing import Any

import mqtt5
import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from iot_core_local.gateway import mqtt311
from iot_core_local.gateway.wire import Close, frame, mqtt_string

# ---- hypothesis strategies: every field 3.1.1 can carry, and nothing it cannot ------------------

# MQTT strings: any code point but U+0000 and surrogates (which UTF-8 cannot carry).
_text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=40)
_level = _text.filter(lambda s: "/" not in s and "+" not in s and "#" not in s)
_topic = st.lists(_level, min_size=1, max_size=4).map("/".join).filter(bool)
_filter = st.one_of(
    _topic,
    st.tuples(st.lists(st.one_of(_level, st.just("+")), min_size=1, max_size=3), st.booleans()).map(
        lambda t: "/".join([*t[0], "#"] if t[1] else t[0])
    ),
    st.just("#"),
).filter(bool)
_packet_id = st.integers(1, 0xFFFF)
_qos = st.sampled_from([mqtt5.QoS(q) for q in (0, 1, 2)])


@st.composite
def _publish(draw: st.DrawFn) -> mqtt5.PublishPacket:
    qos = draw(_qos)
    return mqtt5.PublishPacket(
        draw(_topic),
        draw(st.binary(max_size=300)),
        qos=qos,
        retain=draw(st.booleans()),
        packet_id=draw(_packet_id) if int(qos) else None,
        duplicate=draw(st.booleans()) if int(qos) else False,
    )


@st.composite
def _connect(draw: st.DrawFn) -> mqtt5.ConnectPacket:
    will = None
    if draw(st.booleans()):
        will = mqtt5.Will(
            draw(_topic), payload=draw(st.binary(max_size=50)), qos=draw(_qos), retain=draw(st.booleans())
        )
    username = draw(st.one_of(st.none(), _text))
    return mqtt5.ConnectPacket(
        draw(_text),
        username=username,
        password=None if username is None else draw(st.one_of(st.none(), st.binary(max_size=30))),
        clean_start=draw(st.booleans()),
        will=will,
        keep_alive=draw(st.integers(0, 0xFFFF)),
    )


_connack_codes = [mqtt5.ConnAckReasonCode(c) for c in (0, 0x84, 0x85, 0x86, 0x87, 0x88)]

_packets = st.one_of(
    _connect(),
    st.builds(
        lambda present, code: mqtt5.ConnAckPacket(session_present=present and not code, reason_code=code),
        st.booleans(),
        st.sampled_from(_connack_codes),
    ),
    _publish(),
    st.builds(mqtt5.PubAckPacket, _packet_id),
    st.builds(mqtt5.PubRecPacket, _packet_id),
    st.builds(mqtt5.PubRelPacket, _packet_id),
    st.builds(mqtt5.PubCompPacket, _packet_id),
    st.builds(
        mqtt5.SubscribePacket,
        _packet_id,
        st.lists(
            st.builds(lambda p, q: mqtt5.TopicFilter(p, max_qos=q), _filter, _qos), min_size=1, max_size=5
        ),
    ),
    st.builds(
        mqtt5.SubAckPacket,
        _packet_id,
        st.lists(
            st.sampled_from([mqtt5.SubAckReasonCode(c) for c in (0, 1, 2, 0x80)]), min_size=1, max_size=5
        ),
    ),
    st.builds(mqtt5.UnsubscribePacket, _packet_id, st.lists(_filter, min_size=1, max_size=5)),
    st.builds(lambda pid: mqtt5.UnsubAckPacket(pid, []), _packet_id),
    st.builds(mqtt5.PingReqPacket),
    st.builds(mqtt5.PingRespPacket),
    st.builds(mqtt5.DisconnectPacket),
)


def _parse_all(data: bytes) -> mqtt5.Packet:
    buf = bytearray(data)
    found = frame(buf, 0)
    assert found is not None
    assert found[1] == len(buf)
    return mqtt311.parse(buf, 0, len(buf))


@settings(max_examples=400, deadline=None)
@given(_packets)
def test_round_trip(packet: mqtt5.Packet) -> None:
    data = mqtt311.write(packet)
    assert _parse_all(data) == packet
    assert mqtt311.write(_parse_all(data)) == data


@settings(max_examples=1000, deadline=None)
@given(st.binary(min_size=2, max_size=80))
def test_arbitrary_bytes_raise_only_close(data: bytes) -> None:
    buf = bytearray(data)
    try:
        found = frame(buf, 0)
        if found is not None and found[1] <= len(buf):
            mqtt311.parse(buf, 0, found[1])
    except Close:
        pass


@settings(max_examples=600, deadline=None)
@given(_packets, st.data())
def test_damaged_packets_raise_only_close(packet: mqtt5.Packet, data: st.DataObject) -> None:
    # Valid packets with one byte changed reach deep into each decoder, where random bytes rarely go.
    buf = bytearray(mqtt311.write(packet))
    at = data.draw(st.integers(0, len(buf) - 1))
    buf[at] = data.draw(st.integers(0, 255))
    try:
        found = frame(buf, 0)
        if found is not None and found[1] <= len(buf):
            mqtt311.parse(buf, 0, found[1])
    except Close:
        pass


# ---- strict validation: each rule of the specification that a server must enforce --------------

_CONNECT = mqtt311.write(mqtt5.ConnectPacket("dev", clean_start=True, keep_alive=60))


def _with_flags(connect_flags: int, tail: bytes = b"") -> bytes:
    body = b"\x00\x04MQTT\x04" + bytes((connect_flags,)) + b"\x00\x3c\x00\x03dev" + tail
    return bytes((0x10, len(body))) + body


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\x00\x00", "flags"),  # type 0 is reserved
        (b"\xf0\x00", "flags"),  # type 15 (AUTH) does not exist in 3.1.1
        (b"\xc1\x00", "flags"),  # PINGREQ with a reserved flag
        (b"\x80\x06\x00\x01\x00\x01a\x01", "flags"),  # SUBSCRIBE must carry flags 0b0010
        (b"\xa0\x05\x00\x01\x00\x01a", "flags"),  # UNSUBSCRIBE too
        (b"\x62\x02\x00\x01", None),  # PUBREL with its flags is fine
        (b"\x36\x05\x00\x01a\x00\x01", "QoS 3"),
        (b"\x38\x03\x00\x01a", "DUP"),  # DUP on QoS 0
        (b"\x32\x05\x00\x01a\x00\x00", "identifier 0"),
        (b"\x40\x02\x00\x00", "identifier 0"),
        (b"\x40\x03\x00\x01\x00", "after"),  # trailing byte
        (b"\xc0\x01\x00", "after"),
        (b"\x30\x03\x00\x02a", "past the end"),
        (b"\x30\x03\x00\x01\xff", "UTF-8"),
        (b"\x30\x04\x00\x02\xed\xa0", "UTF-8"),  # a truncated sequence
        (b"\x30\x05\x00\x03\xed\xa0\x80", "UTF-8"),  # an encoded surrogate
        (b"\x30\x04\x00\x02\xc0\x80", "UTF-8"),  # an overlong U+0000
        (b"\x30\x03\x00\x01\x00", "U+0000"),
        (b"\x30\x03\x00\x01+", "topic name"),
        (b"\x30\x02\x00\x00", "topic name"),  # empty topic name
        (b"\x82\x02\x00\x01", "without a topic filter"),
        (b"\x82\x06\x00\x01\x00\x01a\x03", "requested QoS"),
        (b"\x82\x06\x00\x01\x00\x01a\x81", "requested QoS"),
        (b"\x82\x08\x00\x01\x00\x03a#b\x00", "topic filter"),
        (b"\x82\x08\x00\x01\x00\x03#/a\x00", "topic filter"),
        (b"\x82\x07\x00\x01\x00\x02a+\x00", "topic filter"),
        (b"\xa2\x02\x00\x01", "without a topic filter"),
        (b"\x90\x02\x00\x01", "return codes"),  # SUBACK without codes
        (b"\x90\x03\x00\x01\x03", "return codes"),
        (b"\x20\x02\x00\x06", "return code"),
        (b"\x20\x02\x02\x00", "CONNACK flags"),
        (b"\x20\x02\x01\x05", "CONNACK flags"),  # session present on a refusal
        (b"\xb0\x03\x00\x01\x00", "after"),  # UNSUBACK has no payload in 3.1.1
        (_with_flags(0x03), "reserved"),
        (_with_flags(0x0A), "will"),  # will QoS without a will
        (_with_flags(0x22), "will"),  # will retain without a will
        (_with_flags(0x1E, b"\x00\x01w\x00\x00"), "will"),  # will QoS 3
        (_with_flags(0x42, b"\x00\x01p"), "password without a user name"),
        (_CONNECT[:8] + b"\x05" + _CONNECT[9:], "protocol level 5"),
        (_CONNECT[:4] + b"QTT" + _CONNECT[7:], "protocol name"),
    ],
)
def test_strict_validation(data: bytes, fragment: str | None) -> None:
    buf = bytearray(data)
    if fragment is None:
        assert isinstance(mqtt311.parse(buf, 0, len(buf)), mqtt5.PubRelPacket)
        return
    with pytest.raises(Close, match=re.escape(fragment)):
        mqtt311.parse(buf, 0, len(buf))


def test_remaining_length_must_match_the_frame() -> None:
    buf = bytearray(b"\xc0\x00\xc0\x00")
    with pytest.raises(Close, match="remaining length"):
        mqtt311.parse(buf, 0, 4)


def test_mqtt_string_rules() -> None:
    assert mqtt_string("Zoë/\ufeff".encode(), "topic") == "Zoë/\ufeff"  # U+FEFF is kept, not stripped
    with pytest.raises(Close, match="client id contains U"):
        mqtt_string(b"a\x00b", "client id")


def test_what_3_1_1_cannot_say_is_mapped() -> None:
    # CONNACK refusals without a 3.1.1 code become "server unavailable"; SUBACK failures 0x80.
    for reason, code in [(0x87, 5), (0x86, 4), (0x85, 2), (0x84, 1), (0x97, 3), (0x8A, 3), (0x88, 3)]:
        connack = mqtt5.ConnAckPacket(reason_code=mqtt5.ConnAckReasonCode(reason))
        assert mqtt311.write(connack) == bytes((0x20, 2, 0, code))
    suback = mqtt5.SubAckPacket(7, [mqtt5.SubAckReasonCode(c) for c in (1, 0x87, 0x8F, 0x97, 0)])
    assert mqtt311.write(suback) == b"\x90\x07\x00\x07\x01\x80\x80\x80\x00"
    refused = mqtt5.PubAckPacket(9, reason_code=mqtt5.PubAckReasonCode.NOT_AUTHORIZED)
    assert mqtt311.write(refused) == b"\x40\x02\x00\x09"
    with pytest.raises(ValueError, match="AuthPacket"):
        mqtt311.write(mqtt5.AuthPacket())


def test_protocol_level() -> None:
    v5 = bytearray(mqtt5.ConnectPacket("x").write())
    v311 = bytearray(_CONNECT)
    v31 = bytearray(b"\x10\x0c\x00\x06MQIsdp\x03\x02\x00\x3c")
    assert mqtt311.protocol_level(v5, len(v5)) == 5
    assert mqtt311.protocol_level(v311, len(v311)) == 4
    assert mqtt311.protocol_level(v31, len(v31)) == 3
    assert mqtt311.protocol_level(bytearray(b"\x10\x02\x00\x04"), 4) is None


# ---- cross-check against paho-mqtt's 3.1.1 encoder and decoder ---------------------------------


class _Peer:
    """A loopback socket standing for the server, and a paho client in 3.1.1 mode driven step by step
    (`loop()`, no thread): what paho writes is read here, what is written here paho reads."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="cross-311", protocol=paho.MQTTv311)
        self.events: list[tuple[str, Any]] = []
        self.client.on_connect = lambda c, u, flags, rc, p: self.events.append(
            ("connack", (flags.session_present, rc.value))
        )
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.events.append(
            ("suback", (mid, [x.value for x in codes]))
        )
        self.client.on_unsubscribe = lambda c, u, mid, codes, p: self.events.append(("unsuback", mid))
        self.client.on_publish = lambda c, u, mid, rc, p: self.events.append(("puback", mid))
        self.client.on_message = lambda c, u, m: self.events.append(
            ("message", (m.topic, m.payload, m.qos, m.retain, m.mid))
        )
        self.sock: socket.socket | None = None
        self.buf = bytearray()

    def connect(self) -> None:
        self.client.connect("127.0.0.1", self.listener.getsockname()[1], keepalive=33)
        self.sock, _ = self.listener.accept()
        self.sock.settimeout(5)

    def receive(self) -> bytes:
        """The next whole packet paho wrote, as bytes."""
        assert self.sock is not None
        while True:
            found = frame(self.buf, 0)
            if found is not None and len(self.buf) >= found[1]:
                data = bytes(self.buf[: found[1]])
                del self.buf[: found[1]]
                return data
            chunk = self.sock.recv(4096)
            assert chunk, "paho closed the connection"
            self.buf += chunk

    def send(self, packet: mqtt5.Packet) -> tuple[str, Any]:
        """Write `packet` with our encoder; what paho made of it."""
        assert self.sock is not None
        before = len(self.events)
        self.sock.sendall(mqtt311.write(packet))
        ours = self.client.socket()
        assert ours is not None
        for _ in range(50):
            # loop_read rather than loop(): loop() opens a socket pair of paho's that only its
            # finalizer closes.
            select.select([ours], [], [], 0.1)
            self.client.loop_read()
            if len(self.events) > before:
                return self.events[before]
        raise AssertionError(f"paho did not take {packet!r}")

    def close(self) -> None:
        self.client.disconnect()
        if self.sock is not None:
            self.sock.close()
        self.listener.close()


@pytest.fixture
def peer() -> Iterator[_Peer]:
    p = _Peer()
    try:
        yield p
    finally:
        p.close()


def _same(data: bytes) -> mqtt5.Packet:
    """paho's bytes decode, and our encoder writes exactly those bytes again."""
    packet = _parse_all(data)
    assert mqtt311.write(packet) == data
    return packet


def test_paho_encodes_what_we_decode_and_decodes_what_we_encode(peer: _Peer) -> None:
    peer.client.username_pw_set("user", "pässword")
    peer.client.will_set("wills/cross", b"gone", qos=1, retain=True)
    peer.connect()
    connect = _same(peer.receive())
    assert connect == mqtt5.ConnectPacket(
        "cross-311",
        username="user",
        password="pässword".encode(),
        clean_start=True,
        will=mqtt5.Will("wills/cross", payload=b"gone", qos=mqtt5.QoS.AT_LEAST_ONCE, retain=True),
        keep_alive=33,
    )
    assert peer.send(mqtt5.ConnAckPacket(session_present=False)) == ("connack", (False, 0))

    _, mid = peer.client.subscribe([("a/+/c", 1), ("d/#", 2), ("e", 0)])
    subscribe = _same(peer.receive())
    assert isinstance(subscribe, mqtt5.SubscribePacket)
    assert subscribe.packet_id == mid
    assert [(f.pattern, int(f.max_qos)) for f in subscribe.topic_filters] == [
        ("a/+/c", 1),
        ("d/#", 2),
        ("e", 0),
    ]
    granted = [mqtt5.SubAckReasonCode(c) for c in (1, 0x87, 0)]  # 0x87 goes out as 0x80
    assert peer.send(mqtt5.SubAckPacket(mid, granted)) == ("suback", (mid, [1, 128, 0]))

    info = peer.client.publish("a/b/c", b"\x00payload", qos=1, retain=True)
    publish = _same(peer.receive())
    assert publish == mqtt5.PublishPacket(
        "a/b/c", b"\x00payload", qos=mqtt5.QoS.AT_LEAST_ONCE, retain=True, packet_id=info.mid
    )
    assert peer.send(mqtt5.PubAckPacket(info.mid)) == ("puback", info.mid)
    peer.client.publish("a/b/zero", b"", qos=0)
    assert _same(peer.receive()) == mqtt5.PublishPacket("a/b/zero", b"")

    delivered = mqtt5.PublishPacket("d/é", b"data", qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=77, retain=True)
    assert peer.send(delivered) == ("message", ("d/é", b"data", 1, True, 77))
    assert _same(peer.receive()) == mqtt5.PubAckPacket(77)  # paho acknowledges our QoS 1 delivery

    _, unsubscribe_mid = peer.client.unsubscribe(["a/+/c", "e"])
    assert unsubscribe_mid is not None
    mid = unsubscribe_mid
    unsubscribe = _same(peer.receive())
    assert unsubscribe == mqtt5.UnsubscribePacket(mid, ["a/+/c", "e"])
    assert peer.send(mqtt5.UnsubAckPacket(mid, [])) == ("unsuback", mid)

    peer.client.disconnect()
    assert _same(peer.receive()) == mqtt5.DisconnectPacket()
