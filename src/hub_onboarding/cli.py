"""`hub-onboard`: provision, status, reset, demo.

    hub-onboard provision --config PATH [--json] [-v] [--lock-wait S]
    hub-onboard status    --config PATH [--json]
    hub-onboard reset     --config PATH --yes [--json]
    hub-onboard demo [--keep DIR] [--plain-iot] [--pkcs11]
    hub-onboard fleet-sim [--hubs N] [--concurrency C] [--method M] [--config CLOUD.json | --plain-iot]
                          [--json] [--pkcs11]

Exit codes: 0 success (provision: the hub is PROVISIONED, including when it already was), 1 unexpected
error, 2 usage error, 3 config, 4 credentials, 5 storage, 6 busy (another onboarding holds the lock),
10 provisioning, 11 MQTT connection, 12 identity (rejected by the service), 13 subscribe timeout,
14 publish timeout. See errors.py for the tree.

`provision` shows its steps: on a terminal one numbered line each; with `--json`, each step as one JSON
line on stderr ({"step": "CERTIFICATE_ISSUED", "message": ...}, the names of onboarding.OnboardingStep)
while stdout keeps the one result document. A supervisor (and the power-cut tests) follow those lines.

Imports are lazy: the package, cryptography and awscrt load only when a subcommand needs them, so the
command starts fast on a small hub; the tools (demo, fleet-sim) load only for their own subcommands.
This module is the only place that configures logging.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The exit codes live with the exception tree (errors.py is tiny: importing it costs nothing).
from hub_onboarding.errors import EXIT_USAGE

if TYPE_CHECKING:
    from hub_onboarding.errors import OnboardingError
    from hub_onboarding.onboarding import StepEvent


def _seconds(text: str) -> float:
    """A finite, non-negative number of seconds (argparse type): -1 or nan would make no sense of a wait."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, not {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hub-onboard",
        description="Onboard a smart-home hub to AWS IoT Core (fleet provisioning or JITR), as configured "
        "in iotmi_config.json.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("provision", help="onboard the hub unless it already is (exit 0 when PROVISIONED)")
    p.add_argument("--config", required=True, metavar="PATH", help="path of iotmi_config.json")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the result (or the error) as JSON on stdout, and each step as a JSON line on stderr",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="log to stderr (-vv: debug)")
    p.add_argument(
        "--lock-wait",
        type=_seconds,
        default=600.0,
        metavar="SECONDS",
        help="how long to wait for another onboarding of the same config (default 600)",
    )

    s = sub.add_parser("status", help="show the provisioning state of the hub")
    s.add_argument("--config", required=True, metavar="PATH", help="path of iotmi_config.json")
    s.add_argument("--json", action="store_true", help="print JSON")

    r = sub.add_parser(
        "reset", help="local offboarding: rw back to NOT_PROVISIONED, delete onboarding's files"
    )
    r.add_argument("--config", required=True, metavar="PATH", help="path of iotmi_config.json")
    r.add_argument("--yes", action="store_true", help="really reset (required)")
    r.add_argument("--json", action="store_true", help="print JSON")

    d = sub.add_parser("demo", help="run iot-core-local in a temporary folder and onboard a simulated hub")
    d.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="keep the hub's config and credentials and the stand-in's data in DIR (new or empty)",
    )
    d.add_argument(
        "--plain-iot",
        action="store_true",
        help="the plain AWS IoT story (template, policies, claim) instead of managed integrations'",
    )
    d.add_argument(
        "--pkcs11",
        action="store_true",
        help="keep the hub's claim and permanent keys in a SoftHSM2 token (PKCS#11) instead of files",
    )
    # Its options live in tools.fleet_sim.build_parser(); main() hands the rest of the line over unparsed.
    sub.add_parser(
        "fleet-sim",
        add_help=False,
        help="rehearse a factory line: N simulated hubs onboarding at once (fleet-sim --help)",
    )
    return parser


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    if verbose == 0:
        # Without -v only warnings show: one short line each, as the error line reads, not a log record.
        handler.setFormatter(_ShortFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("hub_onboarding")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class _ShortFormatter(logging.Formatter):
    """`hub-onboard: warning: <message>`."""

    def format(self, record: logging.LogRecord) -> str:
        return f"hub-onboard: {record.levelname.lower()}: {record.getMessage()}"


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _fail(exc: OnboardingError, as_json: bool) -> int:
    if as_json:
        _print_json({"ok": False, "error": exc.to_dict()})
    print(f"hub-onboard: error: {exc.message}", file=sys.stderr)
    return exc.exit_code


def _step_display(as_json: bool) -> Callable[[StepEvent], None] | None:
    """Where provision's steps go: JSON lines on stderr, numbered lines on a terminal, or nowhere."""
    if as_json:

        def json_line(event: StepEvent) -> None:
            print(json.dumps(event.to_dict(), sort_keys=True), file=sys.stderr, flush=True)

        return json_line
    if not sys.stderr.isatty():
        return None
    counter = itertools.count(1)

    def numbered(event: StepEvent) -> None:
        if event.is_progress:  # retries and other notes reach a terminal as log warnings (-v)
            print(f"[{next(counter)}] {event.message}", file=sys.stderr, flush=True)

    return numbered


def _provision(args: argparse.Namespace) -> int:
    from hub_onboarding.onboarding import HubOnboarding, Timeouts

    hub = HubOnboarding(args.config, timeouts=Timeouts(lock=args.lock_wait), on_step=_step_display(args.json))
    result = hub.process_device()
    if args.json:
        _print_json({"ok": True, **result.to_dict()})
    else:
        extra = f" managed_thing_id={result.managed_thing_id}" if result.managed_thing_id else ""
        done = "newly provisioned" if result.changed else "already provisioned"
        print(f"{result.state} ({done}) client_id={result.client_id}{extra}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from hub_onboarding.onboarding import HubOnboarding

    info = HubOnboarding(args.config).status()
    if args.json:
        _print_json(info)
        return 0
    shown = dict(info)
    if "configured_method" in info:
        # The method a provision would use, and why it is not the one the config names.
        shown["method"] = f"{info['method']} ({info['method_note']})"
    for key in (
        "config_path",
        "state",
        "method",
        "client_id",
        "managed_thing_id",
        "certificate_path",
        "private_key_path",
        "progress",
    ):
        print(f"{key}: {shown.get(key) if shown.get(key) is not None else '-'}")
    return 0


def _reset(args: argparse.Namespace) -> int:
    if not args.yes:
        print(
            "hub-onboard: reset deletes this hub's permanent credentials and marks it NOT_PROVISIONED; "
            "run again with --yes to do it",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from hub_onboarding.onboarding import HubOnboarding

    hub = HubOnboarding(args.config)
    deleted = [str(p) for p in hub.reset()] + hub.deleted_token_objects  # files, then token objects (URIs)
    if args.json:
        _print_json({"ok": True, "state": "NOT_PROVISIONED", "deleted": deleted})
    else:
        print("NOT_PROVISIONED" + "".join(f"\ndeleted {p}" for p in deleted))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (never raises for an expected failure)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fleet-sim"]:
        from hub_onboarding.tools.fleet_sim import main as fleet_sim_main

        return fleet_sim_main(argv[1:])
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command == "demo":
        from hub_onboarding.tools.demo import run_demo

        return run_demo(keep=args.keep, plain_iot=args.plain_iot, pkcs11=args.pkcs11)
    _configure_logging(getattr(args, "verbose", 0))
    from hub_onboarding.errors import OnboardingError

    handlers = {"provision": _provision, "status": _status, "reset": _reset}
    try:
        return handlers[args.command](args)
    except OnboardingError as exc:
        return _fail(exc, getattr(args, "json", False))
    except KeyboardInterrupt:
        print("hub-onboard: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
