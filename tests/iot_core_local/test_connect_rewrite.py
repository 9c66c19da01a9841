"""The byte-level rewrite of a CONNECT's client id (gateway/wire.py `with_client_id`), which gives a
temporary claim's session a broker-side id no device can send: every other field must reach Mosquitto
exactly as the client sent it, in MQTT 5 and in 3.1.1."""

from __future__ import annotations

from typing import Any

import mqtt5
from hypothesis import given, settings
from hypothesis import strategies as st

from iot_core_local.gateway import mqtt311
from iot_core_local.gateway.connection import claim_session_id
from iot_core_local.gateway.wire import with_client_id

# MQTT strings: any code point but U+0000 and surrogates (which UTF-8 cannot carry).
_text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=40)
_topic = _text.filter(lambda s: s and not set(s) & set("+#"))
_qos = st.sampled_from([mqtt5.QoS(q) for q in (0, 1, 2)])


@st.composite
def _connect(draw: st.DrawFn, *, v5: bool) -> dict[str, Any]:
    """A CONNECT's fields but its client id (ConnectPacket(client_id, **fields))."""
    will = None
    if draw(st.booleans()):
        extra: dict[str, Any] = {"will_delay_interval": draw(st.integers(0, 0xFFFF))} if v5 else {}
        will = mqtt5.Will(
            draw(_topic),
            payload=draw(st.binary(max_size=50)),
            qos=draw(_qos),
            retain=draw(st.booleans()),
            **extra,
        )
    username = draw(st.one_of(st.none(), _text))
    extra5 = (
        {
            "session_expiry_interval": draw(st.integers(0, 0xFFFFFFFF)),
            "receive_max": draw(st.integers(1, 0xFFFF)),
            "user_properties": draw(st.lists(st.tuples(_text, _text), max_size=3)),
        }
        if v5
        else {}
    )
    return dict(
        username=username,
        password=None if username is None else draw(st.one_of(st.none(), st.binary(max_size=30))),
        clean_start=draw(st.booleans()),
        will=will,
        keep_alive=draw(st.integers(0, 0xFFFF)),
        **extra5,
    )


@settings(max_examples=300, deadline=None)
@given(_connect(v5=True), _text, _text)
def test_an_mqtt5_connect_changes_in_its_client_id_alone(fields: dict[str, Any], old: str, new: str) -> None:
    rewritten = with_client_id(mqtt5.ConnectPacket(old, **fields).write(), new, mqtt311=False)
    parsed, used = mqtt5.read(memoryview(rewritten))
    assert used == len(rewritten)
    assert parsed == mqtt5.ConnectPacket(new, **fields)


@settings(max_examples=300, deadline=None)
@given(_connect(v5=False), _text, _text)
def test_an_mqtt311_connect_changes_in_its_client_id_alone(
    fields: dict[str, Any], old: str, new: str
) -> None:
    rewritten = with_client_id(mqtt311.write(mqtt5.ConnectPacket(old, **fields)), new, mqtt311=True)
    assert rewritten == mqtt311.write(mqtt5.ConnectPacket(new, **fields))


def test_a_long_session_id_grows_the_remaining_length_field() -> None:
    # A short CONNECT's remaining length fits one byte; with the claim's session id (over 128 bytes) two.
    session = claim_session_id("ab" * 32, "dev")
    rewritten = with_client_id(mqtt5.ConnectPacket("dev").write(), session, mqtt311=False)
    assert rewritten[1] & 0x80
    parsed, used = mqtt5.read(memoryview(rewritten))
    assert used == len(rewritten)
    assert parsed == mqtt5.ConnectPacket(session)
