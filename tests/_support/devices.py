"""Devices for the stand-in's tests: credentials, and clients over real TLS to a real gateway.

`RawClient` is a deliberately small synchronous MQTT client over `ssl` + the `mqtt5` codec (or, with
`mqtt311=True`, the gateway's 3.1.1 codec, which reads and writes the same packet objects), for the
assertions paho hides (no CONNACK at all, the exact DISCONNECT reason, a malformed packet on purpose).
`Paho` wraps paho-mqtt 2.x in MQTT 5 (or 3.1.1) mode with queues.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import ssl
import subprocess
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mqtt5
import paho.mqtt.client as paho
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from iot_core_local.ca import certificate_id
from iot_core_local.gateway import mqtt311
from iot_core_local.gateway.wire import frame
from iot_core_local.recipes import jitr
from iot_core_local.server import LocalIotCore

REGION = "us-east-1"
ACCOUNT = "123456789012"
ARN = f"arn:aws:iot:{REGION}:{ACCOUNT}"

# PUBACK reason codes of a publish that went through: Mosquitto says 16 when nobody subscribed.
OK = (0, 16)

OPEN_POLICY = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]}
)


@dataclass(frozen=True)
class Credentials:
    certificate_id: str
    cert_path: str
    key_path: str
    certificate_pem: str
    private_key_pem: str


def write_credentials(
    folder: Path, name: str, certificate_id: str, cert_pem: str, key_pem: str
) -> Credentials:
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_text(cert_pem)
    key_path.write_text(key_pem)
    key_path.chmod(0o600)
    return Credentials(certificate_id, str(cert_path), str(key_path), cert_pem, key_pem)


def new_device(
    core: LocalIotCore, folder: Path, name: str, *, policy: str | None = OPEN_POLICY, status: str = "ACTIVE"
) -> Credentials:
    """A certificate created through the registry (as CreateKeysAndCertificate would) with a policy."""
    iot = core.client()
    created = iot.create_keys_and_certificate(setAsActive=status == "ACTIVE")
    if status != "ACTIVE":
        iot.update_certificate(certificateId=created["certificateId"], newStatus=status)
    if policy is not None:
        policy_name = f"policy-{name}-{uuid.uuid4().hex[:8]}"
        iot.create_policy(policyName=policy_name, policyDocument=policy)
        iot.attach_policy(policyName=policy_name, target=created["certificateArn"])
    return write_credentials(
        folder, name, created["certificateId"], created["certificatePem"], created["keyPair"]["PrivateKey"]
    )


def client_context(core: LocalIotCore, creds: Credentials | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(core.endpoint.root_ca_path))
    if creds is not None:
        ctx.load_cert_chain(creds.cert_path, creds.key_path)
    return ctx


class Closed(Exception):
    """The server closed the connection."""


class RawClient:
    """A synchronous MQTT 5 (or 3.1.1) client, one packet at a time."""

    def __init__(
        self, core: LocalIotCore, creds: Credentials | None, *, timeout: float = 5.0, mqtt311: bool = False
    ) -> None:
        raw = socket.create_connection((core.endpoint.mqtt_host, core.endpoint.mqtt_port), timeout=timeout)
        self.sock = client_context(core, creds).wrap_socket(raw, server_hostname="localhost")
        self.sock.settimeout(timeout)
        self.mqtt311 = mqtt311
        self.buffer = bytearray()
        self.backlog: list[mqtt5.Packet] = []
        self._next_id = 0

    def packet_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def send(self, packet: mqtt5.Packet) -> None:
        self.sock.sendall(mqtt311.write(packet) if self.mqtt311 else packet.write())

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self) -> mqtt5.Packet:
        """The next packet; Closed if the server closes first."""
        if self.backlog:
            return self.backlog.pop(0)
        return self._read()

    def _decode(self) -> mqtt5.Packet | None:
        """The first whole packet of the buffer, taken out of it; None if none is whole yet."""
        if self.mqtt311:
            found = frame(self.buffer, 0)
            if found is None or len(self.buffer) < found[1]:
                return None
            packet, size = mqtt311.parse(self.buffer, 0, found[1]), found[1]
        else:
            try:
                packet, size = mqtt5.read(memoryview(self.buffer))
            except IndexError:
                return None
        del self.buffer[:size]
        return packet

    def _read(self) -> mqtt5.Packet:
        while True:
            if self.buffer:
                packet = self._decode()
                if packet is not None:
                    return packet
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionError, ssl.SSLError) as e:
                raise Closed(str(e)) from None
            if not chunk:
                raise Closed("closed")
            self.buffer += chunk

    def receive_type(self, kind: type[Any]) -> Any:
        """The next packet of this type; others are kept for later `receive` calls."""
        for i, packet in enumerate(self.backlog):
            if isinstance(packet, kind):
                return self.backlog.pop(i)
        while True:
            packet = self._read()
            if isinstance(packet, kind):
                return packet
            self.backlog.append(packet)

    def connect(self, client_id: str, **options: Any) -> mqtt5.ConnAckPacket:
        self.send(mqtt5.ConnectPacket(client_id, clean_start=True, keep_alive=60, **options))
        packet = self.receive()
        assert isinstance(packet, mqtt5.ConnAckPacket), packet
        return packet

    def subscribe(self, *patterns: str) -> list[int]:
        pid = self.packet_id()
        self.send(
            mqtt5.SubscribePacket(
                pid, [mqtt5.TopicFilter(p, max_qos=mqtt5.QoS.AT_LEAST_ONCE) for p in patterns]
            )
        )
        suback = self.receive_type(mqtt5.SubAckPacket)
        assert suback.packet_id == pid
        return [int(code) for code in suback.reason_codes]

    def publish(self, topic: str, payload: bytes, qos: int = 1, **options: Any) -> int | None:
        """Publish; for QoS 1 return the PUBACK reason code."""
        pid = self.packet_id() if qos else None
        self.send(mqtt5.PublishPacket(topic, payload, qos=mqtt5.QoS(qos), packet_id=pid, **options))
        if not qos:
            return None
        puback = self.receive_type(mqtt5.PubAckPacket)
        assert puback.packet_id == pid
        return int(puback.reason_code)

    def ask(self, topic: str, payload: bytes) -> tuple[str, dict[str, Any]]:
        """A provisioning request: subscribe to both answers, publish, return (accepted|rejected, answer)."""
        assert self.subscribe(f"{topic}/accepted", f"{topic}/rejected") == [1, 1]
        assert self.publish(topic, payload) == 0
        answer = self.receive_type(mqtt5.PublishPacket)
        return answer.topic.rsplit("/", 1)[1], json.loads(answer.payload)

    def expect_closed(self, within: float = 5.0) -> list[mqtt5.Packet]:
        """Read until the server closes; return what came before (e.g. a DISCONNECT)."""
        self.sock.settimeout(within)
        seen = []
        with contextlib.suppress(Closed):
            while True:
                seen.append(self.receive())
        return seen

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def connect_refused_without_connack(
    core: LocalIotCore, creds: Credentials, client_id: str, *, mqtt311: bool = False
) -> bool:
    """True if the server closes the connection (during TLS or after CONNECT) and never sends CONNACK."""
    try:
        client = RawClient(core, creds, mqtt311=mqtt311)
    except (ssl.SSLError, ConnectionError):
        return True
    try:
        client.send(mqtt5.ConnectPacket(client_id, clean_start=True, keep_alive=60))
        seen = client.expect_closed()
    except (ssl.SSLError, ConnectionError):
        return True
    finally:
        client.close()
    return not any(isinstance(p, mqtt5.ConnAckPacket) for p in seen)


class Paho:
    """paho-mqtt 2.x, MQTT 5 (or 3.1.1: `protocol=paho.MQTTv311`), TLS with a client certificate;
    events arrive on queues."""

    def __init__(
        self,
        core: LocalIotCore,
        creds: Credentials,
        client_id: str,
        protocol: MQTTProtocolVersion = paho.MQTTv5,
        clean_session: bool | None = None,  # 3.1.1 only (MQTT 5 says clean start at connect)
    ) -> None:
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            clean_session=clean_session,
        )
        self.client.tls_set(
            ca_certs=str(core.endpoint.root_ca_path), certfile=creds.cert_path, keyfile=creds.key_path
        )
        self.core = core
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.connacks: queue.Queue[int] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.pubacks: queue.Queue[int] = queue.Queue()
        self.disconnects: queue.Queue[int] = queue.Queue()
        self.client.on_connect = lambda c, u, f, rc, p: self.connacks.put(rc.value)
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.subacks.put([x.value for x in codes])
        self.client.on_publish = lambda c, u, mid, rc, p: self.pubacks.put(rc.value)
        self.client.on_disconnect = lambda c, u, f, rc, p: self.disconnects.put(rc.value)

    def connect(self, timeout: float = 5.0) -> int:
        self.client.connect(self.core.endpoint.mqtt_host, self.core.endpoint.mqtt_port, keepalive=30)
        self.client.loop_start()
        return self.connacks.get(timeout=timeout)

    def subscribe(self, *patterns: str, qos: int = 1) -> list[int]:
        self.client.subscribe([(p, qos) for p in patterns])
        return self.subacks.get(timeout=5)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None:
        self.client.publish(topic, payload, qos=qos, retain=retain)
        return self.pubacks.get(timeout=5) if qos else None

    def message(self, timeout: float = 5.0) -> paho.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


def make_csr(common_name: str = "hub", *, weak: bool = False) -> str:
    key = ec.generate_private_key(ec.SECP192R1() if weak else ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


class DeviceCA(jitr.DeviceCA):
    """The product's maker CA (iot_core_local.recipes.jitr), writing credentials where these tests
    read them."""

    @property
    def cert(self) -> x509.Certificate:
        return self.certificate

    @property
    def pem(self) -> str:
        return self.certificate_pem

    def device(self, folder: Path, common_name: str, serial_number: str | None = None) -> Credentials:
        issued = self.issue_device(common_name, serial_number)
        cid = certificate_id(x509.load_pem_x509_certificate(issued.certificate_pem.encode()))
        return write_credentials(folder, common_name, cid, issued.certificate_pem, issued.private_key_pem)


class Lifecycle:
    """Waits on the gateway's lifecycle reports (it runs after managed integrations' own listener)."""

    def __init__(self, core: LocalIotCore) -> None:
        self.core = core
        self.seen: list[tuple[str, bool, str | None]] = []
        self.changed = threading.Condition()
        core.gateway.lifecycle_listeners.append(self.heard)

    def heard(self, client_id: str, connected: bool, reason: str | None) -> None:
        with self.changed:
            self.seen.append((client_id, connected, reason))
            self.changed.notify_all()

    def wait_for(self, event: tuple[str, bool, str | None], timeout: float = 5.0) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: event in self.seen, timeout), self.seen

    def close(self) -> None:
        self.core.gateway.lifecycle_listeners.remove(self.heard)


def device_of_a_registered_ca(core: LocalIotCore, creds_dir: Path, name: str) -> tuple[str, Credentials]:
    """A device certificate registered with its maker's CA (RegisterCertificate with the CA's PEM), ACTIVE,
    with a policy allowing everything; the CA's certificate id and the device's credentials."""
    iot = core.client()
    device_ca = DeviceCA(f"{name} CA")
    ca_id = iot.register_ca_certificate(
        caCertificate=device_ca.pem, setAsActive=True, certificateMode="SNI_ONLY"
    )["certificateId"]
    device = device_ca.device(creds_dir, name)
    arn = iot.register_certificate(
        certificatePem=device.certificate_pem, caCertificatePem=device_ca.pem, status="ACTIVE"
    )["certificateArn"]
    document = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}],
    }
    iot.create_policy(policyName=f"{name}-open", policyDocument=json.dumps(document))
    iot.attach_policy(policyName=f"{name}-open", target=arn)
    return ca_id, device


def allow_policy(*statements: tuple[str | list[str], str | list[str]]) -> str:
    """A policy document of Allow statements, each (actions, resources)."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": a, "Resource": r} for a, r in statements],
        }
    )


def mosquitto_tool(
    core: LocalIotCore, creds: Credentials, program: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """mosquitto_pub / mosquitto_sub in MQTT 3.1.1 mode (their default), over TLS with `creds`."""
    endpoint = core.endpoint
    command = [program, "-V", "mqttv311", "-h", endpoint.mqtt_host, "-p", str(endpoint.mqtt_port)]
    command += ["--cafile", str(endpoint.root_ca_path), "--cert", creds.cert_path, "--key", creds.key_path]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=30, check=False)
