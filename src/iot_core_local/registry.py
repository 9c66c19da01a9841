"""The registry: everything AWS IoT would remember, in one SQLite file.

One connection, shared by the gateway's event loop and the control plane's HTTP threads, behind an RLock.
WAL with synchronous=NORMAL: a commit costs no fsync, the file stays consistent after a crash, and at worst
the last few commits before a power cut are lost, which a local stand-in can afford for the provisioning
rate it must sustain.

Every method raises `errors.ServiceError` subclasses with the type and wording AWS would use, so the
control plane and the MQTT provisioning API can pass them through unchanged.
"""

# S608: the f-strings below only splice this module's constant column lists; values are always bound.
# ruff: noqa: S608

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import logging
import re
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from iot_core_local.ca import certificate_id as _certificate_id
from iot_core_local.ca import load_certificate
from iot_core_local.errors import (
    CertificateState,
    DeleteConflict,
    InvalidRequest,
    ResourceAlreadyExists,
    ResourceNotFound,
    VersionConflict,
    VersionsLimitExceeded,
)
from iot_core_local.model import (
    DELETED,
    CACertificate,
    CaStatus,
    Certificate,
    CertificateMode,
    CertificateStatus,
    Policy,
    PolicyVersion,
    ProvisioningTemplate,
    TemplateType,
    Thing,
    TokenGrant,
)
from iot_core_local.policy import provisioning_claim_document

__all__ = ["ACCOUNT_ID", "Registry", "certificate_id_from_arn"]

log = logging.getLogger(__name__)

ACCOUNT_ID = "123456789012"
MAX_POLICY_VERSIONS = 5  # AWS keeps at most five versions of a policy

_CERT_ARN = re.compile(r"arn:aws[a-z-]*:iot:[a-z0-9-]*:\d{12}:cert/([0-9a-f]{64})")
_THING_GROUP_ARN = re.compile(r"arn:aws[a-z-]*:iot:[a-z0-9-]*:\d{12}:thinggroup/[a-zA-Z0-9:_-]{1,128}")
_THING_NAME = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
_POLICY_NAME = re.compile(r"[\w+=,.@-]{1,128}")
_TEMPLATE_NAME = re.compile(r"[0-9A-Za-z_-]{1,36}")
# Thing attributes as AWS IoT documents them: names up to 128 characters, values up to 800 (botocore's
# model gives the patterns), at most 3 attributes on a thing without a thing type and 50 with one
# (https://docs.aws.amazon.com/iot/latest/developerguide/limits-iot.html, "Thing Limits").
_ATTRIBUTE_NAME = re.compile(r"[a-zA-Z0-9_.,@/:#-]{1,128}")
_ATTRIBUTE_VALUE = re.compile(r"[a-zA-Z0-9_.,@/:#=\[\]-]{0,800}")
MAX_ATTRIBUTES_WITHOUT_TYPE = 3
MAX_ATTRIBUTES_WITH_TYPE = 50
_Choice = TypeVar("_Choice", bound=enum.StrEnum)
_TOKEN_HASH_KEEP = 86400.0  # expired token hashes are purged a day later; until then they say "expired"


