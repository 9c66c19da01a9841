"""The `pkcs11` secure-storage handler: keys that never leave the hub's token (HSM, TPM, secure element).

Configured by three ro keys (config.Pkcs11Config): `pkcs11_module_path` (the PKCS#11 library),
`pkcs11_token_label` (the token) and `pkcs11_pin_path` (a file holding the user PIN: a regular file, not
a symlink, no wider than 0600). The PIN is read when the token is opened and handed to the library and
to awscrt only: it never appears in the config, a log line, an error or `--json` output.

Keys (and, if wanted, certificates) are named by RFC 7512 URIs in the usual path keys, e.g.
`"iot_claim_pk_path": "pkcs11:token=hub;object=claim-key;type=private"`. Only `token`, `object`, `type`
(private for a key, cert for a certificate) and `id` (the object's CKA_ID) are accepted, each once;
attribute names are compared percent-decoded and case-insensitively (RFC 7512), so `PIN-VALUE` or
`pin%2Dvalue` is `pin-value`, refused like `pin-source` (the PIN comes from `pkcs11_pin_path`), and no
message repeats the URI. A certificate may also stay a PEM file. `SECURE_STORAGE` names the handler's
default objects (DEFAULT_OBJECTS): claim `claim-cert`/`claim-key`, DHA `dha-cert`/`dha-key`, in the configured
token.

The permanent key is made or stored in the token under `permanent_key_label(SN)`
("hub-onboarding-<SN>"): by CreateCertificateFromCsr it is generated there (CKA_SENSITIVE true,
CKA_EXTRACTABLE false) and the CSR is signed by the token, so the key never exists outside it; by
CreateKeysAndCertificate the service made the key, and it is imported (sensitive, non-extractable) and
not written anywhere else. A label holds at most one key: a pair left half-made by a power cut is
reused when whole, else deleted before a new one is made.

The permanent key belongs to a config from its birth: its CKA_ID (on both halves) is derived from the label
and the owner, the real path of the config that made it (`owned_key_id`). Two configs with the same SN in
one token share the label but never the id, so onboarding reuses, replaces and resets only objects with
its own id; another config's key under the label is refused before any traffic (ConfigError naming ro.SN
and the token), never deleted or overwritten. A config moved elsewhere finds its old key foreign (reset
before moving). A store without an owner (factory, tools, tests) takes everything under a label as its own.

What awscrt connects with is a `TokenKey` (library, token, key label, PIN file), carried by
`Credentials.token_key`. A pair is checked by a signature: the token signs a fresh challenge and the
certificate's public key must verify it. Every failure is a CredentialError (exit 4) naming the setting
to fix. python-pkcs11 is imported only here, and only when a token is used.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import logging
import os
import re
import stat
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from hub_onboarding import _files
from hub_onboarding import config as cfgmod
from hub_onboarding.config import SECURE_STORAGE, Pkcs11Config, TokenKeyType
from hub_onboarding.errors import ConfigError, CredentialError

if TYPE_CHECKING:
    from cryptography import x509

    from hub_onboarding.certs import CertHandler, CertType, Credentials

log = logging.getLogger(__name__)

# SECURE_STORAGE: the objects the handler reads for each credential (certificate label, key label).
DEFAULT_OBJECTS = {"claim": ("claim-cert", "claim-key"), "DHA": ("dha-cert", "dha-key")}
PERMANENT_LABEL_PREFIX = "hub-onboarding-"
# check_ready's trial key, beside the permanent key's label (`hub-onboarding-<SN>.room-check`), with the
# config's own CKA_ID (two configs with one SN never delete each other's trial); destroyed at once, and by
# the next check (or reset) when a power cut left one.
TRIAL_LABEL_SUFFIX = ".room-check"
_UNTOUCHED = "nothing was touched in the token, no certificate was created"
_MAX_PIN_BYTES = 256
_MODULE_KEY = cfgmod.key_name(cfgmod.RO, cfgmod.PKCS11_MODULE_PATH)
_TOKEN_KEY = cfgmod.key_name(cfgmod.RO, cfgmod.PKCS11_TOKEN_LABEL)
_PIN_KEY = cfgmod.key_name(cfgmod.RO, cfgmod.PKCS11_PIN_PATH)
_SN_KEY = cfgmod.key_name(cfgmod.RO, cfgmod.SERIAL_NUMBER)
_URI_TYPES = ("private", "cert", "public")
_URI_ATTRS = ("token", "object", "type", "id")  # RFC 7512 path attributes onboarding reads
_PIN_URI_ATTRS = ("pin-value", "pin-source")
_MODULE_URI_ATTRS = ("module-name", "module-path")
_SHOWN_WORD = re.compile(r"[a-z][a-z-]{0,31}")


def permanent_key_label(serial_number: str) -> str:
    """The label of the permanent key in the token: derived from the hub, so a rerun finds its own."""
    return f"{PERMANENT_LABEL_PREFIX}{serial_number}"


# ---------------------------------------------------------------------------------------------- URIs


@dataclass(frozen=True)
class TokenUri:
    """What an RFC 7512 URI names: an object (by label) of a type, in a token (None: the configured one),
    and, when the URI gives one, the object's CKA_ID (`id`), which the object found must then carry."""

    label: str
    type: str | None = None
    token: str | None = None
    id: bytes | None = None

    @classmethod
    def parse(cls, text: str, *, part: str | None = None) -> TokenUri:
        """Parse `pkcs11:token=...;object=...;type=...;id=...`; CredentialError (of `part`) naming what is
        wrong. A message never repeats the URI or an attribute's value: the URI may carry a PIN."""

        def refuse(message: str) -> CredentialError:
            return CredentialError(f"pkcs11 URI: {message}", part=part)

        text = text.strip()  # blanks around a setting's value are no part of the URI
        if text[: len(cfgmod.PKCS11_URI_SCHEME)].lower() != cfgmod.PKCS11_URI_SCHEME:
            raise refuse("not a pkcs11: URI")
        path, _, query = text[len(cfgmod.PKCS11_URI_SCHEME) :].partition("?")
        parts = [(p, False) for p in path.split(";") if p] + [(q, True) for q in query.split("&") if q]
        named = [(_attr_name(p), p, in_query) for p, in_query in parts]
        # The PIN first, whatever else is wrong: it must stop everything before any other message.
        for name, _, _ in named:
            if name in _PIN_URI_ATTRS or name.startswith("pin"):
                raise refuse(
                    f"{_shown(name) or 'a PIN attribute'} is not accepted; put the user PIN in the file "
                    f"named by {_PIN_KEY}"
                )
        attrs: dict[str, str] = {}
        for position, (name, raw, in_query) in enumerate(named, 1):
            shown = _shown(name) or f"attribute {position}"
            sep = "=" in raw
            if name in _MODULE_URI_ATTRS:
                raise refuse(f"{shown} is not accepted; the library is set by {_MODULE_KEY}")
            if name not in _URI_ATTRS:
                raise refuse(
                    f"{shown} is not an attribute onboarding reads; use only {', '.join(_URI_ATTRS)}"
                )
            if in_query:
                raise refuse(f"{shown} belongs in the path, before any '?'")
            if not sep:
                raise refuse(f"{shown} has no value; write {shown}=VALUE")
            if name in attrs:
                raise refuse(f"{shown} is given twice; RFC 7512 allows each attribute once")
            attrs[name] = raw.partition("=")[2]
        label = urllib.parse.unquote(attrs.get("object", ""))
        if not label:
            raise refuse("no object=LABEL; name the key or certificate object")
        kind = attrs.get("type")
        if kind is not None:
            kind = urllib.parse.unquote(kind)
            if kind not in _URI_TYPES:
                raise refuse(f"type={_shown(kind) or '...'} is not one of {', '.join(_URI_TYPES)}")
        token = attrs.get("token")
        object_id = attrs.get("id")
        return cls(
            label=label,
            type=kind,
            token=None if token is None else urllib.parse.unquote(token),
            id=None if object_id is None else urllib.parse.unquote_to_bytes(object_id),
        )


