"""mqtt.describe_connect_failure: what a failed connection attempt tells the user to check (pure)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from hub_onboarding.config import Endpoint
from hub_onboarding.mqtt import describe_connect_failure

ENDPOINT = Endpoint("iot.example.com", 8883)


@dataclass
class CrtError:
    name: str


@pytest.mark.parametrize("key", ["endpoint_url", "iot_endpoint_url", "sh_endpoint_url"])
@pytest.mark.parametrize(
    "error",
    [
        "AWS_IO_SOCKET_CONNECTION_REFUSED",
        "AWS_IO_SOCKET_TIMEOUT",
        "AWS_IO_DNS_INVALID_NAME",
        "AWS_IO_DNS_QUERY_FAILED",
    ],
)
def test_endpoint_hints_name_the_key_the_endpoint_came_from(error: str, key: str) -> None:
    message = describe_connect_failure(CrtError(error), None, ENDPOINT, "hub-1", key)
    assert f"check {key} and" in message
    other_keys = {"endpoint_url", "iot_endpoint_url", "sh_endpoint_url"} - {key}
    assert not any(f"check {other} " in message for other in other_keys)
    assert message.startswith("could not connect to iot.example.com:8883 as 'hub-1' (" + error + ")")


def test_hints_that_are_not_about_the_endpoint_name_no_key() -> None:
    tls = describe_connect_failure(
        CrtError("AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE"), None, ENDPOINT, "hub-1", "iot_endpoint_url"
    )
    assert "iot_root_ca_path" in tls
    assert "endpoint_url" not in tls
    refused = describe_connect_failure(CrtError("whatever"), "NOT_AUTHORIZED", ENDPOINT, "hub-1", "x")
    assert "reason NOT_AUTHORIZED" in refused
    assert "iot:Connect for client id 'hub-1'" in refused


def test_an_unknown_error_is_named_and_blames_the_certificate_or_policy() -> None:
    message = describe_connect_failure(RuntimeError("boom"), None, ENDPOINT, "hub-1")
    assert "(RuntimeError)" in message
    assert "certificate may be unknown, inactive or revoked" in message
