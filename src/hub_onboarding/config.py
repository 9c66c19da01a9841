"""iotmi_config.json: key names, validation into typed sections, and updates that keep what they do not know.

Every key name lives here as a constant. The file has two sections: `ro` (factory / integrator) and `rw`
(written by the SDK at run time). `parse_config` validates everything onboarding needs before any network
traffic, one small parser per section of HubConfig (connection, fleet, JITR, files); each ConfigError
names the key ("ro.SN") and what is wrong with it.

Other hub processes read the same file, so every write re-reads it first, keeps every key it does not
know, and replaces it atomically keeping its mode, owner and group (`_files.replace_shared_file`).
"""

from __future__ import annotations

import enum
import errno
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hub_onboarding import _files
from hub_onboarding.errors import ConfigError, OnboardingError, StorageError

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = "/data/aws/iotmi/config/iotmi_config.json"

RO = "ro"
RW = "rw"

# ro keys documented by AWS
PROVISIONING_METHOD = "iot_provisioning_method"
CLAIM_CERT_PATH = "iot_claim_cert_path"
CLAIM_PK_PATH = "iot_claim_pk_path"
TEMPLATE_NAME = "fp_template_name"
ENDPOINT_KEYS = ("endpoint_url", "iot_endpoint_url", "sh_endpoint_url")  # first present wins
SERIAL_NUMBER = "SN"
UPC = "UPC"
KEEP_ALIVE = "mqtt_keep_alive_interval"  # section not documented: read from ro, then rw
# ro keys this project adds (all optional unless the method needs them)
ROOT_CA_PATH = "iot_root_ca_path"
DHA_CERT_PATH = "iot_dha_cert_path"
DHA_PK_PATH = "iot_dha_pk_path"
CERTIFICATE_METHOD = "fp_certificate_method"
TEMPLATE_PARAMETERS = "fp_template_parameters"
PERMANENT_CERT_DIR = "iot_permanent_cert_dir"
RETRY_TIMEOUT = "mqtt_retry_timeout_seconds"
CLIENT_ID_OVERRIDE = "client_id"  # in ro: JITR's client id instead of the DHA certificate's CN
SECURE_STORAGE_HANDLER = "secure_storage_handler"
VERIFY_CONNECTION = "fp_verify_connection"  # bool, default true: connect once with the new certificate
# The PKCS#11 token (hub_onboarding.pkcs11): set together, they put the hub's keys in the token
PKCS11_MODULE_PATH = "pkcs11_module_path"
PKCS11_TOKEN_LABEL = "pkcs11_token_label"  # noqa: S105 (a key name, not a secret)
PKCS11_PIN_PATH = "pkcs11_pin_path"  # a file holding the user PIN (never the PIN itself)
PKCS11_KEY_TYPE = "pkcs11_key_type"  # the permanent key made in the token for a CSR: EC_P256 or RSA_2048
PKCS11_KEYS = (PKCS11_MODULE_PATH, PKCS11_TOKEN_LABEL, PKCS11_PIN_PATH)
# rw keys
PROVISIONING_STATE = "iot_provisioning_state"
CLIENT_ID = "client_id"
MANAGED_THING_ID = "managed_thing_id"
PERMANENT_CERT_PATH = "iot_permanent_cert_path"
PERMANENT_PK_PATH = "iot_permanent_pk_path"
METADATA = "metadata"
LAST_UPDATED = "last_updated_epoch_time"

