"""The certificate authority of iot-core-local.

Three key pairs live in one directory (0700, keys 0600):

- the root CA stands in for Amazon Root CA 1: clients trust `root-ca.pem`, and the server certificate
  (localhost, 127.0.0.1, ::1 and the names `serve --advertise` gives) chains to it;
- the issuing CA stands in for the CA with which AWS signs device certificates (CreateKeysAndCertificate,
  CreateCertificateFromCsr, provisioning claims). It is self-signed rather than signed by the root: a
  TLS server then trusts device certificates by loading `issuing-ca.pem` alone, exactly as AWS keeps its
  device CA apart from the server-side chain.

Everything is created on first use and loaded again on restart, so certificates issued before a restart
still verify after it.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iot_core_local.datadir import open_nofollow, read_nofollow, refuse_links, write_atomically
from iot_core_local.errors import InvalidRequest
from iot_core_local.keys import KeySource, OnDemandKeys

__all__ = [
    "DEVICE_CERT_NOT_AFTER",
    "CertificateAuthority",
    "certificate_id",
    "load_certificate",
    "load_csr",
]

log = logging.getLogger(__name__)

# AWS issues device certificates valid until the end of 2049 (the last date UTCTime can encode).
DEVICE_CERT_NOT_AFTER = datetime.datetime(2049, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)
DEVICE_CERT_SUBJECT = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "AWS IoT Certificate")])

_ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_MIN_RSA_BITS = 2048
_ROOT_LIFETIME = datetime.timedelta(days=3650)
_SERVER_LIFETIME = datetime.timedelta(days=825)  # the longest lifetime TLS clients accept
_SERVER_RENEW_BEFORE = datetime.timedelta(days=30)
# Backdating absorbs clock skew between this host and a device (or a container) checking notBefore.
_BACKDATE = datetime.timedelta(hours=1)

_CaKey = ec.EllipticCurvePrivateKey


def certificate_id(cert: x509.Certificate) -> str:
    """AWS's certificate id: the SHA-256 of the DER encoding, 64 lowercase hex digits."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _as_bytes(pem: str | bytes) -> bytes:
    return pem.encode("utf-8", "replace") if isinstance(pem, str) else pem


def load_certificate(pem: str | bytes) -> x509.Certificate:
    """Parse one PEM certificate (the first, if there are several); InvalidRequest if it does not parse."""
    try:
        return x509.load_pem_x509_certificate(_as_bytes(pem))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidRequest(f"The certificate does not parse as a PEM X.509 certificate: {exc}") from None


def load_csr(pem: str | bytes) -> x509.CertificateSigningRequest:
    """Parse and check a PEM CSR as AWS does: it parses, its signature holds, its key is strong."""
    try:
        csr = x509.load_pem_x509_csr(_as_bytes(pem))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidRequest(f"The certificate signing request does not parse as a PEM CSR: {exc}") from None
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidRequest(
            f"The public key of the certificate signing request is not supported: {exc}"
        ) from None
    _check_key_strength(key, "certificate signing request")
    try:
        signature_ok = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        signature_ok = False
    if not signature_ok:
        raise InvalidRequest("The signature of the certificate signing request is not valid")
    return csr


def _check_key_strength(key: object, what: str) -> None:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise InvalidRequest(
                f"The {what} has a weak key: RSA {key.key_size} bits (at least {_MIN_RSA_BITS} required)"
            )
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _ALLOWED_CURVES):
            raise InvalidRequest(
                f"The {what} uses the elliptic curve {key.curve.name}; "
                "only P-256, P-384 and P-521 are allowed"
            )
    else:
        raise InvalidRequest(
            f"The {what} has an unsupported key type {type(key).__name__}; use RSA (2048 bits or more) or "
            "ECDSA (P-256, P-384, P-521)"
        )


_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def server_alt_names(extra: Iterable[str] = ()) -> list[x509.GeneralName]:
    """The server certificate's subjectAltName entries: loopback, then `extra` (IP literals as IP
    addresses, anything else as a DNS name, as TLS clients match them), without repeats."""
    names: list[x509.GeneralName] = []
    for value in (*_LOOPBACK_NAMES, *extra):
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(value.strip("[]")))
        except ValueError:
            name = x509.DNSName(value.lower())
        if name not in names:
            names.append(name)
    return names


