"""Onboarding with the hub's keys in a PKCS#11 token (SoftHSM2) against onboarding with key files.

Against the stand-in, alternating, R runs each of `hub-onboard provision` as a process
(`footprint.measure`: wall time, CPU, the child's own peak RSS), CreateCertificateFromCsr with the
verification connect:
  - files: the claim key is a 0600 file, the permanent key is made by `cryptography` and written 0600;
  - token: the claim key is in a SoftHSM2 token, the permanent key is generated in it, the CSR is signed
    by it, and both TLS handshakes (claim, verification) sign through awscrt's PKCS#11 support.
Each token run gets a token of its own in one SoftHSM2 folder (SOFTHSM2_CONF, set for the children
while this part runs). The latency ratio is token median / files median; the RSS figures are the largest
run of each (python-pkcs11 and the module's own libraries are the difference).

    python -m bench.pkcs11_token [RUNS] [--record]

prints the summary; `--record` writes it as a partial run (`report.record_partial`), which
docs/performance.md shows beside the newest full run until a `python -m bench` includes this part.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import report
from bench.footprint import hub_onboard_command, measure
from bench.gateway import ServerProcess
from hub_onboarding.tools import softhsm
from hub_onboarding.tools.factory import write_claim_hub
from iot_core_local.recipes.claims import set_up_fleet_provisioning

RUNS = 7
SIDES = ("files", "token")


def run(server: ServerProcess | None = None, runs: int = RUNS) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-token-") as tmp:
        work = Path(tmp)
        if server is None:
            with ServerProcess(work / "data") as own:
                return run(own, runs)
        claim = set_up_fleet_provisioning(server.client(), "TokenBench")
        cmd = hub_onboard_command()
        saved = os.environ.get(softhsm.CONF_ENV)

        def hub(side: str, i: int) -> Path:
            token = None
            if side == "token":
                made = softhsm.make_token(work / "softhsm", f"bench-{i}")
                softhsm.activate(made)  # this process imports the claim key; the child sees the folder
                token = made.config()
            return write_claim_hub(
                work / f"{side}-{i}",
                endpoint_url=f"{server.endpoint['mqttHost']}:{server.endpoint['mqttPort']}",
                root_ca_path=Path(server.endpoint["rootCaPath"]),
                claim_certificate_pem=claim.certificate_pem,
                claim_private_key_pem=claim.private_key_pem,
                template_name=claim.template_name,
                serial=f"TOKEN-{side}-{i}",
                certificate_method="CreateCertificateFromCsr",
                token=token,
            )

        rows: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
        try:
            for i in range(runs + 1):  # run 0 warms the page cache for both; it is not counted
                for side in SIDES if i % 2 == 0 else reversed(SIDES):
                    row = measure([*cmd, "provision", "--config", str(hub(side, i))])
                    if i > 0:
                        rows[side].append(row)
        finally:
            if saved is None:
                os.environ.pop(softhsm.CONF_ENV, None)
            else:
                os.environ[softhsm.CONF_ENV] = saved
    summary = {
        side: {
            "runs": len(r),
            "wall_ms_median": round(statistics.median(x["wall_ms"] for x in r), 1),
            "cpu_ms_median": round(statistics.median(x["cpu_ms"] for x in r), 1),
            "peak_rss_mb_max": max(x["peak_rss_mb"] for x in r),
            "samples": r,
        }
        for side, r in rows.items()
    }
    files, token = summary["files"], summary["token"]
    result = {
        "method": "CreateCertificateFromCsr, verification connect",
        "sides": summary,
        "latency_ratio": round(token["wall_ms_median"] / files["wall_ms_median"], 3),
        "peak_rss_added_mb": round(token["peak_rss_mb_max"] - files["peak_rss_mb_max"], 1),
    }
    print(
        f"token: {token['wall_ms_median']} ms / {token['peak_rss_mb_max']} MB vs files "
        f"{files['wall_ms_median']} ms / {files['peak_rss_mb_max']} MB; ratio {result['latency_ratio']}",
        file=sys.stderr,
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pkcs11_token")
    parser.add_argument("runs", nargs="?", type=int, default=RUNS, help=f"runs of each side ({RUNS})")
    parser.add_argument(
        "--record",
        action="store_true",
        help="write bench/results/<date>-<commit>-pkcs11-token.json and .md, and rewrite docs/performance.md",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"runs must be at least 1, not {args.runs}")
    out = run(runs=args.runs)
    if args.record:
        print(f"written: {report.record_partial('pkcs11_token', out)}", file=sys.stderr)
    shown = {
        **out,
        "sides": {
            name: {k: v for k, v in side.items() if k != "samples"} for name, side in out["sides"].items()
        },
    }
    print(json.dumps(shown, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
