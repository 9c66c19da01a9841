"""The registry on its own: persistence, transactions, listeners, tokens and AWS's rules."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from iot_core_local.ca import CertificateAuthority, certificate_id
from iot_core_local.errors import (
    CertificateState,
    DeleteConflict,
    InvalidRequest,
    ResourceAlreadyExists,
    ResourceNotFound,
    VersionConflict,
)
from iot_core_local.model import CertificateStatus, TokenGrant
from iot_core_local.registry import Registry, certificate_id_from_arn
from tests._support.certificates import pem_of, self_signed_ca

POLICY = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]}'


@pytest.fixture
def cert_pem(cp_ca: CertificateAuthority) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return cp_ca.sign_csr(csr).public_bytes(serialization.Encoding.PEM).decode()


def _issued_by(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    import datetime

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "device")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=5))
        .sign(ca_key, hashes.SHA256())
    )


def test_everything_survives_a_restart(tmp_path: Path, cert_pem: str) -> None:
    path = tmp_path / "r.sqlite3"
    registry = Registry(path)
    cert = registry.add_certificate(cert_pem, "ACTIVE")
    ca_cert, _ = self_signed_ca("ca")
    registry.add_ca_certificate(
        pem_of(ca_cert),
        status="ACTIVE",
        auto_registration=True,
        registration_config={"roleArn": "r"},
        mode="DEFAULT",
    )
    registry.create_policy("p", POLICY)
    registry.attach_policy("p", cert.arn)
    registry.create_thing("t", attributes={"a": "1"})
    registry.attach_thing_principal("t", cert.arn)
    registry.create_template(
        "tpl",
        "{}",
        role_arn="arn:aws:iam::1:role/x",
        enabled=True,
        description="d",
        hook={"targetArn": "http://h"},
        template_type="FLEET_PROVISIONING",
    )
    code = registry.registration_code()
    token = registry.issue_token(cert.certificate_id, None, 60)
    registry.close()

    again = Registry(path)
    assert again.get_certificate(cert.certificate_id) == cert
    assert again.list_ca_certificates()[0].registration_config == {"roleArn": "r"}
    assert [p.name for p in again.list_attached_policies(cert.arn)] == ["p"]
    assert again.get_thing("t").attributes == {"a": "1"}
    assert again.list_thing_principals("t") == [cert.arn]
    assert again.get_template("tpl").hook == {"targetArn": "http://h"}
    assert again.registration_code() == code
    assert again.consume_token(token) == TokenGrant(cert.certificate_id, None)
    again.close()


def test_transaction_is_all_or_nothing_and_listeners_wait_for_commit(
    cp_registry: Registry, cert_pem: str
) -> None:
    events: list[tuple[str, str]] = []
    cp_registry.add_listener(lambda cid, status: events.append((cid, status)))
    cert = cp_registry.add_certificate(cert_pem, "PENDING_ACTIVATION")

    def activate_then_fail() -> None:
        with cp_registry.transaction():
            cp_registry.create_thing("hub")
            cp_registry.attach_thing_principal("hub", cert.arn)
            cp_registry.set_certificate_status(cert.certificate_id, "ACTIVE")
            assert events == []  # not before the commit
            raise RuntimeError("half way")

    with pytest.raises(RuntimeError, match="half way"):
        activate_then_fail()
    assert cp_registry.find_thing("hub") is None
    assert cp_registry.get_certificate(cert.certificate_id).status == "PENDING_ACTIVATION"
    assert events == []

    def activate_then_miss_a_policy() -> None:
        with cp_registry.transaction():  # nested below: a savepoint
            cp_registry.set_certificate_status(cert.certificate_id, "ACTIVE")
            cp_registry.get_policy("missing")

    with cp_registry.transaction():
        cp_registry.create_thing("hub")
        with pytest.raises(ResourceNotFound):
            activate_then_miss_a_policy()
        cp_registry.set_certificate_status(cert.certificate_id, "INACTIVE")
    assert cp_registry.find_thing("hub") is not None
    assert events == [(cert.certificate_id, "INACTIVE")]


def test_listener_failure_does_not_break_the_change(cp_registry: Registry, cert_pem: str) -> None:
    def boom(cid: str, status: str) -> None:
        raise RuntimeError("listener bug")

    seen: list[str] = []
    cp_registry.add_listener(boom)
    cp_registry.add_listener(lambda cid, status: seen.append(status))
    cert = cp_registry.add_certificate(cert_pem, "ACTIVE")
    cp_registry.set_certificate_status(cert.certificate_id, "REVOKED")
    assert seen == ["REVOKED"]


def test_certificate_rules(cp_registry: Registry, cert_pem: str) -> None:
    cert = cp_registry.add_certificate(cert_pem, "ACTIVE")
    assert cert.certificate_id == certificate_id(x509.load_pem_x509_certificate(cert_pem.encode()))
    assert certificate_id_from_arn(cert.arn) == cert.certificate_id
    with pytest.raises(ResourceAlreadyExists) as exc:
        cp_registry.add_certificate(cert_pem, "ACTIVE")
    assert exc.value.resource_id == cert.certificate_id
    assert exc.value.resource_arn == cert.arn
    with pytest.raises(CertificateState):
        cp_registry.delete_certificate(cert.certificate_id)
    cp_registry.create_policy("p", POLICY)
    cp_registry.attach_policy("p", cert.arn)
    cp_registry.set_certificate_status(cert.certificate_id, "INACTIVE")
    with pytest.raises(DeleteConflict):
        cp_registry.delete_certificate(cert.certificate_id)
    cp_registry.create_thing("t")
    cp_registry.attach_thing_principal("t", cert.arn)
    with pytest.raises(DeleteConflict):
        cp_registry.delete_certificate(cert.certificate_id, force=True)  # a thing blocks even forceDelete
    cp_registry.detach_thing_principal("t", cert.arn)
    events: list[str] = []
    cp_registry.add_listener(lambda cid, status: events.append(status))
    cp_registry.delete_certificate(cert.certificate_id, force=True)  # policies go with it
    assert events == ["DELETED"]
    assert cp_registry.list_targets_for_policy("p") == []
    with pytest.raises(ResourceNotFound):
        cp_registry.get_certificate(cert.certificate_id)
    with pytest.raises(InvalidRequest):
        cp_registry.add_certificate(cert_pem, "BOGUS")


def test_revoked_is_final(cp_registry: Registry, cert_pem: str) -> None:
    cert = cp_registry.add_certificate(cert_pem, "ACTIVE")
    cp_registry.set_certificate_status(cert.certificate_id, "REVOKED")
    with pytest.raises(CertificateState):
        cp_registry.set_certificate_status(cert.certificate_id, "ACTIVE")


def test_find_ca_for_checks_the_signature(cp_registry: Registry) -> None:
    ca_cert, ca_key = self_signed_ca("Same Name")
    impostor, impostor_key = self_signed_ca("Same Name")
    registered = cp_registry.add_ca_certificate(
        pem_of(ca_cert), status="ACTIVE", auto_registration=False, registration_config=None, mode="DEFAULT"
    )
    assert cp_registry.find_ca_for(_issued_by(ca_cert, ca_key)) == registered
    assert cp_registry.find_ca_for(_issued_by(impostor, impostor_key)) is None


def test_ca_rules(cp_registry: Registry, cert_pem: str) -> None:
    ca_cert, ca_key = self_signed_ca("ca")
    ca = cp_registry.add_ca_certificate(
        pem_of(ca_cert), status="INACTIVE", auto_registration=False, registration_config=None, mode="DEFAULT"
    )
    device = cp_registry.add_certificate(
        pem_of(_issued_by(ca_cert, ca_key)), "INACTIVE", ca_certificate_id=ca.certificate_id
    )
    with pytest.raises(CertificateState):  # its CA is inactive
        cp_registry.set_certificate_status(device.certificate_id, "ACTIVE")
    updated = cp_registry.update_ca_certificate(
        ca.certificate_id, status="ACTIVE", auto_registration=True, registration_config={"templateName": "x"}
    )
    assert (updated.status, updated.auto_registration, updated.customer_version) == ("ACTIVE", True, 2)
    cp_registry.set_certificate_status(device.certificate_id, "ACTIVE")
    assert (
        cp_registry.update_ca_certificate(
            ca.certificate_id, remove_registration_config=True
        ).registration_config
        is None
    )
    with pytest.raises(CertificateState):
        cp_registry.delete_ca_certificate(ca.certificate_id)
    cp_registry.update_ca_certificate(ca.certificate_id, status="INACTIVE")
    cp_registry.delete_ca_certificate(ca.certificate_id)
    assert cp_registry.find_ca_certificate(ca.certificate_id) is None


def test_things(cp_registry: Registry) -> None:
    thing = cp_registry.create_thing("t", attributes={"a": "1"})
    assert cp_registry.create_thing("t", attributes={"a": "1"}) == thing  # same configuration: fine
    with pytest.raises(ResourceAlreadyExists):
        cp_registry.create_thing("t", attributes={"a": "2"})
    merged = cp_registry.update_thing("t", attributes={"b": "2", "a": ""}, merge=True)
    assert merged.attributes == {"b": "2"}
    assert merged.version == 2
    with pytest.raises(VersionConflict):
        cp_registry.update_thing("t", attributes={}, expected_version=1)
    assert cp_registry.update_thing("t", attributes={"c": "3"}, merge=False).attributes == {"c": "3"}
    with pytest.raises(InvalidRequest):
        cp_registry.create_thing("bad name")
    cp_registry.delete_thing("t")
    with pytest.raises(ResourceNotFound):
        cp_registry.get_thing("t")


class FakeClock:
    """Epoch seconds that move only when the test says so."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_tokens_are_single_use_expire_and_are_stored_hashed(tmp_path: Path, cert_pem: str) -> None:
    clock = FakeClock()
    registry = Registry(tmp_path / "r.sqlite3", clock=clock)
    token = registry.issue_token("a" * 64, "b" * 64, 60)
    assert len(token) >= 43
    expired = registry.issue_token("a" * 64, None, 1)
    clock.advance(2)
    with pytest.raises(InvalidRequest, match="cannot be empty"):
        registry.consume_token("")
    with pytest.raises(InvalidRequest, match="is invalid"):
        registry.consume_token("not-a-token")
    with pytest.raises(InvalidRequest, match="has expired"):
        registry.consume_token(expired)
    assert registry.consume_token(token) == TokenGrant("a" * 64, "b" * 64)
    with pytest.raises(InvalidRequest, match="already been used"):
        registry.consume_token(token)
    # Spent inside a transaction that fails: the token is not lost.
    other = registry.issue_token("c" * 64, None, 60)

    def spend_then_fail() -> None:
        with registry.transaction():
            registry.consume_token(other)
            raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError, match="rolled back"):
        spend_then_fail()
    assert registry.consume_token(other).certificate_id == "c" * 64
    registry.close()
    assert token.encode() not in (tmp_path / "r.sqlite3").read_bytes()
    wal = tmp_path / "r.sqlite3-wal"
    assert not wal.exists() or token.encode() not in wal.read_bytes()


