"""Policy versions (CreatePolicyVersion, ListPolicyVersions, GetPolicyVersion, SetDefaultPolicyVersion,
DeletePolicyVersion) as botocore's model and AWS's limits have them: what the claims recipe's rerun uses
to give an old claim policy its Deny."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from iot_core_local.registry import Registry


def _document(action: str) -> str:
    return json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": action, "Resource": "*"}]}
    )


def test_a_new_default_version_is_the_document_in_force(cp_client: Any, cp_registry: Registry) -> None:
    cp_client.create_policy(policyName="P", policyDocument=_document("iot:Connect"))
    created = cp_client.create_policy_version(
        policyName="P", policyDocument=_document("iot:Publish"), setAsDefault=True
    )
    assert (created["policyVersionId"], created["isDefaultVersion"]) == ("2", True)
    policy = cp_client.get_policy(policyName="P")
    assert (policy["defaultVersionId"], json.loads(policy["policyDocument"])) == (
        "2",
        json.loads(_document("iot:Publish")),
    )
    assert "iot:Publish" in cp_registry.get_policy("P").document  # what connections are judged by
    first = cp_client.get_policy_version(policyName="P", policyVersionId="1")
    assert (first["isDefaultVersion"], json.loads(first["policyDocument"])) == (
        False,
        json.loads(_document("iot:Connect")),
    )

    cp_client.set_default_policy_version(policyName="P", policyVersionId="1")
    assert cp_client.get_policy(policyName="P")["defaultVersionId"] == "1"
    assert "iot:Connect" in cp_registry.get_policy("P").document


def test_aws_limits_on_versions(cp_client: Any) -> None:
    cp_client.create_policy(policyName="L", policyDocument=_document("iot:Connect"))
    for _ in range(4):
        cp_client.create_policy_version(policyName="L", policyDocument=_document("iot:Connect"))
    with pytest.raises(cp_client.exceptions.VersionsLimitExceededException):
        cp_client.create_policy_version(policyName="L", policyDocument=_document("iot:Connect"))
    with pytest.raises(cp_client.exceptions.DeleteConflictException):
        cp_client.delete_policy_version(policyName="L", policyVersionId="1")  # the default one
    with pytest.raises(cp_client.exceptions.DeleteConflictException):
        cp_client.delete_policy(policyName="L")  # versions other than the default one are left
    with pytest.raises(cp_client.exceptions.ResourceNotFoundException):
        cp_client.get_policy_version(policyName="L", policyVersionId="9")
    cp_client.delete_policy_version(policyName="L", policyVersionId="5")
    with pytest.raises(cp_client.exceptions.MalformedPolicyException):
        cp_client.create_policy_version(policyName="L", policyDocument="{}")
    for version in ("2", "3", "4"):
        cp_client.delete_policy_version(policyName="L", policyVersionId=version)
    cp_client.delete_policy(policyName="L")
    assert cp_client.list_policies()["policies"] == []


def test_versions_survive_a_restart(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r.sqlite3")
    registry.create_policy("K", _document("iot:Connect"))
    registry.create_policy_version("K", _document("iot:Publish"), set_as_default=True)
    registry.close()
    again = Registry(tmp_path / "r.sqlite3")
    try:
        assert [(v.version_id, v.is_default) for v in again.list_policy_versions("K")] == [
            ("2", True),
            ("1", False),
        ]
        assert again.get_policy("K").version_id == "2"
    finally:
        again.close()


def test_version_ids_are_never_reused(cp_client: Any) -> None:
    # Before: the next id was the highest one left plus one, so deleting version 3 made the next one 3 again
    # (a version id a policy already had, naming another document).
    cp_client.create_policy(policyName="R", policyDocument=_document("iot:Connect"))
    for _ in range(2):
        cp_client.create_policy_version(policyName="R", policyDocument=_document("iot:Connect"))
    cp_client.delete_policy_version(policyName="R", policyVersionId="3")
    created = cp_client.create_policy_version(policyName="R", policyDocument=_document("iot:Publish"))
    assert created["policyVersionId"] == "4"
    listed = cp_client.list_policy_versions(policyName="R")["policyVersions"]
    assert [v["versionId"] for v in listed] == ["4", "2", "1"]
    # A policy deleted and created again under the same name is a new policy: its ids start at 1.
    for version in ("2", "4"):
        cp_client.delete_policy_version(policyName="R", policyVersionId=version)
    cp_client.delete_policy(policyName="R")
    cp_client.create_policy(policyName="R", policyDocument=_document("iot:Connect"))
    again = cp_client.create_policy_version(policyName="R", policyDocument=_document("iot:Publish"))
    assert again["policyVersionId"] == "2"
