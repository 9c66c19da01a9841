"""Port 443 as AWS IoT Core serves it: MQTT over TLS for clients that offer ALPN `x-amzn-mqtt-ca`.

Today's SDK samples connect to 443 with that ALPN by default; without it, the port serves no MQTT.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import mqtt5
import pytest

from iot_core_local.gateway.tls import ALPN_MQTT
from iot_core_local.recipes.claims import ClaimSetup, set_up_fleet_provisioning
from iot_core_local.server import Endpoint, LocalIotCore
from tests._support.clients import create_keys_and_register, identity_client
from tests._support.devices import Credentials, client_context, new_device, write_credentials


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalIotCore]:
    with LocalIotCore(tmp_path_factory.mktemp("alpn") / "data", alpn_port=0, key_pool_size=2) as running:
        yield running


@pytest.fixture(scope="module")
def device(core: LocalIotCore, tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    return new_device(core, tmp_path_factory.mktemp("alpn-creds"), "alpn")


def _alpn_port(core: LocalIotCore) -> int:
    port = core.endpoint.alpn_port
    assert port is not None
    return port


def _connack_on_alpn_port(core: LocalIotCore, creds: Credentials, offer: list[str] | None) -> int | None:
    """CONNECT over TLS to the ALPN port offering `offer`: the CONNACK's reason code, or None if the
    server closed the connection (during or right after the handshake) without one."""
    context = client_context(core, creds)
    if offer is not None:
        context.set_alpn_protocols(offer)
    with socket.create_connection(("127.0.0.1", _alpn_port(core)), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(mqtt5.ConnectPacket("alpn-raw", clean_start=True, keep_alive=60).write())
                data = tls.recv(4096)
        except (ssl.SSLError, ConnectionError):
            return None
    if not data:
        return None
    packet, _ = mqtt5.read(memoryview(data))
    assert isinstance(packet, mqtt5.ConnAckPacket), packet
    return int(packet.reason_code)


def test_endpoint_names_the_alpn_port(core: LocalIotCore) -> None:
    on_disk = json.loads((core.data_dir / "endpoint.json").read_text())
    assert on_disk["alpnPort"] == core.endpoint.alpn_port
    assert on_disk["alpnPort"] not in (0, on_disk["mqttPort"])
    assert Endpoint.from_json(on_disk) == core.endpoint


def test_only_clients_offering_the_alpn_are_served(core: LocalIotCore, device: Credentials) -> None:
    assert _connack_on_alpn_port(core, device, [ALPN_MQTT]) == 0
    assert _connack_on_alpn_port(core, device, ["mqtt", ALPN_MQTT]) == 0
    assert _connack_on_alpn_port(core, device, None) is None
    assert _connack_on_alpn_port(core, device, ["mqtt"]) is None
    assert _connack_on_alpn_port(core, device, ["http/1.1"]) is None


def _settle(future: Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


def _crt_client(core: LocalIotCore, creds: Credentials, client_id: str, alpn: list[str] | None) -> Any:
    """awscrt's MQTT 5 client as AWS's samples make it for port 443 (where its builder sets the ALPN
    itself); the test's port is not 443, so the ALPN list is set here."""
    from awscrt import io
    from awscrt import mqtt5 as crt_mqtt5

    options = io.TlsContextOptions.create_client_with_mtls_from_path(creds.cert_path, creds.key_path)
    options.override_default_trust_store_from_path(None, str(core.endpoint.root_ca_path))
    if alpn is not None:
        options.alpn_list = alpn
    connected: Future[bool] = Future()
    stopped = threading.Event()
    client = crt_mqtt5.Client(
        crt_mqtt5.ClientOptions(
            host_name="localhost",
            port=_alpn_port(core),
            tls_ctx=io.ClientTlsContext(options),
            connect_options=crt_mqtt5.ConnectPacket(client_id=client_id, keep_alive_interval_sec=60),
            session_behavior=crt_mqtt5.ClientSessionBehaviorType.CLEAN,
            retry_jitter_mode=crt_mqtt5.ExponentialBackoffJitterMode.NONE,
            min_reconnect_delay_ms=60_000,  # one attempt within the test
            on_lifecycle_event_connection_success_fn=lambda data: _settle(connected, True),
            on_lifecycle_event_connection_failure_fn=lambda data: _settle(connected, False),
            on_lifecycle_event_stopped_fn=lambda data: stopped.set(),
        )
    )
    client.start()
    return client, connected, stopped


def test_awscrt_with_the_alpn_provisions_through_the_alpn_port(core: LocalIotCore, tmp_path: Path) -> None:

    setup: ClaimSetup = set_up_fleet_provisioning(core.client(), "AlpnTemplate")
    claim = write_credentials(
        tmp_path, "claim", setup.certificate_id, setup.certificate_pem, setup.private_key_pem
    )
    client, connected, stopped = _crt_client(
        core, claim, "claim-alpn", [ALPN_MQTT]
    )  # not hub-*: denied to claims
    try:
        assert connected.result(10), "awscrt could not connect to the ALPN port with the ALPN"
        issued, registered = create_keys_and_register(identity_client(client), setup.template_name, "ALPN1")
    finally:
        client.stop()
        assert stopped.wait(5)
    assert registered.thing_name == "hub-ALPN1"
    assert core.registry.get_certificate(issued.certificate_id).status == "ACTIVE"


def test_awscrt_without_the_alpn_is_refused(core: LocalIotCore, device: Credentials) -> None:
    client, connected, stopped = _crt_client(core, device, "no-alpn", None)
    try:
        assert connected.result(10) is False
    finally:
        client.stop()
        assert stopped.wait(5)


def _mosquitto_pub(core: LocalIotCore, creds: Credentials, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *("mosquitto_pub", "-V", "mqttv5", "-h", "localhost", "-p", str(_alpn_port(core))),
            *(
                "--cafile",
                str(core.endpoint.root_ca_path),
                "--cert",
                creds.cert_path,
                "--key",
                creds.key_path,
            ),
            *("-i", "mosq-alpn", "-t", "alpn/t", "-m", "hello", "-q", "1", *extra),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_mosquitto_pub_with_tls_alpn(core: LocalIotCore, device: Credentials) -> None:
    served = _mosquitto_pub(core, device, "--tls-alpn", ALPN_MQTT)
    assert served.returncode == 0, served.stderr
    refused = _mosquitto_pub(core, device)
    assert refused.returncode != 0


@pytest.mark.parametrize("alpn", [False, True])
def test_no_session_ticket_is_issued(core: LocalIotCore, device: Credentials, alpn: bool) -> None:
    # Each ticket cost the server ~0.5 ms of its loop per handshake, and no client of it resumes.
    context = client_context(core, device)
    port = _alpn_port(core) if alpn else core.endpoint.mqtt_port
    if alpn:
        context.set_alpn_protocols([ALPN_MQTT])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(mqtt5.ConnectPacket(f"ticket-{alpn}", clean_start=True, keep_alive=60).write())
        data = tls.recv(4096)  # the CONNACK comes after any ticket the server would send
        assert tls.version() == "TLSv1.3"
        session = tls.session
        assert session is not None
        assert not session.has_ticket
    packet, _ = mqtt5.read(memoryview(data))
    assert isinstance(packet, mqtt5.ConnAckPacket)
    assert packet.reason_code == 0
