"""Just-in-time registration, the customer's side: a device CA and an activator.

In AWS, JITR needs two things the customer owns: a CA registered with auto-registration that signed the
devices' certificates, and code (a rule and a Lambda function) that hears the registration event and
activates the certificate. `DeviceCA` and `JitrActivator` are both, built on public APIs only (boto3 and
MQTT through the gateway), so they work against real AWS IoT Core as well as against the stand-in.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from iot_core_local.model import CertificateStatus

log = logging.getLogger(__name__)

# Where AWS IoT Core publishes a JITR registration event: one topic per CA, under this prefix.
REGISTRATION_EVENT_PREFIX = "$aws/events/certificates/registered/"


def registration_event_topic(ca_certificate_id: str) -> str:
    """The topic on which AWS announces certificates the CA `ca_certificate_id` signed, at their first
    connect (status PENDING_ACTIVATION)."""
    return REGISTRATION_EVENT_PREFIX + ca_certificate_id


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@dataclass(frozen=True)
class DeviceCredentials:
    common_name: str
    certificate_pem: str
    private_key_pem: str


class DeviceCA:
    """A manufacturer's CA that signs device (DHA) certificates at the factory."""

    def __init__(
        self,
        name: str = "Hub Maker Device CA",
        *,
        key: ec.EllipticCurvePrivateKey | None = None,
        certificate: x509.Certificate | None = None,
    ) -> None:
        """A new CA named `name`; or, given `key` and `certificate`, one made before (`from_pem`)."""
        if (key is None) != (certificate is None):
            raise ValueError("DeviceCA: pass both key and certificate, or neither")
        if key is None or certificate is None:
            key = ec.generate_private_key(ec.SECP256R1())
            certificate = self._self_signed(key, name)
        self.key = key
        self.certificate = certificate
        self.name = certificate.subject
        self.certificate_pem = _pem(certificate)
        self.private_key_pem = _key_pem(key)

    @classmethod
    def from_pem(cls, certificate_pem: str, private_key_pem: str) -> DeviceCA:
        """The CA saved before as `certificate_pem` and `private_key_pem` (an EC key, unencrypted)."""
        key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError("DeviceCA: the private key is not an EC key")
        return cls(key=key, certificate=x509.load_pem_x509_certificate(certificate_pem.encode()))

    @property
    def certificate_id(self) -> str:
        """The id AWS IoT gives this CA once registered: the SHA-256 of its DER, in hex."""
        return self.certificate.fingerprint(hashes.SHA256()).hex()

    @staticmethod
    def _self_signed(key: ec.EllipticCurvePrivateKey, name: str) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(key, hashes.SHA256())
        )

    def _sign(self, subject: x509.Name, public_key: Any, days: int = 3650) -> x509.Certificate:
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def issue_device(self, common_name: str, serial_number: str | None = None) -> DeviceCredentials:
        """A device certificate; `serial_number` goes in the subject's serialNumber attribute, which
        managed integrations matches a JITR hub's managed thing by."""
        key = ec.generate_private_key(ec.SECP256R1())
        attributes = [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Hub Maker"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        ]
        if serial_number is not None:
            attributes.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_number))
        subject = x509.Name(attributes)
        cert = self._sign(subject, key.public_key())
        return DeviceCredentials(common_name, _pem(cert), _key_pem(key))

    def register(self, client: Any, *, template_body: str | None = None, role_arn: str | None = None) -> str:
        """Register this CA with auto-registration (JITR; JITP when a template body is given)."""
        code = client.get_registration_code()["registrationCode"]
        verification_key = ec.generate_private_key(ec.SECP256R1())
        verification = self._sign(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, code)]), verification_key.public_key(), days=1
        )
        request: dict[str, Any] = {
            "caCertificate": self.certificate_pem,
            "verificationCertificate": _pem(verification),
            "setAsActive": True,
            "allowAutoRegistration": True,
        }
        if template_body is not None:
            request["registrationConfig"] = {
                "templateBody": template_body,
                "roleArn": role_arn or "arn:aws:iam::123456789012:role/JITPRole",
            }
        ca_id: str = client.register_ca_certificate(**request)["certificateId"]
        return ca_id

    def ensure_registered(
        self, client: Any, *, template_body: str | None = None, role_arn: str | None = None
    ) -> bool:
        """Register this CA unless it is already (then it is kept as it is); True when it registered now."""
        try:
            client.describe_ca_certificate(certificateId=self.certificate_id)
        except client.exceptions.ResourceNotFoundException:
            self.register(client, template_body=template_body, role_arn=role_arn)
            return True
        return False


def activator_policy_document(region: str, account: str) -> str:
    """What the activator's own certificate may do: hear registration events, nothing else."""
    prefix = f"arn:aws:iot:{region}:{account}"
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
                {
                    "Effect": "Allow",
                    "Action": "iot:Subscribe",
                    "Resource": f"{prefix}:topicfilter/{REGISTRATION_EVENT_PREFIX}*",
                },
                {
                    "Effect": "Allow",
                    "Action": "iot:Receive",
                    "Resource": f"{prefix}:topic/{REGISTRATION_EVENT_PREFIX}*",
                },
            ],
        }
    )


