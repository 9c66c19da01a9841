"""TLS for the gateway: the trust store, and the server handshake on asyncio internals (quarantined here).

Everything that reaches into asyncio's private TLS machinery lives in this module and nowhere else:
`asyncio.sslproto.SSLProtocol` subclassed for a smaller read buffer and TCP_QUICKACK during the handshake,
`loop.start_tls` redone with that protocol, and the application transport read from it. Those internals
differ between Python versions; tests/iot_core_local/test_tls.py checks every one of them by name, so a
Python whose asyncio moved fails there, loudly, rather than at a device's first connect.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from cryptography import x509

from ..ca import CertificateAuthority
from ..registry import Registry
from ..resources import LimitLog

__all__ = ["ALPN_MQTT", "LeanSSLProtocol", "TrustStore", "handshake", "start_tls"]

log = logging.getLogger("iot_core_local.gateway")

T = TypeVar("T")
RunInThread = Callable[[Callable[[], T]], Awaitable[T]]

# The ALPN protocol id AWS IoT Core's port 443 serves MQTT under (without it, 443 is HTTPS there); the
# SDKs' samples offer it by default on 443.
ALPN_MQTT = "x-amzn-mqtt-ca"

# The StreamReader's buffer limit for a device connection; MQTT packets are read this much at a time.
READ_SIZE = 65536
# What a device connection may have written and not yet sent before its writer's drain() waits. asyncio's
# TLS default is 512 KiB: with 60 subscribers that never read, 64 KiB took ~10 MB off the server's peak
# (bench/abuse.py); smaller (with the socket transport's own limit lowered too) measured no better.
WRITE_HIGH_WATER = 64 * 1024
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only
# The read buffer every LeanSSLProtocol of one thread (one event loop) shares.
_read_buffers = threading.local()


class LeanSSLProtocol(asyncio.sslproto.SSLProtocol):
    """asyncio's TLS protocol with one 16 KiB read buffer per thread instead of 256 KiB per connection.

    asyncio allocates (and zero-fills, so it is resident) `max_size` bytes per TLS connection: 256 KiB
    each made 200 concurrent provisionings cost ~50 MB and 1,000 half-open handshakes ~250 MB; 32 KiB
    still cost 1,000 idle connections 32 MB. A TLS record carries at most 16 KiB, so one read takes in
    about a record; a 64 KiB MQTT packet takes five reads instead of two.

    The buffer only holds the bytes of one `recv_into` until `buffer_updated` copies them into the TLS
    object's incoming BIO: the transport calls the two back to back, and a loop runs one callback at a
    time, so every connection of a loop's thread can share one buffer (16 KiB per connection less:
    1,200 connections held ~19 MB of them).
    """

    max_size = 16 * 1024

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        app_protocol: asyncio.BaseProtocol,
        sslcontext: ssl.SSLContext,
        waiter: asyncio.Future[None],
        *,
        server_side: bool,
        ssl_handshake_timeout: float,
        call_connection_made: bool,
    ) -> None:
        super().__init__(
            loop,
            app_protocol,
            sslcontext,
            waiter,
            server_side=server_side,
            ssl_handshake_timeout=ssl_handshake_timeout,  # type: ignore[arg-type]  # typeshed: int; floats work
            call_connection_made=call_connection_made,
        )
        shared = _read_buffers.__dict__
        if "view" not in shared:
            shared["buffer"] = bytearray(self.max_size)
            shared["view"] = memoryview(shared["buffer"])
        # asyncio internals (see the module's docstring): the buffer get_buffer() hands to the transport.
        self._ssl_buffer = shared["buffer"]
        self._ssl_buffer_view = shared["view"]

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


async def start_tls(
    loop: asyncio.AbstractEventLoop,
    transport: asyncio.Transport,
    protocol: asyncio.BaseProtocol,
    context: ssl.SSLContext,
    handshake_timeout: float,
) -> asyncio.Transport | None:
    """`loop.start_tls(..., server_side=True)` with `LeanSSLProtocol`; the same steps, in the same order."""
    waiter: asyncio.Future[None] = loop.create_future()
    tls = LeanSSLProtocol(
        loop,
        protocol,
        context,
        waiter,
        server_side=True,
        ssl_handshake_timeout=handshake_timeout,
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
    # asyncio has no public accessor for the application side of an SSLProtocol it did not create.
    app: asyncio.Transport | None = tls._app_transport  # noqa: SLF001
    return app


async def handshake(
    transport: asyncio.Transport,
    peer: str,
    context: ssl.SSLContext,
    handshake_timeout: float,
    require_alpn: str | None = None,
    failures: LimitLog | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes] | None:
    """TLS on a connection whose reading was paused at accept: (reader, writer, client certificate DER),
    or None if the handshake fails, the client sent no certificate, or `require_alpn` is given and the
    client did not offer it.

    Each failure is told to `failures` (one line per interval, each at DEBUG), or logged at DEBUG if
    None: any client that can reach the port causes one per connection, without a certificate, and a
    line each was 16,000 lines in 5 s from one local client sending non-TLS bytes.

    Reading stays paused until TLS takes over the transport, so no byte of the ClientHello can be
    consumed as plain data first (the race StreamWriter.start_tls has on the server side).
    """

    def failed(why: str) -> None:
        detail = f"connection {peer}: {why}"
        if failures is None:
            log.debug("%s", detail)
        else:
            failures.hit(detail)

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_SIZE, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    try:
        tls = await asyncio.wait_for(
            start_tls(loop, transport, protocol, context, handshake_timeout), handshake_timeout + 1
        )
    except ssl.SSLCertVerificationError as e:
        transport.abort()
        failed(f"TLS handshake refused: {e.verify_message or e.reason}")
        return None
    except (ssl.SSLError, OSError, TimeoutError, EOFError, RuntimeError) as e:
        # RuntimeError: asyncio refuses start_tls on a transport the peer already closed.
        transport.abort()
        failed(f"TLS handshake failed: {brief(e)}")
        return None
    if tls is None:  # the peer went away during the handshake
        transport.abort()
        return None
    tls.set_write_buffer_limits(high=WRITE_HIGH_WATER)
    protocol.connection_made(tls)
    writer = asyncio.StreamWriter(tls, protocol, reader, loop)
    ssl_object = tls.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        failed("closed: no client certificate")
        tls.abort()
        return None
    if require_alpn is not None and ssl_object.selected_alpn_protocol() != require_alpn:
        # OpenSSL asks the server's ALPN choice only of a client that offers ALPN at all, so a client
        # without it completes the handshake; it is closed before it can send a byte of MQTT.
        failed(f"closed: ALPN {require_alpn} not offered on the ALPN port")
        tls.abort()
        return None
    return reader, writer, der


def brief(e: BaseException) -> str:
    """An exception as one log-friendly line of at most ~200 characters."""
    text = str(e) or type(e).__name__
    return text if len(text) <= 200 else text[:200] + "..."


class TrustStore:
    """The server's TLS context, rebuilt whenever the registry's trust moves.

    It trusts the issuing CA, every registered CA and every certificate registered without a CA
    (partial-chain verification makes such a leaf its own anchor). Trusting a CA or certificate at the TLS
    layer only lets it reach the connect rules, which check statuses; so an anchor kept a little too long
    is harmless, and one missing refuses a device.
    """

    def __init__(self, registry: Registry, ca: CertificateAuthority, run_in_thread: RunInThread[Any]) -> None:
        self.registry = registry
        self.ca = ca
        self._run_in_thread = run_in_thread
        self._context: ssl.SSLContext | None = None
        self._generation = -1
        self._rebuild: asyncio.Task[None] | None = None  # the build under way, shared by every handshake
        self._own_certificates: set[str] = set()  # registered without CA, but issued by our issuing CA

    async def context(self) -> ssl.SSLContext:
        """The context for the next handshake, rebuilt first if the registry's trust moved.

        Checked per connection because a CA or a certificate registered without a CA a moment ago must
        work for the very next connect (JITR, JITP, RegisterCertificateWithoutCA); the registry bumps
        `trust_generation` on every such commit, so the check is one integer comparison. The rebuild
        (a parse of every certificate registered without a CA, the server key read) runs in a worker
        thread, once for all the handshakes that wait for it; if it fails, the previous context stays.
        """
        if self._context is None or self.registry.trust_generation != self._generation:
            if self._rebuild is None:
                self._rebuild = asyncio.create_task(self._rebuild_context())
            await asyncio.shield(self._rebuild)
        if self._context is None:
            raise ssl.SSLError("no TLS trust store")
        return self._context

    async def load(self) -> None:
        """Build the first context (at start: a failure here is the gateway's failure to start)."""
        self._install(await self._run_in_thread(self.build))

    async def close(self) -> None:
        if self._rebuild is not None:
            self._rebuild.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rebuild

    async def _rebuild_context(self) -> None:
        generation = self.registry.trust_generation
        try:
            self._install(await self._run_in_thread(self.build))
        except Exception:
            # Keep serving with what was trusted before; retry after the next trust change.
            log.exception("could not rebuild the TLS trust store; keeping the previous one")
            self._generation = generation
        finally:
            self._rebuild = None

    def _install(self, built: tuple[ssl.SSLContext, int, int]) -> None:
        self._context, self._generation, anchors = built
        log.debug("trust store: %d anchors", anchors)

    def build(self) -> tuple[ssl.SSLContext, int, int]:
        """(context, the registry's trust generation it reflects, number of anchors); runs in a thread."""
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
        # Chosen when offered, on either port; a client offering only other protocols gets none, and the
        # MQTT port serves it as before (the ALPN port closes it, see `handshake`).
        context.set_alpn_protocols([ALPN_MQTT])
        # No TLS 1.3 session tickets: no client of the stand-in resumes a session (each connection of
        # awscrt, paho or Python's ssl starts afresh), and the two tickets OpenSSL 3.0 sends by default
        # after every handshake took ~1 ms of the loop's CPU each time, a fifth of a provisioning.
        context.num_tickets = 0
        context.load_verify_locations(cadata="".join(pems.values()))
        return context, generation, len(pems)
