"""The registry tells its CA listeners when a CA stops (or starts) being ACTIVE, or is deleted.

The gateway hears this to disconnect the devices a CA signed (tests in test_gateway.py, through a
real client); here, the registry's side: one event per committed change, none for a rollback.
"""

from __future__ import annotations

import pytest

from iot_core_local.model import DELETED
from iot_core_local.registry import Registry
from tests._support.certificates import pem_of, self_signed_ca


def test_ca_listeners_hear_status_changes_and_deletion(cp_registry: Registry) -> None:
    heard: list[tuple[str, str]] = []
    cp_registry.add_ca_listener(lambda ca_id, status: heard.append((ca_id, status)))
    ca_cert, _ = self_signed_ca("listened")
    ca = cp_registry.add_ca_certificate(
        pem_of(ca_cert), status="ACTIVE", auto_registration=False, registration_config=None, mode="DEFAULT"
    )
    cp_registry.update_ca_certificate(ca.certificate_id, auto_registration=True)  # status unchanged
    assert heard == []
    cp_registry.update_ca_certificate(ca.certificate_id, status="INACTIVE")
    cp_registry.update_ca_certificate(ca.certificate_id, status="INACTIVE")  # no change, no event
    assert heard == [(ca.certificate_id, "INACTIVE")]

    def activate_then_fail() -> None:
        with cp_registry.transaction():
            cp_registry.update_ca_certificate(ca.certificate_id, status="ACTIVE")
            raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        activate_then_fail()
    assert heard == [(ca.certificate_id, "INACTIVE")]
    cp_registry.delete_ca_certificate(ca.certificate_id)
    assert heard == [(ca.certificate_id, "INACTIVE"), (ca.certificate_id, DELETED)]
