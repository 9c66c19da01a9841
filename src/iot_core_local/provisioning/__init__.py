"""Provisioning as AWS IoT Core runs it, behind the one narrow interface the gateway uses.

    match(topic)                  the provisioning request a PUBLISH's topic names, if any
    owns_filter(topic_filter)     a subscription only provisioning answers can match (Mosquitto never sees it)
    answer(request, payload, who) the answer for the asking connection only; runs on the event loop or in
                                  a worker or hook thread, as the request needs
    throttled(request)            AWS's answer to a request over its rate limit (the fault switch)
    limiter                       the account's quotas (quotas.py): a request over its rate is answered
                                  /rejected 429 ThrottlingException before any work is done
    on_unknown_certificate(...)   JITR/JITP for a certificate the registry does not know (or still pending):
                                  Refuse, Event (JITR: registered, event published) or Accept
    maintain()                    housekeeping the gateway calls every second or so (the expired-token sweep)
    close()                       waits for work already running, then lets go of the broker

The package, by concept:

    topics.py   the MQTT API's topics, Request, Requester and Answer (pure)
    fleet.py    fleet provisioning by claim: CreateKeysAndCertificate, CreateCertificateFromCsr, RegisterThing
    jit.py      JITR and JITP, and the publisher of the registration events

Hubs share one claim certificate, so answers go to the asking connection only: a broadcast would hand one
hub's private key to all. Nothing here logs a private key or an ownership token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from cryptography import x509

from .. import templates
from ..ca import CertificateAuthority
from ..errors import ServiceError
from ..model import CaStatus, Certificate, CertificateStatus
from ..quotas import FLEET, RateLimiter
from ..registry import Registry
from .fleet import FleetProvisioning, Prepared, apply_plan
from .jit import EventPublisher, JustInTime, Registered
from .topics import (
    CREATE_FROM_CSR,
    CREATE_KEYS,
    REGISTER_THING,
    Answer,
    Request,
    Requester,
    is_provisioning_filter,
    parse_request_topic,
    registration_event_topic,
)

__all__ = [
    "CREATE_FROM_CSR",
    "CREATE_KEYS",
    "REGISTER_THING",
    "Accept",
    "Answer",
    "Event",
    "Prepared",
    "ProvisioningService",
    "Refuse",
    "Request",
    "Requester",
    "is_provisioning_filter",
    "parse_request_topic",
    "registration_event_topic",
]

log = logging.getLogger("iot_core_local.gateway")

T = TypeVar("T")

HOOK_WORKERS = 32  # RegisterThing calls with a pre-provisioning hook in flight at once
SWEEP_INTERVAL = 60.0  # at most; more often when tokens live shorter than that


@dataclass(frozen=True)
class Refuse:
    """Close the connection without CONNACK; `why` says why (logged)."""

    why: str


@dataclass(frozen=True)
class Event:
    """JITR: the certificate is registered PENDING_ACTIVATION and its event published on `topic`; close
    the connection without CONNACK (the device's retry connects once the certificate is activated)."""

    topic: str


@dataclass(frozen=True)
class Accept:
    """Go on with the connect rules for `certificate` (whatever its status; they refuse what is not
    ACTIVE). `provisioned`: JITP has just provisioned it."""

    certificate: Certificate
    provisioned: bool = False


class ProvisioningService:
    """Fleet provisioning (by claim) and just-in-time registration/provisioning over one registry.

    `clock` (epoch seconds) dates the JITR events and decides which ownership tokens have expired for the
    sweep; tests pass one they advance. `broker` is Mosquitto's Unix socket, where JITR events are published.
    """

    def __init__(
        self,
        registry: Registry,
        ca: CertificateAuthority,
        *,
        token_ttl: float = 3600.0,
        hook_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
        broker: str | None = None,
        broker_timeout: float = 10.0,
        hook_workers: int = HOOK_WORKERS,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.registry = registry
        self.limiter = limiter  # None: nothing throttled
        self.ca = ca
        self.token_ttl = token_ttl
        self.clock = clock
        self.fleet = FleetProvisioning(registry, ca, token_ttl=token_ttl, hook_timeout=hook_timeout)
        self.jit = JustInTime(registry, clock)
        self.events = EventPublisher(broker, timeout=broker_timeout) if broker is not None else None
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="iot-core-local-provisioning")
        # Hooks wait on other people's servers for up to hook_timeout each: they get their own threads, so
        # slow hooks never hold the threads CreateKeysAndCertificate and JITR need. A slot is taken on the
        # loop before a thread, so the pool never queues: a hook that finds no slot free within its time
        # limit is answered at once (429) instead of waiting behind the others.
        self.hook_timeout = hook_timeout
        self.hook_workers = hook_workers
        self.hook_slots = asyncio.Semaphore(hook_workers)  # public: a test holds slots to fill the pool
        self._hooks = ThreadPoolExecutor(max_workers=hook_workers, thread_name_prefix="iot-core-local-hook")
        self._last_sweep = float("-inf")  # sweep at once: tokens may have expired while the server was down

    # ---- the gateway's interface ---------------------------------------------------------------------

    def match(self, topic: str) -> Request | None:
        return parse_request_topic(topic)

    def owns_filter(self, topic_filter: str) -> bool:
        return is_provisioning_filter(topic_filter)

    async def answer(self, request: Request, payload: bytes, requester: Requester) -> Answer:
        """Run one request; every failure is a /rejected answer, never an exception.

        CreateKeysAndCertificate (its key usually comes ready from the CA's key pool, but an empty pool
        means generating one, 50-150 ms) runs in a worker thread, and a RegisterThing whose template has a
        pre-provisioning hook (HTTP, up to the hook timeout) in a hook thread. Signing a CSR and a
        RegisterThing without a hook take well under a millisecond: they run on the loop, where a thread
        would cost more in hand-offs and GIL contention than the work itself.
        """
        if self.limiter is not None and not self.limiter.allow(FLEET, request.operation):
            return self.fleet.throttled(request, f"over the account's {request.operation} quota")
        prepared = self.fleet.prepare(request)
        if prepared.hook:
            return await self._with_hook(request, payload, requester, prepared)
        if prepared.blocks:
            return await self._in_thread(self.fleet.handle, request, payload, requester, prepared)
        return self.fleet.handle(request, payload, requester, prepared)

    def throttled(self, request: Request) -> Answer:
        return self.fleet.throttled(request)

    async def on_unknown_certificate(
        self, der: bytes, certificate_id: str, known: Certificate | None
    ) -> Refuse | Event | Accept:
        """A certificate the registry does not know (`known` None) or knows PENDING_ACTIVATION connects."""
        cert = x509.load_der_x509_certificate(der)
        ca = self.registry.find_ca_for(cert)
        if ca is None or ca.status != CaStatus.ACTIVE or not ca.auto_registration:
            return Accept(known) if known is not None else Refuse("unknown certificate")
        try:
            outcome = await self._in_thread(self.jit.register, cert, certificate_id, ca, known)
        except Exception as e:  # JITP template problems are the customer's; the device is refused
            message = getattr(e, "message", None) or _brief(e)
            return Refuse(f"JITP failed: {message}")
        if isinstance(outcome, Registered):
            topic = registration_event_topic(ca.certificate_id)
            await self._publish(topic, outcome.event)
            return Event(topic)
        return Accept(outcome, provisioned=True)

    async def maintain(self) -> None:
        """Sweep the certificates whose ownership token expired unused, when a sweep is due."""
        now = self.clock()
        if now - self._last_sweep < min(SWEEP_INTERVAL, max(self.token_ttl, 1.0)):
            return
        self._last_sweep = now
        deleted = await self._in_thread(self.sweep_expired)
        if deleted:
            log.info("deleted %d certificates whose ownership token expired unused", deleted)

    async def close(self) -> None:
        """Wait for work already running (a hook, a RegisterThing transaction): the registry it writes to
        is closed next. Queued work that has not started is dropped."""
        if self.events is not None:
            await self.events.close()
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        await asyncio.to_thread(self._hooks.shutdown, wait=True, cancel_futures=True)

    # ---- synchronous ---------------------------------------------------------------------------------

    def apply_plan(self, plan: templates.Plan, certificate: Certificate) -> None:
        """Create or update the thing, attach certificate and policies, set the status: all or nothing."""
        apply_plan(self.registry, plan, certificate)

    def sweep_expired(self) -> int:
        """Delete certificates whose ownership token expired before RegisterThing; how many went."""
        # From the registry (pending certificates whose tokens all expired unused), so a restart in the
        # middle of onboarding forgets nothing.
        deleted = 0
        for cid in self.registry.expired_unregistered_certificates():
            cert = self.registry.find_certificate(cid)
            if cert is None or cert.status != CertificateStatus.PENDING_ACTIVATION:
                continue
            try:
                self.registry.delete_certificate(cid)
            except ServiceError as e:
                log.debug("kept unregistered certificate %s: %s", cid, e.message)
                continue
            deleted += 1
        return deleted

    async def _with_hook(
        self, request: Request, payload: bytes, requester: Requester, prepared: Prepared
    ) -> Answer:
        """RegisterThing with a hook, in the hook pool; waiting for a slot counts against the hook's time."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.hook_timeout):
                await self.hook_slots.acquire()
        except TimeoutError:
            why = (
                f"all {self.hook_workers} pre-provisioning hook slots stayed busy for {self.hook_timeout:g} s"
            )
            return self.fleet.throttled(request, why)
        left = self.hook_timeout - (time.monotonic() - started)
        timed = dataclasses.replace(prepared, hook_timeout=left)
        loop = asyncio.get_running_loop()
        running = loop.run_in_executor(self._hooks, self.fleet.handle, request, payload, requester, timed)
        # The slot is free when the thread is, not when the asking connection stops waiting (it may close
        # mid-call): so the pool never holds more calls than it has threads.
        running.add_done_callback(lambda _: self.hook_slots.release())
        return await asyncio.shield(running)

    async def _in_thread(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _publish(self, topic: str, payload: bytes) -> None:
        if self.events is None:
            log.warning("could not publish %s: no broker to publish to", topic)
            return
        try:
            await self.events.publish(topic, payload)
        except (OSError, TimeoutError, ConnectionError) as e:
            log.warning("could not publish %s: %s", topic, _brief(e))


def _brief(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 200 else text[:200] + "..."
