"""The device gateway: MQTT 5 over TLS with client certificates, in front of Mosquitto.

Why it exists (see DESIGN.md): Mosquitto alone cannot refuse an inactive or revoked certificate at
CONNECT, and would broadcast `$aws/certificates/create/json/accepted` (a private key) to every hub that
shares a claim certificate. The gateway terminates TLS, applies IoT Core's connect rules, answers the
fleet provisioning topics on the asking connection only, checks IoT policies on connect, publish,
subscribe and delivery, and relays every other packet to Mosquitto unchanged.

One connection, in order:

    TCP accept -> TLS handshake (10 s) -> CONNECT (10 s) -> certificate rules (JITR/JITP) ->
    iot:Connect -> a TCP connection to Mosquitto, CONNECT forwarded, CONNACK relayed -> two pumps:
    client -> broker (inspects PUBLISH, SUBSCRIBE, UNSUBSCRIBE) and broker -> client (iot:Receive)

Packets are framed from their fixed header and parsed with the `mqtt5` package; anything relayed
unchanged is written as the bytes that came in. A client that breaks the rules loses its own
connection and nothing else. Registry reads for a CONNECT run on the loop (they are short), and so do
CreateCertificateFromCsr and a RegisterThing without a hook (under a millisecond each); only RSA key
generation (CreateKeysAndCertificate), a pre-provisioning hook, JITR/JITP and the TLS trust store rebuild
run in a worker thread.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import ctypes
import gc
import hashlib
import logging
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import mqtt5
from cryptography import x509

from . import policy
from .ca import CertificateAuthority
from .faults import CONNECT, Fault, FaultInjector
from .provisioning import (
    Answer,
    ProvisioningService,
    Request,
    is_provisioning_filter,
    parse_request_topic,
    registration_event_topic,
)
from .registry import Certificate, Registry

__all__ = ["MAX_PACKET_SIZE", "MAX_PAYLOAD_SIZE", "Gateway"]

log = logging.getLogger("iot_core_local.gateway")

T = TypeVar("T")

MAX_PAYLOAD_SIZE = 128 * 1024  # AWS IoT Core's message size limit
# What the CONNACK announces and the framing enforces: the payload limit plus room for topic and properties.
MAX_PACKET_SIZE = MAX_PAYLOAD_SIZE + 8 * 1024
HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
BROKER_TIMEOUT = 10.0
MAINTENANCE_INTERVAL = 1.0
TRIM_AFTER_CLOSED = 64  # connections closed since the last heap trim that make another worthwhile
SWEEP_INTERVAL = 60.0
IGNORE_HOLD = 600.0  # how long an ignored CONNECT keeps its connection, at most
READ_SIZE = 65536
# Answers the gateway writes itself (PUBACK 135, local SUBACKs, provisioning answers) to a client that
# sends but does not read: past this many buffered bytes the client pump stops reading from that client
# until its output drains, and closes it if that takes longer than CLIENT_DRAIN_TIMEOUT.
CLIENT_WRITE_LIMIT = 256 * 1024
CLIENT_DRAIN_TIMEOUT = 30.0
_DECISION_CACHE_SIZE = 1024
# AWS IoT Core's message broker limits (developerguide/limits: "Message broker and protocol limits").
MAX_TOPIC_BYTES = 256  # topic name or topic filter, UTF-8
MAX_TOPIC_SLASHES = 7
MAX_FILTERS_PER_SUBSCRIBE = 8
MAX_SUBSCRIPTIONS_PER_CONNECTION = 50
_BASIC_INGEST_PREFIX = "$aws/rules/"  # `$aws/rules/<rule>/` counts toward neither topic limit
_SHARED_PREFIX = "$share/"  # nor does `$share/<name>/` in a topic filter

ACTIVE = "ACTIVE"
PENDING_ACTIVATION = "PENDING_ACTIVATION"

# MQTT control packet types (the high nibble of the first byte).
_CONNECT, _CONNACK, _PUBLISH, _PUBACK = 1, 2, 3, 4
_NO_SUBSCRIBERS = 16  # PUBACK reason code
_SUBSCRIBE, _SUBACK, _UNSUBSCRIBE, _UNSUBACK = 8, 9, 10, 11
# From the client, PUBACK PUBREC PUBREL PUBCOMP PINGREQ DISCONNECT AUTH go to Mosquitto untouched and
# unparsed: Mosquitto validates them, and a bad one costs that client its own connection only.
_RELAYED_FROM_CLIENT = frozenset({4, 5, 6, 7, 12, 14, 15})
# An MQTT 3.1.1 CONNACK "unacceptable protocol version": the gateway speaks MQTT 5 only.
_V3_CONNACK_BAD_VERSION = b"\x20\x02\x00\x01"

Reason = mqtt5.DisconnectReasonCode


class _Close(Exception):
    """End this connection; `outcome` is logged, `reason` (if any) is sent in a DISCONNECT first."""

    def __init__(self, outcome: str, reason: Reason | None = None, *, notable: bool = True) -> None:
        super().__init__(outcome)
        self.outcome = outcome
        self.reason = reason
        self.notable = notable  # logged at INFO: the gateway enforced something


def _frame(buf: bytearray, start: int) -> tuple[int, int] | None:
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
    raise _Close("malformed packet (remaining length)", Reason.MALFORMED_PACKET)


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


def _skip_binary(buf: bytearray, at: int, end: int) -> int:
    if at + 2 > end:
        raise _Truncated
    after = at + 2 + ((buf[at] << 8) | buf[at + 1])
    if after > end:
        raise _Truncated
    return after


def _check_string(buf: bytearray, at: int, end: int, what: str) -> int:
    after = _skip_binary(buf, at, end)
    try:
        buf[at + 2 : after].decode("utf-8")
    except UnicodeDecodeError:
        reason = Reason.TOPIC_NAME_INVALID if what == "topic" else Reason.MALFORMED_PACKET
        raise _Close(f"{what} is not valid UTF-8", reason) from None
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


def _check_strings(buf: bytearray, start: int, header: int, size: int) -> None:
    """Close the connection if a UTF-8 string of a client's CONNECT, PUBLISH, SUBSCRIBE or UNSUBSCRIBE
    is not UTF-8.

    mqtt5 0.8 panics on such strings (a BaseException, after a Rust panic message and a Python
    traceback printed straight to stderr), so they are found first: one walk over the packet's
    length-prefixed fields, no decoding of anything else. A packet whose structure does not add up is
    left to the codec, which raises a plain error for it.
    """
    kind = buf[start] >> 4
    flags = buf[start] & 0x0F
    at, end = start + header, start + size
    try:
        if kind == _PUBLISH:
            at = _check_string(buf, at, end, "topic")
            if (flags >> 1) & 3:
                at += 2  # packet identifier
            if at < end and buf[at]:  # most PUBLISHes carry no properties: one byte says so
                _check_properties(buf, at, end)
        elif kind == _CONNECT:
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
        elif kind in (_SUBSCRIBE, _UNSUBSCRIBE):
            at = _check_properties(buf, at + 2, end)
            while at < end:
                at = _check_string(buf, at, end, "topic filter")
                if kind == _SUBSCRIBE:
                    at += 1  # subscription options
    except _Truncated:
        pass


def _parse(buf: bytearray, start: int, size: int) -> mqtt5.Packet:
    """Parse one complete frame; a malformed one closes the connection."""
    if buf[start] >> 4 in (_CONNECT, _PUBLISH, _SUBSCRIBE, _UNSUBSCRIBE):
        header = _frame(buf, start)
        assert header is not None
        _check_strings(buf, start, header[0], size)
    with memoryview(buf) as view:
        try:
            packet, used = mqtt5.read(view[start : start + size])
        except (ValueError, IndexError) as e:
            if "Topic alias" in str(e):  # the codec refuses alias 0 while reading
                raise _Close(f"topic alias invalid ({e})", Reason.TOPIC_ALIAS_INVALID) from None
            raise _Close(f"malformed packet ({e})", Reason.MALFORMED_PACKET) from None
        except BaseException as e:
            if type(e).__name__ != "PanicException":
                raise
            raise _Close("malformed packet (undecodable string)", Reason.MALFORMED_PACKET) from None
    if used != size:
        raise _Close("malformed packet (length mismatch)", Reason.MALFORMED_PACKET)
    return packet


def topic_limit_problem(topic: str) -> str | None:
    """Why a topic name or filter breaks AWS's size or depth limit, or None if it does not."""
    counted = topic
    if topic.startswith((_BASIC_INGEST_PREFIX, _SHARED_PREFIX)):
        skip = 3 if topic.startswith(_BASIC_INGEST_PREFIX) else 2
        parts = topic.split("/", skip)
        counted = parts[skip] if len(parts) > skip else ""
    if len(counted) > MAX_TOPIC_BYTES or len(counted.encode()) > MAX_TOPIC_BYTES:
        return f"longer than {MAX_TOPIC_BYTES} bytes"
    if counted.count("/") > MAX_TOPIC_SLASHES:
        return f"more than {MAX_TOPIC_SLASHES} forward slashes"
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


