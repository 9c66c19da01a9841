"""SoftHSM2 tokens for the demo, fleet-sim, the benchmarks and the tests: a PKCS#11 token in a folder.

`make_token(folder, label)` writes `softhsm2.conf` (its token store inside `folder`), initialises a token
with a random user PIN and SO PIN (`softhsm2-util --init-token --free`) and writes the user PIN to
`folder/<label>.pin` (0600). `activate(token)` points this process's SoftHSM2 at that folder
(SOFTHSM2_CONF) and has python-pkcs11 read it again, so one process can use one folder after another.
A real hub's token comes from its vendor; none of this runs on one.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hub_onboarding import config as cfgmod
from hub_onboarding.config import Pkcs11Config, TokenKeyType

CONF_ENV = "SOFTHSM2_CONF"
# Where distributions install the SoftHSM2 module (Debian/Ubuntu, Fedora/RHEL, Homebrew, FreeBSD).
MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
INSTALL_HINT = "SoftHSM2 is required: run 'sudo apt-get install -y softhsm2' (or your system's equivalent)"


def find_module() -> str | None:
    """The SoftHSM2 PKCS#11 module of this system, or None."""
    return next((p for p in MODULE_CANDIDATES if os.path.isfile(p)), None)


def missing_softhsm() -> str | None:
    """The one line to print when SoftHSM2 or python-pkcs11 is missing, else None."""
    if shutil.which("softhsm2-util") is None or find_module() is None:
        return INSTALL_HINT
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        return "python-pkcs11 is required: pip install 'hub-onboarding[pkcs11]'"
    return None


@dataclass(frozen=True)
class SoftHsmToken:
    """A token in `folder`: its SoftHSM2 config, the module, its label and the file holding its user PIN."""

    folder: Path
    conf: Path
    module_path: str
    label: str
    pin_path: Path

    def env(self) -> dict[str, str]:
        """The environment a process needs to see this token."""
        return {CONF_ENV: str(self.conf)}

    def config(self, key_type: TokenKeyType = TokenKeyType.EC_P256) -> Pkcs11Config:
        return Pkcs11Config(self.module_path, self.label, str(self.pin_path), key_type)

    def ro(self, key_type: TokenKeyType = TokenKeyType.EC_P256) -> dict[str, Any]:
        """The ro keys that name this token in iotmi_config.json."""
        return {
            cfgmod.PKCS11_MODULE_PATH: self.module_path,
            cfgmod.PKCS11_TOKEN_LABEL: self.label,
            cfgmod.PKCS11_PIN_PATH: str(self.pin_path),
            cfgmod.PKCS11_KEY_TYPE: key_type.value,
        }


def make_token(folder: Path, label: str = "hub") -> SoftHsmToken:
    """Initialise a fresh SoftHSM2 token labelled `label` whose store is inside `folder` (made 0700).

    Several tokens may share a folder (one SoftHSM2 config, one PIN file per label): fleet-sim gives
    each simulated hub a token of its own in one folder."""
    module = find_module()
    if module is None:
        raise RuntimeError(INSTALL_HINT)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    tokens = folder / "tokens"
    tokens.mkdir(mode=0o700, exist_ok=True)
    conf = folder / "softhsm2.conf"
    if not conf.exists():
        conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n",
            encoding="utf-8",
        )
    pin, so_pin = secrets.token_hex(8), secrets.token_hex(8)
    pin_path = folder / f"{label}.pin"
    fd = os.open(pin_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(pin + "\n")
    # softhsm2-util takes the PINs as arguments only; this is a test token with throwaway PINs.
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin],
        check=True,
        capture_output=True,
        env={**os.environ, CONF_ENV: str(conf)},
        timeout=60,
    )
    return SoftHsmToken(folder, conf, module, label, pin_path)


def activate(token: SoftHsmToken) -> None:
    """Make this process's SoftHSM2 see `token`'s folder: SoftHSM2 reads SOFTHSM2_CONF when initialised,
    so the module is finalised and initialised again."""
    from hub_onboarding.pkcs11 import reload_library

    os.environ[CONF_ENV] = str(token.conf)
    reload_library(token.module_path)