def _alt_names(cert: x509.Certificate) -> set[x509.GeneralName]:
    try:
        return set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return set()


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "iot-core-local"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret atomically: a 0600 temp file in the same directory, fsync, rename.

    The mode is set at creation, so the key is never readable by others, not even for an instant, and a
    crash leaves either the old file or the new one, never half a key. A symbolic link at `path` is
    refused (ServerError), never followed.
    """
    write_atomically(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    write_atomically(path, data, 0o644)


def _key_pem(key: _CaKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _same_key(cert: x509.Certificate, key: _CaKey) -> bool:
    return cert.public_key() == key.public_key()


class CertificateAuthority:
    """Root CA, server certificate and issuing CA, kept in `directory` (created 0700 if missing)."""

    def __init__(
        self,
        directory: Path,
        *,
        clock: Callable[[], float] = time.time,
        keys: KeySource | None = None,
        server_names: Iterable[str] = (),
    ) -> None:
        """`clock` (epoch seconds) dates every certificate and decides when the server certificate is
        renewed; tests pass one they advance. `keys` gives CreateKeysAndCertificate its RSA keys (a
        `keys.KeyPool` generates them ahead); by default each is generated when asked for.
        `server_names` (host names or IP addresses) are what devices on other machines reach the server by;
        the server certificate names them besides localhost, 127.0.0.1 and ::1."""
        self.directory = Path(directory)
        self.clock = clock
        self.server_names = server_alt_names(server_names)
        self.keys: KeySource = keys if keys is not None else OnDemandKeys()
        refuse_links([self.directory])
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # "No wider than" 0700: tighten a directory someone created more loosely, never fail on a tighter one.
        if self.directory.stat().st_mode & 0o077:
            self.directory.chmod(0o700)

        self.root_ca_path = self.directory / "root-ca.pem"
        self.root_key_path = self.directory / "root-ca.key"
        self.server_cert_path = self.directory / "server.pem"
        self.server_key_path = self.directory / "server.key"
        self.issuing_ca_path = self.directory / "issuing-ca.pem"
        self.issuing_key_path = self.directory / "issuing-ca.key"

        self.root_ca, self._root_key = self._load_or_create_ca(
            self.root_ca_path, self.root_key_path, "iot-core-local Root CA", _ROOT_LIFETIME
        )
        self.root_ca_pem = _cert_pem(self.root_ca).decode()
        # Device certificates are valid until 2049, so the CA that signs them must outlive them.
        issuing_lifetime = DEVICE_CERT_NOT_AFTER + datetime.timedelta(days=366) - self._now()
        self.issuing_ca, self._issuing_key = self._load_or_create_ca(
            self.issuing_ca_path, self.issuing_key_path, "iot-core-local Device CA", issuing_lifetime
        )
        self.issuing_ca_pem = _cert_pem(self.issuing_ca).decode()
        self.issuing_ca_id = certificate_id(self.issuing_ca)
        self._issuing_ski = x509.SubjectKeyIdentifier.from_public_key(self._issuing_key.public_key())
        self._issuing_aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._issuing_ski)
        self._ensure_server_cert()

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock(), datetime.UTC)

    # ---- creation and loading -------------------------------------------------------------------

    def _read_pair(self, cert_path: Path, key_path: Path) -> tuple[x509.Certificate, _CaKey] | None:
        refuse_links([cert_path, key_path])  # a link planted in the CA's folder is never followed
        if not (cert_path.exists() and key_path.exists()):
            return None
        fd = open_nofollow(key_path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as key_file:
            if os.fstat(fd).st_mode & 0o077:
                log.warning("tightening permissions of %s to 0600", key_path.name)
                os.fchmod(fd, 0o600)
            key_pem = key_file.read()
        try:
            cert = x509.load_pem_x509_certificate(read_nofollow(cert_path))
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            log.warning("%s or %s does not parse; creating a new pair", cert_path.name, key_path.name)
            return None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not _same_key(cert, key):
            log.warning("%s does not match %s; creating a new pair", cert_path.name, key_path.name)
            return None
        return cert, key

    def _load_or_create_ca(
        self, cert_path: Path, key_path: Path, common_name: str, lifetime: datetime.timedelta
    ) -> tuple[x509.Certificate, _CaKey]:
        pair = self._read_pair(cert_path, key_path)
        if pair is not None:
            return pair
        key = ec.generate_private_key(ec.SECP256R1())
        name = _name(common_name)
        now = self._now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        # Key first: a crash between the two writes leaves a key without a certificate, which the next
        # start replaces, never a certificate whose key is lost.
        _write_private(key_path, _key_pem(key))
        _write_public(cert_path, _cert_pem(cert))
        log.info("created %s (%s)", cert_path.name, common_name)
        return cert, key

    def _ensure_server_cert(self) -> None:
        """Keep `server.pem` if the root signed it and it is valid 30 more days; make a new one otherwise."""
        pair = self._read_pair(self.server_cert_path, self.server_key_path)
        if pair is not None:
            cert = pair[0]
            fresh = cert.not_valid_after_utc - self._now() > _SERVER_RENEW_BEFORE
            try:
                cert.verify_directly_issued_by(self.root_ca)
                signed_by_root = True
            except (ValueError, TypeError, InvalidSignature):
                signed_by_root = False
            if fresh and signed_by_root and _alt_names(cert) >= set(self.server_names):
                return
        key = ec.generate_private_key(ec.SECP256R1())
        now = self._now()
        root_ski = x509.SubjectKeyIdentifier.from_public_key(self._root_key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name("localhost"))
            .issuer_name(self.root_ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _SERVER_LIFETIME)
            .add_extension(x509.SubjectAlternativeName(self.server_names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski), critical=False
            )
            .sign(self._root_key, hashes.SHA256())
        )
        _write_private(self.server_key_path, _key_pem(key))
        _write_public(self.server_cert_path, _cert_pem(cert))
        log.info("created server certificate for %s", ", ".join(str(n.value) for n in self.server_names))

    # ---- issuing device certificates ------------------------------------------------------------

    def issue_certificate(
        self,
        public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
        *,
        not_after: datetime.datetime | None = None,
    ) -> x509.Certificate:
        """A device certificate for `public_key`, shaped like AWS's: CN "AWS IoT Certificate", valid to 2049.

        `not_after` shortens the validity (provisioning claims last minutes).
        """
        now = self._now()
        # Random 159-bit serials, as RFC 5280 suggests; AWS's are random too.
        serial = int.from_bytes(secrets.token_bytes(20), "big") >> 1
        return (
            x509.CertificateBuilder()
            .subject_name(DEVICE_CERT_SUBJECT)
            .issuer_name(self.issuing_ca.subject)
            .public_key(public_key)
            .serial_number(serial or 1)
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(not_after or DEVICE_CERT_NOT_AFTER)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._issuing_aki, critical=False)
            .sign(self._issuing_key, hashes.SHA256())
        )

    def sign_csr(self, csr: x509.CertificateSigningRequest) -> x509.Certificate:
        """A new device certificate for the CSR's public key (checked by `load_csr`).

        AWS ignores the CSR's subject and extensions and so does this.
        """
        key = csr.public_key()
        _check_key_strength(key, "certificate signing request")
        assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)  # narrowed by the check above
        return self.issue_certificate(key)

    def create_keys_and_certificate(self, *, not_after: datetime.datetime | None = None) -> tuple[str, str]:
        """(certificate PEM, private key PEM) with a fresh RSA 2048 key, as AWS's CreateKeysAndCertificate.

        The key comes from `keys`, which hands each key out once.
        """
        key = self.keys.take()
        cert = self.issue_certificate(key.public_key(), not_after=not_after)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,  # "-----BEGIN RSA PRIVATE KEY-----", like AWS
            serialization.NoEncryption(),
        )
        return _cert_pem(cert).decode(), key_pem.decode()
