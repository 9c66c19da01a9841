"""The customer-side recipes: fleet provisioning set-up (run twice), the JITR activator's topic and policy,
and their independence from the server's modules."""

from __future__ import annotations

import ast
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

import iot_core_local.recipes
from iot_core_local.policy import evaluate, validate_policy
from iot_core_local.recipes.claims import (
    claim_deny_statement,
    claim_policy_document,
    ensure_fleet_provisioning,
    hub_template_body,
    set_up_fleet_provisioning,
    takeover_guard_arn,
)
from iot_core_local.recipes.credential_files import private_folder
from iot_core_local.recipes.jitr import DeviceCA, activator_policy_document, registration_event_topic

RECIPES = Path(iot_core_local.recipes.__file__).parent
ARN = "arn:aws:iot:us-east-1:123456789012"


def test_set_up_fleet_provisioning_twice_keeps_the_template_and_makes_a_new_claim(cp_client: Any) -> None:
    first = set_up_fleet_provisioning(cp_client, "Twice")
    second = set_up_fleet_provisioning(cp_client, "Twice")

    assert second.template_name == first.template_name == "Twice"
    assert (second.claim_policy_name, second.hub_policy_name) == (
        first.claim_policy_name,
        first.hub_policy_name,
    )
    assert second.certificate_id != first.certificate_id
    assert [t["templateName"] for t in cp_client.list_provisioning_templates()["templates"]] == ["Twice"]
    policies = sorted(p["policyName"] for p in cp_client.list_policies()["policies"])
    assert policies == ["Twice-claim", "Twice-hub"]
    for setup in (first, second):
        arn = cp_client.describe_certificate(certificateId=setup.certificate_id)["certificateDescription"][
            "certificateArn"
        ]
        attached = cp_client.list_attached_policies(target=arn)["policies"]
        assert [p["policyName"] for p in attached] == ["Twice-claim"]


def test_a_second_run_keeps_the_existing_template_as_it_is(cp_client: Any) -> None:
    set_up_fleet_provisioning(cp_client, "Kept", hook_url="http://127.0.0.1:9/hook")
    set_up_fleet_provisioning(cp_client, "Kept")
    described = cp_client.describe_provisioning_template(templateName="Kept")
    assert described["preProvisioningHook"]["targetArn"] == "http://127.0.0.1:9/hook"


def test_a_second_run_with_another_hook_points_the_template_at_it(cp_client: Any) -> None:
    set_up_fleet_provisioning(cp_client, "Moved", hook_url="http://127.0.0.1:9/old")
    again = ensure_fleet_provisioning(cp_client, "Moved", hook_url="http://127.0.0.1:9/new")
    assert again.created == ("pre-provisioning hook of template Moved",)
    described = cp_client.describe_provisioning_template(templateName="Moved")
    assert described["preProvisioningHook"]["targetArn"] == "http://127.0.0.1:9/new"
    assert ensure_fleet_provisioning(cp_client, "Moved", hook_url="http://127.0.0.1:9/new").created == ()


GUARD = "arn:aws:lambda:us-east-1:123456789012:function:HubTakeoverGuard"


def _hook(cp_client: Any, template: str) -> str | None:
    hook = cp_client.describe_provisioning_template(templateName=template).get("preProvisioningHook")
    return None if hook is None else str(hook["targetArn"])


def test_the_template_names_the_takeover_guard_unless_told_otherwise(cp_client: Any) -> None:
    assert takeover_guard_arn("us-east-1", "123456789012") == GUARD
    set_up_fleet_provisioning(cp_client, "Default")
    assert _hook(cp_client, "Default") == GUARD
    set_up_fleet_provisioning(cp_client, "Own", hook_url="http://127.0.0.1:9/own")
    assert _hook(cp_client, "Own") == "http://127.0.0.1:9/own"
    set_up_fleet_provisioning(cp_client, "Unsafe", takeover_guard=False)
    assert _hook(cp_client, "Unsafe") is None


def test_a_rerun_points_a_template_without_a_hook_at_the_guard(cp_client: Any) -> None:
    set_up_fleet_provisioning(cp_client, "Bare", takeover_guard=False)
    again = ensure_fleet_provisioning(cp_client, "Bare")
    assert again.created == ("pre-provisioning hook of template Bare",)
    assert _hook(cp_client, "Bare") == GUARD
    assert ensure_fleet_provisioning(cp_client, "Bare").created == ()
    # Opting out again does not take the guard away.
    assert ensure_fleet_provisioning(cp_client, "Bare", takeover_guard=False).created == ()
    assert _hook(cp_client, "Bare") == GUARD


def _old_claim_policy(template: str) -> str:
    """The claim policy of a set-up made before it denied the hubs' client ids."""
    document = json.loads(claim_policy_document("us-east-1", "123456789012", template))
    document["Statement"].remove(claim_deny_statement("us-east-1", "123456789012"))
    return json.dumps(document)


def test_a_rerun_gives_an_old_claim_policy_the_deny(cp_client: Any) -> None:
    cp_client.create_policy(policyName="Old-claim", policyDocument=_old_claim_policy("Old"))
    client_arn = f"{ARN}:client/hub-SN-0001"
    assert evaluate([_old_claim_policy("Old")], "iot:Connect", client_arn, {})

    again = ensure_fleet_provisioning(cp_client, "Old")

    assert "version 2 of policy Old-claim, denying the hubs' client ids" in again.created
    document = cp_client.get_policy(policyName="Old-claim")["policyDocument"]
    recommended = json.loads(claim_policy_document("us-east-1", "123456789012", "Old"))["Statement"]
    assert sorted(map(json.dumps, json.loads(document)["Statement"])) == sorted(map(json.dumps, recommended))
    assert not evaluate([document], "iot:Connect", client_arn, {})
    versions = cp_client.list_policy_versions(policyName="Old-claim")["policyVersions"]
    assert [(v["versionId"], v["isDefaultVersion"]) for v in versions] == [("2", True), ("1", False)]
    assert not any("Old-claim" in what for what in ensure_fleet_provisioning(cp_client, "Old").created)


def test_a_rerun_keeps_the_hub_makers_own_claim_statements(cp_client: Any) -> None:
    # Before: a rerun replaced a claim policy without the Deny by the recipe's document, dropping the hub
    # maker's own statements, and took a Deny written with a list of actions for a missing one.
    own = {"Effect": "Allow", "Action": "iot:Publish", "Resource": f"{ARN}:topic/factory/telemetry"}
    document = json.loads(_old_claim_policy("Own"))
    document["Statement"].append(own)
    cp_client.create_policy(policyName="Own-claim", policyDocument=json.dumps(document))

    assert "version 2 of policy Own-claim, denying the hubs' client ids" in (
        ensure_fleet_provisioning(cp_client, "Own").created
    )
    statements = json.loads(cp_client.get_policy(policyName="Own-claim")["policyDocument"])["Statement"]
    assert own in statements
    assert claim_deny_statement("us-east-1", "123456789012") in statements

    listed = {**claim_deny_statement("us-east-1", "123456789012"), "Action": ["iot:Connect"]}
    document["Statement"].append(listed)
    cp_client.create_policy(policyName="Listed-claim", policyDocument=json.dumps(document))
    assert not any("Listed-claim" in what for what in ensure_fleet_provisioning(cp_client, "Listed").created)
    assert cp_client.get_policy(policyName="Listed-claim")["defaultVersionId"] == "1"


def test_a_rerun_keeps_a_hook_of_the_hub_makers_own_and_replaces_an_old_local_guard(cp_client: Any) -> None:
    own = "arn:aws:lambda:us-east-1:123456789012:function:MyOwnGuard"
    set_up_fleet_provisioning(cp_client, "Mine", hook_url=own)
    assert ensure_fleet_provisioning(cp_client, "Mine").created == ()
    assert _hook(cp_client, "Mine") == own
    # The loopback URL an older `setup-fleet --takeover-guard` served (closed with that process).
    set_up_fleet_provisioning(cp_client, "Stale", hook_url="http://127.0.0.1:9/takeover-guard")
    assert ensure_fleet_provisioning(cp_client, "Stale").created == (
        "pre-provisioning hook of template Stale",
    )
    assert _hook(cp_client, "Stale") == GUARD


def test_a_claim_policy_with_five_versions_loses_its_oldest_unused_one(cp_client: Any) -> None:
    old = _old_claim_policy("Full")
    cp_client.create_policy(policyName="Full-claim", policyDocument=old)
    for _ in range(4):  # versions 2..5; version 3 is the one in force
        cp_client.create_policy_version(policyName="Full-claim", policyDocument=old)
    cp_client.set_default_policy_version(policyName="Full-claim", policyVersionId="3")
    cp_client.delete_policy_version(policyName="Full-claim", policyVersionId="1")
    cp_client.create_policy_version(policyName="Full-claim", policyDocument=old)  # 6: five again

    ensure_fleet_provisioning(cp_client, "Full")

    versions = cp_client.list_policy_versions(policyName="Full-claim")["policyVersions"]
    assert [(v["versionId"], v["isDefaultVersion"]) for v in versions] == [
        ("7", True),
        ("6", False),
        ("5", False),
        ("4", False),
        ("3", False),
    ]


def test_the_hub_template_activates_the_certificate() -> None:
    body = json.loads(hub_template_body("HubPolicy"))
    assert body["Resources"]["certificate"]["Properties"]["Status"] == "ACTIVE"


def test_registration_events_arrive_on_the_topic_aws_documents() -> None:
    assert registration_event_topic("ab12") == "$aws/events/certificates/registered/ab12"


def test_the_activator_may_hear_registration_events_and_nothing_else() -> None:
    document = activator_policy_document("us-east-1", "123456789012")
    validate_policy(document)
    topic = registration_event_topic("ab12")
    assert evaluate([document], "iot:Subscribe", f"{ARN}:topicfilter/{topic}", {})
    assert evaluate([document], "iot:Receive", f"{ARN}:topic/{topic}", {})
    assert not evaluate([document], "iot:Publish", f"{ARN}:topic/{topic}", {})
    assert not evaluate([document], "iot:Subscribe", f"{ARN}:topicfilter/things/hub/shadow", {})


def test_recipes_import_nothing_of_the_server() -> None:
    """They run against real AWS too: boto3-style clients and MQTT only, plus the pure model for AWS's
    status names (and each other)."""
    for path in sorted(RECIPES.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.name}: relative import"
                imported.add(node.module or "")
        ours = {
            name
            for name in imported
            if name.split(".")[0] == "iot_core_local" and not name.startswith("iot_core_local.recipes.")
        }
        assert ours <= {"iot_core_local.model"}, f"{path.name} imports {sorted(ours)}"


def test_a_device_ca_saved_and_loaded_is_the_same_ca_and_registers_once(cp_client: Any) -> None:
    ca = DeviceCA("Saved CA")
    loaded = DeviceCA.from_pem(ca.certificate_pem, ca.private_key_pem)
    assert loaded.certificate_id == ca.certificate_id
    assert loaded.name == ca.name
    assert ca.ensure_registered(cp_client) is True
    assert loaded.ensure_registered(cp_client) is False
    (registered,) = cp_client.list_ca_certificates()["certificates"]
    assert registered["certificateId"] == ca.certificate_id


def test_a_device_ca_needs_both_its_key_and_its_certificate() -> None:
    ca = DeviceCA()
    with pytest.raises(ValueError, match="both key and certificate"):
        DeviceCA(key=ca.key)


def test_a_private_folder_is_0700_with_every_folder_it_had_to_create(tmp_path: Path) -> None:
    # Before: the parents mkdir(parents=True) made got the umask's 0755 (setup-jitr's HUB, under which
    # HUB/device-ca was made first).
    old = os.umask(0o022)
    try:
        private_folder(tmp_path / "hub" / "device-ca")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "hub").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "hub" / "device-ca").stat().st_mode) == 0o700
