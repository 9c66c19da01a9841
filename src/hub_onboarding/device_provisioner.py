"""DeviceProvisioner: the adapter between HubOnboarding and the provisioning library.

It gives HubOnboarding the SDK's operations (a claim session for fleet provisioning, JITR's connect
loop, the verification connect), translates FP_STATUS codes into exceptions and back
(`raise_for_status`, `status_of`: the public mapping, as the SDK's device_provisioner.cpp does) and owns
the retry policy: which failures deserve another attempt (`is_retriable`) and how long to wait before
it (exponential backoff with full jitter, bounded by a deadline). HubOnboarding decides *what* to do
next from its saved progress; this class decides *whether and when* to try again.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from hub_onboarding.certs import Credentials
from hub_onboarding.errors import (
    CertificateRefusedError,
    FpStatus,
    IdentityError,
    MqttConnectionError,
    OnboardingError,
    ProvisioningError,
    PublishTimeoutError,
    SubscribeTimeoutError,
)
from hub_onboarding.fleet import FleetApi

log = logging.getLogger(__name__)

# FP_STATUS -> exception class, read off the tree itself (each class names its status), so the
# table and the classes cannot disagree.
_STATUS_ERRORS: dict[FpStatus, type[ProvisioningError]] = {
    cls.status: cls
    for cls in (MqttConnectionError, IdentityError, SubscribeTimeoutError, PublishTimeoutError)
}
_STATUS_MESSAGES = {
    FpStatus.FP_STATUS_MQTT_CONNECTION_ERROR: "Failed due to MQTT Connection error",
    FpStatus.FP_STATUS_IDENTITY_ERROR: "Failed due to an identity (certificate or registration) error",
    FpStatus.FP_STATUS_SUBSCRIBE_TIMEOUT_ERROR: "Failed due to MQTT subscribe timeout",
    FpStatus.FP_STATUS_PUBLISH_TIMEOUT_ERROR: "Failed due to MQTT publish timeout",
}


def raise_for_status(status: FpStatus, detail: str = "") -> None:
    """FP_STATUS_OK returns; every other code raises its exception (the SDK's translation table).

    Public (`hub_onboarding.raise_for_status`): the mapping the SDK chapter asks for, FP_STATUS codes onto
    the one exception tree, for code that speaks status codes (a wrapped C provisioning library, a
    supervisor). This package's own provisioning raises the typed exceptions directly, so it needs
    the inverse only: `status_of`, which `ProvisioningError.status` agrees with.
    """
    if status is FpStatus.FP_STATUS_OK:
        return
    message = _STATUS_MESSAGES[status] + (f": {detail}" if detail else "")
    if status is FpStatus.FP_STATUS_IDENTITY_ERROR:
        raise IdentityError(message, operation="provisioning")
    raise _STATUS_ERRORS[status](message)


def status_of(exc: BaseException | None) -> FpStatus:
    """The FP_STATUS code for an outcome (None: success); public as `hub_onboarding.status_of`.

    A ProvisioningError carries its own; anything else that stopped provisioning counts as the SDK's
    generic connection failure.
    """
    if exc is None:
        return FpStatus.FP_STATUS_OK
    if isinstance(exc, ProvisioningError):
        return exc.status
    return FpStatus.FP_STATUS_MQTT_CONNECTION_ERROR


def format_seconds(seconds: float) -> str:
    """A duration as people read it: one decimal under 10 s, whole seconds above (pure)."""
    return f"{seconds:.1f}" if seconds < 10 else f"{seconds:.0f}"


def is_retriable(exc: OnboardingError) -> bool:
    """Network trouble, timeouts, throttling and 5xx answers are worth another attempt; refusals are not."""
    return isinstance(exc, ProvisioningError) and exc.retriable


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog): sleep U(0, min(cap, base*2**n))."""

    base: float = 1.0
    cap: float = 30.0
    rng: Callable[[], float] = random.random

    def delay(self, attempt: int) -> float:
        return self.rng() * min(self.cap, self.base * 2.0 ** max(0, attempt))


@dataclass(frozen=True)
class Retry:
    """A failed attempt about to be tried again after `delay` seconds (told before the wait)."""

    attempt: int
    reason: str
    delay: float


RetryListener = Callable[[Retry], None]


class Connection(AbstractContextManager["Connection"], Protocol):
    """An open MQTT connection (closed on leaving the `with`): mqtt.MqttConnection, or a test's fake."""

    def fleet_provisioning(self, operation_timeout: float) -> FleetApi: ...


class Transport(Protocol):
    """One connection attempt per call, no retries: mqtt.IotProvisioning, or a test's fake network."""

    @property
    def connect_timeout(self) -> float: ...

    def connect(
        self, client_id: str, credentials: Credentials, timeout: float | None = None
    ) -> Connection: ...

    def verify(self, client_id: str, credentials: Credentials, timeout: float | None = None) -> None: ...


class DeviceProvisioner:
    def __init__(
        self,
        iot: Transport,
        *,
        operation_timeout: float,
        retry_timeout: float,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.iot = iot
        self.operation_timeout = operation_timeout
        self.retry_timeout = retry_timeout
        self.backoff = backoff or Backoff()
        self._clock = clock
        self._sleep = sleep

    def _budget(self, limit: float, deadline: float | None) -> float:
        """`limit`, shortened so a single wait never runs far past the overall deadline (at least 1 s).

        Rounded to a tenth of a second: it is the figure messages show ("no answer within 4.2 s")."""
        if deadline is None:
            return limit
        return round(min(limit, max(1.0, deadline - self._clock())), 1)

    @contextlib.contextmanager
    def claim_session(
        self, client_id: str, claim: Credentials, deadline: float | None = None
    ) -> Iterator[FleetApi]:
        """One connection with the claim certificate, and the fleet provisioning API on it."""
        connect_timeout = self._budget(self.iot.connect_timeout, deadline)
        with self.iot.connect(client_id, claim, connect_timeout) as conn:
            yield conn.fleet_provisioning(self._budget(self.operation_timeout, deadline))

    def provision_jitr(self, client_id: str, dha: Credentials, on_retry: RetryListener | None = None) -> int:
        """Connect with the DHA certificate until it works; return the number of attempts.

        The first attempts are refused while the cloud registers and activates the certificate, so a
        refusal is retried with the same policy as fleet provisioning (backoff, deadline); a failure that
        cannot succeed later (unusable credentials or CA file: `retriable` False) ends at once.
        """
        deadline = self.deadline()
        attempt = 0
        while True:
            attempt += 1
            try:
                timeout = self._budget(self.iot.connect_timeout, deadline)
                with self.iot.connect(client_id, dha, timeout):
                    return attempt
            except MqttConnectionError as exc:
                if isinstance(exc, CertificateRefusedError):
                    exc.retriable = True  # expected until the cloud has registered and activated it
                last = exc.message
                try:
                    self.wait_before_retry(exc, attempt, deadline, on_retry)
                except MqttConnectionError:
                    if not exc.retriable:
                        raise
                    elapsed = format_seconds(self._clock() - (deadline - self.retry_timeout))
                    raise MqttConnectionError(
                        f"JITR: no connection within {self.retry_timeout:g} s after {attempt} attempt(s) "
                        f"in {elapsed} s; "
                        f"last error: {last}. Check that the CA is registered with auto-registration and "
                        "that something activates new certificates and attaches a policy (the limit is "
                        "ro.mqtt_retry_timeout_seconds)"
                    ) from None

    def verify(self, client_id: str, credentials: Credentials, deadline: float | None = None) -> None:
        try:
            self.iot.verify(client_id, credentials, self._budget(self.iot.connect_timeout, deadline))
        except CertificateRefusedError as exc:
            exc.retriable = True  # the certificate was registered a moment ago: worth another attempt
            raise

    def deadline(self) -> float:
        return self._clock() + self.retry_timeout

    def wait_before_retry(
        self, exc: OnboardingError, attempt: int, deadline: float, on_retry: RetryListener | None = None
    ) -> None:
        """Sleep before attempt `attempt + 1`, or re-raise `exc` when it is final or time is up.

        `on_retry` hears of the retry before the wait starts (a supervisor counts retries with it).
        """
        if not is_retriable(exc):
            raise exc
        delay = self.backoff.delay(attempt - 1)  # the first retry waits up to `base`, then doubling
        now = self._clock()
        if now + delay >= deadline:
            elapsed = format_seconds(now - (deadline - self.retry_timeout))
            exc.message = (
                f"{exc.message} (gave up after {attempt} attempt(s) in {elapsed} s; the limit is "
                f"ro.mqtt_retry_timeout_seconds = {self.retry_timeout:g} s)"
            )
            exc.args = (exc.message,)
            raise exc
        log.warning("attempt %d failed (%s); retrying in %.1f s", attempt, exc.message, delay)
        if on_retry is not None:
            on_retry(Retry(attempt, exc.message, delay))
        self._sleep(delay)
