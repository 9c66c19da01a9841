"""The results as a markdown table and PNG charts (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

FP_KEYS = ("CreateKeysAndCertificate", "CreateCertificateFromCsr")


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _ok(flag: bool | None) -> str:
    return "n/a" if flag is None else ("met" if flag else "**missed**")


def goals(results: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(what, goal, measured, met) for every goal the issues set."""
    out: list[tuple[str, str, str, bool | None]] = []
    lat = results.get("latency", {})
    for key in FP_KEYS:
        with_v, without_v = lat.get(key), lat.get(f"{key} (no verification connect)")
        if without_v:
            r = without_v["ratio_median"]
            out.append(
                (f"{key}: median vs raw SDK, no verification connect", "<= 1.10", f"{r:.2f}", r <= 1.10)
            )
        if with_v:
            r = with_v["ratio_median"]
            out.append(
                (f"{key}: median vs raw SDK, verification connect + fsyncs", "<= 1.5", f"{r:.2f}", r <= 1.5)
            )
    fp = results.get("footprint", {})
    if fp:
        prov = fp["processes"]["hub-onboard provision"]
        out.append(
            (
                "hub-onboard provision: peak RSS",
                "<= 45 MB",
                f"{prov['peak_rss_mb_max']} MB",
                prov["peak_rss_mb_max"] <= 45,
            )
        )
        first = prov["first_byte_ms_median"]
        out.append(
            (
                "hub-onboard provision: process start to first byte",
                "<= 300 ms",
                f"{first} ms",
                first is not None and first <= 300,
            )
        )
        ratio = fp["wall_ratio_vs_script"]
        out.append(
            (
                "hub-onboard provision: wall time vs raw_sdk.py script",
                "<= 1.5x",
                f"{ratio:.2f}x",
                ratio <= 1.5,
            )
        )
    fleet = results.get("fleet", {})
    for level in fleet.get("levels", []):
        if level["concurrency"] == 200:
            out.append(
                (
                    "fleet-sim, 1,000 hubs at concurrency 200 (hubs + stand-in on 2 cores)",
                    ">= 200/s",
                    f"{level['provisionings_per_s']}/s",
                    level["provisionings_per_s"] >= 200,
                )
            )
        out.append(
            (
                f"fleet-sim errors at concurrency {level['concurrency']}",
                "0",
                str(level["failed"]),
                level["failed"] == 0,
            )
        )
    gw = results.get("gateway", {})
    if gw:
        t = gw["throughput"]
        out.append(
            (
                "gateway: provisionings/s, 200 lean clients",
                ">= 200/s",
                f"{t['provisionings_per_s']}/s",
                t["provisionings_per_s"] >= 200,
            )
        )
        a = gw["latency"]["added_median_ms"]
        out.append(("gateway: added median latency vs Mosquitto", "< 2 ms", f"{a} ms", a < 2))
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Benchmark results {results['date']} (commit {results['commit']})",
        "",
        f"Machine: {results['machine']['cpus']} CPUs, Python {results['machine']['python']}.",
        "",
        "## Goals",
        "",
        _row("measure", "goal", "measured", ""),
        _row("---", "---", "---", "---"),
    ]
    lines += [_row(what, goal, got, _ok(met)) for what, goal, got, met in goals(results)]

    lat = results.get("latency")
    if lat:
        lines += [
            "",
            "## Onboarding latency, HubOnboarding vs the raw awsiotsdk script (alternating)",
            "",
            _row("method", "n", "product median", "product p95", "floor median", "floor p95", "ratio"),
            _row(*["---"] * 7),
        ]
        for key, r in lat.items():
            lines.append(
                _row(
                    key,
                    r["n"],
                    f"{r['product_median_ms']} ms",
                    f"{r['product_p95_ms']} ms",
                    f"{r['floor_median_ms']} ms",
                    f"{r['floor_p95_ms']} ms",
                    r["ratio_median"],
                )
            )

    ack = results.get("delayed_ack")
    if ack:
        lines += [
            "",
            "## Nagle + delayed ACK on each awscrt connect (bench/delayed_ack.py)",
            "",
            _row("n", "awscrt connect, direct to the gateway", "through a TCP_QUICKACK relay", "saved"),
            _row(*["---"] * 4),
            _row(
                ack["n"],
                f"{ack['direct_connect_median_ms']} ms",
                f"{ack['quickack_relay_connect_median_ms']} ms",
                f"{ack['saved_per_connect_ms']} ms",
            ),
        ]

    fp = results.get("footprint")
    if fp:
        lines += [
            "",
            "## Process footprint (medians; RSS: the largest run)",
            "",
            _row("process", "wall", "CPU", "peak RSS", "spawn to first byte"),
            _row(*["---"] * 5),
        ]
        for name, p in fp["processes"].items():
            lines.append(
                _row(
                    name,
                    f"{p['wall_ms_median']} ms",
                    f"{p['cpu_ms_median']} ms",
                    f"{p['peak_rss_mb_max']} MB",
                    "-" if p["first_byte_ms_median"] is None else f"{p['first_byte_ms_median']} ms",
                )
            )
        lines += ["", _row("imports", "total", "modules", "largest (cumulative ms)"), _row(*["---"] * 4)]
        for name, it in fp["import_time"].items():
            top = ", ".join(f"{m} {c}" for m, c, _ in it["top_cumulative_ms"][:4])
            lines.append(_row(name, f"{it['total_ms']} ms", it["modules"], top))

    fleet = results.get("fleet")
    if fleet:
        lines += [
            "",
            "## Fleet throughput (fleet-sim engine, CreateCertificateFromCsr, verification "
            "connect; stand-in as a subprocess)",
            "",
            _row(
                "concurrency",
                "hubs",
                "onboarded",
                "failed",
                "per s",
                "p50",
                "p95",
                "p99",
                "stand-in CPU",
                "stand-in peak RSS",
                "hubs' CPU",
            ),
            _row(*["---"] * 11),
        ]
        for lv in fleet["levels"]:
            lines.append(
                _row(
                    lv["concurrency"],
                    lv["hubs"],
                    lv["onboarded"],
                    lv["failed"],
                    lv["provisionings_per_s"],
                    f"{lv['latency_p50_ms']} ms",
                    f"{lv['latency_p95_ms']} ms",
                    f"{lv['latency_p99_ms']} ms",
                    f"{lv['server_cpu_s']} s",
                    f"{lv['server_peak_rss_mb']} MB",
                    f"{lv['client_cpu_s']} s",
                )
            )
        lines += [f"- {note}" for note in fleet.get("notes", [])]

    fix = results.get("bottleneck")
    if fix:
        b, a = fix["before"], fix["after"]
        lines += [
            "",
            "## Top bottleneck, before and after the fix",
            "",
            fix["finding"],
            "",
            _row("", "per s", "p50", "hubs' CPU per hub", "stand-in CPU per hub"),
            _row(*["---"] * 5),
        ]
        for label, lv in (("before", b), ("after", a)):
            lines.append(
                _row(
                    f"{label} ({lv['hubs']} hubs at {lv['concurrency']})",
                    lv["provisionings_per_s"],
                    f"{lv['latency_p50_ms']} ms",
                    f"{1000 * lv['client_cpu_s'] / lv['hubs']:.1f} ms",
                    f"{1000 * lv['server_cpu_s'] / lv['hubs']:.1f} ms",
                )
            )
        for side in ("client", "server"):
            prof = fix.get("profile_after", {}).get(side, {})
            if "self_pct" in prof:
                top = ", ".join(f"{name} {pct}%" for name, pct in prof["self_pct"][:6])
                lines += ["", f"After the fix, {side} profile (self time, top 6): {top}"]
            prof = fix.get("profile_before", {}).get(side, {})
            if "self_pct" in prof:
                top = ", ".join(f"{name} {pct}%" for name, pct in prof["self_pct"][:6])
                lines += ["", f"Before the fix, {side} profile (self time, top 6): {top}"]

    gw = results.get("gateway")
    if gw:
        t, la = gw["throughput"], gw["latency"]
        lines += [
            "",
            "## Gateway alone (lean asyncio clients, no verification connect, no files)",
            "",
            _row("hubs", "concurrency", "per s", "p50", "p99", "failed", "added median latency"),
            _row(*["---"] * 7),
            _row(
                t["hubs"],
                t["concurrency"],
                t["provisionings_per_s"],
                f"{t['latency_p50_ms']} ms",
                f"{t['latency_p99_ms']} ms",
                t["failed"],
                f"{la['added_median_ms']} ms",
            ),
        ]
    return "\n".join(lines) + "\n"