SECURE_STORAGE = "SECURE_STORAGE"
PKCS11_URI_SCHEME = "pkcs11:"  # RFC 7512: a key or certificate object in the token
# The ro paths onboarding only reads (a file it writes must never be one of them)
READ_PATH_KEYS = (CLAIM_CERT_PATH, CLAIM_PK_PATH, DHA_CERT_PATH, DHA_PK_PATH, ROOT_CA_PATH)
DEFAULT_PORT = 8883
DEFAULT_KEEP_ALIVE = 300
KEEP_ALIVE_RANGE = (30, 1200)
DEFAULT_RETRY_TIMEOUT = 300.0
MAX_CLIENT_ID_LENGTH = 128  # AWS IoT Core's limit
# Files read whole into memory are capped, so a wrong path (a disk image, a log) cannot take a
# small hub's RAM. A real config is a few KiB; a CA bundle is a few KiB too (Mozilla's whole set of public
# roots, the largest bundle in common use, is about 220 KiB). 1 MiB is far beyond both.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_ROOT_CA_BYTES = 1024 * 1024
_TEMPLATE_NAME_RE = re.compile(r"^[0-9A-Za-z_-]{1,36}$")
# RegisterThing parameter names this project sends (not published by AWS; see the README)
PARAM_SERIAL_NUMBER = "SerialNumber"
PARAM_UPC = "UniversalProductCode"
# deviceConfiguration keys this project reads from RegisterThing's answer (not published by AWS)
DEVICE_CONFIG_CLIENT_ID = "ClientId"
DEVICE_CONFIG_MANAGED_THING_ID = "ManagedThingId"


class ProvisioningMethod(enum.StrEnum):
    FLEET_PROVISIONING = "FLEET_PROVISIONING"
    JITR = "JITR"


_METHOD_NAMES = frozenset(m.value for m in ProvisioningMethod)


class CertificateMethod(enum.StrEnum):
    CREATE_KEYS_AND_CERTIFICATE = "CreateKeysAndCertificate"
    CREATE_CERTIFICATE_FROM_CSR = "CreateCertificateFromCsr"


class TokenKeyType(enum.StrEnum):
    """The permanent key a token makes for CreateCertificateFromCsr (both are keys AWS IoT accepts)."""

    EC_P256 = "EC_P256"
    RSA_2048 = "RSA_2048"


class ProvisioningState(enum.StrEnum):
    NOT_PROVISIONED = "NOT_PROVISIONED"
    PROVISIONED = "PROVISIONED"


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class ConnectionConfig:
    """Where and how the hub connects, whatever the method: the endpoint and the MQTT settings."""

    endpoint: Endpoint
    endpoint_key: str  # the ro key the endpoint was read from, so messages name the one the user set
    root_ca_path: str | None = None
    keep_alive: int = DEFAULT_KEEP_ALIVE
    retry_timeout: float = DEFAULT_RETRY_TIMEOUT


@dataclass(frozen=True)
class FleetConfig:
    """What fleet provisioning by claim needs: the claim pair, the template and the hub's identity."""

    claim_cert_path: str
    claim_pk_path: str
    template_name: str
    serial_number: str
    upc: str
    certificate_method: CertificateMethod = CertificateMethod.CREATE_KEYS_AND_CERTIFICATE
    template_parameters: Mapping[str, str] = field(default_factory=dict)
    verify_connection: bool = True

    def register_parameters(self) -> dict[str, str]:
        """RegisterThing parameters: SerialNumber, UniversalProductCode, then fp_template_parameters."""
        params = {PARAM_SERIAL_NUMBER: self.serial_number, PARAM_UPC: self.upc}
        params.update(self.template_parameters)
        return params


@dataclass(frozen=True)
class JitrConfig:
    """What JITR needs: the device (DHA) pair, and the client id when not the certificate's CN."""

    dha_cert_path: str
    dha_pk_path: str
    client_id_override: str | None = None


@dataclass(frozen=True)
class Pkcs11Config:
    """The PKCS#11 token holding the hub's keys: its library, its label, where its user PIN is.

    The PIN itself is read only when the token is opened, never kept here or shown anywhere.
    """

    module_path: str
    token_label: str
    pin_path: str
    key_type: TokenKeyType = TokenKeyType.EC_P256


