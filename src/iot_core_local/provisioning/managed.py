"""Managed integrations' part in provisioning: matching a hub to the managed thing made for it.

Fleet provisioning: a RegisterThing under a provisioning profile's template must name, in `SerialNumber`
and `UniversalProductCode`, a PRE_ASSOCIATED CONTROLLER managed thing whose authentication material
carries that serial and that UPC (or EAN). Anything else is a `/rejected` answer naming the cause:
UnknownSerialNumber, ProductCodeMismatch, AlreadyOnboarded. A match gives the template the managed
thing's id (a built-in parameter, so a hub cannot choose it), and is committed in RegisterThing's own
transaction: the IoT thing, the ACTIVE certificate with the hub policy, and the managed thing ACTIVATED
stand or fall together. Messages never name another hub's managed thing id.

JITR: a DHA certificate signed by a JITR profile's CA is matched by its subject's serialNumber attribute
(OID 2.5.4.5) to a PRE_ASSOCIATED CONTROLLER managed thing; its IoT thing is named after the certificate's
common name (the client id the hub connects with), and it is activated at its first connection, so the
hub's retry is let in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from ..errors import Conflict, ServiceError
from ..managed import (
    MANAGED_THING_ID_BUILTIN,
    SERIAL_NUMBER_PARAMETER,
    UPC_PARAMETER,
    ManagedIntegrations,
    ManagedThing,
)
from ..model import (
    CACertificate,
    Certificate,
    CertificateStatus,
    ManagedThingRole,
    ProvisioningStatus,
    ProvisioningType,
)
from .fleet import Rejected

__all__ = ["ManagedMatcher", "Match"]

log = logging.getLogger("iot_core_local.gateway")

_ONBOARDED = (ProvisioningStatus.ACTIVATED, ProvisioningStatus.DISCOVERED)


@dataclass(frozen=True)
class Match:
    """The managed thing a RegisterThing matched, and what its template is given for it."""

    thing_id: str
    builtins: dict[str, str]
    hub_policy: str


class ManagedMatcher:
    """Called by fleet provisioning (`match`, then `commit` inside its transaction, then `committed`)
    and by JITR (`activate_jitr`)."""

    def __init__(self, managed: ManagedIntegrations) -> None:
        self.managed = managed

    def _candidate(self, serial: str) -> ManagedThing | None:
        for thing in self.managed.things_with_serial(serial):
            if (
                thing.role == ManagedThingRole.CONTROLLER
                and thing.status != ProvisioningStatus.DELETE_IN_PROGRESS
            ):
                return thing
        return None

    def match(self, template_name: str, parameters: dict[str, str]) -> Match | None:
        """None when the template is no provisioning profile's (plain fleet provisioning goes on)."""
        profile = self.managed.find_profile_by_name(template_name)
        if profile is None or profile.provisioning_type != ProvisioningType.FLEET_PROVISIONING:
            return None
        serial = parameters.get(SERIAL_NUMBER_PARAMETER)
        code = parameters.get(UPC_PARAMETER)
        if not serial or not code:
            raise Rejected(
                400,
                "InvalidParameters",
                f"Provisioning profile {template_name} needs the parameters {SERIAL_NUMBER_PARAMETER} "
                f"and {UPC_PARAMETER}",
            )
        thing = self._candidate(serial)
        if thing is None:
            raise Rejected(
                404,
                "UnknownSerialNumber",
                f"No managed thing has the serial number {serial!r}: create one (CreateManagedThing, Role "
                "CONTROLLER, AuthenticationMaterial SN:...;UPC:...) before the hub provisions",
            )
        if code not in (thing.upc, thing.ean):
            raise Rejected(
                403,
                "ProductCodeMismatch",
                f"The product code {code!r} is not the one the managed thing of serial number {serial!r} "
                "was created with",
            )
        if thing.status in _ONBOARDED:
            raise Rejected(
                409,
                "AlreadyOnboarded",
                f"The hub of serial number {serial!r} is already onboarded ({thing.status}); delete its "
                "managed thing and create it again to onboard it anew",
            )
        if thing.status != ProvisioningStatus.PRE_ASSOCIATED:
            raise Rejected(
                409, "NotPreAssociated", f"The managed thing of serial number {serial!r} is {thing.status}"
            )
        return Match(thing.id, {MANAGED_THING_ID_BUILTIN: thing.id}, profile.hub_policy_name)

    def commit(self, match: Match, certificate_id: str) -> None:
        """ACTIVATED, inside RegisterThing's transaction (rolled back if a concurrent one won)."""
        try:
            self.managed.activate(
                match.thing_id,
                certificate_id=certificate_id,
                iot_thing=match.thing_id,
                hub_policy=match.hub_policy,
            )
        except Conflict:
            raise Rejected(
                409, "AlreadyOnboarded", "The hub was onboarded by another request meanwhile"
            ) from None

    def committed(self, match: Match) -> None:
        self.managed.status_changed(match.thing_id, ProvisioningStatus.ACTIVATED)

    # ---- JITR -----------------------------------------------------------------------------------------

    def activate_jitr(self, cert: x509.Certificate, certificate: Certificate, ca: CACertificate) -> None:
        """A DHA certificate just registered PENDING_ACTIVATION under `ca`: activate it if `ca` is a JITR
        profile's and the subject's serialNumber names a PRE_ASSOCIATED hub. Never raises: a certificate
        that matches nothing stays pending (logged), as AWS leaves an unclaimed JITR certificate."""
        profile = self.managed.jitr_profile_for_ca(ca.certificate_id)
        if profile is None:
            return
        cid = certificate.certificate_id
        serials = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not serials or not names:
            log.info("JITR certificate %s: no subject serialNumber or common name; left pending", cid)
            return
        serial, client_id = str(serials[0].value), str(names[0].value)
        thing = self._candidate(serial)
        if thing is None or thing.status != ProvisioningStatus.PRE_ASSOCIATED:
            why = "no managed thing" if thing is None else f"its managed thing is {thing.status}"
            log.info("JITR certificate %s of serial number %r: %s; left pending", cid, serial, why)
            return
        registry = self.managed.registry
        try:
            with registry.transaction():
                registry.create_thing(
                    client_id, attributes={"managedThingId": thing.id, "serialNumber": serial}
                )
                registry.attach_thing_principal(client_id, certificate.arn)
                registry.attach_policy(profile.hub_policy_name, certificate.arn)
                registry.set_certificate_status(cid, CertificateStatus.ACTIVE)
                self.managed.activate(
                    thing.id, certificate_id=cid, iot_thing=client_id, hub_policy=profile.hub_policy_name
                )
        except ServiceError as e:
            log.info("JITR certificate %s of serial number %r not activated: %s", cid, serial, e.message)
            return
        self.managed.status_changed(thing.id, ProvisioningStatus.ACTIVATED)
