"""Footprint of `hub-onboard provision` as a process: wall time, peak RSS, time to the first byte sent.

Against the stand-in, alternating, R runs each of:
  - `hub-onboard provision --config X` (CreateCertificateFromCsr, verification connect, every fsync);
  - `python bench/raw_sdk.py X --csr --verify` (the same requests by hand, no persistence, no checks);
  - `python -c pass` (what any Python process costs here, for reference).
Per run: wall time and peak RSS of that one child (`os.wait4` returns the child's own rusage), and the
time from spawning it to the first byte it sends to the endpoint: the hub's endpoint is a small TCP
forwarder in this process that timestamps the first byte of each connection (the TLS ClientHello)
and relays everything to the gateway. Import time comes from `python -X importtime`.

Goals: peak RSS <= 45 MB; first byte <= 300 ms; wall <= 1.5 x the script's.
"""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.gateway import ServerProcess
from hub_onboarding.tools.factory import write_claim_hub
from iot_core_local.recipes.claims import set_up_fleet_provisioning

RUNS = 7
RAW_SDK = Path(__file__).resolve().parent / "raw_sdk.py"


class FirstByteForwarder:
    """127.0.0.1:<port> -> the gateway; records when each connection's first byte arrived."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.first_bytes: list[float] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            first = client.recv(65536)
            if not first:
                return
            with self._lock:
                self.first_bytes.append(time.perf_counter())
            with socket.create_connection(self.upstream) as up:
                up.sendall(first)
                back = threading.Thread(target=self._pump, args=(up, client), daemon=True)
                back.start()
                self._pump(client, up)
                back.join(10)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def take_first(self, since: float) -> float | None:
        with self._lock:
            later = [t for t in self.first_bytes if t >= since]
            self.first_bytes.clear()
        return min(later) if later else None

    def close(self) -> None:
        self.listener.close()


# A small launcher process spawns the command, so that the child's peak RSS is its own: a child
# forked from this (large) benchmark process would count the parent's pages it had before exec.
_LAUNCHER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
t1 = time.perf_counter()
print(json.dumps({"spawned": t0, "wall": t1 - t0, "code": os.waitstatus_to_exitcode(status),
                  "maxrss_kb": usage.ru_maxrss, "cpu": usage.ru_utime + usage.ru_stime}))
"""


def hub_onboard_command() -> list[str]:
    """How to run the product as a hub would: the venv's `hub-onboard` script, else the module."""
    script = Path(sys.executable).parent / "hub-onboard"
    return [str(script)] if script.exists() else [sys.executable, "-m", "hub_onboarding.cli"]


def measure(cmd: list[str], forwarder: FirstByteForwarder | None = None) -> dict[str, Any]:
    """Run `cmd`; its wall time, its own peak RSS, and the time from its spawn to its first byte sent.

    time.perf_counter is CLOCK_MONOTONIC, shared by the launcher and the forwarder in this process.
    """
    since = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, *cmd], check=False, capture_output=True, text=True
    )
    try:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        report = {"code": proc.returncode}
    if proc.returncode != 0 or report.get("code") != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {(proc.stdout + proc.stderr)[-2000:]}")
    result = {
        "wall_ms": round(report["wall"] * 1000, 1),
        "peak_rss_mb": round(report["maxrss_kb"] / 1024, 1),
        "cpu_ms": round(report["cpu"] * 1000, 1),
    }
    if forwarder is not None:
        first = forwarder.take_first(since)
        result["first_byte_ms"] = round((first - report["spawned"]) * 1000, 1) if first is not None else None
    return result


