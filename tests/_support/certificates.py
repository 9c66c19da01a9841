"""Test certificates made with cryptography, private files, and what the cloud says about certificates."""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class Pair:
    cert_pem: bytes
    key_pem: bytes
    key: ec.EllipticCurvePrivateKey


def make_pair(
    cn: str = "hub",
    *,
    days_valid: int = 30,
    starts_in_days: int = -1,
    issuer: Pair | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
    password: bytes | None = None,
) -> Pair:
    """An EC P-256 certificate and key: self-signed (a CA) unless `issuer` signs it."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer_name = x509.load_pem_x509_certificate(issuer.cert_pem).subject if issuer else subject
    signer = issuer.key if issuer else key
    start = now + datetime.timedelta(days=starts_in_days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days_valid))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    cert = builder.sign(signer, hashes.SHA256())
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    return Pair(cert.public_bytes(serialization.Encoding.PEM), key_pem, key)


def write_private(path: Path, data: bytes, mode: int = 0o600) -> Path:
    """Write `data` to `path` with `mode` from its first byte (and after, whatever the umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)
    return path


def pem_certificate_id(pem: bytes) -> str:
    """AWS's certificate id: the SHA-256 of the DER."""
    cert = x509.load_pem_x509_certificate(pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def key_matches_certificate(cert_pem: bytes, key_pem: bytes) -> bool:
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return bool(key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki))


def certificate_ids(iot: Any) -> set[str]:
    """Every certificate the cloud knows (boto3 list_certificates, all pages)."""
    ids: set[str] = set()
    for page in iot.get_paginator("list_certificates").paginate(pageSize=250):
        ids.update(c["certificateId"] for c in page["certificates"])
    return ids


def self_signed_ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA certificate (EC P-256, valid from yesterday for 10 days) and its key."""
    pair = make_pair(name, days_valid=11, starts_in_days=-1)
    return x509.load_pem_x509_certificate(pair.cert_pem), pair.key


def pem_of(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def make_rsa_pair(cn: str, bits: int) -> tuple[bytes, bytes]:
    """A self-signed RSA certificate and its key (PEM, PKCS#8), e.g. one too small for AWS IoT Core."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(65537, bits)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def thing_certificates(iot: Any, thing: str) -> dict[str, str]:
    """Certificate id -> status of every certificate attached to `thing` (through a boto3 IoT client)."""
    return {
        arn.rsplit("/", 1)[1]: iot.describe_certificate(certificateId=arn.rsplit("/", 1)[1])[
            "certificateDescription"
        ]["status"]
        for arn in iot.list_thing_principals(thingName=thing)["principals"]
    }
