"""What a hub must be after an interrupted onboarding (a power cut, a fault) and one more run."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

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
) -> str:
    """Everything a hub must be after a power cut and one more run; returns the certificate id."""
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
    key_path = Path(rw["iot_permanent_pk_path"])
    assert key_matches_certificate(cert_pem, key_path.read_bytes()), "the key on disk is the certificate's"
    assert key_path.stat().st_mode & 0o077 == 0
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
    assert connects(cloud, rw["iot_permanent_cert_path"], key_path, rw["client_id"])
    return cert_id


ONBOARDING_RW_KEYS = {
    "iot_provisioning_state",
    "client_id",
    "managed_thing_id",
    "iot_permanent_cert_path",
    "iot_permanent_pk_path",
    "metadata",
}
