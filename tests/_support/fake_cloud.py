"""A fake AWS IoT for HubOnboarding's unit tests: everything above the MQTT client stays real.

`FakeCloud.onboarding(config)` is a real HubOnboarding whose connector is the real DeviceProvisioner (retry
policy, backoff, deadlines) over `FakeIot` (connections) and `FakeFleet` (the fleet provisioning API):
the seams HubOnboarding and DeviceProvisioner take (`provisioner_factory`, `clock`; `Transport`,
`Connection`, `FleetApi`), no patching. Time is a `FakeClock`: sleeping advances it, nothing waits.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from hub_onboarding.certs import Credentials
from hub_onboarding.config import HubConfig
from hub_onboarding.device_provisioner import Backoff, DeviceProvisioner
from hub_onboarding.errors import IdentityError
from hub_onboarding.fleet import FleetApi, IssuedCertificate, RegisteredThing, validate_issued
from hub_onboarding.onboarding import HubOnboarding, Timeouts
from tests._support.certificates import Pair, make_pair


@dataclass
class FakeClock:
    """The wall clock (HubOnboarding: a token's age) and the monotonic one (deadlines), driven by the test.

    `sleep` records the wait and moves both clocks on, as trio's MockClock does; `advance` moves them
    without a sleep (time passing between two runs).
    """

    wall: float = field(default_factory=time.time)
    monotonic: float = 0.0
    sleeps: list[float] = field(default_factory=list)

    def time(self) -> float:
        return self.wall

    def now(self) -> float:
        return self.monotonic

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.monotonic += seconds


@dataclass
class FakeCloud:
    ca: Pair
    device_configuration: dict[str, str] | None = None
    connections: list[tuple[str, str]] = field(default_factory=list)  # (client id, certificate id)
    calls: list[str] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=dict)  # token -> certificate id
    issued_keys: list[bytes] = field(default_factory=list)
    register_params: list[dict[str, str]] = field(default_factory=list)
    fail: dict[str, list[BaseException]] = field(default_factory=dict)  # operation -> errors to raise in turn
    clock: FakeClock = field(default_factory=FakeClock)
    fleet: FleetApi | None = None  # answers a claim session's requests instead of FakeFleet when set

    def maybe_fail(self, operation: str) -> None:
        pending = self.fail.get(operation)
        if pending:
            raise pending.pop(0)

    def issue(self, public_key: Any) -> tuple[bytes, str]:
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "AWS IoT Cert")]))
            .issuer_name(x509.load_pem_x509_certificate(self.ca.cert_pem).subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=365))
            .sign(self.ca.key, hashes.SHA256())
        )
        token = f"OWNERSHIP-TOKEN-{len(self.tokens)}-SECRET"
        return cert.public_bytes(serialization.Encoding.PEM), token

    def provisioner(self, cfg: HubConfig, timeouts: Timeouts) -> DeviceProvisioner:
        """HubOnboarding's provisioner_factory: the real DeviceProvisioner over this fake network."""
        return DeviceProvisioner(
            FakeIot(self),
            operation_timeout=1,
            retry_timeout=timeouts.retry_for(cfg),
            backoff=Backoff(rng=lambda: 0.5),
            clock=self.clock.now,
            sleep=self.clock.sleep,
        )

    def onboarding(self, config: Path, **options: Any) -> HubOnboarding:
        """A real HubOnboarding of `config` that talks to this cloud and runs on its clock."""
        return HubOnboarding(config, provisioner_factory=self.provisioner, clock=self.clock.time, **options)


class FakeFleet:
    def __init__(self, cloud: FakeCloud) -> None:
        self.cloud = cloud

    def create_keys_and_certificate(self) -> IssuedCertificate:
        self.cloud.calls.append("CreateKeysAndCertificate")
        self.cloud.maybe_fail("CreateKeysAndCertificate")
        pair = make_pair("unused")
        cert_pem, token = self.cloud.issue(pair.key.public_key())
        self.cloud.issued_keys.append(pair.key_pem)
        issued = validate_issued(
            "CreateKeysAndCertificate",
            Answer(
                certificate_pem=cert_pem.decode(),
                private_key=pair.key_pem.decode(),
                certificate_ownership_token=token,
                certificate_id="x",
            ),
        )
        self.cloud.tokens[token] = issued.certificate_id
        return issued

    def create_certificate_from_csr(self, csr_pem: bytes, private_key_pem: bytes) -> IssuedCertificate:
        self.cloud.calls.append("CreateCertificateFromCsr")
        self.cloud.maybe_fail("CreateCertificateFromCsr")
        csr = x509.load_pem_x509_csr(csr_pem)
        cert_pem, token = self.cloud.issue(csr.public_key())
        issued = validate_issued(
            "CreateCertificateFromCsr",
            Answer(certificate_pem=cert_pem.decode(), certificate_ownership_token=token, certificate_id="x"),
            private_key_pem,
        )
        self.cloud.tokens[token] = issued.certificate_id
        return issued

    def register_thing(
        self, template_name: str, ownership_token: str, parameters: Mapping[str, str]
    ) -> RegisteredThing:
        self.cloud.calls.append("RegisterThing")
        self.cloud.maybe_fail("RegisterThing")
        if ownership_token not in self.cloud.tokens:
            raise IdentityError.from_rejection(
                "RegisterThing",
                400,
                "InvalidCertificateOwnershipToken",
                "Certificate ownership token is invalid",
            )
        del self.cloud.tokens[ownership_token]
        self.cloud.register_params.append(dict(parameters))
        thing = f"thing-{parameters['SerialNumber']}"
        dev = self.cloud.device_configuration
        if dev is None:
            dev = {"ClientId": f"client-{parameters['SerialNumber']}", "ManagedThingId": "mt-123"}
        return RegisteredThing(thing, dev)


class Answer:
    """An /accepted answer as awsiotsdk hands it over: attributes named like the service's fields."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


class FakeConnection:
    def __init__(self, cloud: FakeCloud) -> None:
        self.cloud = cloud

    def fleet_provisioning(self, operation_timeout: float) -> FleetApi:
        return self.cloud.fleet if self.cloud.fleet is not None else FakeFleet(self.cloud)

    def __enter__(self) -> FakeConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class FakeIot:
    """DeviceProvisioner's Transport: each call is one connection attempt, failing as `cloud.fail` says."""

    connect_timeout = 30.0

    def __init__(self, cloud: FakeCloud) -> None:
        self.cloud = cloud

    def connect(
        self, client_id: str, credentials: Credentials, timeout: float | None = None
    ) -> FakeConnection:
        self.cloud.calls.append("connect")
        self.cloud.maybe_fail("connect")
        self.cloud.connections.append((client_id, credentials.certificate_id))
        return FakeConnection(self.cloud)

    def verify(self, client_id: str, credentials: Credentials, timeout: float | None = None) -> None:
        self.cloud.calls.append("verify")
        self.cloud.maybe_fail("verify")
        self.cloud.connections.append((client_id, credentials.certificate_id))
