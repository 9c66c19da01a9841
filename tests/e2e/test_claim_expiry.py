"""A CreateProvisioningClaim certificate stops working at its expiration on a connection opened before it
too: such a connection used to go on minting certificates for as long as it stayed open."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from iot_core_local.server import LocalIotCore
from tests._support.devices import RawClient, write_credentials
from tests._support.fake_cloud import FakeClock
from tests.e2e.test_provisioning_claim_and_quotas import CLAIM_TTL, temporary_claim

pytestmark = pytest.mark.e2e

CREATE = "$aws/certificates/create/json"
NOT_AUTHORIZED = 135


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def core(tmp_path: Path, clock: FakeClock) -> Iterator[LocalIotCore]:
    with LocalIotCore(tmp_path / "data", clock=clock.time) as running:
        yield running


def test_an_open_connection_of_a_temporary_claim_is_refused_after_its_expiration(
    core: LocalIotCore, clock: FakeClock, tmp_path: Path
) -> None:
    claim = temporary_claim(core, "Expiring")
    arn = core.registry.cert_arn(claim["certificateId"])
    expired = threading.Event()

    def on_policy_change(target: str) -> None:
        if target == arn:
            expired.set()

    core.registry.add_policy_listener(on_policy_change)
    creds = write_credentials(
        tmp_path, "claim", claim["certificateId"], claim["certificatePem"], claim["keyPair"]["PrivateKey"]
    )
    client = RawClient(core, creds)
    try:
        assert client.connect("early").reason_code == 0
        assert client.ask(CREATE, b"{}")[0] == "accepted"
        clock.advance(CLAIM_TTL - 1)
        assert core.registry.expire_provisioning_claims() == []  # not yet
        assert client.publish(CREATE, b"{}") == 0
        clock.advance(2)
        assert expired.wait(5), "the expiration was never announced to the gateway"
        assert client.publish(CREATE, b"{}") == NOT_AUTHORIZED
    finally:
        client.close()
    assert core.registry.policy_documents(claim["certificateId"]) == []