@dataclass(frozen=True)
class HubConfig:
    """The validated settings onboarding needs (built by `parse_config`).

    Exactly one of `fleet` and `jitr` is set, the one `method` names. The other method's keys, when
    present, were checked all the same: a config does not turn invalid by switching methods.
    """

    path: Path
    method: ProvisioningMethod
    state: ProvisioningState
    connection: ConnectionConfig
    permanent_cert_dir: Path
    fleet: FleetConfig | None = None
    jitr: JitrConfig | None = None
    # The credential store that reads SECURE_STORAGE references (None: the only one installed).
    secure_storage_handler: str | None = None
    warnings: tuple[str, ...] = field(default=())
    # Set when `method` is JITR by fallback (the configured value is missing or invalid): the reason,
    # added to any error that follows so the user sees why JITR's settings were asked for.
    method_note: str | None = None
    # Every file path the ro section gives onboarding to read (key -> absolute path; SECURE_STORAGE
    # left out), whatever the method: none of them may be a file onboarding writes.
    read_paths: Mapping[str, str] = field(default_factory=dict)
    set_keys: frozenset[str] = frozenset()  # the ro keys present in the file (for messages)
    # The token for keys named by pkcs11: URIs (or SECURE_STORAGE with the pkcs11 handler); when set,
    # fleet provisioning keeps the permanent key in it too.
    pkcs11: Pkcs11Config | None = None


def key_name(section: str, key: str) -> str:
    return f"{section}.{key}"


# --------------------------------------------------------------------------------------------- reading


def read_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the config file as JSON, checking only its outer shape (`ro`/`rw` objects)."""
    p = Path(path)
    try:
        # Never blocks: a FIFO (or a device) given as the config is refused before any read.
        text = _files.read_regular_file(p, MAX_CONFIG_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist; pass the path of iotmi_config.json") from None
    except IsADirectoryError:
        raise ConfigError(f"config path {p} is a folder, not a file") from None
    except _files.NotRegularFileError as exc:
        raise ConfigError(
            f"config path {p} is {exc.kind}, not a regular file; pass the path of iotmi_config.json itself"
        ) from None
    except _files.FileTooLargeError as exc:
        raise ConfigError(
            f"config file {p} is {exc.size} bytes, more than the "
            f"{_files.describe_limit(exc.limit)} limit for iotmi_config.json (a real one is a few KiB); "
            "pass the path of iotmi_config.json itself"
        ) from None
    except PermissionError:
        raise ConfigError(f"config file {p} is not readable by this user; check its permissions") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"config file {p} cannot be read: {exc.strerror or exc}") from None
    if not text.strip():
        raise ConfigError(f"config file {p} is empty; it needs at least a 'ro' section")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"config file {p} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {p} must hold a JSON object with 'ro' and 'rw' sections")
    if not isinstance(doc.get(RO), dict):
        raise ConfigError(f"{RO}: missing or not an object in {p}", key=RO)
    if RW in doc and not isinstance(doc[RW], dict):
        raise ConfigError(f"{RW}: must be an object in {p}", key=RW)
    return doc


def provisioning_state(doc: Mapping[str, Any]) -> ProvisioningState:
    """The rw state; missing means NOT_PROVISIONED, anything unknown is an error naming the key."""
    rw = doc.get(RW) or {}
    value = rw.get(PROVISIONING_STATE, ProvisioningState.NOT_PROVISIONED.value)
    try:
        return ProvisioningState(value)
    except ValueError:
        raise ConfigError(
            f"{key_name(RW, PROVISIONING_STATE)}: expected NOT_PROVISIONED or PROVISIONED, got {value!r}",
            key=key_name(RW, PROVISIONING_STATE),
        ) from None


def parse_endpoint(value: object, key: str) -> Endpoint:
    """`host` or `host:port` (IPv6 in brackets); port 8883 by default. No scheme, no path."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: expected a host name or host:port, got {value!r}", key=key)
    text = value.strip()
    if "://" in text or "/" in text or any(ch.isspace() for ch in text):
        raise ConfigError(
            f"{key}: expected a host name or host:port without scheme or path, got {value!r}", key=key
        )
    host, port_text = text, None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"{key}: unbalanced '[' in {value!r}", key=key)
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"{key}: expected [host]:port, got {value!r}", key=key)
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise ConfigError(f"{key}: write an IPv6 address as [address]:port, got {value!r}", key=key)
    if not host:
        raise ConfigError(f"{key}: the host is empty in {value!r}", key=key)
    port = DEFAULT_PORT
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ConfigError(f"{key}: port must be a number from 1 to 65535, got {port_text!r}", key=key)
        port = int(port_text)
    return Endpoint(host, port)


