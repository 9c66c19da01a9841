"""The [server] extra: what the stand-in needs beyond a hub's own dependencies, and the line naming it.

A hub image installs `hub-onboarding` without extras (awsiotsdk, awscrt, cryptography: all the hub needs).
The stand-in (`iot-core-local serve`) and the tools that embed it (`hub-onboard demo`, `hub-onboard
fleet-sim`) need the [server] extra as well. Each of them asks `missing_server_extra` first, before it
starts or writes anything, and without the extra prints that one line and exits `EXIT_MISSING_EXTRA`
instead of ending in a ModuleNotFoundError traceback halfway through starting.

Standard library only: this module has to import when the extra is missing.
"""

from __future__ import annotations

import importlib

INSTALL_COMMAND = "pip install 'hub-onboarding[server]'"
# The top-level modules of pyproject's [server] extra (its distributions carry the same names).
SERVER_MODULES = ("mqtt5", "botocore", "boto3", "cbor2")
# Exit code of a command that cannot run without the extra: "cannot start", as for iot-core-local serve.
EXIT_MISSING_EXTRA = 3


def missing_server_extra(command: str, alternative: str | None = None) -> str | None:
    """The one line to print when a module of the [server] extra cannot be imported; None when all can.

    The modules are imported, not only looked up, so a broken installation is caught here too. They are
    the ones the command loads a moment later anyway.
    """
    for name in SERVER_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            fix = INSTALL_COMMAND if alternative is None else f"{INSTALL_COMMAND}, or {alternative}"
            return f"{command}: needs the [server] extra (cannot import {name}): {fix}"
    return None
