"""The fault switch: make the stand-in misbehave on purpose, the way AWS IoT Core does on a bad day.

Hub makers rehearse onboarding against failures here instead of waiting for them in the field. Each
fault applies to the next `count` matching operations, then clears itself:

    throttle  a provisioning request gets /rejected {"statusCode": 429, "errorCode": "ThrottlingException"};
              a CONNECT gets CONNACK 151 (quota exceeded), as AWS throttles connects; over MQTT 3.1.1,
              which has no such code, CONNACK return code 3 (server unavailable)
    drop      the connection is closed in the middle of the request (no PUBACK, no answer, nothing done)
              or right after CONNECT (no CONNACK)
    ignore    the request is swallowed (PUBACK, then no answer ever, nothing done); a CONNECT is never
              answered (the connection stays open until the client gives up)
    delay     the answer (or CONNACK) comes after `seconds`
    refuse    a new connection is closed at CONNECT without CONNACK, like an endpoint in trouble

Operations: Connect, CreateKeysAndCertificate, CreateCertificateFromCsr, RegisterThing, or any.
`refuse` applies to Connect only (with "any", it waits for the next CONNECT).

The same fault has three spellings:

    Python     core.faults.add("throttle", "RegisterThing", count=2)
    CLI        iot-core-local serve --fault throttle:RegisterThing:2   (KIND[:OPERATION[:COUNT[:SECONDS]]])
    HTTP       POST {"kind": "throttle", "operation": "RegisterThing", "count": 2} to API_URL/_local/faults
               (or {"spec": "throttle:RegisterThing:2"}); GET lists what is armed; DELETE clears all

It is consulted only when something is armed: the gateway's hot path reads one boolean (`armed`).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

from .errors import InvalidFault

__all__ = ["ANY", "CONNECT", "KINDS", "OPERATIONS", "Fault", "FaultInjector", "parse_spec"]

CONNECT = "Connect"
ANY = "any"
OPERATIONS = (CONNECT, "CreateKeysAndCertificate", "CreateCertificateFromCsr", "RegisterThing")
KINDS = ("throttle", "drop", "ignore", "delay", "refuse")
# Long enough for any client's own deadline to fire first; bounded so an ignored CONNECT cannot pin a
# connection for the life of the server.
MAX_SECONDS = 600.0
_BY_LOWER = {name.lower(): name for name in (*OPERATIONS, ANY)} | {"*": ANY}


@dataclass
class Fault:
    """One armed fault; `remaining` counts down as operations take it."""

    kind: str
    operation: str
    remaining: int
    seconds: float = 0.0

    def matches(self, operation: str) -> bool:
        if self.kind == "refuse" and operation != CONNECT:
            return False
        return self.operation in (ANY, operation)

    def describe(self) -> str:
        after = f" {self.seconds:g} s" if self.kind == "delay" else ""
        return f"{self.kind}{after} on {self.operation} ({self.remaining} left)"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "operation": self.operation,
            "remaining": self.remaining,
            "seconds": self.seconds,
        }


def _checked(kind: str, operation: str, count: int, seconds: float) -> Fault:
    if kind not in KINDS:
        raise InvalidFault(f"unknown fault kind {kind!r}; one of {', '.join(KINDS)}")
    canonical = _BY_LOWER.get(operation.lower())
    if canonical is None:
        raise InvalidFault(f"unknown operation {operation!r}; one of {', '.join((*OPERATIONS, ANY))}")
    if kind == "refuse" and canonical not in (CONNECT, ANY):
        raise InvalidFault("refuse applies to Connect only")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidFault(f"count must be a positive integer, not {count!r}")
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or not 0 <= seconds <= MAX_SECONDS
    ):
        raise InvalidFault(f"seconds must be a number from 0 to {MAX_SECONDS:g}, not {seconds!r}")
    if kind == "delay" and seconds <= 0:
        raise InvalidFault("delay needs seconds > 0 (KIND:OPERATION:COUNT:SECONDS)")
    return Fault(kind, canonical, count, float(seconds))


def parse_spec(spec: str) -> Fault:
    """`KIND[:OPERATION[:COUNT[:SECONDS]]]`, e.g. `throttle:RegisterThing:2`, `delay:any:1:3.5`."""
    parts = spec.strip().split(":")
    if not parts[0] or len(parts) > 4:
        raise InvalidFault(f"bad fault {spec!r}: expected KIND[:OPERATION[:COUNT[:SECONDS]]]")
    kind = parts[0].lower()
    operation = parts[1] if len(parts) > 1 and parts[1] else ANY
    try:
        count = int(parts[2]) if len(parts) > 2 and parts[2] else 1
        seconds = float(parts[3]) if len(parts) > 3 and parts[3] else 0.0
    except ValueError:
        raise InvalidFault(f"bad fault {spec!r}: COUNT is an integer, SECONDS a number") from None
    return _checked(kind, operation, count, seconds)


def from_json(data: object) -> Fault:
    """A fault from the HTTP form: {"spec": "..."} or {"kind", "operation"?, "count"?, "seconds"?}."""
    if not isinstance(data, dict):
        raise InvalidFault("the body must be a JSON object")
    if "spec" in data:
        spec = data["spec"]
        if not isinstance(spec, str):
            raise InvalidFault("spec must be a string")
        return parse_spec(spec)
    kind = data.get("kind")
    operation = data.get("operation", ANY)
    if not isinstance(kind, str) or not isinstance(operation, str):
        raise InvalidFault('kind (and operation, if given) must be strings, e.g. {"kind": "throttle"}')
    return _checked(kind.lower(), operation, data.get("count", 1), data.get("seconds", 0.0))


class FaultInjector:
    """The armed faults of one server; thread-safe (set from HTTP threads, taken on the gateway's loop)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self.armed = False  # the one thing the hot path reads

    def add(self, kind: str, operation: str = ANY, *, count: int = 1, seconds: float = 0.0) -> Fault:
        return self.arm(_checked(kind, operation, count, seconds))

    def add_spec(self, spec: str) -> Fault:
        return self.arm(parse_spec(spec))

    def arm(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
            self.armed = True
        return fault

    def take(self, operation: str) -> Fault | None:
        """The first armed fault for `operation`, counted down (a copy: what applies now)."""
        with self._lock:
            for fault in self._faults:
                if fault.matches(operation):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                        self.armed = bool(self._faults)
                    return Fault(fault.kind, operation, fault.remaining, fault.seconds)
        return None

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self.armed = False

    def snapshot(self) -> list[Fault]:
        with self._lock:
            return [Fault(f.kind, f.operation, f.remaining, f.seconds) for f in self._faults]

    def to_json(self) -> list[dict[str, Any]]:
        return [fault.to_json() for fault in self.snapshot()]
