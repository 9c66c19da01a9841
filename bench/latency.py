"""Onboarding latency against the floor: HubOnboarding against the raw awsiotsdk script.

N sequential onboardings per method through `HubOnboarding` in this process, beside the same requests
written by hand with awsiotsdk (`bench/raw_sdk.py`: no persistence, no checks), ALTERNATING the two
(and which of the pair goes first) so that drift on a shared machine hits both alike. Fleet
provisioning is measured with the verification connect (and every fsync) and without it
(`fp_verify_connection: false`; the floor skips its reconnect too). JITR's floor is a raw awscrt
connect retried until a `JitrActivator` (a customer's Lambda function) has activated the certificate,
with the product's backoff formula and the same random seed on both sides, so both sleep alike.

The stand-in runs as a subprocess; each sample is one hub (its own folder, serial and identity).
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import raw_sdk
from bench.gateway import ServerProcess
from hub_onboarding.onboarding import HubOnboarding
from hub_onboarding.tools.factory import write_claim_hub, write_jitr_hub
from iot_core_local.recipes.claims import set_up_fleet_provisioning
from iot_core_local.recipes.jitr import DeviceCA, JitrActivator

N = 50
FP_METHODS = ("CreateKeysAndCertificate", "CreateCertificateFromCsr")


def _summary(product: list[float], floor: list[float]) -> dict[str, Any]:
    def q95(xs: list[float]) -> float:
        return statistics.quantiles(xs, n=20, method="inclusive")[18] if len(xs) > 1 else xs[0]

    pm, fm = statistics.median(product), statistics.median(floor)
    return {
        "n": len(product),
        "product_median_ms": round(pm * 1000, 1),
        "product_p95_ms": round(q95(product) * 1000, 1),
        "floor_median_ms": round(fm * 1000, 1),
        "floor_p95_ms": round(q95(floor) * 1000, 1),
        "ratio_median": round(pm / fm, 3),
        "product_ms": [round(x * 1000, 2) for x in product],
        "floor_ms": [round(x * 1000, 2) for x in floor],
    }


def _alternate(n: int, product: Any, floor: Any) -> tuple[list[float], list[float]]:
    """Run product(i) and floor(i) n times each, interleaved, swapping which goes first every pair."""
    p: list[float] = []
    f: list[float] = []
    for i in range(n):
        order = [(product, p), (floor, f)] if i % 2 == 0 else [(floor, f), (product, p)]
        for fn, out in order:
            out.append(fn(i))
    return p, f


def fleet_provisioning(
    server: ServerProcess, work: Path, method: str, verify: bool, n: int
) -> dict[str, Any]:
    tag = f"{'Csr' if 'Csr' in method else 'Keys'}{'V' if verify else 'N'}"
    claim = set_up_fleet_provisioning(server.client(), f"Lat{tag}")
    endpoint = f"{server.endpoint['mqttHost']}:{server.endpoint['mqttPort']}"
    extra = {} if verify else {"fp_verify_connection": False}

    def hub(side: str, i: int) -> Path:
        return write_claim_hub(
            work / tag / f"{side}-{i:03d}",
            endpoint_url=endpoint,
            root_ca_path=Path(server.endpoint["rootCaPath"]),
            claim_certificate_pem=claim.certificate_pem,
            claim_private_key_pem=claim.private_key_pem,
            template_name=claim.template_name,
            serial=f"L{tag}-{side}-{i:03d}",
            certificate_method=method,
            extra_ro=extra,
        )

    # one more of each than measured: index n warms both paths (imports, first TLS context) unmeasured
    product_configs = [hub("p", i) for i in range(n + 1)]
    floor_configs = [hub("f", i) for i in range(n + 1)]

    def product(i: int) -> float:
        started = time.perf_counter()
        result = HubOnboarding(product_configs[i]).process_device()
        elapsed = time.perf_counter() - started
        assert result.state == "PROVISIONED"
        return elapsed

    def floor(i: int) -> float:
        started = time.perf_counter()
        raw_sdk.provision(floor_configs[i], csr="Csr" in method, verify=verify)
        return time.perf_counter() - started

    product(n), floor(n)
    p, f = _alternate(n, product, floor)
    return _summary(p, f)


def _jitr_floor(
    host: str, port: int, ca: bytes, cert: bytes, key: bytes, client_id: str, timeout: float = 60.0
) -> int:
    """What a user writes by hand: connect, and on refusal sleep with backoff and try again."""
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        attempt += 1
        try:
            client, stopped = raw_sdk.connect(host, port, cert, key, ca, client_id)
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(random.random() * min(30.0, 1.0 * 2.0 ** (attempt - 1)))
            continue
        raw_sdk.stop(client, stopped)
        return attempt


def jitr(server: ServerProcess, work: Path, n: int) -> dict[str, Any]:
    iot = server.client()
    device_ca = DeviceCA("Bench Device CA")
    ca_id = device_ca.register(iot)
    iot.create_policy(
        policyName="bench-jitr-device",
        policyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}],
            }
        ),
    )
    root_ca = Path(server.endpoint["rootCaPath"])
    host, port = server.endpoint["mqttHost"], int(server.endpoint["mqttPort"])
    activator = JitrActivator(
        iot,
        host=host,
        port=port,
        root_ca_pem=root_ca.read_bytes(),
        ca_certificate_id=ca_id,
        device_policy_name="bench-jitr-device",
        client_id="bench-jitr-activator",
    )
    activator.start()
    attempts: dict[str, list[int]] = {"product": [], "floor": []}
    try:

        def product(i: int) -> float:
            creds = device_ca.issue_device(f"jitr-p-{i:03d}")
            config = write_jitr_hub(
                work / "jitr" / f"p-{i:03d}",
                endpoint_url=f"{host}:{port}",
                root_ca_path=root_ca,
                device_certificate_pem=creds.certificate_pem,
                device_private_key_pem=creds.private_key_pem,
                serial=f"JP{i:03d}",
            )
            random.seed(i)
            started = time.perf_counter()
            result = HubOnboarding(config).process_device()
            elapsed = time.perf_counter() - started
            assert result.state == "PROVISIONED"
            return elapsed

        def floor(i: int) -> float:
            creds = device_ca.issue_device(f"jitr-f-{i:03d}")
            random.seed(i)
            started = time.perf_counter()
            attempts["floor"].append(
                _jitr_floor(
                    host,
                    port,
                    root_ca.read_bytes(),
                    creds.certificate_pem.encode(),
                    creds.private_key_pem.encode(),
                    f"jitr-f-{i:03d}",
                )
            )
            return time.perf_counter() - started

        p, f = _alternate(n, product, floor)
    finally:
        activator.stop()
    out = _summary(p, f)
    out["note"] = (
        "both sides sleep the same seeded backoff (U(0, 2^attempt) s) between refused connects, "
        "so the ratio compares the work, not the luck of the jitter"
    )
    out["floor_attempts_median"] = statistics.median(attempts["floor"]) if attempts["floor"] else None
    return out


def run(server: ServerProcess | None = None, n: int = N) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        work = Path(tmp)
        if server is None:
            with ServerProcess(work / "data") as own:
                return run(own, n)
        results: dict[str, Any] = {}
        for method in FP_METHODS:
            for verify in (True, False):
                key = f"{method}{'' if verify else ' (no verification connect)'}"
                results[key] = fleet_provisioning(server, work, method, verify, n)
                print(
                    f"latency: {key}: product {results[key]['product_median_ms']} ms, floor "
                    f"{results[key]['floor_median_ms']} ms, ratio {results[key]['ratio_median']}",
                    file=sys.stderr,
                    flush=True,
                )
        results["JITR"] = jitr(server, work, n)
        print(f"latency: JITR: ratio {results['JITR']['ratio_median']}", file=sys.stderr, flush=True)
        return results


if __name__ == "__main__":
    out = run(n=int(sys.argv[1]) if len(sys.argv) > 1 else N)
    for v in out.values():
        v.pop("product_ms"), v.pop("floor_ms")
    print(json.dumps(out, indent=2))