def _string(section: Mapping[str, Any], sect: str, key: str, *, required: bool, why: str = "") -> str | None:
    name = key_name(sect, key)
    if key not in section or section[key] is None:
        if required:
            raise ConfigError(f"{name}: missing; {why}".rstrip("; "), key=name)
        return None
    value = section[key]
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {type(value).__name__} {value!r}", key=name)
    if not value.strip():
        if required:
            raise ConfigError(f"{name}: is empty; {why}".rstrip("; "), key=name)
        return None
    return value


def resolve_path(config_path: str | os.PathLike[str], value: str) -> str:
    """An ro path as onboarding uses it: absolute, a relative one taken from the config's folder.

    Every hub process reads the same config from its own working directory, so a relative path can only
    mean one thing: relative to the file that names it. SECURE_STORAGE is not a path and stays as it is.
    """
    if value == SECURE_STORAGE or is_pkcs11_uri(value):
        return value
    p = Path(value)
    return str(p if p.is_absolute() else Path(config_path).absolute().parent / p)


def is_pkcs11_uri(value: object) -> bool:
    """True for an RFC 7512 URI (a token object), which is never a file path. A URI scheme is
    case-insensitive (RFC 3986): `PKCS11:...` read as a relative path would be echoed in an error, and a
    URI may carry a PIN (which the URI parser refuses without repeating it)."""
    # Leading blanks too: " pkcs11:..." read as a relative path was echoed, PIN and all, as missing.
    text = value.lstrip() if isinstance(value, str) else ""
    return text[: len(PKCS11_URI_SCHEME)].lower() == PKCS11_URI_SCHEME


def permanent_cert_dir(config_path: str | os.PathLike[str], ro: Mapping[str, Any]) -> Path:
    """Where onboarding puts new credentials: ro.iot_permanent_cert_dir, default `certs` beside the config.

    The one place this is decided (parse_config, and status/reset, which must work on a config that no
    longer validates, both use it).
    """
    raw = ro.get(PERMANENT_CERT_DIR)
    if isinstance(raw, str) and raw.strip():
        return Path(resolve_path(config_path, raw))
    return Path(config_path).absolute().parent / "certs"


def _path(
    section: Mapping[str, Any],
    key: str,
    config_path: Path,
    *,
    required: bool,
    why: str = "",
    allow_secure_storage: bool = False,
) -> str | None:
    value = _string(section, RO, key, required=required, why=why)
    if value is not None and value == SECURE_STORAGE and not allow_secure_storage:
        raise ConfigError(
            f"{key_name(RO, key)}: {SECURE_STORAGE} is only supported for claim credentials, and for DHA "
            f"credentials when a PKCS#11 token is set ({key_name(RO, PKCS11_TOKEN_LABEL)})",
            key=key_name(RO, key),
        )
    return None if value is None else resolve_path(config_path, value)


def _number(section: Mapping[str, Any], sect: str, key: str) -> float | None:
    if key not in section or section[key] is None:
        return None
    value = section[key]
    # bool is an int in Python; `true` is not a number of seconds
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key_name(sect, key)}: expected a number, got {value!r}", key=key_name(sect, key))
    try:
        number = float(value)
    except OverflowError:  # an integer literal too large for a float
        number = math.inf
    # Python's json accepts NaN, Infinity and 1e400 (= inf); none of them is a number of seconds.
    if not math.isfinite(number):
        raise ConfigError(
            f"{key_name(sect, key)}: expected a finite number, got {value!r}", key=key_name(sect, key)
        )
    return number


