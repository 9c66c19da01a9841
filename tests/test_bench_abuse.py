"""The abuse benchmark (bench/abuse.py) at a small scale: its machinery works, hubs still provision while
idle connections and subscribers that never read press on the server, and its report says so."""

from __future__ import annotations

import json
from pathlib import Path

from bench import abuse, report


def test_the_abuse_benchmark_at_smoke_scale() -> None:
    results = abuse.run(scale=abuse.SMOKE)
    scale = abuse.SMOKE
    for phase, hubs in (("without_abuse", scale.calm_hubs), ("with_abuse", scale.hubs)):
        assert results[phase]["succeeded"] == hubs, results[phase]["errors"]
        assert results[phase]["provisionings_per_s"] > 0
    # Nobody was cut off: idle connections keep their keep-alive, and the deaf subscribers are within
    # the gateway's 30 s drain timeout.
    assert results["idle_still_open"] == scale.idle
    assert results["deaf_still_open"] == scale.deaf
    assert 0 < results["broker_peak_rss_mb"] < results["server_peak_rss_mb"] < 250
    assert abs(results["peak_rss_mb"] - results["server_peak_rss_mb"] - results["broker_peak_rss_mb"]) < 0.2
    goals = report.goals({"abuse": results})
    assert [met for _, _, _, met in goals][:2] == [True, True]
    assert any(
        line.startswith("| with abuse | 10 | 10 | 10 |") for line in report.sections({"abuse": results})
    )


def test_a_recorded_abuse_run_is_shown_beside_the_newest_full_run(tmp_path: Path) -> None:
    full = {"date": "2026-11-30T10:00:00+00:00", "commit": "fullrun", "quick": False}
    full["machine"] = {"cpus": 2, "python": "3.11"}
    (tmp_path / "full.json").write_text(json.dumps(full))
    part = {**full, "date": "2026-11-30T11:00:00+00:00", "commit": "abuse01", "partial": True}
    phase = {"latency_p50_ms": 9.0}
    part["abuse"] = {
        "scale": {**vars(abuse.SMOKE)},
        "without_abuse": {"hubs": 10, "succeeded": 10, "provisionings_per_s": 300.0, **phase},
        "with_abuse": {
            "hubs": 10,
            "succeeded": 9,
            "failed": 1,
            "provisionings_per_s": 90.0,
            "latency_p50_ms": 20.0,
        },
        "idle_still_open": 20,
        "deaf_still_open": 5,
        "server_peak_rss_mb": 80.0,
        "broker_peak_rss_mb": 9.0,
        "peak_rss_mb": 89.0,
    }
    (tmp_path / "part-abuse.json").write_text(json.dumps(part))
    assert report.newest_results(tmp_path) == tmp_path / "full.json"  # a partial run is not the newest full
    block = report.docs_block_for(folder=tmp_path)
    assert "bench/results/full.json" in block.splitlines()[0]
    assert "commit abuse01" in block
    assert "`bench/results/part-abuse.json`" in block
    assert "| 9 of 10 | **missed** |" in block
    assert (
        "| abuse: provisionings/s without abuse (10 hubs, concurrency 10) | a reference for the run under "
        "abuse (the throughput goal is the gateway row's) | 300.0/s | n/a |" in block
    )
