"""A lean asyncio MQTT 5 load generator for the gateway (codec: the `mqtt5` package).

The device side of the product uses awscrt; this generator exists only so that one process on a
2-core machine can drive hundreds of concurrent provisionings without itself being the bottleneck.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
from dataclasses import dataclass

import mqtt5
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def make_csr(common_name: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


class MqttConnection:
    """One MQTT 5 connection: send packets, await packets, nothing more."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buffer = bytearray()
        self._next_id = 0

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        client_id: str,
        ssl_context: ssl.SSLContext | None,
        *,
        keep_alive: int = 60,
        receive_buffer: int | None = None,
    ) -> MqttConnection:
        """Connect and CONNECT. `receive_buffer`: SO_RCVBUF, set before connecting (a small one keeps a
        client that stops reading from parking megabytes in the kernel)."""
        if receive_buffer is None:
            reader, writer = await asyncio.open_connection(host, port, ssl=ssl_context)
        else:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, (host, port))
            except BaseException:
                sock.close()
                raise
            reader, writer = await asyncio.open_connection(
                sock=sock, ssl=ssl_context, server_hostname=host if ssl_context else None
            )
        return await cls._connect(reader, writer, client_id, keep_alive)

    @classmethod
    async def open_unix(cls, path: str, client_id: str) -> MqttConnection:
        """Straight to a Mosquitto's Unix socket (the server's own user only): the baseline of latency."""
        reader, writer = await asyncio.open_unix_connection(path)
        return await cls._connect(reader, writer, client_id, 60)

    @classmethod
    async def _connect(
        cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client_id: str, keep_alive: int
    ) -> MqttConnection:
        conn = cls(reader, writer)
        conn.send(mqtt5.ConnectPacket(client_id, clean_start=True, keep_alive=keep_alive))
        connack = await conn.receive()
        if not isinstance(connack, mqtt5.ConnAckPacket) or connack.reason_code != 0:
            raise ConnectionError(f"CONNECT refused: {connack!r}")
        return conn

    def packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def send(self, packet: mqtt5.Packet) -> None:
        self.writer.write(packet.write())

    async def receive(self) -> mqtt5.Packet:
        while True:
            if self.buffer:
                try:
                    packet, size = mqtt5.read(memoryview(self.buffer))
                except IndexError:
                    pass
                else:
                    del self.buffer[:size]
                    return packet
            chunk = await self.reader.read(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buffer += chunk

    async def subscribe(self, *filters: str) -> None:
        pid = self.packet_id()
        topic_filters = [mqtt5.TopicFilter(f, max_qos=mqtt5.QoS.AT_LEAST_ONCE) for f in filters]
        self.send(mqtt5.SubscribePacket(pid, topic_filters))
        while True:
            packet = await self.receive()
            if isinstance(packet, mqtt5.SubAckPacket) and packet.packet_id == pid:
                if any(int(code) > 2 for code in packet.reason_codes):
                    raise PermissionError(f"SUBSCRIBE refused: {packet.reason_codes}")
                return

    async def request(self, topic: str, payload: bytes) -> tuple[str, bytes]:
        """Publish QoS 1 and return the first PUBLISH that comes back (the answer)."""
        self.send(
            mqtt5.PublishPacket(topic, payload, qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=self.packet_id())
        )
        while True:
            packet = await self.receive()
            if isinstance(packet, mqtt5.PublishPacket):
                if packet.qos == mqtt5.QoS.AT_LEAST_ONCE and packet.packet_id is not None:
                    self.send(mqtt5.PubAckPacket(packet.packet_id))
                return packet.topic, packet.payload

    async def close(self) -> None:
        self.send(mqtt5.DisconnectPacket())
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


@dataclass(frozen=True)
class ProvisioningResult:
    ok: bool
    seconds: float
    error: str = ""


async def provision_one(
    host: str, port: int, ctx: ssl.SSLContext, template: str, serial: str, csr_pem: str
) -> ProvisioningResult:
    """Claim connect, CreateCertificateFromCsr, RegisterThing, disconnect: one hub's onboarding."""
    started = time.perf_counter()
    conn: MqttConnection | None = None
    try:
        conn = await MqttConnection.open(host, port, serial, ctx)
        await _onboard(conn, template, serial, csr_pem)
    except Exception as exc:  # a benchmark counts failures, it does not stop on them
        return ProvisioningResult(False, time.perf_counter() - started, f"{type(exc).__name__}: {exc}")
    finally:
        if conn is not None:
            with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
                await conn.close()
    return ProvisioningResult(True, time.perf_counter() - started)


async def _onboard(conn: MqttConnection, template: str, serial: str, csr_pem: str) -> None:
    csr_topic = "$aws/certificates/create-from-csr/json"
    register_topic = f"$aws/provisioning-templates/{template}/provision/json"
    await conn.subscribe(
        f"{csr_topic}/accepted",
        f"{csr_topic}/rejected",
        f"{register_topic}/accepted",
        f"{register_topic}/rejected",
    )
    payload = _accepted(
        *await conn.request(csr_topic, json.dumps({"certificateSigningRequest": csr_pem}).encode())
    )
    token = json.loads(payload)["certificateOwnershipToken"]
    request = {"certificateOwnershipToken": token, "parameters": {"SerialNumber": serial}}
    _accepted(*await conn.request(register_topic, json.dumps(request).encode()))


def _accepted(topic: str, payload: bytes) -> bytes:
    """The payload of an /accepted answer; a /rejected one raises with its body."""
    if not topic.endswith("/accepted"):
        raise RuntimeError(payload.decode())
    return payload


def client_context(root_ca: str, cert_path: str, key_path: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=root_ca)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx
