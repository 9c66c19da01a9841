"""What fleet provisioning by claim needs in the cloud, created through any boto3 IoT client.

The same calls work against iot-core-local and against real AWS IoT Core, so the demo, the tests, the
benchmarks and a hub maker's own set-up script share one recipe: a provisioning template, the policy
the provisioned hubs get, a claim policy that allows nothing but provisioning, and a claim certificate.
Running it again is safe: the template and policies already there are kept, and a new claim certificate
is made (a claim's private key cannot be fetched again).

Every hub holds the same claim, so the claim must not let one hub become another. Its policy denies
connecting with any client id a provisioned hub uses (`hub-*`, the thing names; so a serial must not start
with `hub-`), and the template's pre-provisioning hook refuses a serial whose thing already has an ACTIVE
certificate. Without a hook the template cannot refuse that: a template only names the thing after the
serial, and attaching a second certificate to an existing thing is what RegisterThing does. So the hook is
there by default: the Lambda function `TAKEOVER_GUARD_FUNCTION` of the account and region, which runs
`recipes.takeover.lambda_handler` in AWS and which iot-core-local hosts itself. Until that function exists
in AWS, RegisterThing fails (closed), it never lets a hub through unchecked.
"""

from __future__ import annotations

import json
import urllib.parse
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
# The Lambda function the templates name as their pre-provisioning hook unless told otherwise: deploy
# `recipes.takeover.lambda_handler` under this name in AWS; iot-core-local answers it in-process.
TAKEOVER_GUARD_FUNCTION = "HubTakeoverGuard"
HOOK_PAYLOAD_VERSION = "2020-04-01"


def takeover_guard_arn(region: str, account: str) -> str:
    """The ARN of the takeover guard's Lambda function in `account` and `region`."""
    return f"arn:aws:lambda:{region}:{account}:function:{TAKEOVER_GUARD_FUNCTION}"


def claim_deny_statement(
    region: str, account: str, hub_client_ids: str = f"{THING_PREFIX}*"
) -> dict[str, Any]:
    """The claim policy's statement that keeps the claim from connecting as a provisioned hub."""
    return {
        "Effect": "Deny",
        "Action": "iot:Connect",
        "Resource": f"arn:aws:iot:{region}:{account}:client/{hub_client_ids}",
    }


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
                claim_deny_statement(region, account, hub_client_ids),
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
    takeover_guard: bool = True,
) -> ClaimSetup:
    """Create the template, both policies and an ACTIVE claim certificate; return the claim material.

    The template's pre-provisioning hook is the takeover guard, the Lambda function
    `TAKEOVER_GUARD_FUNCTION` of `account` and `region` (iot-core-local hosts it; in AWS deploy
    `recipes.takeover.lambda_handler` under that name, or every RegisterThing is refused). `hook_url`
    names another hook instead (`TakeoverGuard.url`, or a function of your own that calls
    `takeover_decision`). `takeover_guard=False` without `hook_url` leaves the template without a hook:
    UNSAFE, a hub holding the claim can then register under another hub's serial and take it over.
    Against real AWS pass your own account id and a role that IoT may assume to provision things.
    A template or policy of the same name that already exists is kept, brought up to date where it
    would let a takeover through (`ensure_fleet_provisioning`); a second run, or a second factory line,
    gets its own claim certificate under the same template.
    """
    resources = ensure_fleet_provisioning(
        client,
        template_name,
        region=region,
        account=account,
        role_arn=role_arn,
        hook_url=hook_url,
        takeover_guard=takeover_guard,
    )
    return create_claim(client, resources)


MAX_POLICY_VERSIONS = 5  # AWS keeps at most five versions of a policy