def import_time(statement: str, top: int = 12) -> dict[str, Any]:
    """`python -X importtime -c statement`: total, and the modules with the largest cumulative time."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement], capture_output=True, text=True, check=True
    )
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = line[len("import time:") :].split("|")
        rows.append((int(cumulative_us), int(self_us), name[1:]))  # nesting shows as leading spaces
    top_level = [r for r in rows if not r[2].startswith(" ")]  # the outermost imports
    ranked = sorted(rows, key=lambda r: r[0], reverse=True)[:top]
    return {
        "statement": statement,
        "total_ms": round(sum(r[0] for r in top_level) / 1000, 1),
        "modules": len(rows),
        "top_cumulative_ms": [
            [name.strip(), round(cum / 1000, 1), round(own / 1000, 1)] for cum, own, name in ranked
        ],
    }


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 1) if values else None


def run(server: ServerProcess | None = None, runs: int = RUNS) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-footprint-") as tmp:
        work = Path(tmp)
        if server is None:
            with ServerProcess(work / "data") as own:
                return run(own, runs)
        claim = set_up_fleet_provisioning(server.client(), "Footprint")
        forwarder = FirstByteForwarder((server.endpoint["mqttHost"], int(server.endpoint["mqttPort"])))
        product_cmd = hub_onboard_command()

        def hub(side: str, i: int) -> Path:
            return write_claim_hub(
                work / f"{side}-{i}",
                endpoint_url=f"127.0.0.1:{forwarder.port}",
                root_ca_path=Path(server.endpoint["rootCaPath"]),
                claim_certificate_pem=claim.certificate_pem,
                claim_private_key_pem=claim.private_key_pem,
                template_name=claim.template_name,
                serial=f"FOOT-{side}-{i}",
                certificate_method="CreateCertificateFromCsr",
            )

        def command(name: str, i: int) -> list[str]:
            """The command line of one side (a hub folder is written for it just before it runs)."""
            if name == "hub-onboard provision":
                return [*product_cmd, "provision", "--config", str(hub("p", i))]
            if name == "raw_sdk.py --csr --verify":
                return [sys.executable, str(RAW_SDK), str(hub("r", i)), "--csr", "--verify"]
            return [sys.executable, "-c", "pass"]

        rows: dict[str, list[dict[str, Any]]] = {
            "hub-onboard provision": [],
            "raw_sdk.py --csr --verify": [],
            "python -c pass": [],
        }
        try:
            for i in range(runs + 1):  # run 0 warms the page cache for both; it is not counted
                sides: list[tuple[str, FirstByteForwarder | None]] = [
                    ("hub-onboard provision", forwarder),
                    ("raw_sdk.py --csr --verify", forwarder),
                    ("python -c pass", None),
                ]
                if i % 2:
                    sides.reverse()
                for name, via in sides:
                    row = measure(command(name, i), via)
                    if i > 0:
                        rows[name].append(row)
        finally:
            forwarder.close()
    summary = {
        name: {
            "runs": len(r),
            "wall_ms_median": _median(r, "wall_ms"),
            "peak_rss_mb_median": _median(r, "peak_rss_mb"),
            "peak_rss_mb_max": max(x["peak_rss_mb"] for x in r),
            "cpu_ms_median": _median(r, "cpu_ms"),
            "first_byte_ms_median": _median(r, "first_byte_ms"),
            "samples": r,
        }
        for name, r in rows.items()
    }
    product, raw = summary["hub-onboard provision"], summary["raw_sdk.py --csr --verify"]
    wall_ratio = round(product["wall_ms_median"] / raw["wall_ms_median"], 3)
    result: dict[str, Any] = {
        "processes": summary,
        "wall_ratio_vs_script": wall_ratio,
        "import_time": {
            "hub_onboarding.cli": import_time("import hub_onboarding.cli"),
            "provision's imports": import_time(
                "import hub_onboarding.cli, hub_onboarding.onboarding, hub_onboarding.device_provisioner, "
                "hub_onboarding.mqtt, awscrt.mqtt5, awsiot.mqtt5_client_builder, awsiot.iotidentity"
            ),
            "raw_sdk.py's imports": import_time(
                "import awscrt.mqtt5, awscrt.mqtt_request_response, awsiot.iotidentity, "
                "awsiot.mqtt5_client_builder"
            ),
        },
        "goals": {
            "peak_rss_mb<=45": product["peak_rss_mb_max"] <= 45,
            "first_byte_ms<=300": (product["first_byte_ms_median"] or 1e9) <= 300,
            "wall<=1.5x_script": wall_ratio <= 1.5,
        },
    }
    print(
        f"footprint: provision {product['wall_ms_median']} ms / {product['peak_rss_mb_max']} MB / "
        f"first byte {product['first_byte_ms_median']} ms; script {raw['wall_ms_median']} ms / "
        f"{raw['peak_rss_mb_max']} MB; ratio {wall_ratio}",
        file=sys.stderr,
        flush=True,
    )
    return result


if __name__ == "__main__":
    out = run(runs=int(sys.argv[1]) if len(sys.argv) > 1 else RUNS)
    for p in out["processes"].values():
        p.pop("samples")
    print(json.dumps(out, indent=2))
