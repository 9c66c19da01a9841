"""`iot-core-local setup-fleet`, `setup-managed` and `setup-jitr`: a hub maker's cloud set-up, against a
running stand-in.

Each finds the server through `DIR/endpoint.json` (written by `iot-core-local serve --data-dir DIR`), runs
the customer-side recipes through a boto3 client, writes what a factory puts on a hub into an output
folder (certificates 0644, keys 0600, the folder 0700), and prints one line per resource: `created`, or
`exists` when an earlier run made it. A rerun creates nothing that is there already and ends the same way;
a file in the output folder is never overwritten.

`setup-managed` is managed integrations' set-up (the custom endpoint, a provisioning profile, a
PRE_ASSOCIATED managed thing per hub). `setup-jitr` then runs the JITR activator (the customer's rule and
Lambda function) until SIGINT or SIGTERM. `setup-fleet` needs nothing running: its template's
pre-provisioning hook is the takeover guard's Lambda function, which the stand-in hosts itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from .ca import certificate_id as certificate_id_of
from .recipes.claims import (
    create_claim,
    create_unless_present,
    ensure_fleet_provisioning,
    hub_policy_document,
    takeover_guard_arn,
)
from .recipes.credential_files import private_folder, write_pair
from .recipes.jitr import DeviceCA, JitrActivator, registration_event_topic
from .recipes.managed_integrations import Hub, find_profile, set_up_managed_integrations
from .registry import ACCOUNT_ID
from .server import Endpoint
from .signals import TerminationSignals

log = logging.getLogger(__name__)

CLAIM_FILES = ("claim.pem.crt", "claim.pem.key")
DHA_FILES = ("dha.pem.crt", "dha.pem.key")
CA_FILES = ("device-ca.pem", "device-ca.key")


class SetupError(Exception):
    """Why a set-up cannot go on, in one line naming the problem and the fix."""


@dataclass(frozen=True)
class Cloud:
    """A running stand-in, as its endpoint file describes it, and a boto3 IoT client for it."""

    endpoint: Endpoint
    client: Any

    @classmethod
    def of(cls, data_dir: Path) -> Cloud:
        path = data_dir / "endpoint.json"
        try:
            endpoint = Endpoint.from_json(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise SetupError(
                f"{path} does not exist: start 'iot-core-local serve --data-dir {data_dir}' first"
            ) from None
        except (OSError, ValueError, KeyError) as exc:
            raise SetupError(f"{path} cannot be read ({exc}): restart iot-core-local serve") from None
        return cls(endpoint, endpoint.client())

    def print_hub_settings(self) -> None:
        """The two `ro` values of iotmi_config.json that name this cloud."""
        print(f"endpoint_url {self.endpoint.mqtt_address}")
        print(f"iot_root_ca_path {self.endpoint.root_ca_path}")


def _report(what: str, created: bool, detail: str = "") -> None:
    print(f"{what}: {'created' if created else 'exists'}{detail}", flush=True)


def _existing_pair(folder: Path, names: tuple[str, str]) -> tuple[str, str] | None:
    """The (certificate, key) texts when both files exist; None when neither does; else SetupError."""
    paths = [folder / n for n in names]
    present = [p.exists() for p in paths]
    if not any(present):
        return None
    if not all(present):
        missing = paths[present.index(False)]
        raise SetupError(
            f"{missing} is missing beside {paths[present.index(True)]}: remove both to start over"
        )
    return paths[0].read_text(encoding="utf-8"), paths[1].read_text(encoding="utf-8")


def set_up_fleet(data_dir: Path, out: Path, template_name: str) -> None:
    """Template, policies and a claim certificate in the cloud; the claim pair in `out`.

    The template's hook is the takeover guard the stand-in hosts, also on a rerun: a template left by an
    older set-up without a hook, or naming the loopback URL of an old `--takeover-guard`, is pointed at
    it (a hook of the hub maker's own is kept); a claim policy without the Deny of the hubs' client ids
    gets it added (the recipe's `ensure_fleet_provisioning`)."""
    cloud = Cloud.of(data_dir)
    iot = cloud.client
    hook = takeover_guard_arn(iot.meta.region_name, ACCOUNT_ID)
    # The recipe's default hook: a hook of the hub maker's own on an existing template is kept.
    resources = ensure_fleet_provisioning(iot, template_name, account=ACCOUNT_ID)
    for what in (*resources.created, *resources.existing):
        _report(what, what in resources.created)
    named = iot.describe_provisioning_template(templateName=template_name).get("preProvisioningHook") or {}
    if named.get("targetArn") == hook:
        print(f"takeover guard: {hook} (hosted by iot-core-local)", flush=True)
    else:  # the hub maker's own hook, kept: it has to refuse an onboarded serial itself
        print(f"pre-provisioning hook: {named.get('targetArn')} (your own, kept)", flush=True)
    private_folder(out)
    existing = _existing_pair(out, CLAIM_FILES)
    if existing is not None:
        certificate_id = certificate_id_of(x509.load_pem_x509_certificate(existing[0].encode()))
        try:
            arn = iot.describe_certificate(certificateId=certificate_id)["certificateDescription"][
                "certificateArn"
            ]
        except iot.exceptions.ResourceNotFoundException:
            raise SetupError(
                f"{out / CLAIM_FILES[0]} is not a certificate of the cloud in {data_dir}: "
                "remove the claim files to make a new claim"
            ) from None
        _require_claim_policy(iot, out, arn, resources.claim_policy_name)
        _report(f"claim certificate {certificate_id}", False, f", {out / CLAIM_FILES[0]}")
    else:
        claim = create_claim(iot, resources)
        write_pair(out, CLAIM_FILES, claim.certificate_pem, claim.private_key_pem)
        _report(
            f"claim certificate {claim.certificate_id}",
            True,
            f", {out / CLAIM_FILES[0]} and {out / CLAIM_FILES[1]}",
        )
    cloud.print_hub_settings()


def _require_claim_policy(iot: Any, out: Path, certificate_arn: str, policy_name: str) -> None:
    """A claim pair left in `out` by another template or profile (e.g. `setup-managed`) would be refused
    RegisterThing under this template: say so rather than report it as this template's claim."""
    attached = [p["policyName"] for p in iot.list_attached_policies(target=certificate_arn)["policies"]]
    if policy_name not in attached:
        raise SetupError(
            f"{out / CLAIM_FILES[0]} is the claim of another template or profile (policies: "
            f"{', '.join(attached) or 'none'}), not one with {policy_name}: use another --out folder"
        )


def set_up_managed(data_dir: Path, out: Path, profile_name: str, hubs: list[Hub]) -> None:
    """The custom endpoint, a provisioning profile and a managed thing per hub; the claim pair in `out`."""
    cloud = Cloud.of(data_dir)
    client = cloud.endpoint.client(cloud.client.meta.region_name, service="iot-managed-integrations")
    existing = find_profile(client, profile_name)
    if existing is not None and not _holds_claim(out, existing["ClaimCertificate"]):
        # Checked before anything is made (no managed thing created for a folder no hub can onboard from):
        # the recipe only reports it, since a library caller may keep the claim elsewhere.
        raise SetupError(
            f"{out} does not hold the claim of provisioning profile {profile_name} (its private key was "
            "returned once, when the profile was created): use the --out folder given then, or delete the "
            f"profile (aws iot-managed-integrations delete-provisioning-profile --identifier {profile_name}) "
            "to make a new claim"
        )
    try:
        setup = set_up_managed_integrations(client, profile_name, hubs, claim_folder=out)
    except FileExistsError as exc:
        raise SetupError(str(exc)) from None
    for step in setup.steps:
        print(step, flush=True)
    cloud.print_hub_settings()
    print(f"fp_template_name {setup.template_name}")


def _holds_claim(out: Path, claim_certificate_pem: str) -> bool:
    """Whether `out` holds this claim certificate and a key beside it (the pair a hub onboards with)."""
    cert_path, key_path = (out / name for name in CLAIM_FILES)
    saved = cert_path.read_text(encoding="utf-8").strip() if cert_path.is_file() else None
    return saved == claim_certificate_pem.strip() and key_path.is_file()


def set_up_jitr(
    data_dir: Path,
    out: Path,
    common_name: str,
    ca_dir: Path | None,
    *,
    run: Callable[[JitrActivator], None] | None = None,
) -> None:
    """Register a device CA, issue a DHA pair into `out`, and run the activator (`run`: until a signal)."""
    cloud = Cloud.of(data_dir)
    iot = cloud.client
    ca_dir = ca_dir if ca_dir is not None else out / "device-ca"
    private_folder(ca_dir)
    saved = _existing_pair(ca_dir, CA_FILES)
    ca = DeviceCA.from_pem(*saved) if saved is not None else DeviceCA()
    if saved is None:
        write_pair(ca_dir, CA_FILES, ca.certificate_pem, ca.private_key_pem)
    _report(f"device CA {ca.certificate_id}", ca.ensure_registered(iot), f", {ca_dir / CA_FILES[0]}")
    policy_name = "JitrHub-device"
    created = create_unless_present(
        iot,
        iot.create_policy,
        policyName=policy_name,
        policyDocument=hub_policy_document(iot.meta.region_name, "123456789012"),
    )
    _report(f"policy {policy_name}", created)
    private_folder(out)
    dha = _existing_pair(out, DHA_FILES)
    if dha is None:
        device = ca.issue_device(common_name)
        write_pair(out, DHA_FILES, device.certificate_pem, device.private_key_pem)
    _report(f"device certificate {DHA_FILES[0]}", dha is None, f", {out / DHA_FILES[0]}")
    cloud.print_hub_settings()
    activator = JitrActivator(
        iot,
        host=cloud.endpoint.mqtt_host,
        port=cloud.endpoint.mqtt_port,
        root_ca_pem=Path(cloud.endpoint.root_ca_path).read_bytes(),
        ca_certificate_id=ca.certificate_id,
        device_policy_name=policy_name,
    )
    activator.start()
    try:
        print(
            f"JITR activator: listening on {registration_event_topic(ca.certificate_id)} (Ctrl-C to stop)",
            flush=True,
        )
        (run or _until_signal)(activator)
    finally:
        activator.stop()


def _until_signal(_running: object) -> None:
    with TerminationSignals() as signals:
        signals.wait()