def charts(results: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    lat = results.get("latency")
    if lat:
        fig, ax = plt.subplots(figsize=(10, 5))
        data, labels = [], []
        for key, r in lat.items():
            short = key.replace("CreateKeysAndCertificate", "Keys").replace("CreateCertificateFromCsr", "CSR")
            short = short.replace(" (no verification connect)", "\nno verify")
            data += [r["product_ms"], r["floor_ms"]]
            labels += [f"{short}\nhub-onboarding", f"{short}\nraw SDK"]
        ax.boxplot(data, showfliers=True)
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("one onboarding (ms, log scale)")
        ax.set_title("Onboarding latency: HubOnboarding vs the hand-written awsiotsdk script")
        fig.tight_layout()
        path = out_dir / "latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    fleet = results.get("fleet")
    if fleet:
        levels = fleet["levels"]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
        xs = [lv["concurrency"] for lv in levels]
        left.plot(xs, [lv["provisionings_per_s"] for lv in levels], marker="o", label="fleet-sim (this run)")
        fix = results.get("bottleneck")
        if fix:
            b = fix["before"]
            left.plot(
                [b["concurrency"]],
                [b["provisionings_per_s"]],
                marker="x",
                linestyle="none",
                color="red",
                label="before the fix",
            )
        left.axhline(200, color="grey", linestyle="--", label="goal 200/s")
        left.set_xscale("log")
        left.set_xlabel("concurrency (hubs onboarding at once)")
        left.set_ylabel("onboardings per second")
        left.set_title("Throughput vs concurrency")
        left.legend()
        for lv in levels:
            values = sorted(lv["latencies_ms"])
            ys = [(i + 1) / len(values) for i in range(len(values))]
            right.plot(values, ys, label=f"concurrency {lv['concurrency']}")
        right.set_xscale("log")
        right.set_xlabel("one hub's onboarding (ms, log scale)")
        right.set_ylabel("fraction of hubs")
        right.set_title("Latency distribution (CDF)")
        right.legend()
        fig.tight_layout()
        path = out_dir / "fleet.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
