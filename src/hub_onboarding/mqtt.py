"""IotProvisioning: MQTT 5 connections to AWS IoT Core (awscrt): claim, JITR and verification connects.

Every wait has a deadline: a connection attempt waits at most `connect_timeout` for CONNACK (the TCP
connect, TLS handshake and CONNACK are each bounded inside awscrt too), and stopping a client waits at
most STOP_TIMEOUT. A client is stopped after its first failed attempt, so awscrt's own reconnect loop
never runs behind our back: retries are ours (DeviceProvisioner's policy: exponential backoff with full
jitter, only for failures that can succeed later).

TLS verification is always on. The trust store is `iot_root_ca_path` when set, else the system's.
awscrt is imported here only when a connection is made: it is the largest import of the package.

When an attempt fails without an MQTT answer, or has not connected after PROBE_AFTER seconds, a
diagnostic handshake (`tls_probe`) tells apart what awscrt reports alike: an endpoint whose certificate
does not chain to the configured CA, a port that does not speak MQTT over TLS (both final: retrying
cannot fix the config), and an endpoint that refused the client certificate (CertificateRefusedError).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from hub_onboarding.certs import Credentials
from hub_onboarding.config import Endpoint
from hub_onboarding.device_provisioner import format_seconds
from hub_onboarding.errors import CertificateRefusedError, CredentialError, MqttConnectionError
from hub_onboarding.fleet import FleetProvisioning

if TYPE_CHECKING:
    # Imported where a connect has failed: the diagnostic's ssl/socket imports cost ~14 ms at start-up.
    from hub_onboarding import tls_probe

log = logging.getLogger(__name__)

STOP_TIMEOUT = 3.0  # a clean stop takes milliseconds; a stuck one must not hold the hub
# After a final failure nothing waits for the client any more: a client stuck in s2n's blinding delay
# (10-30 s after a handshake it refused) stops in the background instead of holding the hub's answer.
FINAL_STOP_TIMEOUT = 0.2
PING_TIMEOUT_MS = 10_000  # must stay below the shortest keep-alive (30 s) allowed in the config
# A healthy connect takes well under a second; past this the TLS probe looks at the endpoint meanwhile
# (s2n reports a handshake the hub refused only after its blinding delay, 10-30 s, or when the server
# closes, which it may never do). On a slow link the probe may run needlessly: one extra handshake, once
# per certificate (`_tls_accepted`).
PROBE_AFTER = 1.0
# awscrt failures, before any MQTT answer, where the TLS probe can say what went wrong.
_PROBED_ERRORS = {
    "AWS_IO_SOCKET_CLOSED",
    "AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE",
    "AWS_IO_TLS_ERROR_ALERT_RECEIVED",
}

# awscrt error names, and what to tell the user about each.
_CONNECT_HINTS = {
    "AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE": (
        "the TLS handshake failed: check that iot_root_ca_path is the CA of this endpoint and that the "
        "certificate is registered and ACTIVE (IoT Core ends the handshake for unknown or inactive ones)"
    ),
    "AWS_IO_SOCKET_CONNECTION_REFUSED": "nothing listens at the endpoint: check {endpoint_key} and its port",
    "AWS_IO_SOCKET_TIMEOUT": "the endpoint did not answer: check {endpoint_key} and the network",
    # TCP connected, then no TLS answer in time: a port that is not MQTT over TLS, or a very slow link.
    "AWS_IO_TLS_NEGOTIATION_TIMEOUT": (
        "the endpoint accepted the connection but never completed the TLS handshake: check "
        "{endpoint_key} and its port (MQTT over TLS: 8883, or 443 with ALPN), and the network"
    ),
    "AWS_IO_DNS_INVALID_NAME": "the endpoint's host name does not resolve: check {endpoint_key} and DNS",
    "AWS_IO_DNS_QUERY_FAILED": "the endpoint's host name does not resolve: check {endpoint_key} and DNS",
    "AWS_IO_SOCKET_NO_ROUTE_TO_HOST": "no route to the endpoint: check the network",
    "AWS_IO_SOCKET_NETWORK_DOWN": "the network is down",
    "AWS_ERROR_MQTT5_CONNACK_TIMEOUT": "the endpoint accepted TLS but sent no CONNACK in time",
}
_CLOSED_HINT = (
    "the endpoint closed the connection: the certificate may be unknown, inactive or revoked, or "
    "its policy may not allow iot:Connect for this client id"
)


def describe_connect_failure(
    exc: object,
    connack_reason: str | None,
    endpoint: Endpoint,
    client_id: str,
    endpoint_key: str = "endpoint_url",
) -> str:
    """A message for a failed connection attempt that says what to check (pure, testable).

    `endpoint_key` is the config key the endpoint came from, so the hint names the entry to fix."""
    name = getattr(exc, "name", None) or type(exc).__name__
    if connack_reason:
        hint = (
            f"the endpoint refused the connection with reason {connack_reason}: check that the "
            f"certificate is ACTIVE and its policy allows iot:Connect for client id {client_id!r}"
        )
    else:
        hint = _CONNECT_HINTS.get(str(name), _CLOSED_HINT).format(endpoint_key=endpoint_key)
    return f"could not connect to {endpoint} as {client_id!r} ({name}): {hint}"


def describe_probe(
    result: tls_probe.ProbeResult, settings: ConnectionSettings, client_id: str
) -> MqttConnectionError | None:
    """The error a diagnostic handshake's verdict means, or None when it explains nothing (pure).

    Final (not retried): the endpoint's chain or host name, or a port without TLS. A refused client
    certificate is a CertificateRefusedError: final for a claim, expected during JITR."""
    from hub_onboarding import tls_probe

    s = settings
    where = f"could not connect to {s.endpoint} as {client_id!r}"
    trust = f"iot_root_ca_path ({s.root_ca_path})" if s.root_ca_path else "the system trust store"
    verdict = result.verdict
    if verdict is tls_probe.Verdict.UNTRUSTED:
        unset = "" if s.root_ca_path else " (iot_root_ca_path is not set)"
        message = (
            f"{where}: the endpoint's certificate does not chain to {trust}{unset} ({result.detail}): set "
            "iot_root_ca_path to the CA of this endpoint (Amazon Root CA 1 for AWS IoT Core)"
        )
    elif verdict is tls_probe.Verdict.WRONG_HOST:
        message = (
            f"{where}: the endpoint's certificate is not valid for {s.endpoint.host!r} ({result.detail}): "
            f"check the host name in {s.endpoint_key}"
        )
    elif verdict is tls_probe.Verdict.NOT_TLS:
        message = (
            f"{where}: {result.detail}, so this port does not speak MQTT over TLS: check {s.endpoint_key} "
            "(the MQTT endpoint and its port, 8883 on AWS IoT Core; not an HTTP API address)"
        )
    elif verdict is tls_probe.Verdict.CERTIFICATE_REFUSED:
        return CertificateRefusedError(
            f"{where}: the endpoint's certificate chains to {trust}, but the endpoint refused this client "
            f"certificate in the TLS handshake ({result.detail}): check that the certificate is registered "
            "in this account and region and ACTIVE (or that its CA is registered)"
        )
    else:
        return None
    error = MqttConnectionError(message)
    error.retriable = False
    return error


@dataclass(frozen=True)
class ConnectionSettings:
    endpoint: Endpoint
    root_ca_path: str | None
    keep_alive: int
    connect_timeout: float = 30.0
    endpoint_key: str = "endpoint_url"  # the config key the endpoint came from, named in hints
    template_name: str | None = None  # fp_template_name, named when a claim subscription is refused


class MqttConnection:
    """A started and connected awscrt mqtt5.Client; `close()` stops it within a deadline."""

    def __init__(
        self,
        client: Any,
        stopped: threading.Event,
        description: str,
        lost: threading.Event,
        template_name: str | None = None,
    ) -> None:
        self.client = client
        self.template_name = template_name
        # Set when an established connection goes away (not by our stop): a request waiting on it can
        # fail at once instead of waiting out its operation timeout.
        self.lost = lost
        self._stopped = stopped
        self._description = description
        self._closed = False

    def fleet_provisioning(self, operation_timeout: float) -> FleetProvisioning:
        """The fleet provisioning API on this connection; a request fails at once if the connection drops."""
        return FleetProvisioning(
            self.client, operation_timeout, lost=self.lost, template_name=self.template_name
        )

    def close(self, timeout: float = STOP_TIMEOUT) -> None:
        if self._closed:
            return
        self._closed = True
        from awscrt import mqtt5

        try:
            # A DISCONNECT (normal disconnection) first: without one, AWS IoT records the hub's every
            # onboarding connection as CONNECTION_LOST in its lifecycle events and managed integrations'
            # connectivity data, which reads like a fault to whoever watches the fleet.
            self.client.stop(mqtt5.DisconnectPacket())
        except Exception as exc:  # stopping an already-failed client must not mask the real error
            log.debug("stopping %s: %s", self._description, exc)
            return
        if self._stopped.wait(timeout):
            return
        if timeout < STOP_TIMEOUT:  # a final failure's short wait: nobody waits for this client any more
            log.debug("MQTT client for %s left to stop in the background", self._description)
        else:
            log.warning("MQTT client for %s did not stop within %.0f s", self._description, timeout)

    def __enter__(self) -> MqttConnection:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class IotProvisioning:
    """The SDK's provisioning engine: connections (each JITR attempt is one) and the verification connect.

    It makes one attempt per call; whether and when to try again is DeviceProvisioner's retry policy.
    """

    def __init__(self, settings: ConnectionSettings) -> None:
        self.settings = settings
        # Certificates a diagnostic handshake found accepted: JITR's refused attempts probe only once.
        self._tls_accepted: set[bytes] = set()
        self._tls_contexts: dict[tuple[bytes, bytes], Any] = {}
        self.tls_contexts_made = 0  # each one parsed the system CA bundle: a figure tests and benches read

    @property
    def connect_timeout(self) -> float:
        return self.settings.connect_timeout

    def connect(
        self, client_id: str, credentials: Credentials, timeout: float | None = None
    ) -> MqttConnection:
        """Open one MQTT 5 connection with mutual TLS; MqttConnectionError when it fails or times out."""
        from awscrt import io, mqtt5

        s = self.settings
        timeout = s.connect_timeout if timeout is None else max(0.1, timeout)
        done = threading.Event()
        stopped = threading.Event()
        outcome: dict[str, Any] = {}

        def on_success(data: Any) -> None:
            outcome.setdefault("ok", True)
            done.set()

        def on_failure(data: Any) -> None:
            if "ok" not in outcome:
                outcome.setdefault("error", data.exception)
                packet = getattr(data, "connack_packet", None)
                reason = getattr(packet, "reason_code", None)
                if reason is not None:
                    outcome.setdefault("reason", getattr(reason, "name", str(reason)))
            done.set()

        lost = threading.Event()

        def on_disconnection(data: Any) -> None:
            log.debug("MQTT disconnected from %s: %s", s.endpoint, getattr(data, "exception", None))
            lost.set()

        def on_stopped(data: Any) -> None:
            stopped.set()

        ms = max(1000, int(timeout * 1000))
        socket_options = io.SocketOptions()
        socket_options.connect_timeout_ms = ms
        try:
            options = mqtt5.ClientOptions(
                host_name=s.endpoint.host,
                port=s.endpoint.port,
                socket_options=socket_options,
                session_behavior=mqtt5.ClientSessionBehaviorType.CLEAN,
                # the limits IoT Core enforces, checked on our side too (as awsiot's builder sets them)
                extended_validation_and_flow_control_options=(
                    mqtt5.ExtendedValidationAndFlowControlOptions.AWS_IOT_CORE_DEFAULTS
                ),
                # We stop the client on its first failure; a long delay keeps awscrt from retrying meanwhile.
                min_reconnect_delay_ms=ms,
                max_reconnect_delay_ms=max(ms, 60_000),
                ping_timeout_ms=PING_TIMEOUT_MS,
                connack_timeout_ms=ms,
                connect_options=mqtt5.ConnectPacket(
                    client_id=client_id, keep_alive_interval_sec=s.keep_alive, username=""
                ),
                tls_ctx=self._tls_context(credentials),
                disable_metrics=True,
                on_lifecycle_event_stopped_fn=on_stopped,
                on_lifecycle_event_connection_success_fn=on_success,
                on_lifecycle_event_connection_failure_fn=on_failure,
                on_lifecycle_event_disconnection_fn=on_disconnection,
            )
            client = mqtt5.Client(options)
        except CredentialError:
            raise
        except Exception as exc:
            if credentials.token_key is not None:
                # The token is the likelier cause (our own check of it passed: a PIN, a module or a store
                # awscrt's session cannot use): a credential error, which a boot service does not restart.
                raise CredentialError(
                    f"awscrt could not use the key {credentials.token_key.label!r} in PKCS#11 token "
                    f"{credentials.token_key.token_label!r} ({exc}); check ro.pkcs11_module_path, "
                    "ro.pkcs11_token_label and ro.pkcs11_pin_path, and that this process may write the "
                    "token's store (a systemd unit lists it in ReadWritePaths=)",
                    "ro.pkcs11_module_path",
                ) from None
            # awscrt refuses unusable credentials or CA files here, before any traffic: retrying won't help.
            error = MqttConnectionError(
                f"could not set up the MQTT client for {s.endpoint}: {exc}; check "
                "iot_root_ca_path and the certificate and key files"
            )
            error.retriable = False
            raise error from None
        description = f"{client_id!r} at {s.endpoint}"
        conn = MqttConnection(client, stopped, description, lost, s.template_name)
        log.debug("connecting to %s as %r", s.endpoint, client_id)
        try:
            client.start()
        except Exception as exc:
            # Nothing was sent: awscrt could not start its client here (memory, threads, descriptors).
            error = MqttConnectionError(
                f"could not start the MQTT client for {s.endpoint} as {client_id!r}: "
                f"{exc}; this is a problem on the hub, not the network: check its "
                "free memory and open files, then run provision again"
            )
            error.retriable = False
            raise error from None
        try:
            self._wait_connected(client_id, credentials, done, outcome, timeout)
        except MqttConnectionError as error:
            conn.close(STOP_TIMEOUT if error.retriable else FINAL_STOP_TIMEOUT)
            raise
        log.debug("connected to %s as %r", s.endpoint, client_id)
        return conn

    def _tls_context(self, credentials: Credentials) -> Any:
        """The awscrt TLS context for these credentials, made once and shared by every attempt with them.

        awscrt's `ClientTlsContext` has no way to skip the system trust store: every context starts with
        s2n's `s2n_config_new()`, which parses the whole CA bundle (SSL_CERT_FILE, or the platform's, ~7 ms
        of CPU for ~140 certificates), before `iot_root_ca_path` replaces it. So each context is made only
        once per set of credentials: retries, JITR's attempts and a claim session resumed after a lost
        connection reuse it. The trust and the client certificate are the same for all of them.
        """
        from awscrt import io

        key = (credentials.certificate_pem, credentials.private_key_pem or credentials.key_reference.encode())
        context = self._tls_contexts.get(key)
        if context is None:
            options = _mtls_options(credentials)
            if self.settings.root_ca_path:
                options.override_default_trust_store_from_path(None, self.settings.root_ca_path)
            if self.settings.endpoint.port == 443 and io.is_alpn_available():
                options.alpn_list = ["x-amzn-mqtt-ca"]  # IoT Core's MQTT over 443 (as awsiot's builder does)
            context = io.ClientTlsContext(options)
            self.tls_contexts_made += 1
            # at most the two credentials of one run (claim or DHA, then the permanent certificate)
            while len(self._tls_contexts) >= 2:
                self._tls_contexts.pop(next(iter(self._tls_contexts)))
            self._tls_contexts[key] = context
        return context

    def _wait_connected(
        self,
        client_id: str,
        credentials: Credentials,
        done: threading.Event,
        outcome: dict[str, Any],
        timeout: float,
    ) -> None:
        """Wait for the attempt's outcome; a diagnosis replaces awscrt's vague failure or long hang."""
        s = self.settings
        started = time.monotonic()
        if not done.wait(min(timeout / 2, PROBE_AFTER)):  # a short budget keeps half for the probe
            diagnosed = self._diagnose(client_id, credentials, timeout - (time.monotonic() - started))
            if diagnosed is not None and not done.is_set():
                raise diagnosed
        if not done.wait(max(0.0, timeout - (time.monotonic() - started))):
            raise MqttConnectionError(
                f"could not connect to {s.endpoint} as {client_id!r} within {format_seconds(timeout)} s: "
                f"check {s.endpoint_key}, the network, and that iot_root_ca_path is the CA of this endpoint"
            )
        if "ok" in outcome:
            return
        failure = outcome.get("error")
        if outcome.get("reason") is None and getattr(failure, "name", None) in _PROBED_ERRORS:
            diagnosed = self._diagnose(client_id, credentials, None)
            if diagnosed is not None:
                raise diagnosed
        raise MqttConnectionError(
            describe_connect_failure(failure, outcome.get("reason"), s.endpoint, client_id, s.endpoint_key)
        )

    def _diagnose(
        self, client_id: str, credentials: Credentials, budget: float | None
    ) -> MqttConnectionError | None:
        """Run the diagnostic handshake (at most PROBE_TIMEOUT, or `budget` when less) unless this
        certificate passed one."""
        from hub_onboarding import tls_probe

        if budget is None:
            budget = tls_probe.PROBE_TIMEOUT
        if credentials.certificate_pem in self._tls_accepted or budget <= 0.5:
            return None
        if credentials.token_key is not None:
            return None  # Python's ssl cannot sign with a key inside a token: awscrt's own error stands
        s = self.settings
        result = tls_probe.probe(
            s.endpoint.host,
            s.endpoint.port,
            s.root_ca_path,
            credentials.certificate_pem,
            credentials.private_key_pem,
            timeout=min(tls_probe.PROBE_TIMEOUT, budget),
        )
        log.debug("TLS probe of %s: %s %s", s.endpoint, result.verdict.name, result.detail)
        if result.verdict is tls_probe.Verdict.TLS_OK:
            self._tls_accepted.add(credentials.certificate_pem)
        return describe_probe(result, s, client_id)

    def verify(self, client_id: str, credentials: Credentials, timeout: float | None = None) -> None:
        """Connect once and disconnect: AWS's documented reconnect step after RegisterThing."""
        with self.connect(client_id, credentials, timeout):
            pass