def parse_config(
    path: str | os.PathLike[str], doc: Mapping[str, Any] | None = None, *, warn: bool = True
) -> HubConfig:
    """Validate everything onboarding needs, before any network traffic.

    A missing or invalid method falls back to JITR, with a warning logged before anything else is
    checked (`warn` False: not again, for a second read of the same file); every ConfigError that
    follows then says JITR was assumed because of that value.
    """
    p = Path(path)
    if doc is None:
        doc = read_document(p)
    ro: Mapping[str, Any] = doc[RO]
    rw: Mapping[str, Any] = doc.get(RW) or {}
    choice = method_choice(ro)
    if choice.warning and warn:
        log.warning("%s", choice.warning)
    try:
        state = provisioning_state(doc)
        connection = _parse_connection(ro, rw, p)
        handler = _string(ro, RO, SECURE_STORAGE_HANDLER, required=False)
        token = parse_pkcs11(ro, p, handler)
        fleet = _parse_fleet(ro, p, required=choice.method is ProvisioningMethod.FLEET_PROVISIONING)
        jitr = _parse_jitr(ro, p, required=choice.method is ProvisioningMethod.JITR, token=token is not None)
        cert_dir = _parse_permanent_cert_dir(ro, p)
    except ConfigError as exc:
        choice.explain(exc)
        raise
    return HubConfig(
        path=p,
        method=choice.method,
        state=state,
        connection=connection,
        permanent_cert_dir=cert_dir,
        fleet=fleet,
        jitr=jitr,
        secure_storage_handler=handler,
        warnings=(choice.warning,) if choice.warning else (),
        method_note=choice.note,
        read_paths={
            key: resolve_path(p, ro[key])
            for key in READ_PATH_KEYS
            if isinstance(ro.get(key), str)
            and ro[key].strip()
            and ro[key] != SECURE_STORAGE
            and not is_pkcs11_uri(ro[key])
        },
        set_keys=frozenset(k for k in ro if isinstance(k, str)),
        pkcs11=token,
    )


@dataclass(frozen=True)
class MethodChoice:
    """The method onboarding will use (`method`), what the config says (`configured`), and, when the two
    differ, the warning to show now and the note that explains any error that follows."""

    method: ProvisioningMethod
    configured: object
    warning: str | None = None
    note: str | None = None

    @property
    def assumed(self) -> bool:
        return self.note is not None

    def explain(self, exc: OnboardingError) -> None:
        """Add to an error why JITR's settings were asked for (once)."""
        if self.note and self.note not in exc.message:
            exc.amend(f"{exc.message} ({self.note})")


def method_choice(ro: Mapping[str, Any]) -> MethodChoice:
    """The provisioning method as the hub SDK reads it: a missing or invalid value falls back to JITR."""
    raw = ro.get(PROVISIONING_METHOD)
    if isinstance(raw, str) and raw in _METHOD_NAMES:
        return MethodChoice(ProvisioningMethod(raw), raw)
    name = key_name(RO, PROVISIONING_METHOD)
    valid = " or ".join(m.value for m in ProvisioningMethod)
    if raw is None:
        return MethodChoice(
            ProvisioningMethod.JITR,
            raw,
            warning=f"{name} is missing; falling back to JITR (set it to {valid})",
            note=f"JITR was assumed because {name} is missing; set it to {valid}",
        )
    closest = closest_method(raw)
    return MethodChoice(
        ProvisioningMethod.JITR,
        raw,
        warning=f"{name} is invalid ({raw!r}); falling back to JITR; did you mean {closest.value!r}?",
        note=f"JITR was assumed because {name} is {raw!r}, not a valid method; "
        f"did you mean {closest.value!r}?",
    )


def closest_method(raw: object) -> ProvisioningMethod:
    """The valid method nearest to a mistyped one (difflib's similarity, ignoring case)."""
    text = str(raw).strip().upper()
    import difflib  # only for a config with a typo in it

    return max(ProvisioningMethod, key=lambda m: difflib.SequenceMatcher(None, text, m.value).ratio())


# ---------------------------------------------------------------------------------------- connection


def _parse_connection(ro: Mapping[str, Any], rw: Mapping[str, Any], config_path: Path) -> ConnectionConfig:
    endpoint_key = next((k for k in ENDPOINT_KEYS if k in ro), None)
    if endpoint_key is None:
        raise ConfigError(
            f"{key_name(RO, ENDPOINT_KEYS[0])}: missing (also looked for "
            f"{', '.join(ENDPOINT_KEYS[1:])}); set it to the IoT Core device endpoint",
            key=key_name(RO, ENDPOINT_KEYS[0]),
        )
    endpoint = parse_endpoint(ro[endpoint_key], key_name(RO, endpoint_key))
    root_ca = _path(ro, ROOT_CA_PATH, config_path, required=False)
    if root_ca is not None:
        _check_readable_pem(root_ca, key_name(RO, ROOT_CA_PATH))
    keep_alive = _parse_keep_alive(ro, rw)
    retry = _number(ro, RO, RETRY_TIMEOUT)
    if retry is not None and not 0 < retry <= 86400:
        raise ConfigError(
            f"{key_name(RO, RETRY_TIMEOUT)}: expected seconds, more than 0 and at most 86400, got {retry:g}",
            key=key_name(RO, RETRY_TIMEOUT),
        )
    return ConnectionConfig(
        endpoint=endpoint,
        endpoint_key=endpoint_key,
        root_ca_path=root_ca,
        keep_alive=keep_alive,
        retry_timeout=retry if retry is not None else DEFAULT_RETRY_TIMEOUT,
    )


