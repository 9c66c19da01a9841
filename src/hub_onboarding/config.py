"""iotmi_config.json: key names, validation, atomic writes, and the onboarding lock.

Every key name lives here as a constant. The file has two sections: `ro` (factory / integrator) and `rw`
(written by the SDK at run time). Other hub processes read the same file, so every write is atomic
(temp file in the same folder, fsync, os.replace, fsync of the folder), keeps every key it does not
know, and keeps the file's mode, owner and group; a symlinked config stays a symlink (its target is
replaced). Validation (`parse_config`) runs before any network traffic and each
ConfigError names the key ("ro.SN") and what is wrong with it.

The lock: `<config>.lock` beside the config, held with fcntl.flock for the whole onboarding, so two
runs on one config never both onboard. The lock file is never deleted (deleting a lock file races).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import json
import logging
import math
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hub_onboarding.errors import BusyError, ConfigError, StorageError

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
# rw keys
PROVISIONING_STATE = "iot_provisioning_state"
CLIENT_ID = "client_id"
MANAGED_THING_ID = "managed_thing_id"
PERMANENT_CERT_PATH = "iot_permanent_cert_path"
PERMANENT_PK_PATH = "iot_permanent_pk_path"
METADATA = "metadata"
LAST_UPDATED = "last_updated_epoch_time"

SECURE_STORAGE = "SECURE_STORAGE"
DEFAULT_PORT = 8883
DEFAULT_KEEP_ALIVE = 300
KEEP_ALIVE_RANGE = (30, 1200)
DEFAULT_RETRY_TIMEOUT = 300.0
MAX_CLIENT_ID_LENGTH = 128  # AWS IoT Core's limit
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


class CertificateMethod(enum.StrEnum):
    CREATE_KEYS_AND_CERTIFICATE = "CreateKeysAndCertificate"
    CREATE_CERTIFICATE_FROM_CSR = "CreateCertificateFromCsr"


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
class HubConfig:
    """The validated settings onboarding needs (built by `parse_config`)."""

    path: Path
    method: ProvisioningMethod
    state: ProvisioningState
    endpoint: Endpoint
    endpoint_key: str
    serial_number: str | None
    upc: str | None
    template_name: str | None
    certificate_method: CertificateMethod
    template_parameters: Mapping[str, str]
    claim_cert_path: str | None
    claim_pk_path: str | None
    dha_cert_path: str | None
    dha_pk_path: str | None
    root_ca_path: str | None
    permanent_cert_dir: Path
    keep_alive: int
    retry_timeout: float
    client_id_override: str | None
    secure_storage_handler: str | None
    warnings: tuple[str, ...] = field(default=())
    verify_connection: bool = True

    def register_parameters(self) -> dict[str, str]:
        """RegisterThing parameters: SerialNumber, UniversalProductCode, then fp_template_parameters."""
        params = {PARAM_SERIAL_NUMBER: self.serial_number or "", PARAM_UPC: self.upc or ""}
        params.update(self.template_parameters)
        return params


def key_name(section: str, key: str) -> str:
    return f"{section}.{key}"


# --------------------------------------------------------------------------------------------- reading


def read_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the config file as JSON, checking only its outer shape (`ro`/`rw` objects)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist; pass the path of iotmi_config.json") from None
    except IsADirectoryError:
        raise ConfigError(f"config path {p} is a folder, not a file") from None
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
    if value == SECURE_STORAGE:
        return value
    p = Path(value)
    return str(p if p.is_absolute() else Path(config_path).absolute().parent / p)


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
            f"{key_name(RO, key)}: {SECURE_STORAGE} is only supported for claim credentials",
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


def parse_config(path: str | os.PathLike[str], doc: Mapping[str, Any] | None = None) -> HubConfig:
    """Validate everything onboarding needs, before any network traffic."""
    p = Path(path)
    if doc is None:
        doc = read_document(p)
    ro: Mapping[str, Any] = doc[RO]
    rw: Mapping[str, Any] = doc.get(RW) or {}
    warnings: list[str] = []

    raw_method = ro.get(PROVISIONING_METHOD)
    try:
        method = ProvisioningMethod(str(raw_method)) if isinstance(raw_method, str) else None
    except ValueError:
        method = None
    if method is None:
        # The SDK chapter: a missing or invalid method falls back to JITR.
        method = ProvisioningMethod.JITR
        problem = "missing" if raw_method is None else "invalid"
        warnings.append(
            f"{key_name(RO, PROVISIONING_METHOD)} is {problem} ({raw_method!r}); falling back to JITR"
        )
    state = provisioning_state(doc)

    endpoint_key = next((k for k in ENDPOINT_KEYS if k in ro), None)
    if endpoint_key is None:
        raise ConfigError(
            f"{key_name(RO, ENDPOINT_KEYS[0])}: missing (also looked for "
            f"{', '.join(ENDPOINT_KEYS[1:])}); set it to the IoT Core device endpoint",
            key=key_name(RO, ENDPOINT_KEYS[0]),
        )
    endpoint = parse_endpoint(ro[endpoint_key], key_name(RO, endpoint_key))

    fp = method is ProvisioningMethod.FLEET_PROVISIONING
    why_fp = "fleet provisioning needs it"
    serial = _string(ro, RO, SERIAL_NUMBER, required=fp, why=why_fp + " (it is the MQTT client id)")
    if serial is not None and len(serial) > MAX_CLIENT_ID_LENGTH:
        raise ConfigError(
            f"{key_name(RO, SERIAL_NUMBER)}: longer than {MAX_CLIENT_ID_LENGTH} characters, "
            "too long for an MQTT client id",
            key=key_name(RO, SERIAL_NUMBER),
        )
    upc = _string(ro, RO, UPC, required=fp, why=why_fp)
    template = _string(ro, RO, TEMPLATE_NAME, required=fp, why=why_fp)
    if template is not None and not _TEMPLATE_NAME_RE.match(template):
        raise ConfigError(
            f"{key_name(RO, TEMPLATE_NAME)}: must be 1 to 36 characters of letters, digits, "
            f"'_' or '-', got {template!r}",
            key=key_name(RO, TEMPLATE_NAME),
        )

    raw_cm = ro.get(CERTIFICATE_METHOD)
    if raw_cm is None:
        cert_method = CertificateMethod.CREATE_KEYS_AND_CERTIFICATE
    else:
        try:
            cert_method = CertificateMethod(raw_cm)
        except ValueError:
            raise ConfigError(
                f"{key_name(RO, CERTIFICATE_METHOD)}: expected CreateKeysAndCertificate or "
                f"CreateCertificateFromCsr, got {raw_cm!r}",
                key=key_name(RO, CERTIFICATE_METHOD),
            ) from None

    params_raw = ro.get(TEMPLATE_PARAMETERS)
    params: dict[str, str] = {}
    if params_raw is not None:
        name = key_name(RO, TEMPLATE_PARAMETERS)
        if not isinstance(params_raw, dict):
            raise ConfigError(f"{name}: expected an object of string values, got {params_raw!r}", key=name)
        for k, v in params_raw.items():
            if not isinstance(v, str):
                raise ConfigError(f"{name}: value of {k!r} must be a string, got {v!r}", key=name)
            if k in (PARAM_SERIAL_NUMBER, PARAM_UPC):
                raise ConfigError(f"{name}: {k!r} is set from ro.SN / ro.UPC; remove it here", key=name)
            params[k] = v

    claim_cert = _path(ro, CLAIM_CERT_PATH, p, required=fp, why=why_fp, allow_secure_storage=True)
    claim_pk = _path(ro, CLAIM_PK_PATH, p, required=fp, why=why_fp, allow_secure_storage=True)
    if fp and (claim_cert == SECURE_STORAGE) != (claim_pk == SECURE_STORAGE):
        raise ConfigError(
            f"{key_name(RO, CLAIM_PK_PATH)}: the claim certificate and key must both be "
            f"{SECURE_STORAGE} or both be paths",
            key=key_name(RO, CLAIM_PK_PATH),
        )
    why_jitr = "JITR needs the device (DHA) certificate and key"
    dha_cert = _path(ro, DHA_CERT_PATH, p, required=not fp, why=why_jitr)
    dha_pk = _path(ro, DHA_PK_PATH, p, required=not fp, why=why_jitr)

    root_ca = _path(ro, ROOT_CA_PATH, p, required=False)
    if root_ca is not None:
        _check_readable_pem(root_ca, key_name(RO, ROOT_CA_PATH))

    _path(ro, PERMANENT_CERT_DIR, p, required=False)  # type check only
    cert_dir = permanent_cert_dir(p, ro)
    if cert_dir.exists() and not cert_dir.is_dir():
        raise ConfigError(
            f"{key_name(RO, PERMANENT_CERT_DIR)}: {cert_dir} exists and is not a folder",
            key=key_name(RO, PERMANENT_CERT_DIR),
        )

    keep_alive_sect = RO if KEEP_ALIVE in ro else RW
    keep_alive_raw = _number(ro if keep_alive_sect == RO else rw, keep_alive_sect, KEEP_ALIVE)
    keep_alive = DEFAULT_KEEP_ALIVE
    if keep_alive_raw is not None:
        lo, hi = KEEP_ALIVE_RANGE
        if keep_alive_raw != int(keep_alive_raw) or not lo <= keep_alive_raw <= hi:
            raise ConfigError(
                f"{key_name(keep_alive_sect, KEEP_ALIVE)}: expected whole seconds from {lo} to "
                f"{hi}, got {keep_alive_raw:g}",
                key=key_name(keep_alive_sect, KEEP_ALIVE),
            )
        keep_alive = int(keep_alive_raw)

    retry = _number(ro, RO, RETRY_TIMEOUT)
    if retry is not None and not 0 < retry <= 86400:
        raise ConfigError(
            f"{key_name(RO, RETRY_TIMEOUT)}: expected seconds, more than 0 and at most 86400, got {retry:g}",
            key=key_name(RO, RETRY_TIMEOUT),
        )
    client_id_override = _string(ro, RO, CLIENT_ID_OVERRIDE, required=False)
    if client_id_override is not None and len(client_id_override) > MAX_CLIENT_ID_LENGTH:
        raise ConfigError(
            f"{key_name(RO, CLIENT_ID_OVERRIDE)}: longer than {MAX_CLIENT_ID_LENGTH} characters",
            key=key_name(RO, CLIENT_ID_OVERRIDE),
        )
    handler = _string(ro, RO, SECURE_STORAGE_HANDLER, required=False)
    verify = ro.get(VERIFY_CONNECTION, True)
    if not isinstance(verify, bool):
        raise ConfigError(
            f"{key_name(RO, VERIFY_CONNECTION)}: expected true or false, got {verify!r}",
            key=key_name(RO, VERIFY_CONNECTION),
        )

    for text in warnings:
        log.warning("%s", text)
    return HubConfig(
        path=p,
        method=method,
        state=state,
        endpoint=endpoint,
        endpoint_key=endpoint_key,
        serial_number=serial,
        upc=upc,
        template_name=template,
        certificate_method=cert_method,
        template_parameters=params,
        claim_cert_path=claim_cert,
        claim_pk_path=claim_pk,
        dha_cert_path=dha_cert,
        dha_pk_path=dha_pk,
        root_ca_path=root_ca,
        permanent_cert_dir=cert_dir,
        keep_alive=keep_alive,
        retry_timeout=retry if retry is not None else DEFAULT_RETRY_TIMEOUT,
        client_id_override=client_id_override,
        secure_storage_handler=handler,
        warnings=tuple(warnings),
        verify_connection=verify,
    )


def _check_readable_pem(path: str, key: str) -> None:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} does not exist", key=key) from None
    except IsADirectoryError:
        raise ConfigError(f"{key}: {path} is a folder, not a PEM file", key=key) from None
    except OSError as exc:
        raise ConfigError(f"{key}: {path} cannot be read ({exc.strerror or exc})", key=key) from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(f"{key}: {path} holds no PEM certificate", key=key)


# --------------------------------------------------------------------------------------------- writing


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (a power cut after os.replace keeps the new name)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never a mix.

    The temp file is created with `mode` from its first byte (O_CREAT|O_EXCL, then fchmod to defeat
    the umask), in the same folder so os.replace is a rename on one filesystem. `owner` (uid, gid) is
    given to the temp file before any data when it differs from ours; EPERM (not root) is ignored.
    """
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        if owner is not None:
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid) != owner:
                try:
                    os.fchown(fd, *owner)
                except PermissionError:
                    log.debug("cannot give %s to uid %d gid %d (not root); it keeps ours", path, *owner)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def write_document(path: str | os.PathLike[str], doc: Mapping[str, Any]) -> None:
    """Atomically write the whole config, keeping the existing file's permission bits, owner and group.

    A symlinked config stays a symlink: the file it points at is the one replaced (the temp file goes
    in that file's folder, so the rename stays on one filesystem).
    """
    p = Path(os.path.realpath(path))
    owner: tuple[int, int] | None
    try:
        st = p.stat()
        mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
    except FileNotFoundError:
        mode, owner = 0o644, None
    data = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
    try:
        atomic_write_bytes(p, data, mode, owner)
    except OSError as exc:
        hint = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        raise StorageError(f"could not write {p}: {hint}; the file was left as it was") from None


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


