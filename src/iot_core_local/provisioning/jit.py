"""Just-in-time registration (JITR) and provisioning (JITP): a device certificate nobody registered,
signed by a CA registered with auto-registration, connects.

With a provisioning template on the CA (JITP), the template runs at once and the connection may go on.
Without one (JITR), the certificate is registered PENDING_ACTIVATION, the registration event is published
to `$aws/events/certificates/registered/<caCertificateId>` for the customer's code to hear, and the
connection is closed; the device's retry connects once that code has activated the certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import mqtt5
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .. import templates
from ..broker import open_connection
from ..errors import ResourceNotFound, ServiceError
from ..model import CACertificate, Certificate, CertificateStatus
from ..registry import ACCOUNT_ID, Registry
from .fleet import apply_plan, validated_template

__all__ = ["EventPublisher", "JustInTime", "Registered"]

_READ_SIZE = 65536


@dataclass(frozen=True)
class Registered:
    """JITR's outcome: the certificate is registered, and this event is to be published."""

    certificate: Certificate
    event: bytes


class JustInTime:
    """What happens when a certificate of an auto-registration CA connects unknown (or still pending).

    Synchronous (it writes the registry, and JITP runs a template): run it in a worker thread.
    """

    def __init__(self, registry: Registry, clock: Callable[[], float]) -> None:
        self.registry = registry
        self.clock = clock
        # Set by the server: managed integrations activates a JITR profile's hubs (provisioning/managed.py).
        self.activator: Callable[[x509.Certificate, Certificate, CACertificate], None] | None = None

    def register(
        self, cert: x509.Certificate, cid: str, ca: CACertificate, known: Certificate | None
    ) -> Certificate | Registered:
        """The JITP-provisioned certificate (the connection may go on if it is ACTIVE), or, for JITR,
        the registered certificate and its event (publish it, close the connection)."""
        body = self._jitp_template_body(ca)
        if body is not None and known is None:
            template = validated_template(body)
            plan = templates.evaluate(template, {}, templates.certificate_builtins(cert, cid))
            pem = cert.public_bytes(serialization.Encoding.PEM).decode()
            with self.registry.transaction():
                record = self.registry.add_certificate(
                    pem, CertificateStatus.PENDING_ACTIVATION, ca_certificate_id=ca.certificate_id
                )
                apply_plan(self.registry, plan, record)
            return self.registry.get_certificate(cid)
        if known is None:
            pem = cert.public_bytes(serialization.Encoding.PEM).decode()
            try:
                known = self.registry.add_certificate(
                    pem, CertificateStatus.PENDING_ACTIVATION, ca_certificate_id=ca.certificate_id
                )
            except ServiceError:
                known = self.registry.get_certificate(cid)  # a concurrent connect registered it first
        if self.activator is not None and known.status == CertificateStatus.PENDING_ACTIVATION:
            # A retry too: its managed thing may have been created since the first connect.
            self.activator(cert, known, ca)
            known = self.registry.get_certificate(cid)
        event = {
            "certificateId": cid,
            "caCertificateId": ca.certificate_id,
            "timestamp": int(self.clock() * 1000),
            "certificateStatus": known.status,
            "awsAccountId": ACCOUNT_ID,
            "certificateRegistrationTimestamp": int(known.created * 1000),
        }
        return Registered(known, json.dumps(event, separators=(",", ":")).encode())

    def _jitp_template_body(self, ca: CACertificate) -> str | None:
        config = ca.registration_config or {}
        if config.get("templateBody"):
            return config["templateBody"]
        if config.get("templateName"):
            stored = self.registry.find_template(config["templateName"])
            if stored is None:
                raise ResourceNotFound(f"The provisioning template {config['templateName']} does not exist")
            return stored.body
        return None


class EventPublisher:
    """The stand-in's own client of Mosquitto, for the events it publishes (JITR registrations)."""

    def __init__(self, address: str, *, timeout: float = 10.0) -> None:
        self.address = address  # Mosquitto's Unix socket (broker.py): the gateway's, no other door
        self.timeout = timeout  # Mosquitto's connect, and its CONNACK
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
        reader, writer = await asyncio.wait_for(open_connection(self.address), self.timeout)
        try:
            await self._handshake(reader, writer)
        except BaseException:
            writer.close()  # no CONNACK in time, a refusal, a bad packet: the socket goes too
            raise
        self._writer = writer
        self._drain_task = asyncio.create_task(self._discard(reader))

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(mqtt5.ConnectPacket(self.client_id, clean_start=True, keep_alive=0).write())
        connack = await asyncio.wait_for(_read_packet(reader), self.timeout)
        if not isinstance(connack, mqtt5.ConnAckPacket) or connack.reason_code != 0:
            raise ConnectionError(f"broker refused the event publisher: {connack!r}")

    @staticmethod
    async def _discard(reader: asyncio.StreamReader) -> None:
        # PUBACKs only; reading them keeps the socket buffer from filling up.
        with contextlib.suppress(ConnectionError, OSError):
            while await reader.read(_READ_SIZE):
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


async def _read_packet(reader: asyncio.StreamReader) -> mqtt5.Packet:
    """The next packet from Mosquitto (trusted: it is our own broker, behind its own socket)."""
    buf = bytearray()
    while True:
        if buf:
            try:
                packet, _size = mqtt5.read(memoryview(buf))
            except IndexError:  # not all there yet
                pass
            except ValueError as e:
                raise ConnectionError(f"malformed packet from the broker: {e}") from None
            else:
                return packet
        data = await reader.read(_READ_SIZE)
        if not data:
            raise ConnectionError("closed")
        buf += data
