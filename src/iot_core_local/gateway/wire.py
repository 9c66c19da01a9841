"""MQTT 5 on plain bytes: framing, the UTF-8 pre-check, parsing, and AWS's topic rules.

Nothing here does I/O or knows about connections: every function takes a buffer (or a topic) and
answers, or raises `Close` saying why the peer's connection must end. Packets are framed from their fixed
header and parsed with the `mqtt5` package; whatever the gateway relays unchanged is written as the bytes
that came in, so only the packets it inspects are parsed at all.
"""

from __future__ import annotations

import mqtt5

from .limits import MAX_TOPIC_BYTES, MAX_TOPIC_SLASHES

__all__ = [
    "BASIC_INGEST_PREFIX",
    "CONNACK",
    "CONNECT",
    "NO_SUBSCRIBERS",
    "PUBACK",
    "PUBLISH",
    "RELAYED_FROM_CLIENT",
    "SHARED_PREFIX",
    "SUBACK",
    "SUBSCRIBE",
    "UNSUBACK",
    "UNSUBSCRIBE",
    "V3_CONNACK_BAD_VERSION",
    "Close",
    "Reason",
    "check_strings",
    "frame",
    "mqtt_string",
    "parse",
    "topic_limit_problem",
    "topic_matches",
]

Reason = mqtt5.DisconnectReasonCode

# MQTT control packet types (the high nibble of the first byte).
CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 8, 9, 10, 11
NO_SUBSCRIBERS = 16  # PUBACK reason code
# From the client, PUBACK PUBREC PUBREL PUBCOMP PINGREQ DISCONNECT AUTH go to Mosquitto untouched and
# unparsed: Mosquitto validates them, and a bad one costs that client its own connection only.
RELAYED_FROM_CLIENT = frozenset({4, 5, 6, 7, 12, 14, 15})
# An MQTT 3.1.1 CONNACK "unacceptable protocol version", for a CONNECT of neither 3.1.1 nor 5.
V3_CONNACK_BAD_VERSION = b"\x20\x02\x00\x01"

BASIC_INGEST_PREFIX = "$aws/rules/"  # `$aws/rules/<rule>/` counts toward neither topic limit
SHARED_PREFIX = "$share/"  # nor does `$share/<name>/` in a topic filter


class Close(Exception):
    """End this connection; `outcome` is logged, `reason` (if any) is sent in a DISCONNECT first."""

    def __init__(self, outcome: str, reason: Reason | None = None, *, notable: bool = True) -> None:
        super().__init__(outcome)
        self.outcome = outcome
        self.reason = reason
        self.notable = notable  # logged at INFO: the gateway enforced something


def frame(buf: bytearray, start: int) -> tuple[int, int] | None:
    """(header size, total size) of the packet at `start`, from its fixed header; None if incomplete.

    Only the fixed header is read here, so an oversize packet is refused before it is buffered.
    """
    value = 0
    multiplier = 1
    end = len(buf)
    for i in range(1, 5):
        if start + i >= end:
            return None
        byte = buf[start + i]
        value += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            return 1 + i, 1 + i + value
        multiplier *= 128
    raise Close("malformed packet (remaining length)", Reason.MALFORMED_PACKET)


# MQTT 5 properties by identifier: fixed-size ones, UTF-8 strings, binary data, the string pair.
_PROPERTY_SIZES = {
    **dict.fromkeys((0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A), 1),
    **dict.fromkeys((0x13, 0x21, 0x22, 0x23), 2),
    **dict.fromkeys((0x02, 0x11, 0x18, 0x27), 4),
}
_PROPERTY_STRINGS = frozenset({0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F})
_PROPERTY_BINARY = frozenset({0x09, 0x16})
_USER_PROPERTY = 0x26
_SUBSCRIPTION_ID = 0x0B


class _Truncated(Exception):
    """The packet's structure does not add up; the codec will say how (it raises, it does not panic)."""


