"""Run every benchmark against one iot-core-local (the abuse benchmark and the profiles against their
own) and record the numbers with the commit they measured.

    python -m bench            # what `make bench` runs (about 10 minutes on a 2-core machine)
    python -m bench --quick    # a smaller run to check the machinery (not for the record)

Writes bench/results/<date>-<commit>.json and .md, and bench/results/latency.png and fleet.png
(the charts of the latest run), then rewrites the generated tables of docs/performance.md from that run
(`bench.report.update_docs`; not for --quick or another --out, which are not for the record).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import (
    abuse,
    create_keys,
    delayed_ack,
    fleet,
    footprint,
    gateway,
    latency,
    pkcs11_token,
    profile,
    report,
)
from bench.gateway import ServerProcess

FINDING = (
    "Profiled with py-spy at concurrency 200 (bench/profile.py): on the hubs' side, 67-75% of the time a "
    "hub thread held the GIL was in awscrt's `ClientTlsContext.__init__`, and a native profile shows why: "
    "`s2n_config_new()` parses the whole system CA bundle (SSL_CERT_FILE, ~140 certificates) for every "
    "new TLS context, and then `override_default_trust_store` throws it away for `iot_root_ca_path`. "
    "Two contexts per hub (claim connect, verification connect). fleet-sim now points SSL_CERT_FILE at "
    "the root CA the hubs trust anyway while they onboard (`fleet_sim.skip_system_trust_store`; the "
    "trust of every connection is unchanged). On the stand-in's side the time goes to TLS handshakes "
    "on the gateway's single event loop (`SSLObject.do_handshake`) and to SQLite commits "
    "(`Registry.transaction`)."
)


def _step(name: str, fn: Any, results: dict[str, Any], timings: dict[str, float]) -> None:
    print(f"== {name}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    results[name] = fn()
    timings[name] = round(time.perf_counter() - started, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the machinery")
    parser.add_argument(
        "--out",
        type=Path,
        help="results folder (default bench/results; --quick: a "
        "temporary folder, so a check never replaces the committed results)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": report.commit(),
        "machine": report.machine(),
        "quick": quick,
    }
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, ServerProcess(Path(tmp) / "data") as server:
        work = Path(tmp)
        _step(
            "gateway",
            lambda: gateway.run(server, hubs=400 if quick else 2000, round_trips=200 if quick else 2000),
            results,
            timings,
        )
        _step("latency", lambda: latency.run(server, n=5 if quick else latency.N), results, timings)
        # On a server of its own: after the runs above the shared one holds thousands of certificates and
        # is still refilling its key pool from the latency run's burst, which is not what one hub meets.
        _step(
            "create_keys",
            lambda: create_keys.run(None, n=10 if quick else create_keys.N),
            results,
            timings,
        )
        _step(
            "delayed_ack", lambda: delayed_ack.run(server, n=5 if quick else delayed_ack.N), results, timings
        )
        _step(
            "footprint", lambda: footprint.run(server, runs=2 if quick else footprint.RUNS), results, timings
        )
        _step(
            "pkcs11_token",
            lambda: pkcs11_token.run(server, runs=2 if quick else pkcs11_token.RUNS),
            results,
            timings,
        )
        hubs = 100 if quick else fleet.HUBS
        _step("fleet", lambda: fleet.run(server, hubs=hubs, budget_s=60 if quick else 360), results, timings)

        def bottleneck() -> dict[str, Any]:
            before = fleet.run_level(server, work, hubs, 200, tag="Before", trim_tls=False)
            after = next(lv for lv in results["fleet"]["levels"] if lv["concurrency"] == 200)
            before.pop("latencies_ms")
            return {
                "finding": FINDING,
                "before": before,
                "after": {k: v for k, v in after.items() if k != "latencies_ms"},
            }

        _step("bottleneck", bottleneck, results, timings)
    # On a server of its own: its memory peak is the abuse's, not what the runs above left behind.
    _step("abuse", lambda: abuse.run(scale=abuse.QUICK if quick else abuse.Scale()), results, timings)
    # The profiles run on a server of their own: py-spy attaches to its process.
    if not quick:
        _step("profile_after", lambda: profile.run(400, 200, trim_tls=True), results["bottleneck"], timings)
        _step("profile_before", lambda: profile.run(400, 200, trim_tls=False), results["bottleneck"], timings)
    results["seconds_per_part"] = timings

    out_dir: Path = args.out or (
        Path(tempfile.mkdtemp(prefix="bench-quick-")) if quick else report.RESULTS_DIR
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{dt.date.today().isoformat()}-{results['commit']}{'-quick' if quick else ''}"
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(report.markdown(results))
    charts = report.charts(results, out_dir)
    print(report.markdown(results))
    print(
        f"written: {out_dir / stem}.json, .md; charts: {', '.join(str(c) for c in charts)}", file=sys.stderr
    )
    if not quick and out_dir.resolve() == report.RESULTS_DIR:
        report.update_docs(out_dir / f"{stem}.json")
        print(f"rewritten from it: {report.PERFORMANCE_DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