def _attr_name(part: str) -> str:
    """An attribute's name as RFC 7512 compares it: percent-decoded, case-insensitive (RFC 5234)."""
    return urllib.parse.unquote(part.partition("=")[0]).strip().lower()


def _shown(word: str) -> str:
    """`word` when it is safe and short enough to repeat in a message, else "" (it may be a typed PIN)."""
    return word if _SHOWN_WORD.fullmatch(word) and not any(ch.isdigit() for ch in word) else ""


def factory_labels(ro: Mapping[str, Any]) -> set[str]:
    """The labels of the token objects the factory installed: the defaults, and those ro's URIs name."""
    labels = {label for pair in DEFAULT_OBJECTS.values() for label in pair}
    for key in cfgmod.READ_PATH_KEYS:
        value = ro.get(key)
        if cfgmod.is_pkcs11_uri(value):
            with contextlib.suppress(CredentialError):
                labels.add(TokenUri.parse(str(value)).label)
    return labels


def format_uri(token: str, label: str, kind: str) -> str:
    """The RFC 7512 URI of an object (percent-encoding what the URI syntax reserves)."""

    def q(value: str) -> str:
        return urllib.parse.quote(value, safe="-._~")

    return f"{cfgmod.PKCS11_URI_SCHEME}token={q(token)};object={q(label)};type={kind}"


@dataclass(frozen=True)
class TokenKey:
    """A private key inside a token, as awscrt needs it to connect (never the key itself, nor the PIN)."""

    module_path: str
    token_label: str
    label: str
    pin_path: str
    key_type: str = "EC"  # "EC" or "RSA": how the token signs (ECDSA over a digest, or PKCS#1 v1.5)

    @property
    def uri(self) -> str:
        return format_uri(self.token_label, self.label, "private")

    def read_pin(self) -> str:
        return read_pin(self.pin_path)


# ---------------------------------------------------------------------------------------- the token


def read_pin(path: str) -> str:
    """The user PIN from its file: a regular file, not a symlink, no wider than 0600, small."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CredentialError(
            f"{_PIN_KEY}: {path} does not exist; write the token's user PIN there (mode 0600)", _PIN_KEY
        ) from None
    except OSError as exc:
        raise CredentialError(f"{_PIN_KEY}: {path} cannot be examined ({exc.strerror})", _PIN_KEY) from None
    if stat.S_ISLNK(st.st_mode):
        raise CredentialError(
            f"{_PIN_KEY}: {path} is a symbolic link; put the PIN file itself there", _PIN_KEY
        )
    if not stat.S_ISREG(st.st_mode):
        raise CredentialError(f"{_PIN_KEY}: {path} is not a regular file", _PIN_KEY)
    if st.st_mode & 0o077:
        raise CredentialError(
            f"{_PIN_KEY}: {path} has mode {stat.S_IMODE(st.st_mode):04o}, readable or writable by other "
            f"users; run 'chmod 600 {path}' (0600 or narrower is accepted)",
            _PIN_KEY,
        )
    try:
        data = _files.read_at_most(Path(path), _MAX_PIN_BYTES + 1, follow_symlinks=False)
    except OSError as exc:
        raise CredentialError(f"{_PIN_KEY}: {path} cannot be read ({exc.strerror})", _PIN_KEY) from None
    if len(data) > _MAX_PIN_BYTES:
        raise CredentialError(f"{_PIN_KEY}: {path} is too large for a PIN file", _PIN_KEY)
    pin = data.decode("utf-8", "replace").strip("\r\n")
    if not pin:
        raise CredentialError(f"{_PIN_KEY}: {path} is empty; write the token's user PIN there", _PIN_KEY)
    return pin


class _InitArgs(ctypes.Structure):
    """CK_C_INITIALIZE_ARGS: no mutex callbacks, CKF_OS_LOCKING_OK (the library uses the OS's locks)."""

    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("create_mutex", ctypes.c_void_p),
        ("destroy_mutex", ctypes.c_void_p),
        ("lock_mutex", ctypes.c_void_p),
        ("unlock_mutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("reserved", ctypes.c_void_p),
    ]


_CK_RV_FN = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)


