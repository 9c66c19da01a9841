"""`iot-core-local`: run the stand-in, and set it up the way a hub maker sets up its AWS account.

    iot-core-local serve       --data-dir DIR [...]           until SIGINT or SIGTERM
    iot-core-local setup-fleet --data-dir DIR --out FOLDER    template (guarded against takeovers by the
                                                               hosted HubTakeoverGuard hook), policies, a
                                                               claim pair in FOLDER
    iot-core-local setup-managed --data-dir DIR --out FOLDER --hub SERIAL:UPC ...
                                                   endpoint, profile, managed things, the claim in FOLDER
    iot-core-local setup-jitr  --data-dir DIR --out FOLDER    device CA, a DHA pair, then the activator

Exit codes: 0 stopped cleanly (serve) or set up; 1 the set-up failed (the service's own error, FOLDER not
writable, the activator cannot connect); 2 usage error; 3 could not start: data dir in use, Mosquitto
missing, port taken, no server running on DIR, a file in the way, or the [server] extra not installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from .addresses import is_wildcard
from .signals import TerminationSignals

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SERVER = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iot-core-local",
        description="A local stand-in for the parts of AWS IoT Core that onboarding touches.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the MQTT gateway, Mosquitto and the control plane")
    serve.add_argument(
        "--data-dir", type=Path, required=True, help="where all state lives (kept across restarts)"
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="MQTT address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)",
    )
    serve.add_argument(
        "--advertise",
        type=_advertised_host,
        metavar="NAME",
        help="the host name or IP address hubs on other machines reach MQTT by: written to endpoint.json "
        "and DescribeEndpoint, and named in the server certificate (default: --host, or 127.0.0.1 when "
        "--host listens everywhere)",
    )
    serve.add_argument(
        "--api-host",
        default="127.0.0.1",
        help="control plane address (default 127.0.0.1); on any other address every request must be "
        "SigV4-signed with the key pair in DATA_DIR/credentials",
    )
    serve.add_argument(
        "--require-signature",
        action="store_true",
        help="require SigV4 signatures with that key pair on loopback too",
    )
    serve.add_argument(
        "--mqtt-port", type=_port, default=8883, help="MQTT over TLS port (default 8883); 0 = any free port"
    )
    serve.add_argument(
        "--api-port",
        type=_port,
        default=8080,
        help="control plane HTTP port (default 8080); 0 = any free port",
    )
    serve.add_argument(
        "--alpn-port",
        type=_port,
        default=None,
        help="also serve MQTT over TLS here to clients offering ALPN x-amzn-mqtt-ca, as AWS IoT Core's "
        "port 443 does (0 = any free port; default: not served)",
    )
    serve.add_argument(
        "--token-ttl",
        type=float,
        default=3600.0,
        help="ownership token lifetime in seconds (default 3600, as AWS)",
    )
    serve.add_argument(
        "--faults",
        action="store_true",
        help="enable the fault switch: --fault and POST API_URL/_local/faults (off: that path is a 404)",
    )
    serve.add_argument(
        "--quota",
        action="append",
        default=[],
        type=_quota,
        metavar="SERVICE:OPERATION=RATE",
        help="change a rate (requests/s per account) from AWS's default, e.g. fleet:RegisterThing=50, "
        "iot:*=100 (repeatable; services fleet = the fleet provisioning MQTT API, iot = the control plane)",
    )
    serve.add_argument("--no-quotas", action="store_true", help="throttle nothing (load tests)")
    serve.add_argument(
        "--fault",
        action="append",
        default=[],
        type=_fault,
        metavar="SPEC",
        help="arm a fault, KIND[:OPERATION[:COUNT[:SECONDS]]], e.g. throttle:RegisterThing:2; "
        "kinds throttle, drop, ignore, delay, refuse; operations Connect, CreateKeysAndCertificate, "
        "CreateCertificateFromCsr, RegisterThing, any (repeatable; needs --faults)",
    )
    _limit_flags(serve)
    serve.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG")

    fleet = sub.add_parser(
        "setup-fleet",
        help="create a provisioning template, the hub and claim policies and a claim certificate "
        "(kept when they exist); write the claim pair into --out",
    )
    managed = sub.add_parser(
        "setup-managed",
        help="managed integrations: register the custom endpoint, create a provisioning profile and a "
        "PRE_ASSOCIATED managed thing per --hub (kept when they exist); write the claim pair into --out",
    )
    jitr = sub.add_parser(
        "setup-jitr",
        help="register a device CA (JITR), issue a device certificate into --out, then run the activator "
        "that activates new devices until Ctrl-C",
    )
    for command in (fleet, managed, jitr):
        command.add_argument(
            "--data-dir", type=Path, required=True, help="the data dir of a running iot-core-local serve"
        )
        command.add_argument(
            "--out", type=Path, required=True, help="the hub's folder: where the credentials go (0700)"
        )
        command.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG")
    fleet.add_argument("--template", default="HubTemplate", help="template name (default HubTemplate)")
    managed.add_argument(
        "--profile",
        default="HubProfile",
        help="provisioning profile name, the hubs' fp_template_name (default HubProfile)",
    )
    managed.add_argument(
        "--hub",
        action="append",
        default=[],
        type=_hub,
        metavar="SERIAL:CODE",
        help="a hub to pre-associate: its serial and its 12-digit UPC (or EAN-8/13) (repeatable)",
    )
    jitr.add_argument(
        "--common-name",
        default="hub-jitr-0001",
        help="the device certificate's CN, the hub's client id (default hub-jitr-0001)",
    )
    jitr.add_argument(
        "--ca-dir", type=Path, help="where the device CA's certificate and key live (default OUT/device-ca)"
    )
    return parser


# The limits `serve` lets a user tune: (flag, the field it sets, its default, metavar, what it bounds). The
# defaults are GatewayLimits' and BrokerLimits' own (a test keeps them equal); written out here because
# importing gateway/ needs the [server] extra, whose absence main() must still be able to report.
LIMIT_FLAGS = (
    ("max-connections", "gateway", 4000, "N", "device connections open at once; more are closed before TLS"),
    ("max-handshakes-per-address", "gateway", 64, "N", "TLS handshakes in flight from one non-loopback "
     "address"),
    ("max-keep-alive", "gateway", 1200, "SECONDS", "the longest keep-alive; 0 and longer ones get this as "
     "Server Keep Alive (AWS IoT Core's)"),
    ("max-queued-messages", "broker", 1000, "N", "QoS 1 messages Mosquitto queues per client beyond those in "
     "flight; later ones are dropped"),
    ("max-queued-bytes", "broker", 128 * 1024, "BYTES", "the same queue in bytes; it bounds the QoS 0 "
     "messages held for a client that does not read too"),
)  # fmt: skip


def _limit_flags(serve: argparse.ArgumentParser) -> None:
    limits = serve.add_argument_group("limits")
    for flag, _, default, metavar, what in LIMIT_FLAGS:
        limits.add_argument(
            f"--{flag}", type=_positive, default=default, metavar=metavar, help=f"{what} (default {default})"
        )


def _limits(args: argparse.Namespace, owner: str) -> dict[str, Any]:
    """The keyword arguments of GatewayLimits ("gateway") or BrokerLimits ("broker") the flags set."""
    return {
        flag.replace("-", "_"): getattr(args, flag.replace("-", "_"))
        for flag, of, *_ in LIMIT_FLAGS
        if of == owner
    }


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0-65535: {port}")
    return port


# A DNS name as TLS clients match it: dot-separated labels of letters, digits and inner hyphens.
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _advertised_host(text: str) -> str:
    if "%" in text:
        # A zone (fe80::1%eth0) means something only on the machine that names it: a hub cannot connect
        # by it, and no certificate can carry it (TLS checks the bare address).
        raise argparse.ArgumentTypeError(
            f"{text} has a zone (%...), which no hub can use: advertise a global or unique-local address, "
            "or a host name"
        )
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        if all(part.isdigit() for part in text.rstrip(".").split(".")):
            # "0", "10.1": resolvers read these as IPv4 addresses (inet_aton), "0" as 0.0.0.0
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither a host name nor a complete IP address (write all four parts)"
            ) from None
        labels = text.rstrip(".").split(".")
        if len(text) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
            raise argparse.ArgumentTypeError(
                f"not a host name or IP address: {text!r} (for example hub-lab.local or 192.168.1.20)"
            ) from None
        return text.rstrip(".").lower()
    if is_wildcard(str(address)):
        raise argparse.ArgumentTypeError(
            f"{text} is where a server listens, not an address hubs can reach; give this machine's "
            "name or address (for example 192.168.1.20)"
        )
    return str(address)


def _hub(text: str) -> Any:
    from .recipes.managed_integrations import Hub

    serial, _, code = text.rpartition(":")
    if not serial or not code.isdigit() or not 8 <= len(code) <= 13:
        raise argparse.ArgumentTypeError(
            f"not SERIAL:UPC (12 digits) or SERIAL:EAN (8 or 13 digits): {text!r}"
        )
    return Hub(serial, upc=code) if len(code) == 12 else Hub(serial, ean=code)


def _fault(text: str) -> str:
    from .faults import parse_spec

    try:
        parse_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _quota(text: str) -> tuple[str, float]:
    from .quotas import parse_quota

    try:
        return parse_quota(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "serve" and args.fault and not args.faults:
            parser.error("--fault arms the fault switch, which is off: add --faults")
        if args.command == "serve" and args.quota and args.no_quotas:
            parser.error("--quota and --no-quotas contradict each other: choose one")
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    from .extra import missing_server_extra

    problem = missing_server_extra("iot-core-local")
    if problem is not None:
        print(problem, file=sys.stderr)
        return EXIT_SERVER
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "serve":
        return _serve(args)
    return _set_up(args)


def _set_up(args: argparse.Namespace) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    from .customer_setup import SetupError, set_up_fleet, set_up_jitr, set_up_managed

    try:
        if args.command == "setup-fleet":
            set_up_fleet(args.data_dir, args.out, args.template)
        elif args.command == "setup-managed":
            set_up_managed(args.data_dir, args.out, args.profile, args.hub)
        else:
            set_up_jitr(args.data_dir, args.out, args.common_name, args.ca_dir)
    except SetupError as exc:
        print(f"iot-core-local {args.command}: {exc}", file=sys.stderr)
        return EXIT_SERVER
    except (ClientError, BotoCoreError) as exc:
        print(f"iot-core-local {args.command}: the service refused: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:  # HUB not writable, or the activator could not connect or subscribe
        print(f"iot-core-local {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    with TerminationSignals() as signals:  # from before the start: a SIGTERM meanwhile stops it at once
        return _serve_until(args, signals)


def _serve_until(args: argparse.Namespace, signals: TerminationSignals) -> int:
    if "%" in args.host and args.advertise is None:
        print(
            f"iot-core-local serve: --host {args.host} has a zone (%...), which hubs cannot be told: add "
            "--advertise with a global address or a host name hubs reach this machine by",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from .broker import BrokerLimits
    from .errors import PortUnavailable, ServerError
    from .gateway.limits import GatewayLimits
    from .quotas import Quotas
    from .server import LocalIotCore

    core = LocalIotCore(
        args.data_dir,
        gateway_limits=dataclasses.replace(GatewayLimits(), **_limits(args, "gateway")),
        broker_limits=dataclasses.replace(BrokerLimits(), **_limits(args, "broker")),
        host=args.host,
        advertise=args.advertise,
        mqtt_port=args.mqtt_port,
        api_port=args.api_port,
        alpn_port=args.alpn_port,
        token_ttl=args.token_ttl,
        faults=args.fault,
        api_host=args.api_host,
        require_signature=args.require_signature,
        faults_enabled=args.faults,
        # serve applies AWS's default rates (quotas.py names the source); --quota changes one
        quotas=None if args.no_quotas else Quotas().with_rates(dict(args.quota)),
    )
    try:
        endpoint = core.start()
    except PortUnavailable as exc:
        flag = {"mqtt": "--mqtt-port", "alpn": "--alpn-port"}.get(exc.service, "--api-port")
        print(
            f"iot-core-local: cannot start: {exc} ({flag}); stop that program or choose another {flag} "
            "(0: any free port)",
            file=sys.stderr,
        )
        return EXIT_SERVER
    except (ServerError, OSError) as exc:
        print(f"iot-core-local: cannot start: {exc}", file=sys.stderr)
        return EXIT_SERVER
    try:
        print(json.dumps(endpoint.to_json()), flush=True)
        # The path, never the secret: AWS_SHARED_CREDENTIALS_FILE=<it> lets the AWS CLI and boto3 sign.
        logging.getLogger("iot_core_local.server").info(
            "control plane key pair: %s (AWS_SHARED_CREDENTIALS_FILE=%s); signatures %s",
            endpoint.credentials_path,
            endpoint.credentials_path,
            "required" if core.signatures_required else "not checked (loopback)",
        )
        signals.wait()
    finally:
        core.stop()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
