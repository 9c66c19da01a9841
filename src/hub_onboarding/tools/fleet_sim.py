"""`hub-onboard fleet-sim`: rehearse a factory line, N simulated hubs onboarding against one endpoint.

    hub-onboard fleet-sim [--hubs N] [--concurrency C]
                          [--method CreateCertificateFromCsr|CreateKeysAndCertificate]
                          [--config CLOUD.json | --plain-iot] [--json] [--pkcs11]

Each simulated hub is what the line puts on a real one: its own folder, claim credentials, serial number
and `iotmi_config.json` (`tools.factory.write_claim_hub`). Hubs onboard through the product itself
(`HubOnboarding(config).process_device()`), C at a time on threads: awscrt does the network I/O in C, so
threads are enough to keep C onboardings in flight.

With no `--config`, iot-core-local starts embedded in a temporary folder with a managed integrations
provisioning profile (its claim certificate; its name is the hubs' fp_template_name), and each hub is
pre-associated before it onboards, as a factory line does: a CONTROLLER managed thing with its serial and
UPC, PRE_ASSOCIATED (`pre_associate`, not timed). `--plain-iot` uses a plain IoT template, policies and
claim instead (recipes.claims), with nothing to pre-associate. With `--config CLOUD.json` the hubs target
that endpoint, for example real AWS (format in docs/performance.md); its optional `managed_integrations`
object (`region`, and `endpoint_url` for a stand-in) makes fleet-sim pre-associate the hubs there too:

    {"endpoint_url": "abc-ats.iot.eu-west-1.amazonaws.com:8883", "root_ca_path": "AmazonRootCA1.pem",
     "claim_certificate_path": "claim.pem.crt", "claim_private_key_path": "claim.pem.key",
     "template_name": "HubTemplate", "managed_integrations": {"region": "eu-west-1"}}

With `--pkcs11` each hub keeps its keys in a SoftHSM2 token of its own (one token per hub, all in one
SoftHSM2 folder under the work folder): the factory imports the claim key into the token, and onboarding
makes the permanent key there (`tools.softhsm`, `tools.factory`).

Exit codes: 0 every hub onboarded, 1 at least one failed (or an unexpected error), 2 usage, 3 the cloud
config is invalid, or the embedded iot-core-local lacks the [server] extra. The engine (`write_hubs`,
`onboard_fleet`) is importable; the benchmark uses it. Retries are counted from the hubs' step events
(OnboardingStep.RETRY). Only the standard library and
hub_onboarding.errors (the exit codes) are imported at module level.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hub_onboarding.errors import EXIT_OK, EXIT_USAGE, ConfigError

if TYPE_CHECKING:
    from hub_onboarding.config import Pkcs11Config
    from hub_onboarding.onboarding import StepEvent

EXIT_FAILED = 1  # at least one hub failed (fleet-sim's own meaning of 1)
EXIT_CONFIG = ConfigError.exit_code

METHODS = ("CreateCertificateFromCsr", "CreateKeysAndCertificate")
DEFAULT_TEMPLATE = "FleetSimTemplate"


class CloudConfigError(ValueError):
    """The `--config` file is missing, is not JSON, or lacks a key; the message names it."""


@dataclass(frozen=True)
class Target:
    """Where the simulated hubs onboard and with which claim: what a factory line knows."""

    endpoint_url: str
    root_ca_path: Path
    claim_certificate_pem: str
    claim_private_key_pem: str = field(repr=False)
    template_name: str
    template_parameters: dict[str, str] = field(default_factory=dict)
    # Where the hubs are pre-associated: {"region": ..., "endpoint_url": ...}; None: nowhere (plain IoT,
    # or the cloud's owner did it)
    managed_integrations: dict[str, str] | None = None

    @classmethod
    def from_file(cls, path: Path) -> Target:
        """Read a cloud config (see the module docstring); relative paths are relative to the file."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CloudConfigError(f"{path}: does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CloudConfigError(f"{path}: cannot be read as JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CloudConfigError(f"{path}: expected a JSON object")
        base = path.absolute().parent

        def text(key: str, required: bool = True) -> str | None:
            value = data.get(key)
            if value is None and not required:
                return None
            if not isinstance(value, str) or not value.strip():
                raise CloudConfigError(f"{path}: {key!r} is missing or not a non-empty string")
            return value

        def file(key: str, required: bool = True) -> Path | None:
            value = text(key, required)
            if value is None:
                return None
            p = Path(value)
            p = p if p.is_absolute() else base / p
            if not p.is_file():
                raise CloudConfigError(f"{path}: {key!r} names {p}, which is not a file")
            return p

        cert, key = file("claim_certificate_path"), file("claim_private_key_path")
        root_ca = file("root_ca_path")
        assert cert is not None
        assert key is not None
        assert root_ca is not None
        params = data.get("template_parameters") or {}
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            raise CloudConfigError(f"{path}: 'template_parameters' must be an object of strings")
        managed = data.get("managed_integrations")
        if managed is not None and (
            not isinstance(managed, dict)
            or not set(managed) <= {"region", "endpoint_url"}
            or not all(isinstance(v, str) and v for v in managed.values())
        ):
            raise CloudConfigError(
                f"{path}: 'managed_integrations' must be an object of the strings 'region' and 'endpoint_url'"
            )
        return cls(
            endpoint_url=str(text("endpoint_url")),
            root_ca_path=root_ca,
            claim_certificate_pem=cert.read_text(encoding="utf-8"),
            claim_private_key_pem=key.read_text(encoding="utf-8"),
            template_name=str(text("template_name")),
            template_parameters=dict(params),
            managed_integrations=managed,
        )

    def managed_integrations_client(self) -> Any:
        """A boto3 client of `iot-managed-integrations` where the hubs are pre-associated, or None."""
        if self.managed_integrations is None:
            return None
        import boto3

        session = boto3.session.Session()
        endpoint_url = self.managed_integrations.get("endpoint_url")
        credentials: dict[str, str] = {}
        if endpoint_url is not None and session.get_credentials() is None:
            # A stand-in checks no signature: without credentials of your own, any will do there.
            credentials = {"aws_access_key_id": "fleet-sim", "aws_secret_access_key": "fleet-sim"}
        return session.client(
            "iot-managed-integrations",  # type: ignore[call-overload]
            region_name=self.managed_integrations.get("region"),
            endpoint_url=endpoint_url,
            **credentials,
        )


@dataclass(frozen=True)
class HubOutcome:
    """One simulated hub: did it end PROVISIONED, how long its process_device() took, and why not."""

    serial: str
    ok: bool
    seconds: float
    error: str | None = None
    exit_code: int = 0


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of an already sorted sequence; 0 when empty."""
    if not sorted_values:
        return 0.0
    rank = (len(sorted_values) - 1) * q / 100.0
    lo = int(rank)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (rank - lo)


@dataclass(frozen=True)
class FleetReport:
    hubs: int
    concurrency: int
    method: str
    onboarded: int
    failed: int
    wall_s: float
    latencies_s: list[float] = field(repr=False)
    errors: dict[str, int] = field(default_factory=dict)
    retries: int = 0

    @property
    def per_second(self) -> float:
        return self.onboarded / self.wall_s if self.wall_s > 0 else 0.0

    def quantile_ms(self, q: float) -> float:
        return percentile(sorted(self.latencies_s), q) * 1000.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "hubs": self.hubs,
            "concurrency": self.concurrency,
            "method": self.method,
            "onboarded": self.onboarded,
            "failed": self.failed,
            "wall_s": round(self.wall_s, 3),
            "provisionings_per_s": round(self.per_second, 1),
            "latency_p50_ms": round(self.quantile_ms(50), 1),
            "latency_p95_ms": round(self.quantile_ms(95), 1),
            "latency_p99_ms": round(self.quantile_ms(99), 1),
            "retries": self.retries,
            "errors": self.errors,
        }


def write_hubs(
    target: Target,
    work_dir: Path,
    count: int,
    *,
    method: str = METHODS[0],
    serial_prefix: str | None = None,
    extra_ro: dict[str, Any] | None = None,
    tokens: Sequence[Pkcs11Config] | None = None,
) -> list[Path]:
    """Write `count` factory-fresh hubs under `work_dir` (hub-000000, ...); return their config paths.

    `tokens`: one PKCS#11 token per hub, which then holds its claim key and gets its permanent key."""
    from hub_onboarding.tools.factory import write_claim_hub

    prefix = serial_prefix or f"SIM-{uuid.uuid4().hex[:8]}"
    ro: dict[str, Any] = dict(extra_ro or {})
    if target.template_parameters:
        ro.setdefault("fp_template_parameters", dict(target.template_parameters))
    width = max(6, len(str(count - 1)))
    return [
        write_claim_hub(
            work_dir / f"hub-{i:0{width}d}",
            endpoint_url=target.endpoint_url,
            root_ca_path=target.root_ca_path,
            claim_certificate_pem=target.claim_certificate_pem,
            claim_private_key_pem=target.claim_private_key_pem,
            template_name=target.template_name,
            serial=f"{prefix}-{i:0{width}d}",
            certificate_method=method,
            extra_ro=ro,
            token=tokens[i] if tokens is not None else None,
        )
        for i in range(count)
    ]


def make_hub_tokens(folder: Path, count: int) -> list[Pkcs11Config]:
    """`count` SoftHSM2 tokens (hub-000000, ...) in one folder, seen by this process from now on."""
    from hub_onboarding.tools import softhsm

    width = max(6, len(str(count - 1)))
    made = [softhsm.make_token(folder, f"hub-{i:0{width}d}") for i in range(count)]
    softhsm.activate(made[0])
    return [token.config() for token in made]


class RetryCounter:
    """Counts the hubs' RETRY step events (a retried hub still counts as onboarded); any thread."""

    def __init__(self) -> None:
        from hub_onboarding.onboarding import OnboardingStep

        self._retry = OnboardingStep.RETRY
        self.count = 0
        self._guard = threading.Lock()

    def __call__(self, event: StepEvent) -> None:
        if event.step is self._retry:
            with self._guard:
                self.count += 1


def _onboard_one(config_path: Path, retry_timeout: float | None, retries: RetryCounter) -> HubOutcome:
    from hub_onboarding.errors import OnboardingError
    from hub_onboarding.onboarding import HubOnboarding, Timeouts

    serial = config_path.parent.name
    started = time.perf_counter()
    try:
        hub = HubOnboarding(config_path, timeouts=Timeouts(retry=retry_timeout), on_step=retries)
        result = hub.process_device()
    except OnboardingError as exc:
        error = f"{type(exc).__name__}: {exc.message}"
        return HubOutcome(serial, False, time.perf_counter() - started, error, exc.exit_code)
    except Exception as exc:  # a simulator counts every failure; it does not stop the line
        return HubOutcome(serial, False, time.perf_counter() - started, f"{type(exc).__name__}: {exc}", 1)
    seconds = time.perf_counter() - started
    if result.state != "PROVISIONED":
        return HubOutcome(serial, False, seconds, f"ended in state {result.state}", 1)
    return HubOutcome(serial, True, seconds)


@contextlib.contextmanager
def skip_system_trust_store(root_ca_path: Path | None) -> Iterator[bool]:
    """While open, awscrt's per-connection TLS set-up skips the system trust store it would load and drop.

    Every awscrt `ClientTlsContext` starts with `s2n_config_new()`, which parses the whole system CA
    bundle (about 140 certificates: ~5 ms of CPU with the GIL held), and then replaces it with
    `iot_root_ca_path` when the config names one, as every simulated hub's does. Pointing SSL_CERT_FILE
    at that same root CA makes the wasted load parse one certificate instead (~0.9 ms per context).
    Trust is unchanged: awscrt still trusts exactly `iot_root_ca_path`. Python's own `ssl` default
    contexts in this process see the override too, which is why it is undone on exit; yields whether
    it was applied. The hub itself cannot do this without changing its process environment: awscrt has
    no option to skip that load (the hub makes one context per set of credentials instead, so only
    retries are spared, and every simulated hub has credentials of its own).
    """
    if root_ca_path is None:
        yield False
        return
    saved = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(root_ca_path)
    try:
        yield True
    finally:
        if saved is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = saved


def onboard_fleet(
    configs: Sequence[Path],
    concurrency: int,
    *,
    method: str = METHODS[0],
    retry_timeout: float | None = None,
    on_result: Callable[[HubOutcome], None] | None = None,
) -> FleetReport:
    """Onboard every hub, at most `concurrency` at once; never raises for a hub that fails."""
    # Import the product once before the clock starts (a factory line's hubs each pay it once, on boot).
    for module in (
        "awsiot.mqtt5_client_builder",
        "hub_onboarding.device_provisioner",
        "hub_onboarding.onboarding",
    ):
        importlib.import_module(module)

    counter = RetryCounter()
    outcomes: list[HubOutcome] = []
    lock = threading.Lock()

    def one(path: Path) -> None:
        outcome = _onboard_one(path, retry_timeout, counter)
        with lock:
            outcomes.append(outcome)
        if on_result is not None:
            on_result(outcome)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="hub") as pool:
        for future in [pool.submit(one, p) for p in configs]:
            future.result()
    wall = time.perf_counter() - started
    errors = Counter(o.error or "" for o in outcomes if not o.ok)
    return FleetReport(
        hubs=len(configs),
        concurrency=concurrency,
        method=method,
        onboarded=sum(o.ok for o in outcomes),
        failed=sum(not o.ok for o in outcomes),
        wall_s=wall,
        latencies_s=[o.seconds for o in outcomes if o.ok],
        errors=dict(errors.most_common(10)),
        retries=counter.count,
    )


