"""CertHandler: reads and checks credentials, writes the permanent pair with safe modes.

Reading goes through a CredentialStore. `FileCredentialStore` (entry point `file` in the group
`hub_onboarding.secure_storage`) reads PEM files; a claim path of `SECURE_STORAGE` selects another store
registered in that group (a TPM, a secure element...), by the ro key `secure_storage_handler` or, when
exactly one non-file store is installed, that one. The `pkcs11` store (hub_onboarding.pkcs11) is handed
in by whoever knows the token (`pkcs11.cert_handler(token)`): a `pkcs11:` URI in a path key, or
SECURE_STORAGE with a token configured, reads through it (this module never imports it). A store
yields a certificate plus what awscrt connects with and what signs a CSR: a PEM pair (checked here), or
`Credentials` whose `token_key` names a key inside a token (checked by the store, by a signature).

Checks (each failure is a CredentialError that names the config key and the path):
- a key file must be a regular file, not a symlink, with no group/other permission bits
  ("no wider than 0600": 0400 passes; exact-match checks caused crash loops in aws-iot-device-client);
- the key must not be encrypted and must belong to the certificate (same public key);
- a claim certificate must be within its validity period.

Writing goes through `_files`: the folder is made 0700 and the key 0600 from their first byte whatever
the umask, atomically and durably. An existing folder is never narrowed (it may be shared, e.g. the
config's own folder): one open to others is refused.
"""

from __future__ import annotations

import datetime
import enum
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from hub_onboarding import _files
from hub_onboarding.config import SECURE_STORAGE, is_pkcs11_uri
from hub_onboarding.errors import ConfigError, CredentialError

if TYPE_CHECKING:
    from cryptography import x509

    from hub_onboarding.pkcs11 import Pkcs11CredentialStore, TokenKey

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "hub_onboarding.secure_storage"
FILE_STORE_NAME = "file"
PKCS11_STORE_NAME = "pkcs11"
PERMANENT_CERT_NAME = "certificate.pem.crt"
PERMANENT_KEY_NAME = "private.pem.key"
KEY_MODE = _files.PRIVATE_FILE_MODE
CERT_MODE = 0o644
_MAX_PEM_BYTES = 64 * 1024  # a certificate or key file larger than this is not a PEM we want


class CertType(enum.StrEnum):
    CLAIM = "claim"
    DHA = "DHA"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class Credentials:
    """A certificate and its private key: PEM, or (`token_key`) a key object inside a PKCS#11 token, when
    `private_key_pem` is empty. The key never appears in repr()."""

    certificate_pem: bytes
    private_key_pem: bytes = field(repr=False)
    certificate_id: str = ""  # SHA-256 of the DER, as AWS IoT names certificates
    token_key: TokenKey | None = None

    @property
    def key_reference(self) -> str:
        """How the key is named to a person: its PKCS#11 URI, or "PEM" (never the key)."""
        return self.token_key.uri if self.token_key is not None else "PEM"


@runtime_checkable
class CredentialStore(Protocol):
    """Where credentials come from. `cert_ref`/`key_ref` are the config values (paths or SECURE_STORAGE)."""

    def read_credentials(
        self, cert_type: CertType, cert_ref: str, key_ref: str
    ) -> tuple[bytes, bytes] | Credentials:
        """(certificate PEM, private key PEM), which CertHandler checks, or Credentials the store checked
        itself (a key it holds by reference); raise CredentialError when they cannot be read."""
        ...


def _read_pem_file(path: str, label: str, *, is_key: bool) -> bytes:
    p = Path(path)
    part = "private key" if is_key else "certificate"  # which setting of the pair to name
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        raise CredentialError(f"{label}: {path} does not exist", part=part) from None
    except OSError as exc:
        raise CredentialError(
            f"{label}: {path} cannot be examined ({exc.strerror or exc})", part=part
        ) from None
    if stat.S_ISLNK(st.st_mode) and is_key:
        # A symlinked key can be swapped for another file by whoever owns the link's folder.
        raise CredentialError(f"{label}: {path} is a symbolic link; put the key file itself there", part=part)
    if stat.S_ISLNK(st.st_mode):
        st = os.stat(p)
    if stat.S_ISDIR(st.st_mode):
        raise CredentialError(f"{label}: {path} is a folder, not a PEM file", part=part)
    if not stat.S_ISREG(st.st_mode):
        raise CredentialError(f"{label}: {path} is not a regular file", part=part)
    if is_key and st.st_mode & 0o077:
        raise CredentialError(
            f"{label}: {path} has mode {stat.S_IMODE(st.st_mode):04o}, readable or writable by other users; "
            f"run 'chmod 600 {path}' (0600 or narrower is accepted)",
            part=part,
        )
    if st.st_size > _MAX_PEM_BYTES:
        raise CredentialError(f"{label}: {path} is {st.st_size} bytes, too large for a PEM file", part=part)
    try:
        # A key replaced by a symlink since the lstat above is refused, not read through.
        return _files.read_at_most(p, _MAX_PEM_BYTES + 1, follow_symlinks=not is_key)
    except PermissionError:
        raise CredentialError(f"{label}: {path} is not readable by this user", part=part) from None
    except OSError as exc:
        raise CredentialError(f"{label}: {path} cannot be read ({exc.strerror or exc})", part=part) from None