class _Merge:
    """A SUBSCRIBE or UNSUBSCRIBE answered partly here and partly by Mosquitto."""

    __slots__ = ("codes", "patterns", "positions")

    def __init__(self, codes: list[int], positions: list[int], patterns: list[str]) -> None:
        self.codes = codes
        self.positions = positions
        self.patterns = patterns  # the forwarded filters, by position


class _Connection:
    """One device connection and its relay connection to Mosquitto."""

    def __init__(
        self,
        gateway: Gateway,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        der: bytes,
    ) -> None:
        self.gw = gateway
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.der = der
        self.certificate_id = hashlib.sha256(der).hexdigest()
        self.client_id = "-"
        self.buf = bytearray()
        self.broker_reader: asyncio.StreamReader | None = None
        self.broker_writer: asyncio.StreamWriter | None = None
        self.documents: list[str] = []
        self.variables: dict[str, str] = {}
        self.decisions: dict[tuple[str, str], bool] = {}
        self.policies_stale = False  # set from the registry's policy listener (on the loop)
        self.local_filters: set[str] = set()  # subscriptions provisioning answers may match
        self.subscriptions: set[str] = set()  # every filter granted on this connection (at most 50)
        self.pending_subacks: dict[int, _Merge] = {}
        self.pending_unsubacks: dict[int, _Merge] = {}
        self.client_aliases: dict[int, str] = {}
        self.topic_alias_max = 0  # what the CONNACK announced: the client may use aliases 1..this
        self.broker_aliases: dict[int, str] = {}
        self.broker_buf = bytearray()
        self.kicked: _Close | None = None
        self.started = time.monotonic()

    # ---- lifecycle ----------------------------------------------------------------------------

    def describe(self) -> str:
        return f"connection {self.peer} cert {self.certificate_id} client {self.client_id!r}"

    async def run(self) -> None:
        accepted = False
        try:
            connect, raw = await self._read_connect()
            if self.gw.faults.armed:
                await self._connect_fault()
            changes = self.gw.changes  # certificate/policy changes heard so far (see below)
            await self._authorize(connect)
            await self._open_broker(raw)
            accepted = True
            self.gw.register(self)
            if self.gw.changes != changes:
                self._recheck()
            log.info("%s: accepted", self.describe())
            await self._relay()
        except _Close as e:
            closing = self.kicked or e
            if closing.reason is not None:
                self._send_client(mqtt5.DisconnectPacket(reason_code=closing.reason))
            level = logging.INFO if closing.notable or not accepted else logging.DEBUG
            after = f" after {time.monotonic() - self.started:.1f} s" if accepted else ""
            log.log(level, "%s: closed%s: %s", self.describe(), after, closing.outcome)
            del closing  # it holds a traceback through this frame (see _relay)
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
            log.debug("%s: connection lost: %s", self.describe(), e)
        finally:
            if accepted:
                self.gw.unregister(self)
            self.kicked = None
            self.abort()

    def abort(self) -> None:
        """Close both sides now; pending output to a dead or hostile peer is not worth waiting for."""
        for writer in (self.writer, self.broker_writer):
            if writer is not None:
                transport = writer.transport
                if not transport.is_closing():
                    # close() flushes what is buffered (a DISCONNECT, say); the peer's reader ends then.
                    transport.close()

    def kick(self, outcome: str, reason: Reason) -> None:
        """Disconnect from outside the pumps (certificate no longer ACTIVE, server stopping)."""
        if self.kicked is None:
            self.kicked = _Close(outcome, reason)
            self._send_client(mqtt5.DisconnectPacket(reason_code=reason))
            self.kicked = _Close(outcome, None)  # the DISCONNECT is sent; do not send it twice
            self.abort()

    def _send_client(self, packet: mqtt5.Packet) -> None:
        self._write_client(packet.write())

    def _write_client(self, data: bytes) -> None:
        # Writing to a closed TLS transport makes asyncio log warnings; a closed peer needs nothing.
        if not self.writer.transport.is_closing():
            self.writer.write(data)

    def _send_broker(self, data: bytes) -> None:
        assert self.broker_writer is not None
        if not self.broker_writer.transport.is_closing():
            self.broker_writer.write(data)

    # ---- TLS, CONNECT, connect rules ----------------------------------------------------------

    async def _read_connect(self) -> tuple[mqtt5.ConnectPacket, bytes]:
        try:
            size = await asyncio.wait_for(self._fill_one(), CONNECT_TIMEOUT)
        except TimeoutError:
            raise _Close(f"no CONNECT within {CONNECT_TIMEOUT:g} s") from None
        if self.buf[0] >> 4 != _CONNECT:
            raise _Close("first packet is not CONNECT")
        try:
            packet = _parse(self.buf, 0, size)
        except _Close as e:
            if b"MQTT\x04" in self.buf[:size] or b"MQIsdp" in self.buf[:size]:
                self._write_client(_V3_CONNACK_BAD_VERSION)
                raise _Close("MQTT 3.1.1 is not supported; use MQTT 5") from None
            raise _Close(f"refused CONNECT: {e.outcome}") from None
        assert isinstance(packet, mqtt5.ConnectPacket)
        raw = bytes(self.buf[:size])
        del self.buf[:size]
        self.client_id = packet.client_id
        return packet, raw

    async def _fill_one(self) -> int:
        while True:
            frame = _frame(self.buf, 0)
            if frame is not None:
                if frame[1] > MAX_PACKET_SIZE:
                    raise _Close("packet too large", Reason.PACKET_TOO_LARGE)
                if len(self.buf) >= frame[1]:
                    return frame[1]
            data = await self.reader.read(READ_SIZE)
            if not data:
                raise _Close("closed by the client before CONNECT", notable=False)
            self.buf += data

    async def _connect_fault(self) -> None:
        """Apply an armed fault to this CONNECT (see faults.py); returns to go on as usual."""
        fault = self.gw.faults.take(CONNECT)
        if fault is None:
            return
        log.info("%s: fault injected at CONNECT: %s", self.describe(), fault.describe())
        if fault.kind in ("refuse", "drop"):
            raise _Close(f"fault {fault.kind}: closed without CONNACK")
        if fault.kind == "throttle":
            # AWS answers a throttled MQTT 5 connect with CONNACK "quota exceeded".
            self._send_client(mqtt5.ConnAckPacket(reason_code=mqtt5.ConnAckReasonCode.QUOTA_EXCEEDED))
            raise _Close("fault throttle: CONNACK 151 (quota exceeded)")
        if fault.kind == "delay":
            await asyncio.sleep(fault.seconds)
            return
        # ignore: no CONNACK ever; hold the connection until the client gives up (bounded).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._discard_until_closed(), IGNORE_HOLD)
        raise _Close("fault ignore: CONNECT never answered", notable=True)

    async def _discard_until_closed(self) -> None:
        while await self.reader.read(READ_SIZE):
            pass

    async def _request_fault(self, fault: Fault, request: Request, packet: mqtt5.PublishPacket) -> bool:
        """Apply an armed fault to a provisioning request; True if the request is to go on as usual."""
        log.info(
            "provisioning %s cert %s client %r: fault injected: %s",
            request.operation,
            self.certificate_id,
            self.client_id,
            fault.describe(),
        )
        if fault.kind == "drop":
            # In the middle of the request: no PUBACK, no answer, nothing done.
            raise _Close(f"fault drop: closed during {request.operation}")
        if packet.qos == mqtt5.QoS.AT_LEAST_ONCE and packet.packet_id is not None:
            self._send_client(mqtt5.PubAckPacket(packet.packet_id))
        if fault.kind == "delay":
            await asyncio.sleep(fault.seconds)
            return True
        if fault.kind == "throttle":
            self._answer(self.gw.provisioning.throttled(request))
        return False  # ignore (and throttle, answered): nothing more

    def _answer(self, answer: Answer) -> None:
        """Send a provisioning answer on this connection only, and log the request (ids, never secrets)."""
        delivered = self.deliver_local(answer.topic, answer.payload)
        log.info(
            "provisioning %s cert %s client %r: %s%s",
            answer.operation,
            self.certificate_id,
            self.client_id,
            answer.summary,
            "" if delivered else f" (not delivered: no subscription to {answer.topic})",
        )

    async def _authorize(self, connect: mqtt5.ConnectPacket) -> None:
        gw = self.gw
        record = gw.registry.find_certificate(self.certificate_id)
        if record is None or record.status == PENDING_ACTIVATION:
            record = await self._just_in_time(record)
        if record is None:
            raise _Close("refused without CONNACK: unknown certificate")
        if record.status != ACTIVE:
            raise _Close(f"refused without CONNACK: certificate is {record.status}")
        ca_id = record.ca_certificate_id
        if ca_id is not None and ca_id != gw.ca.issuing_ca_id:
            ca = gw.registry.find_ca_certificate(ca_id)
            if ca is None or ca.status != ACTIVE:
                state = "not registered" if ca is None else ca.status
                raise _Close(f"refused without CONNACK: the certificate's CA {ca_id} is {state}")

        self.variables = {"iot:ClientId": connect.client_id}
        self._load_policies()
        if not self.allowed("iot:Connect", f"client/{connect.client_id}"):
            self._refuse_connect("iot:Connect is not allowed")
        will = connect.will
        if will is not None and (
            will.topic.startswith("$") or not self.allowed("iot:Publish", f"topic/{will.topic}")
        ):
            self._refuse_connect(f"iot:Publish is not allowed on the will topic {will.topic!r}")

    def _load_policies(self) -> None:
        """(Re)read this certificate's policies and thing; a policy attached or detached while connected
        applies from the next publish, subscribe or delivery, as on AWS."""
        self.policies_stale = False
        registry = self.gw.registry
        arn = registry.cert_arn(self.certificate_id)
        self.documents = [p.document for p in registry.list_attached_policies(arn)]
        things = registry.list_principal_things(arn)
        self.variables.pop("iot:Connection.Thing.ThingName", None)
        if len(things) == 1:
            self.variables["iot:Connection.Thing.ThingName"] = things[0]
            self.variables["iot:Connection.Thing.IsAttached"] = "true"
        else:
            self.variables["iot:Connection.Thing.IsAttached"] = "false"
        self.decisions.clear()

    def _recheck(self) -> None:
        """A certificate or policy changed while this connection was being authorized and waited for
        Mosquitto's CONNACK, before the gateway could tell it: check the status again, re-read policies."""
        record = self.gw.registry.find_certificate(self.certificate_id)
        if record is None or record.status != ACTIVE:
            status = "DELETED" if record is None else record.status
            raise _Close(f"disconnected: certificate is now {status}", Reason.ADMINISTRATIVE_ACTION)
        self.policies_stale = True

    def _refuse_connect(self, why: str) -> None:
        # AWS answers an MQTT 5 client it will not authorize with CONNACK "not authorized".
        self._send_client(mqtt5.ConnAckPacket(reason_code=mqtt5.ConnAckReasonCode.NOT_AUTHORIZED))
        raise _Close(f"refused with CONNACK 135: {why}")

    async def _just_in_time(self, record: Certificate | None) -> Certificate | None:
        gw = self.gw
        cert = x509.load_der_x509_certificate(self.der)
        ca = gw.registry.find_ca_for(cert)
        if ca is None or ca.status != ACTIVE or not ca.auto_registration:
            return record
        try:
            provisioned, event = await gw.in_thread(
                gw.provisioning.just_in_time, cert, self.certificate_id, ca, record
            )
        except Exception as e:  # JITP template problems are the customer's; the device is refused
            message = getattr(e, "message", None) or _brief(e)
            raise _Close(f"refused without CONNACK: JITP failed: {message}") from None
        if event is not None:
            await gw.publish_event(registration_event_topic(ca.certificate_id), event)
            raise _Close(
                "JITR: certificate registered PENDING_ACTIVATION, event published; closed without CONNACK"
            )
        status = provisioned.status if provisioned is not None else "absent"
        log.info("%s: JITP provisioned the certificate, now %s", self.describe(), status)
        return provisioned

    # ---- the relay ----------------------------------------------------------------------------

    async def _open_broker(self, raw_connect: bytes) -> None:
        gw = self.gw
        try:
            broker_reader, broker_writer = await asyncio.wait_for(
                asyncio.open_connection(gw.broker_host, gw.broker_port), BROKER_TIMEOUT
            )
        except (OSError, TimeoutError) as e:
            self._send_client(mqtt5.ConnAckPacket(reason_code=mqtt5.ConnAckReasonCode.SERVER_UNAVAILABLE))
            raise _Close(f"broker unreachable: {_brief(e)}") from None
        self.broker_reader, self.broker_writer = broker_reader, broker_writer
        broker_writer.write(raw_connect)
        buf = bytearray()
        try:
            size = await asyncio.wait_for(_read_frame(broker_reader, buf), BROKER_TIMEOUT)
        except (TimeoutError, ConnectionError, OSError) as e:
            self._send_client(mqtt5.ConnAckPacket(reason_code=mqtt5.ConnAckReasonCode.SERVER_UNAVAILABLE))
            raise _Close(f"broker did not answer CONNECT: {_brief(e)}") from None
        connack = _parse(buf, 0, size)
        if not isinstance(connack, mqtt5.ConnAckPacket):
            raise _Close("broker did not answer CONNECT with CONNACK")
        if connack.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
            self._write_client(bytes(buf[:size]))
            raise _Close(f"broker refused CONNECT: {connack.reason_code.name}")
        # What AWS IoT Core announces: QoS 1 at most, 128 KB messages; the rest is Mosquitto's session.
        self._send_client(
            mqtt5.ConnAckPacket(
                session_present=connack.session_present,
                session_expiry_interval=connack.session_expiry_interval,
                assigned_client_id=connack.assigned_client_id,
                server_keep_alive=connack.server_keep_alive,
                receive_max=connack.receive_max,
                topic_alias_max=connack.topic_alias_max,
                max_qos=mqtt5.QoS.AT_LEAST_ONCE,
                retain_available=connack.retain_available,
                max_packet_size=MAX_PACKET_SIZE,
                wildcard_subscription_available=connack.wildcard_subscription_available,
                subscription_id_available=connack.subscription_id_available,
                shared_subscription_available=connack.shared_subscription_available,
                user_properties=connack.user_properties,
            )
        )
        self.topic_alias_max = connack.topic_alias_max or 0
        if connack.assigned_client_id:
            self.client_id = connack.assigned_client_id
            self.variables["iot:ClientId"] = connack.assigned_client_id
        del buf[:size]
        self.broker_buf = buf

    async def _relay(self) -> None:
        to_broker = asyncio.create_task(self._from_client())
        to_client = asyncio.create_task(self._from_broker())
        try:
            await asyncio.wait({to_broker, to_client}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            to_broker.cancel()
            to_client.cancel()
            # Collect both, so that no "exception was never retrieved" is logged for the loser.
            results = await asyncio.gather(to_broker, to_client, return_exceptions=True)
        failure = self._outcome(results)
        # Raised from a frame that holds neither the tasks nor their exceptions: a traceback that reaches
        # them makes a reference cycle, and every closed connection (its TLS state, buffers and
        # streams, ~40 KB) would then wait for the cyclic garbage collector instead of going at once.
        del to_broker, to_client, results
        try:
            raise failure
        finally:
            del failure

    def _outcome(self, results: tuple[BaseException | None, ...]) -> BaseException:
        for result in results:
            if isinstance(result, _Close):
                return result
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                if isinstance(result, ConnectionError | OSError | asyncio.IncompleteReadError):
                    return _Close(f"connection lost: {_brief(result)}", notable=False)
                return result
        if self.kicked is not None:
            return self.kicked
        return _Close("ended", notable=False)

    def allowed(self, action: str, resource: str) -> bool:
        if self.policies_stale:
            self._load_policies()
        key = (action, resource)
        decision = self.decisions.get(key)
        if decision is None:
            decision = policy.evaluate(self.documents, action, self.gw.arn_prefix + resource, self.variables)
            if len(self.decisions) >= _DECISION_CACHE_SIZE:
                self.decisions.clear()
            self.decisions[key] = decision
        return decision

    async def _from_client(self) -> None:
        buf = self.buf
        assert self.broker_writer is not None
        broker = self.broker_writer
        while True:
            pos = 0
            span = -1  # start of a run of packets relayed unchanged, written as one slice
            while True:
                frame = _frame(buf, pos)
                if frame is None:
                    break
                size = frame[1]
                if size > MAX_PACKET_SIZE:
                    raise _Close("packet too large", Reason.PACKET_TOO_LARGE)
                if pos + size > len(buf):
                    break
                kind = buf[pos] >> 4
                relay = kind in _RELAYED_FROM_CLIENT
                if not relay:
                    packet = _parse(buf, pos, size)
                    if span >= 0:
                        self._send_broker(bytes(buf[span:pos]))
                        span = -1
                    relay = await self._client_packet(packet)
                if relay:
                    if span < 0:
                        span = pos
                elif span >= 0:
                    self._send_broker(bytes(buf[span:pos]))
                    span = -1
                pos += size
            if span >= 0:
                self._send_broker(bytes(buf[span:pos]))
            del buf[:pos]
            await broker.drain()
            if self.writer.transport.get_write_buffer_size() > CLIENT_WRITE_LIMIT:
                await self._drain_client()
            data = await self.reader.read(READ_SIZE)
            if not data:
                raise _Close("closed by the client", notable=False)
            buf += data

    async def _drain_client(self) -> None:
        """Wait (bounded) until the client has read what the gateway owes it."""
        try:
            await asyncio.wait_for(self.writer.drain(), CLIENT_DRAIN_TIMEOUT)
        except TimeoutError:
            raise _Close(
                f"the client did not read its answers for {CLIENT_DRAIN_TIMEOUT:g} s", notable=True
            ) from None

    async def _client_packet(self, packet: mqtt5.Packet) -> bool:
        """Handle one parsed packet from the client; True to relay its bytes unchanged."""
        if isinstance(packet, mqtt5.PublishPacket):
            return await self._client_publish(packet)
        if isinstance(packet, mqtt5.SubscribePacket):
            self._client_subscribe(packet)
            return False
        if isinstance(packet, mqtt5.UnsubscribePacket):
            self._client_unsubscribe(packet)
            return False
        if isinstance(packet, mqtt5.ConnectPacket):
            raise _Close("second CONNECT", Reason.PROTOCOL_ERROR)
        raise _Close(f"unexpected {type(packet).__name__} from a client", Reason.PROTOCOL_ERROR)

    async def _client_publish(self, packet: mqtt5.PublishPacket) -> bool:
        topic = packet.topic
        alias = packet.topic_alias
        if alias is not None:
            if not 0 < alias <= self.topic_alias_max:
                raise _Close(
                    f"topic alias {alias} outside 1..{self.topic_alias_max} (the CONNACK's maximum)",
                    Reason.TOPIC_ALIAS_INVALID,
                )
            if not topic:
                resolved = self.client_aliases.get(alias)
                if resolved is None:
                    raise _Close(f"unknown topic alias {alias}", Reason.TOPIC_ALIAS_INVALID)
                topic = resolved
        if packet.qos == mqtt5.QoS.EXACTLY_ONCE:
            raise _Close("QoS 2 is not supported", Reason.QOS_NOT_SUPPORTED)
        if len(packet.payload) > MAX_PAYLOAD_SIZE:
            raise _Close(f"payload of {len(packet.payload)} bytes exceeds 128 KB", Reason.PACKET_TOO_LARGE)
        if not topic or "+" in topic or "#" in topic:
            raise _Close("invalid topic name", Reason.TOPIC_NAME_INVALID)
        problem = topic_limit_problem(topic)
        if problem is not None:
            raise _Close(f"topic name {problem}", Reason.TOPIC_NAME_INVALID)
        if alias is not None and packet.topic:
            self.client_aliases[alias] = topic  # at most topic_alias_max of them, each a valid topic
        request = parse_request_topic(topic)
        if request is not None:
            if not self.allowed("iot:Publish", f"topic/{topic}"):
                self._refuse_publish(packet)
                return False
            fault = self.gw.faults.take(request.operation) if self.gw.faults.armed else None
            if fault is not None:
                if not await self._request_fault(fault, request, packet):
                    return False
            elif packet.qos == mqtt5.QoS.AT_LEAST_ONCE and packet.packet_id is not None:
                self._send_client(mqtt5.PubAckPacket(packet.packet_id))
            provisioning = self.gw.provisioning
            prepared = provisioning.prepare(request)
            if prepared.blocks:
                answer = await self.gw.in_thread(
                    provisioning.handle,
                    request,
                    packet.payload,
                    claim_certificate_id=self.certificate_id,
                    client_id=self.client_id,
                    prepared=prepared,
                )
            else:
                answer = provisioning.handle(
                    request,
                    packet.payload,
                    claim_certificate_id=self.certificate_id,
                    client_id=self.client_id,
                    prepared=prepared,
                )
            self._answer(answer)
            return False
        # $aws/... and other $ topics belong to the service; clients may not publish there.
        if topic.startswith("$") or not self.allowed("iot:Publish", f"topic/{topic}"):
            self._refuse_publish(packet)
            return False
        if alias is not None:
            # Aliases stop here: a refused PUBLISH may have set one that Mosquitto never saw.
            self._send_broker(
                mqtt5.PublishPacket(
                    topic,
                    packet.payload,
                    qos=packet.qos,
                    retain=packet.retain,
                    packet_id=packet.packet_id,
                    duplicate=packet.duplicate,
                    payload_format_indicator=packet.payload_format_indicator,
                    message_expiry_interval=packet.message_expiry_interval,
                    content_type=packet.content_type,
                    response_topic=packet.response_topic,
                    correlation_data=packet.correlation_data,
                    user_properties=packet.user_properties,
                ).write()
            )
            return False
        return True

    def _refuse_publish(self, packet: mqtt5.PublishPacket) -> None:
        if packet.qos == mqtt5.QoS.AT_LEAST_ONCE and packet.packet_id is not None:
            self._send_client(
                mqtt5.PubAckPacket(packet.packet_id, reason_code=mqtt5.PubAckReasonCode.NOT_AUTHORIZED)
            )
        log.debug("%s: PUBLISH to %r not authorized", self.describe(), packet.topic)

    def deliver_local(self, topic: str, payload: bytes) -> bool:
        """Publish an answer to this connection only, if it subscribed to it (AWS drops it otherwise)."""
        if not any(topic_matches(f, topic) for f in self.local_filters):
            return False
        if not self.allowed("iot:Receive", f"topic/{topic}"):
            return False
        self._send_client(mqtt5.PublishPacket(topic, payload))
        return True

    def _client_subscribe(self, packet: mqtt5.SubscribePacket) -> None:
        codes: list[int] = []
        forward: list[mqtt5.TopicFilter] = []
        positions: list[int] = []
        patterns: list[str] = []
        filters = packet.topic_filters
        if len(filters) > MAX_FILTERS_PER_SUBSCRIBE:
            # AWS takes at most 8 filters per SUBSCRIBE: the whole request is over quota.
            log.debug("%s: SUBSCRIBE with %d filters refused", self.describe(), len(filters))
            filters = []
            codes = [int(mqtt5.SubAckReasonCode.QUOTA_EXCEEDED)] * len(packet.topic_filters)
        subscriptions = self.subscriptions
        for i, tf in enumerate(filters):
            pattern = tf.pattern
            if topic_limit_problem(pattern) is not None:
                codes.append(mqtt5.SubAckReasonCode.TOPIC_FILTER_INVALID)
                continue
            if not self.allowed("iot:Subscribe", f"topicfilter/{pattern}"):
                codes.append(mqtt5.SubAckReasonCode.NOT_AUTHORIZED)
                continue
            if pattern not in subscriptions and len(subscriptions) >= MAX_SUBSCRIPTIONS_PER_CONNECTION:
                codes.append(mqtt5.SubAckReasonCode.QUOTA_EXCEEDED)
                continue
            qos = min(int(tf.max_qos), 1)
            codes.append(qos)
            subscriptions.add(pattern)
            if pattern.startswith("$aws/"):
                self.local_filters.add(pattern)  # provisioning answers may match it
            if is_provisioning_filter(pattern):
                continue
            positions.append(i)
            patterns.append(pattern)
            forward.append(
                mqtt5.TopicFilter(
                    pattern,
                    max_qos=mqtt5.QoS(qos),
                    no_local=tf.no_local,
                    retain_as_published=tf.retain_as_published,
                    retain_handling=tf.retain_handling,
                )
            )
        if forward:
            self.pending_subacks[packet.packet_id] = _Merge(codes, positions, patterns)
            self._send_broker(
                mqtt5.SubscribePacket(
                    packet.packet_id,
                    forward,
                    subscription_id=packet.subscription_id,
                    user_properties=packet.user_properties,
                ).write()
            )
        else:
            self._send_client(
                mqtt5.SubAckPacket(packet.packet_id, [mqtt5.SubAckReasonCode(int(c)) for c in codes])
            )

    def _client_unsubscribe(self, packet: mqtt5.UnsubscribePacket) -> None:
        codes: list[int] = []
        forward: list[str] = []
        positions: list[int] = []
        for i, pattern in enumerate(packet.patterns):
            local = pattern in self.local_filters
            self.local_filters.discard(pattern)
            self.subscriptions.discard(pattern)
            if is_provisioning_filter(pattern):
                codes.append(
                    mqtt5.UnsubAckReasonCode.SUCCESS
                    if local
                    else mqtt5.UnsubAckReasonCode.NO_SUBSCRIPTION_EXISTED
                )
                continue
            codes.append(mqtt5.UnsubAckReasonCode.SUCCESS)
            positions.append(i)
            forward.append(pattern)
        if forward:
            self.pending_unsubacks[packet.packet_id] = _Merge(codes, positions, forward)
            self._send_broker(
                mqtt5.UnsubscribePacket(
                    packet.packet_id, forward, user_properties=packet.user_properties
                ).write()
            )
        else:
            self._send_client(
                mqtt5.UnsubAckPacket(packet.packet_id, [mqtt5.UnsubAckReasonCode(int(c)) for c in codes])
            )

    async def _from_broker(self) -> None:
        assert self.broker_reader is not None
        reader = self.broker_reader
        buf = self.broker_buf
        while True:
            pos = 0
            span = -1
            while True:
                frame = _frame(buf, pos)
                if frame is None or pos + frame[1] > len(buf):
                    break
                size = frame[1]
                kind = buf[pos] >> 4
                verdict: bytes | bool = True
                if kind in (_PUBLISH, _SUBACK, _UNSUBACK):
                    verdict = self._broker_packet(_parse(buf, pos, size))
                elif kind == _PUBACK and size > frame[0] + 2 and buf[pos + frame[0] + 2] == _NO_SUBSCRIBERS:
                    # Mosquitto says 16 (no matching subscribers); AWS IoT Core says 0 (success).
                    at = pos + frame[0]
                    verdict = bytes((_PUBACK << 4, 2, buf[at], buf[at + 1]))
                if verdict is True:
                    if span < 0:
                        span = pos
                else:
                    if span >= 0:
                        self._write_client(bytes(buf[span:pos]))
                        span = -1
                    if verdict:
                        self._write_client(verdict)
                pos += size
            if span >= 0:
                self._write_client(bytes(buf[span:pos]))
            del buf[:pos]
            await self.writer.drain()
            data = await reader.read(READ_SIZE)
            if not data:
                raise _Close("closed by the broker", notable=False)
            buf += data

    def _broker_packet(self, packet: mqtt5.Packet) -> bytes | bool:
        """Handle one packet from Mosquitto: True relays it unchanged, bytes replace it, b"" drops it."""
        if isinstance(packet, mqtt5.PublishPacket):
            topic = packet.topic
            if packet.topic_alias is not None:
                if topic:
                    self.broker_aliases[packet.topic_alias] = topic
                else:
                    topic = self.broker_aliases.get(packet.topic_alias, "")
            if self.allowed("iot:Receive", f"topic/{topic}"):
                return True
            if packet.qos == mqtt5.QoS.AT_LEAST_ONCE and packet.packet_id is not None:
                # Mosquitto must not redeliver what the policy withholds.
                self._send_broker(mqtt5.PubAckPacket(packet.packet_id).write())
            return b""
        if isinstance(packet, mqtt5.SubAckPacket):
            merge = self.pending_subacks.pop(packet.packet_id, None)
            if merge is None:
                return True
            for position, pattern, code in zip(
                merge.positions, merge.patterns, packet.reason_codes, strict=False
            ):
                merge.codes[position] = int(code)
                if int(code) >= 0x80:  # Mosquitto refused it: it does not count toward the quota
                    self.subscriptions.discard(pattern)
            return mqtt5.SubAckPacket(
                packet.packet_id,
                [mqtt5.SubAckReasonCode(int(c)) for c in merge.codes],
                reason_str=packet.reason_str,
                user_properties=packet.user_properties,
            ).write()
        if isinstance(packet, mqtt5.UnsubAckPacket):
            unmerge = self.pending_unsubacks.pop(packet.packet_id, None)
            if unmerge is None:
                return True
            for position, ucode in zip(unmerge.positions, packet.reason_codes, strict=False):
                unmerge.codes[position] = int(ucode)
            return mqtt5.UnsubAckPacket(
                packet.packet_id,
                [mqtt5.UnsubAckReasonCode(int(c)) for c in unmerge.codes],
                reason_str=packet.reason_str,
                user_properties=packet.user_properties,
            ).write()
        return True


async def _read_frame(reader: asyncio.StreamReader, buf: bytearray) -> int:
    while True:
        frame = _frame(buf, 0)
        if frame is not None and len(buf) >= frame[1]:
            return frame[1]
        data = await reader.read(READ_SIZE)
        if not data:
            raise ConnectionError("closed")
        buf += data


def _brief(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 200 else text[:200] + "..."


class _EventPublisher:
    """The gateway's own client of Mosquitto, for events such as JITR registrations."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.client_id = f"iot-core-local-events-{uuid.uuid4().hex[:12]}"
        self._writer: asyncio.StreamWriter | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._packet_id = 0
        self._lock = asyncio.Lock()

    async def publish(self, topic: str, payload: bytes) -> None:
        async with self._lock:
            if self._writer is None or self._writer.transport.is_closing():
                await self._connect()
            assert self._writer is not None
            self._packet_id = self._packet_id % 65535 + 1
            packet = mqtt5.PublishPacket(
                topic, payload, qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=self._packet_id
            )
            self._writer.write(packet.write())
            await self._writer.drain()

    async def _connect(self) -> None:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), BROKER_TIMEOUT)
        try:
            writer.write(mqtt5.ConnectPacket(self.client_id, clean_start=True, keep_alive=0).write())
            buf = bytearray()
            size = await asyncio.wait_for(_read_frame(reader, buf), BROKER_TIMEOUT)
            connack = _parse(buf, 0, size)
            if not isinstance(connack, mqtt5.ConnAckPacket) or connack.reason_code != 0:
                raise ConnectionError(f"broker refused the event publisher: {connack!r}")
        except BaseException:
            writer.close()  # no CONNACK in time, a refusal, a bad packet: the socket goes too
            raise
        self._writer = writer
        self._drain_task = asyncio.create_task(self._discard(reader))

    @staticmethod
    async def _discard(reader: asyncio.StreamReader) -> None:
        # PUBACKs only; reading them keeps the socket buffer from filling up.
        with contextlib.suppress(ConnectionError, OSError):
            while await reader.read(READ_SIZE):
                pass

    async def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(ConnectionError, OSError):
                self._writer.write(mqtt5.DisconnectPacket().write())
            self._writer.close()
            self._writer = None
        if self._drain_task is not None:
            self._drain_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain_task
            self._drain_task = None


class _LeanSSLProtocol(asyncio.sslproto.SSLProtocol):
    """asyncio's TLS protocol with a 32 KiB read buffer instead of 256 KiB.

    asyncio allocates (and zero-fills, so it is resident) `max_size` bytes per TLS connection: 256 KiB
    each made 200 concurrent provisionings cost ~50 MB and 1,000 half-open handshakes ~250 MB. A TLS
    record carries at most 16 KiB, and MQTT packets here are read 64 KiB at a time anyway, so 32 KiB
    costs no throughput.
    """

    max_size = 32 * 1024

    def buffer_updated(self, nbytes: int) -> None:
        # During the handshake, ACK every segment at once. awscrt (s2n) writes TLS 1.3's 6-byte
        # ChangeCipherSpec and its certificate flight separately with Nagle on and no way to turn it off,
        # so its second write waits for our ACK, which Linux delays by ~40 ms: half of a provisioning's
        # time at low concurrency (bench/delayed_ack.py). Linux clears QUICKACK by itself, hence re-arm it
        # on every read; once the handshake is done, no more syscalls.
        state = getattr(self, "_state", None)  # asyncio internals, typeshed does not list them
        if state is asyncio.sslproto.SSLProtocolState.DO_HANDSHAKE and _QUICKACK is not None:
            transport = getattr(self, "_transport", None)
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        super().buffer_updated(nbytes)


_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


async def _start_tls(
    loop: asyncio.AbstractEventLoop,
    transport: asyncio.Transport,
    protocol: asyncio.BaseProtocol,
    context: ssl.SSLContext,
    handshake_timeout: float,
) -> asyncio.Transport | None:
    """`loop.start_tls(..., server_side=True)` with `_LeanSSLProtocol`; the same steps, in the same order."""
    waiter: asyncio.Future[None] = loop.create_future()
    tls = _LeanSSLProtocol(
        loop,
        protocol,
        context,
        waiter,
        server_side=True,
        ssl_handshake_timeout=handshake_timeout,  # type: ignore[arg-type]  # typeshed says int; floats work
        call_connection_made=False,
    )
    # Reading is paused until TLS owns the transport, so no ClientHello byte is read as plain data.
    transport.pause_reading()
    transport.set_protocol(tls)
    made = loop.call_soon(tls.connection_made, transport)
    resumed = loop.call_soon(transport.resume_reading)
    try:
        await waiter
    except BaseException:
        transport.close()
        made.cancel()
        resumed.cancel()
        raise
    app: asyncio.Transport | None = tls._app_transport
    return app


class _PlainAccept(asyncio.Protocol):
    """Accepts TCP and pauses reading at once; the gateway then starts TLS on the transport."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        self.gateway.accept(transport)


class Gateway:
    """The MQTT 5 / TLS endpoint devices connect to; `start()` binds, then `port` is the real port."""

    def __init__(
        self,
        *,
        registry: Registry,
        ca: CertificateAuthority,
        provisioning: ProvisioningService,
        broker_host: str,
        broker_port: int,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: FaultInjector | None = None,
    ) -> None:
        self.registry = registry
        self.faults = faults if faults is not None else FaultInjector()
        self.ca = ca
        self.provisioning = provisioning
        self.broker_host = broker_host
        self.broker_port = broker_port
        self.host = host
        self.port = port
        self.arn_prefix = registry.arn("")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="iot-core-local-worker")
        self._tasks: set[asyncio.Task[Any]] = set()
        self._by_certificate: dict[str, set[_Connection]] = {}
        self._by_client_id: dict[str, _Connection] = {}
        self._events = _EventPublisher(broker_host, broker_port)
        self._context: ssl.SSLContext | None = None
        self._own_certificates: set[str] = set()  # registered without CA, but issued by our issuing CA
        self._trust_generation = -1
        self._rebuild: asyncio.Task[None] | None = None  # the trust store build under way, shared
        self._live = 0  # connections accepted and not yet closed (any stage)
        # Moves with every certificate status or policy change the loop hears of; a connection compares
        # it across its CONNECT window, when it is not yet registered to be told.
        self.changes = 0
        self._live_peak = 0  # the most since memory was last trimmed
        self._stopping = False

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._install(await self.in_thread(self._build_context))
        self.registry.add_listener(self._on_certificate_change)
        self.registry.add_policy_listener(self._on_policy_change)
        self._server = await self._loop.create_server(
            lambda: _PlainAccept(self), self.host, self.port, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._spawn(self._maintain())
        log.info(
            "gateway listening on %s:%d, relaying to %s:%d",
            self.host,
            self.port,
            self.broker_host,
            self.broker_port,
        )

    async def stop(self) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for connections in list(self._by_certificate.values()):
            for connection in list(connections):
                connection.kick("server shutting down", Reason.SERVER_SHUTTING_DOWN)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await self._events.close()
        # Wait for work already running (a hook, a RegisterThing transaction): the registry it writes to
        # is closed right after this returns. Queued work that has not started is dropped.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        self._server = None

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def in_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        assert self._loop is not None
        if kwargs:
            return await self._loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))
        return await self._loop.run_in_executor(self._executor, fn, *args)

    def accept(self, transport: asyncio.Transport) -> None:
        if self._stopping:
            transport.abort()
            return
        self._spawn(self._serve(transport))

    async def _serve(self, transport: asyncio.Transport) -> None:
        self._live += 1
        self._live_peak = max(self._live_peak, self._live)
        try:
            await self._serve_one(transport)
        finally:
            self._live -= 1

    async def _serve_one(self, transport: asyncio.Transport) -> None:
        peername = transport.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)
        opened = await self._handshake(transport, peer)
        if opened is None:
            return
        reader, writer, der = opened
        connection = _Connection(self, reader, writer, peer, der)
        try:
            await connection.run()
        except asyncio.CancelledError:
            connection.abort()
            raise
        except Exception:  # a bug of ours: log it, keep serving everyone else
            log.exception("%s: internal error", connection.describe())
            connection.abort()

    @property
    def live_connections(self) -> int:
        """Connections open now, at any stage (TLS handshake, waiting for CONNECT, relaying)."""
        return self._live

    async def _handshake(
        self, transport: asyncio.Transport, peer: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes] | None:
        """TLS on a connection whose reading was paused at accept; None (logged) if it fails.

        Reading stays paused until TLS takes over the transport, so no byte of the ClientHello can be
        consumed as plain data first (the race StreamWriter.start_tls has on the server side).
        """
        assert self._loop is not None
        reader = asyncio.StreamReader(limit=READ_SIZE, loop=self._loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=self._loop)
        try:
            tls = await asyncio.wait_for(
                _start_tls(self._loop, transport, protocol, await self.tls_context(), HANDSHAKE_TIMEOUT),
                HANDSHAKE_TIMEOUT + 1,
            )
        except ssl.SSLCertVerificationError as e:
            transport.abort()
            log.info("connection %s: TLS handshake refused: %s", peer, e.verify_message or e.reason)
            return None
        except (ssl.SSLError, OSError, TimeoutError, EOFError, RuntimeError) as e:
            # RuntimeError: asyncio refuses start_tls on a transport the peer already closed.
            transport.abort()
            log.info("connection %s: TLS handshake failed: %s", peer, _brief(e))
            return None
        if tls is None:  # the peer went away during the handshake
            transport.abort()
            return None
        protocol.connection_made(tls)
        writer = asyncio.StreamWriter(tls, protocol, reader, self._loop)
        ssl_object = tls.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            log.info("connection %s: closed: no client certificate", peer)
            tls.abort()
            return None
        return reader, writer, der

    # ---- connections by certificate -----------------------------------------------------------

    def register(self, connection: _Connection) -> None:
        self._by_certificate.setdefault(connection.certificate_id, set()).add(connection)
        # Mosquitto has already taken the session over, but closes the old socket without a word;
        # AWS tells the old client why.
        previous = self._by_client_id.get(connection.client_id)
        self._by_client_id[connection.client_id] = connection
        if previous is not None and previous is not connection:
            previous.kick("session taken over by a new connection", Reason.SESSION_TAKEN_OVER)

    def unregister(self, connection: _Connection) -> None:
        if self._by_client_id.get(connection.client_id) is connection:
            del self._by_client_id[connection.client_id]
        connections = self._by_certificate.get(connection.certificate_id)
        if connections is not None:
            connections.discard(connection)
            if not connections:
                del self._by_certificate[connection.certificate_id]

    def _on_certificate_change(self, certificate_id: str, status: str) -> None:
        # Runs on whichever thread changed the registry (control plane, worker): hop to the loop.
        loop = self._loop
        if loop is None or loop.is_closed() or self._stopping:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._certificate_changed, certificate_id, status)

    def _certificate_changed(self, certificate_id: str, status: str) -> None:
        if status == ACTIVE:
            return
        self.changes += 1
        for connection in list(self._by_certificate.get(certificate_id, ())):
            connection.kick(f"disconnected: certificate is now {status}", Reason.ADMINISTRATIVE_ACTION)

    def _on_policy_change(self, target: str) -> None:
        # Same thread hop as for certificates; the connections of that certificate re-read their
        # policies and thing at their next publish, subscribe or delivery.
        loop = self._loop
        if loop is None or loop.is_closed() or self._stopping:
            return
        prefix = self.arn_prefix + "cert/"
        if not target.startswith(prefix):
            return  # thing groups: not enforced by the gateway
        certificate_id = target[len(prefix) :]
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._policies_changed, certificate_id)

    def _policies_changed(self, certificate_id: str) -> None:
        self.changes += 1
        for connection in self._by_certificate.get(certificate_id, ()):
            connection.policies_stale = True

    async def publish_event(self, topic: str, payload: bytes) -> None:
        try:
            await self._events.publish(topic, payload)
        except (OSError, TimeoutError, ConnectionError) as e:
            log.warning("could not publish %s: %s", topic, _brief(e))

    # ---- the TLS trust store ------------------------------------------------------------------

    async def tls_context(self) -> ssl.SSLContext:
        """The server context for the next handshake, rebuilt first if the registry's trust moved.

        Checked per connection because a CA or a certificate registered without a CA a moment ago must
        work for the very next connect (JITR, JITP, RegisterCertificateWithoutCA); the registry bumps
        `trust_generation` on every such commit, so the check is one integer comparison. The rebuild
        (a parse of every certificate registered without a CA, the server key read) runs in a worker
        thread, once for all the handshakes that wait for it; if it fails, the previous context stays.
        """
        if self._context is None or self.registry.trust_generation != self._trust_generation:
            if self._rebuild is None:
                self._rebuild = self._spawn(self._rebuild_context())
            await asyncio.shield(self._rebuild)
        if self._context is None:
            raise ssl.SSLError("no TLS trust store")
        return self._context

    async def _rebuild_context(self) -> None:
        generation = self.registry.trust_generation
        try:
            self._install(await self.in_thread(self._build_context))
        except Exception:
            # Keep serving with what was trusted before; retry after the next trust change.
            log.exception("could not rebuild the TLS trust store; keeping the previous one")
            self._trust_generation = generation
        finally:
            self._rebuild = None

    def _install(self, built: tuple[ssl.SSLContext, int, int]) -> None:
        self._context, self._trust_generation, anchors = built
        log.debug("trust store: %d anchors", anchors)

    def _build_context(self) -> tuple[ssl.SSLContext, int, int]:
        """A server context trusting the issuing CA, every registered CA and every certificate
        registered without a CA (partial-chain verification makes such a leaf its own anchor).

        Trusting a CA or certificate at the TLS layer only lets it reach the connect rules, which check
        statuses; so an anchor kept a little too long is harmless, and one missing refuses a device.
        """
        # Read the generation first: a change committed while building moves it again, and the next
        # handshake rebuilds.
        generation = self.registry.trust_generation
        pems = {self.ca.issuing_ca_id: self.ca.issuing_ca_pem}
        for ca in self.registry.list_ca_certificates():
            pems[ca.certificate_id] = ca.pem
        issuer = self.ca.issuing_ca.subject
        for record in self.registry.list_certificates_without_ca():
            if record.certificate_id in self._own_certificates:
                continue
            cert = x509.load_pem_x509_certificate(record.pem.encode())
            if cert.issuer == issuer:
                self._own_certificates.add(record.certificate_id)  # the issuing CA covers it
            else:
                pems[record.certificate_id] = record.pem
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.ca.server_cert_path, self.ca.server_key_path)
        context.verify_mode = ssl.CERT_REQUIRED
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        context.load_verify_locations(cadata="".join(pems.values()))
        return context, generation, len(pems)

    async def _maintain(self) -> None:
        """Sweep expired unregistered certificates; give memory back after a burst of connections."""
        last_sweep = float("-inf")  # sweep at once: certificates may have expired while the server was down
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            try:
                # Once a burst has mostly ended, not during one: a trim takes the allocator's locks.
                if self._live_peak - self._live >= TRIM_AFTER_CLOSED and self._live <= self._live_peak // 4:
                    self._live_peak = self._live
                    await self.in_thread(_trim_heap)
                now = time.monotonic()
                if now - last_sweep >= min(SWEEP_INTERVAL, max(self.provisioning.token_ttl, 1.0)):
                    last_sweep = now
                    deleted = await self.in_thread(self.provisioning.sweep_expired)
                    if deleted:
                        log.info("deleted %d certificates whose ownership token expired unused", deleted)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("gateway maintenance failed; retrying")


def _load_malloc_trim() -> Callable[[], None]:
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: its allocator returns memory its own way
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def run() -> None:
        gc.collect()  # asyncio's transports keep small reference cycles; free them before trimming
        trim(0)

    return run


# glibc keeps what a burst of connections freed (OpenSSL and per-thread arenas) as resident heap for
# good; after the 200-hub benchmark that was 127 MB against a 62 MB baseline, and malloc_trim gives
# back all but ~15 MB of it. Called from the maintenance loop only after many connections closed.
_trim_heap = _load_malloc_trim()