class JitrActivator:
    """Behaves like a customer's JITR Lambda function.

    Subscribes to the registration events of one CA; for each pending certificate it creates a thing
    named after the certificate's common name, attaches the certificate and a policy, and activates it.
    """

    def __init__(
        self,
        client: Any,
        *,
        host: str,
        port: int,
        root_ca_pem: bytes,
        ca_certificate_id: str,
        device_policy_name: str,
        account: str = "123456789012",
        client_id: str = "jitr-activator",
    ) -> None:
        self._iot = client
        self._host = host
        self._port = port
        self._root_ca_pem = root_ca_pem
        self._ca_id = ca_certificate_id
        self._device_policy = device_policy_name
        self._account = account
        self._client_id = client_id
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="jitr-activator")
        self._mqtt: Any = None
        self.activated: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # `events` and `activated` grow on awscrt's and the pool's threads
        # Certificates being activated or done: a device that retries while still PENDING_ACTIVATION makes
        # a second event, and two workers must not both activate it.
        self._claimed: set[str] = set()
        self._stopped = threading.Event()

    def start(self, timeout: float = 10.0) -> None:
        from awscrt import mqtt5
        from awsiot import mqtt5_client_builder

        region = self._iot.meta.region_name
        policy_name = f"{self._client_id}-policy"
        # A policy left by an earlier run is kept (a rerun, or a restarted activator, is not an error).
        with contextlib.suppress(self._iot.exceptions.ResourceAlreadyExistsException):
            self._iot.create_policy(
                policyName=policy_name, policyDocument=activator_policy_document(region, self._account)
            )
        created = self._iot.create_keys_and_certificate(setAsActive=True)
        self._iot.attach_policy(policyName=policy_name, target=created["certificateArn"])
        connected = threading.Event()
        self._mqtt = mqtt5_client_builder.mtls_from_bytes(
            endpoint=self._host,
            port=self._port,
            cert_bytes=created["certificatePem"].encode(),
            pri_key_bytes=created["keyPair"]["PrivateKey"].encode(),
            ca_bytes=self._root_ca_pem,
            client_id=self._client_id,
            on_publish_received=self._on_publish,
            on_lifecycle_connection_success=lambda _data: connected.set(),
            on_lifecycle_stopped=lambda _data: self._stopped.set(),
        )
        self._mqtt.start()
        if not connected.wait(timeout):
            self.stop()
            raise TimeoutError(
                f"JITR activator could not connect to {self._host}:{self._port} in {timeout} s"
            )
        topic = registration_event_topic(self._ca_id)
        suback = self._mqtt.subscribe(
            mqtt5.SubscribePacket(
                subscriptions=[mqtt5.Subscription(topic_filter=topic, qos=mqtt5.QoS.AT_LEAST_ONCE)]
            )
        ).result(timeout)
        if suback.reason_codes[0] > 2:
            self.stop()
            raise PermissionError(f"JITR activator may not subscribe to {topic}: {suback.reason_codes[0]!r}")

    def _on_publish(self, data: Any) -> None:
        # Called on awscrt's event-loop thread: hand the (blocking) API calls to a worker.
        try:
            event = json.loads(data.publish_packet.payload)
        except ValueError:
            log.warning("JITR activator: ignoring a registration event that is not JSON")
            return
        with self._lock:
            self.events.append(event)
        self._pool.submit(self.handle_event, event)

    def handle_event(self, event: dict[str, Any]) -> None:
        """Activate the certificate a registration event names (what the Lambda does in AWS); a second
        event for the same certificate, from a device that retried meanwhile, does nothing."""
        certificate_id = event.get("certificateId", "")
        pending = event.get("certificateStatus") == CertificateStatus.PENDING_ACTIVATION
        with self._lock:
            if not pending or certificate_id in self._claimed:
                return
            self._claimed.add(certificate_id)
        try:
            description = self._iot.describe_certificate(certificateId=certificate_id)[
                "certificateDescription"
            ]
            cert = x509.load_pem_x509_certificate(description["certificatePem"].encode())
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            thing_name = str(names[0].value) if names else certificate_id
            arn = description["certificateArn"]
            with contextlib.suppress(self._iot.exceptions.ResourceAlreadyExistsException):
                self._iot.create_thing(thingName=thing_name)
            self._iot.attach_thing_principal(thingName=thing_name, principal=arn)
            self._iot.attach_policy(policyName=self._device_policy, target=arn)
            self._iot.update_certificate(certificateId=certificate_id, newStatus=CertificateStatus.ACTIVE)
        except Exception:
            log.exception("JITR activator: could not activate certificate %s", certificate_id)
            with self._lock:
                self._claimed.discard(certificate_id)  # the device's next attempt may try again
            return
        log.info("JITR activator: activated certificate %s as thing %s", certificate_id, thing_name)
        with self._lock:
            self.activated.append(certificate_id)

    def stop(self) -> None:
        if self._mqtt is not None:
            self._mqtt.stop()
            self._stopped.wait(5.0)
            self._mqtt = None
        self._pool.shutdown(wait=True)
