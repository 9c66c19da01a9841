"""Request rates per account, throttled as AWS IoT Core throttles them: one token bucket per operation.

The defaults are AWS's published per-account defaults (all adjustable on AWS by a quota request):

    Fleet provisioning MQTT API, the fleet provisioning table of "AWS IoT Core endpoints and quotas"
    (https://docs.aws.amazon.com/general/latest/gr/iot-core.html): CreateKeysAndCertificate 10/s,
    CreateCertificateFromCsr 50/s, RegisterThing 10/s (users report RegisterThing throttled near 10/s:
    aws/aws-iot-device-sdk-python-v2 issue 232).

    Control plane API, the "AWS IoT Core throttling limits" table of the same page (earlier in the
    developer guide's "AWS IoT Limits" page, https://docs.aws.amazon.com/iot/latest/developerguide/limits-iot.html,
    where these numbers were checked): per operation, e.g. CreateThing 15/s, DescribeThing 350/s,
    AttachPolicy 15/s, most others 10/s. Quotas change; `--quota` follows an account's own.

Keys are `SERVICE:OPERATION`: `fleet` is the fleet provisioning MQTT API, any other service is the
control plane service of that signing name (`iot`, or another hosted service); `SERVICE:*` is the rate of
that service's operations not named, `*:*` of every service's. A bucket holds one second of its rate
(at least one request), so a burst beyond a second's worth is throttled, as on AWS.

    Python   LocalIotCore(quotas=Quotas().with_rates({"fleet:RegisterThing": 50}))  Quotas.off()
    CLI      iot-core-local serve --quota fleet:RegisterThing=50 ...   --no-quotas
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .errors import InvalidQuota

__all__ = ["AWS_DEFAULT_RATES", "FLEET", "SOURCE", "Quotas", "RateLimiter", "TokenBucket", "parse_quota"]

SOURCE = "https://docs.aws.amazon.com/general/latest/gr/iot-core.html"
FLEET = "fleet"  # the fleet provisioning MQTT API's service name in quota keys

# Transactions per second per account (see the module docstring for where they come from).
AWS_DEFAULT_RATES: Mapping[str, float] = MappingProxyType(
    {
        # fleet provisioning MQTT API
        "fleet:CreateKeysAndCertificate": 10.0,
        "fleet:CreateCertificateFromCsr": 50.0,
        "fleet:RegisterThing": 10.0,
        # AWS IoT control plane: the operations iot-core-local serves whose rate is not 10
        "iot:AttachPolicy": 15.0,
        "iot:AttachThingPrincipal": 15.0,
        "iot:CreateCertificateFromCsr": 15.0,
        "iot:CreateThing": 15.0,
        "iot:DeleteThing": 15.0,
        "iot:DescribeThing": 350.0,
        "iot:DetachPolicy": 15.0,
        "iot:DetachThingPrincipal": 15.0,
        "iot:GetPolicyVersion": 15.0,
        "iot:ListAttachedPolicies": 15.0,
        "iot:ListPrincipalPolicies": 15.0,
        "iot:*": 10.0,  # every other AWS IoT operation of the table
        "*:*": 10.0,  # another hosted service's operations, until its own rates are given
    }
)


def parse_quota(spec: str) -> tuple[str, float]:
    """`SERVICE:OPERATION=RATE` (requests per second), e.g. `fleet:RegisterThing=50`, `iot:*=100`."""
    key, sep, text = spec.strip().partition("=")
    service, colon, operation = key.partition(":")
    if not sep or not colon or not service or not operation:
        raise InvalidQuota(
            f"bad quota {spec!r}: expected SERVICE:OPERATION=RATE, e.g. fleet:RegisterThing=50"
        )
    try:
        rate = float(text)
    except ValueError:
        raise InvalidQuota(f"bad quota {spec!r}: RATE is a number of requests per second") from None
    return key, _checked_rate(key, rate)


def _checked_rate(key: str, rate: float) -> float:
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate) or rate <= 0:
        raise InvalidQuota(
            f"the rate of {key} must be a positive number of requests per second, not {rate!r}"
        )
    return float(rate)


@dataclass(frozen=True)
class Quotas:
    """Rates per `SERVICE:OPERATION` key; `enabled=False` throttles nothing."""

    rates: Mapping[str, float] = field(default_factory=lambda: AWS_DEFAULT_RATES)
    enabled: bool = True

    def __post_init__(self) -> None:
        for key, rate in self.rates.items():
            if ":" not in key:
                raise InvalidQuota(f"bad quota key {key!r}: expected SERVICE:OPERATION")
            _checked_rate(key, rate)
        object.__setattr__(self, "rates", MappingProxyType(dict(self.rates)))

    @classmethod
    def off(cls) -> Quotas:
        """Nothing throttled (load tests that measure the server, not the account's quotas)."""
        return cls(enabled=False)

    def with_rates(self, rates: Mapping[str, float]) -> Quotas:
        """These rates on top of this one's (e.g. `Quotas().with_rates({"fleet:RegisterThing": 50})`)."""
        return Quotas({**self.rates, **rates}, self.enabled)

    def rate(self, service: str, operation: str) -> float | None:
        """Requests per second for this operation, or None: not throttled."""
        if not self.enabled:
            return None
        for key in (f"{service}:{operation}", f"{service}:*", "*:*"):
            rate = self.rates.get(key)
            if rate is not None:
                return rate
        return None


class TokenBucket:
    """`rate` tokens a second, up to `capacity`; not thread-safe (RateLimiter locks around it)."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.updated = now

    def take(self, now: float) -> bool:
        elapsed = max(0.0, now - self.updated)  # a clock that steps back refills nothing
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class RateLimiter:
    """One account's buckets, one per `SERVICE:OPERATION`; thread-safe (the loop and HTTP threads)."""

    def __init__(self, quotas: Quotas, clock: Callable[[], float] = time.monotonic) -> None:
        self.quotas = quotas
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, TokenBucket] = {}
        self.throttled = 0  # requests refused so far

    def allow(self, service: str, operation: str) -> bool:
        """Take one request's token; False: over the rate, answer ThrottlingException."""
        rate = self.quotas.rate(service, operation)
        if rate is None:
            return True
        key = f"{service}:{operation}"
        with self._lock:
            now = self.clock()
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(rate, max(rate, 1.0), now)
            if bucket.take(now):
                return True
            self.throttled += 1
            return False