def pre_associate(managed_integrations: Any, configs: Sequence[Path]) -> int:
    """Give each hub its managed thing before it first powers on, as a factory line does (CONTROLLER,
    `SN:<serial>;UPC:<upc>` from its config, PRE_ASSOCIATED); return how many were created (a hub that
    has one already keeps it)."""
    from iot_core_local.recipes.managed_integrations import Hub, ensure_managed_thing

    created = 0
    for path in configs:
        ro = json.loads(path.read_text(encoding="utf-8"))["ro"]
        created += ensure_managed_thing(managed_integrations, Hub(ro["SN"], upc=ro["UPC"]))[1]
    return created


@contextlib.contextmanager
def embedded_cloud(
    data_dir: Path, template_name: str = DEFAULT_TEMPLATE, *, plain_iot: bool = False
) -> Iterator[tuple[Target, Any]]:
    """Start iot-core-local in `data_dir` and create the claim through boto3: a managed integrations
    provisioning profile named `template_name` (the target's `managed_integrations` names the stand-in,
    so the hubs are pre-associated there), or with `plain_iot` a plain IoT template. Yield (target, the
    boto3 IoT client)."""
    from iot_core_local.server import LocalIotCore

    with LocalIotCore(data_dir) as core:
        iot = core.client()
        target = _target_of(core, template_name, plain_iot)
        yield target, iot


