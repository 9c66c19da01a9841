"""The stand-in under abuse: 1,000 hostile connections while real hubs provision.

The server runs as its own process (`python -m iot_core_local serve`) so that its memory can be read
from /proc: VmRSS before the abuse, at its peak, and after the abusive connections are gone (the server
runs a gc and trims its heap once a burst of connections has ended).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import mqtt5
import pytest
from bench.loadgen import client_context, make_csr, provision_one

from iot_core_local.gateway import GatewayLimits
from iot_core_local.recipes.claims import set_up_fleet_provisioning
from tests._support.devices import write_credentials

pytestmark = pytest.mark.slow

ABUSERS = 1000
HUBS = 120
HUB_CONCURRENCY = 20
MEMORY_SLACK_MB = 30.0
LIMITS = GatewayLimits()  # what `iot-core-local serve` runs with


def iot_client(url: str) -> Any:
    return boto3.client(
        "iot", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+)", status)
    assert match is not None
    return int(match.group(1)) / 1024


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    command = [sys.executable, "-m", "iot_core_local", "serve", "--data-dir", str(tmp_path / "data")]
    proc = subprocess.Popen(
        # --no-quotas: the hubs arrive at once, far over AWS's 10 RegisterThing/s; this measures the server
        [*command, "--mqtt-port", "0", "--api-port", "0", "--no-quotas"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        assert proc.stdout is not None
        endpoint = json.loads(proc.stdout.readline())
        yield proc, endpoint
    finally:
        proc.send_signal(signal.SIGINT)
        returncode = proc.wait(30)
        assert proc.stdout is not None
        proc.stdout.close()
        log.close()
        assert returncode == 0
        text = (tmp_path / "server.log").read_text()
        assert "Traceback" not in text
        assert "internal error" not in text


def settled_rss_mb(pid: int, within: float = 5.0) -> float:
    """The server's VmRSS once two reads 0.25 s apart agree within 1 MB (its post-warm-up collection and
    heap trim done). The server is another process that signals nothing: observed, with a deadline."""
    deadline = time.monotonic() + within
    before = rss_mb(pid)
    while True:
        time.sleep(0.25)
        now = rss_mb(pid)
        if abs(now - before) < 1.0 or time.monotonic() > deadline:
            return now
        before = now


async def _until_closed(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


async def abuser(
    kind: str, host: str, port: int, tls: ssl.SSLContext, deadline: float, closed: list[str]
) -> None:
    """One hostile connection; appends `kind` to `closed` once the server has closed it in time."""
    try:
        if kind in ("garbage", "silent-tcp"):
            reader, writer = await asyncio.open_connection(host, port)
            if kind == "garbage":
                writer.write(random.randbytes(random.randint(1, 4096)))
        else:
            reader, writer = await asyncio.open_connection(host, port, ssl=tls, server_hostname="localhost")
            if kind == "partial-connect":
                full = mqtt5.ConnectPacket(f"abuser-{id(writer)}", keep_alive=60).write()
                writer.write(full[: random.randint(1, len(full) - 1)])
        await asyncio.wait_for(_until_closed(reader), deadline)
        closed.append(kind)
        writer.close()
    except (ConnectionError, ssl.SSLError, OSError):
        closed.append(kind)  # closed by the server (reset, or a TLS alert)
    except TimeoutError:
        pass  # still open after its deadline: counted as a failure below


def test_thousand_abusive_connections_while_hubs_provision(
    server: tuple[subprocess.Popen[str], dict[str, Any]], tmp_path: Path
) -> None:
    proc, endpoint = server
    host, port = endpoint["mqttHost"], endpoint["mqttPort"]
    setup = set_up_fleet_provisioning(iot_client(endpoint["apiUrl"]), "Abuse")
    claim = write_credentials(
        tmp_path, "claim", setup.certificate_id, setup.certificate_pem, setup.private_key_pem
    )
    hub_tls = client_context(endpoint["rootCaPath"], claim.cert_path, claim.key_path)
    abuser_tls = client_context(endpoint["rootCaPath"], claim.cert_path, claim.key_path)
    csrs = [make_csr(f"abuse-hub-{i}") for i in range(HUBS)]

    async def warm_up() -> None:
        # Imports and caches the first provisioning fills belong to the baseline, not to the abuse.
        for i in range(5):
            result = await provision_one(
                host, port, hub_tls, setup.template_name, f"WARM{i}", make_csr("warm")
            )
            assert result.ok, result.error

    asyncio.run(warm_up())
    baseline = settled_rss_mb(proc.pid)
    peak = baseline

    kinds = ["garbage", "silent-tcp", "silent-tls", "partial-connect"]
    # Each is closed by the server within its own deadline: TLS never done (garbage: at once; silent
    # TCP: the handshake timeout), TLS done but no complete CONNECT (the CONNECT timeout).
    deadlines = {
        "garbage": LIMITS.handshake_timeout + 10,
        "silent-tcp": LIMITS.handshake_timeout + 10,
        "silent-tls": LIMITS.connect_timeout + 10,
        "partial-connect": LIMITS.connect_timeout + 10,
    }

    async def attack() -> tuple[list[str], list[Any]]:
        nonlocal peak
        closed: list[str] = []
        gate = asyncio.Semaphore(HUB_CONCURRENCY)

        async def hub(i: int) -> Any:
            async with gate:
                return await provision_one(host, port, hub_tls, setup.template_name, f"HUB{i:04d}", csrs[i])

        abusers = []
        for i in range(ABUSERS):
            kind = kinds[i % len(kinds)]
            abusers.append(asyncio.create_task(abuser(kind, host, port, abuser_tls, deadlines[kind], closed)))
            if i % 50 == 49:
                await asyncio.sleep(0)  # let accepted connections start their handshakes
        hubs = asyncio.gather(*(hub(i) for i in range(HUBS)))
        everything = asyncio.gather(hubs, *abusers)
        while not everything.done():
            peak = max(peak, rss_mb(proc.pid))
            await asyncio.wait({everything}, timeout=0.25)
        results = list(hubs.result())
        return closed, results

    started = time.monotonic()
    closed, results = asyncio.run(attack())
    elapsed = time.monotonic() - started

    failures = [r.error for r in results if not r.ok]
    assert failures == [], failures[:5]
    assert len(closed) == ABUSERS, {k: closed.count(k) for k in kinds}

    # Memory: the server collects and trims once the burst is over (at most a second or two later).
    # The server is another process that signals nothing: its memory is observed, with a deadline.
    after = rss_mb(proc.pid)
    deadline = time.monotonic() + 15
    while after > baseline + MEMORY_SLACK_MB and time.monotonic() < deadline:
        time.sleep(0.5)
        after = rss_mb(proc.pid)
    print(
        f"\nabuse: {ABUSERS} hostile connections + {HUBS} hubs in {elapsed:.1f} s; "
        f"server VmRSS baseline {baseline:.1f} MB, peak {peak:.1f} MB, after {after:.1f} MB"
    )
    assert after <= baseline + MEMORY_SLACK_MB
    # And it still serves: one more hub after all that.
    last = asyncio.run(provision_one(host, port, hub_tls, setup.template_name, "LAST", make_csr("last")))
    assert last.ok, last.error
    assert os.path.exists(endpoint["rootCaPath"])
