"""A diagnostic TLS handshake with Python's `ssl`, run only after an awscrt connection attempt failed or hung.

awscrt (s2n) says little when a TLS connection goes wrong: a handshake the hub refuses (the endpoint's
certificate does not chain to `iot_root_ca_path`) is reported only once the server closes, which a server
may never do, and a server that answers the ClientHello with HTTP, or closes, looks the same as one that
refused the client certificate. This probe repeats the handshake where every step can be seen: the first
bytes the endpoint sent, the verification of its chain against the same trust store, and whether it
then refuses the client certificate. It never sends an MQTT packet and never disables verification.

`probe` is pure network I/O with a deadline (a few seconds); `diagnose` (pure) turns the bytes and
errors of a handshake into a `Verdict`.
"""

from __future__ import annotations

import contextlib
import enum
import os
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass

PROBE_TIMEOUT = 4.0  # a handshake takes milliseconds; this covers a slow link, not a silent server
# After the handshake, how long to wait for the server to refuse the client certificate: TLS 1.3 servers
# verify it after the client finished, and send their alert then. An MQTT server never speaks first.
REFUSAL_WAIT = 1.0
_TLS_RECORD_TYPES = {0x14, 0x15, 0x16, 0x17}  # change_cipher_spec, alert, handshake, application_data


class Verdict(enum.Enum):
    UNTRUSTED = "the endpoint's certificate does not chain to the configured CA"
    WRONG_HOST = "the endpoint's certificate does not name its host"
    NOT_TLS = "the endpoint does not speak TLS"
    CERTIFICATE_REFUSED = "the endpoint refused the client certificate"
    TLS_OK = "TLS works with this certificate"
    INCONCLUSIVE = "no TLS answer in time"


@dataclass(frozen=True)
class ProbeResult:
    verdict: Verdict
    detail: str = ""  # what was seen: the verification error, the first bytes' kind, the alert

    @property
    def final(self) -> bool:
        """True when another attempt cannot change the outcome (the CA, host or port must be fixed)."""
        return self.verdict in (Verdict.UNTRUSTED, Verdict.WRONG_HOST, Verdict.NOT_TLS)


def describe_first_bytes(first: bytes) -> str | None:
    """What a non-TLS answer looks like, or None when `first` starts like a TLS record (pure)."""
    if not first or first[0] in _TLS_RECORD_TYPES:
        return None
    if first.startswith(b"HTTP/") or first.lower().startswith((b"<!doctype html", b"<html")):
        return "it answered with HTTP"
    if first.startswith((b"SSH-", b"220 ", b"* OK")):
        return "it answered with a text protocol banner"
    return "it answered with bytes that are not TLS"


def diagnose(first: bytes, error: BaseException | None, handshake_done: bool) -> ProbeResult:
    """The verdict for a handshake that sent `first` and ended with `error` (None: no error) (pure)."""
    not_tls = describe_first_bytes(first)
    if not_tls is not None:
        return ProbeResult(Verdict.NOT_TLS, not_tls)
    if isinstance(error, ssl.SSLCertVerificationError):
        if error.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
            return ProbeResult(Verdict.WRONG_HOST, error.verify_message)
        return ProbeResult(Verdict.UNTRUSTED, error.verify_message)
    if not first:
        if isinstance(error, TimeoutError):
            return ProbeResult(Verdict.INCONCLUSIVE, "no answer to the TLS ClientHello")
        if isinstance(error, ssl.SSLEOFError | ConnectionResetError) or error is None:
            return ProbeResult(Verdict.NOT_TLS, "it closed the connection at the TLS ClientHello")
        return ProbeResult(Verdict.INCONCLUSIVE, _brief(error))
    if isinstance(error, TimeoutError):
        # after the handshake: nothing refused our certificate (an MQTT server waits for CONNECT)
        return ProbeResult(Verdict.TLS_OK if handshake_done else Verdict.INCONCLUSIVE, "")
    if isinstance(error, ssl.SSLError) and not handshake_done and "ALERT" not in (error.reason or "").upper():
        return ProbeResult(Verdict.NOT_TLS, _brief(error))
    if error is None or isinstance(error, ssl.SSLError | ConnectionResetError):
        # The server's chain was verified before it sent this alert or closed: it refused ours.
        what = _brief(error) if error is not None else "it closed the connection after the certificates"
        return ProbeResult(Verdict.CERTIFICATE_REFUSED, what)
    return ProbeResult(Verdict.INCONCLUSIVE, _brief(error))


def _brief(error: BaseException) -> str:
    reason = getattr(error, "reason", None)
    return str(reason) if reason else type(error).__name__


@contextlib.contextmanager
def _client_certificate(certificate_pem: bytes, private_key_pem: bytes) -> Iterator[tuple[str, str] | None]:
    """The pair as paths `ssl` can load, held in anonymous memory (never on disk); None where unavailable."""
    if not hasattr(os, "memfd_create"):
        yield None
        return
    cert_fd = os.memfd_create("probe-cert", os.MFD_CLOEXEC)
    key_fd = os.memfd_create("probe-key", os.MFD_CLOEXEC)
    try:
        os.write(cert_fd, certificate_pem)
        os.write(key_fd, private_key_pem)
        yield f"/proc/self/fd/{cert_fd}", f"/proc/self/fd/{key_fd}"
    finally:
        os.close(cert_fd)
        os.close(key_fd)


def _context(root_ca_path: str | None, certificate_pem: bytes, private_key_pem: bytes) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=root_ca_path)  # verifies the chain and the host name
    with _client_certificate(certificate_pem, private_key_pem) as paths:
        if paths is not None:
            with contextlib.suppress(ssl.SSLError, OSError):  # then probe the server side only
                context.load_cert_chain(*paths)
    return context


def probe(
    host: str,
    port: int,
    root_ca_path: str | None,
    certificate_pem: bytes,
    private_key_pem: bytes,
    timeout: float = PROBE_TIMEOUT,
) -> ProbeResult:
    """One TLS handshake with the hub's trust store and certificate; never raises."""
    deadline = time.monotonic() + timeout
    try:
        context = _context(root_ca_path, certificate_pem, private_key_pem)
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        return ProbeResult(Verdict.INCONCLUSIVE, _brief(exc))
    with sock:
        return _handshake(sock, context, host, deadline)


def _handshake(sock: socket.socket, context: ssl.SSLContext, host: str, deadline: float) -> ProbeResult:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=host)
    first = b""
    done = False
    refusal_deadline = deadline
    while True:
        try:
            if not done:
                tls.do_handshake()
                done = True
                refusal_deadline = min(deadline, time.monotonic() + REFUSAL_WAIT)
            tls.read(1)  # post-handshake messages, or the server's refusal of our certificate
            return ProbeResult(Verdict.TLS_OK)
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLError, OSError) as exc:
            return diagnose(first, exc, done)
        try:
            if outgoing.pending:
                sock.sendall(outgoing.read())
            sock.settimeout(max(0.01, (refusal_deadline if done else deadline) - time.monotonic()))
            data = sock.recv(16384)
        except (TimeoutError, OSError) as exc:
            return diagnose(first, exc, done)
        first = first or data[:16]
        if not data:
            return diagnose(first, None, done)
        incoming.write(data)
