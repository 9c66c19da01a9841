"""The real awscrt MQTT 5 path against a plain Mosquitto with mutual TLS (no fleet provisioning there).

What a plain broker can show: a connection with a good certificate, TLS verification of the endpoint,
a refused client certificate (JITR's first attempts), and a request nobody answers (the identity
client's deadline). Fleet provisioning itself is exercised by tests/e2e against iot-core-local.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hub_onboarding.certs import Credentials, check_pair
from hub_onboarding.cli import main
from hub_onboarding.device_provisioner import Backoff, DeviceProvisioner
from hub_onboarding.errors import MqttConnectionError, PublishTimeoutError
from hub_onboarding.mqtt import ConnectionSettings, IotProvisioning
from tests._support.brokers import Broker
from tests._support.certificates import make_pair, write_private
from tests._support.hubs import HubFactory


def engine(broker: Broker, ca_path: Path | None = None, timeout: float = 5) -> IotProvisioning:
    settings = ConnectionSettings(
        broker.endpoint, str(ca_path or broker.ca_path), 60, connect_timeout=timeout
    )
    return IotProvisioning(settings)


def jitr(iot: IotProvisioning, client_id: str, creds: Credentials, timeout: float) -> int:
    dp = DeviceProvisioner(
        iot, operation_timeout=5, retry_timeout=timeout, backoff=Backoff(base=0.1, cap=0.2)
    )
    return dp.provision_jitr(client_id, creds)


def test_connect_and_verify(broker: Broker) -> None:
    iot = engine(broker)
    start = time.monotonic()
    iot.verify("hub-client-1", broker.client)
    assert time.monotonic() - start < 5
    assert jitr(iot, "hub-client-1", broker.client, timeout=5) == 1
    assert iot.tls_contexts_made == 1


def test_endpoint_with_another_ca_is_refused(broker: Broker, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    other.write_bytes(make_pair("Some Other CA").cert_pem)
    # awscrt reports the TLS failure only once the peer closes; Mosquitto waits, so our deadline decides.
    start = time.monotonic()
    with pytest.raises(MqttConnectionError, match=r"iot_root_ca_path|TLS"):
        engine(broker, other, timeout=2).verify("hub-client-1", broker.client)
    assert time.monotonic() - start < 8


def test_unknown_client_certificate_jitr_gives_up_at_the_deadline(broker: Broker) -> None:
    stranger = make_pair("stranger")  # self-signed: Mosquitto refuses it, like IoT Core before activation
    creds = check_pair(stranger.cert_pem, stranger.key_pem, "DHA", check_validity=False)
    start = time.monotonic()
    iot = engine(broker, timeout=1)
    with pytest.raises(MqttConnectionError, match="JITR: no connection within 2 s") as info:
        jitr(iot, "stranger", creds, timeout=2)
    assert time.monotonic() - start < 6
    assert "attempt" in info.value.message
    attempts = int(info.value.message.split(" attempt(s)")[0].rsplit(" ", 1)[1])
    assert attempts > 1
    assert iot.tls_contexts_made == 1, "every attempt with the same certificate shares one TLS context"


def test_unanswered_request_times_out(broker: Broker) -> None:
    with engine(broker).connect("hub-client-1", broker.client) as conn:
        fleet = conn.fleet_provisioning(operation_timeout=1)
        start = time.monotonic()
        with pytest.raises(PublishTimeoutError):
            fleet.create_keys_and_certificate()
        assert time.monotonic() - start < 8


def test_cli_provision_against_a_broker_without_fleet_provisioning(
    broker: Broker, make_hub: HubFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    hub = make_hub(
        ro={
            "endpoint_url": str(broker.endpoint),
            "iot_root_ca_path": str(broker.ca_path),
            "mqtt_retry_timeout_seconds": 2,
        }
    )
    (hub.dir / "claim.crt").write_bytes(broker.client.certificate_pem)
    write_private(hub.dir / "claim.key", broker.client.private_key_pem)
    start = time.monotonic()
    assert main(["provision", "--config", str(hub.config), "--json"]) == 14
    assert time.monotonic() - start < 10  # each wait is capped by the 2 s retry budget
    out = capsys.readouterr().out
    assert "FP_STATUS_PUBLISH_TIMEOUT_ERROR" in out
    assert hub.doc()["rw"]["iot_provisioning_state"] == "NOT_PROVISIONED"
