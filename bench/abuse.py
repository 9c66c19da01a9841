"""Abuse benchmark: hubs provision while idle connections and subscribers that never read press on the
stand-in (issue 11).

1. Without abuse: `calm_hubs` hubs provision (claim connect over TLS, CreateCertificateFromCsr,
   RegisterThing) with `concurrency` lean clients; provisionings per second.
2. With abuse: `idle` TLS connections that CONNECT and then say nothing, and `deaf` subscribers that
   stop reading while a flooder publishes `flood_messages` messages to their topic; then `hubs` hubs
   provision. Every hub must succeed; the peak VmRSS of the server and of its Mosquitto are sampled
   every 100 ms from /proc.

The server runs as its own process (`iot-core-local serve`, its default limits); the load is one asyncio
process. `python -m bench.abuse` runs the full scale; `run(..., scale)` any other (tests run a small one).

Phase 1 is a warm-up and a reference for phase 2 on the same server, not the gateway's throughput figure:
that is `bench/gateway.py`'s (2,000 hubs at concurrency 200 on a server of its own), and both use the same
lean clients (`bench.loadgen.provision_one`). Both share the machine's cores with the load generator, so a
busy machine (the load average each record names) lowers both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mqtt5

from bench import report
from bench.fleet import PeakRss
from bench.gateway import ServerProcess, write_pair
from bench.loadgen import MqttConnection, client_context, make_csr, provision_one
from iot_core_local.recipes.claims import set_up_fleet_provisioning
from iot_core_local.resources import raise_open_file_limit

OPEN_POLICY = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]}
)
FLOOD_TOPIC = "abuse/flood"
# A subscriber that stops reading with a small receive buffer: what it does not read piles up in the
# server and in Mosquitto, not in this process's kernel buffers.
DEAF_RECEIVE_BUFFER = 16 * 1024
# Connections opened at once while the abuse builds up (each a TLS handshake on the server's one loop).
OPENING = 50


@dataclass(frozen=True)
class Scale:
    idle: int = 1000
    deaf: int = 200
    hubs: int = 200
    calm_hubs: int = 1000
    concurrency: int = 200
    flood_messages: int = 200
    flood_payload: int = 16 * 1024


SMOKE = Scale(idle=20, deaf=5, hubs=10, calm_hubs=10, concurrency=10, flood_messages=40)  # tests
QUICK = Scale(idle=100, deaf=20, hubs=50, calm_hubs=100, concurrency=50)  # python -m bench --quick


async def _provision(
    host: str, port: int, ctx: ssl.SSLContext, template: str, tag: str, hubs: int, concurrency: int
) -> dict[str, Any]:
    csrs = [make_csr(f"{tag}-{i}") for i in range(hubs)]
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Any:
        async with gate:
            return await provision_one(host, port, ctx, template, f"{tag}-{i:06d}", csrs[i])

    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(hubs)))
    wall = time.perf_counter() - started
    ok = [r.seconds for r in results if r.ok]
    return {
        "hubs": hubs,
        "succeeded": len(ok),
        "failed": hubs - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "wall_s": round(wall, 3),
        "provisionings_per_s": round(len(ok) / wall, 1),
        "latency_p50_ms": round(statistics.median(ok) * 1000, 1) if ok else None,
    }


async def _open_many(count: int, opener: Any) -> list[MqttConnection]:
    gate = asyncio.Semaphore(OPENING)

    async def one(i: int) -> MqttConnection:
        async with gate:
            conn: MqttConnection = await opener(i)
            return conn

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def _flood(flooder: MqttConnection, messages: int, payload: int) -> int:
    """Publish to the deaf subscribers' topic, QoS 1 every 16th message so the flood keeps pace with
    the broker; the number of PUBACKs with reason 0 (Mosquitto took the message)."""
    body = b"f" * payload
    taken = 0
    for i in range(messages):
        if i % 16 == 15:
            pid = flooder.packet_id()
            flooder.send(mqtt5.PublishPacket(FLOOD_TOPIC, body, qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=pid))
            while True:
                packet = await flooder.receive()
                if isinstance(packet, mqtt5.PubAckPacket) and packet.packet_id == pid:
                    taken += int(packet.reason_code) == 0
                    break
        else:
            flooder.send(mqtt5.PublishPacket(FLOOD_TOPIC, body))
            await flooder.writer.drain()
    return taken


def _still_open(conns: list[MqttConnection]) -> int:
    return sum(not c.writer.transport.is_closing() and not c.reader.at_eof() for c in conns)


async def _close(conns: list[MqttConnection]) -> None:
    for conn in conns:
        conn.writer.transport.abort()  # no goodbye: an abuser just goes away
    await asyncio.sleep(0)  # let the transports' close callbacks run


async def _run(server: ServerProcess, work: Path, scale: Scale) -> dict[str, Any]:
    iot = server.client()
    claim = set_up_fleet_provisioning(iot, "AbuseBench")
    claim_ctx = client_context(
        server.endpoint["rootCaPath"],
        *write_pair(work, "abuse-claim", claim.certificate_pem, claim.private_key_pem),
    )
    iot.create_policy(policyName="abuse-open", policyDocument=OPEN_POLICY)
    created = iot.create_keys_and_certificate(setAsActive=True)
    iot.attach_policy(policyName="abuse-open", target=created["certificateArn"])
    abuser_ctx = client_context(
        server.endpoint["rootCaPath"],
        *write_pair(work, "abuser", created["certificatePem"], created["keyPair"]["PrivateKey"]),
    )
    host, port = server.endpoint["mqttHost"], server.endpoint["mqttPort"]
    template = claim.template_name

    calm = await _provision(host, port, claim_ctx, template, "calm", scale.calm_hubs, scale.concurrency)
    idle: list[MqttConnection] = []
    deaf: list[MqttConnection] = []
    flooder: MqttConnection | None = None
    with PeakRss(server.pid) as server_rss, PeakRss(server.broker_pid()) as broker_rss:
        try:
            idle = await _open_many(
                scale.idle,
                lambda i: MqttConnection.open(host, port, f"idle-{i}", abuser_ctx, keep_alive=1200),
            )

            async def deaf_one(i: int) -> MqttConnection:
                conn = await MqttConnection.open(
                    host, port, f"deaf-{i}", abuser_ctx, receive_buffer=DEAF_RECEIVE_BUFFER
                )
                await conn.subscribe(f"{FLOOD_TOPIC}/#", FLOOD_TOPIC)
                transport = conn.writer.transport
                assert isinstance(transport, asyncio.ReadTransport)
                transport.pause_reading()  # and never again
                return conn

            deaf = await _open_many(scale.deaf, deaf_one)
            flooder = await MqttConnection.open(host, port, "flooder", abuser_ctx)
            flood = asyncio.create_task(_flood(flooder, scale.flood_messages, scale.flood_payload))
            abused = await _provision(
                host, port, claim_ctx, template, "abused", scale.hubs, scale.concurrency
            )
            taken = await flood
            idle_open, deaf_open = _still_open(idle), _still_open(deaf)
        finally:
            await _close([*idle, *deaf, *([flooder] if flooder else [])])
    server_peak, broker_peak = server_rss.peak_kb / 1024, broker_rss.peak_kb / 1024
    return {
        "scale": asdict(scale),
        "without_abuse": calm,
        "with_abuse": abused,
        "idle_still_open": idle_open,
        "deaf_still_open": deaf_open,
        "flood_taken": taken,
        "server_peak_rss_mb": round(server_peak, 1),
        "broker_peak_rss_mb": round(broker_peak, 1),
        "peak_rss_mb": round(server_peak + broker_peak, 1),
    }


def run(server: ServerProcess | None = None, scale: Scale = Scale()) -> dict[str, Any]:
    """The abuse benchmark against `server` (one the caller runs) or a server of its own."""
    raise_open_file_limit()  # idle connections cost this process a descriptor each, too
    with tempfile.TemporaryDirectory(prefix="bench-abuse-") as tmp:
        work = Path(tmp)
        if server is None:
            with ServerProcess(work / "data") as own:
                return asyncio.run(_run(own, work, scale))
        return asyncio.run(_run(server, work, scale))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.abuse")
    parser.add_argument("--smoke", action="store_true", help="the tests' small scale")
    parser.add_argument(
        "--record",
        action="store_true",
        help="write bench/results/<date>-<commit>-abuse.json and .md, and rewrite docs/performance.md",
    )
    for name, default in asdict(Scale()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    args = parser.parse_args(argv)
    scale = SMOKE if args.smoke else Scale(**{k: getattr(args, k) for k in asdict(Scale())})
    with contextlib.redirect_stdout(sys.stderr):
        results = run(scale=scale)
    print(json.dumps(results, indent=1))
    if args.record:
        print(f"written: {report.record_partial('abuse', results)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
