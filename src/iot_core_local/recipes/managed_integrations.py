"""What managed integrations needs before a hub onboards, created through any boto3 client of
`iot-managed-integrations` (real AWS, or iot-core-local's `apiUrl`).

In the order AWS documents it: the account's custom endpoint (`RegisterCustomEndpoint`), a provisioning
profile (`CreateProvisioningProfile`, FLEET_PROVISIONING: the claim certificate the hubs carry, and the
template whose name is the hubs' `fp_template_name`), and one managed thing per hub, created before the
hub ever connects, as a factory line would (`CreateManagedThing`, Role CONTROLLER, material type
WIFI_SETUP_QR_BAR_CODE, material `SN:<serial>;UPC:<upc>`: PRE_ASSOCIATED until the hub onboards).

Idempotent: a rerun finds what exists (the endpoint, the profile by name, each hub's managed thing by
serial) and says so instead of failing. The one thing a rerun cannot give back is the claim's private key:
the service returns it once, at creation. With `claim_folder` the recipe saves the claim there at
creation and a rerun names where it is; without, the caller must keep the key from the first run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iot_core_local.recipes.credential_files import private_folder, write_pair

CLAIM_FILES = ("claim.pem.crt", "claim.pem.key")
CONTROLLER = "CONTROLLER"
WIFI_SETUP_QR_BAR_CODE = "WIFI_SETUP_QR_BAR_CODE"
FLEET_PROVISIONING = "FLEET_PROVISIONING"
# A managed thing in these states no longer stands for its serial: a new one may be created beside it.
GONE = frozenset({"DELETE_IN_PROGRESS", "DELETED"})


@dataclass(frozen=True)
class Hub:
    """A hub as its label gives it: serial number, and a 12-digit UPC or an EAN (never both)."""

    serial: str
    upc: str | None = None
    ean: str | None = None

    def __post_init__(self) -> None:
        if (self.upc is None) == (self.ean is None):
            raise ValueError(f"hub {self.serial!r}: give its UPC or its EAN (one of them)")

    @property
    def material(self) -> str:
        """The `AuthenticationMaterial` AWS documents for a hub: `SN:<serial>;UPC:<upc>` (or `EAN:`)."""
        code = f"UPC:{self.upc}" if self.upc is not None else f"EAN:{self.ean}"
        return f"SN:{self.serial};{code}"


@dataclass(frozen=True)
class Step:
    """One resource of the set-up: `created` now, or found as an earlier run left it."""

    what: str
    created: bool
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.what}: {'created' if self.created else 'exists'}{self.detail}"


@dataclass(frozen=True)
class ManagedHub:
    serial: str
    managed_thing_id: str
    status: str  # ProvisioningStatus when last read (PRE_ASSOCIATED right after creation)


@dataclass(frozen=True)
class ManagedIntegrationsSetup:
    """What the hubs of a line need (endpoint, profile name, claim) and what the set-up did."""

    endpoint_address: str
    profile_name: str
    profile_id: str
    profile_arn: str
    claim_certificate_pem: str
    claim_private_key_pem: str | None = field(repr=False)  # None on a rerun: returned at creation only
    claim_folder: Path | None
    hubs: tuple[ManagedHub, ...]
    steps: tuple[Step, ...]

    @property
    def template_name(self) -> str:
        """The hubs' `fp_template_name`: the profile's name."""
        return self.profile_name


def set_up_managed_integrations(
    client: Any,
    profile_name: str,
    hubs: Iterable[Hub],
    *,
    claim_folder: Path | None = None,
    claim_certificate_pem: str | None = None,
) -> ManagedIntegrationsSetup:
    """Ensure the custom endpoint, the FLEET_PROVISIONING profile `profile_name` and a PRE_ASSOCIATED
    managed thing for each of `hubs`, through `client` (boto3's "iot-managed-integrations").

    `claim_folder`: where the claim is saved at creation (claim.pem.crt 0644, claim.pem.key 0600, the
    folder 0700); a rerun checks it holds the profile's claim. `claim_certificate_pem`: a claim certificate
    of your own for a new profile (AWS then returns no private key: you have it).
    """
    steps: list[Step] = []
    endpoint, created = ensure_custom_endpoint(client)
    steps.append(Step("custom endpoint", created, f", {endpoint}"))
    profile, key = find_profile(client, profile_name), None
    if profile is None:
        if claim_folder is not None:  # checked first: the key of a profile created now cannot be lost
            _refuse_used_folder(claim_folder)
        profile, key = create_profile(client, profile_name, claim_certificate_pem)
    claim_pem = profile["ClaimCertificate"]
    steps.append(Step(f"provisioning profile {profile_name}", key is not None, f", id {profile['Id']}"))
    steps.append(_claim_step(profile_name, claim_pem, key, claim_folder))
    managed: list[ManagedHub] = []
    for hub in hubs:
        thing, created = ensure_managed_thing(client, hub)
        managed.append(ManagedHub(hub.serial, thing["Id"], thing["ProvisioningStatus"]))
        steps.append(
            Step(f"managed thing {hub.serial}", created, f", id {thing['Id']} {thing['ProvisioningStatus']}")
        )
    return ManagedIntegrationsSetup(
        endpoint_address=endpoint,
        profile_name=profile["Name"],
        profile_id=profile["Id"],
        profile_arn=profile["Arn"],
        claim_certificate_pem=claim_pem,
        claim_private_key_pem=key,
        claim_folder=claim_folder,
        hubs=tuple(managed),
        steps=tuple(steps),
    )


def ensure_custom_endpoint(client: Any) -> tuple[str, bool]:
    """The account's device data endpoint, registered unless it is already; (address, registered now)."""
    try:
        address: str = client.get_custom_endpoint()["EndpointAddress"]
    except client.exceptions.ResourceNotFoundException:
        pass
    else:
        return address, False
    try:
        address = client.register_custom_endpoint()["EndpointAddress"]
    except client.exceptions.ConflictException:  # registered meanwhile by another run
        return client.get_custom_endpoint()["EndpointAddress"], False
    return address, True


def find_profile(client: Any, name: str) -> dict[str, Any] | None:
    """The profile named `name` (GetProvisioningProfile's answer), or None."""
    for item in _pages(client.list_provisioning_profiles, {}):
        if item.get("Name") == name:
            profile: dict[str, Any] = client.get_provisioning_profile(Identifier=item["Id"])
            return profile
    return None


def create_profile(
    client: Any, name: str, claim_certificate_pem: str | None = None
) -> tuple[dict[str, Any], str | None]:
    """(the profile, the claim's private key when it was created now; None when another run created it
    meanwhile, or when the claim certificate was given)."""
    request: dict[str, Any] = {"ProvisioningType": FLEET_PROVISIONING, "Name": name}
    if claim_certificate_pem is not None:
        request["ClaimCertificate"] = claim_certificate_pem
    # botocore fills in ClientToken, and its own retries reuse it: a lost answer makes no second profile.
    try:
        created: dict[str, Any] = client.create_provisioning_profile(**request)
    except client.exceptions.ConflictException:  # created meanwhile by another run
        existing = find_profile(client, name)
        if existing is None:
            raise
        return existing, None
    return created, created.get("ClaimCertificatePrivateKey")


def find_managed_thing(client: Any, serial: str) -> dict[str, Any] | None:
    """The CONTROLLER managed thing that stands for `serial` (not being deleted), or None."""
    request = {"SerialNumberFilter": serial, "RoleFilter": CONTROLLER}
    for item in _pages(client.list_managed_things, request):
        if item.get("SerialNumber") == serial and item.get("ProvisioningStatus") not in GONE:
            return item
    return None


def ensure_managed_thing(client: Any, hub: Hub) -> tuple[dict[str, Any], bool]:
    """The hub's managed thing (Id, ProvisioningStatus, ...), created PRE_ASSOCIATED unless one exists."""
    existing = find_managed_thing(client, hub.serial)
    if existing is not None:
        return existing, False
    try:
        created = client.create_managed_thing(
            Role=CONTROLLER,
            AuthenticationMaterialType=WIFI_SETUP_QR_BAR_CODE,
            AuthenticationMaterial=hub.material,
        )
    except client.exceptions.ConflictException:  # created meanwhile by another run
        existing = find_managed_thing(client, hub.serial)
        if existing is None:
            raise
        return existing, False
    thing: dict[str, Any] = client.get_managed_thing(Identifier=created["Id"])
    return thing, True


def _claim_step(profile: str, claim_pem: str, key: str | None, folder: Path | None) -> Step:
    what = f"claim certificate of {profile}"
    if folder is None:
        if key is None:
            return Step(what, False, ": its private key was returned once, when the profile was created")
        return Step(what, True, " (its private key is returned this once: keep it)")
    cert_path, key_path = (folder / n for n in CLAIM_FILES)
    if key is not None:
        private_folder(folder)
        write_pair(folder, CLAIM_FILES, claim_pem, key)
        return Step(what, True, f", saved in {cert_path} and {key_path}")
    if not key_path.exists() or not cert_path.exists():
        return Step(
            what,
            False,
            f", but not in {folder}: its private key was returned once, when the profile was created; "
            "delete the profile (DeleteProvisioningProfile) to make a new claim",
        )
    if cert_path.read_text(encoding="utf-8").strip() != claim_pem.strip():
        return Step(
            what,
            False,
            f", but {cert_path} holds another certificate: remove {folder} and delete the profile "
            "to start over",
        )
    return Step(what, False, f", saved in {cert_path} and {key_path}")


def _refuse_used_folder(folder: Path) -> None:
    for name in CLAIM_FILES:
        if os.path.lexists(folder / name):
            raise FileExistsError(
                f"{folder / name} exists, but the profile's claim is about to be created: name a new folder, "
                "or remove the old claim files"
            )


def _pages(operation: Any, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every item of a paged List operation (`Items`, `NextToken`)."""
    token: str | None = None
    while True:
        page = operation(**request, **({"NextToken": token} if token else {}))
        yield from page.get("Items", [])
        token = page.get("NextToken")
        if not token:
            return
