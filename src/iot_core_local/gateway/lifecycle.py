"""AWS IoT's lifecycle disconnect reasons, from how the gateway closed a connection (pure).

The gateway tells `Gateway.lifecycle_listeners` of every accepted connection and every close of a client
id's current connection, with one of these reason names (as AWS IoT's lifecycle events and managed
integrations' GetManagedThingConnectivityData spell them).
"""

from __future__ import annotations

from collections.abc import Callable

from .wire import Reason

__all__ = ["CLIENT_INITIATED_DISCONNECT", "CONNECTION_LOST", "LifecycleListener", "disconnect_reason"]

CLIENT_INITIATED_DISCONNECT = "CLIENT_INITIATED_DISCONNECT"
CONNECTION_LOST = "CONNECTION_LOST"

# (client id, connected, disconnect reason or None); called on the gateway's loop: it must not wait.
LifecycleListener = Callable[[str, bool, str | None], None]

# Keyed by the reason code's number: mqtt5's reason codes are not hashable.
_BY_REASON: dict[int, str] = {
    int(Reason.SESSION_TAKEN_OVER): "DUPLICATE_CLIENTID",
    int(Reason.KEEP_ALIVE_TIMEOUT): "MQTT_KEEP_ALIVE_TIMEOUT",
    int(Reason.ADMINISTRATIVE_ACTION): "SERVER_INITIATED_DISCONNECT",
    int(Reason.SERVER_SHUTTING_DOWN): "SERVER_INITIATED_DISCONNECT",
    int(Reason.NOT_AUTHORIZED): "FORBIDDEN_ACCESS",
    int(Reason.QUOTA_EXCEEDED): "THROTTLED",
}


def disconnect_reason(reason: Reason | None, client_disconnected: bool = False) -> str:
    """The lifecycle reason of a close: the DISCONNECT reason the gateway sent (None: it sent none), and
    whether the client had sent its own DISCONNECT."""
    if client_disconnected:
        return CLIENT_INITIATED_DISCONNECT
    if reason is None:
        return CONNECTION_LOST
    # Any other reason the gateway sends is the client's fault (protocol error, bad topic, too large).
    return _BY_REASON.get(int(reason), "CLIENT_ERROR")