def ensure_fleet_provisioning(
    client: Any,
    template_name: str = "HubTemplate",
    *,
    region: str | None = None,
    account: str = "123456789012",
    role_arn: str = "arn:aws:iam::123456789012:role/IoTProvisioningRole",
    hook_url: str | None = None,
    takeover_guard: bool = True,
) -> FleetResources:
    """Create the hub policy, the claim policy and the template unless they exist.

    What exists is kept as it is, but for what would let a takeover through: a claim policy without the
    Deny of `claim_deny_statement` gets a new default version (the recommended document), and a template
    is pointed at `hook_url` when one is given and it names another, or at the takeover guard when it has
    no hook at all (unless `takeover_guard=False`). Those changes are listed in `created`.
    """
    region = region or client.meta.region_name
    hub_policy = f"{template_name}-hub"
    claim_policy = f"{template_name}-claim"
    target = (
        hook_url if hook_url is not None else takeover_guard_arn(region, account) if takeover_guard else None
    )
    template: dict[str, Any] = {
        "templateName": template_name,
        "templateBody": hub_template_body(hub_policy),
        "provisioningRoleArn": role_arn,
        "enabled": True,
    }
    if target is not None:
        template["preProvisioningHook"] = {"targetArn": target, "payloadVersion": HOOK_PAYLOAD_VERSION}
    claim_document = claim_policy_document(region, account, template_name)
    steps: list[tuple[str, Callable[..., object], dict[str, Any]]] = [
        (
            f"policy {hub_policy}",
            client.create_policy,
            {"policyName": hub_policy, "policyDocument": hub_policy_document(region, account)},
        ),
        (
            f"policy {claim_policy}",
            client.create_policy,
            {"policyName": claim_policy, "policyDocument": claim_document},
        ),
        (f"template {template_name}", client.create_provisioning_template, template),
    ]
    created: list[str] = []
    existing: list[str] = []
    for what, create, request in steps:
        (created if create_unless_present(client, create, **request) else existing).append(what)
    if f"policy {claim_policy}" in existing:
        version = _add_claim_deny(client, claim_policy, claim_document, claim_deny_statement(region, account))
        if version is not None:
            created.append(f"version {version} of policy {claim_policy}, denying the hubs' client ids")
    if target is not None and f"template {template_name}" in existing:
        hook = client.describe_provisioning_template(templateName=template_name).get("preProvisioningHook")
        current = (hook or {}).get("targetArn")
        # An explicit hook replaces whatever the template names (the guard of an earlier run may have had
        # another address, and a template left naming a closed one would refuse every hub); the default
        # one only fills a template that has none, or one naming a guard an older set-up served on this
        # machine's loopback (gone with that process), so a hook of the hub maker's own is kept.
        if current != target and (hook_url is not None or not current or _old_local_guard(current)):
            client.update_provisioning_template(
                templateName=template_name, preProvisioningHook=template["preProvisioningHook"]
            )
            created.append(f"pre-provisioning hook of template {template_name}")
    return FleetResources(template_name, claim_policy, hub_policy, tuple(created), tuple(existing))


def _old_local_guard(target: str) -> bool:
    """Whether a template's hook names the loopback URL an older `setup-fleet --takeover-guard` served."""
    parts = urllib.parse.urlsplit(target)
    # TakeoverGuard's address (recipes.takeover): a hook of the hub maker's own on loopback is kept.
    local = parts.hostname in ("127.0.0.1", "::1", "localhost")
    return parts.scheme == "http" and local and parts.path == "/takeover-guard"


def _add_claim_deny(client: Any, name: str, document: str, deny: dict[str, Any]) -> str | None:
    """Give claim policy `name` a new default version with `deny` added, unless its default version denies
    that connect already (an account set up before the claim policy had it); the new version's id, or None.

    The hub maker's own statements are kept: `deny` is appended to the document in force. A policy that
    is not a JSON object with statements gets the recommended `document` instead.
    """
    current = json.loads(client.get_policy(policyName=name)["policyDocument"])
    statements = current.get("Statement") if isinstance(current, dict) else None
    if isinstance(statements, dict):
        statements = [statements]
    if isinstance(statements, list):
        if any(_denies_like(statement, deny) for statement in statements):
            return None
        document = json.dumps({**current, "Statement": [*statements, deny]})
    versions = client.list_policy_versions(policyName=name)["policyVersions"]
    if len(versions) >= MAX_POLICY_VERSIONS:
        # AWS refuses a sixth version: the oldest one not in use makes room.
        oldest = min(
            (v for v in versions if not v["isDefaultVersion"]),
            key=lambda v: (v["createDate"], int(v["versionId"])),
        )
        client.delete_policy_version(policyName=name, policyVersionId=oldest["versionId"])
    created = client.create_policy_version(policyName=name, policyDocument=document, setAsDefault=True)
    return str(created["policyVersionId"])


def _denies_like(statement: object, deny: dict[str, Any]) -> bool:
    """Whether `statement` denies at least what `deny` does: iot:Connect (or iot:*, *) on its resource
    (or *), with no condition narrowing it. Written with one action or a list, either way."""

    def values(value: object) -> list[object]:
        return value if isinstance(value, list) else [value]

    if not isinstance(statement, dict) or statement.get("Effect") != "Deny" or "Condition" in statement:
        return False
    actions = values(statement.get("Action"))
    resources = values(statement.get("Resource"))
    return any(a in ("iot:Connect", "iot:*", "*") for a in actions) and any(
        r in (deny["Resource"], "*") for r in resources
    )


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