def read_certificate_file(path: str, label: str) -> bytes:
    """A certificate PEM file, with the same checks as a pair's certificate."""
    return _read_pem_file(path, label, is_key=False)


class FileCredentialStore:
    """PEM files on the local filesystem (the default store)."""

    def read_credentials(self, cert_type: CertType, cert_ref: str, key_ref: str) -> tuple[bytes, bytes]:
        if SECURE_STORAGE in (cert_ref, key_ref):
            raise CredentialError(
                f"the file credential store cannot read {SECURE_STORAGE} {cert_type} "
                "credentials; install a secure-storage handler"
            )
        cert = _read_pem_file(cert_ref, f"{cert_type} certificate", is_key=False)
        key = _read_pem_file(key_ref, f"{cert_type} private key", is_key=True)
        return cert, key


def load_store(name: str | None) -> CredentialStore:
    """The secure-storage handler registered under `name` (or the only non-file, non-pkcs11 one when None;
    the pkcs11 store needs the token's settings, so CertHandler is given it instead)."""
    # Imported here: importlib.metadata costs ~10 ms at start-up and only SECURE_STORAGE hubs need it.
    from importlib import metadata

    eps = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if name is None:
        candidates = sorted(n for n in eps if n not in (FILE_STORE_NAME, PKCS11_STORE_NAME))
        if len(candidates) != 1:
            found = ", ".join(candidates) or "none"
            raise ConfigError(
                f"ro.secure_storage_handler: claim credentials are {SECURE_STORAGE} but the handler to use "
                f"is not set (installed handlers: {found}); install one in entry-point group "
                f"{ENTRY_POINT_GROUP} and name it in ro.secure_storage_handler",
                key="ro.secure_storage_handler",
            )
        name = candidates[0]
    if name not in eps:
        raise ConfigError(
            f"ro.secure_storage_handler: no handler named {name!r} is installed in entry-point "
            f"group {ENTRY_POINT_GROUP}",
            key="ro.secure_storage_handler",
        )
    try:
        factory = eps[name].load()
        store = factory()
    except Exception as exc:
        raise ConfigError(
            f"ro.secure_storage_handler: handler {name!r} failed to load: {exc}",
            key="ro.secure_storage_handler",
        ) from None
    if not isinstance(store, CredentialStore):
        raise ConfigError(
            f"ro.secure_storage_handler: handler {name!r} has no read_credentials method",
            key="ro.secure_storage_handler",
        )
    return store


# ------------------------------------------------------------------------------------------ parsing


def load_certificate(pem: bytes, label: str) -> x509.Certificate:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise CredentialError(f"{label}: not a PEM X.509 certificate", part="certificate") from None


def load_private_key(pem: bytes, label: str) -> object:
    from cryptography.hazmat.primitives import serialization

    try:
        # The RSA consistency check costs ~35 ms per 2048-bit key on a small CPU. We only derive the
        # public key here, to compare it with the certificate's; the TLS stack loads the key itself.
        return serialization.load_pem_private_key(pem, password=None, unsafe_skip_rsa_key_validation=True)
    except TypeError:
        raise CredentialError(
            f"{label}: the key is encrypted (has a passphrase); the hub needs an "
            "unencrypted key protected by file permissions or secure storage",
            part="private key",
        ) from None
    except (ValueError, Exception):  # cryptography raises ValueError or UnsupportedAlgorithm
        raise CredentialError(
            f"{label}: not a PEM private key this hub can use", part="private key"
        ) from None


def certificate_id(cert: x509.Certificate) -> str:
    """AWS IoT's certificate id: SHA-256 of the DER encoding, 64 lowercase hex."""
    import hashlib

    from cryptography.hazmat.primitives import serialization

    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def common_name(cert: x509.Certificate) -> str | None:
    from cryptography.x509.oid import NameOID

    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def check_pair(
    cert_pem: bytes, key_pem: bytes, label: str, *, check_validity: bool, now: datetime.datetime | None = None
) -> Credentials:
    """Parse both, check they belong together (and the validity period when asked); return Credentials."""
    from cryptography.hazmat.primitives import serialization

    cert = load_certificate(cert_pem, f"{label} certificate")
    key = load_private_key(key_pem, f"{label} private key")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    pub = key.public_key()  # type: ignore[attr-defined]
    if pub.public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise CredentialError(
            f"{label}: the private key does not belong to the certificate "
            "(their public keys differ); install the matching pair"
        )
    if check_validity:
        check_validity_period(cert, label, now)
    return Credentials(cert_pem, key_pem, certificate_id(cert))


