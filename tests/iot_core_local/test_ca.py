"""The certificate authority: files, permissions, restart, certificate shapes and CSR checks."""

from __future__ import annotations

import datetime
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from iot_core_local.ca import (
    DEVICE_CERT_NOT_AFTER,
    CertificateAuthority,
    certificate_id,
    load_certificate,
    load_csr,
)
from iot_core_local.errors import InvalidRequest, ServerError


def _csr(key: object, sign_with: object | None = None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hub")])
    )
    signer = sign_with or key
    algorithm = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = builder.sign(signer, algorithm)  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("ca-test") / "ca")


def test_files_and_permissions(ca: CertificateAuthority) -> None:
    assert stat.S_IMODE(ca.directory.stat().st_mode) == 0o700
    for name in ("root-ca.key", "server.key", "issuing-ca.key"):
        assert stat.S_IMODE((ca.directory / name).stat().st_mode) == 0o600
    for name in ("root-ca.pem", "server.pem", "issuing-ca.pem"):
        assert (ca.directory / name).is_file()
    assert not [p for p in ca.directory.iterdir() if p.name.endswith(".tmp")]


def test_restart_loads_the_same_authority(ca: CertificateAuthority) -> None:
    again = CertificateAuthority(ca.directory)
    assert again.issuing_ca_id == ca.issuing_ca_id
    assert again.root_ca_path.read_bytes() == ca.root_ca_path.read_bytes()
    assert again.server_cert_path.read_bytes() == ca.server_cert_path.read_bytes()


def test_loose_permissions_are_tightened(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    CertificateAuthority(directory)
    directory.chmod(0o755)
    (directory / "root-ca.key").chmod(0o644)
    CertificateAuthority(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "root-ca.key").stat().st_mode) == 0o600


def test_server_certificate_chains_to_root_for_localhost(ca: CertificateAuthority) -> None:
    server = load_certificate(ca.server_cert_path.read_bytes())
    server.verify_directly_issued_by(load_certificate(ca.root_ca_path.read_bytes()))
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    # The standard library accepts the pair as a TLS server identity and the root as a trust anchor.
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(ca.server_cert_path, ca.server_key_path)
    client_ctx = ssl.create_default_context(cafile=str(ca.root_ca_path))
    assert client_ctx.cert_store_stats()["x509_ca"] == 1


def test_sign_csr_makes_an_aws_shaped_certificate(ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.sign_csr(load_csr(_csr(key)))
    cert.verify_directly_issued_by(ca.issuing_ca)
    assert cert.public_key() == key.public_key()
    assert cert.subject.rfc4514_string() == "CN=AWS IoT Certificate"
    assert cert.not_valid_after_utc == DEVICE_CERT_NOT_AFTER
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.sign_csr(load_csr(_csr(key))).serial_number != cert.serial_number
    assert len(certificate_id(cert)) == 64
    assert certificate_id(cert) == certificate_id(
        load_certificate(cert.public_bytes(serialization.Encoding.PEM))
    )


def test_create_keys_and_certificate_is_rsa_2048(ca: CertificateAuthority) -> None:
    cert_pem, key_pem = ca.create_keys_and_certificate()
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 2048
    cert = load_certificate(cert_pem)
    assert cert.public_key() == key.public_key()
    short = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)
    claim = load_certificate(ca.create_keys_and_certificate(not_after=short)[0])
    assert claim.not_valid_after_utc <= short


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(rsa.generate_private_key(65537, 2048), id="rsa2048"),
        pytest.param(ec.generate_private_key(ec.SECP384R1()), id="p384"),
        pytest.param(ec.generate_private_key(ec.SECP521R1()), id="p521"),
    ],
)
def test_strong_keys_are_accepted(key: object) -> None:
    assert load_csr(_csr(key).decode()).is_signature_valid


@pytest.mark.parametrize(
    ("key", "words"),
    [
        pytest.param(rsa.generate_private_key(65537, 1024), "RSA 1024", id="rsa1024"),
        pytest.param(ec.generate_private_key(ec.SECP256K1()), "secp256k1", id="secp256k1"),
        pytest.param(ed25519.Ed25519PrivateKey.generate(), "unsupported key type", id="ed25519"),
        pytest.param(dsa.generate_private_key(2048), "unsupported key type", id="dsa"),
    ],
)
def test_weak_or_unsupported_keys_are_refused(key: object, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        load_csr(_csr(key))


def test_csr_with_a_bad_signature_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    der = bytearray(x509.load_pem_x509_csr(_csr(key)).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature
    pem = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InvalidRequest, match="signature"):
        load_csr(pem)


@pytest.mark.parametrize(
    "text", ["", "garbage", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"]
)
def test_unparsable_inputs_say_so(text: str) -> None:
    with pytest.raises(InvalidRequest, match="does not parse"):
        load_csr(text)
    with pytest.raises(InvalidRequest, match="does not parse"):
        load_certificate(text)


def test_certificates_are_dated_by_the_clock(tmp_path: Path) -> None:
    start = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    ca = CertificateAuthority(tmp_path / "ca", clock=start.timestamp)
    cert_pem, _ = ca.create_keys_and_certificate()
    backdated = start - datetime.timedelta(hours=1)  # absorbs a device's clock skew
    assert load_certificate(cert_pem).not_valid_before_utc == backdated
    assert load_certificate(ca.server_cert_path.read_bytes()).not_valid_before_utc == backdated


def test_server_certificate_is_renewed_a_month_before_it_expires(tmp_path: Path) -> None:
    start = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    ca = CertificateAuthority(tmp_path / "ca", clock=start.timestamp)
    server_pem = ca.server_cert_path.read_bytes()
    expires = load_certificate(server_pem).not_valid_after_utc

    still_fresh = expires - datetime.timedelta(days=31)
    CertificateAuthority(ca.directory, clock=still_fresh.timestamp)
    assert ca.server_cert_path.read_bytes() == server_pem

    due = expires - datetime.timedelta(days=29)
    renewed = CertificateAuthority(ca.directory, clock=due.timestamp)
    new_server = load_certificate(renewed.server_cert_path.read_bytes())
    assert new_server.not_valid_after_utc > expires
    new_server.verify_directly_issued_by(load_certificate(ca.root_ca_path.read_bytes()))
    assert renewed.root_ca_path.read_bytes() == ca.root_ca_path.read_bytes(), "the root is kept"


@pytest.mark.parametrize("name", ["root-ca.key", "issuing-ca.pem"])
def test_a_symlink_planted_among_the_ca_files_is_refused_and_not_followed(tmp_path: Path, name: str) -> None:
    directory = tmp_path / "ca"
    CertificateAuthority(directory)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    victim.chmod(0o644)
    (directory / name).unlink()
    (directory / name).symlink_to(victim)
    with pytest.raises(ServerError, match=f"{name} is a symbolic link"):
        CertificateAuthority(directory)
    assert victim.read_bytes() == b"precious"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644  # not "tightened" through the link


def test_a_ca_folder_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "ca").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ServerError, match="ca is a symbolic link"):
        CertificateAuthority(tmp_path / "ca")
    assert list((tmp_path / "elsewhere").iterdir()) == []
