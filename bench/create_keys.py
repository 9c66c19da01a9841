"""The stand-in's CreateKeysAndCertificate answer, as a hub sees it: one MQTT round trip at concurrency 1.

    python -m bench.create_keys [N] [GAP_MS]

One claim connection through the hub's own MQTT code (`hub_onboarding.mqtt`, awscrt); N requests one
after another, each timed from the hub's publish to its parsed answer. Between two requests the hub
waits GAP_MS (default 150 ms, about one whole onboarding at concurrency 1, as a factory line asks), and
once with no gap at all, which shows what a burst faster than key generation gets.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.gateway import ServerProcess
from hub_onboarding.certs import Credentials
from hub_onboarding.config import Endpoint
from hub_onboarding.mqtt import ConnectionSettings, IotProvisioning
from iot_core_local.recipes.claims import set_up_fleet_provisioning

N = 50
GAP_MS = 150.0


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _round_trips(server: ServerProcess, n: int, gap_s: float, tag: str) -> dict[str, Any]:
    claim = set_up_fleet_provisioning(server.client(), f"Keys{tag}")
    settings = ConnectionSettings(
        endpoint=Endpoint(server.endpoint["mqttHost"], int(server.endpoint["mqttPort"])),
        root_ca_path=server.endpoint["rootCaPath"],
        keep_alive=60,
    )
    credentials = Credentials(claim.certificate_pem.encode(), claim.private_key_pem.encode())
    samples: list[float] = []
    with IotProvisioning(settings).connect(f"bench-keys-{tag}", credentials) as conn:
        fleet = conn.fleet_provisioning(30.0)
        fleet.create_keys_and_certificate()  # warms the subscriptions, unmeasured
        for _ in range(n):
            # The gap comes first, so the server has had it to refill after the warm-up request too.
            time.sleep(gap_s)
            started = time.perf_counter()
            fleet.create_keys_and_certificate()
            samples.append((time.perf_counter() - started) * 1000)
    return {
        "n": n,
        "gap_ms": round(gap_s * 1000, 1),
        "p50_ms": round(statistics.median(samples), 1),
        "p95_ms": round(_quantile(samples, 0.95), 1),
        "max_ms": round(max(samples), 1),
        "samples_ms": [round(s, 2) for s in samples],
    }


def run(server: ServerProcess | None = None, n: int = N, gap_ms: float = GAP_MS) -> dict[str, Any]:
    if server is None:
        with tempfile.TemporaryDirectory(prefix="bench-keys-") as tmp, ServerProcess(Path(tmp) / "data") as s:
            return run(s, n, gap_ms)
    return {
        "paced": _round_trips(server, n, gap_ms / 1000, "Paced"),
        "back_to_back": _round_trips(server, n, 0.0, "Burst"),
    }


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else N
    gap_ms = float(argv[1]) if len(argv) > 1 else GAP_MS
    result = run(None, n, gap_ms)
    for name, r in result.items():
        print(
            f"{name}: n={r['n']} gap={r['gap_ms']} ms p50={r['p50_ms']} ms "
            f"p95={r['p95_ms']} ms max={r['max_ms']} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