def _parse_keep_alive(ro: Mapping[str, Any], rw: Mapping[str, Any]) -> int:
    """mqtt_keep_alive_interval: AWS does not say which section holds it, so ro first, then rw."""
    sect = RO if KEEP_ALIVE in ro else RW
    raw = _number(ro if sect == RO else rw, sect, KEEP_ALIVE)
    if raw is None:
        return DEFAULT_KEEP_ALIVE
    lo, hi = KEEP_ALIVE_RANGE
    if raw != int(raw) or not lo <= raw <= hi:
        raise ConfigError(
            f"{key_name(sect, KEEP_ALIVE)}: expected whole seconds from {lo} to {hi}, got {raw:g}",
            key=key_name(sect, KEEP_ALIVE),
        )
    return int(raw)


# --------------------------------------------------------------------------------------------- fleet

_WHY_FLEET = "fleet provisioning needs it"


def _parse_fleet(ro: Mapping[str, Any], config_path: Path, *, required: bool) -> FleetConfig | None:
    """The fleet section; None when the method is JITR (its keys are then checked only where present)."""
    serial = _string(ro, RO, SERIAL_NUMBER, required=required, why=_WHY_FLEET + " (it is the MQTT client id)")
    if serial is not None and len(serial) > MAX_CLIENT_ID_LENGTH:
        raise ConfigError(
            f"{key_name(RO, SERIAL_NUMBER)}: longer than {MAX_CLIENT_ID_LENGTH} characters, "
            "too long for an MQTT client id",
            key=key_name(RO, SERIAL_NUMBER),
        )
    upc = _string(ro, RO, UPC, required=required, why=_WHY_FLEET)
    template = _string(ro, RO, TEMPLATE_NAME, required=required, why=_WHY_FLEET)
    if template is not None and not _TEMPLATE_NAME_RE.match(template):
        raise ConfigError(
            f"{key_name(RO, TEMPLATE_NAME)}: must be 1 to 36 characters of letters, digits, "
            f"'_' or '-', got {template!r}",
            key=key_name(RO, TEMPLATE_NAME),
        )
    certificate_method = _parse_certificate_method(ro)
    parameters = _parse_template_parameters(ro)
    claim_cert, claim_pk = _parse_claim_paths(ro, config_path, required=required)
    verify = _parse_verify_connection(ro)
    if not required:
        return None
    # required: each of these was refused above when missing or empty
    assert serial is not None
    assert upc is not None
    assert template is not None
    assert claim_cert is not None
    assert claim_pk is not None
    return FleetConfig(
        claim_cert_path=claim_cert,
        claim_pk_path=claim_pk,
        template_name=template,
        serial_number=serial,
        upc=upc,
        certificate_method=certificate_method,
        template_parameters=parameters,
        verify_connection=verify,
    )


def _parse_certificate_method(ro: Mapping[str, Any]) -> CertificateMethod:
    raw = ro.get(CERTIFICATE_METHOD)
    if raw is None:
        return CertificateMethod.CREATE_KEYS_AND_CERTIFICATE
    try:
        return CertificateMethod(raw)
    except ValueError:
        raise ConfigError(
            f"{key_name(RO, CERTIFICATE_METHOD)}: expected CreateKeysAndCertificate or "
            f"CreateCertificateFromCsr, got {raw!r}",
            key=key_name(RO, CERTIFICATE_METHOD),
        ) from None


