"""LocalIotCore: one running stand-in for AWS IoT Core, owning its data dir.

It wires the certificate authority, the registry, Mosquitto, the MQTT gateway (on an asyncio loop in a
background thread) and the HTTP control plane, and tears them down in reverse order. Everything it knows
lives in the data dir, so a restart on the same dir keeps every certificate, CA, thing and template.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TextIO

from .addresses import bracketed, is_wildcard
from .credentials import CREDENTIALS_FILE, AccessKey, load_or_create, read_access_key
from .datadir import check_owned_dir, open_nofollow, refuse_links, write_atomically
from .errors import PortUnavailable, ServerError
from .faults import FaultInjector

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import rsa

    from .broker import Broker, BrokerLimits
    from .ca import CertificateAuthority
    from .control_plane import ControlPlane
    from .control_plane.http import ControlPlaneLimits
    from .gateway import Gateway, GatewayLimits
    from .keys import KeyPool
    from .managed import ManagedIntegrations
    from .quotas import Quotas
    from .registry import Registry

log = logging.getLogger("iot_core_local.server")

# RSA keys CreateKeysAndCertificate hands out, generated ahead (keys.py): enough for a burst of hubs.
KEY_POOL_SIZE = 8
# RegisterThing calls whose pre-provisioning hook may run at once (provisioning/__init__.py's default).
HOOK_WORKERS = 32

ENDPOINT_FILE = "endpoint.json"
LOCK_FILE = "serve.lock"
_START_DEADLINE = 30.0


@dataclass(frozen=True)
class Endpoint:
    """Where clients reach a running server; the content of `endpoint.json`."""

    mqtt_host: str
    mqtt_port: int
    api_url: str
    root_ca_path: Path
    # The control plane's key pair (credentials.py), an AWS shared-credentials file; never its content.
    credentials_path: Path | None = None
    # MQTT over TLS for clients offering ALPN x-amzn-mqtt-ca (AWS IoT Core's port 443); None: not served.
    alpn_port: int | None = None
    # The region ARNs name and signatures must be scoped to (LocalIotCore(region=); serve: us-east-1).
    region: str = "us-east-1"

    def to_json(self) -> dict[str, Any]:
        data = {
            "mqttHost": self.mqtt_host,
            "mqttPort": self.mqtt_port,
            "alpnPort": self.alpn_port,
            "apiUrl": self.api_url,
            "rootCaPath": str(self.root_ca_path),
            "region": self.region,
        }
        if self.credentials_path is not None:
            data["credentialsFile"] = str(self.credentials_path)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Endpoint:
        credentials = data.get("credentialsFile")
        alpn = data.get("alpnPort")
        return cls(
            data["mqttHost"],
            int(data["mqttPort"]),
            data["apiUrl"],
            Path(data["rootCaPath"]),
            Path(credentials) if credentials else None,
            None if alpn is None else int(alpn),
            str(data.get("region", "us-east-1")),  # files written before it had a region: serve's
        )

    def client(self, region: str | None = None, service: str = "iot") -> Any:
        """A boto3 client of `service` ("iot", "iot-managed-integrations") for this server's control plane,
        signing with its key pair (when the endpoint names one: a control plane off loopback checks the
        signature) for `region` (default: the server's own, the only one a checked signature may name)."""
        import boto3

        key = (
            read_access_key(self.credentials_path)
            if self.credentials_path is not None
            else AccessKey("iot-core-local", "iot-core-local")  # on loopback any credentials work
        )
        return boto3.client(
            service,  # type: ignore[call-overload]  # boto3's stubs know each service by a literal
            endpoint_url=self.api_url,
            region_name=region or self.region,
            aws_access_key_id=key.access_key_id,
            aws_secret_access_key=key.secret_access_key,
        )

    @property
    def mqtt_address(self) -> str:
        """`host:port`, the form `endpoint_url` takes in a hub's iotmi_config.json; an IPv6 host in
        brackets (`[::1]:8883`), as a URL writes it, so the port cannot be read as part of the address."""
        return f"{bracketed(self.mqtt_host)}:{self.mqtt_port}"


def port_problem(service: str, host: str, port: int, exc: OSError) -> PortUnavailable | None:
    """What a failed bind means for the user, when it is about the port itself (else None)."""
    if exc.errno == errno.EADDRINUSE:
        return PortUnavailable(service, host, port, "is already in use by another program")
    if exc.errno == errno.EACCES:
        return PortUnavailable(
            service, host, port, "needs privileges (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        )
    return None


def check_port(service: str, host: str, port: int) -> None:
    """PortUnavailable if `port` cannot be listened on now (port 0, any free port, always can).

    Checked before anything starts, so a taken port fails at once with nothing created; the real bind
    is checked again, since another program may take the port in between.
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As both servers bind: a port left in TIME_WAIT by a previous run is usable, a listener's is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            problem = port_problem(service, host, port, exc)
            if problem is None:
                raise
            raise problem from None


def write_json_atomically(path: Path, data: dict[str, Any], mode: int = 0o644) -> None:
    """Write JSON on one line (the line `serve` prints, so `head -1` of either reads the same), so that a
    reader sees the old file or the new one, never a part; a symbolic link at `path` is refused
    (ServerError), never followed or replaced."""
    write_atomically(path, (json.dumps(data) + "\n").encode(), mode)


class LocalIotCore:
    """A running iot-core-local: `with LocalIotCore(dir) as core: core.endpoint, core.client()`.

    Ports 0 mean "any free port"; the chosen ones are in `endpoint` and in `DIR/endpoint.json`.
    `alpn_port` is a second MQTT port, for clients that offer ALPN `x-amzn-mqtt-ca` (AWS IoT Core's 443);
    None (the default) serves none.
    `clock` (epoch seconds) stamps the registry's records and decides when ownership tokens expire, so a
    test can advance it; certificates are dated by the real time, which every TLS stack checks them against.
    `key_pool_size` RSA keys are generated ahead for CreateKeysAndCertificate by one background thread
    (0: each key is generated when asked for).

    `advertise` is the host name or address devices on other machines reach MQTT by (with `host` 0.0.0.0,
    say): endpoint.json, DescribeEndpoint and GetCustomEndpoint give it, and the server certificate names it.
    The control plane listens on `api_host` (loopback by default), MQTT on `host`. Off loopback, or with
    `require_signature`, every API request must be signed with the key pair in `DIR/credentials`.
    `faults_enabled` opens the fault switch over HTTP (`/_local/faults`); `core.faults` arms faults from
    Python either way. `quotas` throttles per account (quotas.py; `serve` passes AWS's defaults, None
    throttles nothing); `quota_clock` (monotonic seconds) refills the buckets, so tests pass their own.
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        host: str = "127.0.0.1",
        mqtt_port: int = 0,
        api_port: int = 0,
        alpn_port: int | None = None,
        region: str = "us-east-1",
        token_ttl: float = 3600.0,
        hook_timeout: float = 5.0,
        hook_workers: int = HOOK_WORKERS,
        faults: Iterable[str] = (),
        gateway_limits: GatewayLimits | None = None,
        broker_limits: BrokerLimits | None = None,
        control_plane_limits: ControlPlaneLimits | None = None,
        clock: Callable[[], float] = time.time,
        key_pool_size: int = KEY_POOL_SIZE,
        api_host: str = "127.0.0.1",
        require_signature: bool = False,
        faults_enabled: bool = False,
        quotas: Quotas | None = None,
        quota_clock: Callable[[], float] = time.monotonic,
        advertise: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.advertise = advertise
        self.api_host = api_host
        self.require_signature = require_signature
        self.faults_enabled = faults_enabled  # the HTTP switch; core.faults works from Python regardless
        self.quotas = quotas
        self.quota_clock = quota_clock
        # The fault switch (faults.py): owned here so it can be armed before start and survives nothing
        # but this object; specs are checked now, so a typo fails at once rather than at the first connect.
        self.faults = FaultInjector()
        for spec in faults:
            self.faults.add_spec(spec)
        self.host = host
        self.mqtt_port = mqtt_port
        self.api_port = api_port
        self.alpn_port = alpn_port
        self.region = region
        self.token_ttl = token_ttl
        self.hook_timeout = hook_timeout
        self.hook_workers = hook_workers  # pre-provisioning hooks in flight at once, in their own threads
        self.gateway_limits = gateway_limits  # None: AWS IoT Core's limits (gateway/limits.py)
        self.broker_limits = broker_limits  # None: broker.BrokerLimits() (Mosquitto's queues per client)
        self.control_plane_limits = control_plane_limits  # None: ControlPlaneLimits() (deadline, cap)
        self.clock = clock  # epoch seconds, for what expires (ownership tokens); tests pass their own
        self.key_pool_size = key_pool_size
        self._keys: KeyPool[rsa.RSAPrivateKey] | None = None
        self._lock_file: TextIO | None = None
        self._ca: CertificateAuthority | None = None
        self._registry: Registry | None = None
        self._broker: Broker | None = None
        self._gateway: Gateway | None = None
        self._api: ControlPlane | None = None
        self._managed: ManagedIntegrations | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._endpoint: Endpoint | None = None

    @property
    def public_host(self) -> str:
        """The MQTT address clients are told (endpoint.json, DescribeEndpoint, GetCustomEndpoint): the
        advertised name, else the listening address, else loopback for a wildcard bind (0.0.0.0 and ::
        are where a server listens, never an address a client can connect to)."""
        if self.advertise:
            return self.advertise
        return "127.0.0.1" if is_wildcard(self.host) else self.host

    # -- the parts, for embedding and tests -------------------------------------------------------

    @property
    def endpoint(self) -> Endpoint:
        if self._endpoint is None:
            raise ServerError("iot-core-local is not running")
        return self._endpoint

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            raise ServerError("iot-core-local is not running")
        return self._registry

    @property
    def ca(self) -> CertificateAuthority:
        if self._ca is None:
            raise ServerError("iot-core-local is not running")
        return self._ca

    @property
    def key_pool(self) -> KeyPool[rsa.RSAPrivateKey] | None:
        """The RSA keys generated ahead for CreateKeysAndCertificate (None when `key_pool_size` is 0)."""
        if self._ca is None:
            raise ServerError("iot-core-local is not running")
        return self._keys

    @property
    def gateway(self) -> Gateway:
        if self._gateway is None:
            raise ServerError("iot-core-local is not running")
        return self._gateway

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the gateway runs on (in its own thread): schedule gateway work here."""
        if self._loop is None:
            raise ServerError("iot-core-local is not running")
        return self._loop

    @property
    def managed(self) -> ManagedIntegrations:
        """Managed integrations' state (profiles, managed things), beside the registry."""
        if self._managed is None:
            raise ServerError("iot-core-local is not running")
        return self._managed

    @property
    def signatures_required(self) -> bool:
        """Whether the control plane checks SigV4 signatures (off loopback, or `require_signature`)."""
        if self._api is None:
            raise ServerError("iot-core-local is not running")
        return self._api.signatures_required

    def client(self) -> Any:
        """A boto3 IoT client pointed at this server, signing with the data dir's key pair."""
        return self.endpoint.client()  # signed for the region endpoint.json names (this server's)

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> LocalIotCore:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> Endpoint:
        from .broker import Broker
        from .ca import CertificateAuthority
        from .control_plane import ControlPlane, managed_integrations
        from .gateway import Gateway
        from .keys import KeyPool, generate_rsa_key
        from .managed import ManagedIntegrations
        from .provisioning import ProvisioningService
        from .provisioning.managed import ManagedMatcher
        from .quotas import RateLimiter
        from .registry import Registry
        from .resources import raise_open_file_limit

        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._check_data_dir()
        self._acquire_lock()
        try:
            check_port("mqtt", self.host, self.mqtt_port)
            check_port("api", self.api_host, self.api_port)
            if self.alpn_port is not None:
                check_port("alpn", self.host, self.alpn_port)
            raise_open_file_limit()  # each device connection costs two descriptors; logged
            if self.key_pool_size > 0:
                self._keys = KeyPool(generate_rsa_key, self.key_pool_size)
                self._keys.start()
            self._ca = CertificateAuthority(
                self.data_dir / "ca",
                keys=self._keys,
                server_names=[n for n in (self.advertise, self.host) if n and not is_wildcard(n)],
            )
            self._registry = Registry(
                self.data_dir / "registry.sqlite3", region=self.region, clock=self.clock
            )
            self._managed = ManagedIntegrations(
                self._registry, self._ca, endpoint_address=lambda: self.public_host, clock=self.clock
            )
            access_key = load_or_create(self.data_dir / CREDENTIALS_FILE)
            limiter = RateLimiter(self.quotas, self.quota_clock) if self.quotas is not None else None
            self._broker = Broker(self.data_dir / "mosquitto", limits=self.broker_limits)
            self._broker.start()

            self._loop = asyncio.new_event_loop()
            self._loop_thread = threading.Thread(
                target=self._loop.run_forever, name="iot-core-local-gateway", daemon=True
            )
            self._loop_thread.start()
            provisioning = ProvisioningService(
                self._registry,
                self._ca,
                token_ttl=self.token_ttl,
                hook_timeout=self.hook_timeout,
                hook_workers=self.hook_workers,
                clock=self.clock,
                broker=self._broker.address,
                limiter=limiter,
            )
            matcher = ManagedMatcher(self._managed)
            provisioning.fleet.matcher = matcher
            provisioning.jit.activator = matcher.activate_jitr
            self._gateway = Gateway(
                registry=self._registry,
                ca=self._ca,
                provisioning=provisioning,
                broker_address=self._broker.address,
                host=self.host,
                port=self.mqtt_port,
                alpn_port=self.alpn_port,
                faults=self.faults,
                limits=self.gateway_limits,
            )
            self._gateway.lifecycle_listeners.append(self._managed.on_connectivity)
            try:
                asyncio.run_coroutine_threadsafe(self._gateway.start(), self._loop).result(_START_DEADLINE)
            except OSError as exc:
                # The MQTT port is bound first: if it is bound now, the ALPN port failed.
                service, port = ("mqtt", self.mqtt_port)
                if self._gateway.listening and self.alpn_port is not None:
                    service, port = ("alpn", self.alpn_port)
                raise port_problem(service, self.host, port, exc) or exc from None

            self._api = ControlPlane(
                self._registry,
                self._ca,
                host=self.api_host,
                port=self.api_port,
                endpoint_address=lambda: self.public_host,
                faults=self.faults if self.faults_enabled else None,
                limits=self.control_plane_limits,
                access_key=access_key,
                require_signature=self.require_signature,
                limiter=limiter,
            )
            self._api.host_service(managed_integrations.service(), self._managed)
            try:
                self._api.start()
            except OSError as exc:
                raise port_problem("api", self.api_host, self.api_port, exc) or exc from None

            api_url = self._api.url
            if is_wildcard(self.api_host):  # listening everywhere: name the address clients use
                api_url = f"http://{bracketed(self.public_host)}:{self._api.port}"
            self._endpoint = Endpoint(
                mqtt_host=self.public_host,
                mqtt_port=self._gateway.port,
                api_url=api_url,
                root_ca_path=self._ca.root_ca_path.resolve(),
                credentials_path=(self.data_dir / CREDENTIALS_FILE).resolve(),
                alpn_port=self._gateway.alpn_port,
                region=self.region,
            )
            write_json_atomically(self.data_dir / ENDPOINT_FILE, self._endpoint.to_json())
        except BaseException:
            self.stop()
            raise
        log.info(
            "iot-core-local ready: mqtts://%s:%d, api %s, data %s",
            bracketed(self.public_host),
            self._endpoint.mqtt_port,
            self._endpoint.api_url,
            self.data_dir,
        )
        return self._endpoint

    def stop(self) -> None:
        """Stop every part that started, newest first; safe to call twice."""
        if self._api is not None:
            self._api.stop()
            self._api = None
        if self._gateway is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._gateway.stop(), self._loop).result(_START_DEADLINE)
        self._gateway = None
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(_START_DEADLINE)
            self._loop.close()
            self._loop = None
            self._loop_thread = None
        if self._broker is not None:
            self._broker.stop()
            self._broker = None
        if self._registry is not None:
            self._registry.close()
            self._registry = None
            self._managed = None
        if self._keys is not None:  # after everything that takes keys has stopped
            self._keys.stop()
            self._keys = None
        self._ca = None
        if self._endpoint is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.data_dir / ENDPOINT_FILE).unlink()
            self._endpoint = None
        self._release_lock()

    def _check_data_dir(self) -> None:
        """ServerError if the data dir, or a folder in it, is another user's or writable by others, or if
        a file the server (or its Mosquitto) opens there is a symbolic link."""
        check_owned_dir(self.data_dir)
        for folder in (self.data_dir / "ca", self.data_dir / "mosquitto"):
            refuse_links([folder])
            if folder.exists():
                check_owned_dir(folder)
        registry = self.data_dir / "registry.sqlite3"
        mosquitto = self.data_dir / "mosquitto"
        refuse_links(
            [
                self.data_dir / LOCK_FILE,
                self.data_dir / ENDPOINT_FILE,
                self.data_dir / CREDENTIALS_FILE,
                registry,
                registry.with_name(registry.name + "-wal"),
                registry.with_name(registry.name + "-shm"),
                registry.with_name(registry.name + "-journal"),
                *(
                    mosquitto / name
                    for name in (
                        "mosquitto.conf",
                        "mosquitto.db",
                        "mosquitto.db.new",
                        "mosquitto.log",
                        "mosquitto.pid",
                        "mosquitto.sock",
                        "mosquitto.stderr",
                    )
                ),
            ]
        )

    def _acquire_lock(self) -> None:
        # flock dies with the process, so a crashed server never leaves the dir locked for good.
        fd = open_nofollow(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        lock = os.fdopen(fd, "r+", encoding="utf-8")  # held while serving
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise ServerError(
                f"{self.data_dir} is already served by another iot-core-local (pid {holder}); "
                "stop it or choose another --data-dir"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock_file = lock

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None
