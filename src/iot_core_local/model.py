"""The vocabulary of the stand-in: AWS IoT's statuses, modes and template types, and the registry's values.

Pure data: no I/O, and no import of any other iot_core_local module, so the registry, the template
engine, the gateway, the control plane and the customer-side recipes share one spelling of each status.
The enums are `StrEnum`s: a member equals its AWS string ("ACTIVE"), is stored in SQLite and serialised
to JSON as that string, and formats as it in messages.

Every value type is a frozen dataclass the registry builds from its rows; times are epoch seconds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DELETED",
    "CACertificate",
    "CaStatus",
    "Certificate",
    "CertificateMode",
    "CertificateStatus",
    "ManagedThingRole",
    "Policy",
    "PolicyVersion",
    "ProvisioningProfileStatus",
    "ProvisioningStatus",
    "ProvisioningTemplate",
    "ProvisioningType",
    "TemplateType",
    "Thing",
    "TokenGrant",
]


class CertificateStatus(enum.StrEnum):
    """A device certificate's status, as UpdateCertificate and DescribeCertificate spell it."""

    ACTIVE = "ACTIVE"
    INACTIVE = "INACTIVE"
    REVOKED = "REVOKED"  # final: no status change leaves it
    PENDING_TRANSFER = "PENDING_TRANSFER"
    REGISTER_INACTIVE = "REGISTER_INACTIVE"
    PENDING_ACTIVATION = "PENDING_ACTIVATION"  # JITR: registered at first connect, waiting for activation


class CaStatus(enum.StrEnum):
    """A registered CA certificate's status (UpdateCACertificate's newStatus)."""

    ACTIVE = "ACTIVE"
    INACTIVE = "INACTIVE"


class CertificateMode(enum.StrEnum):
    """How a certificate is presented: DEFAULT, or SNI_ONLY (registered without its CA)."""

    DEFAULT = "DEFAULT"
    SNI_ONLY = "SNI_ONLY"


class TemplateType(enum.StrEnum):
    """What a provisioning template serves: fleet provisioning by claim, or JITP."""

    FLEET_PROVISIONING = "FLEET_PROVISIONING"
    JITP = "JITP"


class ProvisioningType(enum.StrEnum):
    """Managed integrations: how the hubs of a provisioning profile get their certificates."""

    FLEET_PROVISIONING = "FLEET_PROVISIONING"
    JITR = "JITR"


class ProvisioningProfileStatus(enum.StrEnum):
    """Managed integrations: a provisioning profile's status (this stand-in creates them at once)."""

    CREATE_IN_PROGRESS = "CREATE_IN_PROGRESS"
    CREATE_FAILED = "CREATE_FAILED"
    CREATED = "CREATED"
    DELETE_IN_PROGRESS = "DELETE_IN_PROGRESS"
    DELETE_FAILED = "DELETE_FAILED"


class ManagedThingRole(enum.StrEnum):
    """Managed integrations: a hub is a CONTROLLER, what it controls a DEVICE."""

    CONTROLLER = "CONTROLLER"
    DEVICE = "DEVICE"


class ProvisioningStatus(enum.StrEnum):
    """Managed integrations: where a managed thing is in its life (GetManagedThing's ProvisioningStatus)."""

    UNASSOCIATED = "UNASSOCIATED"
    PRE_ASSOCIATED = "PRE_ASSOCIATED"  # created for a hub that has not provisioned yet
    DISCOVERED = "DISCOVERED"
    ACTIVATED = "ACTIVATED"  # the hub provisioned: its certificate is ACTIVE
    DELETION_FAILED = "DELETION_FAILED"
    DELETE_IN_PROGRESS = (
        "DELETE_IN_PROGRESS"  # its certificate is INACTIVE; waiting for its connection to end
    )
    ISOLATED = "ISOLATED"
    DELETED = "DELETED"


# What a certificate listener receives when the certificate was deleted: not a status a certificate can
# have, so it is no member of CertificateStatus.
DELETED: Final = "DELETED"


@dataclass(frozen=True)
class Certificate:
    certificate_id: str
    arn: str
    pem: str  # "" in listings, which do not show it
    status: CertificateStatus
    ca_certificate_id: str | None
    mode: CertificateMode
    created: float
    last_modified: float
    customer_version: int
    generation_id: str


@dataclass(frozen=True)
class CACertificate:
    certificate_id: str
    arn: str
    pem: str
    status: CaStatus
    auto_registration: bool
    registration_config: dict[str, str] | None  # JITP: templateBody and roleArn (or templateName)
    mode: CertificateMode
    created: float
    last_modified: float
    customer_version: int
    generation_id: str


@dataclass(frozen=True)
class Policy:
    name: str
    arn: str
    document: str
    version_id: str
    created: float
    last_modified: float


@dataclass(frozen=True)
class PolicyVersion:
    policy_name: str
    version_id: str
    document: str
    created: float
    is_default: bool


@dataclass(frozen=True)
class Thing:
    name: str
    arn: str
    thing_id: str
    thing_type_name: str | None
    attributes: dict[str, str]
    version: int


@dataclass(frozen=True)
class ProvisioningTemplate:
    name: str
    arn: str
    description: str | None
    body: str
    enabled: bool
    role_arn: str
    hook: dict[str, str] | None  # preProvisioningHook: targetArn and payloadVersion
    template_type: TemplateType
    created: float
    last_modified: float
    version_id: int


@dataclass(frozen=True)
class TokenGrant:
    """What a spent certificate ownership token was issued for."""

    certificate_id: str
    claim_certificate_id: str | None