def _parse_template_parameters(ro: Mapping[str, Any]) -> dict[str, str]:
    raw = ro.get(TEMPLATE_PARAMETERS)
    if raw is None:
        return {}
    name = key_name(RO, TEMPLATE_PARAMETERS)
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected an object of string values, got {raw!r}", key=name)
    params: dict[str, str] = {}
    for k, v in raw.items():
        if not isinstance(v, str):
            raise ConfigError(f"{name}: value of {k!r} must be a string, got {v!r}", key=name)
        if k in (PARAM_SERIAL_NUMBER, PARAM_UPC):
            raise ConfigError(f"{name}: {k!r} is set from ro.SN / ro.UPC; remove it here", key=name)
        params[k] = v
    return params


def _parse_claim_paths(
    ro: Mapping[str, Any], config_path: Path, *, required: bool
) -> tuple[str | None, str | None]:
    claim_cert = _path(
        ro, CLAIM_CERT_PATH, config_path, required=required, why=_WHY_FLEET, allow_secure_storage=True
    )
    claim_pk = _path(
        ro, CLAIM_PK_PATH, config_path, required=required, why=_WHY_FLEET, allow_secure_storage=True
    )
    if required and (claim_cert == SECURE_STORAGE) != (claim_pk == SECURE_STORAGE):
        raise ConfigError(
            f"{key_name(RO, CLAIM_PK_PATH)}: the claim certificate and key must both be "
            f"{SECURE_STORAGE} or both be paths",
            key=key_name(RO, CLAIM_PK_PATH),
        )
    return claim_cert, claim_pk


def _parse_verify_connection(ro: Mapping[str, Any]) -> bool:
    verify = ro.get(VERIFY_CONNECTION, True)
    if not isinstance(verify, bool):
        raise ConfigError(
            f"{key_name(RO, VERIFY_CONNECTION)}: expected true or false, got {verify!r}",
            key=key_name(RO, VERIFY_CONNECTION),
        )
    return verify


# ---------------------------------------------------------------------------------------------- JITR


def _parse_jitr(
    ro: Mapping[str, Any], config_path: Path, *, required: bool, token: bool = False
) -> JitrConfig | None:
    """The JITR section; None when the method is fleet provisioning (its keys checked where present).

    SECURE_STORAGE names the token's default DHA objects, so it is accepted only with a token set."""
    why = "JITR needs the device (DHA) certificate and key"
    dha_cert = _path(ro, DHA_CERT_PATH, config_path, required=required, why=why, allow_secure_storage=token)
    dha_pk = _path(ro, DHA_PK_PATH, config_path, required=required, why=why, allow_secure_storage=token)
    if required and (dha_cert == SECURE_STORAGE) != (dha_pk == SECURE_STORAGE):
        raise ConfigError(
            f"{key_name(RO, DHA_PK_PATH)}: the DHA certificate and key must both be "
            f"{SECURE_STORAGE} or both be paths or pkcs11: URIs",
            key=key_name(RO, DHA_PK_PATH),
        )
    client_id_override = _string(ro, RO, CLIENT_ID_OVERRIDE, required=False)
    if client_id_override is not None and len(client_id_override) > MAX_CLIENT_ID_LENGTH:
        raise ConfigError(
            f"{key_name(RO, CLIENT_ID_OVERRIDE)}: longer than {MAX_CLIENT_ID_LENGTH} characters",
            key=key_name(RO, CLIENT_ID_OVERRIDE),
        )
    if not required:
        return None
    # required: both were refused above when missing or empty
    assert dha_cert is not None
    assert dha_pk is not None
    return JitrConfig(dha_cert_path=dha_cert, dha_pk_path=dha_pk, client_id_override=client_id_override)


# -------------------------------------------------------------------------------------------- PKCS#11


