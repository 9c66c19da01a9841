"""MQTT 3.1.1 on plain bytes: the gateway's codec for 3.1.1 clients, to and from `mqtt5` packet objects.

PyPI has no maintained sans-IO 3.1.1 codec (`mqtt5` speaks 5.0 only, `moat-lib-mqtt` 5.0 only,
`mqtt-codec` had its last release in 2019), so this is a small one. Decoding yields the `mqtt5`
package's packet objects, so that the connection applies one set of rules (policies, limits,
provisioning, per-connection answers) to both versions; encoding writes such objects as 3.1.1, keeping
what 3.1.1 can say and mapping the rest (`write`). Nothing here does I/O.

Validation is strict, as the 3.1.1 specification asks of a server: fixed-header flags, remaining
lengths that add up to the last byte, non-zero packet identifiers, well-formed topic filters, and
strings under `wire.mqtt_string`'s UTF-8 rules. Anything else raises `Close`, the gateway's one
error for "this peer's connection ends", and never another exception.
"""

from __future__ import annotations

import mqtt5

from .wire import CONNECT, PUBLISH, SUBSCRIBE, UNSUBSCRIBE, Close, Reason, frame, mqtt_string
from .wire import packet as _packet

__all__ = [
    "PROTOCOL_LEVEL",
    "connack_return_code",
    "parse",
    "protocol_level",
    "write",
]

PROTOCOL_LEVEL = 4  # MQTT 3.1.1
_PROTOCOL_NAME = b"\x00\x04MQTT"

CONNACK, PUBACK, PUBREC, PUBREL, PUBCOMP = 2, 4, 5, 6, 7
SUBACK, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 9, 11, 12, 13, 14
# The fixed-header flags 3.1.1 requires of every type but PUBLISH (whose flags carry DUP, QoS, RETAIN).
_FLAGS = {
    CONNECT: 0,
    CONNACK: 0,
    PUBACK: 0,
    PUBREC: 0,
    PUBREL: 2,
    PUBCOMP: 0,
    SUBSCRIBE: 2,
    SUBACK: 0,
    UNSUBSCRIBE: 2,
    UNSUBACK: 0,
    PINGREQ: 0,
    PINGRESP: 0,
    DISCONNECT: 0,
}
_SUBACK_CODES = frozenset({0, 1, 2, 0x80})

# CONNACK return codes (3.1.1 section 3.2.2.3) and the MQTT 5 reason codes that say the same.
# (Keyed by int: the codec's enums are not hashable.)
_RETURN_CODES = {
    int(mqtt5.ConnAckReasonCode.SUCCESS): 0,
    int(mqtt5.ConnAckReasonCode.UNSUPPORTED_PROTOCOL_VERSION): 1,
    int(mqtt5.ConnAckReasonCode.CLIENT_ID_NOT_VALID): 2,
    int(mqtt5.ConnAckReasonCode.SERVER_UNAVAILABLE): 3,
    int(mqtt5.ConnAckReasonCode.BAD_USER_NAME_OR_PASSWORD): 4,
    int(mqtt5.ConnAckReasonCode.NOT_AUTHORIZED): 5,
}
_REASON_CODES = {code: mqtt5.ConnAckReasonCode(reason) for reason, code in _RETURN_CODES.items()}
_SERVER_UNAVAILABLE = 3


def connack_return_code(reason: mqtt5.ConnAckReasonCode) -> int:
    """The 3.1.1 CONNACK return code for an MQTT 5 reason: 1, 2, 4 and 5 keep their meaning; any other
    refusal (busy, quota exceeded, banned...) has no 3.1.1 code and becomes 3, server unavailable."""
    return _RETURN_CODES.get(int(reason), _SERVER_UNAVAILABLE)


def protocol_level(buf: bytearray, size: int) -> int | None:
    """The protocol level of the CONNECT framed at the start of `buf`: 4 for 3.1.1 ("MQTT"), 5 for
    MQTT 5, 3 for 3.1 ("MQIsdp"); None if the variable header is too short or names another protocol."""
    header = frame(buf, 0)
    if header is None:
        return None
    at = header[0]
    if buf[at : at + 6] == _PROTOCOL_NAME and at + 6 < size:
        return buf[at + 6]
    if buf[at : at + 8] == b"\x00\x06MQIsdp" and at + 8 < size:
        return buf[at + 8]
    return None