def check_validity_period(cert: x509.Certificate, label: str, now: datetime.datetime | None = None) -> None:
    """CredentialError when `now` is outside the certificate's validity period."""
    now = now or datetime.datetime.now(datetime.UTC)
    if now < cert.not_valid_before_utc:
        raise CredentialError(
            f"{label} certificate is not valid yet (valid from "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC); check the hub's clock",
            part="certificate",
        )
    if now > cert.not_valid_after_utc:
        raise CredentialError(
            f"{label} certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
            "install a current one",
            part="certificate",
        )


# ------------------------------------------------------------------------------------------ handler


class CertHandler:
    """Reads claim, DHA and permanent credentials and writes the permanent pair (the SDK's CertHandler)."""

    def __init__(
        self, secure_storage_handler: str | None = None, token_store: Pkcs11CredentialStore | None = None
    ) -> None:
        self._secure_storage_handler = secure_storage_handler
        self._file_store = FileCredentialStore()
        # The PKCS#11 token's store, when the config sets a token: it reads pkcs11: URIs and
        # SECURE_STORAGE (unless another handler is named), and keeps the permanent key.
        self.token_store = token_store

    def _store_for(self, cert_ref: str, key_ref: str) -> CredentialStore:
        name = self._secure_storage_handler
        if is_pkcs11_uri(key_ref) or is_pkcs11_uri(cert_ref):
            return self._token()
        if SECURE_STORAGE in (cert_ref, key_ref):
            if name == PKCS11_STORE_NAME or (name is None and self.token_store is not None):
                return self._token()
            return load_store(name)
        return self._file_store

    def _token(self) -> Pkcs11CredentialStore:
        if self.token_store is None:
            raise CredentialError(
                "the key is in a PKCS#11 token but no token is set: set ro.pkcs11_module_path, "
                "ro.pkcs11_token_label and ro.pkcs11_pin_path",
                "ro.pkcs11_token_label",
            )
        return self.token_store

    def read_cert_and_private_key(self, cert_type: CertType, cert_ref: str, key_ref: str) -> Credentials:
        """Read and check a pair; claim certificates must also be within their validity period."""
        read = self._store_for(cert_ref, key_ref).read_credentials(cert_type, cert_ref, key_ref)
        if isinstance(read, Credentials):
            return read
        cert_pem, key_pem = read
        return check_pair(cert_pem, key_pem, str(cert_type), check_validity=cert_type is CertType.CLAIM)

    def write_file(self, path: Path, data: bytes, mode: int) -> None:
        """Write one file atomically, `mode` from its first byte, in a private folder (made if missing)."""
        _files.write_private_file(path, data, mode)

    def write_permanent_cert_and_private_key(
        self, cert_pem: bytes, key_pem: bytes, cert_path: Path, key_path: Path
    ) -> None:
        """Store the permanent pair: key first (0600), then certificate, both atomic and durable."""
        self.write_file(key_path, key_pem, KEY_MODE)
        self.write_permanent_cert(cert_pem, cert_path)

    def write_permanent_cert(self, cert_pem: bytes, cert_path: Path) -> None:
        """Store the permanent certificate alone (its key is in the token), atomic and durable."""
        self.write_file(cert_path, cert_pem, CERT_MODE)

    # With a token, the permanent key is made or stored where it will live, under the hub's label.

    def make_permanent_key_and_csr(self, label: str, common_name_value: str) -> tuple[TokenKey, bytes]:
        """The permanent pair made in the token under `label` (a whole pair left there is reused) and a
        CSR for it signed there: (the key's reference, CSR PEM). The key never leaves the token."""
        store = self._token()
        key, spki = store.key_for_csr(label)
        return key, store.sign_csr(key, spki, common_name_value)

    def write_permanent_key_to_token(self, label: str, key_pem: bytes) -> TokenKey:
        """Import a service-made key into the token under `label` (sensitive, non-extractable), alone."""
        return self._token().import_private_key(label, key_pem)


def generate_key_and_csr(common_name_value: str) -> tuple[bytes, bytes]:
    """An EC P-256 key made on the hub and a CSR for it: (key PEM, CSR PEM). The key never leaves."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name_value)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)