def _target_of(core: Any, template_name: str, plain_iot: bool) -> Target:
    endpoint = core.endpoint
    if plain_iot:
        from iot_core_local.recipes.claims import set_up_fleet_provisioning

        claim = set_up_fleet_provisioning(core.client(), template_name)
        certificate_pem, private_key_pem, managed = claim.certificate_pem, claim.private_key_pem, None
    else:
        from iot_core_local.recipes.managed_integrations import set_up_managed_integrations

        setup = set_up_managed_integrations(
            endpoint.client(core.region, service="iot-managed-integrations"), template_name, []
        )
        assert setup.claim_private_key_pem is not None  # a new stand-in: the profile is new
        certificate_pem, private_key_pem = setup.claim_certificate_pem, setup.claim_private_key_pem
        managed = {"region": core.region, "endpoint_url": endpoint.api_url}
    return Target(
        endpoint_url=endpoint.mqtt_address,
        root_ca_path=endpoint.root_ca_path,
        claim_certificate_pem=certificate_pem,
        claim_private_key_pem=private_key_pem,
        template_name=template_name,
        managed_integrations=managed,
    )


# ------------------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hub-onboard fleet-sim",
        description="Rehearse a factory line: N simulated hubs, each with its own config folder and "
        "serial, onboard through hub-onboarding with bounded concurrency. Without --config, "
        "iot-core-local runs embedded in a temporary folder.",
    )
    parser.add_argument("--hubs", type=int, default=100, metavar="N", help="number of hubs (default 100)")
    parser.add_argument(
        "--concurrency", type=int, default=10, metavar="C", help="hubs onboarding at once (default 10)"
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default=METHODS[0],
        help="certificate method (default CreateCertificateFromCsr)",
    )
    # --plain-iot chooses what the embedded cloud sets up: with --config there is none (exit 2, argparse).
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--config",
        type=Path,
        metavar="CLOUD.json",
        help="target this endpoint and claim instead of an embedded iot-core-local (see docs/performance.md)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    target.add_argument(
        "--plain-iot",
        action="store_true",
        help="embedded cloud: a plain IoT template and claim, no managed things to pre-associate",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        metavar="DIR",
        help="write the hub folders here and keep them (default: a temporary folder)",
    )
    parser.add_argument("--serial-prefix", metavar="TEXT", help="serials are TEXT-000000... (default random)")
    parser.add_argument(
        "--retry-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="each hub's retry budget (default 60; a real hub uses 300)",
    )
    parser.add_argument(
        "--pkcs11",
        action="store_true",
        help="each hub keeps its claim and permanent keys in a SoftHSM2 token of its own",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the verification connect with the new certificate (fp_verify_connection)",
    )
    return parser


