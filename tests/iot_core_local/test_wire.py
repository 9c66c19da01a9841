"""The gateway's wire layer on plain bytes: framing, the UTF-8 pre-check, parsing and AWS's topic rules.

No sockets, no event loop: packets written by the `mqtt5` codec go in as bytes, and what comes out is
compared with what went in.
"""

from __future__ import annotations

import mqtt5
import pytest
from hypothesis import given
from hypothesis import strategies as st

from iot_core_local.gateway.wire import (
    Close,
    Reason,
    check_strings,
    frame,
    parse,
    topic_limit_problem,
    topic_matches,
)

# Topic levels: printable text without the separator and wildcards, multi-byte characters included.
levels = st.text(
    alphabet=st.characters(blacklist_categories=["Cs", "Cc"], blacklist_characters="/+#\x00"),
    min_size=1,
    max_size=12,
)
# Topics outside the `$` namespace, whose first level wildcards do not match.
topics = st.lists(levels, min_size=1, max_size=6).map("/".join).filter(lambda t: not t.startswith("$"))
payloads = st.binary(max_size=600)
strings = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=20
)
user_properties = st.lists(st.tuples(strings, strings), max_size=3)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# Byte strings that are not UTF-8: an invalid byte or a broken sequence somewhere.
not_utf8 = (
    st.tuples(
        st.binary(max_size=8), st.sampled_from([b"\xff", b"\xfe", b"\x80", b"\xc3("]), st.binary(max_size=4)
    )
    .map(lambda parts: b"".join(parts))
    .filter(lambda data: not _is_utf8(data))
)


@st.composite
def publishes(draw: st.DrawFn) -> mqtt5.PublishPacket:
    qos = draw(st.sampled_from([mqtt5.QoS.AT_MOST_ONCE, mqtt5.QoS.AT_LEAST_ONCE]))
    return mqtt5.PublishPacket(
        draw(topics),
        draw(payloads),
        qos=qos,
        retain=draw(st.booleans()),
        packet_id=draw(st.integers(1, 65535)) if qos == mqtt5.QoS.AT_LEAST_ONCE else None,
        content_type=draw(st.none() | strings),
        response_topic=draw(st.none() | topics),
        user_properties=draw(user_properties),
    )


@st.composite
def subscribes(draw: st.DrawFn) -> mqtt5.SubscribePacket:
    patterns = draw(st.lists(topics, min_size=1, max_size=5))
    return mqtt5.SubscribePacket(
        draw(st.integers(1, 65535)),
        [mqtt5.TopicFilter(p, max_qos=mqtt5.QoS.AT_LEAST_ONCE) for p in patterns],
        user_properties=draw(user_properties),
    )


@st.composite
def unsubscribes(draw: st.DrawFn) -> mqtt5.UnsubscribePacket:
    patterns = draw(st.lists(topics, min_size=1, max_size=5))
    return mqtt5.UnsubscribePacket(draw(st.integers(1, 65535)), patterns)


@st.composite
def connects(draw: st.DrawFn) -> mqtt5.ConnectPacket:
    will = draw(st.none() | st.builds(lambda t, p: mqtt5.Will(t, payload=p), topics, payloads))
    return mqtt5.ConnectPacket(
        draw(strings),
        clean_start=draw(st.booleans()),
        keep_alive=draw(st.integers(0, 65535)),
        will=will,
        username=draw(st.none() | strings),
        user_properties=draw(user_properties),
    )


packets = st.one_of(publishes(), subscribes(), unsubscribes(), connects())


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# ---- framing and parsing ----------------------------------------------------------------------------


@given(packet=packets, before=st.binary(max_size=40))
def test_round_trip_through_the_codec(packet: mqtt5.Packet, before: bytes) -> None:
    data = packet.write()
    buf = bytearray(before + data + b"\x30")  # another packet may follow, incomplete
    found = frame(buf, len(before))
    assert found is not None
    assert found[1] == len(data)
    assert parse(buf, len(before), found[1]) == packet


@given(length=st.integers(0, 268_435_455))
def test_frame_reads_every_remaining_length(length: int) -> None:
    encoded = _varint(length)
    assert frame(bytearray(b"\x30" + encoded), 0) == (1 + len(encoded), 1 + len(encoded) + length)


def test_frame_refuses_a_fifth_length_byte() -> None:
    with pytest.raises(Close) as refused:
        frame(bytearray(b"\x30\xff\xff\xff\xff\x01"), 0)
    assert refused.value.reason == Reason.MALFORMED_PACKET


@given(packet=packets)
def test_truncated_at_every_byte(packet: mqtt5.Packet) -> None:
    data = packet.write()
    for cut in range(len(data)):
        buf = bytearray(data[:cut])
        found = frame(buf, 0)
        # Incomplete: either the fixed header is not all there, or it announces more than there is.
        assert found is None or found[1] > cut
        if found is not None and found[0] < cut:
            # Handed over as if complete (a lying length), the codec refuses it without a panic.
            with pytest.raises(Close):
                parse(buf, 0, cut)


