"""One device connection: the connect rules, then the relay to Mosquitto with its checks.

    TCP accept -> TLS handshake -> CONNECT (within `connect_timeout`; MQTT 5, or 3.1.1 read and written
    with `mqtt311`, toward Mosquitto too) -> certificate rules (JITR/JITP) ->
    iot:Connect -> a TCP connection to Mosquitto, CONNECT forwarded (a temporary claim's with a client
    id of its own, `claim_session_id`), CONNACK relayed -> two pumps:
    client -> broker (inspects PUBLISH, SUBSCRIBE, UNSUBSCRIBE) and broker -> client (iot:Receive)

A client that breaks the rules loses its own connection and nothing else (`Close`, raised anywhere
below, ends it). Registry reads for a CONNECT run on the loop (they are short).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import mqtt5

from .. import policy
from ..faults import CONNECT as CONNECT_OPERATION
from ..faults import Fault
from ..model import CaStatus, Certificate, CertificateStatus
from ..provisioning import Answer, Event, Refuse, Request, Requester
from ..resources import LimitLog
from . import mqtt311
from .lifecycle import disconnect_reason
from .tls import READ_SIZE, brief
from .wire import (
    CONNECT,
    NO_SUBSCRIBERS,
    PUBACK,
    PUBLISH,
    RELAYED_FROM_CLIENT,
    SUBACK,
    UNSUBACK,
    V3_CONNACK_BAD_VERSION,
    Close,
    Reason,
    frame,
    parse,
    topic_limit_problem,
    topic_matches,
    with_client_id,
)

if TYPE_CHECKING:
    from . import Gateway

__all__ = ["Connection"]

log = logging.getLogger("iot_core_local.gateway")

_DECISION_CACHE_SIZE = 1024
_DISCONNECT = 14  # the MQTT packet type, relayed to Mosquitto unchanged; noted for the lifecycle reason
_CONNACK = 2
# AWS IoT Core's limit on a client id, in UTF-8 bytes; a longer one is refused at CONNECT.
MAX_CLIENT_ID_BYTES = 128


def claim_session_id(certificate_id: str, client_id: str) -> str:
    """The client id a connection only a temporary claim's implicit policy lets in has in Mosquitto.

    The claim may connect with any client id (client/*), so with a device's it could resume that device's
    stored session (and take its queued messages) or wipe it. Its session lives apart instead, by
    construction: the prefix alone is 130 bytes (the certificate id is 64 hex digits), longer than any
    client id a CONNECT may carry (`MAX_CLIENT_ID_BYTES`, refused before anything else), and the gateway
    is Mosquitto's only client: no device can name one of these sessions. The certificate id keeps two
    claims apart too; the same claim with the same client id resumes its own session, as it would on AWS.
    """
    return f"iot-core-local/temporary-provisioning-claim/{certificate_id}/session-of-client-id/{client_id}"


# AWS IoT services a device reaches through reserved topics, which the stand-in does not offer: a request
# there is answered "not served" (PUBACK 131 with a reason), not "not authorized" (135), which would send
# the client's owner looking for a fault in a policy that is fine. Keyed by the topic's words after $aws/.
_UNSERVED_THING_SERVICES = {
    "shadow": "the Device Shadow service",
    "jobs": "the Jobs service",
    "tunnels": "Secure Tunneling",
    "streams": "MQTT-based file delivery",
    "defender": "Device Defender",
}
_UNSERVED_SERVICES = {
    "rules": "Basic Ingest ($aws/rules)",
    "sitewise": "AWS IoT SiteWise",
    "defender": "Device Defender",
}


def unserved_service(topic: str) -> str | None:
    """The AWS IoT service a reserved `topic` belongs to when the stand-in does not serve it, else None
    (the service's own topics, such as $aws/events, are not any client's to publish to)."""
    words = topic.split("/")
    if len(words) < 3 or words[0] != "$aws":
        return None
    if words[1] == "things" and len(words) >= 4:
        return _UNSERVED_THING_SERVICES.get(words[3])
    return _UNSERVED_SERVICES.get(words[1])


class _Merge:
    """A SUBSCRIBE or UNSUBSCRIBE answered partly here and partly by Mosquitto."""

    __slots__ = ("codes", "patterns", "positions")

    def __init__(self, codes: list[int], positions: list[int], patterns: list[str]) -> None:
        self.codes = codes
        self.positions = positions
        self.patterns = patterns  # the forwarded filters, by position


class Connection:
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
        self.limits = gateway.limits  # read once: limits changed later apply to later connections
        self.provisioning = gateway.provisioning
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.der = der
        self.certificate_id = hashlib.sha256(der).hexdigest()
        self.client_id = "-"
        self.ca_certificate_id: str | None = None  # the registered CA that signed the certificate
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
        self.kicked: Close | None = None
        self.disconnect_reason: str | None = None  # AWS's lifecycle reason, once the close is decided
        self.client_disconnected = False  # the client sent DISCONNECT
        self.started = time.monotonic()
        self.keep_alive = 0  # granted at CONNECT: what the client asked for, within 1..max_keep_alive
        self._idle: asyncio.Timeout | None = None  # the keep-alive deadline, moved on every read
        self.stuck = False  # the client stopped reading: its pending output is dropped, not flushed
        self.problem_info = True  # the CONNECT's Request Problem Information (MQTT 5's default: yes)
        self.connack_sent = False  # any CONNACK, ours or Mosquitto's: a DISCONNECT may follow only after it
        self.connack = b""  # the accepting CONNACK, sent once the connection is registered
        # The client's protocol, known at CONNECT: a 3.1.1 client's packets are read and written with
        # the 3.1.1 codec, toward the client and toward Mosquitto alike (see `_use_mqtt311`).
        self.mqtt311 = False
        self._parse: Callable[[bytearray, int, int], mqtt5.Packet] = parse
        self._encode: Callable[[mqtt5.Packet], bytes] = _write_mqtt5
        # Where a close before the certificate is accepted is told (once per interval, see the gateway's
        # LimitLogs): any client can cause those once per connection. None once that stage is passed.
        self._tally: LimitLog | None = gateway.closed_before_connect
        self._connecting_as: str | None = None  # the client id of the CONNECT window (Gateway.connecting)
        # The client id Mosquitto is told, when not the client's own (`claim_session_id`); everything
        # else (policies, the registry of connections, lifecycle events) uses the client's own.
        self.broker_client_id: str | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    def describe(self) -> str:
        return f"connection {self.peer} cert {self.certificate_id} client {self.client_id!r}"

    async def run(self) -> None:
        accepted = False
        try:
            connect, raw = await self._read_connect()
            self._tally = None
            if self.gw.faults.armed:
                await self._connect_fault()
            changes = self.gw.changes  # certificate/policy changes heard so far (see below)
            await self._authorize(connect)
            await self._open_broker(raw, connect.keep_alive)
            if self.gw.connect_window_hook is not None:
                await self.gw.connect_window_hook(self.certificate_id)
            accepted = True
            self._tally = None
            self.gw.register(self)
            self._end_connect_window()
            # The CONNACK only once the connect is recorded (lifecycle, connectivity data): a client that
            # asks the control plane right after its CONNACK finds itself connected.
            self._write_client(self.connack)
            if self.gw.changes != changes:
                self._recheck()
            log.info("%s: accepted%s", self.describe(), " (MQTT 3.1.1)" if self.mqtt311 else "")
            await self._relay()
        except Close as e:
            closing = self.kicked or e
            if self.disconnect_reason is None:
                self.disconnect_reason = disconnect_reason(closing.reason, self.client_disconnected)
            # MQTT 5 forbids a DISCONNECT before the CONNACK [MQTT-3.14.0-1]: a connection refused
            # before it (a malformed or oversized first packet) is just closed, as AWS IoT Core does.
            if closing.reason is not None and self.connack_sent:
                self._send_client(mqtt5.DisconnectPacket(reason_code=closing.reason))
            if self._tally is not None:
                self._tally.hit(f"{self.describe()}: {closing.outcome}")
            else:
                level = logging.INFO if closing.notable or not accepted else logging.DEBUG
                after = f" after {time.monotonic() - self.started:.1f} s" if accepted else ""
                log.log(level, "%s: closed%s: %s", self.describe(), after, closing.outcome)
            del closing  # it holds a traceback through this frame (see _relay)
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
            log.debug("%s: connection lost: %s", self.describe(), e)
            if self.disconnect_reason is None:
                self.disconnect_reason = disconnect_reason(None, self.client_disconnected)
        finally:
            self._end_connect_window()
            if accepted:
                self.gw.unregister(self)
            self.kicked = None
            self.abort()

    def _end_connect_window(self) -> None:
        if self._connecting_as is not None:
            self.gw.connected(self, self._connecting_as)
            self._connecting_as = None

    def abort(self) -> None:
        """Close both sides now; pending output to a dead or hostile peer is not worth waiting for."""
        for writer in (self.writer, self.broker_writer):
            if writer is not None:
                transport = writer.transport
                if self.stuck and writer is self.writer:
                    # close() would wait for a peer that does not read, holding the socket for good.
                    transport.abort()
                elif not transport.is_closing():
                    # close() flushes what is buffered (a DISCONNECT, say); the peer's reader ends then.
                    transport.close()

    def kick(self, outcome: str, reason: Reason) -> None:
        """Disconnect from outside the pumps (certificate no longer ACTIVE, server stopping)."""
        if self.kicked is None:
            self.disconnect_reason = disconnect_reason(reason)
            self.kicked = Close(outcome, reason)
            self._send_client(mqtt5.DisconnectPacket(reason_code=reason))
            self.kicked = Close(outcome, None)  # the DISCONNECT is sent; do not send it twice
            self.abort()

    def _send_client(self, packet: mqtt5.Packet) -> None:
        if self.mqtt311 and isinstance(packet, mqtt5.DisconnectPacket):
            return  # a 3.1.1 server has no DISCONNECT to send: closing the connection says it
        self._write_client(self._encode(packet))

    def _use_mqtt311(self) -> None:
        """Speak 3.1.1 on this connection. Mosquitto serves 3.1.1 too, so the gateway speaks it toward
        Mosquitto as well: the CONNECT and what needs no check go through as bytes, and the 3.1.1
        session rules (clean session, session present) are Mosquitto's own, unchanged."""
        self.mqtt311 = True
        self._parse = mqtt311.parse
        self._encode = mqtt311.write

    def _refuse_with(self, code: mqtt5.ConnAckReasonCode, why: str) -> Close:
        """Send a refusing CONNACK; the `Close` to raise, naming the code the client saw."""
        self._send_client(mqtt5.ConnAckPacket(reason_code=code))
        number = mqtt311.connack_return_code(code) if self.mqtt311 else int(code)
        return Close(f"refused with CONNACK {number}: {why}")

    def _write_client(self, data: bytes) -> None:
        if data[:1] and data[0] >> 4 == _CONNACK:
            self.connack_sent = True
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
            size = await asyncio.wait_for(self._fill_one(), self.limits.connect_timeout)
        except TimeoutError:
            raise Close(f"no CONNECT within {self.limits.connect_timeout:g} s") from None
        if self.buf[0] >> 4 != CONNECT:
            raise Close("first packet is not CONNECT")
        level = mqtt311.protocol_level(self.buf, size)
        if level == mqtt311.PROTOCOL_LEVEL:
            self._use_mqtt311()
        elif level not in (None, 5):
            # AWS IoT Core serves MQTT 3.1.1 and 5 only; older clients understand a 3.1.1 CONNACK.
            self._write_client(V3_CONNACK_BAD_VERSION)
            raise Close(f"refused with CONNACK 1: protocol level {level} (MQTT 3.1.1 and 5 are served)")
        try:
            packet = self._parse(self.buf, 0, size)
        except Close as e:
            raise Close(f"refused CONNECT: {e.outcome}") from None
        assert isinstance(packet, mqtt5.ConnectPacket)
        raw = bytes(self.buf[:size])
        del self.buf[:size]
        size = len(packet.client_id.encode())
        if size > MAX_CLIENT_ID_BYTES:
            self.client_id = packet.client_id[:32] + "..."
            raise self._refuse_with(
                mqtt5.ConnAckReasonCode.CLIENT_ID_NOT_VALID,
                f"client id of {size} bytes (at most {MAX_CLIENT_ID_BYTES})",
            )
        if not size and self.mqtt311:
            # MQTT 5 learns the id Mosquitto assigns from its CONNACK; 3.1.1 never says it, and policies
            # (iot:Connect on client/<id>) and takeovers need it.
            raise self._refuse_with(
                mqtt5.ConnAckReasonCode.CLIENT_ID_NOT_VALID, "an MQTT 3.1.1 client must name its client id"
            )
        self.client_id = packet.client_id
        self.problem_info = packet.request_problem_info
        # As AWS IoT Core: no keep-alive (0) or one above the maximum becomes the maximum.
        asked = packet.keep_alive
        self.keep_alive = asked if 0 < asked <= self.limits.max_keep_alive else self.limits.max_keep_alive
        return packet, raw

    async def _fill_one(self) -> int:
        while True:
            found = frame(self.buf, 0)
            if found is not None:
                if found[1] > self.limits.max_packet_size:
                    raise Close("packet too large", Reason.PACKET_TOO_LARGE)
                if len(self.buf) >= found[1]:
                    return found[1]
            data = await self.reader.read(READ_SIZE)
            if not data:
                raise Close("closed by the client before CONNECT", notable=False)
            self.buf += data

    async def _connect_fault(self) -> None:
        """Apply an armed fault to this CONNECT (see faults.py); returns to go on as usual."""
        fault = self.gw.faults.take(CONNECT_OPERATION)
        if fault is None:
            return
        log.info("%s: fault injected at CONNECT: %s", self.describe(), fault.describe())
        if fault.kind in ("refuse", "drop"):
            raise Close(f"fault {fault.kind}: closed without CONNACK")
        if fault.kind == "throttle":
            # AWS answers a throttled MQTT 5 connect with CONNACK "quota exceeded" (3.1.1: unavailable).
            raise self._refuse_with(mqtt5.ConnAckReasonCode.QUOTA_EXCEEDED, "fault throttle")
        if fault.kind == "delay":
            await asyncio.sleep(fault.seconds)
            return
        # ignore: no CONNACK ever; hold the connection until the client gives up (bounded).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._discard_until_closed(), self.limits.ignore_hold)
        raise Close("fault ignore: CONNECT never answered", notable=True)

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
            raise Close(f"fault drop: closed during {request.operation}")
        if packet.qos == mqtt5.QoS.AT_LEAST_ONCE and packet.packet_id is not None:
            self._send_client(mqtt5.PubAckPacket(packet.packet_id))
        if fault.kind == "delay":
            await asyncio.sleep(fault.seconds)
            return True
        if fault.kind == "throttle":
            self._answer(self.provisioning.throttled(request))
        return False  # ignore (and throttle, answered): nothing more

    def _answer(self, answer: Answer) -> None:
        """Send a provisioning answer on this connection only, and log the request (ids, never secrets)."""
        delivered = self.deliver_local(answer.topic, answer.payload)
        line = "provisioning {} cert {} client {!r}: {}{}".format(
            answer.operation,
            self.certificate_id,
            self.client_id,
            answer.summary,
            "" if delivered else f" (not delivered: no subscription to {answer.topic})",
        )
        if answer.topic.endswith("/rejected"):
            self.gw.rejected_requests.hit(line)  # a hub with the claim could send these in a loop
        else:
            log.info("%s", line)

    async def _authorize(self, connect: mqtt5.ConnectPacket) -> None:
        gw = self.gw
        self._tally = gw.refused_certificates  # a certificate refused: told once per interval
        record = gw.registry.find_certificate(self.certificate_id)
        if record is None or record.status == CertificateStatus.PENDING_ACTIVATION:
            record = await self._unknown_certificate(record)
        if record.status != CertificateStatus.ACTIVE:
            raise Close(f"refused without CONNACK: certificate is {record.status}")
        ca_id = record.ca_certificate_id
        if ca_id is not None and ca_id != gw.ca.issuing_ca_id:
            ca = gw.registry.find_ca_certificate(ca_id)
            if ca is None or ca.status != CaStatus.ACTIVE:
                state = "not registered" if ca is None else ca.status
                raise Close(f"refused without CONNACK: the certificate's CA {ca_id} is {state}")
            self.ca_certificate_id = ca_id  # its CA set INACTIVE or deleted later kicks this connection
        self._tally = gw.refused_connects  # an ACTIVE certificate, refused all the same: once per interval

        self.variables = {"iot:ClientId": connect.client_id}
        self._load_policies()
        if not self.allowed("iot:Connect", f"client/{connect.client_id}"):
            self._refuse_connect("iot:Connect is not allowed")
        client_id = connect.client_id
        if client_id and self._connects_as_claim_only(f"client/{client_id}"):
            # The implicit policy of a CreateProvisioningClaim certificate allows client/*: it must not
            # let the claim take over a device's session (issue 11, point 8: nothing else is allowed to
            # it). AWS would let it; its samples use a fresh client id, so nothing they do is refused.
            others = gw.client_id_holders(client_id) - {self.certificate_id}
            if others:
                self._refuse_connect(
                    "a provisioning claim may not take over the client id of another certificate's connection"
                )
            # Nor a session a device left stored in Mosquitto (offline, with queued messages): the claim
            # gets a session of its own, whatever its client id and clean start.
            self.broker_client_id = claim_session_id(self.certificate_id, client_id)
        will = connect.will
        if will is not None and (
            will.topic.startswith("$") or not self._may_publish(will.topic, retain=will.retain)
        ):
            action = "iot:Publish and iot:RetainPublish are" if will.retain else "iot:Publish is"
            self._refuse_connect(f"{action} not allowed on the will topic {will.topic!r}")
        if client_id:
            # Known from now until registered or closed: a claim arriving in that window is refused too.
            # No await since the check above, so no other CONNECT comes in between.
            self._connecting_as = client_id
            gw.connecting(self, client_id)

    def _connects_as_claim_only(self, resource: str) -> bool:
        """Whether only the implicit policy of a CreateProvisioningClaim certificate lets it connect (a
        policy attached to the certificate that allows it too takes precedence: the customer's choice)."""
        claim = [d for d in self.documents if policy.is_provisioning_claim_document(d)]
        if not claim:
            return False
        others = [d for d in self.documents if d not in claim]
        return not policy.evaluate(others, "iot:Connect", self.gw.arn_prefix + resource, self.variables)

    def _load_policies(self) -> None:
        """(Re)read this certificate's policies and thing; a policy attached or detached while connected
        applies from the next publish, subscribe or delivery, as on AWS."""
        self.policies_stale = False
        registry = self.gw.registry
        arn = registry.cert_arn(self.certificate_id)
        self.documents = registry.policy_documents(self.certificate_id)  # implicit ones included
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
        registry = self.gw.registry
        record = registry.find_certificate(self.certificate_id)
        if record is None or record.status != CertificateStatus.ACTIVE:
            status = "DELETED" if record is None else record.status
            raise Close(f"disconnected: certificate is now {status}", Reason.ADMINISTRATIVE_ACTION)
        if self.ca_certificate_id is not None:
            ca = registry.find_ca_certificate(self.ca_certificate_id)
            if ca is None or ca.status != CaStatus.ACTIVE:
                status = "DELETED" if ca is None else ca.status
                raise Close(
                    f"disconnected: the certificate's CA is now {status}", Reason.ADMINISTRATIVE_ACTION
                )
        self.policies_stale = True

    def _refuse_connect(self, why: str) -> None:
        # AWS answers a client it will not authorize with CONNACK "not authorized" (135; 3.1.1: 5).
        raise self._refuse_with(mqtt5.ConnAckReasonCode.NOT_AUTHORIZED, why)

    async def _unknown_certificate(self, known: Certificate | None) -> Certificate:
        """JITR/JITP (or a refusal) for a certificate the registry does not know, or knows pending."""
        outcome = await self.provisioning.on_unknown_certificate(self.der, self.certificate_id, known)
        if isinstance(outcome, Refuse):
            raise Close(f"refused without CONNACK: {outcome.why}")
        if isinstance(outcome, Event):
            # A registration (once per certificate, which a registered CA signed): logged each time.
            self._tally = None
            raise Close(
                "JITR: certificate registered PENDING_ACTIVATION, event published; closed without CONNACK"
            )
        if outcome.provisioned:
            log.info(
                "%s: JITP provisioned the certificate, now %s", self.describe(), outcome.certificate.status
            )
        return outcome.certificate

    # ---- the relay ----------------------------------------------------------------------------

    async def _open_broker(self, raw_connect: bytes, connect_keep_alive: int) -> None:
        gw = self.gw
        try:
            broker_reader, broker_writer = await asyncio.wait_for(
                gw.open_broker(), self.limits.broker_timeout
            )
        except (OSError, TimeoutError) as e:
            self._send_client(mqtt5.ConnAckPacket(reason_code=mqtt5.ConnAckReasonCode.SERVER_UNAVAILABLE))
            raise Close(f"broker unreachable: {brief(e)}") from None
        self.broker_reader, self.broker_writer = broker_reader, broker_writer
        if self.broker_client_id is not None:
            raw_connect = with_client_id(raw_connect, self.broker_client_id, mqtt311=self.mqtt311)
        broker_writer.write(raw_connect)
        buf = bytearray()
        try:
            size = await asyncio.wait_for(read_frame(broker_reader, buf), self.limits.broker_timeout)
        except (TimeoutError, ConnectionError, OSError) as e:
            self._send_client(mqtt5.ConnAckPacket(reason_code=mqtt5.ConnAckReasonCode.SERVER_UNAVAILABLE))
            raise Close(f"broker did not answer CONNECT: {brief(e)}") from None
        connack = self._parse(buf, 0, size)
        if not isinstance(connack, mqtt5.ConnAckPacket):
            raise Close("broker did not answer CONNECT with CONNACK")
        if connack.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
            self._write_client(bytes(buf[:size]))
            raise Close(f"broker refused CONNECT: {connack.reason_code.name}")
        if self.mqtt311:
            # A 3.1.1 CONNACK announces nothing but "session present": Mosquitto's goes through as is.
            self.connack = bytes(buf[:size])
            del buf[:size]
            self.broker_buf = buf
            return
        # What AWS IoT Core announces: QoS 1 at most, 128 KB messages; the rest is Mosquitto's session.
        self.connack = self._encode(
            mqtt5.ConnAckPacket(
                session_present=connack.session_present,
                session_expiry_interval=connack.session_expiry_interval,
                assigned_client_id=connack.assigned_client_id,
                server_keep_alive=self.keep_alive if self.keep_alive != connect_keep_alive else None,
                receive_max=connack.receive_max,
                topic_alias_max=connack.topic_alias_max,
                max_qos=mqtt5.QoS.AT_LEAST_ONCE,
                retain_available=connack.retain_available,
                max_packet_size=self.limits.max_packet_size,
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
            if isinstance(result, Close):
                return result
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                if isinstance(result, ConnectionError | OSError | asyncio.IncompleteReadError):
                    return Close(f"connection lost: {brief(result)}", notable=False)
                return result
        if self.kicked is not None:
            return self.kicked
        return Close("ended", notable=False)

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
        """The client -> broker pump, closed when the client is silent for 1.5 times its keep-alive."""
        idle = self.keep_alive * 1.5
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(loop.time() + idle) as self._idle:
                await self._pump_client(loop, idle)
        except TimeoutError:
            if self._idle is None or not self._idle.expired():
                raise
            raise Close(
                f"no packet for {idle:g} s (1.5 times the keep-alive of {self.keep_alive} s)",
                Reason.KEEP_ALIVE_TIMEOUT,
            ) from None
        finally:
            self._idle = None

    async def _pump_client(self, loop: asyncio.AbstractEventLoop, idle: float) -> None:
        assert self._idle is not None
        deadline = self._idle
        buf = self.buf
        assert self.broker_writer is not None
        broker = self.broker_writer
        max_packet_size = self.limits.max_packet_size
        write_limit = self.limits.client_write_limit
        while True:
            pos = 0
            span = -1  # start of a run of packets relayed unchanged, written as one slice
            while True:
                found = frame(buf, pos)
                if found is None:
                    break
                size = found[1]
                if size > max_packet_size:
                    raise Close("packet too large", Reason.PACKET_TOO_LARGE)
                if pos + size > len(buf):
                    break
                kind = buf[pos] >> 4
                relay = kind in RELAYED_FROM_CLIENT
                if kind == _DISCONNECT:
                    self.client_disconnected = True
                if not relay:
                    packet = self._parse(buf, pos, size)
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
            if self.writer.transport.get_write_buffer_size() > write_limit:
                await self._drain_client()
            data = await self.reader.read(READ_SIZE)
            deadline.reschedule(loop.time() + idle)
            if not data:
                raise Close("closed by the client", notable=False)
            buf += data

    async def _drain_client(self) -> None:
        """Wait (bounded) until the client has read what the gateway owes it."""
        try:
            await asyncio.wait_for(self.writer.drain(), self.limits.client_drain_timeout)
        except TimeoutError:
            self.stuck = True
            # Logged once per interval for all of them (issue 11); this connection's close at DEBUG.
            self.gw.stuck_clients.hit(self.describe())
            raise Close(
                f"the client did not read its answers or messages for {self.limits.client_drain_timeout:g} s",
                notable=False,
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
            raise Close("second CONNECT", Reason.PROTOCOL_ERROR)
        raise Close(f"unexpected {type(packet).__name__} from a client", Reason.PROTOCOL_ERROR)

    async def _client_publish(self, packet: mqtt5.PublishPacket) -> bool:
        alias = packet.topic_alias
        topic = packet.topic if alias is None else self._resolve_alias(packet, alias)
        self._check_publish(packet, topic)
        if alias is not None and packet.topic:
            self.client_aliases[alias] = topic  # at most topic_alias_max of them, each a valid topic
        request = self.provisioning.match(topic)
        if request is not None:
            # A retained request asks for iot:RetainPublish like any retained publish (nothing is kept:
            # the request is answered, never stored), which no claim policy grants.
            if packet.retain and not self._may_publish(topic, retain=True):
                self._refuse_publish(packet)
                return False
            await self._provisioning_request(request, packet, topic)
            return False
        # $aws/... and other $ topics belong to the service; clients may not publish there.
        if topic.startswith("$") or not self._may_publish(topic, retain=packet.retain):
            service = unserved_service(topic)
            if service is not None and self._may_publish(topic, retain=packet.retain):
                self._refuse_unserved(packet, service)
            else:
                self._refuse_publish(packet)
            return False
        if alias is not None:
            # Aliases stop here: a refused PUBLISH may have set one that Mosquitto never saw.
            self._send_broker(_without_alias(packet, topic).write())
            return False
        return True

    def _may_publish(self, topic: str, *, retain: bool) -> bool:
        # A retained message outlives its publisher, so AWS asks for iot:RetainPublish on the topic too.
        resource = f"topic/{topic}"
        return self.allowed("iot:Publish", resource) and (
            not retain or self.allowed("iot:RetainPublish", resource)
        )

    def _resolve_alias(self, packet: mqtt5.PublishPacket, alias: int) -> str:
        """The topic of a PUBLISH with a topic alias: its own if it names one, else the alias's."""
        if not 0 < alias <= self.topic_alias_max:
            raise Close(
                f"topic alias {alias} outside 1..{self.topic_alias_max} (the CONNACK's maximum)",
                Reason.TOPIC_ALIAS_INVALID,
            )
        if packet.topic:
            return packet.topic
        resolved = self.client_aliases.get(alias)
        if resolved is None:
            raise Close(f"unknown topic alias {alias}", Reason.TOPIC_ALIAS_INVALID)
        return resolved

    def _check_publish(self, packet: mqtt5.PublishPacket, topic: str) -> None:
        """Close the connection for a PUBLISH AWS IoT Core would not take: QoS 2, size, topic."""
        limits = self.limits
        if packet.qos == mqtt5.QoS.EXACTLY_ONCE:
            raise Close("QoS 2 is not supported", Reason.QOS_NOT_SUPPORTED)
        if len(packet.payload) > limits.max_payload_size:
            raise Close(
                f"payload of {len(packet.payload)} bytes exceeds {limits.max_payload_size // 1024} KB",
                Reason.PACKET_TOO_LARGE,
            )
        if not topic or "+" in topic or "#" in topic:
            raise Close("invalid topic name", Reason.TOPIC_NAME_INVALID)
        problem = topic_limit_problem(topic, limits.max_topic_bytes, limits.max_topic_slashes)
        if problem is not None:
            raise Close(f"topic name {problem}", Reason.TOPIC_NAME_INVALID)

    async def _provisioning_request(self, request: Request, packet: mqtt5.PublishPacket, topic: str) -> None:
        """A fleet provisioning request: answered here, on this connection only; Mosquitto never sees it."""
        if not self.allowed("iot:Publish", f"topic/{topic}"):
            self._refuse_publish(packet)
            return
        fault = self.gw.faults.take(request.operation) if self.gw.faults.armed else None
        if fault is not None:
            if not await self._request_fault(fault, request, packet):
                return
        elif packet.qos == mqtt5.QoS.AT_LEAST_ONCE and packet.packet_id is not None:
            self._send_client(mqtt5.PubAckPacket(packet.packet_id))
        answer = await self.provisioning.answer(
            request, packet.payload, Requester(self.certificate_id, self.client_id)
        )
        self._answer(answer)

    def _refuse_unserved(self, packet: mqtt5.PublishPacket, service: str) -> None:
        """A request to an AWS IoT service the stand-in does not offer, which the policy allows: say so,
        rather than blame the policy with NOT_AUTHORIZED (its owner would look for a fault in it)."""
        why = f"iot-core-local does not serve {service} ({packet.topic!r}); it serves fleet provisioning"
        self.gw.unserved_requests.hit(f"{service}: {self.describe()}")
        if self.mqtt311:
            raise Close(f"{why}: MQTT 3.1.1 client disconnected (3.1.1 has no PUBACK reason code)")
        if packet.qos == mqtt5.QoS.AT_LEAST_ONCE and packet.packet_id is not None:
            self._send_client(
                mqtt5.PubAckPacket(
                    packet.packet_id,
                    reason_code=mqtt5.PubAckReasonCode.IMPLEMENTATION_SPECIFIC_ERROR,
                    reason_str=why if self.problem_info else None,
                )
            )

    def _refuse_publish(self, packet: mqtt5.PublishPacket) -> None:
        if self.mqtt311:
            # 3.1.1 has no PUBACK reason code: AWS IoT Core disconnects a 3.1.1 client instead.
            raise Close(f"PUBLISH to {packet.topic!r} not authorized: MQTT 3.1.1 client disconnected")
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
        limits = self.limits
        if len(filters) > limits.max_filters_per_subscribe:
            # AWS takes at most 8 filters per SUBSCRIBE: the whole request is over quota.
            log.debug("%s: SUBSCRIBE with %d filters refused", self.describe(), len(filters))
            filters = []
            codes = [int(mqtt5.SubAckReasonCode.QUOTA_EXCEEDED)] * len(packet.topic_filters)
        subscriptions = self.subscriptions
        for i, tf in enumerate(filters):
            pattern = tf.pattern
            if topic_limit_problem(pattern, limits.max_topic_bytes, limits.max_topic_slashes) is not None:
                codes.append(mqtt5.SubAckReasonCode.TOPIC_FILTER_INVALID)
                continue
            if not self.allowed("iot:Subscribe", f"topicfilter/{pattern}"):
                codes.append(mqtt5.SubAckReasonCode.NOT_AUTHORIZED)
                continue
            if pattern not in subscriptions and len(subscriptions) >= limits.max_subscriptions_per_connection:
                codes.append(mqtt5.SubAckReasonCode.QUOTA_EXCEEDED)
                continue
            qos = min(int(tf.max_qos), 1)
            codes.append(qos)
            subscriptions.add(pattern)
            if pattern.startswith("$aws/"):
                self.local_filters.add(pattern)  # provisioning answers may match it
            if self.provisioning.owns_filter(pattern):
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
                self._encode(
                    mqtt5.SubscribePacket(
                        packet.packet_id,
                        forward,
                        subscription_id=packet.subscription_id,
                        user_properties=packet.user_properties,
                    )
                )
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
            if self.provisioning.owns_filter(pattern):
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
                self._encode(
                    mqtt5.UnsubscribePacket(packet.packet_id, forward, user_properties=packet.user_properties)
                )
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
                found = frame(buf, pos)
                if found is None or pos + found[1] > len(buf):
                    break
                header, size = found
                kind = buf[pos] >> 4
                verdict: bytes | bool = True
                if kind in (PUBLISH, SUBACK, UNSUBACK):
                    verdict = self._broker_packet(self._parse(buf, pos, size))
                elif kind == PUBACK and size > header + 2 and buf[pos + header + 2] == NO_SUBSCRIBERS:
                    # Mosquitto says 16 (no matching subscribers); AWS IoT Core says 0 (success).
                    at = pos + header
                    verdict = bytes((PUBACK << 4, 2, buf[at], buf[at + 1]))
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
            # A subscriber that does not read: bounded as for the gateway's own answers, so it is
            # closed rather than held, and Mosquitto's queue for it stays within its limits.
            if self.writer.transport.get_write_buffer_size():
                await self._drain_client()  # a task and a timer only when output is pending
            data = await reader.read(READ_SIZE)
            if not data:
                raise Close("closed by the broker", notable=False)
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
                self._send_broker(self._encode(mqtt5.PubAckPacket(packet.packet_id)))
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
            return self._encode(
                mqtt5.SubAckPacket(
                    packet.packet_id,
                    [mqtt5.SubAckReasonCode(int(c)) for c in merge.codes],
                    reason_str=packet.reason_str,
                    user_properties=packet.user_properties,
                )
            )
        if isinstance(packet, mqtt5.UnsubAckPacket):
            unmerge = self.pending_unsubacks.pop(packet.packet_id, None)
            if unmerge is None:
                return True
            for position, ucode in zip(unmerge.positions, packet.reason_codes, strict=False):
                unmerge.codes[position] = int(ucode)
            return self._encode(
                mqtt5.UnsubAckPacket(
                    packet.packet_id,
                    [mqtt5.UnsubAckReasonCode(int(c)) for c in unmerge.codes],
                    reason_str=packet.reason_str,
                    user_properties=packet.user_properties,
                )
            )
        return True


def _write_mqtt5(packet: mqtt5.Packet) -> bytes:
    return packet.write()


def _without_alias(packet: mqtt5.PublishPacket, topic: str) -> mqtt5.PublishPacket:
    return mqtt5.PublishPacket(
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
    )


async def read_frame(reader: asyncio.StreamReader, buf: bytearray) -> int:
    """Read into `buf` until it holds one complete packet; its size."""
    while True:
        found = frame(buf, 0)
        if found is not None and len(buf) >= found[1]:
            return found[1]
        data = await reader.read(READ_SIZE)
        if not data:
            raise ConnectionError("closed")
        buf += data
