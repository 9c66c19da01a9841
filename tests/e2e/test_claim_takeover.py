"""A CreateProvisioningClaim certificate may not take over the session of a device it is not: its implicit
policy allows iot:Connect on client/* (provisioned hubs' ids excepted), and a claim that connected as
"sensor-1" used to get CONNACK 0 while the device "sensor-1" was disconnected with 142. Nor may it reach
the session such a device left stored in Mosquitto while offline: it used to resume it (session present,
the device's queued messages lost to it) or wipe it (clean start)."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from iot_core_local.gateway.connection import MAX_CLIENT_ID_BYTES, claim_session_id
from iot_core_local.server import LocalIotCore
from tests._support.devices import Credentials, Lifecycle, Paho, new_device, write_credentials
from tests.e2e.test_provisioning_claim_and_quotas import temporary_claim

pytestmark = pytest.mark.e2e

NOT_AUTHORIZED = 135
CREATE = "$aws/certificates/create/json"


@pytest.fixture
def core(tmp_path: Path) -> Iterator[LocalIotCore]:
    with LocalIotCore(tmp_path / "data", key_pool_size=0) as running:
        yield running


def _claim_credentials(core: LocalIotCore, folder: Path) -> Credentials:
    claim = temporary_claim(core, "Takeover")
    return write_credentials(
        folder, "claim", claim["certificateId"], claim["certificatePem"], claim["keyPair"]["PrivateKey"]
    )


def _refused(core: LocalIotCore, creds: Credentials, client_id: str) -> int:
    """The CONNACK reason code a paho client with `creds` gets for `client_id` (paho's retries stopped)."""
    client = Paho(core, creds, client_id)
    client.client.reconnect_delay_set(min_delay=60, max_delay=60)  # one attempt is what is looked at
    try:
        return client.connect()
    finally:
        client.close()


def _still_connected(device: Paho, topic: str) -> None:
    """The device's connection is the same one and still works: no DISCONNECT, a QoS 1 round trip."""
    assert device.subscribe(topic) == [1]
    assert device.publish(topic, b"still here") == 0
    assert device.message().payload == b"still here"
    with pytest.raises(queue.Empty):
        device.disconnects.get_nowait()


def test_a_temporary_claim_cannot_take_over_a_connected_device(core: LocalIotCore, tmp_path: Path) -> None:
    device_creds = new_device(core, tmp_path / "device", "sensor")
    claim_creds = _claim_credentials(core, tmp_path / "claim")
    device = Paho(core, device_creds, "sensor-1")
    try:
        assert device.connect() == 0
        assert _refused(core, claim_creds, "sensor-1") == NOT_AUTHORIZED
        _still_connected(device, "sensor-1/x")
        current = core.gateway.connection("sensor-1")
        assert current is not None
        assert current.certificate_id == device_creds.certificate_id
    finally:
        device.close()

    # The claim still provisions, with a client id of its own.
    claim = Paho(core, claim_creds, "fresh-claim-id")
    try:
        assert claim.connect() == 0
        assert claim.subscribe(f"{CREATE}/accepted", f"{CREATE}/rejected") == [1, 1]
        assert claim.publish(CREATE, b"{}") == 0
        answer = claim.message()
        assert answer.topic == f"{CREATE}/accepted"
        assert "certificateOwnershipToken" in json.loads(answer.payload)
    finally:
        claim.close()


def test_a_temporary_claim_is_refused_while_the_device_is_still_connecting(
    core: LocalIotCore, tmp_path: Path
) -> None:
    # Mosquitto takes a session over when it reads the CONNECT, before the gateway registers the new
    # connection: a claim arriving in that window must see the device too.
    device_creds = new_device(core, tmp_path / "device", "sensor")
    claim_creds = _claim_credentials(core, tmp_path / "claim")
    in_window = threading.Event()
    release = threading.Event()

    async def hold_the_device(certificate_id: str) -> None:
        if certificate_id == device_creds.certificate_id:
            in_window.set()
            await asyncio.to_thread(release.wait, 10)

    core.gateway.connect_window_hook = hold_the_device
    device = Paho(core, device_creds, "sensor-2")
    try:
        device.client.connect(core.endpoint.mqtt_host, core.endpoint.mqtt_port, keepalive=30)
        device.client.loop_start()
        assert in_window.wait(10)
        assert _refused(core, claim_creds, "sensor-2") == NOT_AUTHORIZED
        release.set()
        assert device.connacks.get(timeout=5) == 0
        _still_connected(device, "sensor-2/x")
    finally:
        release.set()
        device.close()


def test_a_claim_with_a_policy_of_its_own_is_governed_by_that_policy(
    core: LocalIotCore, tmp_path: Path
) -> None:
    # The rule is the implicit policy's alone: a policy the customer attaches to the claim certificate
    # decides, as on AWS (where a client id is taken over by whoever the policies let connect with it).
    device_creds = new_device(core, tmp_path / "device", "sensor")
    claim_creds = _claim_credentials(core, tmp_path / "claim")
    iot = core.client()
    iot.create_policy(
        policyName="claim-connects-anywhere",
        policyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}],
            }
        ),
    )
    iot.attach_policy(
        policyName="claim-connects-anywhere", target=core.registry.cert_arn(claim_creds.certificate_id)
    )
    device = Paho(core, device_creds, "sensor-3")
    try:
        assert device.connect() == 0
        taker = Paho(core, claim_creds, "sensor-3")
        try:
            assert taker.connect() == 0
            assert device.disconnects.get(timeout=5) == 142  # session taken over
        finally:
            taker.close()
    finally:
        device.close()


