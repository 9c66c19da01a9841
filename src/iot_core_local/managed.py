"""Managed integrations' state: the custom endpoint, provisioning profiles, managed things, their tags and
connectivity, kept in the registry's SQLite file.

The tables live beside AWS IoT's (`Registry.create_tables`), so a profile and the IoT template, policies
and claim certificate it stands on are created in one `Registry.transaction()`, and so are a hub's IoT
thing, ACTIVE certificate and ACTIVATED managed thing at RegisterThing. Thread-safe as the registry is
(one connection behind its lock); everything survives a restart.

What AWS leaves open, decided here (README, docs/internals.md):
- a managed thing's Id is 32 lowercase hex characters (the model allows `[a-zA-Z0-9:_-]`, its tag ARNs
  only `[0-9a-zA-Z]`); a fleet-provisioned hub's IoT thing name and MQTT client id are that Id, so the
  claim policy can deny every client id of exactly 32 characters (`CLAIM_DENIED_CLIENT_IDS`);
- a hub whose RegisterThing matched is ACTIVATED at once (its certificate is ACTIVE, command and control
  is possible from then on), never DISCOVERED;
- a CONTROLLER created with `SN:...;UPC:...` (or `EAN:`) material is PRE_ASSOCIATED, anything else
  UNASSOCIATED; a DEVICE's WIFI_SETUP_QR_BAR_CODE material is parsed too, and its SN is its serial, unique
  among live managed things whatever their role;
- DeleteManagedThing of an onboarded hub makes its certificate INACTIVE (the gateway closes its
  connection) and the thing DELETE_IN_PROGRESS; it is gone once the gateway reports the disconnect,
  at once if the hub is not connected, or at once with Force;
- the custom endpoint is the gateway's host; an IPv6 address, which the model's pattern
  (`[A-Za-z0-9._@-]+`) cannot carry, is a ValidationException naming what works (`endpoint_name`).
"""

# S608: the f-strings below only splice this module's constant column lists; values are always bound.
# ruff: noqa: S608

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from iot_core_local.ca import CertificateAuthority, load_certificate
from iot_core_local.errors import (
    Conflict,
    ManagedResourceNotFound,
    ResourceAlreadyExists,
    ServiceError,
    Validation,
)
from iot_core_local.model import (
    CaStatus,
    Certificate,
    CertificateMode,
    CertificateStatus,
    ManagedThingRole,
    ProvisioningProfileStatus,
    ProvisioningStatus,
    ProvisioningType,
)
from iot_core_local.recipes import claims
from iot_core_local.registry import ACCOUNT_ID, Registry

__all__ = [
    "CLAIM_DENIED_CLIENT_IDS",
    "MANAGED_THING_ID_BUILTIN",
    "ManagedIntegrations",
    "ManagedThing",
    "Material",
    "Profile",
    "claim_policy_document",
    "hub_policy_document",
    "parse_material",
    "profile_template_body",
]

log = logging.getLogger(__name__)

# The RegisterThing parameters a hub sends and the deviceConfiguration keys it reads: the recipe's names.
SERIAL_NUMBER_PARAMETER = claims.SERIAL_NUMBER_PARAMETER
UPC_PARAMETER = claims.UPC_PARAMETER
CLIENT_ID_KEY = claims.CLIENT_ID_KEY
MANAGED_THING_ID_KEY = claims.MANAGED_THING_ID_KEY
# A built-in of the service's own template: names in AWS's namespace come only from the server, never from
# a device (templates.py), so a hub cannot choose the managed thing it becomes.
MANAGED_THING_ID_BUILTIN = "AWS::IoTManagedIntegrations::ManagedThing::Id"
_ID_LENGTH = 32
# IoT policy wildcards: one "?" per character. Every provisioned hub's client id is a 32-character id.
CLAIM_DENIED_CLIENT_IDS = "?" * _ID_LENGTH

