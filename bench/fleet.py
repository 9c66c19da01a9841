"""Fleet throughput: fleet-sim's engine against iot-core-local run as a subprocess.

1,000 hubs at concurrency 1, 10, 100 and 200, CSR method, each hub onboarding through `HubOnboarding`
exactly as `hub-onboard fleet-sim` does (the engine is imported, not shelled out). For each level:
throughput, p50/p95/p99 of one hub's process_device(), errors (must be 0), the stand-in's CPU seconds and
peak RSS while the level ran, and this process's own CPU seconds (the simulated hubs).
"""

from __future__ import annotations

import json
import re
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.gateway import ServerProcess
from hub_onboarding.tools.fleet_sim import Target, onboard_fleet, skip_system_trust_store, write_hubs
from iot_core_local.recipes.claims import set_up_fleet_provisioning

LEVELS = (1, 10, 100, 200)
HUBS = 1000


class PeakRss:
    """Samples a process's VmRSS every 100 ms (VmHWM would be the peak of the whole run, not one level)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return
        found = re.search(r"VmRSS:\s+(\d+)", status)
        if found:
            self.peak_kb = max(self.peak_kb, int(found.group(1)))

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._sample()

    def __enter__(self) -> PeakRss:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def target_for(server: ServerProcess, template_name: str) -> Target:
    claim = set_up_fleet_provisioning(server.client(), template_name)
    return Target(
        endpoint_url=f"{server.endpoint['mqttHost']}:{server.endpoint['mqttPort']}",
        root_ca_path=Path(server.endpoint["rootCaPath"]),
        claim_certificate_pem=claim.certificate_pem,
        claim_private_key_pem=claim.private_key_pem,
        template_name=claim.template_name,
    )


def run_level(
    server: ServerProcess,
    work: Path,
    hubs: int,
    concurrency: int,
    *,
    tag: str = "",
    extra_ro: dict[str, Any] | None = None,
    trim_tls: bool = True,
) -> dict[str, Any]:
    """One level; `trim_tls=False` is fleet-sim before the bottleneck fix (see skip_system_trust_store)."""
    target = target_for(server, f"Fleet{tag}{concurrency}")
    configs = write_hubs(
        target, work / f"c{tag}{concurrency}", hubs, serial_prefix=f"F{tag}{concurrency}", extra_ro=extra_ro
    )
    assert server.proc is not None
    cpu0 = server.cpu_seconds()
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    trust = target.root_ca_path if trim_tls else None
    with skip_system_trust_store(trust), PeakRss(server.proc.pid) as rss:
        report = onboard_fleet(configs, concurrency)
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    result = report.to_dict()
    result["server_cpu_s"] = round(server.cpu_seconds() - cpu0, 2)
    result["server_peak_rss_mb"] = round(rss.peak_kb / 1024, 1)
    result["client_cpu_s"] = round((self1.ru_utime - self0.ru_utime) + (self1.ru_stime - self0.ru_stime), 2)
    result["latencies_ms"] = [round(s * 1000, 2) for s in report.latencies_s]
    result["system_trust_store_skipped"] = trim_tls
    label = "fleet" if trim_tls else "fleet (before the fix)"
    print(
        f"{label}: {hubs} hubs at concurrency {concurrency}: {result['provisionings_per_s']}/s, "
        f"p50 {result['latency_p50_ms']} ms, failed {result['failed']}",
        file=sys.stderr,
        flush=True,
    )
    return result


def run(
    server: ServerProcess | None = None,
    *,
    hubs: int = HUBS,
    levels: tuple[int, ...] = LEVELS,
    budget_s: float = 360.0,
) -> dict[str, Any]:
    """Run every level; when the whole matrix would exceed `budget_s`, concurrency 1 gets fewer hubs."""
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        work = Path(tmp)
        if server is None:
            with ServerProcess(work / "data") as own:
                return run(own, hubs=hubs, levels=levels, budget_s=budget_s)
        notes: list[str] = []
        results: list[dict[str, Any]] = []
        # Higher concurrency first: its time tells what is left for the (slowest) sequential level.
        started = time.perf_counter()
        for concurrency in sorted(levels, reverse=True):
            n = hubs
            if concurrency == 1 and results:
                per_hub = min(r["latency_p50_ms"] for r in results) / 1000 * 1.3
                left = budget_s - (time.perf_counter() - started)
                if per_hub * hubs > left:
                    n = max(100, int(left / per_hub) // 100 * 100)
                    notes.append(
                        f"concurrency 1 ran {n} hubs instead of {hubs} to keep the run within "
                        f"{budget_s:.0f} s (throughput and latencies need no more at that level)"
                    )
            results.append(run_level(server, work, n, concurrency))
        results.sort(key=lambda r: r["concurrency"])
        return {
            "levels": results,
            "notes": notes,
            "method": "CreateCertificateFromCsr",
            "verification_connect": True,
        }


if __name__ == "__main__":
    # python -m bench.fleet [HUBS [LEVEL...]]; BENCH_BEFORE_FIX=1 runs without skip_system_trust_store.
    import os

    hubs = int(sys.argv[1]) if len(sys.argv) > 1 else HUBS
    levels = tuple(int(x) for x in sys.argv[2:]) or LEVELS
    if os.environ.get("BENCH_BEFORE_FIX"):
        with tempfile.TemporaryDirectory() as tmp, ServerProcess(Path(tmp) / "data") as srv:
            print(
                json.dumps(
                    {
                        k: v
                        for k, v in run_level(srv, Path(tmp), hubs, levels[0], trim_tls=False).items()
                        if k != "latencies_ms"
                    },
                    indent=2,
                )
            )
        sys.exit(0)
    out = run(hubs=hubs, levels=levels)
    for level in out["levels"]:
        level.pop("latencies_ms")
    print(json.dumps(out, indent=2))