def test_concurrent_writers(cp_registry: Registry) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(50):
                with cp_registry.transaction():
                    cp_registry.create_thing(f"t{n}-{i}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(cp_registry.list_things()) == 200
    assert time.perf_counter() - started < 5


def test_nested_rollback_forgets_its_policy_targets_and_trust_change(
    cp_registry: Registry, cert_pem: str
) -> None:
    targets: list[str] = []
    cp_registry.add_policy_listener(targets.append)
    cert = cp_registry.add_certificate(cert_pem, "ACTIVE")
    cp_registry.create_policy("p", POLICY)
    ca, ca_key = self_signed_ca("Rolled back")
    own = pem_of(_issued_by(ca, ca_key))
    generation = cp_registry.trust_generation

    def attach_and_register_then_fail() -> None:
        with cp_registry.transaction():  # nested below: a savepoint, rolled back
            cp_registry.attach_policy("p", cert.arn)
            cp_registry.add_certificate(own, "ACTIVE")  # registered without a CA: a trust change
            raise RuntimeError("rolled back")

    with cp_registry.transaction():
        with pytest.raises(RuntimeError, match="rolled back"):
            attach_and_register_then_fail()
        cp_registry.create_thing("kept")
    assert cp_registry.list_attached_policies(cert.arn) == []
    assert targets == []  # nothing changed for the certificate
    assert cp_registry.trust_generation == generation  # nor for the TLS trust store


def test_a_token_expires_when_its_ttl_has_passed_on_the_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    registry = Registry(tmp_path / "r.sqlite3", clock=clock)
    on_time = registry.issue_token("a" * 64, None, 60)
    late = registry.issue_token("b" * 64, None, 60)
    clock.advance(60)  # the last second of its life: still good
    assert registry.consume_token(on_time).certificate_id == "a" * 64
    clock.advance(0.001)
    with pytest.raises(InvalidRequest, match="has expired"):
        registry.consume_token(late)
    registry.close()


def test_expired_unregistered_certificates_follow_the_clock(tmp_path: Path, cert_pem: str) -> None:
    """A PENDING_ACTIVATION certificate is due for deletion once every token of it expired unused."""
    clock = FakeClock()
    registry = Registry(tmp_path / "r.sqlite3", clock=clock)
    pending = registry.add_certificate(cert_pem, CertificateStatus.PENDING_ACTIVATION)
    registry.issue_token(pending.certificate_id, None, 300)
    clock.advance(200)
    second = registry.issue_token(pending.certificate_id, None, 300)
    clock.advance(200)  # the first token expired, the second has not
    assert registry.expired_unregistered_certificates() == []
    clock.advance(200)
    assert registry.expired_unregistered_certificates() == [pending.certificate_id]
    registry.close()

    spent = Registry(tmp_path / "r.sqlite3", clock=clock)
    clock.advance(-400)
    spent.consume_token(second)  # a used token means the certificate was claimed: never swept
    clock.advance(400)
    assert spent.expired_unregistered_certificates() == []
    spent.close()


def test_timestamps_come_from_the_clock(tmp_path: Path, cert_pem: str) -> None:
    clock = FakeClock(1_000.0)
    registry = Registry(tmp_path / "r.sqlite3", clock=clock)
    cert = registry.add_certificate(cert_pem, "ACTIVE")
    assert (cert.created, cert.last_modified) == (1_000.0, 1_000.0)
    clock.advance(5)
    changed = registry.set_certificate_status(cert.certificate_id, "INACTIVE")
    assert (changed.created, changed.last_modified) == (1_000.0, 1_005.0)
    assert changed.status is CertificateStatus.INACTIVE
    policy = registry.create_policy("p", POLICY)
    assert policy.created == 1_005.0
    registry.close()