def _varint(buf: bytearray, at: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    for i in range(4):
        if at + i >= end:
            raise _Truncated
        byte = buf[at + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at + i + 1
        shift += 7
    raise _Truncated


def packet(first: int, body: bytes) -> bytes:
    """A packet: its first byte, the remaining length as a variable byte integer, then `body`."""
    size = len(body)
    if size > 268_435_455:
        raise ValueError(f"a packet of {size} bytes exceeds MQTT's remaining length")
    length = bytearray()
    while True:
        byte = size % 128
        size //= 128
        length.append(byte | 0x80 if size else byte)
        if not size:
            return bytes((first,)) + bytes(length) + body


def with_client_id(raw_connect: bytes, client_id: str, *, mqtt311: bool) -> bytes:
    """A copy of a CONNECT (already parsed, so well formed) with another client id, every other byte
    as the client sent it: the client id is the payload's first field, after the variable header (the
    protocol name, level, flags, keep alive and, in MQTT 5, the properties)."""
    buf = bytearray(raw_connect)
    found = frame(buf, 0)
    assert found is not None
    at = found[0]
    at += 2 + int.from_bytes(buf[at : at + 2], "big") + 4  # protocol name, level, flags, keep alive
    if not mqtt311:
        properties, at = _varint(buf, at, len(buf))
        at += properties
    old_end = at + 2 + int.from_bytes(buf[at : at + 2], "big")
    encoded = client_id.encode()
    body = raw_connect[found[0] : at] + len(encoded).to_bytes(2, "big") + encoded + raw_connect[old_end:]
    return packet(raw_connect[0], body)


def _skip_binary(buf: bytearray, at: int, end: int) -> int:
    if at + 2 > end:
        raise _Truncated
    after = at + 2 + ((buf[at] << 8) | buf[at + 1])
    if after > end:
        raise _Truncated
    return after


def mqtt_string(data: bytes, what: str) -> str:
    """A UTF-8 string field as MQTT allows it (3.1.1 section 1.5.3): well-formed UTF-8, so no surrogates
    and no overlong forms, and no U+0000; anything else raises `Close` naming the field."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        problem = "is not valid UTF-8"
    else:
        if "\x00" not in text:
            return text
        problem = "contains U+0000"
    reason = Reason.TOPIC_NAME_INVALID if what == "topic" else Reason.MALFORMED_PACKET
    raise Close(f"{what} {problem}", reason)


def _check_string(buf: bytearray, at: int, end: int, what: str) -> int:
    after = _skip_binary(buf, at, end)
    try:
        buf[at + 2 : after].decode("utf-8")
    except UnicodeDecodeError:
        reason = Reason.TOPIC_NAME_INVALID if what == "topic" else Reason.MALFORMED_PACKET
        raise Close(f"{what} is not valid UTF-8", reason) from None
    return after


def _check_properties(buf: bytearray, at: int, end: int) -> int:
    length, at = _varint(buf, at, end)
    stop = at + length
    if stop > end:
        raise _Truncated
    while at < stop:
        identifier = buf[at]
        at += 1
        fixed = _PROPERTY_SIZES.get(identifier)
        if fixed is not None:
            at += fixed
        elif identifier in _PROPERTY_STRINGS:
            at = _check_string(buf, at, stop, "property")
        elif identifier in _PROPERTY_BINARY:
            at = _skip_binary(buf, at, stop)
        elif identifier == _USER_PROPERTY:
            at = _check_string(buf, _check_string(buf, at, stop, "user property"), stop, "user property")
        elif identifier == _SUBSCRIPTION_ID:
            at = _varint(buf, at, stop)[1]
        else:
            raise _Truncated
    if at != stop:
        raise _Truncated
    return stop


def _check_publish(buf: bytearray, at: int, end: int, flags: int) -> None:
    at = _check_string(buf, at, end, "topic")
    if (flags >> 1) & 3:
        at += 2  # packet identifier
    if at < end and buf[at]:  # most PUBLISHes carry no properties: one byte says so
        _check_properties(buf, at, end)


def _check_connect(buf: bytearray, at: int, end: int) -> None:
    at = _check_string(buf, at, end, "protocol name")
    if at + 4 > end:
        raise _Truncated
    connect_flags = buf[at + 1]
    at = _check_properties(buf, at + 4, end)
    at = _check_string(buf, at, end, "client id")
    if connect_flags & 0x04:  # will
        at = _check_properties(buf, at, end)
        at = _check_string(buf, at, end, "will topic")
        at = _skip_binary(buf, at, end)
    if connect_flags & 0x80:
        _check_string(buf, at, end, "user name")


def _check_filters(buf: bytearray, at: int, end: int, options: int) -> None:
    at = _check_properties(buf, at + 2, end)
    while at < end:
        at = _check_string(buf, at, end, "topic filter") + options


def check_strings(buf: bytearray, start: int, header: int, size: int) -> None:
    """Raise `Close` if a UTF-8 string of a client's CONNECT, PUBLISH, SUBSCRIBE or UNSUBSCRIBE is not
    UTF-8.

    mqtt5 0.8 panics on such strings (a BaseException, after a Rust panic message and a Python
    traceback printed straight to stderr), so they are found first: one walk over the packet's
    length-prefixed fields, no decoding of anything else. A packet whose structure does not add up is
    left to the codec, which raises a plain error for it.
    """
    kind = buf[start] >> 4
    at, end = start + header, start + size
    try:
        if kind == PUBLISH:
            _check_publish(buf, at, end, buf[start] & 0x0F)
        elif kind == CONNECT:
            _check_connect(buf, at, end)
        elif kind == SUBSCRIBE:
            _check_filters(buf, at, end, 1)  # each filter is followed by its subscription options
        elif kind == UNSUBSCRIBE:
            _check_filters(buf, at, end, 0)
    except _Truncated:
        pass


def parse(buf: bytearray, start: int, size: int) -> mqtt5.Packet:
    """Parse one complete frame of `size` bytes at `start`; a malformed one raises `Close`."""
    if buf[start] >> 4 in (CONNECT, PUBLISH, SUBSCRIBE, UNSUBSCRIBE):
        header = frame(buf, start)
        assert header is not None
        check_strings(buf, start, header[0], size)
    with memoryview(buf) as view:
        try:
            packet, used = mqtt5.read(view[start : start + size])
        except (ValueError, IndexError) as e:
            if "Topic alias" in str(e):  # the codec refuses alias 0 while reading
                raise Close(f"topic alias invalid ({e})", Reason.TOPIC_ALIAS_INVALID) from None
            raise Close(f"malformed packet ({e})", Reason.MALFORMED_PACKET) from None
        except BaseException as e:
            if type(e).__name__ != "PanicException":
                raise
            raise Close("malformed packet (undecodable string)", Reason.MALFORMED_PACKET) from None
    if used != size:
        raise Close("malformed packet (length mismatch)", Reason.MALFORMED_PACKET)
    return packet


def topic_limit_problem(
    topic: str, max_bytes: int = MAX_TOPIC_BYTES, max_slashes: int = MAX_TOPIC_SLASHES
) -> str | None:
    """Why a topic name or filter breaks AWS's size or depth limit, or None if it does not."""
    counted = topic
    if topic.startswith((BASIC_INGEST_PREFIX, SHARED_PREFIX)):
        skip = 3 if topic.startswith(BASIC_INGEST_PREFIX) else 2
        parts = topic.split("/", skip)
        counted = parts[skip] if len(parts) > skip else ""
    if len(counted) > max_bytes or len(counted.encode()) > max_bytes:
        return f"longer than {max_bytes} bytes"
    if counted.count("/") > max_slashes:
        return f"more than {max_slashes} forward slashes"
    return None


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic filter matching, including the rule that wildcards do not match `$` topics at level 1."""
    parts = topic_filter.split("/")
    levels = topic.split("/")
    for i, part in enumerate(parts):
        if part == "#":
            return not (i == 0 and topic.startswith("$"))
        if i >= len(levels):
            return False
        if part == "+":
            if i == 0 and topic.startswith("$"):
                return False
            continue
        if part != levels[i]:
            return False
    return len(parts) == len(levels)