class _Display:
    """A rich progress bar on a terminal; nothing otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._progress: Any = None
        self._task: Any = None
        self._failed = 0
        if not enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        except ImportError:  # rich is in the [bench] extra; without it, no bar
            return
        self._progress = Progress(
            TextColumn("onboarding"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._progress.add_task("hubs", total=total, failed="")

    def __enter__(self) -> _Display:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, outcome: HubOutcome) -> None:
        if self._progress is None:
            return
        if not outcome.ok:
            self._failed += 1
        self._progress.update(
            self._task, advance=1, failed=f"[red]{self._failed} failed[/red]" if self._failed else ""
        )


def _print_summary(report: FleetReport, endpoint: str, pre_associated: int) -> None:
    d = report.to_dict()
    rows = [
        ("endpoint", endpoint),
        ("pre-associated", str(pre_associated)),
        ("method", report.method),
        ("hubs / concurrency", f"{report.hubs} / {report.concurrency}"),
        ("onboarded", str(report.onboarded)),
        ("failed", str(report.failed)),
        ("wall time", f"{d['wall_s']:.2f} s"),
        ("provisionings/s", f"{d['provisionings_per_s']:.1f}"),
        ("p50", f"{d['latency_p50_ms']:.0f} ms"),
        ("p95", f"{d['latency_p95_ms']:.0f} ms"),
        ("p99", f"{d['latency_p99_ms']:.0f} ms"),
        ("retries", str(report.retries)),
    ]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
    else:
        table = Table(title="fleet-sim", show_header=False)
        table.add_column(style="bold")
        table.add_column(justify="right")
        for k, v in rows:
            table.add_row(k, v)
        Console().print(table)
    for error, count in report.errors.items():
        print(f"{count} x {error}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.hubs < 1 or args.concurrency < 1:
        print("hub-onboard fleet-sim: --hubs and --concurrency must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    logging.getLogger("hub_onboarding").setLevel(logging.ERROR)  # per-hub warnings would flood a line
    extra_ro = {"fp_verify_connection": False} if args.no_verify else None
    if args.config is None:  # the embedded stand-in needs the [server] extra: say so before writing anything
        from iot_core_local.extra import EXIT_MISSING_EXTRA, missing_server_extra

        problem = missing_server_extra("hub-onboard fleet-sim", alternative="pass --config CLOUD.json")
        if problem is not None:
            print(problem, file=sys.stderr)
            return EXIT_MISSING_EXTRA
    if args.pkcs11:  # the tokens need SoftHSM2 and python-pkcs11: say so before writing anything
        from hub_onboarding.tools.softhsm import missing_softhsm

        if (problem := missing_softhsm()) is not None:
            print(f"hub-onboard fleet-sim --pkcs11: {problem}", file=sys.stderr)
            return EXIT_CONFIG

    with contextlib.ExitStack() as stack:
        if args.work_dir is not None:
            # Absolute: each hub's config names its claim files, and a hub reads relative paths from its
            # config's own folder, where a relative DIR would be doubled.
            work = args.work_dir.resolve()
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fleet-sim-")))
        if args.config is not None:
            try:
                target = Target.from_file(args.config)
            except CloudConfigError as exc:
                print(f"hub-onboard fleet-sim: {exc}", file=sys.stderr)
                return EXIT_CONFIG
        else:
            target, _ = stack.enter_context(embedded_cloud(work / "cloud", plain_iot=args.plain_iot))
        configs = write_hubs(
            target,
            work / "hubs",
            args.hubs,
            method=args.method,
            serial_prefix=args.serial_prefix,
            extra_ro=extra_ro,
            tokens=make_hub_tokens(work / "softhsm", args.hubs) if args.pkcs11 else None,
        )
        managed_integrations = target.managed_integrations_client()
        pre_associated = 0 if managed_integrations is None else pre_associate(managed_integrations, configs)
        display = _Display(args.hubs, enabled=not args.json and sys.stderr.isatty())
        with skip_system_trust_store(target.root_ca_path), display:
            report = onboard_fleet(
                configs,
                args.concurrency,
                method=args.method,
                retry_timeout=args.retry_timeout,
                on_result=display.advance,
            )
    if args.json:
        summary = {"endpoint": target.endpoint_url, "pre_associated": pre_associated, **report.to_dict()}
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(report, target.endpoint_url, pre_associated)
    return EXIT_OK if report.failed == 0 else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