@given(garbage=st.binary(min_size=2, max_size=300))
def test_garbage_never_escapes_as_anything_but_close(garbage: bytes) -> None:
    buf = bytearray(garbage)
    reason = None
    try:
        found = frame(buf, 0)
        if found is not None and found[1] <= len(buf):
            parse(buf, 0, found[1])
    except Close as e:
        reason = e.reason
    assert reason in (None, Reason.MALFORMED_PACKET, Reason.TOPIC_NAME_INVALID, Reason.TOPIC_ALIAS_INVALID)


# ---- strings that are not UTF-8 (the codec would panic on them) --------------------------------------


def _publish(topic: bytes, properties: bytes = b"") -> bytearray:
    body = len(topic).to_bytes(2, "big") + topic + _varint(len(properties)) + properties + b"payload"
    return bytearray(b"\x30" + _varint(len(body)) + body)


def _string(value: bytes) -> bytes:
    return len(value).to_bytes(2, "big") + value


@given(bad=not_utf8)
def test_non_utf8_topic_is_topic_name_invalid(bad: bytes) -> None:
    buf = _publish(bad)
    with pytest.raises(Close) as refused:
        parse(buf, 0, len(buf))
    assert refused.value.reason == Reason.TOPIC_NAME_INVALID


@given(bad=not_utf8, where=st.sampled_from(["content-type", "response-topic", "user-key", "user-value"]))
def test_non_utf8_property_is_malformed(bad: bytes, where: str) -> None:
    properties = {
        "content-type": b"\x03" + _string(bad),
        "response-topic": b"\x08" + _string(bad),
        "user-key": b"\x26" + _string(bad) + _string(b"v"),
        "user-value": b"\x26" + _string(b"k") + _string(bad),
    }[where]
    buf = _publish(b"a/b", properties)
    found = frame(buf, 0)
    assert found is not None
    with pytest.raises(Close) as refused:
        check_strings(buf, 0, found[0], found[1])
    assert refused.value.reason == Reason.MALFORMED_PACKET


@given(bad=not_utf8, kind=st.sampled_from(["subscribe", "unsubscribe"]))
def test_non_utf8_topic_filter_is_malformed(bad: bytes, kind: str) -> None:
    options = b"\x01" if kind == "subscribe" else b""
    body = b"\x00\x07\x00" + _string(b"ok/filter") + options + _string(bad) + options
    first = 0x82 if kind == "subscribe" else 0xA2
    buf = bytearray(bytes([first]) + _varint(len(body)) + body)
    with pytest.raises(Close) as refused:
        parse(buf, 0, len(buf))
    assert refused.value.reason == Reason.MALFORMED_PACKET


@given(bad=not_utf8)
def test_non_utf8_client_id_is_malformed(bad: bytes) -> None:
    body = b"\x00\x04MQTT\x05\x02\x00\x3c\x00" + _string(bad)
    buf = bytearray(b"\x10" + _varint(len(body)) + body)
    with pytest.raises(Close) as refused:
        parse(buf, 0, len(buf))
    assert refused.value.reason == Reason.MALFORMED_PACKET


@given(packet=packets)
def test_valid_strings_pass_the_pre_check(packet: mqtt5.Packet) -> None:
    buf = bytearray(packet.write())
    found = frame(buf, 0)
    assert found is not None
    check_strings(buf, 0, found[0], found[1])  # raises nothing


# ---- AWS's topic rules -------------------------------------------------------------------------------


@given(levels=st.lists(st.text(alphabet="ab\u00e9", min_size=1, max_size=40), min_size=1, max_size=12))
def test_topic_limits(levels: list[str]) -> None:
    topic = "/".join(levels)
    size, slashes = len(topic.encode()), topic.count("/")
    problem = topic_limit_problem(topic)
    if size > 256:
        assert problem == "longer than 256 bytes"
    elif slashes > 7:
        assert problem == "more than 7 forward slashes"
    else:
        assert problem is None
    # Basic Ingest's `$aws/rules/<rule>/` and a shared subscription's `$share/<group>/` are not counted.
    assert topic_limit_problem(f"$aws/rules/rule_1/{topic}") == problem
    assert topic_limit_problem(f"$share/group/{topic}") == problem


def test_topic_limits_are_parameters() -> None:
    assert topic_limit_problem("a/b/c", max_slashes=1) == "more than 1 forward slashes"
    assert topic_limit_problem("abcd", max_bytes=3) == "longer than 3 bytes"
    assert topic_limit_problem("$aws/rules/r") is None  # nothing after the prefix


@given(topic=topics)
def test_topic_matching(topic: str) -> None:
    levels = topic.split("/")
    assert topic_matches(topic, topic)
    assert topic_matches("#", topic)
    assert topic_matches("/".join("+" for _ in levels), topic)
    assert topic_matches("/".join([*levels[:-1], "#"]), topic)
    assert not topic_matches(topic + "/more", topic)
    assert not topic_matches("/".join("+" for _ in [*levels, "x"]), topic)


@given(topic=topics)
def test_wildcards_do_not_match_dollar_topics_at_the_first_level(topic: str) -> None:
    reserved = "$aws/" + topic
    assert not topic_matches("#", reserved)
    assert not topic_matches("+/" + topic, reserved)
    assert topic_matches("$aws/#", reserved)
