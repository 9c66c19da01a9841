"""Gateway benchmark: what the stand-in's gateway alone sustains, with lean clients.

1. Provisioning throughput: complete provisionings per second (claim connect over TLS,
   CreateCertificateFromCsr, RegisterThing) with 200 concurrent clients.
2. Added latency: median publish->delivery round trip through the gateway (TLS, policy checks, relay)
   minus the same round trip against its Mosquitto directly.

The server runs as its own process (`iot-core-local serve`), as a hub maker would run it; the load
generator is one asyncio process. Both share this machine's cores.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3

from bench.loadgen import MqttConnection, client_context, make_csr, provision_one
from iot_core_local.recipes.claims import set_up_fleet_provisioning


class ServerProcess:
    """`iot-core-local serve` in a subprocess, on free ports, in its own data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint: dict[str, Any] = {}

    def __enter__(self) -> ServerProcess:
        # The child keeps its own copy of the log's descriptor; ours closes once it has started.
        with open(self.data_dir.parent / "server.log", "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "iot_core_local",
                    "serve",
                    "--data-dir",
                    str(self.data_dir),
                    "--mqtt-port",
                    "0",
                    "--api-port",
                    "0",
                    "--no-quotas",  # the server's throughput, not AWS's default rates per account
                ],
                stdout=subprocess.PIPE,
                stderr=log,
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.__exit__()
            raise RuntimeError(f"server did not start; see {self.data_dir.parent / 'server.log'}")
        self.endpoint = json.loads(line)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def client(self) -> Any:
        return boto3.client(
            "iot",
            endpoint_url=self.endpoint["apiUrl"],
            region_name="us-east-1",
            aws_access_key_id="x",
            aws_secret_access_key="x",
        )

    def rss_mb(self) -> float:
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def broker_pid(self) -> int:
        """Mosquitto's pid, as the server records it for its crash hygiene."""
        return int((self.data_dir / "mosquitto" / "mosquitto.pid").read_text())

    def broker_socket(self) -> str:
        """Mosquitto's Unix socket: it has no TCP port (broker.py); this process is the server's user."""
        return str(self.data_dir / "mosquitto" / "mosquitto.sock")


def write_pair(folder: Path, name: str, cert: str, key: str) -> tuple[str, str]:
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_text(cert)
    key_path.write_text(key)
    key_path.chmod(0o600)
    return str(cert_path), str(key_path)


async def _throughput(server: ServerProcess, work: Path, hubs: int, concurrency: int) -> dict[str, Any]:
    iot = server.client()
    claim = set_up_fleet_provisioning(iot, f"Bench{concurrency}")
    cert, key = write_pair(work, f"claim{concurrency}", claim.certificate_pem, claim.private_key_pem)
    ctx = client_context(server.endpoint["rootCaPath"], cert, key)
    csrs = [make_csr(f"bench-{concurrency}-{i}") for i in range(hubs)]
    host, port = server.endpoint["mqttHost"], server.endpoint["mqttPort"]
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Any:
        async with gate:
            return await provision_one(
                host, port, ctx, claim.template_name, f"B{concurrency}-{i:06d}", csrs[i]
            )

    cpu0 = server.cpu_seconds()
    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(hubs)))
    wall = time.perf_counter() - started
    cpu = server.cpu_seconds() - cpu0
    ok = [r.seconds for r in results if r.ok]
    errors = sorted({r.error for r in results if not r.ok})
    q = statistics.quantiles(ok, n=100) if len(ok) > 1 else [0.0] * 99
    return {
        "hubs": hubs,
        "concurrency": concurrency,
        "succeeded": len(ok),
        "failed": hubs - len(ok),
        "errors": errors[:5],
        "wall_s": round(wall, 3),
        "provisionings_per_s": round(len(ok) / wall, 1),
        "latency_p50_ms": round(q[49] * 1000, 1),
        "latency_p95_ms": round(q[94] * 1000, 1),
        "latency_p99_ms": round(q[98] * 1000, 1),
        "server_cpu_s": round(cpu, 2),
        "server_rss_mb": round(server.rss_mb(), 1),
    }


async def _round_trips(conn: MqttConnection, topic: str, count: int) -> list[float]:
    await conn.subscribe(topic)
    samples = []
    for i in range(count):
        started = time.perf_counter()
        got_topic, _ = await conn.request(topic, f"{i}".encode())
        assert got_topic == topic
        samples.append(time.perf_counter() - started)
    return samples


async def _added_latency(server: ServerProcess, work: Path, count: int) -> dict[str, Any]:
    iot = server.client()
    iot.create_policy(
        policyName="bench-open",
        policyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]}
        ),
    )
    created = iot.create_keys_and_certificate(setAsActive=True)
    iot.attach_policy(policyName="bench-open", target=created["certificateArn"])
    cert, key = write_pair(work, "open", created["certificatePem"], created["keyPair"]["PrivateKey"])
    ctx = client_context(server.endpoint["rootCaPath"], cert, key)
    via_gateway = await MqttConnection.open(
        server.endpoint["mqttHost"], server.endpoint["mqttPort"], "lat-gw", ctx
    )
    direct = await MqttConnection.open_unix(server.broker_socket(), "lat-direct")
    gateway_s: list[float] = []
    direct_s: list[float] = []
    # Alternate in blocks so that drift on a shared machine hits both sides alike.
    for block in range(10):
        gateway_s += await _round_trips(via_gateway, f"bench/gw/{block}", count // 10)
        direct_s += await _round_trips(direct, f"bench/direct/{block}", count // 10)
    await via_gateway.close()
    await direct.close()
    gw, di = statistics.median(gateway_s), statistics.median(direct_s)
    return {
        "round_trips": count,
        "gateway_median_ms": round(gw * 1000, 3),
        "mosquitto_direct_median_ms": round(di * 1000, 3),
        "added_median_ms": round((gw - di) * 1000, 3),
        "gateway_p95_ms": round(statistics.quantiles(gateway_s, n=20)[18] * 1000, 3),
    }


def run(
    server: ServerProcess | None = None, hubs: int = 2000, concurrency: int = 200, round_trips: int = 2000
) -> dict[str, Any]:
    """Both measurements, against `server` (one the caller runs) or a server of its own."""
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        work = Path(tmp)
        if server is None:
            with ServerProcess(work / "data") as own:
                return run(own, hubs, concurrency, round_trips)
        throughput = asyncio.run(_throughput(server, work, hubs, concurrency))
        latency = asyncio.run(_added_latency(server, work, round_trips))
    return {"throughput": throughput, "latency": latency}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