# One awscrt handle per PKCS#11 library: its DEFAULT behaviour tolerates a library python-pkcs11 has
# already initialised (the store checks the pair first) and never finalises it behind the store's back.
_PKCS11_LIBS: dict[str, Any] = {}


def _mtls_options(credentials: Credentials) -> Any:
    """awscrt TLS options for mutual TLS: a PEM pair, or the certificate plus a key inside a token."""
    from awscrt import io

    token_key = credentials.token_key
    if token_key is None:
        return io.TlsContextOptions.create_client_with_mtls(
            credentials.certificate_pem, credentials.private_key_pem
        )
    lib = _PKCS11_LIBS.get(token_key.module_path)
    if lib is None:
        try:
            lib = io.Pkcs11Lib(file=token_key.module_path)
        except Exception as exc:
            raise CredentialError(
                f"ro.pkcs11_module_path: awscrt could not load {token_key.module_path} ({exc}); "
                "set it to the token's PKCS#11 module"
            ) from None
        _PKCS11_LIBS[token_key.module_path] = lib
    # awscrt holds the PIN for the TLS handshakes; it is read from its file here and never logged.
    return io.TlsContextOptions.create_client_with_mtls_pkcs11(
        pkcs11_lib=lib,
        user_pin=token_key.read_pin(),
        token_label=token_key.token_label,
        private_key_label=token_key.label,
        cert_file_contents=credentials.certificate_pem,
    )
