"""Where CreateKeysAndCertificate's RSA keys come from: generated on demand, or ahead in a bounded pool.

Generating an RSA-2048 key takes 50-150 ms of CPU, most of a CreateKeysAndCertificate answer. `KeyPool`
keeps a few generated ahead by one background thread, so an answer only signs a certificate; when the
pool runs dry (a burst faster than generation) the key is generated on the asking thread, as without a
pool. A key leaves the pool once, to one caller, and is never kept, reused or logged.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from cryptography.hazmat.primitives.asymmetric import rsa

__all__ = ["DEFAULT_POOL_SIZE", "KeyPool", "KeySource", "OnDemandKeys", "generate_rsa_key"]

log = logging.getLogger(__name__)

DEFAULT_POOL_SIZE = 8
THREAD_NAME = "iot-core-local-keys"
_STOP_DEADLINE = 30.0  # one key generation, with room for a loaded machine

K = TypeVar("K")


def generate_rsa_key() -> rsa.RSAPrivateKey:
    """An RSA-2048 key with exponent 65537, the key AWS's CreateKeysAndCertificate returns."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class KeySource(Protocol):
    """What the certificate authority asks for a new device key."""

    def take(self) -> rsa.RSAPrivateKey: ...


class OnDemandKeys:
    """Every key generated when asked for (no thread, no state)."""

    def take(self) -> rsa.RSAPrivateKey:
        return generate_rsa_key()


class KeyPool(Generic[K]):
    """Up to `size` keys made ahead by one background thread (`start` to `stop`), refilled after each take.

    `generate` makes one key; tests pass a cheap one. Counters: `taken_ready` (answered from the pool) and
    `generated_on_demand` (the pool was empty). `wait_ready` lets a caller wait for the pool to fill
    without polling.
    """

    def __init__(self, generate: Callable[[], K], size: int = DEFAULT_POOL_SIZE) -> None:
        if size < 1:
            raise ValueError(f"a key pool holds at least one key, not {size}")
        self.generate = generate
        self.size = size
        self.taken_ready = 0
        self.generated_on_demand = 0
        self._keys: collections.deque[K] = collections.deque()
        self._changed = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def ready(self) -> int:
        """How many keys wait in the pool."""
        with self._changed:
            return len(self._keys)

    def start(self) -> None:
        """Start the filling thread (once)."""
        with self._changed:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._fill, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (after the key it may be generating) and drop every key not handed out."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(_STOP_DEADLINE)
        with self._changed:
            self._keys.clear()

    def take(self) -> K:
        """A key from the pool, or, when it is empty, one generated now on the calling thread."""
        with self._changed:
            if self._keys:
                self.taken_ready += 1
                key = self._keys.popleft()
                self._changed.notify_all()  # the filler refills
                return key
            self.generated_on_demand += 1
        return self.generate()

    def wait_ready(self, count: int, timeout: float) -> bool:
        """Wait until at least `count` keys are ready (at most `timeout` s); whether they are."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._keys) >= min(count, self.size), timeout)

    def _fill(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._stopping or len(self._keys) < self.size)
                if self._stopping:
                    return
            try:
                key = self.generate()  # outside the lock: takers are never held up by a generation
            except Exception:
                log.exception("key pool: generation failed; keys are generated on demand from now on")
                return
            with self._changed:
                if self._stopping:
                    return
                self._keys.append(key)
                self._changed.notify_all()
