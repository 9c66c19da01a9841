"""Clients of the stand-in, for tests: boto3 clients pointed at a control plane, awsiotsdk's fleet
provisioning client."""

from __future__ import annotations

from typing import Any

import boto3


def iot_client(url: str, region: str = "us-east-1", service: str = "iot") -> Any:
    """A boto3 client of `service` for the control plane at `url` (the stand-in checks no signature)."""
    return boto3.client(
        service,  # type: ignore[call-overload]  # boto3's stubs know each service by a literal
        endpoint_url=url,
        region_name=region,
        aws_access_key_id="x",
        aws_secret_access_key="x",  # a dummy: the stand-in checks no credentials
    )


def managed_client(url: str, region: str = "us-east-1") -> Any:
    """A boto3 managed integrations client for the control plane at `url`."""
    return iot_client(url, region, "iot-managed-integrations")


def identity_client(crt_client: Any) -> Any:
    """awsiotsdk's fleet provisioning client (IotIdentityClientV2) over a started awscrt MQTT 5 client or
    a connected MQTT 3 connection."""
    from awscrt import mqtt_request_response
    from awsiot import iotidentity

    return iotidentity.IotIdentityClientV2(
        crt_client,
        mqtt_request_response.ClientOptions(
            max_request_response_subscriptions=2,
            max_streaming_subscriptions=0,
            operation_timeout_in_seconds=10,
        ),
    )


def register_thing(identity: Any, template_name: str, token: str, serial: str) -> Any:
    """RegisterThing through awsiotsdk with the recipes' parameters (serial, a UPC); its response."""
    from awsiot import iotidentity

    return identity.register_thing(
        iotidentity.RegisterThingRequest(
            template_name=template_name,
            certificate_ownership_token=token,
            parameters={"SerialNumber": serial, "UniversalProductCode": "012345"},
        )
    ).result(10)


def create_keys_and_register(identity: Any, template_name: str, serial: str) -> tuple[Any, Any]:
    """CreateKeysAndCertificate then RegisterThing through awsiotsdk: (issued, registered)."""
    from awsiot import iotidentity

    issued = identity.create_keys_and_certificate(iotidentity.CreateKeysAndCertificateRequest()).result(10)
    return issued, register_thing(identity, template_name, issued.certificate_ownership_token, serial)


def crt_mqtt3_connection(core: Any, creds: Any, client_id: str) -> Any:
    """awscrt's MQTT 3.1.1 connection (awsiot's mqtt_connection_builder, as AWS's older samples connect),
    with `creds` (a tests._support.devices.Credentials), connected to `core`'s gateway."""
    from awsiot import mqtt_connection_builder

    connection = mqtt_connection_builder.mtls_from_path(
        endpoint=core.endpoint.mqtt_host,
        port=core.endpoint.mqtt_port,
        cert_filepath=creds.cert_path,
        pri_key_filepath=creds.key_path,
        ca_filepath=str(core.endpoint.root_ca_path),
        client_id=client_id,
        clean_session=True,
        keep_alive_secs=30,
    )
    connection.connect().result(10)
    return connection