class _FunctionListHead(ctypes.Structure):
    """The start of CK_FUNCTION_LIST: the version, then C_Initialize and C_Finalize."""

    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("major", ctypes.c_ubyte),
        ("minor", ctypes.c_ubyte),
        ("initialize", _CK_RV_FN),
        ("finalize", _CK_RV_FN),
    ]


_CKF_OS_LOCKING_OK = 0x2
_CKR_OK = 0x0
_CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
_LIBRARIES: dict[str, Any] = {}  # module path -> python-pkcs11 handle, for the life of the process
_LIBRARIES_LOCK = threading.Lock()


def _function_list(module_path: str) -> Any:
    cdll = ctypes.CDLL(module_path)
    head = ctypes.POINTER(_FunctionListHead)()
    if cdll.C_GetFunctionList(ctypes.byref(head)) != _CKR_OK or not head:
        raise OSError("C_GetFunctionList failed")
    return head.contents


def _initialize(module_path: str) -> None:
    """C_Initialize with CKF_OS_LOCKING_OK. python-pkcs11 passes no arguments, which tells a library
    that only one thread calls it (SoftHSM2 then drops its locks), but awscrt signs TLS handshakes on
    its own threads (and fleet-sim runs hubs on threads): the library must lock."""
    rv = _function_list(module_path).initialize(
        ctypes.cast(ctypes.pointer(_InitArgs(flags=_CKF_OS_LOCKING_OK)), ctypes.c_void_p)
    )
    if rv not in (_CKR_OK, _CKR_CRYPTOKI_ALREADY_INITIALIZED):
        raise OSError(f"C_Initialize returned 0x{rv:x}")


