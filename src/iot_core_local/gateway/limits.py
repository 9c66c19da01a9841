"""The gateway's limits and timeouts, one frozen value handed to `Gateway(limits=...)`.

The defaults are AWS IoT Core's own message broker and protocol limits where AWS has one, and what keeps
one hostile or stuck client from costing anyone else where it has none. A connection reads the limits
once, when it is accepted: a gateway given other limits applies them to the connections that come after.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["MAX_TOPIC_BYTES", "MAX_TOPIC_SLASHES", "GatewayLimits"]

MAX_TOPIC_BYTES = 256  # topic name or topic filter, UTF-8
MAX_TOPIC_SLASHES = 7


@dataclass(frozen=True)
class GatewayLimits:
    # AWS IoT Core's message size limit.
    max_payload_size: int = 128 * 1024
    # What the CONNACK announces and the framing enforces: the payload limit plus room for topic and
    # properties. A larger frame is refused from its fixed header, before it is buffered.
    max_packet_size: int = 136 * 1024
    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0  # from the end of the TLS handshake to a complete CONNECT
    broker_timeout: float = 10.0  # Mosquitto's TCP connect, and its CONNACK
    # Answers the gateway writes itself (PUBACK 135, local SUBACKs, provisioning answers) to a client that
    # sends but does not read: past this many buffered bytes the gateway stops reading from that client
    # until its output drains, and closes it if that takes longer than `client_drain_timeout`.
    client_write_limit: int = 256 * 1024
    client_drain_timeout: float = 30.0
    max_topic_bytes: int = MAX_TOPIC_BYTES
    max_topic_slashes: int = MAX_TOPIC_SLASHES
    max_filters_per_subscribe: int = 8
    max_subscriptions_per_connection: int = 50
    ignore_hold: float = 600.0  # how long a CONNECT ignored by the fault switch keeps its connection
    maintenance_interval: float = 1.0  # how often the heap trim and the provisioning sweep are considered
    # Connections closed since the last heap trim that make another one worthwhile.
    trim_after_closed: int = 64
    # AWS IoT Core's largest keep-alive: a CONNECT asking for 0 (none) or more gets a CONNACK with this
    # as Server Keep Alive, and a connection silent for 1.5 times its keep-alive is closed.
    max_keep_alive: int = 1200
    # Connections open at once, at any stage; beyond it a new one is closed before TLS. Each costs two
    # descriptors (device and relay) and some 40 KB; 4,000 fits a small machine and its file limit.
    max_connections: int = 4000
    # TLS handshakes in flight from one source address: a handshake costs the server an RSA signature,
    # so one address must not keep thousands open.
    max_handshakes_per_address: int = 64
    # On loopback every local client shares one address: capped there, one local abuser would lock out
    # every hub of the same machine, the very thing the cap prevents. Local clients are held to
    # `max_connections` only, unless this is set (tests do, to show the cap).
    cap_handshakes_on_loopback: bool = False
    limit_log_interval: float = 10.0  # a limit that is hit is logged once per interval, with a count

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, bool) and not value > 0:
                raise ValueError(f"GatewayLimits.{field.name} must be positive, not {value!r}")
        if self.max_packet_size < self.max_payload_size:
            raise ValueError("GatewayLimits.max_packet_size must be at least max_payload_size")
