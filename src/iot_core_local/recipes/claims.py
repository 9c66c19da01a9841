"""What fleet provisioning by claim needs in the cloud, created through any boto3 IoT client.

The same calls work against iot-core-local and against real AWS IoT Core, so the demo, the tests, the
benchmarks and a hub maker's own set-up script share one recipe: a provisioning template, the policy
the provisioned hubs get, a claim policy that allows nothing but provisioning, and a claim certificate.
Running it again is safe: the template and policies already there are kept, and a new claim certificate
is made (a claim's private key cannot be fetched again).

Every hub holds the same claim, so the claim must not let one hub become another. Its policy denies
connecting with any client id a provisioned hub uses (`hub-*`, the thing names; so a serial must not start
with `hub-`), and the template's pre-provisioning hook (`hook_url`: the takeover guard of
`recipes.takeover`, a Lambda function in AWS) refuses a serial whose thing already has an ACTIVE
certificate. Without a hook the template cannot refuse that: a template only names the thing after the
serial, and attaching a second certificate to an existing thing is what RegisterThing does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from iot_core_local.model import CertificateStatus

THING_PREFIX = "hub-"  # the template names a hub's thing, and so its client id, "hub-<SerialNumber>"
# The parameter names the hub sends in RegisterThing and the deviceConfiguration keys it reads back.
SERIAL_NUMBER_PARAMETER = "SerialNumber"
UPC_PARAMETER = "UniversalProductCode"
CLIENT_ID_KEY = "ClientId"
MANAGED_THING_ID_KEY = "ManagedThingId"


def claim_policy_document(
    region: str, account: str, template_name: str, hub_client_ids: str = f"{THING_PREFIX}*"
) -> str:
    """AWS's recommended claim policy: connect, and the provisioning topics of one template only.

    Connecting with a client id matching `hub_client_ids` (the provisioned hubs' ones) is denied: the
    shared claim would otherwise disconnect a hub by connecting under its id (one connection per id).
    """
    prefix = f"arn:aws:iot:{region}:{account}"
    topics = [
        "$aws/certificates/create/*",
        "$aws/certificates/create-from-csr/*",
        f"$aws/provisioning-templates/{template_name}/provision/*",
    ]
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
                {"Effect": "Deny", "Action": "iot:Connect", "Resource": f"{prefix}:client/{hub_client_ids}"},
                {
                    "Effect": "Allow",
                    "Action": ["iot:Publish", "iot:Receive"],
                    "Resource": [f"{prefix}:topic/{t}" for t in topics],
                },
                {
                    "Effect": "Allow",
                    "Action": "iot:Subscribe",
                    "Resource": [f"{prefix}:topicfilter/{t}" for t in topics],
                },
            ],
        }
    )


def hub_policy_document(region: str, account: str) -> str:
    """What a provisioned hub may do: connect as its thing, and use its own topics."""
    prefix = f"arn:aws:iot:{region}:{account}"
    thing = "${iot:Connection.Thing.ThingName}"
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{prefix}:client/{thing}"},
                {
                    "Effect": "Allow",
                    "Action": ["iot:Publish", "iot:Receive"],
                    "Resource": f"{prefix}:topic/things/{thing}/*",
                },
                {
                    "Effect": "Allow",
                    "Action": "iot:Subscribe",
                    "Resource": f"{prefix}:topicfilter/things/{thing}/*",
                },
            ],
        }
    )


def hub_credential_resources(hub_policy_name: str) -> dict[str, Any]:
    """The resources every hub template shares: the new certificate ACTIVE, the hub policy attached."""
    return {
        "certificate": {
            "Type": "AWS::IoT::Certificate",
            "Properties": {
                "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"},
                "Status": CertificateStatus.ACTIVE,
            },
        },
        "policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": hub_policy_name}},
    }


def hub_template_body(hub_policy_name: str) -> str:
    """A template in the shape a managed-integrations hub expects (AWS does not publish theirs).

    Thing `hub-<SerialNumber>` with its UPC as an attribute, the certificate made ACTIVE, the hub
    policy attached, and the client id and managed thing id returned in deviceConfiguration. Plain IoT
    has no managed thing: `mt-<SerialNumber>` stands in for the id managed integrations' service gives
    (`recipes.managed_integrations`).
    """
    thing_name = {"Fn::Join": ["", [THING_PREFIX, {"Ref": SERIAL_NUMBER_PARAMETER}]]}
    return json.dumps(
        {
            "Parameters": {
                SERIAL_NUMBER_PARAMETER: {"Type": "String"},
                UPC_PARAMETER: {"Type": "String", "Default": "unknown"},
                "AWS::IoT::Certificate::Id": {"Type": "String"},
            },
            "Resources": {
                "thing": {
                    "Type": "AWS::IoT::Thing",
                    "Properties": {
                        "ThingName": thing_name,
                        "AttributePayload": {"upc": {"Ref": UPC_PARAMETER}},
                    },
                    "OverrideSettings": {"AttributePayload": "MERGE"},
                },
                **hub_credential_resources(hub_policy_name),
            },
            "DeviceConfiguration": {
                CLIENT_ID_KEY: thing_name,
                MANAGED_THING_ID_KEY: {"Fn::Join": ["", ["mt-", {"Ref": SERIAL_NUMBER_PARAMETER}]]},
            },
        }
    )


@dataclass(frozen=True)
class FleetResources:
    """The template and the two policies fleet provisioning needs, and which of them were there already."""

    template_name: str
    claim_policy_name: str
    hub_policy_name: str
    created: tuple[str, ...] = ()  # e.g. "policy HubTemplate-hub", "template HubTemplate"
    existing: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClaimSetup:
    """The claim credentials and names a factory puts on its hubs."""

    template_name: str
    certificate_id: str
    certificate_pem: str
    private_key_pem: str
    claim_policy_name: str
    hub_policy_name: str
    existing: tuple[str, ...] = ()  # what a previous run had created already, kept as it was


def set_up_fleet_provisioning(
    client: Any,
    template_name: str = "HubTemplate",
    *,
    region: str | None = None,
    account: str = "123456789012",
    role_arn: str = "arn:aws:iam::123456789012:role/IoTProvisioningRole",
    hook_url: str | None = None,
) -> ClaimSetup:
    """Create the template, both policies and an ACTIVE claim certificate; return the claim material.

    `hook_url` is the template's pre-provisioning hook: pass the takeover guard's (`TakeoverGuard.url`
    here, the ARN of a Lambda function running `takeover_verdict` in AWS) or a hook of your own that
    calls it; without one, a hub holding the claim can register under another hub's serial.
    Against real AWS pass your own account id and a role that IoT may assume to provision things.
    A template or policy of the same name that already exists is kept as it is (a second run, or a second
    factory line, gets its own claim certificate under the same template).
    """
    resources = ensure_fleet_provisioning(
        client, template_name, region=region, account=account, role_arn=role_arn, hook_url=hook_url
    )
    return create_claim(client, resources)


def ensure_fleet_provisioning(
    client: Any,
    template_name: str = "HubTemplate",
    *,
    region: str | None = None,
    account: str = "123456789012",
    role_arn: str = "arn:aws:iam::123456789012:role/IoTProvisioningRole",
    hook_url: str | None = None,
) -> FleetResources:
    """Create the hub policy, the claim policy and the template unless they exist (kept as they are,
    but for the template's pre-provisioning hook, set to `hook_url` when one is given)."""
    region = region or client.meta.region_name
    hub_policy = f"{template_name}-hub"
    claim_policy = f"{template_name}-claim"
    template: dict[str, Any] = {
        "templateName": template_name,
        "templateBody": hub_template_body(hub_policy),
        "provisioningRoleArn": role_arn,
        "enabled": True,
    }
    if hook_url is not None:
        template["preProvisioningHook"] = {"targetArn": hook_url, "payloadVersion": "2020-04-01"}
    steps: list[tuple[str, Callable[..., object], dict[str, Any]]] = [
        (
            f"policy {hub_policy}",
            client.create_policy,
            {"policyName": hub_policy, "policyDocument": hub_policy_document(region, account)},
        ),
        (
            f"policy {claim_policy}",
            client.create_policy,
            {
                "policyName": claim_policy,
                "policyDocument": claim_policy_document(region, account, template_name),
            },
        ),
        (f"template {template_name}", client.create_provisioning_template, template),
    ]
    created: list[str] = []
    existing: list[str] = []
    for what, create, request in steps:
        (created if create_unless_present(client, create, **request) else existing).append(what)
    if hook_url is not None and f"template {template_name}" in existing:
        # The guard of an earlier run may have had another address: the hook named now is the one that
        # answers, and a template left naming a closed one would refuse every hub.
        hook = client.describe_provisioning_template(templateName=template_name).get("preProvisioningHook")
        if (hook or {}).get("targetArn") != hook_url:
            client.update_provisioning_template(
                templateName=template_name, preProvisioningHook=template["preProvisioningHook"]
            )
            created.append(f"pre-provisioning hook of template {template_name}")
    return FleetResources(template_name, claim_policy, hub_policy, tuple(created), tuple(existing))


def create_claim(client: Any, resources: FleetResources) -> ClaimSetup:
    """A new ACTIVE claim certificate with the claim policy attached (a claim's key is never stored
    by the service, so each call makes a new one)."""
    created = client.create_keys_and_certificate(setAsActive=True)
    client.attach_policy(policyName=resources.claim_policy_name, target=created["certificateArn"])
    return ClaimSetup(
        template_name=resources.template_name,
        certificate_id=created["certificateId"],
        certificate_pem=created["certificatePem"],
        private_key_pem=created["keyPair"]["PrivateKey"],
        claim_policy_name=resources.claim_policy_name,
        hub_policy_name=resources.hub_policy_name,
        existing=resources.existing,
    )


def create_unless_present(client: Any, create: Callable[..., object], **request: Any) -> bool:
    """Call `create(**request)`: True when it created, False when a ResourceAlreadyExistsException says it
    is there already (which is fine: a rerun keeps what exists)."""
    try:
        create(**request)
    except client.exceptions.ResourceAlreadyExistsException:
        return False
    return True
