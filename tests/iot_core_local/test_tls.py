"""The asyncio internals gateway/tls.py stands on, checked by name, and one real handshake through it.

`asyncio.sslproto` is private: a Python release may rename or reshape any of it. When one does, these
tests say exactly which piece moved, instead of devices failing their TLS handshakes.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import inspect
import ssl
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from iot_core_local.ca import CertificateAuthority
from iot_core_local.gateway.tls import LeanSSLProtocol, handshake

MOVED = "asyncio internals moved (Python {version}): {what}; src/iot_core_local/gateway/tls.py relies on it"


def _moved(what: str) -> str:
    return MOVED.format(version=sys.version.split()[0], what=what)


def test_ssl_protocol_class_and_constructor() -> None:
    sslproto = vars(asyncio.sslproto)
    assert inspect.isclass(sslproto.get("SSLProtocol")), _moved("asyncio.sslproto.SSLProtocol is gone")
    parameters = inspect.signature(asyncio.sslproto.SSLProtocol.__init__).parameters
    positional = list(parameters)[1:5]
    assert positional == ["loop", "app_protocol", "sslcontext", "waiter"], _moved(
        f"SSLProtocol.__init__ starts with {positional}, not (loop, app_protocol, sslcontext, waiter)"
    )
    for name in ("server_side", "call_connection_made", "ssl_handshake_timeout"):
        assert name in parameters, _moved(f"SSLProtocol.__init__ has no parameter {name!r}")


def test_ssl_protocol_members() -> None:
    protocol = asyncio.sslproto.SSLProtocol
    assert isinstance(vars(protocol).get("max_size"), int), _moved(
        "SSLProtocol.max_size (the read buffer size) is not a class attribute"
    )
    assert callable(vars(protocol).get("buffer_updated")), _moved("SSLProtocol.buffer_updated is gone")
    assert callable(vars(protocol).get("connection_made")), _moved("SSLProtocol.connection_made is gone")
    states = vars(asyncio.sslproto).get("SSLProtocolState")
    assert states is not None, _moved("asyncio.sslproto.SSLProtocolState is gone")
    assert "DO_HANDSHAKE" in states.__members__, _moved("SSLProtocolState.DO_HANDSHAKE is gone")


def _lean_protocol(loop: asyncio.AbstractEventLoop) -> LeanSSLProtocol:
    waiter: asyncio.Future[None] = loop.create_future()
    return LeanSSLProtocol(
        loop,
        asyncio.Protocol(),
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER),
        waiter,
        server_side=True,
        ssl_handshake_timeout=10.0,
        call_connection_made=False,
    )


def test_lean_protocol_instance_attributes() -> None:
    loop = asyncio.new_event_loop()
    protocols = [_lean_protocol(loop), _lean_protocol(loop)]
    attributes = vars(protocols[0])
    try:
        for name in ("_state", "_app_transport", "_transport", "_ssl_buffer", "_ssl_buffer_view"):
            assert name in attributes, _moved(f"an SSLProtocol has no {name!r} attribute after __init__")
        assert attributes["_state"] is asyncio.sslproto.SSLProtocolState.UNWRAPPED, _moved(
            "a new SSLProtocol is not in state UNWRAPPED"
        )
        # The memory saving itself: one read buffer of max_size, shared by the connections of a thread,
        # and the one get_buffer() hands to the transport.
        assert len(attributes["_ssl_buffer"]) == LeanSSLProtocol.max_size == 16 * 1024
        assert vars(protocols[1])["_ssl_buffer"] is attributes["_ssl_buffer"]
        handed = protocols[1].get_buffer(-1)
        assert isinstance(handed, memoryview)
        assert handed.obj is attributes["_ssl_buffer"], _moved("SSLProtocol.get_buffer() reads elsewhere")
    finally:
        for protocol in protocols:
            app = vars(protocol).get("_app_transport")
            if app is not None:
                app.abort()  # created by __init__; never connected, it must still be closed
        loop.close()


def test_handshake_through_the_lean_protocol(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    certificate_pem, key_pem = ca.create_keys_and_certificate()
    (tmp_path / "device.crt").write_text(certificate_pem)
    (tmp_path / "device.key").write_text(key_pem)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(ca.server_cert_path, ca.server_key_path)
    server_context.verify_mode = ssl.CERT_REQUIRED
    server_context.load_verify_locations(cadata=ca.issuing_ca_pem)
    client_context = ssl.create_default_context(cafile=str(ca.root_ca_path))
    client_context.load_cert_chain(tmp_path / "device.crt", tmp_path / "device.key")

    async def scenario() -> tuple[bytes, bytes]:
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[asyncio.Transport] = loop.create_future()

        class Accept(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                assert isinstance(transport, asyncio.Transport)
                transport.pause_reading()  # as the gateway does: TLS takes over a paused transport
                accepted.set_result(transport)

        server = await loop.create_server(Accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            client = asyncio.create_task(
                asyncio.open_connection("127.0.0.1", port, ssl=client_context, server_hostname="localhost")
            )
            opened = await handshake(await accepted, "test", server_context, 5.0)
            assert opened is not None, "the handshake failed (see the log)"
            reader, writer, der = opened
            _client_reader, client_writer = await client
            client_writer.write(b"ping")
            received = await reader.readexactly(4)
            writer.close()
            client_writer.close()
            await client_writer.wait_closed()
            await writer.wait_closed()
            return der, received
        finally:
            server.close()
            await server.wait_closed()

    der, received = asyncio.run(scenario())
    expected = x509.load_pem_x509_certificate(certificate_pem.encode()).public_bytes(
        serialization.Encoding.DER
    )
    assert der == expected
    assert received == b"ping"


def test_handshake_without_client_certificate_is_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(ca.server_cert_path, ca.server_key_path)
    server_context.verify_mode = ssl.CERT_OPTIONAL
    server_context.load_verify_locations(cadata=ca.issuing_ca_pem)
    client_context = ssl.create_default_context(cafile=str(ca.root_ca_path))

    async def scenario() -> object:
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[asyncio.Transport] = loop.create_future()

        class Accept(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                assert isinstance(transport, asyncio.Transport)
                transport.pause_reading()
                accepted.set_result(transport)

        server = await loop.create_server(Accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            client = asyncio.create_task(
                asyncio.open_connection("127.0.0.1", port, ssl=client_context, server_hostname="localhost")
            )
            opened = await handshake(await accepted, "test", server_context, 5.0)
            _reader, client_writer = await client
            client_writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await client_writer.wait_closed()
            return opened
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(scenario()) is None
