"""The takeover guard (issue 9 point 5): its verdict through boto3 against the control plane, the same
verdict from the function iot-core-local hosts in-process, its HTTP face, and the claim policy's refusal
of provisioned hubs' client ids."""

from __future__ import annotations

import http.client
import json
from typing import Any

import pytest

from iot_core_local.errors import HookDenied
from iot_core_local.hook import HostedFunctions, call_hook, hosted_functions
from iot_core_local.policy import evaluate
from iot_core_local.recipes.claims import claim_policy_document, takeover_guard_arn
from iot_core_local.recipes.takeover import TakeoverGuard, takeover_verdict
from iot_core_local.registry import Registry

ARN = "arn:aws:iot:us-east-1:123456789012"


def _hub(cp_client: Any, serial: str, *statuses: str) -> list[str]:
    """Thing hub-<serial> with one certificate per status; their ids."""
    cp_client.create_thing(thingName=f"hub-{serial}")
    ids = []
    for status in statuses:
        created = cp_client.create_keys_and_certificate(setAsActive=True)
        cp_client.attach_thing_principal(thingName=f"hub-{serial}", principal=created["certificateArn"])
        cp_client.update_certificate(certificateId=created["certificateId"], newStatus=status)
        ids.append(created["certificateId"])
    return ids


GUARD = takeover_guard_arn("us-east-1", "123456789012")


def _ask_boto3(cp_client: Any, cp_registry: Registry, serial: object) -> bool:
    answer = takeover_verdict(cp_client, {"parameters": {"SerialNumber": serial}, "clientId": "x"})
    assert set(answer) == {"allowProvisioning"}
    allowed: bool = answer["allowProvisioning"]
    return allowed


def _ask_hosted(cp_client: Any, cp_registry: Registry, serial: object) -> bool:
    """The function iot-core-local answers for the recipe's default hook, as RegisterThing calls it."""
    try:
        call_hook(GUARD, {"parameters": {"SerialNumber": serial}}, 5.0, hosted=hosted_functions(cp_registry))
    except HookDenied:
        return False
    return True


@pytest.fixture(params=[_ask_boto3, _ask_hosted], ids=["boto3", "hosted"])
def ask(request: pytest.FixtureRequest, cp_client: Any, cp_registry: Registry) -> Any:
    return lambda serial: request.param(cp_client, cp_registry, serial)


def test_a_new_serial_is_allowed(ask: Any) -> None:
    assert ask("SN-NEW") is True


def test_a_serial_whose_thing_has_an_active_certificate_is_refused(cp_client: Any, ask: Any) -> None:
    _hub(cp_client, "SN-TAKEN", "INACTIVE", "ACTIVE")
    assert ask("SN-TAKEN") is False


def test_a_serial_whose_certificates_are_all_inactive_may_onboard_again(cp_client: Any, ask: Any) -> None:
    _hub(cp_client, "SN-RESET", "INACTIVE", "REVOKED")
    assert ask("SN-RESET") is True
    _hub(cp_client, "SN-BARE")  # a thing without any certificate
    assert ask("SN-BARE") is True


@pytest.mark.parametrize("serial", [None, "", 7])
def test_a_request_without_a_serial_is_refused(cp_client: Any, ask: Any, serial: object) -> None:
    assert ask(serial) is False
    assert takeover_verdict(cp_client, {"parameters": "nope"}) == {"allowProvisioning": False}


def test_the_hosted_guard_refuses_when_the_registry_cannot_be_read(
    cp_registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(name: str) -> list[str]:
        raise OSError("disk gone")

    monkeypatch.setattr(cp_registry, "list_thing_principals", broken)
    cp_registry.create_thing("hub-SN-X")
    with pytest.raises(HookDenied, match="denied"):
        call_hook(GUARD, {"parameters": {"SerialNumber": "SN-X"}}, 5.0, hosted=hosted_functions(cp_registry))


def test_only_the_guard_of_this_region_and_account_is_hosted(cp_registry: Registry) -> None:
    hosted: HostedFunctions = hosted_functions(cp_registry)
    assert hosted.find(GUARD) is not None
    assert hosted.find(GUARD + ":live") is not None  # an alias or version runs the same code
    assert hosted.find(takeover_guard_arn("eu-west-1", "123456789012")) is None
    assert hosted.find(GUARD.replace("HubTakeoverGuard", "Other")) is None


def test_a_cloud_that_cannot_be_asked_refuses(cp_client: Any) -> None:
    class Broken:
        exceptions = cp_client.exceptions

        def list_thing_principals(self, **request: Any) -> Any:
            raise cp_client.exceptions.ThrottlingException({"Error": {"Code": "Throttling"}}, "x")

    assert takeover_verdict(Broken(), {"parameters": {"SerialNumber": "SN-X"}}) == {
        "allowProvisioning": False
    }


def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    host_port = url.split("/")[2]
    connection = http.client.HTTPConnection(host_port, timeout=10)
    try:
        connection.request("POST", "/takeover-guard", body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_the_guard_serves_the_verdict_and_refuses_junk(cp_client: Any) -> None:
    _hub(cp_client, "SN-SERVED", "ACTIVE")
    with TakeoverGuard(cp_client) as guard:
        assert _post(guard.url, json.dumps({"parameters": {"SerialNumber": "SN-SERVED"}}).encode()) == (
            200,
            {"allowProvisioning": False},
        )
        assert _post(guard.url, json.dumps({"parameters": {"SerialNumber": "SN-FREE"}}).encode()) == (
            200,
            {"allowProvisioning": True},
        )
        assert _post(guard.url, b"not json")[0] == 400
        assert _post(guard.url, b"[1]")[0] == 400
        status, _ = _post(guard.url, b"{}", {"Content-Length": str(10**6)})
        assert status == 413


def test_the_claim_policy_denies_provisioned_hubs_client_ids() -> None:
    document = claim_policy_document("us-east-1", "123456789012", "T")
    assert evaluate([document], "iot:Connect", f"{ARN}:client/SN-0001", {})
    assert not evaluate([document], "iot:Connect", f"{ARN}:client/hub-SN-0001", {})
    assert not evaluate([document], "iot:Connect", f"{ARN}:client/hub-", {})
