"""Helpers for hub_onboarding's unit tests: certificates made with cryptography, config files in tmp_path."""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class Pair:
    cert_pem: bytes
    key_pem: bytes
    key: ec.EllipticCurvePrivateKey


def make_pair(
    cn: str = "hub",
    *,
    days_valid: int = 30,
    starts_in_days: int = -1,
    issuer: Pair | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
    password: bytes | None = None,
) -> Pair:
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer_name = x509.load_pem_x509_certificate(issuer.cert_pem).subject if issuer else subject
    signer = issuer.key if issuer else key
    start = now + datetime.timedelta(days=starts_in_days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days_valid))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    cert = builder.sign(signer, hashes.SHA256())
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    return Pair(cert.public_bytes(serialization.Encoding.PEM), key_pem, key)


def write_private(path: Path, data: bytes, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)
    return path


@dataclass
class Hub:
    dir: Path
    config: Path
    claim: Pair
    dha: Pair
    ca: Pair

    def doc(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.config.read_text())
        return result

    def write(self, doc: dict[str, Any]) -> None:
        self.config.write_text(json.dumps(doc))


HubFactory = Callable[..., Hub]


@pytest.fixture
def make_hub(tmp_path: Path) -> HubFactory:
    """A hub folder with claim and DHA credentials and a config; `ro`/`rw` keyword arguments override."""

    def make(
        method: str = "FLEET_PROVISIONING",
        ro: dict[str, Any] | None = None,
        rw: dict[str, Any] | None = None,
        drop: tuple[str, ...] = (),
        **top: Any,
    ) -> Hub:
        hub_dir = tmp_path / "hub"
        hub_dir.mkdir(exist_ok=True)
        ca = make_pair("Test Root CA")
        claim = make_pair("claim", issuer=ca)
        dha = make_pair("dha-device-0001", issuer=ca)
        (hub_dir / "ca.pem").write_bytes(ca.cert_pem)
        (hub_dir / "claim.crt").write_bytes(claim.cert_pem)
        write_private(hub_dir / "claim.key", claim.key_pem)
        (hub_dir / "dha.crt").write_bytes(dha.cert_pem)
        write_private(hub_dir / "dha.key", dha.key_pem)
        base: dict[str, Any] = {
            "iot_provisioning_method": method,
            "iot_claim_cert_path": str(hub_dir / "claim.crt"),
            "iot_claim_pk_path": str(hub_dir / "claim.key"),
            "iot_dha_cert_path": str(hub_dir / "dha.crt"),
            "iot_dha_pk_path": str(hub_dir / "dha.key"),
            "fp_template_name": "HubTemplate",
            "endpoint_url": "iot.example.com:8883",
            "iot_root_ca_path": str(hub_dir / "ca.pem"),
            "SN": "SN-0001",
            "UPC": "012345678905",
        }
        base.update(ro or {})
        for key in drop:
            base.pop(key, None)
        doc: dict[str, Any] = {"ro": base, "rw": {"iot_provisioning_state": "NOT_PROVISIONED", **(rw or {})}}
        doc.update(top)
        config = hub_dir / "iotmi_config.json"
        config.write_text(json.dumps(doc, indent=2))
        return Hub(hub_dir, config, claim, dha, ca)

    return make
