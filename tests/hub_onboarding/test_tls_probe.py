"""tls_probe: the diagnostic handshake run after a failed or hung awscrt connect.

`diagnose` is pure (the first bytes the endpoint sent, how the handshake ended); `probe` runs against real
local servers: a TLS server whose certificate another CA signed, an HTTP server, a server that refuses the
client certificate, and one that accepts it.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from hub_onboarding.tls_probe import ProbeResult, Verdict, describe_first_bytes, diagnose, probe
from tests._support.certificates import make_pair, write_private

TLS_HANDSHAKE = b"\x16\x03\x03\x00\x7a"


@pytest.mark.parametrize(
    ("first", "what"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n", "it answered with HTTP"),
        (b'<!DOCTYPE HTML>\n<html lang="en">', "it answered with HTTP"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", "it answered with a text protocol banner"),
        (b"\x20\x02\x00\x00", "it answered with bytes that are not TLS"),  # an MQTT CONNACK
    ],
)
def test_an_answer_that_is_not_tls_is_named(first: bytes, what: str) -> None:
    assert describe_first_bytes(first) == what
    result = diagnose(first, ssl.SSLError(1, "wrong version number"), handshake_done=False)
    assert result == ProbeResult(Verdict.NOT_TLS, what)
    assert result.final


def test_tls_records_are_not_mistaken_for_another_protocol() -> None:
    assert describe_first_bytes(TLS_HANDSHAKE) is None
    assert describe_first_bytes(b"\x15\x03\x03\x00\x02") is None
    assert describe_first_bytes(b"") is None


def _verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, message)
    error.verify_code = code
    error.verify_message = message
    return error


def test_verdicts_from_how_the_handshake_ended() -> None:
    untrusted = diagnose(TLS_HANDSHAKE, _verify_error(20, "unable to get local issuer certificate"), False)
    assert untrusted == ProbeResult(Verdict.UNTRUSTED, "unable to get local issuer certificate")
    assert (
        diagnose(TLS_HANDSHAKE, _verify_error(62, "Hostname mismatch"), False).verdict is Verdict.WRONG_HOST
    )
    assert diagnose(b"", None, False) == ProbeResult(
        Verdict.NOT_TLS, "it closed the connection at the TLS ClientHello"
    )
    assert diagnose(b"", TimeoutError(), False).verdict is Verdict.INCONCLUSIVE
    assert diagnose(TLS_HANDSHAKE, TimeoutError(), False).verdict is Verdict.INCONCLUSIVE
    alert = ssl.SSLError(1, "tlsv13 alert certificate required")
    alert.reason = "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    refused = diagnose(TLS_HANDSHAKE, alert, handshake_done=True)
    assert refused.verdict is Verdict.CERTIFICATE_REFUSED
    assert not refused.final, "a refused certificate is final only for a claim: the caller decides"
    assert diagnose(TLS_HANDSHAKE, None, True).verdict is Verdict.CERTIFICATE_REFUSED
    assert diagnose(TLS_HANDSHAKE, TimeoutError(), True) == ProbeResult(Verdict.TLS_OK)


# ---------------------------------------------------------------------------------------------- real servers


class _Servers:
    def __init__(self, tmp: Path) -> None:
        self.ca = make_pair("Endpoint Root CA")
        server = make_pair("localhost", issuer=self.ca)
        self.ca_path = tmp / "ca.pem"
        self.ca_path.write_bytes(self.ca.cert_pem)
        self.server_cert = tmp / "server.pem"
        self.server_cert.write_bytes(server.cert_pem)
        self.server_key = write_private(tmp / "server.key", server.key_pem)
        self.client_ca = make_pair("Device CA")
        self.client_ca_path = tmp / "device-ca.pem"
        self.client_ca_path.write_bytes(self.client_ca.cert_pem)


def _serve(handle: Callable[[socket.socket], None]) -> tuple[int, Callable[[], None]]:
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                handle(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def close() -> None:
        stop.set()
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not, on Linux)
        listener.close()
        thread.join(5)

    return listener.getsockname()[1], close


@pytest.fixture
def servers(tmp_path: Path) -> _Servers:
    return _Servers(tmp_path)


@pytest.fixture
def tls_server(servers: _Servers) -> Iterator[int]:
    """A TLS 1.3 server with mutual TLS trusting only the device CA; it waits for the client to speak."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(servers.server_cert, servers.server_key)
    context.load_verify_locations(servers.client_ca_path)
    context.verify_mode = ssl.CERT_REQUIRED

    def handle(conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            return

    port, close = _serve(handle)
    yield port
    close()


def test_probe_against_real_servers(servers: _Servers, tls_server: int, tmp_path: Path) -> None:
    device = make_pair("hub", issuer=servers.client_ca)
    stranger = make_pair("stranger")
    ca = str(servers.ca_path)
    accepted = probe("localhost", tls_server, ca, device.cert_pem, device.key_pem, timeout=3)
    assert accepted.verdict is Verdict.TLS_OK
    refused = probe("localhost", tls_server, ca, stranger.cert_pem, stranger.key_pem, timeout=3)
    assert refused.verdict is Verdict.CERTIFICATE_REFUSED
    other = tmp_path / "other.pem"
    other.write_bytes(make_pair("Other CA").cert_pem)
    untrusted = probe("localhost", tls_server, str(other), device.cert_pem, device.key_pem, timeout=3)
    assert untrusted.verdict is Verdict.UNTRUSTED
    assert (
        probe("127.0.0.1", tls_server, ca, device.cert_pem, device.key_pem, 3).verdict is Verdict.WRONG_HOST
    )


def test_probe_against_an_http_server_and_a_closed_port(servers: _Servers) -> None:
    class Quiet(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    http = HTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    device = make_pair("hub", issuer=servers.client_ca)
    try:
        result = probe("127.0.0.1", http.server_port, None, device.cert_pem, device.key_pem, timeout=3)
    finally:
        http.shutdown()
        http.server_close()
    assert result == ProbeResult(Verdict.NOT_TLS, "it answered with HTTP")
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    nothing = probe("127.0.0.1", port, None, device.cert_pem, device.key_pem, timeout=3)
    assert nothing.verdict is Verdict.INCONCLUSIVE, "nothing listens: awscrt's own message says so"