def parse_pkcs11(ro: Mapping[str, Any], config_path: Path, handler: str | None) -> Pkcs11Config | None:
    """The token settings: all three keys, when any is set, a path key names a pkcs11: URI, or the
    handler is pkcs11. Whether the library, the token and the PIN work is checked when the token opens
    (a CredentialError then)."""
    uses_token = handler == "pkcs11" or any(is_pkcs11_uri(ro.get(k)) for k in READ_PATH_KEYS)
    if not uses_token and not any(k in ro for k in (*PKCS11_KEYS, PKCS11_KEY_TYPE)):
        return None
    why = "the hub's keys are in a PKCS#11 token"
    module = _path(ro, PKCS11_MODULE_PATH, config_path, required=True, why=why)
    label = _string(ro, RO, PKCS11_TOKEN_LABEL, required=True, why=why)
    pin = _path(ro, PKCS11_PIN_PATH, config_path, required=True, why=why + " (a file holding its user PIN)")
    assert module is not None
    assert label is not None
    assert pin is not None
    raw_type = ro.get(PKCS11_KEY_TYPE, TokenKeyType.EC_P256.value)
    try:
        key_type = TokenKeyType(raw_type)
    except ValueError:
        raise ConfigError(
            f"{key_name(RO, PKCS11_KEY_TYPE)}: expected EC_P256 or RSA_2048, got {raw_type!r}",
            key=key_name(RO, PKCS11_KEY_TYPE),
        ) from None
    return Pkcs11Config(module_path=module, token_label=label, pin_path=pin, key_type=key_type)


# --------------------------------------------------------------------------------------------- files


def _parse_permanent_cert_dir(ro: Mapping[str, Any], config_path: Path) -> Path:
    _path(ro, PERMANENT_CERT_DIR, config_path, required=False)  # type check only
    cert_dir = permanent_cert_dir(config_path, ro)
    if cert_dir.exists() and not cert_dir.is_dir():
        raise ConfigError(
            f"{key_name(RO, PERMANENT_CERT_DIR)}: {cert_dir} exists and is not a folder",
            key=key_name(RO, PERMANENT_CERT_DIR),
        )
    return cert_dir


def _check_readable_pem(path: str, key: str) -> None:
    try:
        data = _files.read_regular_file(path, MAX_ROOT_CA_BYTES)
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} does not exist", key=key) from None
    except IsADirectoryError:
        raise ConfigError(f"{key}: {path} is a folder, not a PEM file", key=key) from None
    except _files.NotRegularFileError as exc:
        raise ConfigError(f"{key}: {path} is {exc.kind}, not a PEM file", key=key) from None
    except _files.FileTooLargeError as exc:
        raise ConfigError(
            f"{key}: {path} is {exc.size} bytes, more than the "
            f"{_files.describe_limit(exc.limit)} limit for a CA bundle (a real one is a few KiB); "
            "point it at the PEM file of the endpoint's root CA",
            key=key,
        ) from None
    except OSError as exc:
        raise ConfigError(f"{key}: {path} cannot be read ({exc.strerror or exc})", key=key) from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(f"{key}: {path} holds no PEM certificate", key=key)


# --------------------------------------------------------------------------------------------- writing


def write_document(path: str | os.PathLike[str], doc: Mapping[str, Any]) -> None:
    """Atomically write the whole config, keeping the existing file's permission bits, owner and group.

    A symlinked config stays a symlink: the file it points at is the one replaced.
    """
    data = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
    try:
        _files.replace_shared_file(path, data)
    except OSError as exc:
        hint = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        raise StorageError(
            f"could not write {_files.real_path(path)}: {hint}; the file was left as it was"
        ) from None


def update_rw(
    path: str | os.PathLike[str], changes: Mapping[str, Any], *, clock: Callable[[], float] = time.time
) -> dict[str, Any]:
    """Re-read the config, set `changes` in `rw` (and metadata.last_updated_epoch_time), write atomically.

    Re-reading right before writing keeps keys other processes added meanwhile.
    """
    doc = read_document(path)
    rw = dict(doc.get(RW) or {})
    rw.update(changes)
    meta = rw.get(METADATA)
    meta = dict(meta) if isinstance(meta, dict) else {}
    meta[LAST_UPDATED] = int(clock())
    rw[METADATA] = meta
    doc[RW] = rw
    write_document(path, doc)
    return doc


def reset_rw(path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """Local offboarding as AWS documents it: rw holds only NOT_PROVISIONED and metadata; ro untouched."""
    doc = read_document(path)
    doc[RW] = {
        PROVISIONING_STATE: ProvisioningState.NOT_PROVISIONED.value,
        METADATA: {LAST_UPDATED: int(clock())},
    }
    write_document(path, doc)
    return doc