def certificate_id_from_arn(arn: str) -> str | None:
    """The certificate id in a certificate ARN, or None if `arn` is not one."""
    match = _CERT_ARN.fullmatch(arn)
    return match.group(1) if match else None


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS certificates (
    id TEXT PRIMARY KEY, pem TEXT NOT NULL, status TEXT NOT NULL, ca_id TEXT, mode TEXT NOT NULL,
    created REAL NOT NULL, last_modified REAL NOT NULL, customer_version INTEGER NOT NULL,
    generation_id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS certificates_by_ca ON certificates (ca_id);
CREATE TABLE IF NOT EXISTS ca_certificates (
    id TEXT PRIMARY KEY, pem TEXT NOT NULL, subject BLOB NOT NULL, status TEXT NOT NULL,
    auto_registration INTEGER NOT NULL, registration_config TEXT, mode TEXT NOT NULL,
    created REAL NOT NULL, last_modified REAL NOT NULL, customer_version INTEGER NOT NULL,
    generation_id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS ca_by_subject ON ca_certificates (subject);
CREATE TABLE IF NOT EXISTS policies (
    name TEXT PRIMARY KEY, document TEXT NOT NULL, created REAL NOT NULL, last_modified REAL NOT NULL);
-- The versions of a policy once CreatePolicyVersion was called on it. A policy without rows here has one,
-- version 1, its document in policies (which always holds the default version's, as enforcement reads it).
CREATE TABLE IF NOT EXISTS policy_versions (
    policy TEXT NOT NULL, version INTEGER NOT NULL, document TEXT NOT NULL, created REAL NOT NULL,
    is_default INTEGER NOT NULL, PRIMARY KEY (policy, version));
-- The highest version id a policy has had: ids are never reused, even after the newest is deleted.
CREATE TABLE IF NOT EXISTS policy_version_ids (policy TEXT PRIMARY KEY, last INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS policy_targets (
    policy TEXT NOT NULL, target TEXT NOT NULL, PRIMARY KEY (policy, target));
CREATE INDEX IF NOT EXISTS policy_targets_by_target ON policy_targets (target);
CREATE TABLE IF NOT EXISTS things (
    name TEXT PRIMARY KEY, thing_id TEXT NOT NULL, thing_type TEXT, attributes TEXT NOT NULL,
    version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS thing_principals (
    thing TEXT NOT NULL, principal TEXT NOT NULL, PRIMARY KEY (thing, principal));
CREATE INDEX IF NOT EXISTS thing_principals_by_principal ON thing_principals (principal);
CREATE TABLE IF NOT EXISTS templates (
    name TEXT PRIMARY KEY, description TEXT, body TEXT NOT NULL, enabled INTEGER NOT NULL,
    role_arn TEXT NOT NULL, hook TEXT, type TEXT NOT NULL, created REAL NOT NULL,
    last_modified REAL NOT NULL, version_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY, certificate_id TEXT NOT NULL, claim_certificate_id TEXT,
    expires REAL NOT NULL, used INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS tokens_by_expiry ON tokens (expires);
CREATE INDEX IF NOT EXISTS tokens_by_certificate ON tokens (certificate_id);
CREATE TABLE IF NOT EXISTS token_answers (
    hash TEXT PRIMARY KEY, request TEXT NOT NULL, answer TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS provisioning_claims (
    certificate_id TEXT PRIMARY KEY, template TEXT NOT NULL, expires REAL NOT NULL);
"""


class Registry:
    """SQLite-backed state of one iot-core-local; thread-safe."""

    def __init__(
        self, path: Path, region: str = "us-east-1", *, clock: Callable[[], float] = time.time
    ) -> None:
        """`clock` gives every timestamp and expiry (epoch seconds); tests pass one they advance."""
        self.path = Path(path)
        self.region = region
        self.clock = clock
        self._lock = threading.RLock()
        self._depth = 0
        self._pending: list[tuple[str, str]] = []
        self._listeners: list[Callable[[str, str], None]] = []
        self._policy_listeners: list[Callable[[str], None]] = []
        self._pending_targets: list[str] = []
        self._pending_cas: list[tuple[str, str]] = []
        self._ca_listeners: list[Callable[[str, str], None]] = []
        self._pending_trust = False
        # Moves after every commit that changes what the TLS layer must trust (CAs, certificates
        # registered without a CA): the gateway compares one int per handshake instead of querying.
        self.trust_generation = 0
        self._ca_cache: dict[str, x509.Certificate] = {}
        # isolation_level=None: this class issues BEGIN/SAVEPOINT itself, so nesting is explicit.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self.transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- names ----------------------------------------------------------------------------------

    def arn(self, resource: str) -> str:
        return f"arn:aws:iot:{self.region}:{ACCOUNT_ID}:{resource}"

    def cert_arn(self, certificate_id: str) -> str:
        return self.arn(f"cert/{certificate_id}")

    # ---- transactions and listeners -------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All-or-nothing; nests (inner levels are savepoints). Listeners run after the outermost commit."""
        self._lock.acquire()
        depth = self._depth
        mark = len(self._pending)
        targets_mark = len(self._pending_targets)
        cas_mark = len(self._pending_cas)
        trust_mark = self._pending_trust
        self._depth += 1
        events: list[tuple[str, str]] = []
        targets: list[str] = []
        cas: list[tuple[str, str]] = []
        try:
            self._db.execute("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT level{depth}")
            try:
                yield
            except BaseException:
                if depth == 0:
                    self._db.execute("ROLLBACK")
                    self._pending.clear()
                    self._pending_targets.clear()
                    self._pending_cas.clear()
                    self._pending_trust = False
                else:
                    self._db.execute(f"ROLLBACK TO level{depth}")
                    self._db.execute(f"RELEASE level{depth}")
                    del self._pending[mark:]
                    del self._pending_targets[targets_mark:]
                    del self._pending_cas[cas_mark:]
                    self._pending_trust = trust_mark
                raise
            if depth == 0:
                self._db.execute("COMMIT")
                events, self._pending = self._pending, []
                targets, self._pending_targets = self._pending_targets, []
                cas, self._pending_cas = self._pending_cas, []
                if self._pending_trust:
                    self._pending_trust = False
                    self.trust_generation += 1
            else:
                self._db.execute(f"RELEASE level{depth}")
        finally:
            self._depth -= 1
            self._lock.release()
        # Outside the lock: a listener may call back into the registry or hand work to another thread.
        for certificate_id, status in events:
            for listener in list(self._listeners):
                try:
                    listener(certificate_id, status)
                except Exception:
                    log.exception("certificate listener failed for %s", certificate_id)
        self._tell_ca_listeners(cas)
        for target in dict.fromkeys(targets):
            for policy_listener in list(self._policy_listeners):
                try:
                    policy_listener(target)
                except Exception:
                    log.exception("policy listener failed for %s", target)

    def add_listener(self, fn: Callable[[str, str], None]) -> None:
        """`fn(certificate_id, new_status)` after each committed status change or deletion (`model.DELETED`).

        It runs on the thread that made the change: hand work to your own thread or loop from it.
        """
        self._listeners.append(fn)

    def add_policy_listener(self, fn: Callable[[str], None]) -> None:
        """`fn(target)` after each commit that changed what applies to `target` (a certificate ARN):
        a policy attached or detached, a thing attached or detached (policy variables). Same thread rules.
        """
        self._policy_listeners.append(fn)

    def add_ca_listener(self, fn: Callable[[str, str], None]) -> None:
        """`fn(ca_certificate_id, new_status)` after each committed CA status change or deletion
        (`model.DELETED`). Same thread rules as `add_listener`."""
        self._ca_listeners.append(fn)

    def _tell_ca_listeners(self, events: list[tuple[str, str]]) -> None:
        for ca_id, status in events:
            for listener in list(self._ca_listeners):
                try:
                    listener(ca_id, status)
                except Exception:
                    log.exception("CA listener failed for %s", ca_id)

    def _notify(self, certificate_id: str, status: str) -> None:
        self._pending.append((certificate_id, status))

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            cursor = self._db.execute(sql, params)
            rows: list[sqlite3.Row] = cursor.fetchall()
            return rows

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        rows = self._query(sql, params)
        return rows[0] if rows else None

    # ---- tables of a service built on the registry (managed integrations) -------------------------

    def create_tables(self, schema: str) -> None:
        """Create another service's tables in this file (`CREATE TABLE IF NOT EXISTS ...;` statements), so
        its writes and the registry's can share one `transaction()`."""
        with self.transaction():
            for statement in schema.split(";"):
                if statement.strip():
                    self._db.execute(statement)

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """The rows of one statement on those tables (under the registry's lock)."""
        return self._query(sql, params)

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        """Run one writing statement on those tables; how many rows it changed. Inside `transaction()`
        when it must stand or fall with other writes."""
        with self.transaction():
            return self._db.execute(sql, params).rowcount

    # ---- certificates ---------------------------------------------------------------------------

    _CERT_COLUMNS = "id, pem, status, ca_id, mode, created, last_modified, customer_version, generation_id"
    _CERT_SUMMARY_COLUMNS = (
        "id, '', status, ca_id, mode, created, last_modified, customer_version, generation_id"
    )

    def _certificate(self, row: Any) -> Certificate:
        return Certificate(
            certificate_id=row[0],
            arn=self.cert_arn(row[0]),
            pem=row[1],
            status=CertificateStatus(row[2]),
            ca_certificate_id=row[3],
            mode=CertificateMode(row[4]),
            created=row[5],
            last_modified=row[6],
            customer_version=row[7],
            generation_id=row[8],
        )

    def add_certificate(
        self,
        pem: str,
        status: str,
        *,
        ca_certificate_id: str | None = None,
        mode: str = CertificateMode.DEFAULT,
    ) -> Certificate:
        """Register a device certificate; ResourceAlreadyExists (with its id and ARN) if it is known."""
        status = _check_choice("status", status, CertificateStatus)
        mode = _check_choice("certificateMode", mode, CertificateMode)
        cert = load_certificate(pem)
        cid = _certificate_id(cert)
        now = self.clock()
        with self.transaction():
            if self._one("SELECT 1 FROM certificates WHERE id = ?", (cid,)) is not None:
                raise ResourceAlreadyExists(
                    "The certificate is already provisioned or registered", cid, self.cert_arn(cid)
                )
            self._db.execute(
                f"INSERT INTO certificates ({self._CERT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (cid, _normal_pem(cert), status, ca_certificate_id, mode, now, now, 1, str(uuid.uuid4())),
            )
            if ca_certificate_id is None:
                self._pending_trust = True  # its own trust anchor from now on
            return self.get_certificate(cid)

    def add_provisioning_claim(
        self, pem: str, template_name: str, expires: float, *, ca_certificate_id: str | None
    ) -> Certificate:
        """CreateProvisioningClaim's certificate: ACTIVE, and until `expires` (this registry's clock)
        allowed by an implicit policy to provision with `template_name` and nothing else."""
        with self.transaction():
            cert = self.add_certificate(pem, CertificateStatus.ACTIVE, ca_certificate_id=ca_certificate_id)
            self._db.execute(
                "INSERT INTO provisioning_claims (certificate_id, template, expires) VALUES (?, ?, ?)",
                (cert.certificate_id, template_name, expires),
            )
            return cert

    def expire_provisioning_claims(self) -> list[str]:
        """Drop the implicit policy of every CreateProvisioningClaim certificate past its expiration (this
        registry's clock) and tell the policy listeners, so that a connection made before the expiration
        loses it too: the gateway re-reads a connection's policies on such a change. Returns their ids."""
        at = self.clock()
        if not self._query("SELECT 1 FROM provisioning_claims WHERE expires <= ? LIMIT 1", (at,)):
            return []  # the common case, checked without a write
        with self.transaction():
            rows = self._db.execute(
                "SELECT certificate_id FROM provisioning_claims WHERE expires <= ?", (at,)
            ).fetchall()
            expired = [row[0] for row in rows]
            for certificate_id in expired:
                self._db.execute(
                    "DELETE FROM provisioning_claims WHERE certificate_id = ?", (certificate_id,)
                )
                self._pending_targets.append(self.cert_arn(certificate_id))
        return expired

    def policy_documents(self, certificate_id: str) -> list[str]:
        """What a connection with this certificate may do: the policies attached to it, and for a
        CreateProvisioningClaim certificate not yet expired the implicit policy of its template."""
        documents = [p.document for p in self.list_attached_policies(self.cert_arn(certificate_id))]
        row = self._one(
            "SELECT template, expires FROM provisioning_claims WHERE certificate_id = ?", (certificate_id,)
        )
        if row is not None and self.clock() < row[1]:
            documents.append(provisioning_claim_document(self.arn(""), row[0]))
        return documents

    def find_certificate(self, certificate_id: str) -> Certificate | None:
        row = self._one(f"SELECT {self._CERT_COLUMNS} FROM certificates WHERE id = ?", (certificate_id,))
        return None if row is None else self._certificate(row)

    def get_certificate(self, certificate_id: str) -> Certificate:
        cert = self.find_certificate(certificate_id)
        if cert is None:
            raise ResourceNotFound(f"The certificate {certificate_id} does not exist")
        return cert

    def list_certificates(
        self,
        ca_certificate_id: str | None = None,
        *,
        ascending: bool = True,
        offset: int = 0,
        limit: int | None = None,
        with_pem: bool = True,
    ) -> list[Certificate]:
        """Oldest first (newest first if not `ascending`); a page of them with offset/limit, paged in SQL.

        `with_pem=False` leaves the PEM out (`pem` is ""): a listing's summaries do not show it.
        """
        columns = self._CERT_COLUMNS if with_pem else self._CERT_SUMMARY_COLUMNS
        order = "ASC" if ascending else "DESC"
        where, params = ("", ()) if ca_certificate_id is None else (" WHERE ca_id = ?", (ca_certificate_id,))
        rows = self._query(
            f"SELECT {columns} FROM certificates{where}"
            f" ORDER BY created {order}, rowid {order} LIMIT ? OFFSET ?",
            (*params, -1 if limit is None else limit, offset),
        )
        return [self._certificate(row) for row in rows]

    def list_certificates_without_ca(self) -> list[Certificate]:
        """Certificates registered without a CA (RegisterCertificateWithoutCA), REVOKED ones left out."""
        rows = self._query(
            f"SELECT {self._CERT_COLUMNS} FROM certificates WHERE ca_id IS NULL AND status != ?"
            " ORDER BY created, rowid",
            (CertificateStatus.REVOKED,),
        )
        return [self._certificate(row) for row in rows]

    def set_certificate_status(self, certificate_id: str, status: str) -> Certificate:
        """Change a status as UpdateCertificate does; REVOKED is final (CertificateState)."""
        status = _check_choice("status", status, CertificateStatus)
        with self.transaction():
            cert = self.get_certificate(certificate_id)
            if cert.status == status:
                return cert
            if cert.status == CertificateStatus.REVOKED:
                raise CertificateState(
                    f"The certificate {certificate_id} is REVOKED; a revoked certificate cannot change status"
                )
            if status == CertificateStatus.ACTIVE and cert.ca_certificate_id is not None:
                ca = self.find_ca_certificate(cert.ca_certificate_id)
                if ca is not None and ca.status != CaStatus.ACTIVE:
                    raise CertificateState(
                        f"The CA certificate {ca.certificate_id} that signed certificate {certificate_id} "
                        f"is {ca.status}; activate the CA first"
                    )
            self._db.execute(
                "UPDATE certificates SET status = ?, last_modified = ?,"
                " customer_version = customer_version + 1, generation_id = ? WHERE id = ?",
                (status, self.clock(), str(uuid.uuid4()), certificate_id),
            )
            self._notify(certificate_id, status)
            return self.get_certificate(certificate_id)

    def delete_certificate(self, certificate_id: str, force: bool = False) -> None:
        """As DeleteCertificate: not while ACTIVE (CertificateState), nor while attached (DeleteConflict).

        `force` is AWS's forceDelete: policies are detached with the certificate, but a thing attached to
        it still blocks the deletion.
        """
        with self.transaction():
            cert = self.get_certificate(certificate_id)
            if cert.status == CertificateStatus.ACTIVE:
                raise CertificateState(
                    f"The certificate {certificate_id} is ACTIVE; set it INACTIVE before deleting it"
                )
            arn = cert.arn
            if self._one("SELECT 1 FROM thing_principals WHERE principal = ?", (arn,)) is not None:
                raise DeleteConflict(
                    f"The certificate {certificate_id} is attached to a thing; detach it first"
                )
            if not force and self._one("SELECT 1 FROM policy_targets WHERE target = ?", (arn,)):
                raise DeleteConflict(
                    f"The certificate {certificate_id} has policies attached; detach them first "
                    "(or use forceDelete)"
                )
            self._db.execute("DELETE FROM policy_targets WHERE target = ?", (arn,))
            self._db.execute("DELETE FROM provisioning_claims WHERE certificate_id = ?", (certificate_id,))
            self._db.execute("DELETE FROM certificates WHERE id = ?", (certificate_id,))
            self._notify(certificate_id, DELETED)
            self._pending_targets.append(arn)
            if cert.ca_certificate_id is None:
                self._pending_trust = True

    # ---- CA certificates ------------------------------------------------------------------------

    _CA_COLUMNS = (
        "id, pem, status, auto_registration, registration_config, mode, created, last_modified,"
        " customer_version, generation_id"
    )

    def _ca_certificate(self, row: Any) -> CACertificate:
        return CACertificate(
            certificate_id=row[0],
            arn=self.arn(f"cacert/{row[0]}"),
            pem=row[1],
            status=CaStatus(row[2]),
            auto_registration=bool(row[3]),
            registration_config=None if row[4] is None else json.loads(row[4]),
            mode=CertificateMode(row[5]),
            created=row[6],
            last_modified=row[7],
            customer_version=row[8],
            generation_id=row[9],
        )

    def add_ca_certificate(
        self,
        pem: str,
        *,
        status: str,
        auto_registration: bool,
        registration_config: dict[str, str] | None,
        mode: str,
    ) -> CACertificate:
        status = _check_choice("status", status, CaStatus)
        mode = _check_choice("certificateMode", mode, CertificateMode)
        cert = load_certificate(pem)
        cid = _certificate_id(cert)
        now = self.clock()
        with self.transaction():
            if self._one("SELECT 1 FROM ca_certificates WHERE id = ?", (cid,)) is not None:
                raise ResourceAlreadyExists(
                    "The CA certificate is already registered", cid, self.arn(f"cacert/{cid}")
                )
            self._db.execute(
                f"INSERT INTO ca_certificates ({self._CA_COLUMNS}, subject)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    cid,
                    _normal_pem(cert),
                    status,
                    int(auto_registration),
                    _config_json(registration_config),
                    mode,
                    now,
                    now,
                    1,
                    str(uuid.uuid4()),
                    cert.subject.public_bytes(),
                ),
            )
            self._pending_trust = True
            return self.get_ca_certificate(cid)

    def find_ca_certificate(self, certificate_id: str) -> CACertificate | None:
        row = self._one(f"SELECT {self._CA_COLUMNS} FROM ca_certificates WHERE id = ?", (certificate_id,))
        return None if row is None else self._ca_certificate(row)

    def get_ca_certificate(self, certificate_id: str) -> CACertificate:
        ca = self.find_ca_certificate(certificate_id)
        if ca is None:
            raise ResourceNotFound(f"The CA certificate {certificate_id} does not exist")
        return ca

    def find_ca_for(self, cert: x509.Certificate) -> CACertificate | None:
        """The registered CA whose subject is `cert`'s issuer and whose key signed it (ACTIVE ones first)."""
        rows = self._query(
            f"SELECT {self._CA_COLUMNS} FROM ca_certificates WHERE subject = ?"
            " ORDER BY status = ? DESC, created",
            (cert.issuer.public_bytes(), CaStatus.ACTIVE),
        )
        for row in rows:
            ca = self._ca_certificate(row)
            parsed = self._ca_cache.get(ca.certificate_id)
            if parsed is None:
                parsed = load_certificate(ca.pem)
                self._ca_cache[ca.certificate_id] = parsed
            try:
                cert.verify_directly_issued_by(parsed)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                continue
            return ca
        return None

    def list_ca_certificates(self) -> list[CACertificate]:
        rows = self._query(f"SELECT {self._CA_COLUMNS} FROM ca_certificates ORDER BY created, rowid")
        return [self._ca_certificate(row) for row in rows]

    def update_ca_certificate(
        self,
        certificate_id: str,
        *,
        status: str | None = None,
        auto_registration: bool | None = None,
        registration_config: dict[str, str] | None = None,
        remove_registration_config: bool = False,
    ) -> CACertificate:
        """None leaves a field as it is; `remove_registration_config` clears the JITP configuration."""
        if status is not None:
            status = _check_choice("newStatus", status, CaStatus)
        with self.transaction():
            ca = self.get_ca_certificate(certificate_id)
            new_status = ca.status if status is None else status
            new_auto = ca.auto_registration if auto_registration is None else auto_registration
            config = ca.registration_config
            if remove_registration_config:
                config = None
            if registration_config is not None:
                config = registration_config
            self._db.execute(
                "UPDATE ca_certificates SET status = ?, auto_registration = ?, registration_config = ?,"
                " last_modified = ?, customer_version = customer_version + 1, generation_id = ?"
                " WHERE id = ?",
                (
                    new_status,
                    int(new_auto),
                    _config_json(config),
                    self.clock(),
                    str(uuid.uuid4()),
                    certificate_id,
                ),
            )
            self._pending_trust = True
            if new_status != ca.status:
                self._pending_cas.append((certificate_id, new_status))
            return self.get_ca_certificate(certificate_id)

    def delete_ca_certificate(self, certificate_id: str) -> None:
        """As DeleteCACertificate: only an INACTIVE CA may go (CertificateState otherwise)."""
        with self.transaction():
            ca = self.get_ca_certificate(certificate_id)
            if ca.status == CaStatus.ACTIVE:
                raise CertificateState(
                    f"The CA certificate {certificate_id} is ACTIVE; set it INACTIVE before deleting it"
                )
            self._db.execute("DELETE FROM ca_certificates WHERE id = ?", (certificate_id,))
            self._ca_cache.pop(certificate_id, None)
            self._pending_trust = True
            self._pending_cas.append((certificate_id, DELETED))

    def registration_code(self) -> str:
        """The account's registration code (RegisterCACertificate's proof of possession); stable."""
        with self.transaction():
            row = self._one("SELECT value FROM meta WHERE key = 'registration_code'")
            if row is not None:
                return str(row[0])
            code = secrets.token_hex(32)
            self._db.execute("INSERT INTO meta (key, value) VALUES ('registration_code', ?)", (code,))
            return code

    # ---- policies -------------------------------------------------------------------------------

    # The default version's id beside each policy row (1 for a policy never given another version).
    _POLICY_COLUMNS = (
        "p.name, p.document, p.created, p.last_modified,"
        " COALESCE((SELECT v.version FROM policy_versions v WHERE v.policy = p.name AND v.is_default), 1)"
    )

    def _policy(self, row: Any) -> Policy:
        return Policy(
            name=row[0],
            arn=self.arn(f"policy/{row[0]}"),
            document=row[1],
            version_id=str(row[4]),
            created=row[2],
            last_modified=row[3],
        )

    def create_policy(self, name: str, document: str) -> Policy:
        """ResourceAlreadyExists if the name is taken; MalformedPolicy (an InvalidRequest) if the document
        is bad."""
        from iot_core_local.policy import (
            validate_policy,
        )  # policy.py is pure; imported late to keep startup lean

        _check_name("policyName", name, _POLICY_NAME)
        validate_policy(document)
        now = self.clock()
        with self.transaction():
            if self._one("SELECT 1 FROM policies WHERE name = ?", (name,)) is not None:
                raise ResourceAlreadyExists(f"Policy {name} already exists", name, self.arn(f"policy/{name}"))
            self._db.execute(
                "INSERT INTO policies (name, document, created, last_modified) VALUES (?, ?, ?, ?)",
                (name, document, now, now),
            )
            return self.get_policy(name)

    def find_policy(self, name: str) -> Policy | None:
        row = self._one(f"SELECT {self._POLICY_COLUMNS} FROM policies p WHERE p.name = ?", (name,))
        return None if row is None else self._policy(row)

    def get_policy(self, name: str) -> Policy:
        policy = self.find_policy(name)
        if policy is None:
            raise ResourceNotFound(f"Policy {name} does not exist")
        return policy

    def list_policies(self) -> list[Policy]:
        rows = self._query(f"SELECT {self._POLICY_COLUMNS} FROM policies p ORDER BY p.name")
        return [self._policy(row) for row in rows]

    def delete_policy(self, name: str) -> None:
        with self.transaction():
            self.get_policy(name)
            if self._one("SELECT 1 FROM policy_targets WHERE policy = ?", (name,)) is not None:
                raise DeleteConflict(f"Policy {name} is attached to one or more targets; detach it first")
            if len(self.list_policy_versions(name)) > 1:
                raise DeleteConflict(
                    f"Policy {name} has versions other than the default one; delete them first"
                )
            self._db.execute("DELETE FROM policy_versions WHERE policy = ?", (name,))
            self._db.execute("DELETE FROM policy_version_ids WHERE policy = ?", (name,))
            self._db.execute("DELETE FROM policies WHERE name = ?", (name,))

    def list_policy_versions(self, name: str) -> list[PolicyVersion]:
        """The versions of policy `name`, newest first (as AWS lists them)."""
        with self._lock:
            policy = self.get_policy(name)
            rows = self._query(
                "SELECT version, document, created, is_default FROM policy_versions WHERE policy = ?"
                " ORDER BY version DESC",
                (name,),
            )
        if not rows:
            return [PolicyVersion(policy.name, "1", policy.document, policy.created, True)]
        return [PolicyVersion(name, str(r[0]), r[1], r[2], bool(r[3])) for r in rows]

    def get_policy_version(self, name: str, version_id: str) -> PolicyVersion:
        for version in self.list_policy_versions(name):
            if version.version_id == version_id:
                return version
        raise ResourceNotFound(f"Version {version_id} of policy {name} does not exist")

    def create_policy_version(self, name: str, document: str, set_as_default: bool) -> PolicyVersion:
        """A new version of policy `name` (ids are never reused); VersionsLimitExceeded with five already."""
        from iot_core_local.policy import validate_policy

        validate_policy(document)
        now = self.clock()
        with self.transaction():
            versions = self._materialized_versions(name)
            if len(versions) >= MAX_POLICY_VERSIONS:
                raise VersionsLimitExceeded(
                    f"Policy {name} has {MAX_POLICY_VERSIONS} versions already; delete one first"
                )
            row = self._one(
                "SELECT MAX(version), (SELECT last FROM policy_version_ids WHERE policy = ?)"
                " FROM policy_versions WHERE policy = ?",
                (name, name),
            )
            number = max(int(row[0]), int(row[1] or 0)) + 1
            self._db.execute(
                "INSERT INTO policy_version_ids (policy, last) VALUES (?, ?)"
                " ON CONFLICT (policy) DO UPDATE SET last = excluded.last",
                (name, number),
            )
            self._db.execute(
                "INSERT INTO policy_versions (policy, version, document, created, is_default)"
                " VALUES (?, ?, ?, ?, 0)",
                (name, number, document, now),
            )
            if set_as_default:
                self._set_default_version(name, number, now)
            return self.get_policy_version(name, str(number))

    def set_default_policy_version(self, name: str, version_id: str) -> None:
        with self.transaction():
            self._materialized_versions(name)
            version = self.get_policy_version(name, version_id)
            self._set_default_version(name, int(version.version_id), self.clock())

    def delete_policy_version(self, name: str, version_id: str) -> None:
        with self.transaction():
            self._materialized_versions(name)
            version = self.get_policy_version(name, version_id)
            if version.is_default:
                raise DeleteConflict(f"Version {version_id} is the default version of policy {name}")
            self._db.execute(
                "DELETE FROM policy_versions WHERE policy = ? AND version = ?", (name, int(version_id))
            )

    def _materialized_versions(self, name: str) -> list[PolicyVersion]:
        """The versions of `name`, version 1 written out first if the policy never had another."""
        versions = self.list_policy_versions(name)
        if self._one("SELECT 1 FROM policy_versions WHERE policy = ?", (name,)) is None:
            first = versions[0]
            self._db.execute(
                "INSERT INTO policy_versions (policy, version, document, created, is_default)"
                " VALUES (?, 1, ?, ?, 1)",
                (name, first.document, first.created),
            )
        return versions

    def _set_default_version(self, name: str, number: int, now: float) -> None:
        """Make version `number` the one enforced, and tell the policy listeners about every target."""
        self._db.execute(
            "UPDATE policy_versions SET is_default = (version = ?) WHERE policy = ?", (number, name)
        )
        self._db.execute(
            "UPDATE policies SET last_modified = ?, document ="
            " (SELECT document FROM policy_versions WHERE policy = ? AND version = ?) WHERE name = ?",
            (now, name, number, name),
        )
        rows = self._query("SELECT target FROM policy_targets WHERE policy = ?", (name,))
        self._pending_targets.extend(row[0] for row in rows)

    def _check_target(self, target: str) -> None:
        cid = certificate_id_from_arn(target)
        if cid is not None:
            self.get_certificate(cid)
        elif not _THING_GROUP_ARN.fullmatch(target):
            raise InvalidRequest(f"The target {target} is neither a certificate ARN nor a thing group ARN")

    def attach_policy(self, name: str, target: str) -> None:
        with self.transaction():
            self.get_policy(name)
            self._check_target(target)
            self._db.execute(
                "INSERT OR IGNORE INTO policy_targets (policy, target) VALUES (?, ?)", (name, target)
            )
            self._pending_targets.append(target)

    def detach_policy(self, name: str, target: str) -> None:
        with self.transaction():
            self.get_policy(name)
            self._db.execute("DELETE FROM policy_targets WHERE policy = ? AND target = ?", (name, target))
            self._pending_targets.append(target)

    def list_attached_policies(self, target: str) -> list[Policy]:
        rows = self._query(
            f"SELECT {self._POLICY_COLUMNS} FROM policies p"
            " JOIN policy_targets t ON t.policy = p.name WHERE t.target = ? ORDER BY p.name",
            (target,),
        )
        return [self._policy(row) for row in rows]

    def list_targets_for_policy(self, name: str) -> list[str]:
        with self._lock:
            self.get_policy(name)
            rows = self._query("SELECT target FROM policy_targets WHERE policy = ? ORDER BY rowid", (name,))
        return [row[0] for row in rows]

    # ---- things ---------------------------------------------------------------------------------

    def _thing(self, row: Any) -> Thing:
        return Thing(
            name=row[0],
            arn=self.arn(f"thing/{row[0]}"),
            thing_id=row[1],
            thing_type_name=row[2],
            attributes=json.loads(row[3]),
            version=row[4],
        )

    def find_thing(self, name: str) -> Thing | None:
        row = self._one(
            "SELECT name, thing_id, thing_type, attributes, version FROM things WHERE name = ?", (name,)
        )
        return None if row is None else self._thing(row)

    def get_thing(self, name: str) -> Thing:
        thing = self.find_thing(name)
        if thing is None:
            raise ResourceNotFound(f"Thing {name} cannot be found")
        return thing

    def create_thing(
        self, name: str, *, thing_type_name: str | None = None, attributes: dict[str, str] | None = None
    ) -> Thing:
        """As CreateThing: the same name with the same configuration succeeds again; a different
        configuration is ResourceAlreadyExists."""
        _check_name("thingName", name, _THING_NAME)
        attributes = dict(attributes or {})
        _check_attributes(attributes, thing_type_name)
        with self.transaction():
            existing = self.find_thing(name)
            if existing is not None:
                if existing.thing_type_name == thing_type_name and existing.attributes == attributes:
                    return existing
                raise ResourceAlreadyExists(
                    f"Thing {name} already exists in account with different attributes",
                    existing.thing_id,
                    existing.arn,
                )
            self._db.execute(
                "INSERT INTO things (name, thing_id, thing_type, attributes, version) VALUES (?, ?, ?, ?, 1)",
                (name, str(uuid.uuid4()), thing_type_name, json.dumps(attributes, sort_keys=True)),
            )
            return self.get_thing(name)

    def update_thing(
        self,
        name: str,
        *,
        thing_type_name: str | None = None,
        attributes: dict[str, str] | None = None,
        merge: bool = True,
        remove_thing_type: bool = False,
        expected_version: int | None = None,
    ) -> Thing:
        """`merge` adds to the attributes (an empty value removes one); otherwise they are replaced."""
        with self.transaction():
            thing = self.get_thing(name)
            if expected_version is not None and expected_version != thing.version:
                raise VersionConflict(
                    f"The version of thing {name} is {thing.version}, not the expected {expected_version}"
                )
            new_type = thing.thing_type_name
            if remove_thing_type:
                new_type = None
            if thing_type_name is not None:
                new_type = thing_type_name
            new_attributes = dict(thing.attributes)
            if attributes is not None:
                if not merge:
                    new_attributes = {}
                new_attributes.update(attributes)
                new_attributes = {k: v for k, v in new_attributes.items() if v != ""}
            _check_attributes(new_attributes, new_type)
            self._db.execute(
                "UPDATE things SET thing_type = ?, attributes = ?, version = version + 1 WHERE name = ?",
                (new_type, json.dumps(new_attributes, sort_keys=True), name),
            )
            return self.get_thing(name)

    def list_things(self) -> list[Thing]:
        rows = self._query("SELECT name, thing_id, thing_type, attributes, version FROM things ORDER BY name")
        return [self._thing(row) for row in rows]

    def delete_thing(self, name: str, *, expected_version: int | None = None) -> None:
        """ResourceNotFound if absent (DeleteThing itself succeeds then; the control plane decides)."""
        with self.transaction():
            thing = self.get_thing(name)
            if expected_version is not None and expected_version != thing.version:
                raise VersionConflict(
                    f"The version of thing {name} is {thing.version}, not the expected {expected_version}"
                )
            if self._one("SELECT 1 FROM thing_principals WHERE thing = ?", (name,)) is not None:
                raise InvalidRequest(
                    f"Cannot delete. Thing {name} is still attached to one or more principals"
                )
            self._db.execute("DELETE FROM things WHERE name = ?", (name,))

    def _check_principal(self, principal: str) -> None:
        cid = certificate_id_from_arn(principal)
        if cid is None:
            raise InvalidRequest(f"The principal {principal} is not a certificate ARN")
        self.get_certificate(cid)

    def attach_thing_principal(self, name: str, principal: str) -> None:
        with self.transaction():
            self.get_thing(name)
            self._check_principal(principal)
            self._db.execute(
                "INSERT OR IGNORE INTO thing_principals (thing, principal) VALUES (?, ?)", (name, principal)
            )
            self._pending_targets.append(principal)

    def detach_thing_principal(self, name: str, principal: str) -> None:
        with self.transaction():
            self.get_thing(name)
            self._db.execute(
                "DELETE FROM thing_principals WHERE thing = ? AND principal = ?", (name, principal)
            )
            self._pending_targets.append(principal)

    def list_thing_principals(self, name: str) -> list[str]:
        with self._lock:
            self.get_thing(name)
            rows = self._query(
                "SELECT principal FROM thing_principals WHERE thing = ? ORDER BY rowid", (name,)
            )
        return [row[0] for row in rows]

    def list_principal_things(self, principal: str) -> list[str]:
        rows = self._query(
            "SELECT thing FROM thing_principals WHERE principal = ? ORDER BY rowid", (principal,)
        )
        return [row[0] for row in rows]

    # ---- provisioning templates -----------------------------------------------------------------

    _TEMPLATE_COLUMNS = (
        "name, description, body, enabled, role_arn, hook, type, created, last_modified, version_id"
    )

    def _template(self, row: Any) -> ProvisioningTemplate:
        return ProvisioningTemplate(
            name=row[0],
            arn=self.arn(f"provisioningtemplate/{row[0]}"),
            description=row[1],
            body=row[2],
            enabled=bool(row[3]),
            role_arn=row[4],
            hook=None if row[5] is None else json.loads(row[5]),
            template_type=TemplateType(row[6]),
            created=row[7],
            last_modified=row[8],
            version_id=row[9],
        )

    def create_template(
        self,
        name: str,
        body: str,
        *,
        role_arn: str,
        enabled: bool,
        description: str | None,
        hook: dict[str, str] | None,
        template_type: str,
    ) -> ProvisioningTemplate:
        """Stores the template; the body is checked by templates.validate_template, not here."""
        _check_name("templateName", name, _TEMPLATE_NAME)
        template_type = _check_choice("type", template_type, TemplateType)
        now = self.clock()
        with self.transaction():
            if self.find_template(name) is not None:
                raise ResourceAlreadyExists(
                    f"Provisioning template {name} already exists",
                    name,
                    self.arn(f"provisioningtemplate/{name}"),
                )
            self._db.execute(
                f"INSERT INTO templates ({self._TEMPLATE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
                (
                    name,
                    description,
                    body,
                    int(enabled),
                    role_arn,
                    _config_json(hook),
                    template_type,
                    now,
                    now,
                ),
            )
            return self.get_template(name)

    def find_template(self, name: str) -> ProvisioningTemplate | None:
        row = self._one(f"SELECT {self._TEMPLATE_COLUMNS} FROM templates WHERE name = ?", (name,))
        return None if row is None else self._template(row)

    def get_template(self, name: str) -> ProvisioningTemplate:
        template = self.find_template(name)
        if template is None:
            raise ResourceNotFound(f"The provisioning template {name} does not exist")
        return template

    def list_templates(self) -> list[ProvisioningTemplate]:
        rows = self._query(f"SELECT {self._TEMPLATE_COLUMNS} FROM templates ORDER BY created, rowid")
        return [self._template(row) for row in rows]

    _TEMPLATE_CHANGES = frozenset({"description", "body", "enabled", "role_arn", "hook"})

    def update_template(self, name: str, **changes: object) -> ProvisioningTemplate:
        """Change any of description, body, enabled, role_arn, hook (None removes the hook).

        A new body is a new version: version_id goes up by one.
        """
        unknown = set(changes) - set(self._TEMPLATE_CHANGES)
        if unknown:
            raise TypeError(f"update_template() got unknown fields {sorted(unknown)}")
        with self.transaction():
            self.get_template(name)
            for field, value in changes.items():
                stored = value
                if field == "hook":
                    stored = None if value is None else json.dumps(value, sort_keys=True)
                elif field == "enabled":
                    stored = int(bool(value))
                self._db.execute(f"UPDATE templates SET {field} = ? WHERE name = ?", (stored, name))
            version_step = 1 if "body" in changes else 0
            self._db.execute(
                "UPDATE templates SET last_modified = ?, version_id = version_id + ? WHERE name = ?",
                (self.clock(), version_step, name),
            )
            return self.get_template(name)

    def delete_template(self, name: str) -> None:
        with self.transaction():
            self.get_template(name)
            self._db.execute("DELETE FROM templates WHERE name = ?", (name,))

    # ---- certificate ownership tokens -----------------------------------------------------------

    def issue_token(self, certificate_id: str, claim_certificate_id: str | None, ttl: float) -> str:
        """A fresh 256-bit token bound to `certificate_id`; only its SHA-256 is stored."""
        token = secrets.token_urlsafe(32)
        now = self.clock()
        with self.transaction():
            # The answers of the tokens purged now, found through the expiry index (a NOT IN over all of
            # token_answers on every issue cost a scan that grew with every registration).
            self._db.execute(
                "DELETE FROM token_answers WHERE hash IN (SELECT hash FROM tokens WHERE expires < ?)",
                (now - _TOKEN_HASH_KEEP,),
            )
            self._db.execute("DELETE FROM tokens WHERE expires < ?", (now - _TOKEN_HASH_KEEP,))
            self._db.execute(
                "INSERT INTO tokens (hash, certificate_id, claim_certificate_id, expires)"
                " VALUES (?, ?, ?, ?)",
                (_hash_token(token), certificate_id, claim_certificate_id, now + ttl),
            )
        return token

    def expired_unregistered_certificates(self) -> list[str]:
        """Certificates still PENDING_ACTIVATION whose every ownership token expired unused.

        Derived from stored state (not from memory), so the sweep that deletes them, as AWS does,
        survives a restart. Token hashes are kept a day after expiry; a server down longer than that
        leaves such certificates PENDING_ACTIVATION, which connects nothing.
        """
        at = self.clock()
        rows = self._query(
            "SELECT DISTINCT t.certificate_id FROM tokens t JOIN certificates c ON c.id = t.certificate_id"
            " WHERE t.expires < ? AND t.used = 0 AND c.status = ?"
            " AND NOT EXISTS (SELECT 1 FROM tokens u WHERE u.certificate_id = t.certificate_id"
            " AND (u.used = 1 OR u.expires >= ?))",
            (at, CertificateStatus.PENDING_ACTIVATION, at),
        )
        return [row[0] for row in rows]

    def record_token_answer(self, token: str, request: str, answer: dict[str, Any]) -> None:
        """Keep what the request that spent `token` was answered (`request`: a digest of what it asked),
        so that the same request again is answered the same (`token_answer`). Inside the transaction that
        spends the token: both happen or neither."""
        with self.transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO token_answers (hash, request, answer) VALUES (?, ?, ?)",
                (_hash_token(token), request, json.dumps(answer)),
            )

    def token_answer(self, token: str, request: str) -> dict[str, Any] | None:
        """The answer kept for a spent, unexpired `token` whose request was `request`, else None.

        RegisterThing is idempotent per token: a hub whose answer was lost (a power cut, a dropped
        connection, a full disk before it recorded it) asks again with the same token and parameters and
        learns the identity the first request made, instead of being refused a spent token for good.
        """
        row = self._one(
            "SELECT a.request, a.answer, t.expires, c.id, c.status FROM token_answers a"
            " JOIN tokens t ON t.hash = a.hash JOIN certificates c ON c.id = t.certificate_id"
            " WHERE a.hash = ? AND t.used = 1",
            (_hash_token(token),),
        )
        if row is None or row[0] != request or row[2] < self.clock():
            return None
        # Only an identity that still stands is told again: the certificate neither deleted (no row),
        # revoked nor deactivated, and the thing it named still there with this certificate attached. An
        # operator's offboarding must not be answered "accepted"; the hub then starts over, as AWS would.
        if row[4] != CertificateStatus.ACTIVE:
            return None
        answer: dict[str, Any] = json.loads(row[1])
        thing = answer.get("thingName")
        if thing is not None and not self._query(
            "SELECT 1 FROM thing_principals p JOIN things t ON t.name = p.thing"
            " WHERE p.thing = ? AND p.principal = ?",
            (str(thing), self.cert_arn(row[3])),
        ):
            return None
        return answer

    def consume_token(self, token: str) -> TokenGrant:
        """Spend a token once. Inside a transaction that rolls back, the token stays unspent."""
        if not token:
            raise InvalidRequest("Certificate ownership token cannot be empty")
        with self.transaction():
            row = self._one(
                "SELECT certificate_id, claim_certificate_id, expires, used FROM tokens WHERE hash = ?",
                (_hash_token(token),),
            )
            if row is None:
                raise InvalidRequest("Certificate ownership token is invalid")
            if row[3]:
                raise InvalidRequest("Certificate ownership token has already been used")
            if row[2] < self.clock():
                raise InvalidRequest("Certificate ownership token has expired")
            self._db.execute("UPDATE tokens SET used = 1 WHERE hash = ?", (_hash_token(token),))
            return TokenGrant(certificate_id=row[0], claim_certificate_id=row[1])


def _check_choice(member: str, value: str, allowed: type[_Choice]) -> _Choice:
    """`value` as a member of `allowed`; InvalidRequest naming the choices otherwise."""
    try:
        return allowed(value)
    except ValueError:
        raise InvalidRequest(f"{member} must be one of {', '.join(allowed)}, not {value!r}") from None


def _check_attributes(attributes: dict[str, str], thing_type_name: str | None) -> None:
    """InvalidRequest, as AWS answers, for an attribute name or value it refuses, or too many of them."""
    limit = MAX_ATTRIBUTES_WITHOUT_TYPE if thing_type_name is None else MAX_ATTRIBUTES_WITH_TYPE
    if len(attributes) > limit:
        kind = "without a thing type" if thing_type_name is None else "with a thing type"
        raise InvalidRequest(f"A thing {kind} can have at most {limit} attributes, not {len(attributes)}")
    for name, value in attributes.items():
        if not isinstance(name, str) or not _ATTRIBUTE_NAME.fullmatch(name):
            raise InvalidRequest(
                f"Attribute name {_clip(name)!r} must be 1-128 characters of {_ATTRIBUTE_NAME.pattern[:-7]}"
            )
        if not isinstance(value, str) or not _ATTRIBUTE_VALUE.fullmatch(value):
            raise InvalidRequest(
                f"The value of attribute {name} must be at most 800 characters of "
                f"{_ATTRIBUTE_VALUE.pattern[:-7]}"
            )


def _clip(value: object, limit: int = 64) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_name(member: str, value: str, pattern: re.Pattern[str]) -> None:
    if not pattern.fullmatch(value):
        raise InvalidRequest(f"{member} {value!r} does not match {pattern.pattern}")


def _config_json(value: dict[str, str] | None) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def _normal_pem(cert: x509.Certificate) -> str:
    # Stored re-encoded from the parsed certificate: whatever surrounded it in the request (a chain, text,
    # CRLF line ends) would otherwise surprise every reader of the registry.
    return cert.public_bytes(serialization.Encoding.PEM).decode()
