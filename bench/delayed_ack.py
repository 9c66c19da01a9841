"""What Nagle's algorithm and delayed ACKs cost each awscrt connection to the stand-in (a finding, measured).

awscrt gives no way to set TCP_NODELAY, and during the TLS 1.3 handshake the client writes a 6-byte
ChangeCipherSpec and then its certificate flight: Nagle holds the second write until the first is
acknowledged, and the gateway's kernel delays that ACK (up to 40 ms on Linux) because the gateway has
nothing to send. This module measures one awscrt connect (claim certificate, CONNECT, CONNACK, stop)
straight to the gateway and through a relay that re-arms TCP_QUICKACK before every read (what the
gateway could do on its accepted sockets), alternating, and reports both medians. The relay is an extra
hop, so any gain it shows is a lower bound.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import raw_sdk
from bench.gateway import ServerProcess
from iot_core_local.recipes.claims import set_up_fleet_provisioning

N = 30


class QuickAckRelay:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client, socket.create_connection(self.upstream) as up:
            for s in (client, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            back = threading.Thread(target=self._pump, args=(up, client), daemon=True)
            back.start()
            self._pump(client, up)
            back.join(10)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                src.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)  # Linux resets it; re-arm
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()


def run(server: ServerProcess | None = None, n: int = N) -> dict[str, Any]:
    if server is None:
        with (
            tempfile.TemporaryDirectory(prefix="bench-ack-") as tmp,
            ServerProcess(Path(tmp) / "data") as own,
        ):
            return run(own, n)
    claim = set_up_fleet_provisioning(server.client(), "DelayedAck")
    ca = Path(server.endpoint["rootCaPath"]).read_bytes()
    host, port = server.endpoint["mqttHost"], int(server.endpoint["mqttPort"])
    relay = QuickAckRelay((host, port))

    def connect(target_port: int, client_id: str) -> float:
        started = time.perf_counter()
        client, stopped = raw_sdk.connect(
            host, target_port, claim.certificate_pem.encode(), claim.private_key_pem.encode(), ca, client_id
        )
        elapsed = time.perf_counter() - started
        raw_sdk.stop(client, stopped)
        return elapsed

    direct: list[float] = []
    relayed: list[float] = []
    try:
        connect(port, "ack-warm")
        for i in range(n):
            pair = [(port, direct, f"ack-d-{i}"), (relay.port, relayed, f"ack-r-{i}")]
            for target, out, cid in pair if i % 2 == 0 else reversed(pair):
                out.append(connect(target, cid))
    finally:
        relay.close()
    d, r = statistics.median(direct), statistics.median(relayed)
    result = {
        "n": n,
        "direct_connect_median_ms": round(d * 1000, 1),
        "quickack_relay_connect_median_ms": round(r * 1000, 1),
        "saved_per_connect_ms": round((d - r) * 1000, 1),
    }
    print(
        f"delayed ack: awscrt connect {result['direct_connect_median_ms']} ms direct, "
        f"{result['quickack_relay_connect_median_ms']} ms through a TCP_QUICKACK relay",
        file=sys.stderr,
        flush=True,
    )
    return result


if __name__ == "__main__":
    print(run(n=int(sys.argv[1]) if len(sys.argv) > 1 else N))