# ------------------------------------------------------------------------------------------------ lock


def lock_path_for(config_path: str | os.PathLike[str]) -> Path:
    """`<config>.lock` beside the real file, so two names for one config (a symlink) share one lock."""
    p = Path(os.path.realpath(config_path))
    return p.with_name(p.name + ".lock")


@contextlib.contextmanager
def onboarding_lock(config_path: str | os.PathLike[str], timeout: float, poll: float = 0.1) -> Iterator[None]:
    """Hold an exclusive flock on `<config>.lock`, waiting at most `timeout` seconds for it.

    flock is released by the kernel when the process dies, so a crash never leaves a stale lock.
    """
    lp = lock_path_for(config_path)
    try:
        fd = os.open(lp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StorageError(
            f"cannot create the lock file {lp}: {exc.strerror or exc}; the config's folder "
            "must be writable by onboarding"
        ) from None
    try:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BusyError(
                        f"another hub-onboard is onboarding with {config_path} (lock {lp} held for more than "
                        f"{timeout:g} s); wait for it to finish, then run provision again"
                    ) from None
                time.sleep(poll)
            except InterruptedError:
                continue
            except OSError as exc:  # ENOLCK (no lock support, e.g. some network filesystems), EBADF...
                raise StorageError(
                    f"cannot lock {lp}: {exc.strerror or exc}; the config's folder must be on a filesystem "
                    "that supports file locks (flock), e.g. a local one"
                ) from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