class _Reader:
    """Fields of one packet's variable header and payload, each checked against the packet's end."""

    __slots__ = ("at", "data")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def left(self) -> int:
        return len(self.data) - self.at

    def take(self, n: int, what: str) -> bytes:
        if self.left() < n:
            raise _malformed(f"{what} runs past the end of the packet")
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk

    def byte(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        high, low = self.take(2, what)
        return (high << 8) | low

    def packet_id(self) -> int:
        packet_id = self.u16("packet identifier")
        if packet_id == 0:
            raise _malformed("packet identifier 0")
        return packet_id

    def binary(self, what: str) -> bytes:
        return self.take(self.u16(what), what)

    def string(self, what: str) -> str:
        return mqtt_string(self.binary(what), what)

    def rest(self) -> bytes:
        chunk = self.data[self.at :]
        self.at = len(self.data)
        return chunk

    def end(self, what: str) -> None:
        if self.left():
            raise _malformed(f"{self.left()} bytes after the {what}")


def _malformed(why: str) -> Close:
    return Close(f"malformed MQTT 3.1.1 packet ({why})", Reason.MALFORMED_PACKET)


def _check_filter(pattern: str) -> str:
    """A topic filter as 3.1.1 section 4.7 allows it: not empty, `+` a whole level, `#` the last one."""
    if not pattern:
        raise _malformed("empty topic filter")
    levels = pattern.split("/")
    for i, level in enumerate(levels):
        if ("+" in level and level != "+") or ("#" in level and (level != "#" or i != len(levels) - 1)):
            raise Close(f"invalid topic filter {pattern[:64]!r}", Reason.TOPIC_FILTER_INVALID)
    return pattern


def parse(buf: bytearray, start: int, size: int) -> mqtt5.Packet:
    """Parse one complete 3.1.1 frame of `size` bytes at `start`; anything malformed raises `Close`."""
    header = frame(buf, start)
    if header is None or header[1] != size:
        raise _malformed("remaining length does not match the frame")
    first = buf[start]
    kind, flags = first >> 4, first & 0x0F
    if kind == PUBLISH:
        qos = (flags >> 1) & 3
        if qos == 3:
            raise _malformed("PUBLISH with QoS 3")
        if flags & 8 and not qos:
            raise _malformed("DUP set on a QoS 0 PUBLISH")
    elif _FLAGS.get(kind) != flags:
        raise _malformed(f"packet type {kind} with flags {flags:#x}")
    reader = _Reader(bytes(buf[start + header[0] : start + size]))
    packet = _DECODERS[kind](reader, flags)
    reader.end(type(packet).__name__)
    return packet


def _connect(r: _Reader, _flags: int) -> mqtt5.Packet:
    if r.take(6, "protocol name") != _PROTOCOL_NAME:
        raise _malformed("protocol name is not MQTT")
    level = r.byte("protocol level")
    if level != PROTOCOL_LEVEL:
        raise _malformed(f"protocol level {level}")
    flags = r.byte("connect flags")
    will_flag, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 3, bool(flags & 0x20)
    if flags & 0x01:
        raise _malformed("reserved connect flag set")
    if will_qos == 3 or (not will_flag and (will_qos or will_retain)):
        raise _malformed("will QoS or retain without a valid will")
    if flags & 0x40 and not flags & 0x80:
        raise _malformed("password without a user name")
    keep_alive = r.u16("keep alive")
    client_id = r.string("client id")
    will = None
    if will_flag:
        topic = _topic_name(r.string("will topic"))
        will = mqtt5.Will(
            topic, payload=r.binary("will message"), qos=mqtt5.QoS(will_qos), retain=will_retain
        )
    username = r.string("user name") if flags & 0x80 else None
    password = r.binary("password") if flags & 0x40 else None
    return mqtt5.ConnectPacket(
        client_id,
        username=username,
        password=password,
        clean_start=bool(flags & 0x02),
        will=will,
        keep_alive=keep_alive,
    )


def _connack(r: _Reader, _flags: int) -> mqtt5.Packet:
    acknowledge, code = r.byte("acknowledge flags"), r.byte("return code")
    if acknowledge & 0xFE or code not in _REASON_CODES or (code and acknowledge):
        raise _malformed(f"CONNACK flags {acknowledge:#x} with return code {code}")
    return mqtt5.ConnAckPacket(session_present=bool(acknowledge), reason_code=_REASON_CODES[code])


def _topic_name(topic: str) -> str:
    if not topic or "+" in topic or "#" in topic:
        raise Close("invalid topic name", Reason.TOPIC_NAME_INVALID)
    return topic


def _publish(r: _Reader, flags: int) -> mqtt5.Packet:
    topic = _topic_name(r.string("topic"))
    qos = (flags >> 1) & 3
    packet_id = r.packet_id() if qos else None
    return mqtt5.PublishPacket(
        topic,
        r.rest(),
        qos=mqtt5.QoS(qos),
        retain=bool(flags & 1),
        packet_id=packet_id,
        duplicate=bool(flags & 8),
    )


def _puback(r: _Reader, _flags: int) -> mqtt5.Packet:
    return mqtt5.PubAckPacket(r.packet_id())


def _pubrec(r: _Reader, _flags: int) -> mqtt5.Packet:
    return mqtt5.PubRecPacket(r.packet_id())


def _pubrel(r: _Reader, _flags: int) -> mqtt5.Packet:
    return mqtt5.PubRelPacket(r.packet_id())


def _pubcomp(r: _Reader, _flags: int) -> mqtt5.Packet:
    return mqtt5.PubCompPacket(r.packet_id())


def _subscribe(r: _Reader, _flags: int) -> mqtt5.Packet:
    packet_id = r.packet_id()
    filters = []
    while r.left():
        pattern = _check_filter(r.string("topic filter"))
        qos = r.byte("requested QoS")
        if qos > 2:  # the upper six bits are reserved, and QoS 3 does not exist
            raise _malformed(f"requested QoS byte {qos:#x}")
        filters.append(mqtt5.TopicFilter(pattern, max_qos=mqtt5.QoS(qos)))
    if not filters:
        raise _malformed("SUBSCRIBE without a topic filter")
    return mqtt5.SubscribePacket(packet_id, filters)


def _suback(r: _Reader, _flags: int) -> mqtt5.Packet:
    packet_id = r.packet_id()
    codes = list(r.rest())
    if not codes or not _SUBACK_CODES.issuperset(codes):
        raise _malformed(f"SUBACK return codes {codes[:8]}")
    return mqtt5.SubAckPacket(packet_id, [mqtt5.SubAckReasonCode(c) for c in codes])


def _unsubscribe(r: _Reader, _flags: int) -> mqtt5.Packet:
    packet_id = r.packet_id()
    patterns = []
    while r.left():
        patterns.append(_check_filter(r.string("topic filter")))
    if not patterns:
        raise _malformed("UNSUBSCRIBE without a topic filter")
    return mqtt5.UnsubscribePacket(packet_id, patterns)


def _unsuback(r: _Reader, _flags: int) -> mqtt5.Packet:
    return mqtt5.UnsubAckPacket(r.packet_id(), [])


def _pingreq(_r: _Reader, _flags: int) -> mqtt5.Packet:
    return mqtt5.PingReqPacket()


def _pingresp(_r: _Reader, _flags: int) -> mqtt5.Packet:
    return mqtt5.PingRespPacket()


def _disconnect(_r: _Reader, _flags: int) -> mqtt5.Packet:
    return mqtt5.DisconnectPacket()


_DECODERS = {
    CONNECT: _connect,
    CONNACK: _connack,
    PUBLISH: _publish,
    PUBACK: _puback,
    PUBREC: _pubrec,
    PUBREL: _pubrel,
    PUBCOMP: _pubcomp,
    SUBSCRIBE: _subscribe,
    SUBACK: _suback,
    UNSUBSCRIBE: _unsubscribe,
    UNSUBACK: _unsuback,
    PINGREQ: _pingreq,
    PINGRESP: _pingresp,
    DISCONNECT: _disconnect,
}


# ---- encoding ---------------------------------------------------------------------------------


def _string(value: str) -> bytes:
    return _binary(value.encode())


def _binary(value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"a field of {len(value)} bytes does not fit MQTT's 2-byte length")
    return len(value).to_bytes(2, "big") + value


def _write_connect(p: mqtt5.ConnectPacket) -> bytes:
    will = p.will
    flags = 0x02 if p.clean_start else 0
    tail = b""
    if will is not None:
        flags |= 0x04 | (int(will.qos) << 3) | (0x20 if will.retain else 0)
        tail += _string(will.topic) + _binary(will.payload or b"")
    if p.username is not None:
        flags |= 0x80
        tail += _string(p.username)
    if p.password is not None:
        flags |= 0x40
        tail += _binary(p.password)
    head = _PROTOCOL_NAME + bytes((PROTOCOL_LEVEL, flags)) + p.keep_alive.to_bytes(2, "big")
    return _packet(CONNECT << 4, head + _string(p.client_id) + tail)


def _write_publish(p: mqtt5.PublishPacket) -> bytes:
    first = PUBLISH << 4 | (8 if p.duplicate else 0) | int(p.qos) << 1 | (1 if p.retain else 0)
    body = _string(p.topic)
    if int(p.qos):  # (the codec's enums are always true)
        if p.packet_id is None:
            raise ValueError("a QoS 1 or 2 PUBLISH needs a packet identifier")
        body += p.packet_id.to_bytes(2, "big")
    return _packet(first, body + p.payload)


def write(packet: mqtt5.Packet) -> bytes:
    """`packet` as 3.1.1 bytes. What 3.1.1 cannot carry is left out: properties, PUBACK and UNSUBACK
    reason codes; SUBACK failures (any code from 0x80) become 0x80; CONNACK refusals map as
    `connack_return_code` says. An AUTH packet, which 3.1.1 lacks, is a ValueError."""
    if isinstance(packet, mqtt5.PublishPacket):
        return _write_publish(packet)
    if isinstance(packet, mqtt5.PubAckPacket | mqtt5.PubRecPacket | mqtt5.PubCompPacket):
        kind = {mqtt5.PubAckPacket: PUBACK, mqtt5.PubRecPacket: PUBREC}.get(type(packet), PUBCOMP)
        return _packet(kind << 4, packet.packet_id.to_bytes(2, "big"))
    if isinstance(packet, mqtt5.PubRelPacket):
        return _packet(PUBREL << 4 | 2, packet.packet_id.to_bytes(2, "big"))
    if isinstance(packet, mqtt5.SubscribePacket):
        body = b"".join(_string(f.pattern) + bytes((int(f.max_qos),)) for f in packet.topic_filters)
        return _packet(SUBSCRIBE << 4 | 2, packet.packet_id.to_bytes(2, "big") + body)
    if isinstance(packet, mqtt5.SubAckPacket):
        codes = bytes(c if c < 0x80 else 0x80 for c in map(int, packet.reason_codes))
        return _packet(SUBACK << 4, packet.packet_id.to_bytes(2, "big") + codes)
    if isinstance(packet, mqtt5.UnsubscribePacket):
        body = b"".join(_string(p) for p in packet.patterns)
        return _packet(UNSUBSCRIBE << 4 | 2, packet.packet_id.to_bytes(2, "big") + body)
    if isinstance(packet, mqtt5.UnsubAckPacket):
        return _packet(UNSUBACK << 4, packet.packet_id.to_bytes(2, "big"))
    if isinstance(packet, mqtt5.ConnAckPacket):
        code = connack_return_code(packet.reason_code)
        return _packet(CONNACK << 4, bytes((1 if packet.session_present and not code else 0, code)))
    if isinstance(packet, mqtt5.ConnectPacket):
        return _write_connect(packet)
    if isinstance(packet, mqtt5.PingReqPacket):
        return bytes((PINGREQ << 4, 0))
    if isinstance(packet, mqtt5.PingRespPacket):
        return bytes((PINGRESP << 4, 0))
    if isinstance(packet, mqtt5.DisconnectPacket):
        return bytes((DISCONNECT << 4, 0))
    raise ValueError(f"MQTT 3.1.1 has no {type(packet).__name__}")
