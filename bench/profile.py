"""Where the time goes in the saturated fleet case, with py-spy.

Runs one fleet level (default 400 hubs at concurrency 200) and samples both sides at once: this process
(the simulated hubs; `--gil`, so only the thread holding the GIL is counted, which is what limits
hub threads) and the iot-core-local subprocess (every thread, idle ones excluded). Summarises each into
the functions with the largest inclusive and self share of the samples. py-spy is optional: when it
is missing (`pip install py-spy`), the profile is skipped and says so.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fleet import run_level
from bench.gateway import ServerProcess


def _py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


def summarise(raw: Path, top: int = 15) -> dict[str, Any]:
    """Inclusive and self shares per function from py-spy's raw (collapsed stack) output."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():  # py-spy ends a raw file cut short by the signal with a partial line
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f.strip() and not f.startswith(("process ", "thread "))]
        names = [
            f.split(" (")[0]
            + (" (" + f.split("(")[1].split(":")[0].rsplit("/", 1)[-1] + ")" if "(" in f else "")
            for f in frames
        ]
        for name in set(names):
            inclusive[name] += n
        if names:
            own[names[-1]] += n

    def table(counter: collections.Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / max(total, 1), 1)] for name, n in counter.most_common(top)]

    return {"samples": total, "inclusive_pct": table(inclusive), "self_pct": table(own)}


def _record(py_spy: str, pid: int, out: Path, *, gil: bool) -> subprocess.Popen[bytes]:
    cmd = [
        py_spy,
        "record",
        "--pid",
        str(pid),
        "--rate",
        "50",
        "--format",
        "raw",
        "--output",
        str(out),
        "--nonblocking",
    ]
    if gil:
        cmd.append("--gil")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(hubs: int = 400, concurrency: int = 200, *, trim_tls: bool = True) -> dict[str, Any]:
    py_spy = _py_spy()
    if py_spy is None:
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        work = Path(tmp)
        with ServerProcess(work / "data") as server:
            assert server.proc is not None
            spies = [
                _record(py_spy, os.getpid(), work / "client.txt", gil=True),
                _record(py_spy, server.proc.pid, work / "server.txt", gil=False),
            ]
            time.sleep(1.0)  # let py-spy attach
            level = run_level(server, work, hubs, concurrency, tag="P", trim_tls=trim_tls)
            for spy in spies:
                spy.send_signal(signal.SIGINT)
            for spy in spies:
                spy.wait(60)
        level.pop("latencies_ms")
        result: dict[str, Any] = {"level": level}
        for side in ("client", "server"):
            raw = work / f"{side}.txt"
            result[side] = summarise(raw) if raw.exists() else {"skipped": "py-spy wrote nothing"}
    return result


if __name__ == "__main__":
    before = "--before" in sys.argv
    print(json.dumps(run(trim_tls=not before), indent=2))
