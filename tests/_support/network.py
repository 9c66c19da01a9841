"""The network between a hub and the stand-in, from a test: a TCP proxy it can break, an MQTT client."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from iot_core_local.server import LocalIotCore


def free_port() -> int:
    """A loopback TCP port nothing listens on now (the caller binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def connects(
    cloud: LocalIotCore,
    cert: str | Path,
    key: str | Path,
    client_id: str,
    host: str | None = None,
    port: int | None = None,
) -> bool:
    """Connect with paho (an MQTT 5 client that is not the hub's) and report whether CONNACK was success."""
    result: dict[str, Any] = {}
    done = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.tls_set(
        ca_certs=str(cloud.endpoint.root_ca_path),
        certfile=str(cert),
        keyfile=str(key),
        cert_reqs=ssl.CERT_REQUIRED,
    )

    def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        result["ok"] = not reason.is_failure
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = lambda *a: done.set()
    try:
        client.connect(host or cloud.endpoint.mqtt_host, port or cloud.endpoint.mqtt_port, keepalive=30)
    except (OSError, ssl.SSLError):
        return False
    client.loop_start()
    done.wait(10)
    client.disconnect()
    client.loop_stop()
    return bool(result.get("ok"))


class TcpProxy:
    """A TCP forwarder between the hub and the gateway that a test can turn off, cut or blackhole.

    `listen()` opens the port (again), `close_listener()` makes it refuse connections (endpoint down),
    `cut()` drops every open connection, `blackhole = True` keeps connections open but forwards nothing.
    """

    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = port
        self.blackhole = False
        self.connections = 0
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        if port == 0:
            with socket.socket() as probe:  # reserve a free port number, keep it closed for now
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if not self.blackhole:
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def cut(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.close_listener()
        self.cut()