_SERIAL = re.compile(r"[A-Za-z0-9\-_ ]{1,128}")
_UPC = re.compile(r"[0-9]{12}")
_EAN = re.compile(r"[0-9]{8,13}")
_MAX_TAGS = 50
_MAX_TOKENS_KEPT = 1000  # claim keys kept in memory for a ClientToken retry of CreateProvisioningProfile

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mi_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS mi_profiles (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, type TEXT NOT NULL, status TEXT NOT NULL,
    claim_certificate_id TEXT, ca_certificate_id TEXT, client_token TEXT, request_hash TEXT,
    created REAL NOT NULL, tags TEXT NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS mi_profiles_by_token ON mi_profiles (client_token);
CREATE TABLE IF NOT EXISTS mi_things (
    id TEXT PRIMARY KEY, role TEXT NOT NULL, status TEXT NOT NULL, material TEXT NOT NULL,
    material_type TEXT NOT NULL, serial TEXT, upc TEXT, ean TEXT, details TEXT NOT NULL,
    tags TEXT NOT NULL, client_token TEXT, request_hash TEXT, created REAL NOT NULL, updated REAL NOT NULL,
    activated REAL, certificate_id TEXT, iot_thing TEXT, hub_policy TEXT,
    connected INTEGER NOT NULL DEFAULT 0, connectivity_at REAL, disconnect_reason TEXT);
CREATE INDEX IF NOT EXISTS mi_things_by_serial ON mi_things (serial);
CREATE UNIQUE INDEX IF NOT EXISTS mi_things_by_token ON mi_things (client_token);
CREATE INDEX IF NOT EXISTS mi_things_by_iot_thing ON mi_things (iot_thing);
"""

# GetManagedThing's optional members a caller sets at CreateManagedThing/UpdateManagedThing, kept as JSON.
DETAIL_MEMBERS = (
    "Owner",
    "CredentialLockerId",
    "SerialNumber",
    "Brand",
    "Model",
    "Name",
    "Classification",
    "MetaData",
    "HubNetworkMode",
    "WiFiSimpleSetupConfiguration",
    "CapabilityReport",
    "CapabilitySchemas",
    "Capabilities",
)


@dataclass(frozen=True)
class Material:
    """What a hub's authentication material `SN:<serial>;UPC:<upc>` (or `EAN:`) says."""

    serial: str
    upc: str | None
    ean: str | None


def parse_material(text: str) -> Material:
    """The serial and product code of a hub's material; Validation naming the problem otherwise."""
    fields: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue  # AWS's own example ends with ";"
        key, sep, value = part.partition(":")
        key = key.strip().upper()
        if not sep or key not in ("SN", "UPC", "EAN"):
            # The material is sensitive in the model: its parts are described, never quoted.
            raise Validation(
                "AuthenticationMaterial has a part that is not SN:<serial>, UPC:<12 digits> "
                "or EAN:<8-13 digits> (its value is not shown: the model marks it sensitive)"
            )
        if key in fields:
            raise Validation(f"AuthenticationMaterial names {key} twice")
        fields[key] = value.strip()
    serial = fields.get("SN")
    if serial is None or not _SERIAL.fullmatch(serial):
        raise Validation(
            "AuthenticationMaterial needs SN:<serial> (1-128 of A-Z a-z 0-9 - _ space), "
            "e.g. SN:123;UPC:829576019524"
        )
    upc, ean = fields.get("UPC"), fields.get("EAN")
    if (upc is None) == (ean is None):
        raise Validation("AuthenticationMaterial needs exactly one of UPC:<12 digits> and EAN:<8-13 digits>")
    if upc is not None and not _UPC.fullmatch(upc):
        raise Validation("AuthenticationMaterial's UPC is not 12 digits")
    if ean is not None and not _EAN.fullmatch(ean):
        raise Validation("AuthenticationMaterial's EAN is not 8 to 13 digits")
    return Material(serial, upc, ean)


# ---- the IoT resources a profile stands on -----------------------------------------------------------


def hub_policy_document(region: str) -> str:
    """What a provisioned hub may do: the recipe's hub policy (connect as its thing, whose name is its
    client id, and use the topics under it)."""
    return claims.hub_policy_document(region, ACCOUNT_ID)


def claim_policy_document(region: str, template_name: str) -> str:
    """The recipe's claim policy (the provisioning topics of one template, nothing else), and never a
    connection with a client id a provisioned hub could have (32 characters, as every managed thing Id)."""
    document = json.loads(claims.claim_policy_document(region, ACCOUNT_ID, template_name))
    document["Statement"].append(
        {
            "Effect": "Deny",
            "Action": "iot:Connect",
            "Resource": f"arn:aws:iot:{region}:{ACCOUNT_ID}:client/{CLAIM_DENIED_CLIENT_IDS}",
        }
    )
    return json.dumps(document)


def profile_template_body(hub_policy_name: str) -> str:
    """The service's own fleet provisioning template: the hub sends SerialNumber and UniversalProductCode;
    the managed thing they matched (a built-in only the server sets) names the thing and the client id."""
    managed_id = {"Ref": MANAGED_THING_ID_BUILTIN}
    return json.dumps(
        {
            "Parameters": {
                SERIAL_NUMBER_PARAMETER: {"Type": "String"},
                UPC_PARAMETER: {"Type": "String"},
                MANAGED_THING_ID_BUILTIN: {"Type": "String"},
                "AWS::IoT::Certificate::Id": {"Type": "String"},
            },
            "Resources": {
                "thing": {
                    "Type": "AWS::IoT::Thing",
                    "Properties": {
                        "ThingName": managed_id,
                        "AttributePayload": {
                            "serialNumber": {"Ref": SERIAL_NUMBER_PARAMETER},
                            "upc": {"Ref": UPC_PARAMETER},
                        },
                    },
                },
                **claims.hub_credential_resources(hub_policy_name),
            },
            "DeviceConfiguration": {CLIENT_ID_KEY: managed_id, MANAGED_THING_ID_KEY: managed_id},
        }
    )


# ---- values --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    id: str
    arn: str
    name: str
    provisioning_type: ProvisioningType
    status: ProvisioningProfileStatus
    claim_certificate_id: str | None
    ca_certificate_id: str | None
    created: float
    tags: dict[str, str]
    claim_certificate_pem: str | None = None

    @property
    def hub_policy_name(self) -> str:
        return f"{self.name}-hub"

    @property
    def claim_policy_name(self) -> str:
        return f"{self.name}-claim"


@dataclass(frozen=True)
class ManagedThing:
    id: str
    arn: str
    role: ManagedThingRole
    status: ProvisioningStatus
    material_type: str
    serial: str | None
    upc: str | None
    ean: str | None
    details: dict[str, Any]
    tags: dict[str, str]
    created: float
    updated: float
    activated: float | None
    certificate_id: str | None
    iot_thing: str | None
    hub_policy: str | None
    connected: bool
    connectivity_at: float | None
    disconnect_reason: str | None


@dataclass
class _Keys:
    """Claim private keys of profiles created lately, by ClientToken: a retry gets the same answer."""

    by_token: dict[str, str] = field(default_factory=dict)

    def keep(self, token: str, key: str) -> None:
        if len(self.by_token) >= _MAX_TOKENS_KEPT:
            self.by_token.pop(next(iter(self.by_token)))
        self.by_token[token] = key


def _request_hash(params: Mapping[str, Any]) -> str:
    document = {k: v for k, v in params.items() if k != "ClientToken"}
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _check_ca(pem: str) -> None:
    """A JITR profile's CaCertificate must be a CA certificate, as RegisterCACertificate requires."""
    try:
        cert = load_certificate(pem)
    except ServiceError:
        raise Validation(_NOT_A_CERTIFICATE.format(member="CaCertificate")) from None
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (x509.ExtensionNotFound, ValueError):
        is_ca = False
    if not is_ca:
        raise Validation("CaCertificate is not a CA certificate (it lacks basicConstraints CA:TRUE)")


# The parser's own words (cryptography's "ParseError { kind: ... }") mean nothing to a caller, and the
# member is sensitive in the model: neither is repeated.
_NOT_A_CERTIFICATE = (
    "{member} is not a PEM X.509 certificate (-----BEGIN CERTIFICATE----- ... -----END CERTIFICATE----- "
    "around base64 DER); its value is not shown: the model marks it sensitive"
)


def _new_id() -> str:
    return secrets.token_hex(_ID_LENGTH // 2)


_THING_COLUMNS = (
    "id, role, status, material_type, serial, upc, ean, details, tags, created, updated, activated,"
    " certificate_id, iot_thing, hub_policy, connected, connectivity_at, disconnect_reason"
)
_PROFILE_COLUMNS = "id, name, type, status, claim_certificate_id, ca_certificate_id, created, tags"

StatusListener = Callable[[str, str], None]  # (managed thing id, new ProvisioningStatus or "DELETED")


def endpoint_name(host: str) -> str:
    """The gateway's host as GetCustomEndpoint's `EndpointAddress` (`[A-Za-z0-9._@-]+`) can carry it.

    An IPv6 address has colons the pattern refuses, and no other spelling of it reaches the gateway: a
    name such as `localhost` may resolve to IPv4 only (it does in many /etc/hosts), and the server
    certificate names no other host. So it is a ValidationException saying what works instead.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6:
        raise Validation(
            f"The gateway's address is the IPv6 address {host}, which an EndpointAddress cannot carry: "
            "serve with --advertise NAME (a host name or an IPv4 address hubs reach it by; or --host "
            f"localhost), or give hubs endpoint.json's address ([{host}]:PORT) as endpoint_url"
        )
    return host


class ManagedIntegrations:
    """The account's managed integrations, over one registry (AWS IoT's state) and CA."""

    def __init__(
        self,
        registry: Registry,
        ca: CertificateAuthority,
        *,
        endpoint_address: Callable[[], str] = lambda: "127.0.0.1",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.ca = ca
        self.endpoint_address = endpoint_address
        self.clock = clock
        self.region = registry.region
        self._keys = _Keys()
        self._keys_lock = threading.Lock()
        self._status_listeners: list[StatusListener] = []
        registry.create_tables(_SCHEMA)
        # The client ids of onboarded hubs: the gateway reports every device's connections, and only
        # these cost a write (a set may hold a few ids of hubs deleted meanwhile: they match no row).
        self._hub_client_ids = {
            row[0] for row in registry.query("SELECT iot_thing FROM mi_things WHERE iot_thing IS NOT NULL")
        }
        self._recover()

    def arn(self, kind: str, resource_id: str) -> str:
        return f"arn:aws:iotmanagedintegrations:{self.region}:{ACCOUNT_ID}:{kind}/{resource_id}"

    def add_status_listener(self, fn: StatusListener) -> None:
        """`fn(managed_thing_id, status)` after each committed status change (tests watch transitions)."""
        self._status_listeners.append(fn)

    def _told(self, thing_id: str, status: str) -> None:
        for listener in list(self._status_listeners):
            try:
                listener(thing_id, status)
            except Exception:
                log.exception("managed thing status listener failed for %s", thing_id)

    def _recover(self) -> None:
        """After a restart nobody is connected; deletions that waited for a disconnect can finish."""
        now = self.clock()
        self.registry.execute(
            "UPDATE mi_things SET connected = 0, connectivity_at = ?, disconnect_reason = ?"
            " WHERE connected = 1",
            (now, "SERVER_INITIATED_DISCONNECT"),
        )
        for row in self.registry.query(
            "SELECT id FROM mi_things WHERE status = ?", (ProvisioningStatus.DELETE_IN_PROGRESS,)
        ):
            self._finish_delete(row[0])

    # ---- custom endpoint ---------------------------------------------------------------------------

    def register_custom_endpoint(self) -> str:
        address = endpoint_name(self.endpoint_address())
        with self.registry.transaction():
            if self.registry.query("SELECT 1 FROM mi_meta WHERE key = 'endpoint'"):
                raise Conflict("A custom endpoint is already registered for this account; GetCustomEndpoint")
            self.registry.execute("INSERT INTO mi_meta (key, value) VALUES ('endpoint', ?)", (address,))
        return address

    def get_custom_endpoint(self) -> str:
        if not self.registry.query("SELECT 1 FROM mi_meta WHERE key = 'endpoint'"):
            raise ManagedResourceNotFound(
                "No custom endpoint is registered; call RegisterCustomEndpoint first",
                "custom-endpoint",
                "CustomEndpoint",
            )
        # The server's address now (it may listen elsewhere after a restart), as the hub must reach it.
        return endpoint_name(self.endpoint_address())

    # ---- provisioning profiles -----------------------------------------------------------------------

    def _profile(self, row: Any) -> Profile:
        pem = None
        if row[4] is not None:
            cert = self.registry.find_certificate(row[4])
            pem = cert.pem if cert is not None else None
        return Profile(
            id=row[0],
            arn=self.arn("provisioning-profile", row[0]),
            name=row[1],
            provisioning_type=ProvisioningType(row[2]),
            status=ProvisioningProfileStatus(row[3]),
            claim_certificate_id=row[4],
            ca_certificate_id=row[5],
            created=row[6],
            tags=json.loads(row[7]),
            claim_certificate_pem=pem,
        )

    def find_profile_by_name(self, name: str) -> Profile | None:
        rows = self.registry.query(f"SELECT {_PROFILE_COLUMNS} FROM mi_profiles WHERE name = ?", (name,))
        return self._profile(rows[0]) if rows else None

    def get_profile(self, identifier: str) -> Profile:
        rows = self.registry.query(f"SELECT {_PROFILE_COLUMNS} FROM mi_profiles WHERE id = ?", (identifier,))
        if not rows:
            raise ManagedResourceNotFound(
                f"Provisioning profile {identifier} does not exist", identifier, "ProvisioningProfile"
            )
        return self._profile(rows[0])

    def list_profiles(self) -> list[Profile]:
        rows = self.registry.query(f"SELECT {_PROFILE_COLUMNS} FROM mi_profiles ORDER BY created, rowid")
        return [self._profile(row) for row in rows]

    def create_profile(self, params: Mapping[str, Any]) -> tuple[Profile, str | None]:
        """The new profile and its claim's private key (None when the caller gave the claim, for JITR, and
        for a ClientToken retry after a restart)."""
        token = params.get("ClientToken")
        request_hash = _request_hash(params)
        kind = ProvisioningType(params["ProvisioningType"])
        # The claim's key before the registry's lock is taken: an empty key pool means 50-150 ms of RSA.
        generated = (
            self.ca.create_keys_and_certificate()
            if kind == ProvisioningType.FLEET_PROVISIONING and not params.get("ClaimCertificate")
            else None
        )
        with self.registry.transaction():
            if token is not None:
                rows = self.registry.query(
                    "SELECT id, request_hash FROM mi_profiles WHERE client_token = ?", (token,)
                )
                if rows:
                    if rows[0][1] != request_hash:
                        raise Conflict(f"ClientToken {token} was used with other parameters")
                    with self._keys_lock:
                        key = self._keys.by_token.get(token)
                    return self.get_profile(rows[0][0]), key
            profile_id = _new_id()
            name = params.get("Name") or profile_id
            if self.registry.query("SELECT 1 FROM mi_profiles WHERE name = ?", (name,)):
                raise Conflict(f"A provisioning profile named {name} already exists")
            claim_id, ca_id, key = (
                self._fleet_resources(name, params.get("ClaimCertificate"), generated)
                if kind == ProvisioningType.FLEET_PROVISIONING
                else (None, self._jitr_resources(name, params.get("CaCertificate")), None)
            )
            if kind == ProvisioningType.FLEET_PROVISIONING and params.get("CaCertificate"):
                raise Validation(
                    "CaCertificate is for a JITR profile; a FLEET_PROVISIONING profile takes ClaimCertificate"
                )
            if kind == ProvisioningType.JITR and params.get("ClaimCertificate"):
                raise Validation("ClaimCertificate is for a FLEET_PROVISIONING profile; a JITR one has none")
            self.registry.execute(
                "INSERT INTO mi_profiles (id, name, type, status, claim_certificate_id, ca_certificate_id,"
                " client_token, request_hash, created, tags) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    profile_id,
                    name,
                    kind,
                    ProvisioningProfileStatus.CREATED,
                    claim_id,
                    ca_id,
                    token,
                    request_hash,
                    self.clock(),
                    json.dumps(params.get("Tags") or {}),
                ),
            )
            profile = self.get_profile(profile_id)
        if token is not None and key is not None:
            with self._keys_lock:
                self._keys.keep(token, key)
        return profile, key

    def _take_name(self, what: str, name: str, exists: bool) -> None:
        if exists:
            raise Conflict(f"AWS IoT already has a {what} named {name}; choose another profile name")

    def _fleet_resources(
        self, name: str, claim_pem: str | None, generated: tuple[str, str] | None
    ) -> tuple[str, None, str | None]:
        registry = self.registry
        hub_policy, claim_policy = f"{name}-hub", f"{name}-claim"
        self._take_name("provisioning template", name, registry.find_template(name) is not None)
        self._take_name("policy", hub_policy, registry.find_policy(hub_policy) is not None)
        self._take_name("policy", claim_policy, registry.find_policy(claim_policy) is not None)
        registry.create_policy(hub_policy, hub_policy_document(self.region))
        registry.create_policy(claim_policy, claim_policy_document(self.region, name))
        registry.create_template(
            name,
            profile_template_body(hub_policy),
            role_arn=f"arn:aws:iam::{ACCOUNT_ID}:role/iotmanagedintegrations-provisioning",
            enabled=True,
            description=f"managed integrations provisioning profile {name}",
            hook=None,
            template_type="FLEET_PROVISIONING",
        )
        key: str | None = None
        if generated is not None:
            pem, key = generated
            cert = registry.add_certificate(
                pem, CertificateStatus.ACTIVE, ca_certificate_id=self.ca.issuing_ca_id
            )
        else:
            cert = self._register_claim(claim_pem or "")
        registry.attach_policy(claim_policy, cert.arn)
        return cert.certificate_id, None, key

    def _register_claim(self, pem: str) -> Certificate:
        """A claim certificate the caller brings: registered ACTIVE under the CA that signed it (the
        server's issuing CA or a registered one), or on its own, as RegisterCertificateWithoutCA does."""
        try:
            parsed = load_certificate(pem)
        except ServiceError:
            raise Validation(_NOT_A_CERTIFICATE.format(member="ClaimCertificate")) from None
        normal = parsed.public_bytes(serialization.Encoding.PEM).decode()
        ca = self.registry.find_ca_for(parsed)
        if ca is not None and ca.status != CaStatus.ACTIVE:
            raise Validation(f"ClaimCertificate's CA {ca.certificate_id} is {ca.status}; activate it first")
        ca_id = ca.certificate_id if ca is not None else None
        if ca_id is None and _issued_by(parsed, self.ca.issuing_ca):
            ca_id = self.ca.issuing_ca_id
        mode = CertificateMode.DEFAULT if ca_id is not None else CertificateMode.SNI_ONLY
        try:
            return self.registry.add_certificate(
                normal, CertificateStatus.ACTIVE, ca_certificate_id=ca_id, mode=mode
            )
        except ResourceAlreadyExists as e:
            raise Conflict(
                f"ClaimCertificate is already registered in AWS IoT as certificate {e.resource_id}"
            ) from None

    def _jitr_resources(self, name: str, ca_pem: str | None) -> str:
        if not ca_pem:
            raise Validation(
                "A JITR profile needs CaCertificate: the PEM of the CA that signs the hubs' DHA certificates"
            )
        _check_ca(ca_pem)
        hub_policy = f"{name}-hub"
        self._take_name("policy", hub_policy, self.registry.find_policy(hub_policy) is not None)
        try:
            ca = self.registry.add_ca_certificate(
                ca_pem,
                status=CaStatus.ACTIVE,
                auto_registration=True,
                registration_config=None,
                mode=CertificateMode.SNI_ONLY,
            )
        except ResourceAlreadyExists as e:
            raise Conflict(
                f"CaCertificate is already registered in AWS IoT as CA certificate {e.resource_id}"
            ) from None
        except ServiceError as e:
            raise Validation(f"CaCertificate: {e.message}") from None
        self.registry.create_policy(hub_policy, hub_policy_document(self.region))
        return ca.certificate_id

    def delete_profile(self, identifier: str) -> None:
        registry = self.registry
        with registry.transaction():
            profile = self.get_profile(identifier)
            if registry.list_targets_for_policy(profile.hub_policy_name):
                raise Conflict(
                    f"Hubs provisioned with profile {profile.name} still exist; "
                    "delete their managed things first"
                )
            if profile.provisioning_type == ProvisioningType.FLEET_PROVISIONING:
                if registry.find_template(profile.name) is not None:
                    registry.delete_template(profile.name)
                if profile.claim_certificate_id and registry.find_certificate(profile.claim_certificate_id):
                    # INACTIVE first: the gateway closes a claim connection still open.
                    registry.set_certificate_status(profile.claim_certificate_id, CertificateStatus.INACTIVE)
                    registry.delete_certificate(profile.claim_certificate_id, force=True)
                if registry.find_policy(profile.claim_policy_name) is not None:
                    registry.delete_policy(profile.claim_policy_name)
            elif profile.ca_certificate_id and registry.find_ca_certificate(profile.ca_certificate_id):
                registry.update_ca_certificate(profile.ca_certificate_id, status=CaStatus.INACTIVE)
                registry.delete_ca_certificate(profile.ca_certificate_id)
            if registry.find_policy(profile.hub_policy_name) is not None:
                registry.delete_policy(profile.hub_policy_name)
            registry.execute("DELETE FROM mi_profiles WHERE id = ?", (profile.id,))

    def jitr_profile_for_ca(self, ca_certificate_id: str) -> Profile | None:
        rows = self.registry.query(
            f"SELECT {_PROFILE_COLUMNS} FROM mi_profiles WHERE ca_certificate_id = ? AND type = ?",
            (ca_certificate_id, ProvisioningType.JITR),
        )
        return self._profile(rows[0]) if rows else None

    # ---- managed things ------------------------------------------------------------------------------

    def _thing(self, row: Any) -> ManagedThing:
        return ManagedThing(
            id=row[0],
            arn=self.arn("managed-thing", row[0]),
            role=ManagedThingRole(row[1]),
            status=ProvisioningStatus(row[2]),
            material_type=row[3],
            serial=row[4],
            upc=row[5],
            ean=row[6],
            details=json.loads(row[7]),
            tags=json.loads(row[8]),
            created=row[9],
            updated=row[10],
            activated=row[11],
            certificate_id=row[12],
            iot_thing=row[13],
            hub_policy=row[14],
            connected=bool(row[15]),
            connectivity_at=row[16],
            disconnect_reason=row[17],
        )

    def find_thing(self, identifier: str) -> ManagedThing | None:
        rows = self.registry.query(f"SELECT {_THING_COLUMNS} FROM mi_things WHERE id = ?", (identifier,))
        return self._thing(rows[0]) if rows else None

    def get_thing(self, identifier: str) -> ManagedThing:
        thing = self.find_thing(identifier)
        if thing is None:
            raise ManagedResourceNotFound(
                f"Managed thing {identifier} does not exist", identifier, "ManagedThing"
            )
        return thing

    def list_things(self, filters: Mapping[str, str | None]) -> list[ManagedThing]:
        """Oldest first; `filters`: role, serial, status, owner, credential_locker (None: any)."""
        rows = self.registry.query(f"SELECT {_THING_COLUMNS} FROM mi_things ORDER BY created, rowid")
        things = [self._thing(row) for row in rows]
        wanted = {k: v for k, v in filters.items() if v is not None}
        return [
            t
            for t in things
            if wanted.get("role", t.role) == t.role
            and wanted.get("status", t.status) == t.status
            and wanted.get("serial", t.serial) == t.serial
            and wanted.get("owner", t.details.get("Owner")) == t.details.get("Owner")
            and wanted.get("credential_locker", t.details.get("CredentialLockerId"))
            == t.details.get("CredentialLockerId")
        ]

    def things_with_serial(self, serial: str) -> list[ManagedThing]:
        rows = self.registry.query(
            f"SELECT {_THING_COLUMNS} FROM mi_things WHERE serial = ? ORDER BY created", (serial,)
        )
        return [self._thing(row) for row in rows]

    def create_thing(self, params: Mapping[str, Any]) -> ManagedThing:
        token = params.get("ClientToken")
        request_hash = _request_hash(params)
        role = ManagedThingRole(params["Role"])
        material = params["AuthenticationMaterial"]
        material_type = params["AuthenticationMaterialType"]
        parsed: Material | None = None
        # The material's format is its type's, whatever the role: a DEVICE's SN is its serial too, unique
        # among live managed things as a CONTROLLER's is. Only a CONTROLLER (a hub) is matched at
        # RegisterThing, so only it starts PRE_ASSOCIATED.
        if material_type == "WIFI_SETUP_QR_BAR_CODE":
            parsed = parse_material(material)
        serial = parsed.serial if parsed is not None else params.get("SerialNumber")
        if parsed is not None and params.get("SerialNumber") not in (None, parsed.serial):
            raise Validation(
                "SerialNumber differs from the SN in AuthenticationMaterial (neither is shown: the model "
                "marks both sensitive)"
            )
        status = (
            ProvisioningStatus.PRE_ASSOCIATED
            if parsed is not None and role == ManagedThingRole.CONTROLLER
            else ProvisioningStatus.UNASSOCIATED
        )
        details = {k: params[k] for k in DETAIL_MEMBERS if params.get(k) is not None}
        now = self.clock()
        with self.registry.transaction():
            if token is not None:
                rows = self.registry.query(
                    "SELECT id, request_hash FROM mi_things WHERE client_token = ?", (token,)
                )
                if rows:
                    if rows[0][1] != request_hash:
                        raise Conflict(f"ClientToken {token} was used with other parameters")
                    return self.get_thing(rows[0][0])
            if serial is not None:
                for other in self.things_with_serial(serial):
                    if other.status != ProvisioningStatus.DELETE_IN_PROGRESS:
                        raise Conflict(
                            f"Managed thing {other.id} ({other.role}, {other.status}) already has this "
                            "serial number; delete it before creating another"
                        )
            thing_id = _new_id()
            self.registry.execute(
                "INSERT INTO mi_things (id, role, status, material, material_type, serial, upc, ean, details,"
                " tags, client_token, request_hash, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    thing_id,
                    role,
                    status,
                    material,
                    material_type,
                    serial,
                    parsed.upc if parsed else None,
                    parsed.ean if parsed else None,
                    json.dumps(details),
                    json.dumps(params.get("Tags") or {}),
                    token,
                    request_hash,
                    now,
                    now,
                ),
            )
            thing = self.get_thing(thing_id)
        self._told(thing.id, thing.status)
        return thing

    def update_thing(self, identifier: str, changes: Mapping[str, Any]) -> None:
        with self.registry.transaction():
            thing = self.get_thing(identifier)
            if thing.status == ProvisioningStatus.DELETE_IN_PROGRESS:
                raise Conflict(f"Managed thing {identifier} is being deleted")
            serial = changes.get("SerialNumber")
            from_material = thing.upc is not None or thing.ean is not None
            if serial is not None and serial != thing.serial and from_material:
                raise Conflict(
                    f"The serial number of managed thing {identifier} comes from its "
                    "authentication material; create a new managed thing instead"
                )
            details = {**thing.details, **{k: v for k, v in changes.items() if k in DETAIL_MEMBERS}}
            self.registry.execute(
                "UPDATE mi_things SET details = ?, serial = COALESCE(?, serial), updated = ? WHERE id = ?",
                (
                    json.dumps(details),
                    None if from_material else serial,
                    self.clock(),
                    identifier,
                ),
            )

    def delete_thing(self, identifier: str, *, force: bool) -> None:
        """Gone at once unless an onboarded hub is connected: then DELETE_IN_PROGRESS, its certificate
        INACTIVE (the gateway closes the connection), gone when the disconnect is reported.
        `force`: gone now, whatever the hub does."""
        registry = self.registry
        with registry.transaction():
            thing = self.get_thing(identifier)
            if thing.status == ProvisioningStatus.DELETE_IN_PROGRESS and not force:
                raise Conflict(
                    f"Managed thing {identifier} is already being deleted; use Force to finish the deletion"
                )
            waits = thing.connected and thing.certificate_id is not None and not force
            if (
                thing.certificate_id is not None
                and registry.find_certificate(thing.certificate_id) is not None
            ):
                cert = registry.get_certificate(thing.certificate_id)
                if cert.status == CertificateStatus.ACTIVE:
                    registry.set_certificate_status(cert.certificate_id, CertificateStatus.INACTIVE)
            registry.execute(
                "UPDATE mi_things SET status = ?, updated = ? WHERE id = ?",
                (ProvisioningStatus.DELETE_IN_PROGRESS, self.clock(), identifier),
            )
            # Told before the commit: the commit lets the gateway close the hub, whose reported
            # disconnect may finish the deletion on the loop before this thread would speak again.
            self._told(identifier, ProvisioningStatus.DELETE_IN_PROGRESS)
        if not waits:
            self._finish_delete(identifier)

    def _finish_delete(self, identifier: str) -> None:
        """Remove the hub's IoT thing and certificate, then the managed thing itself: all or nothing."""
        registry = self.registry
        with registry.transaction():
            thing = self.find_thing(identifier)
            if thing is None:
                return
            cert = registry.find_certificate(thing.certificate_id) if thing.certificate_id else None
            if thing.iot_thing and registry.find_thing(thing.iot_thing) is not None:
                for principal in registry.list_thing_principals(thing.iot_thing):
                    registry.detach_thing_principal(thing.iot_thing, principal)
                registry.delete_thing(thing.iot_thing)
            if cert is not None:
                if cert.status == CertificateStatus.ACTIVE:
                    registry.set_certificate_status(cert.certificate_id, CertificateStatus.INACTIVE)
                registry.delete_certificate(cert.certificate_id, force=True)
            registry.execute("DELETE FROM mi_things WHERE id = ?", (identifier,))
        self._hub_client_ids.discard(thing.iot_thing or "")
        self._told(identifier, ProvisioningStatus.DELETED)

    def certificate_pem(self, identifier: str) -> str:
        thing = self.get_thing(identifier)
        cert = self.registry.find_certificate(thing.certificate_id) if thing.certificate_id else None
        if cert is None:
            raise ManagedResourceNotFound(
                f"Managed thing {identifier} has no certificate: it has not provisioned",
                identifier,
                "ManagedThing",
            )
        return cert.pem

    # ---- onboarding and connectivity (called by provisioning and the gateway) ------------------------

    def activate(self, thing_id: str, *, certificate_id: str, iot_thing: str, hub_policy: str) -> None:
        """PRE_ASSOCIATED -> ACTIVATED, inside the caller's transaction (RegisterThing, JITR). Conflict if
        another request activated it first."""
        changed = self.registry.execute(
            "UPDATE mi_things SET status = ?, activated = ?, updated = ?, certificate_id = ?, iot_thing = ?,"
            " hub_policy = ? WHERE id = ? AND status = ?",
            (
                ProvisioningStatus.ACTIVATED,
                self.clock(),
                self.clock(),
                certificate_id,
                iot_thing,
                hub_policy,
                thing_id,
                ProvisioningStatus.PRE_ASSOCIATED,
            ),
        )
        if changed != 1:
            raise Conflict(f"Managed thing {thing_id} was onboarded by another request")
        self._hub_client_ids.add(iot_thing)

    def status_changed(self, thing_id: str, status: str) -> None:
        """Tell the status listeners, after the caller's transaction committed."""
        self._told(thing_id, status)

    def on_connectivity(self, client_id: str, connected: bool, reason: str | None) -> None:
        """The gateway's report of a connect or disconnect (on its loop: one indexed UPDATE for a hub,
        nothing for any other client)."""
        if client_id not in self._hub_client_ids:
            return
        changed = self.registry.execute(
            "UPDATE mi_things SET connected = ?, connectivity_at = ?, disconnect_reason = ?"
            " WHERE iot_thing = ?",
            (int(connected), self.clock(), None if connected else reason, client_id),
        )
        if changed and not connected:
            rows = self.registry.query(
                "SELECT id FROM mi_things WHERE iot_thing = ? AND status = ?",
                (client_id, ProvisioningStatus.DELETE_IN_PROGRESS),
            )
            for row in rows:
                self._finish_delete(row[0])

    # ---- tags ---------------------------------------------------------------------------------------

    _TAGGED: ClassVar[dict[str, str]] = {"managed-thing": "mi_things", "provisioning-profile": "mi_profiles"}

    def _tagged(self, arn: str) -> tuple[str, str]:
        prefix = f"arn:aws:iotmanagedintegrations:{self.region}:{ACCOUNT_ID}:"
        kind, _, resource_id = arn.removeprefix(prefix).partition("/")
        table = self._TAGGED.get(kind) if arn.startswith(prefix) else None
        if table is None or not self.registry.query(f"SELECT 1 FROM {table} WHERE id = ?", (resource_id,)):
            raise ManagedResourceNotFound(f"No resource has the ARN {arn}", arn, kind or "Resource")
        return table, resource_id

    def tags(self, arn: str) -> dict[str, str]:
        table, resource_id = self._tagged(arn)
        rows = self.registry.query(f"SELECT tags FROM {table} WHERE id = ?", (resource_id,))
        tags: dict[str, str] = json.loads(rows[0][0])
        return tags

    def tag(self, arn: str, tags: Mapping[str, str]) -> None:
        with self.registry.transaction():
            table, resource_id = self._tagged(arn)
            merged = {**self.tags(arn), **tags}
            if len(merged) > _MAX_TAGS:
                raise Validation(f"A resource has at most {_MAX_TAGS} tags; this would make {len(merged)}")
            self.registry.execute(
                f"UPDATE {table} SET tags = ? WHERE id = ?", (json.dumps(merged), resource_id)
            )

    def untag(self, arn: str, keys: list[str]) -> None:
        with self.registry.transaction():
            table, resource_id = self._tagged(arn)
            kept = {k: v for k, v in self.tags(arn).items() if k not in keys}
            self.registry.execute(
                f"UPDATE {table} SET tags = ? WHERE id = ?", (json.dumps(kept), resource_id)
            )