def test_paho_311_claim_is_refused_too(core: LocalIotCore, tmp_path: Path) -> None:
    device_creds = new_device(core, tmp_path / "device", "sensor")
    claim_creds = _claim_credentials(core, tmp_path / "claim")
    device = Paho(core, device_creds, "sensor-4", protocol=paho.MQTTv311)
    try:
        assert device.connect() == 0
        claim = Paho(core, claim_creds, "sensor-4", protocol=paho.MQTTv311)
        claim.client.reconnect_delay_set(min_delay=60, max_delay=60)
        try:
            assert claim.connect() == NOT_AUTHORIZED  # 3.1.1 return code 5, which paho reports as 135
        finally:
            claim.close()
        _still_connected(device, "sensor-4/x")
    finally:
        device.close()


class _Session:
    """A paho client that keeps (or not) a session: MQTT 5 clean start and session expiry, or 3.1.1
    clean session; each CONNACK's "session present" on `present`."""

    def __init__(
        self,
        core: LocalIotCore,
        creds: Credentials,
        client_id: str,
        protocol: MQTTProtocolVersion,
        *,
        clean: bool,
    ) -> None:
        self.v5 = protocol == paho.MQTTv5
        self.clean = clean
        self.paho = Paho(core, creds, client_id, protocol=protocol, clean_session=None if self.v5 else clean)
        self.present: queue.Queue[bool] = queue.Queue()
        connacks = self.paho.connacks

        def on_connect(
            c: paho.Client, u: object, flags: paho.ConnectFlags, rc: ReasonCode, p: object
        ) -> None:
            self.present.put(flags.session_present)
            connacks.put(rc.value)

        self.paho.client.on_connect = on_connect

    def connect(self) -> bool:
        """Connect (CONNACK 0 expected); whether the broker had a session."""
        client, endpoint = self.paho.client, self.paho.core.endpoint
        if self.v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho's
            if not self.clean:
                properties.SessionExpiryInterval = 3600
            client.connect(
                endpoint.mqtt_host,
                endpoint.mqtt_port,
                keepalive=30,
                clean_start=self.clean,
                properties=properties,
            )
        else:
            client.connect(endpoint.mqtt_host, endpoint.mqtt_port, keepalive=30)
        client.loop_start()
        assert self.paho.connacks.get(timeout=5) == 0
        return self.present.get(timeout=5)


def _closed(lifecycle: Lifecycle, session: _Session, client_id: str) -> None:
    """Disconnect and wait until the gateway has closed the connection (and Mosquitto read the
    DISCONNECT): a message published after this is queued in the session, not delivered."""
    with lifecycle.changed:
        before = sum(1 for seen in lifecycle.seen if seen[:2] == (client_id, False))
    session.paho.close()
    with lifecycle.changed:
        assert lifecycle.changed.wait_for(
            lambda: sum(1 for seen in lifecycle.seen if seen[:2] == (client_id, False)) > before, 5
        ), lifecycle.seen


def test_a_claim_session_is_out_of_every_device_client_id_reach() -> None:
    # Longer than any client id a CONNECT may carry (refused at once), whatever the claim's own id.
    assert len(claim_session_id("0" * 64, "").encode()) > MAX_CLIENT_ID_BYTES


@pytest.mark.parametrize("claim_clean", [False, True], ids=["claim-resumes", "claim-clean-start"])
@pytest.mark.parametrize("protocol", [paho.MQTTv5, paho.MQTTv311], ids=["mqtt5", "mqtt311"])
def test_a_temporary_claim_cannot_reach_an_offline_device_stored_session(
    core: LocalIotCore, tmp_path: Path, protocol: MQTTProtocolVersion, claim_clean: bool
) -> None:
    device_creds = new_device(core, tmp_path / "device", "sensor")
    claim_creds = _claim_credentials(core, tmp_path / "claim")
    client_id, topic = "sensor-5", "sensor-5/queued"
    lifecycle = Lifecycle(core)
    try:
        device = _Session(core, device_creds, client_id, protocol, clean=False)
        assert device.connect() is False
        assert device.paho.subscribe(topic) == [1]
        _closed(lifecycle, device, client_id)
        publisher = Paho(core, device_creds, "sensor-5-publisher")
        try:
            assert publisher.connect() == 0
            assert publisher.publish(topic, b"queued while offline") == 0
        finally:
            publisher.close()

        claim = _Session(core, claim_creds, client_id, protocol, clean=claim_clean)
        try:
            assert claim.connect() is False  # a session of its own, not the device's
            # Known to the gateway (its registry, lifecycle events) by the client id it sent.
            current = core.gateway.connection(client_id)
            assert current is not None
            assert current.certificate_id == claim_creds.certificate_id
            assert current.client_id == client_id
            # It still provisions: the answers reach it through its own subscriptions.
            assert claim.paho.subscribe(f"{CREATE}/accepted", f"{CREATE}/rejected") == [1, 1]
            assert claim.paho.publish(CREATE, b"{}") == 0
            answer = claim.paho.message()
            assert answer.topic == f"{CREATE}/accepted"
            assert "certificateOwnershipToken" in json.loads(answer.payload)
        finally:
            _closed(lifecycle, claim, client_id)

        device = _Session(core, device_creds, client_id, protocol, clean=False)
        try:
            assert device.connect() is True
            assert device.paho.message().payload == b"queued while offline"
        finally:
            device.paho.close()
    finally:
        lifecycle.close()
