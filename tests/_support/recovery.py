"""What a hub must be after an interrupted onboarding (a power cut, a fault) and one more run."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import load_pem_x509_certificate

from hub_onboarding.certs import CertType
from hub_onboarding.config import Endpoint
from hub_onboarding.mqtt import ConnectionSettings, IotProvisioning
from hub_onboarding.pkcs11 import Pkcs11CredentialStore, cert_handler, open_token, sign
from hub_onboarding.tools.softhsm import SoftHsmToken
from iot_core_local.server import LocalIotCore
from tests._support.certificates import key_matches_certificate, pem_certificate_id
from tests._support.hubs import read_config
from tests._support.network import connects


def assert_recovered(
    cloud: LocalIotCore,
    iot: Any,
    config_path: Path,
    original: dict[str, Any],
    token_spent_before_cut: Iterable[str] = (),
    token: SoftHsmToken | None = None,
) -> str:
    """Everything a hub must be after a power cut and one more run; returns the certificate id.

    `token`: the hub keeps its permanent key in that PKCS#11 token (checked there, not on disk)."""
    doc = read_config(config_path)  # parses
    assert doc["ro"] == original["ro"], "ro is never written"
    for key, value in original.items():
        if key not in ("ro", "rw"):
            assert doc[key] == value, f"unknown top-level key {key} kept"
    rw = doc["rw"]
    for key, value in original["rw"].items():
        if key not in ONBOARDING_RW_KEYS:
            assert rw[key] == value, f"unknown rw key {key} kept"
    assert rw["iot_provisioning_state"] == "PROVISIONED"
    serial = original["ro"]["SN"]
    assert rw["client_id"] == f"hub-{serial}"
    assert rw["managed_thing_id"] == f"mt-{serial}"
    cert_pem = Path(rw["iot_permanent_cert_path"]).read_bytes()
    if token is None:
        key_path = Path(rw["iot_permanent_pk_path"])
        assert key_matches_certificate(cert_pem, key_path.read_bytes()), (
            "the key on disk is the certificate's"
        )
        assert key_path.stat().st_mode & 0o077 == 0
    else:
        assert_key_in_token(token, config_path, rw, serial)
    cert_id = pem_certificate_id(cert_pem)
    described = iot.describe_certificate(certificateId=cert_id)["certificateDescription"]
    assert described["status"] == "ACTIVE"
    principals = {
        p.rsplit("/", 1)[1] for p in iot.list_thing_principals(thingName=rw["client_id"])["principals"]
    }
    assert cert_id in principals
    # Besides it, only a certificate whose RegisterThing the service accepted just before the cut, before
    # the hub could record the answer: its token is then spent, so the hub had to start over.
    assert principals - {cert_id} <= set(token_spent_before_cut), "the thing has no stray certificate"
    if token is None:
        assert connects(cloud, rw["iot_permanent_cert_path"], rw["iot_permanent_pk_path"], rw["client_id"])
    else:
        connect_through_token(cloud, token, rw)
    return cert_id


def assert_key_in_token(token: SoftHsmToken, config_path: Path, rw: dict[str, Any], serial: str) -> None:
    """The permanent key is one sensitive, non-extractable object under the hub's label, and the
    certificate's (the token signs, the certificate verifies); no file near the config holds a key."""
    label = f"hub-onboarding-{serial}"
    assert rw["iot_permanent_pk_path"] == f"pkcs11:token={token.label};object={label};type=private"
    described = Pkcs11CredentialStore(token.config()).describe_key(label)
    assert described["count"] == 1, "never two keys under one label"
    assert described["sensitive"] == [True]
    assert described["extractable"] == [False]
    cert_handler(token.config()).read_cert_and_private_key(
        CertType.PERMANENT, rw["iot_permanent_cert_path"], rw["iot_permanent_pk_path"]
    )
    files = [p for p in config_path.parent.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
    assert files == [], "no file holds a private key"


@dataclass(frozen=True)
class KeyProbe:
    """Which key a token holds under a label, told without its bytes: its signature over a challenge."""

    challenge: bytes
    signature: bytes

    def signed_for(self, cert_pem: bytes) -> bool:
        """True when `cert_pem`'s public key verifies the signature: the certificate is that key's."""
        public = load_pem_x509_certificate(cert_pem).public_key()
        try:
            if isinstance(public, ec.EllipticCurvePublicKey):
                public.verify(self.signature, self.challenge, ec.ECDSA(hashes.SHA256()))
            elif isinstance(public, rsa.RSAPublicKey):
                public.verify(self.signature, self.challenge, padding.PKCS1v15(), hashes.SHA256())
            else:
                return False
        except InvalidSignature:
            return False
        return True


def probe_token_key(token: SoftHsmToken, label: str) -> KeyProbe | None:
    """The private key under `label` signs a fresh challenge; None when the token holds none there.

    A label never holds two keys, whatever a power cut interrupted."""
    import pkcs11

    with open_token(token.config()) as session:
        keys = list(
            session.get_objects(
                {pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY, pkcs11.Attribute.LABEL: label}
            )
        )
        assert len(keys) <= 1, f"never two keys under one label: {len(keys)} under {label!r}"
        if not keys:
            return None
        kind = "EC" if keys[0][pkcs11.Attribute.KEY_TYPE] == pkcs11.KeyType.EC else "RSA"
        challenge = os.urandom(32)
        return KeyProbe(challenge, sign(keys[0], kind, challenge))


def connect_through_token(cloud: LocalIotCore, token: SoftHsmToken, rw: dict[str, Any]) -> None:
    """A fresh connection with the permanent certificate, its key signing inside the token (awscrt)."""
    creds = cert_handler(token.config()).read_cert_and_private_key(
        CertType.PERMANENT, rw["iot_permanent_cert_path"], rw["iot_permanent_pk_path"]
    )
    endpoint = Endpoint(cloud.endpoint.mqtt_host, cloud.endpoint.mqtt_port)
    IotProvisioning(ConnectionSettings(endpoint, str(cloud.endpoint.root_ca_path), 30)).verify(
        rw["client_id"], creds, 10
    )


ONBOARDING_RW_KEYS = {
    "iot_provisioning_state",
    "client_id",
    "managed_thing_id",
    "iot_permanent_cert_path",
    "iot_permanent_pk_path",
    "metadata",
}
