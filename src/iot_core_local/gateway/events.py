"""The gateway's own client of Mosquitto, for events such as JITR registrations."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import mqtt5

from .connection import read_frame
from .tls import READ_SIZE
from .wire import parse

__all__ = ["EventPublisher"]


class EventPublisher:
    """The gateway's own client of Mosquitto, for events such as JITR registrations."""

    def __init__(self, host: str, port: int, *, timeout: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout  # Mosquitto's TCP connect, and its CONNACK
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
        reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.timeout)
        try:
            await self._handshake(reader, writer)
        except BaseException:
            writer.close()  # no CONNACK in time, a refusal, a bad packet: the socket goes too
            raise
        self._writer = writer
        self._drain_task = asyncio.create_task(self._discard(reader))

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(mqtt5.ConnectPacket(self.client_id, clean_start=True, keep_alive=0).write())
        buf = bytearray()
        size = await asyncio.wait_for(read_frame(reader, buf), self.timeout)
        connack = parse(buf, 0, size)
        if not isinstance(connack, mqtt5.ConnAckPacket) or connack.reason_code != 0:
            raise ConnectionError(f"broker refused the event publisher: {connack!r}")

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