def _load_library(module_path: str) -> Any:
    """The library, initialised for threads (see _initialize), with a python-pkcs11 handle on it.

    The handle is made without its own C_Initialize (it would initialise the library for one thread)."""
    import pkcs11
    from pkcs11 import _pkcs11

    with _LIBRARIES_LOCK:
        if module_path in _LIBRARIES:
            return _LIBRARIES[module_path]
        try:
            st = os.stat(module_path)
        except OSError:
            raise CredentialError(
                f"{_MODULE_KEY}: {module_path} does not exist; install the token's PKCS#11 library "
                "(SoftHSM2: apt-get install softhsm2) and set its path",
                _MODULE_KEY,
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise CredentialError(f"{_MODULE_KEY}: {module_path} is not a library file", _MODULE_KEY)
        try:
            _initialize(module_path)
            lib_type: Any = _pkcs11.lib
            handle = lib_type.__new__(lib_type, module_path)  # loads it and reads its function list
        except (OSError, AttributeError, pkcs11.PKCS11Error):
            raise CredentialError(
                f"{_MODULE_KEY}: {module_path} cannot be loaded as a PKCS#11 library; set it to the token's "
                "PKCS#11 module (a .so exporting C_GetFunctionList)",
                _MODULE_KEY,
            ) from None
        _LIBRARIES[module_path] = handle
        return handle


def reload_library(module_path: str) -> None:
    """Finalise and initialise the library again (a library reads its settings, e.g. SOFTHSM2_CONF, when
    initialised). Only for tools and tests that switch token folders; every kept session is dropped."""
    forget_sessions()
    # python-pkcs11 objects of the old sessions that sit in reference cycles (an unfinished search or
    # operation held by a traceback) are finalised now, while their sessions exist: after C_Finalize
    # their __del__ fails with SessionHandleInvalid in whatever code the collector interrupts.
    gc.collect()
    functions = _function_list(module_path)
    functions.finalize(None)
    _initialize(module_path)


def _find_token(lib: Any, label: str, module_path: str) -> Any:
    import pkcs11

    try:
        return lib.get_token(token_label=label)
    except pkcs11.NoSuchToken:
        present = sorted({t.label for t in lib.get_tokens() if t.label})  # a free slot has no label
        found = ", ".join(repr(t) for t in present) or "none"
        # SoftHSM2 reads which store to look in from SOFTHSM2_CONF: a shell without it sees another store
        # (often empty), the commonest reason a token made a minute ago is "not present".
        softhsm = ""
        if "softhsm" in os.path.basename(module_path).lower() and not os.environ.get("SOFTHSM2_CONF"):
            softhsm = "; SOFTHSM2_CONF is not set: set it to the SoftHSM2 config the token was made with"
        raise CredentialError(
            f"{_TOKEN_KEY}: no token labelled {label!r} is present (tokens present: {found}); "
            f"insert or initialise the token, or fix the label{softhsm}",
            _TOKEN_KEY,
        ) from None


@dataclass
class _OpenSession:
    session: Any
    pin_digest: bytes
    lock: threading.Lock


# One logged-in session per token, kept for the life of the process. PKCS#11 login is per application,
# not per session: python-pkcs11 logs the whole process out when a session it logged in closes, which
# would also log out awscrt's session and fail its next TLS handshake (a retried claim connect). So the
# session stays open, and awscrt's own login finds the token already logged in (which it accepts).
_SESSIONS: dict[tuple[str, str], _OpenSession] = {}
_SESSIONS_LOCK = threading.Lock()


def forget_sessions() -> None:
    """Drop the kept sessions (after the library was finalised, e.g. a test's fresh SoftHSM2 folder)."""
    with _SESSIONS_LOCK:
        _SESSIONS.clear()


def _session(token: Pkcs11Config, pin: str) -> _OpenSession:
    """The kept session for `token`, opened (and logged in with `pin`) when there is none for this PIN."""
    import pkcs11

    digest = hashlib.sha256(pin.encode()).digest()  # to notice a changed PIN file, without keeping it
    key = (token.module_path, token.token_label)
    with _SESSIONS_LOCK:
        kept = _SESSIONS.get(key)
        if kept is not None and kept.pin_digest == digest:
            return kept
        if kept is not None:  # another PIN: log out, so the new one is really checked
            with contextlib.suppress(pkcs11.PKCS11Error):
                kept.session.close()
            del _SESSIONS[key]
        lib = _load_library(token.module_path)
        found = _find_token(lib, token.token_label, token.module_path)
        try:
            session = found.open(user_pin=pin, rw=True)
        except pkcs11.UserAlreadyLoggedIn:
            # awscrt logged this process in first (with the same PIN file): a session shares that login.
            session = found.open(rw=True)
        except (pkcs11.PinIncorrect, pkcs11.PinInvalid, pkcs11.PinLenRange):
            raise CredentialError(
                f"{_PIN_KEY}: token {token.token_label!r} refused the PIN in {token.pin_path}; "
                "write the token's user PIN there",
                _PIN_KEY,
            ) from None
        except pkcs11.PinLocked:
            raise CredentialError(
                f"{_PIN_KEY}: the user PIN of token {token.token_label!r} is locked after too many wrong "
                "attempts; unlock it with the security officer PIN, then run again",
                _PIN_KEY,
            ) from None
        except pkcs11.PKCS11Error as exc:
            raise token_error(exc, token, "open a session") from None
        kept = _OpenSession(session, digest, threading.Lock())
        _SESSIONS[key] = kept
        return kept


def _require_python_pkcs11() -> None:
    """A hub image installed without the [pkcs11] extra says so in one line, not with a traceback."""
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        raise CredentialError(
            f"{_MODULE_KEY}: the keys are in a PKCS#11 token but python-pkcs11 is not installed; "
            "install it with pip install 'hub-onboarding[pkcs11]'",
            _MODULE_KEY,
        ) from None


@contextlib.contextmanager
def open_token(token: Pkcs11Config) -> Iterator[Any]:
    """The logged-in session on the configured token, for one operation at a time (a lock: fleet-sim runs
    hubs on threads); every failure is a CredentialError naming its key. The PIN file is checked on
    every use."""
    _require_python_pkcs11()
    import pkcs11

    kept = _session(token, read_pin(token.pin_path))
    with kept.lock:
        try:
            yield kept.session
        except pkcs11.PKCS11Error as exc:
            raise token_error(exc, token, "finish the operation") from None


def token_error(exc: Exception, token: Pkcs11Config, action: str) -> CredentialError:
    """A library error as one line naming the setting to look at (pure: tests pass exceptions)."""
    import pkcs11

    name = type(exc).__name__
    if isinstance(exc, pkcs11.DeviceMemory | pkcs11.HostMemory):
        return CredentialError(
            f"{_TOKEN_KEY}: token {token.token_label!r} is full and could not {action} ({name}); "
            "delete objects it no longer needs, or use a token with room",
            _TOKEN_KEY,
        )
    if isinstance(exc, pkcs11.TokenNotPresent | pkcs11.DeviceRemoved | pkcs11.TokenNotRecognised):
        return CredentialError(
            f"{_TOKEN_KEY}: token {token.token_label!r} is not present ({name}); insert it and run again",
            _TOKEN_KEY,
        )
    if isinstance(exc, pkcs11.TokenWriteProtected | pkcs11.SessionReadOnly):
        return CredentialError(
            f"{_TOKEN_KEY}: token {token.token_label!r} is write-protected and could not {action}", _TOKEN_KEY
        )
    return CredentialError(
        f"{_TOKEN_KEY}: token {token.token_label!r} could not {action} ({name}); check the token with its "
        "vendor's tool (softhsm2-util --show-slots for SoftHSM2)",
        _TOKEN_KEY,
    )


# ------------------------------------------------------------------------------------- key objects


def _objects(session: Any, label: str, object_class: Any) -> list[Any]:
    import pkcs11

    return list(session.get_objects({pkcs11.Attribute.CLASS: object_class, pkcs11.Attribute.LABEL: label}))


def _private_key(session: Any, token: Pkcs11Config, label: str, part: str) -> Any:
    import pkcs11

    keys = _objects(session, label, pkcs11.ObjectClass.PRIVATE_KEY)
    if not keys:
        raise CredentialError(
            f"no private key {label!r} in token {token.token_label!r}; import the key under that label "
            "or fix the URI's object=",
            part=part,
        )
    if len(keys) > 1:
        raise CredentialError(
            f"token {token.token_label!r} holds {len(keys)} private keys labelled {label!r}; keep one",
            part=part,
        )
    return keys[0]


def _signature_kind(key: Any, label: str) -> str:
    import pkcs11

    key_type = key[pkcs11.Attribute.KEY_TYPE]
    if key_type == pkcs11.KeyType.EC:
        return "EC"
    if key_type == pkcs11.KeyType.RSA:
        return "RSA"
    raise CredentialError(
        f"private key {label!r} is a {getattr(key_type, 'name', key_type)} key; AWS IoT Core accepts RSA "
        "(2048 bits or more) and EC (P-256, P-384) keys only: put one of those in the token",
        part="private key",
    )


def check_endpoint_key(cert: x509.Certificate, label: str) -> None:
    """The certificate's key must be one AWS IoT Core accepts for mutual TLS (RSA >= 2048, EC P-256/384)."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    public = cert.public_key()
    if isinstance(public, rsa.RSAPublicKey) and public.key_size >= 2048:
        return
    if isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name in ("secp256r1", "secp384r1"):
        return
    what = (
        f"RSA-{public.key_size}"
        if isinstance(public, rsa.RSAPublicKey)
        else f"EC {public.curve.name}"
        if isinstance(public, ec.EllipticCurvePublicKey)
        else type(public).__name__
    )
    raise CredentialError(
        f"{label}: the key is {what}, a type the endpoint cannot use; AWS IoT Core accepts RSA "
        "(2048 bits or more) and EC P-256 or P-384 keys: make a key of one of those types",
        part="private key",
    )


def sign(key: Any, kind: str, data: bytes) -> bytes:
    """A DER-ready signature by the token: ECDSA P-256 over SHA-256 (DER), or RSA PKCS#1 v1.5 SHA-256.

    SoftHSM2 2.6 has no CKM_ECDSA_SHA256: the digest is made here and the token signs it (CKM_ECDSA),
    which is the same signature; the token answers r||s, which X.509 wants as a DER SEQUENCE.
    """
    import pkcs11
    from pkcs11.util.ec import encode_ecdsa_signature

    if kind == "EC":
        raw = key.sign(hashlib.sha256(data).digest(), mechanism=pkcs11.Mechanism.ECDSA)
        return bytes(encode_ecdsa_signature(raw))
    return bytes(key.sign(data, mechanism=pkcs11.Mechanism.SHA256_RSA_PKCS))


def prove_possession(key: Any, kind: str, cert: x509.Certificate, label: str) -> None:
    """The token signs a fresh challenge; the certificate's public key must verify it."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    challenge = os.urandom(32)
    signature = sign(key, kind, challenge)
    public = cert.public_key()
    try:
        if isinstance(public, ec.EllipticCurvePublicKey) and kind == "EC":
            public.verify(signature, challenge, ec.ECDSA(hashes.SHA256()))
            return
        if isinstance(public, rsa.RSAPublicKey) and kind == "RSA":
            public.verify(signature, challenge, padding.PKCS1v15(), hashes.SHA256())
            return
    except InvalidSignature:
        pass
    raise CredentialError(
        f"{label}: the key object does not belong to the certificate (the certificate's public key does "
        "not verify the token's signature); install the matching pair"
    )


# ------------------------------------------------------------------------------------------- the store


def cert_handler(
    token: Pkcs11Config | None, secure_storage_handler: str | None = None, *, owner: str | None = None
) -> CertHandler:
    """A CertHandler that reads (and keeps keys) through `token` when one is set; `owner`: see
    Pkcs11CredentialStore."""
    from hub_onboarding.certs import CertHandler

    store = Pkcs11CredentialStore(token, owner=owner) if token is not None else None
    return CertHandler(secure_storage_handler, store)


def owned_key_id(label: str, owner: str | None) -> bytes:
    """The CKA_ID of an object onboarding makes under `label` for the config `owner` (its real path).

    Ownership is part of the object from its birth, so no record written beside it has to survive a power
    cut for a later run to tell its own key from another config's. None: the label alone (factory)."""
    data = label if owner is None else f"{label}\0{owner}"
    return hashlib.sha256(data.encode()).digest()[:16]


class Pkcs11CredentialStore:
    """CertHandler's store for a PKCS#11 token (entry point `pkcs11` in hub_onboarding.secure_storage).

    `owner`: the real path of the config onboarding runs for. The permanent key objects it makes carry
    `owned_key_id(label, owner)`, and objects under the label with another id are another config's: never
    reused, replaced or deleted (ConfigError). None (the factory, tools): every object is its own."""

    def __init__(self, token: Pkcs11Config | None = None, *, owner: str | None = None) -> None:
        self.token = token
        self.owner = owner

    def check_ready(
        self, permanent_label: str | None = None, *, need_room: bool = False, service_key: bool = False
    ) -> None:
        """Open the token (module, PIN file, PIN, presence): before any traffic, so a token that cannot
        take the permanent key stops onboarding before a certificate is minted for it.

        With `permanent_label`, refuse another config's objects under it (ConfigError, nothing touched).
        With `need_room` too, prove the token has room for the key by making one like it under a trial
        label (with this config's id) and destroying it at once: a token's free space is not something
        PKCS#11 reports truthfully (SoftHSM2 says CK_UNAVAILABLE_INFORMATION, HSMs count bytes and
        objects differently), but making the object is the question itself. `service_key`: the key will
        be imported (CreateKeysAndCertificate: an RSA-2048 key, as the service makes), else generated in
        the token (CSR: a pair of the configured type). No trial when the run needs no new room: a
        whole pair of ours that a CSR run reuses (a rerun after a cut at KEY_IN_TOKEN), or, for an
        import, a key of ours the import deletes first (it frees an object for the one it stores)."""
        token = self._config()
        with open_token(token) as session:
            if permanent_label is None:
                return
            ours, _ = self._split(session, permanent_label, refuse=True)
            if not need_room:
                return
            if service_key:
                needs_trial = not any(_is_private(o) for o in ours)
            else:
                needs_trial = self._reusable_pair(ours, token) is None
            if needs_trial:
                trial = permanent_label + TRIAL_LABEL_SUFFIX
                _prove_room(session, token, trial, self._id(trial), service_key=service_key)
            else:
                log.info("no room check: the token holds this hub's key %r already", permanent_label)

    def _id(self, label: str) -> bytes:
        return owned_key_id(label, self.owner)

    def _split(
        self, session: Any, label: str, *, refuse: bool, note: str = _UNTOUCHED
    ) -> tuple[list[Any], list[Any]]:
        """The objects under `label`: (ours, another config's). With `refuse`, another config's objects
        are a ConfigError: onboarding would otherwise act on that hub's live key by its label alone."""
        import pkcs11

        mine = self._id(label)
        ours: list[Any] = []
        foreign: list[Any] = []
        for obj in session.get_objects({pkcs11.Attribute.LABEL: label}):
            if self.owner is None:
                ours.append(obj)
                continue
            try:
                object_id = bytes(obj[pkcs11.Attribute.ID])
            except pkcs11.PKCS11Error:
                object_id = b""
            (ours if object_id == mine else foreign).append(obj)
        if foreign and refuse:
            raise foreign_key_error(self._config(), label, len(foreign), note)
        return ours, foreign

    @staticmethod
    def _reusable_pair(ours: list[Any], token: Pkcs11Config) -> Any | None:
        """The public half of a whole pair of ours a CSR can reuse (key_for_csr's rule), else None."""
        import pkcs11

        private = [o for o in ours if _is_private(o)]
        public = [o for o in ours if o[pkcs11.Attribute.CLASS] == pkcs11.ObjectClass.PUBLIC_KEY]
        if (
            len(private) == 1
            and len(public) == 1
            and private[0][pkcs11.Attribute.KEY_TYPE] == public[0][pkcs11.Attribute.KEY_TYPE]
            and _is_locked_in(private[0])
            and _kind_of(private[0]) == _wanted_kind(token.key_type)
        ):
            return public[0]
        return None

    def _claim_label(self, session: Any, label: str, action: str) -> None:
        """After making objects under `label`: if another config made some there meanwhile (two runs
        racing past their checks), ours go and the run is refused; so two keys never stay under one
        label, and the other config's is never touched."""
        ours, foreign = self._split(session, label, refuse=False)
        if foreign:
            for obj in ours:
                obj.destroy()
            raise foreign_key_error(
                self._config(),
                label,
                len(foreign),
                f"found after this run could {action}: its objects deleted",
            )

    def _config(self) -> Pkcs11Config:
        if self.token is None:
            raise CredentialError(
                f"the pkcs11 handler needs {_MODULE_KEY}, {_TOKEN_KEY} and {_PIN_KEY}; set all three",
                _TOKEN_KEY,
            )
        return self.token

    def _uri(self, ref: str, cert_type: CertType, *, is_key: bool) -> TokenUri:
        token = self._config()
        if ref == SECURE_STORAGE:
            cert_label, key_label = DEFAULT_OBJECTS.get(str(cert_type), ("", ""))
            if not cert_label:
                raise CredentialError(f"{SECURE_STORAGE} has no default {cert_type} object in the token")
            return TokenUri(key_label if is_key else cert_label, "private" if is_key else "cert")
        part = "private key" if is_key else "certificate"
        uri = TokenUri.parse(ref, part=part)
        # The URI is never repeated in a message (it may carry a PIN); its parsed fields are.
        if uri.token is not None and uri.token != token.token_label:
            raise CredentialError(
                f"pkcs11 URI: token={uri.token!r} but {_TOKEN_KEY} is {token.token_label!r}; "
                "keys are read from the configured token",
                part=part,
            )
        wanted = "private" if is_key else "cert"
        if uri.type is not None and uri.type != wanted:
            raise CredentialError(
                f"pkcs11 URI: type={uri.type} but this setting names a {part}; write type={wanted} "
                "or leave type= out",
                part=part,
            )
        return uri

    @staticmethod
    def _check_id(found: Any, uri: TokenUri, part: str) -> None:
        """A URI's id= must be the CKA_ID of the object its object= label found (never silently ignored)."""
        import pkcs11

        if uri.id is None:
            return
        try:
            actual = bytes(found[pkcs11.Attribute.ID])
        except pkcs11.AttributeTypeInvalid:
            actual = b""
        if actual != uri.id:
            raise CredentialError(
                f"pkcs11 URI: the {part} object {uri.label!r} has another id than the URI's id=; "
                "fix id= or leave it out",
                part=part,
            )

    def read_credentials(self, cert_type: CertType, cert_ref: str, key_ref: str) -> Credentials:
        """The certificate (token object or PEM file) and the token's key that belongs to it."""
        from hub_onboarding.certs import Credentials, certificate_id, check_validity_period, load_certificate

        token = self._config()
        label = f"{cert_type} private key"
        if key_ref != SECURE_STORAGE and not cfgmod.is_pkcs11_uri(key_ref):
            raise CredentialError(f"{label}: the setting is not a pkcs11: URI", part="private key")
        with open_token(token) as session:  # the token's own problems first: module, PIN, presence
            key_uri = self._uri(key_ref, cert_type, is_key=True)
            cert_pem = self._certificate(session, cert_type, cert_ref)
            cert = load_certificate(cert_pem, f"{cert_type} certificate")
            key = _private_key(session, token, key_uri.label, "private key")
            self._check_id(key, key_uri, "private key")
            kind = _signature_kind(key, key_uri.label)
            check_endpoint_key(cert, label)
            prove_possession(key, kind, cert, str(cert_type))
        if str(cert_type) == "claim":
            check_validity_period(cert, str(cert_type))
        token_key = TokenKey(token.module_path, token.token_label, key_uri.label, token.pin_path, kind)
        return Credentials(cert_pem, b"", certificate_id(cert), token_key=token_key)

    def _certificate(self, session: Any, cert_type: CertType, cert_ref: str) -> bytes:
        import pkcs11
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        from hub_onboarding.certs import read_certificate_file

        if cert_ref != SECURE_STORAGE and not cfgmod.is_pkcs11_uri(cert_ref):
            return read_certificate_file(cert_ref, f"{cert_type} certificate")
        uri = self._uri(cert_ref, cert_type, is_key=False)
        found = _objects(session, uri.label, pkcs11.ObjectClass.CERTIFICATE)
        if len(found) != 1:
            many = f"{len(found)} certificates" if found else "no certificate"
            raise CredentialError(
                f"token {self._config().token_label!r} holds {many} labelled {uri.label!r}; import exactly "
                "one certificate under that label or fix the URI's object=",
                part="certificate",
            )
        self._check_id(found[0], uri, "certificate")
        der = bytes(found[0][pkcs11.Attribute.VALUE])
        try:
            return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
        except ValueError:
            raise CredentialError(
                f"certificate object {uri.label!r} is not an X.509 certificate", part="certificate"
            ) from None

    # ------------------------------------------------------------------ the permanent key

    def key_for_csr(self, label: str) -> tuple[TokenKey, bytes]:
        """The permanent pair under `label` (reused when whole, else made anew) and its public key's SPKI.

        Returns (TokenKey, DER SubjectPublicKeyInfo). A half-made pair (a private key without its public
        half, or more than one key) is deleted first: a label never holds two keys.
        """
        token = self._config()
        with open_token(token) as session:
            ours, _ = self._split(session, label, refuse=True)  # another config's key is never touched
            pub = self._reusable_pair(ours, token)
            if pub is not None:
                log.info("reusing this hub's key pair %r left in token %r", label, token.token_label)
            else:
                for obj in ours:
                    obj.destroy()
                if ours:
                    log.warning("deleted %d half-made object(s) labelled %r in the token", len(ours), label)
                pub = _generate(session, token, label, self._id(label))
                self._claim_label(session, label, "make the permanent key")
            spki = _spki(pub)
        kind = _wanted_kind(token.key_type)
        return TokenKey(token.module_path, token.token_label, label, token.pin_path, kind), spki

    def sign_csr(self, key: TokenKey, spki: bytes, common_name: str) -> bytes:
        """A PKCS#10 request for `spki`, signed inside the token by `key`: PEM."""
        from asn1crypto import csr as acsr
        from asn1crypto import keys as akeys
        from asn1crypto import pem
        from asn1crypto import x509 as ax509

        info = acsr.CertificationRequestInfo(
            {
                "version": "v1",
                "subject": ax509.Name.build({"common_name": common_name}),
                "subject_pk_info": akeys.PublicKeyInfo.load(spki),
                "attributes": [],
            }
        )
        token = self._config()
        with open_token(token) as session:
            private = _private_key(session, token, key.label, "private key")
            signature = sign(private, key.key_type, info.dump())
        algorithm = "sha256_ecdsa" if key.key_type == "EC" else "sha256_rsa"
        request = acsr.CertificationRequest(
            {
                "certification_request_info": info,
                "signature_algorithm": {"algorithm": algorithm},
                "signature": signature,
            }
        )
        return bytes(pem.armor("CERTIFICATE REQUEST", request.dump()))

    def import_private_key(self, label: str, key_pem: bytes) -> TokenKey:
        """Put a service-made key into the token (sensitive, non-extractable) under `label`, alone."""
        import pkcs11

        token = self._config()
        attrs, kind = _imported_key_attrs(label, key_pem, self._id(label))
        with open_token(token) as session:
            # Another config's key is never overwritten (the caller names the certificate just minted).
            ours, _ = self._split(session, label, refuse=True, note="nothing was touched in the token")
            for obj in ours:
                obj.destroy()
            try:
                session.create_object(attrs)
            except pkcs11.PKCS11Error as exc:
                raise token_error(exc, token, "store the new key") from None
            self._claim_label(session, label, "store the new key")
        return TokenKey(token.module_path, token.token_label, label, token.pin_path, kind)

    def store_certificate(self, label: str, cert_pem: bytes) -> str:
        """Put a certificate into the token under `label`, alone (a factory's job); its URI."""
        import pkcs11
        from cryptography.hazmat.primitives import serialization

        from hub_onboarding.certs import load_certificate

        token = self._config()
        cert = load_certificate(cert_pem, "certificate")
        attrs = {
            pkcs11.Attribute.CLASS: pkcs11.ObjectClass.CERTIFICATE,
            pkcs11.Attribute.CERTIFICATE_TYPE: pkcs11.CertificateType.X_509,
            pkcs11.Attribute.TOKEN: True,
            pkcs11.Attribute.PRIVATE: False,
            pkcs11.Attribute.LABEL: label,
            pkcs11.Attribute.SUBJECT: cert.subject.public_bytes(),
            pkcs11.Attribute.VALUE: cert.public_bytes(serialization.Encoding.DER),
        }
        _replace_label(token, label, attrs, "store the certificate")
        return format_uri(token.token_label, label, "cert")

    def delete_label(self, label: str) -> int:
        """Delete every object under `label` that is ours (all of them without an owner); how many."""
        return self.delete_own(label)[0]

    def delete_own(self, label: str) -> tuple[int, int]:
        """Delete this config's objects under `label` (reset): (how many, how many of another config's
        were left there)."""
        with open_token(self._config()) as session:
            ours, foreign = self._split(session, label, refuse=False)
            for obj in ours:
                obj.destroy()
            return len(ours), len(foreign)

    def describe_key(self, label: str) -> dict[str, Any]:
        """What the token says about the key under `label` (for tests and `status`): no key material."""
        import pkcs11

        token = self._config()
        with open_token(token) as session:
            keys = _objects(session, label, pkcs11.ObjectClass.PRIVATE_KEY)
            return {
                "count": len(keys),
                "sensitive": [bool(k[pkcs11.Attribute.SENSITIVE]) for k in keys],
                "extractable": [bool(k[pkcs11.Attribute.EXTRACTABLE]) for k in keys],
                "kind": [_kind_of(k) for k in keys],
            }


def _imported_key_attrs(label: str, key_pem: bytes, key_id: bytes) -> tuple[dict[Any, Any], str]:
    """The template that stores `key_pem` under `label` with CKA_ID `key_id` (sensitive,
    non-extractable), and its kind."""
    import pkcs11
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from pkcs11.util.ec import decode_ec_private_key
    from pkcs11.util.rsa import decode_rsa_private_key

    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (TypeError, ValueError):
        raise CredentialError("the service's private key is not a PEM key this hub can use") from None
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    if isinstance(key, rsa.RSAPrivateKey):
        attrs, kind = decode_rsa_private_key(der), "RSA"
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        attrs, kind = decode_ec_private_key(der), "EC"
    else:
        raise CredentialError(f"the service's key is a {type(key).__name__}, not RSA or EC")
    del key, der  # nothing of the key stays here once it is in the token
    attrs.update(
        {
            pkcs11.Attribute.TOKEN: True,
            pkcs11.Attribute.PRIVATE: True,
            pkcs11.Attribute.SENSITIVE: True,
            pkcs11.Attribute.EXTRACTABLE: False,
            pkcs11.Attribute.SIGN: True,
            pkcs11.Attribute.LABEL: label,
            pkcs11.Attribute.ID: key_id,
        }
    )
    return attrs, kind


def _prove_room(session: Any, token: Pkcs11Config, label: str, key_id: bytes, *, service_key: bool) -> None:
    """Make a key like the permanent one under `label` (CKA_ID `key_id`) and destroy it (check_ready): a
    full token answers here, before any traffic, with the error the real operation would get. Only
    objects with `key_id` are deleted: another config's trial under the same label is its own."""
    import pkcs11
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    _delete_label(session, label, key_id)  # a trial a power cut left behind
    try:
        if service_key:
            # A throwaway key of the kind the service makes, stored as the service's key will be.
            trial = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            attrs, _ = _imported_key_attrs(label, trial, key_id)
            try:
                session.create_object(attrs)
            except pkcs11.PKCS11Error as exc:
                raise token_error(exc, token, "store the permanent key (room check)") from None
        else:
            _generate(session, token, label, key_id)
    finally:
        _delete_label(session, label, key_id)


def foreign_key_error(token: Pkcs11Config, label: str, count: int, note: str = _UNTOUCHED) -> ConfigError:
    """Another config's objects under the permanent key's label: the SN is that hub's in this token.
    A ConfigError (exit 3), as for a credentials folder another config owns: the config's SN (or token) is
    the mistake, not a credential; nothing of the other hub's is touched."""
    return ConfigError(
        f"{_SN_KEY}: token {token.token_label!r} ({_TOKEN_KEY}) holds {count} object(s) labelled {label!r} "
        f"that another config made: another config holds this SN's key in this token; use another "
        f"{_SN_KEY}, or reset that config first ({note})",
        key=_SN_KEY,
    )


def _is_private(obj: Any) -> bool:
    import pkcs11

    return bool(obj[pkcs11.Attribute.CLASS] == pkcs11.ObjectClass.PRIVATE_KEY)


def _is_locked_in(key: Any) -> bool:
    import pkcs11

    return bool(key[pkcs11.Attribute.SENSITIVE]) and not bool(key[pkcs11.Attribute.EXTRACTABLE])


def _kind_of(key: Any) -> str:
    import pkcs11

    return "EC" if key[pkcs11.Attribute.KEY_TYPE] == pkcs11.KeyType.EC else "RSA"


def _wanted_kind(key_type: TokenKeyType) -> str:
    return "EC" if key_type is TokenKeyType.EC_P256 else "RSA"


def _replace_label(token: Pkcs11Config, label: str, attrs: dict[Any, Any], action: str) -> None:
    """Create one object under `label`, alone: whatever was under it goes first (one key per label)."""
    import pkcs11

    with open_token(token) as session:
        _delete_label(session, label)
        try:
            session.create_object(attrs)
        except pkcs11.PKCS11Error as exc:
            raise token_error(exc, token, action) from None


def _delete_label(session: Any, label: str, key_id: bytes | None = None) -> int:
    """Destroy the objects under `label` (only those with CKA_ID `key_id`, when given); how many."""
    import pkcs11

    template: dict[Any, Any] = {pkcs11.Attribute.LABEL: label}
    if key_id is not None:
        template[pkcs11.Attribute.ID] = key_id
    found = list(session.get_objects(template))
    for obj in found:
        obj.destroy()
    return len(found)


def _generate(session: Any, token: Pkcs11Config, label: str, key_id: bytes) -> Any:
    """A new pair in the token, both halves with CKA_ID `key_id` (it ties them together, and to their
    owner): the private half sensitive and non-extractable. Returns the public half."""
    import pkcs11
    from pkcs11.util.ec import encode_named_curve_parameters

    private_template = {
        pkcs11.Attribute.SENSITIVE: True,
        pkcs11.Attribute.EXTRACTABLE: False,
        pkcs11.Attribute.PRIVATE: True,
        pkcs11.Attribute.SIGN: True,
    }
    try:
        if token.key_type is TokenKeyType.EC_P256:
            params = session.create_domain_parameters(
                pkcs11.KeyType.EC,
                {pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                local=True,
            )
            public, _ = params.generate_keypair(
                store=True, label=label, id=key_id, private_template=private_template
            )
        else:
            public, _ = session.generate_keypair(
                pkcs11.KeyType.RSA,
                2048,
                store=True,
                label=label,
                id=key_id,
                private_template=private_template,
            )
    except pkcs11.PKCS11Error as exc:
        raise token_error(exc, token, f"generate the permanent key ({token.key_type.value})") from None
    return public


def _spki(public: Any) -> bytes:
    """DER SubjectPublicKeyInfo of a public key object."""
    import pkcs11
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from pkcs11.util.ec import encode_ec_public_key

    if public[pkcs11.Attribute.KEY_TYPE] == pkcs11.KeyType.EC:
        return bytes(encode_ec_public_key(public))
    numbers = rsa.RSAPublicNumbers(
        int.from_bytes(public[pkcs11.Attribute.PUBLIC_EXPONENT], "big"),
        int.from_bytes(public[pkcs11.Attribute.MODULUS], "big"),
    )
    return numbers.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
