"""RSA keys generated ahead for CreateKeysAndCertificate: handed out once, refilled, bounded, stopped."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import mqtt5
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from iot_core_local.ca import CertificateAuthority, load_certificate
from iot_core_local.keys import THREAD_NAME, KeyPool, generate_rsa_key
from iot_core_local.recipes.claims import set_up_fleet_provisioning
from iot_core_local.server import LocalIotCore
from tests._support.devices import RawClient, write_credentials

WAIT = 60.0  # a deadline for waits on events, never a pause: a loaded machine generates keys slowly


class Counter:
    """A cheap stand-in for key generation: distinct numbers, and which thread asked for each."""

    def __init__(self) -> None:
        self.numbers = itertools.count()
        self.threads: list[str] = []
        self.lock = threading.Lock()

    def __call__(self) -> int:
        with self.lock:
            self.threads.append(threading.current_thread().name)
            return next(self.numbers)

    @property
    def calls(self) -> int:
        with self.lock:
            return len(self.threads)


class GatedCounter(Counter):
    """Lets the filling thread make `allowed` keys, then holds it until `gate` is set."""

    def __init__(self, allowed: int) -> None:
        super().__init__()
        self.allowed = allowed
        self.gate = threading.Event()

    def __call__(self) -> int:
        if threading.current_thread().name == THREAD_NAME and self.calls >= self.allowed:
            assert self.gate.wait(WAIT)
        return super().__call__()


@pytest.fixture
def counter() -> Counter:
    return Counter()


@pytest.fixture
def pool(counter: Counter) -> Iterator[KeyPool[int]]:
    keys = KeyPool(counter, size=3)
    keys.start()
    yield keys
    keys.stop()


def _key_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


def test_the_pool_fills_up_to_its_size_and_no_further(pool: KeyPool[int], counter: Counter) -> None:
    assert pool.wait_ready(3, WAIT)
    # The filler generates only while the pool holds fewer than `size`, so a full pool means exactly 3.
    assert pool.ready() == 3
    assert counter.calls == 3
    assert set(counter.threads) == {THREAD_NAME}


def test_keys_are_handed_out_once_and_refilled_after_each_take(pool: KeyPool[int], counter: Counter) -> None:
    taken = []
    for _ in range(7):
        assert pool.wait_ready(3, WAIT)
        taken.append(pool.take())
    assert len(set(taken)) == 7  # never the same key twice
    assert pool.taken_ready == 7
    assert pool.generated_on_demand == 0
    assert pool.wait_ready(3, WAIT)
    assert counter.calls == 3 + 7  # one generation per take, after the first fill


def test_an_empty_pool_generates_on_the_asking_thread() -> None:
    counter = GatedCounter(allowed=2)
    pool = KeyPool(counter, size=2)
    pool.start()
    try:
        assert pool.wait_ready(2, WAIT)
        first, second = pool.take(), pool.take()
        # The filler is held at the gate: the pool stays empty, so the third key is made right here.
        third = pool.take()
        assert len({first, second, third}) == 3
        assert pool.taken_ready == 2
        assert pool.generated_on_demand == 1
        assert threading.current_thread().name in counter.threads
    finally:
        counter.gate.set()
        pool.stop()


def test_a_pool_never_started_generates_every_key_on_demand(counter: Counter) -> None:
    pool = KeyPool(counter, size=4)
    assert [pool.take(), pool.take()] == [0, 1]
    assert pool.generated_on_demand == 2
    assert not pool.running
    assert _key_threads() == []


def test_stop_ends_the_thread_and_drops_the_keys_not_handed_out(pool: KeyPool[int]) -> None:
    assert pool.wait_ready(3, WAIT)
    assert pool.running
    pool.stop()
    assert not pool.running
    assert _key_threads() == []
    assert pool.ready() == 0
    pool.take()  # still answers, on demand
    assert pool.generated_on_demand == 1
    pool.stop()  # twice is fine


def test_a_pool_has_at_least_one_key() -> None:
    with pytest.raises(ValueError, match="at least one key"):
        KeyPool(Counter(), size=0)


class ListedKeys:
    """A KeySource handing out keys made beforehand, to see which one the CA used."""

    def __init__(self, keys: list[rsa.RSAPrivateKey]) -> None:
        self.keys = list(keys)

    def take(self) -> rsa.RSAPrivateKey:
        return self.keys.pop(0)


def test_the_ca_issues_for_the_key_its_key_source_gives(tmp_path: Path) -> None:
    key = generate_rsa_key()
    ca = CertificateAuthority(tmp_path / "ca", keys=ListedKeys([key]))
    cert_pem, key_pem = ca.create_keys_and_certificate()
    assert key_pem.startswith("-----BEGIN RSA PRIVATE KEY-----")
    returned = serialization.load_pem_private_key(key_pem.encode(), password=None)
    assert isinstance(returned, rsa.RSAPrivateKey)
    assert returned.private_numbers() == key.private_numbers()
    assert load_certificate(cert_pem).public_key() == key.public_key()


def test_create_keys_and_certificate_answers_from_the_pool_and_stop_leaves_no_thread(
    tmp_path: Path,
) -> None:
    with LocalIotCore(tmp_path / "data") as core:
        keys = core.key_pool
        assert keys is not None
        assert keys.size == 8
        assert keys.wait_ready(1, WAIT)
        setup = set_up_fleet_provisioning(core.client(), "PoolTemplate")  # the control plane's answer
        assert (keys.taken_ready, keys.generated_on_demand) == (1, 0)

        claim = write_credentials(
            tmp_path, "claim", setup.certificate_id, setup.certificate_pem, setup.private_key_pem
        )
        hub = RawClient(core, claim)
        try:
            assert hub.connect("pool-hub").reason_code == 0
            assert hub.subscribe("$aws/certificates/create/json/+") == [1]
            assert keys.wait_ready(1, WAIT)
            assert hub.publish("$aws/certificates/create/json", b"{}") == 0
            answer = hub.receive_type(mqtt5.PublishPacket)
        finally:
            hub.close()
        assert answer.topic == "$aws/certificates/create/json/accepted"
        assert json.loads(answer.payload)["privateKey"].startswith("-----BEGIN RSA PRIVATE KEY-----")
        assert (keys.taken_ready, keys.generated_on_demand) == (2, 0)
        assert _key_threads()
    assert not keys.running
    assert _key_threads() == []


def test_a_pool_of_zero_generates_every_key_on_demand(tmp_path: Path) -> None:
    with LocalIotCore(tmp_path / "data", key_pool_size=0) as core:
        assert core.key_pool is None
        assert _key_threads() == []
        cert_pem, _ = core.ca.create_keys_and_certificate()
        assert load_certificate(cert_pem)
