"""HubOnboarding: the orchestrator. Reads the config, drives fleet provisioning or JITR, records the result.

    HubOnboarding(config_path).is_provisioned()   -> bool (reads rw.iot_provisioning_state only)
    HubOnboarding(config_path).process_device()   -> OnboardingResult (no network when provisioned)
    HubOnboarding(config_path, on_step=print)     -> each step as a StepEvent (OnboardingStep + message)

Order of work in process_device, so that a power cut anywhere leaves a hub that resumes:
 1. validate the config, refuse read paths that name files onboarding writes, check that the folders it
    writes to take a new file, and read the credentials the next step needs (no network, nothing
    written: no certificate is minted that could not be stored);
 2. take the onboarding lock (`<config>.lock`; a wait is reported at once); re-read the config: if
    another run finished meanwhile, report its result;
 3. fleet provisioning, resumable (see progress.py): connect with the claim certificate (client id: SN),
    CreateKeysAndCertificate / CreateCertificateFromCsr, store the new pair and the progress record,
    RegisterThing, record its answer, connect with the new certificate (verification);
    or JITR: connect with the DHA certificate, retrying with backoff until the cloud has activated it;
 4. update the config: paths, client_id, managed_thing_id, then state PROVISIONED (each an atomic
    write that also sets metadata.last_updated_epoch_time); then delete the progress record.

The network sits behind two Protocols: a `Connector` (claim session, JITR, verification connect and the
retry policy: DeviceProvisioner) made per run by `provisioner_factory`, and the `FleetApi` a claim
session offers. Fleet provisioning is a table keyed on the next action (`progress.next_action`), so a
resumed run enters it wherever the saved progress says. Time comes from `clock` (wall-clock seconds: a
token's age survives a reboot), so tests drive it instead of patching `time`.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from hub_onboarding import _files
from hub_onboarding import config as cfgmod
from hub_onboarding.certs import (
    PERMANENT_CERT_NAME,
    PERMANENT_KEY_NAME,
    CertHandler,
    CertType,
    Credentials,
    common_name,
    generate_key_and_csr,
    load_certificate,
)
from hub_onboarding.config import (
    DEFAULT_CONFIG_PATH,
    CertificateMethod,
    FleetConfig,
    HubConfig,
    ProvisioningMethod,
    ProvisioningState,
)
from hub_onboarding.errors import (
    ConfigError,
    CredentialError,
    IdentityError,
    OnboardingError,
    ProvisioningError,
    StorageError,
)
from hub_onboarding.lock import lock_path_for, onboarding_lock
from hub_onboarding.manifest import MANIFEST_FILE_NAME, FilesRecord, Manifest
from hub_onboarding.pkcs11 import (
    TRIAL_LABEL_SUFFIX,
    Pkcs11CredentialStore,
    cert_handler,
    factory_labels,
    format_uri,
    permanent_key_label,
)
from hub_onboarding.progress import PROGRESS_FILE_NAME, Action, Progress, ProgressStore, Step, next_action

if TYPE_CHECKING:
    from hub_onboarding.device_provisioner import Retry, RetryListener
    from hub_onboarding.fleet import FleetApi, IssuedCertificate

log = logging.getLogger(__name__)

# The CN of a CSR is limited to 64 characters by X.509; AWS ignores the CSR's subject anyway.
_CSR_CN_MAX = 64


@dataclass(frozen=True)
class Timeouts:
    """Every wait onboarding does, in seconds. `retry` None: ro.mqtt_retry_timeout_seconds (300)."""

    connect: float = 30.0
    operation: float = 30.0
    retry: float | None = None
    lock: float = 600.0

    def retry_for(self, cfg: HubConfig) -> float:
        """The retry budget of this run: `retry`, else the config's."""
        return self.retry if self.retry is not None else cfg.connection.retry_timeout


class OnboardingStep(enum.StrEnum):
    """What the orchestrator reports (`StepEvent.step`), roughly in the order of a run.

    STARTING_OVER, TOKEN_REFUSED, RETRY and WAITING_FOR_LOCK are notes about the way, not progress: a
    terminal does not number them (they are logged as warnings or information).
    """

    ALREADY_PROVISIONED = "ALREADY_PROVISIONED"
    PROVISIONED_MEANWHILE = "PROVISIONED_MEANWHILE"  # another run held the lock and finished
    CONFIG_READ = "CONFIG_READ"
    STARTING_OVER = "STARTING_OVER"  # a saved record that cannot be resumed
    RESUMED_AFTER_CERTIFICATE_ISSUED = "RESUMED_AFTER_CERTIFICATE_ISSUED"
    RESUMED_AFTER_THING_REGISTERED = "RESUMED_AFTER_THING_REGISTERED"
    RESUMED_AFTER_VERIFIED = "RESUMED_AFTER_VERIFIED"
    CLAIM_CONNECTED = "CLAIM_CONNECTED"
    CERTIFICATE_ISSUED = "CERTIFICATE_ISSUED"
    # The permanent key is in the PKCS#11 token (made there, or imported). A step name, not a secret.
    KEY_IN_TOKEN = "KEY_IN_TOKEN"  # noqa: S105
    CREDENTIALS_STORED = "CREDENTIALS_STORED"
    THING_REGISTERED = "THING_REGISTERED"
    # The saved ownership token was spent or expired: one new certificate. (A step name, not a secret.)
    TOKEN_REFUSED = "TOKEN_REFUSED"  # noqa: S105
    VERIFIED = "VERIFIED"
    VERIFY_SKIPPED = "VERIFY_SKIPPED"
    JITR_CONNECTED = "JITR_CONNECTED"
    RETRY = "RETRY"
    RECORDED = "RECORDED"  # the config says PROVISIONED
    WAITING_FOR_LOCK = "WAITING_FOR_LOCK"  # another run holds the onboarding lock

    @classmethod
    def resumed_after(cls, step: Step) -> OnboardingStep:
        return cls(f"RESUMED_AFTER_{step.value}")


_NOTES = frozenset(
    {
        OnboardingStep.STARTING_OVER,
        OnboardingStep.TOKEN_REFUSED,
        OnboardingStep.RETRY,
        OnboardingStep.WAITING_FOR_LOCK,
    }
)


@dataclass(frozen=True)
class StepEvent:
    """One step of a run: what happened (`step`) and the line a person reads (`message`, also logged)."""

    step: OnboardingStep
    message: str

    @property
    def is_progress(self) -> bool:
        """False for the notes (retries, a record started over): a progress display skips them."""
        return self.step not in _NOTES

    def to_dict(self) -> dict[str, str]:
        return {"step": self.step.value, "message": self.message}

    def __str__(self) -> str:
        return self.message


StepListener = Callable[[StepEvent], None]


class Connector(Protocol):
    """The network side of onboarding, one attempt at a time, with the retry policy (DeviceProvisioner)."""

    def claim_session(
        self, client_id: str, claim: Credentials, deadline: float | None = None
    ) -> AbstractContextManager[FleetApi]: ...

    def provision_jitr(
        self, client_id: str, dha: Credentials, on_retry: RetryListener | None = None
    ) -> int: ...

    def verify(self, client_id: str, credentials: Credentials, deadline: float | None = None) -> None: ...

    def deadline(self) -> float: ...

    def wait_before_retry(
        self, exc: ProvisioningError, attempt: int, deadline: float, on_retry: RetryListener | None = None
    ) -> None: ...


ProvisionerFactory = Callable[[HubConfig, Timeouts], Connector]


def mqtt_provisioner(cfg: HubConfig, timeouts: Timeouts) -> Connector:
    """The real connector: DeviceProvisioner over awscrt MQTT 5 (imported here, so status and reset never
    load the MQTT modules)."""
    from hub_onboarding.device_provisioner import DeviceProvisioner
    from hub_onboarding.mqtt import ConnectionSettings, IotProvisioning

    settings = ConnectionSettings(
        cfg.connection.endpoint,
        cfg.connection.root_ca_path,
        cfg.connection.keep_alive,
        timeouts.connect,
        endpoint_key=cfg.connection.endpoint_key,
        template_name=cfg.fleet.template_name if cfg.fleet else None,
    )
    return DeviceProvisioner(
        IotProvisioning(settings), operation_timeout=timeouts.operation, retry_timeout=timeouts.retry_for(cfg)
    )


@dataclass(frozen=True)
class OnboardingResult:
    state: str
    method: str | None
    client_id: str | None
    managed_thing_id: str | None
    certificate_path: str | None
    private_key_path: str | None
    thing_name: str | None = None
    changed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "method": self.method,
            "client_id": self.client_id,
            "managed_thing_id": self.managed_thing_id,
            "certificate_path": self.certificate_path,
            "private_key_path": self.private_key_path,
            "thing_name": self.thing_name,
            "changed": self.changed,
        }


def _result_from(doc: Mapping[str, Any], *, changed: bool, thing_name: str | None = None) -> OnboardingResult:
    ro = doc.get(cfgmod.RO) or {}
    rw = doc.get(cfgmod.RW) or {}

    def s(v: object) -> str | None:
        return v if isinstance(v, str) else None

    return OnboardingResult(
        state=str(rw.get(cfgmod.PROVISIONING_STATE, ProvisioningState.NOT_PROVISIONED.value)),
        # The method that is (or would be) used: an invalid value in the config means JITR, as in the SDK.
        method=cfgmod.method_choice(ro).method.value,
        client_id=s(rw.get(cfgmod.CLIENT_ID)),
        managed_thing_id=s(rw.get(cfgmod.MANAGED_THING_ID)),
        certificate_path=s(rw.get(cfgmod.PERMANENT_CERT_PATH)),
        private_key_path=s(rw.get(cfgmod.PERMANENT_PK_PATH)),
        thing_name=thing_name,
        changed=changed,
    )


class HubOnboarding:
    """The SDK's HubOnboarding, in Python. `on_step` hears of each step as a StepEvent (for a CLI).

    `provisioner_factory(cfg, timeouts)` makes the network side of one run (default: DeviceProvisioner
    over awscrt); `clock` is the wall clock in seconds (the age of a saved ownership token, the config's
    metadata.last_updated_epoch_time).
    """

    def __init__(
        self,
        config_path: str | Path = DEFAULT_CONFIG_PATH,
        *,
        timeouts: Timeouts | None = None,
        on_step: StepListener | None = None,
        provisioner_factory: ProvisionerFactory = mqtt_provisioner,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config_path = Path(config_path)
        self.timeouts = timeouts or Timeouts()
        self._report = _Reporter(on_step)
        self._provisioner_factory = provisioner_factory
        self._clock = clock
        # Read once now, as the SDK's constructor does, so a missing or broken file fails early.
        self._doc = cfgmod.read_document(self.config_path)
        self.deleted_token_objects: list[str] = []  # what the last reset deleted in the token (URIs)

    # ------------------------------------------------------------------ public API

    def is_provisioned(self) -> bool:
        """True when the config says PROVISIONED (re-read from disk: other runs may have changed it)."""
        self._doc = cfgmod.read_document(self.config_path)
        return cfgmod.provisioning_state(self._doc) is ProvisioningState.PROVISIONED

    def process_device(self) -> OnboardingResult:
        """Onboard the hub unless it already is; return the resulting identity."""
        if self.is_provisioned():
            self._report(OnboardingStep.ALREADY_PROVISIONED, "already PROVISIONED; nothing to do")
            return _result_from(self._doc, changed=False)
        cfg = cfgmod.parse_config(self.config_path, self._doc)
        try:
            return self._onboard(cfg)
        except OnboardingError as exc:
            # JITR by fallback: whatever goes wrong next, say why JITR was tried at all.
            if cfg.method_note and cfg.method_note not in exc.message:
                exc.amend(f"{exc.message} ({cfg.method_note})")
            raise

    def _onboard(self, cfg: HubConfig) -> OnboardingResult:
        self._report(
            OnboardingStep.CONFIG_READ, f"config valid: {cfg.method.value} via {cfg.connection.endpoint}"
        )
        # The token's permanent key objects carry this config's identity (its real path): see pkcs11.py.
        handler = cert_handler(
            cfg.pkcs11, cfg.secure_storage_handler, owner=os.path.realpath(self.config_path)
        )
        # Credentials are read and checked, and the folders onboarding writes to probed, before the lock
        # file or any connection exists, so a bad input writes nothing and sends nothing (no certificate
        # is minted that could not be stored).
        preflight(cfg)
        if handler.token_store is not None:
            self._check_token(cfg, handler.token_store)
        creds = self._read_initial_credentials(cfg, handler)
        with onboarding_lock(self.config_path, self.timeouts.lock, on_wait=self._report.waiting):
            if self.is_provisioned():
                self._report(
                    OnboardingStep.PROVISIONED_MEANWHILE, "another run provisioned this hub meanwhile"
                )
                return _result_from(self._doc, changed=False)
            cfg = cfgmod.parse_config(self.config_path, self._doc, warn=False)
            connector = self._provisioner_factory(cfg, self.timeouts)
            if cfg.method is ProvisioningMethod.FLEET_PROVISIONING:
                return self._fleet_provisioning(cfg, handler, creds, connector)
            assert creds is not None  # JITR always reads its DHA credentials first
            return self._jitr(cfg, creds, connector)

    def status(self) -> dict[str, Any]:
        """What the config and the saved progress say (no secrets).

        `method` is the method a provision would use; `configured_method` is added when the config says
        something else (missing or invalid: the SDK falls back to JITR), with `method_note` saying why.
        """
        doc = cfgmod.read_document(self.config_path)
        result = _result_from(doc, changed=False).to_dict()
        result.pop("changed")
        result.pop("thing_name")
        choice = cfgmod.method_choice(doc[cfgmod.RO])
        if choice.assumed:
            result["configured_method"] = choice.configured
            result["method_note"] = choice.note
        result["config_path"] = str(self.config_path)
        progress = ProgressStore(cfgmod.permanent_cert_dir(self.config_path, doc[cfgmod.RO])).load()
        result["progress"] = progress.step.value if progress else None
        return result

    def reset(self) -> list[Path]:
        """Local offboarding: rw back to NOT_PROVISIONED (+ metadata), onboarding's own files deleted.

        Only files onboarding wrote are deleted: the certificate and key it stored (known by the record
        of their contents, `manifest`), its progress record and that record; never the config, its lock,
        a file the config names in ro (claim, DHA: JITR's permanent pair is the DHA pair), or a file rw
        names (rw is data, and another process may have written any path into it). A hub onboarded
        before that record existed has its certificate and key deleted by their fixed names in the
        credentials folder. The config is reset before the files are deleted, so a crash in between
        leaves an unprovisioned hub with stray files, never a provisioned hub without its key.
        """
        with onboarding_lock(self.config_path, self.timeouts.lock, on_wait=self._report.waiting):
            doc = cfgmod.read_document(self.config_path)
            targets = self._reset_targets(doc)
            cfgmod.reset_rw(self.config_path, clock=self._clock)
            deleted = _files.delete_files(targets)
            self._doc = cfgmod.read_document(self.config_path)
            for p in deleted:
                log.info("deleted %s", p)
            self.deleted_token_objects = self._reset_token(doc)
        return deleted

    def _reset_token(self, doc: Mapping[str, Any]) -> list[str]:
        """Delete the permanent key onboarding made in the token for this config (its label, derived from
        ro.SN, and its CKA_ID, derived from the label and this config's real path), never an object the
        factory put there (the claim and DHA objects, by default or by URI in ro), nor another config's
        key under the same label (a config with the same SN in the same token): that one is left, and said.

        Runs after the config was reset: a token that cannot be reached is a CredentialError saying
        that a second reset deletes the key."""
        ro = doc[cfgmod.RO]
        try:
            token = cfgmod.parse_pkcs11(ro, self.config_path, ro.get(cfgmod.SECURE_STORAGE_HANDLER))
        except ConfigError as exc:
            log.warning("no token objects deleted: %s", exc.message)
            return []
        serial = ro.get(cfgmod.SERIAL_NUMBER)
        if token is None or not isinstance(serial, str) or not serial.strip():
            return []
        label = permanent_key_label(serial)
        if label in factory_labels(ro):
            log.warning("token object %r is named in ro (the factory's): not deleted", label)
            return []
        store = Pkcs11CredentialStore(token, owner=os.path.realpath(self.config_path))
        try:
            count, foreign = store.delete_own(label)
            store.delete_own(label + TRIAL_LABEL_SUFFIX)  # a room check a power cut left behind
        except CredentialError as exc:
            exc.amend(
                f"{exc.message} (the config was reset; run reset again to delete the key {label!r} "
                "onboarding made in the token)"
            )
            raise
        uri = format_uri(token.token_label, label, "private")
        if count:
            log.info("deleted %s (%d object(s))", uri, count)
        if foreign:
            log.warning(
                "left %d object(s) labelled %r in token %r: another config made them (the same %s in this "
                "token), so they are that hub's key, not this config's",
                foreign,
                label,
                token.token_label,
                cfgmod.key_name(cfgmod.RO, cfgmod.SERIAL_NUMBER),
            )
        return [uri] if count else []

    # ------------------------------------------------------------------ steps

    def _reset_targets(self, doc: Mapping[str, Any]) -> list[Path]:
        """The files onboarding wrote, minus any the config names in ro or is (compared as real paths)."""
        ro = doc[cfgmod.RO]
        cert_dir = cfgmod.permanent_cert_dir(self.config_path, ro)
        # Compared as real paths: a file named through `..` or a symlinked folder is still that file.
        protected = {
            os.path.realpath(cfgmod.resolve_path(self.config_path, v))
            for v in ro.values()
            if isinstance(v, str) and v.strip()
        }
        protected |= {os.path.realpath(self.config_path), os.path.realpath(lock_path_for(self.config_path))}
        manifest = Manifest(cert_dir, self.config_path)
        pair = [PERMANENT_CERT_NAME, PERMANENT_KEY_NAME]
        if manifest.exists():
            record = manifest.read()
            other = manifest.other_owner(record)
            if other is not None:
                # Another config's onboarding wrote this folder: its pair and records are that hub's.
                log.warning(
                    "nothing deleted in %s: %s records it for another config, %s",
                    cert_dir,
                    manifest.path,
                    other,
                )
                return []
            pair = [name for name in pair if manifest.written_by_onboarding(name, record.files)]
        candidates = [cert_dir / name for name in [*pair, PROGRESS_FILE_NAME, MANIFEST_FILE_NAME]]
        # The names themselves are deleted (a symlink, not what it points at), once per real file, the
        # record of what onboarding wrote last (a reset cut short can be run again).
        seen: set[str] = set()
        targets = []
        for p in candidates:
            real = os.path.realpath(p)
            if real not in protected and real not in seen:
                seen.add(real)
                targets.append(p)
        return targets

    def _check_token(self, cfg: HubConfig, store: Pkcs11CredentialStore) -> None:
        """Open the token; refuse a permanent key label that holds another config's key (ConfigError:
        the same SN in the same token; that hub's key is never touched); and, when this run will mint a
        certificate, prove the token has room for the key (a full token found after the certificate was
        minted would leave that certificate unused). A run resuming a saved record has its key in the
        token already and needs no room."""
        if cfg.fleet is None:
            store.check_ready()
            return
        progress = ProgressStore(cfg.permanent_cert_dir).load()
        action = next_action(progress, _binding(cfg, cfg.fleet), self._clock())
        store.check_ready(
            permanent_key_label(cfg.fleet.serial_number),
            need_room=action is Action.CREATE_CERTIFICATE,
            service_key=cfg.fleet.certificate_method is CertificateMethod.CREATE_KEYS_AND_CERTIFICATE,
        )

    def _read_initial_credentials(self, cfg: HubConfig, handler: CertHandler) -> Credentials | None:
        if cfg.jitr is not None:
            return _read_credentials(
                handler,
                CertType.DHA,
                cfg.jitr.dha_cert_path,
                cfg.jitr.dha_pk_path,
                (cfgmod.DHA_CERT_PATH, cfgmod.DHA_PK_PATH),
            )
        assert cfg.fleet is not None
        progress = ProgressStore(cfg.permanent_cert_dir).load()
        if next_action(progress, _binding(cfg, cfg.fleet), self._clock()) in (
            Action.CREATE_CERTIFICATE,
            Action.REGISTER_THING,
        ):
            return _read_claim(cfg.fleet, handler)
        return None  # resuming after RegisterThing: the claim credentials are not needed any more

    def _fleet_provisioning(
        self, cfg: HubConfig, handler: CertHandler, claim: Credentials | None, connector: Connector
    ) -> OnboardingResult:
        run = _FleetRun(cfg, handler, claim, connector, self._clock, self._report)
        try:
            progress = run.run()
        except IdentityError as exc:
            if exc.invalid_identity_answer:
                # The service named this hub with an identity it cannot use: keep nothing of this
                # attempt (rw was not touched yet), as reset would delete it.
                _files.delete_files(self._reset_targets(self._doc))
            raise
        return self._record(
            progress.certificate_path,
            progress.private_key_path,
            *_identity(progress),
            thing_name=progress.thing_name,
            store=run.store,
        )

    def _jitr(self, cfg: HubConfig, dha: Credentials, connector: Connector) -> OnboardingResult:
        jitr = cfg.jitr
        assert jitr is not None
        client_id = jitr.client_id_override or common_name(load_certificate(dha.certificate_pem, "DHA"))
        if not client_id:
            raise CredentialError(
                "the DHA certificate has no common name to use as client id; set ro.client_id"
            )
        attempts = connector.provision_jitr(client_id, dha, self._report.retry)
        self._report(
            OnboardingStep.JITR_CONNECTED,
            f"connected with the DHA certificate as {client_id!r} (attempt {attempts})",
        )
        return self._record(
            jitr.dha_cert_path, jitr.dha_pk_path, client_id, None, thing_name=None, store=None
        )

    def _record(
        self,
        cert_path: str,
        key_path: str,
        client_id: str,
        managed_thing_id: str | None,
        *,
        thing_name: str | None,
        store: ProgressStore | None,
    ) -> OnboardingResult:
        """Update the config in the SDK's order; PROVISIONED comes last, so a crash before it resumes."""
        path, clock = self.config_path, self._clock
        cfgmod.update_rw(
            path, {cfgmod.PERMANENT_CERT_PATH: cert_path, cfgmod.PERMANENT_PK_PATH: key_path}, clock=clock
        )
        cfgmod.update_rw(path, {cfgmod.CLIENT_ID: client_id}, clock=clock)
        if managed_thing_id is not None:
            cfgmod.update_rw(path, {cfgmod.MANAGED_THING_ID: managed_thing_id}, clock=clock)
        doc = cfgmod.update_rw(
            path, {cfgmod.PROVISIONING_STATE: ProvisioningState.PROVISIONED.value}, clock=clock
        )
        self._doc = doc
        if store is not None:
            store.clear()
        self._report(
            OnboardingStep.RECORDED,
            f"PROVISIONED: client_id {client_id!r}"
            + (f", managed_thing_id {managed_thing_id!r}" if managed_thing_id else ""),
        )
        return _result_from(doc, changed=True, thing_name=thing_name)


def _binding(cfg: HubConfig, fleet: FleetConfig) -> dict[str, str]:
    """What a progress record must match to be resumed (a changed setting means start over)."""
    return {
        "endpoint": str(cfg.connection.endpoint),
        "template": fleet.template_name,
        "serial_number": fleet.serial_number,
        "certificate_method": fleet.certificate_method.value,
        # Real paths: after a power cut the hub may reach the same files through another name
        # (a symlinked folder, `..`), and that is no reason to mint a second certificate.
        "certificate_path": os.path.realpath(cfg.permanent_cert_dir / PERMANENT_CERT_NAME),
        "private_key_path": permanent_key_ref(cfg, fleet),
    }


def permanent_key_ref(cfg: HubConfig, fleet: FleetConfig) -> str:
    """Where the permanent key goes: its URI in the token when one is set, else the key file's real path."""
    if cfg.pkcs11 is not None:
        return format_uri(cfg.pkcs11.token_label, permanent_key_label(fleet.serial_number), "private")
    return os.path.realpath(cfg.permanent_cert_dir / PERMANENT_KEY_NAME)


def _identity(progress: Progress) -> tuple[str, str | None]:
    """(client id, managed thing id) from deviceConfiguration; the thing name when missing."""
    dev = progress.device_configuration
    thing = progress.thing_name or ""
    client_id = dev.get(cfgmod.DEVICE_CONFIG_CLIENT_ID)
    managed = dev.get(cfgmod.DEVICE_CONFIG_MANAGED_THING_ID)
    if not client_id:
        log.warning(
            "deviceConfiguration has no %s; using the thing name %r as client id",
            cfgmod.DEVICE_CONFIG_CLIENT_ID,
            thing,
        )
        client_id = thing
    if not managed:
        log.warning(
            "deviceConfiguration has no %s; using the thing name %r as managed thing id",
            cfgmod.DEVICE_CONFIG_MANAGED_THING_ID,
            thing,
        )
        managed = thing
    return client_id, managed


def _read_credentials(
    handler: CertHandler, cert_type: CertType, cert_ref: str, key_ref: str, keys: tuple[str, str]
) -> Credentials:
    """Read a pair the config names; an error names the setting of the file at fault (`keys`: the ro
    keys of the certificate and of the private key), or both when it is the pair (a mismatch)."""
    try:
        return handler.read_cert_and_private_key(cert_type, cert_ref, key_ref)
    except CredentialError as exc:
        if exc.key is not None:  # the token's own settings (module, token label, PIN file) named already
            raise
        cert_key, pk_key = (cfgmod.key_name(cfgmod.RO, k) for k in keys)
        if exc.part == "private key":
            exc.amend(f"{exc.message} (from {pk_key})", pk_key)
        elif exc.part == "certificate":
            exc.amend(f"{exc.message} (from {cert_key})", cert_key)
        else:
            exc.amend(f"{exc.message} (from {cert_key} and {pk_key})", cert_key)
        raise


def _read_claim(fleet: FleetConfig, handler: CertHandler) -> Credentials:
    return _read_credentials(
        handler,
        CertType.CLAIM,
        fleet.claim_cert_path,
        fleet.claim_pk_path,
        (cfgmod.CLAIM_CERT_PATH, cfgmod.CLAIM_PK_PATH),
    )


# ---------------------------------------------------------------------------------------- preflight


@dataclass(frozen=True)
class WrittenFile:
    """A file onboarding writes: what it is, and the setting that puts it there (for messages)."""

    what: str
    setting: str


def files_written(cfg: HubConfig) -> dict[Path, WrittenFile]:
    """Every file onboarding will write with this config."""
    written = {
        cfg.path: WrittenFile("the config itself", "--config"),
        lock_path_for(cfg.path): WrittenFile("its lock file (the holder's pid)", "--config"),
    }
    if cfg.method is ProvisioningMethod.FLEET_PROVISIONING:
        cert_dir = cfgmod.key_name(cfgmod.RO, cfgmod.PERMANENT_CERT_DIR)
        if cfgmod.PERMANENT_CERT_DIR not in cfg.set_keys:
            cert_dir += " (default: certs beside the config)"
        d = cfg.permanent_cert_dir
        written[d / PERMANENT_CERT_NAME] = WrittenFile("the new certificate", cert_dir)
        if cfg.pkcs11 is None:  # with a token, the new key is an object in it, not a file
            written[d / PERMANENT_KEY_NAME] = WrittenFile("the new private key", cert_dir)
        written[d / PROGRESS_FILE_NAME] = WrittenFile("the progress record", cert_dir)
        written[d / MANIFEST_FILE_NAME] = WrittenFile("the record of its files", cert_dir)
    return written


def preflight(cfg: HubConfig) -> None:
    """Before any traffic: nothing onboarding writes may overwrite a file it reads, and every folder it
    writes to must take a new file. ConfigError (3) or StorageError (5); nothing is written."""
    written = files_written(cfg)
    _refuse_overlaps(cfg, written)
    if cfg.method is ProvisioningMethod.FLEET_PROVISIONING:
        _refuse_foreign_credentials(cfg, written)
        # New credentials go there: refuse a folder open to others before a certificate is minted.
        _files.check_private_dir(cfg.permanent_cert_dir)
        _probe(
            cfg.permanent_cert_dir,
            f"the credentials folder {cfg.permanent_cert_dir}",
            cfgmod.PERMANENT_CERT_DIR,
        )
        for path, file in written.items():
            if path.parent == cfg.permanent_cert_dir and path.is_dir() and not path.is_symlink():
                raise StorageError(
                    f"{path} ({file.what}) is a folder; onboarding cannot write there: remove it",
                    key=cfgmod.key_name(cfgmod.RO, cfgmod.PERMANENT_CERT_DIR),
                )
    # The config is replaced by a rename in the folder of the real file: that folder takes new files.
    config_dir = _files.real_path(cfg.path).parent
    _probe(config_dir, f"the config's folder {config_dir}", None)


def _refuse_overlaps(cfg: HubConfig, written_files: Mapping[Path, WrittenFile]) -> None:
    """A file the config gives onboarding to read (claim, DHA, root CA) must not be one it writes: the
    factory claim overwritten by the new certificate could never onboard this hub again. Compared as
    real paths, so `..`, a symlinked folder or a relative path do not hide it."""
    written = {os.path.realpath(path): (path, file) for path, file in written_files.items()}
    for key, value in cfg.read_paths.items():
        hit = written.get(os.path.realpath(value))
        if hit is None:
            continue
        path, file = hit
        setting = cfgmod.key_name(cfgmod.RO, key)
        raise ConfigError(
            f"{setting} and {file.setting} name the same file {path}: onboarding writes {file.what} there "
            f"and would overwrite what {setting} names; keep the factory's files elsewhere, or set "
            f"{cfgmod.key_name(cfgmod.RO, cfgmod.PERMANENT_CERT_DIR)} to a folder of its own",
            key=setting,
        )


def _refuse_foreign_credentials(cfg: HubConfig, written_files: Mapping[Path, WrittenFile]) -> None:
    """The credentials folder must not hold another hub's identity: onboarding would overwrite its
    certificate and key (and a reset would delete them), leaving that hub PROVISIONED with nothing.

    Refused (ConfigError: the folder setting is the mistake) when the record of onboarding's files there
    belongs to another config, or when a certificate or key file is there that this config's record does
    not list. A symlink at those names is no identity (the write replaces the link, not its target).
    """
    setting = cfgmod.key_name(cfgmod.RO, cfgmod.PERMANENT_CERT_DIR)
    manifest = Manifest(cfg.permanent_cert_dir, cfg.path)
    record = manifest.read() if manifest.exists() else FilesRecord()
    other = manifest.other_owner(record)
    if other is not None:
        raise ConfigError(
            f"{setting} {cfg.permanent_cert_dir} holds another hub's credentials "
            f"({manifest.path} records them for the config {other}): onboarding would overwrite them; "
            f"set {setting} to a folder of its own (nothing was written, no certificate was created)",
            key=setting,
        )
    for name in (PERMANENT_CERT_NAME, PERMANENT_KEY_NAME):
        path = cfg.permanent_cert_dir / name
        file = written_files.get(path)
        if file is None or not _is_regular_file(path):
            continue
        if not manifest.written_by_onboarding(name, record.files):
            raise ConfigError(
                f"{path} exists and this config's onboarding did not write it "
                f"(it is not in {manifest.path}): it may be another hub's "
                f"{file.what.removeprefix('the new ')}, which onboarding does not overwrite; "
                f"set {setting} to a folder of its own, or move the file away if nothing uses it "
                "(nothing was written, no certificate was created)",
                key=setting,
            )


def _is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StorageError(f"cannot examine {path}: {exc.strerror or exc}") from None


def _probe(directory: Path, what: str, key: str | None) -> None:
    try:
        _files.probe_writable(directory)
    except OSError as exc:
        setting = f" (set by {cfgmod.key_name(cfgmod.RO, key)})" if key else ""
        raise StorageError(
            f"{what}{setting} cannot be written: {exc.strerror or exc}; onboarding stores its results "
            "there, so it stopped before contacting the cloud (no certificate was created); make it "
            "writable by onboarding, then run the same command again",
            key=cfgmod.key_name(cfgmod.RO, key) if key else None,
        ) from None


class _Reporter:
    """Logs each step as it always has and hands it to the listener as a StepEvent."""

    def __init__(self, listener: StepListener | None) -> None:
        self._listener = listener

    def __call__(self, step: OnboardingStep, message: str, level: int = logging.INFO) -> None:
        log.log(level, "%s", message)
        self.emit(StepEvent(step, message))

    def emit(self, event: StepEvent) -> None:
        if self._listener is not None:
            self._listener(event)

    def waiting(self, message: str) -> None:
        """Another run holds the onboarding lock: say so at once (a warning: it shows without -v)."""
        self(OnboardingStep.WAITING_FOR_LOCK, message, logging.WARNING)

    def retry(self, retry: Retry) -> None:
        # DeviceProvisioner has logged the retry (as a warning); this tells the listener.
        self.emit(
            StepEvent(
                OnboardingStep.RETRY,
                f"attempt {retry.attempt} failed ({retry.reason}); retrying in {retry.delay:.1f} s",
            )
        )


class _FleetRun:
    """One fleet provisioning under the lock: the table of actions, the claim session, the retries.

    Each handler does one action and returns the progress it saved; `next_action` on that progress picks
    the next handler. Consecutive claim actions share one connection (CreateKeysAndCertificate and
    RegisterThing on the same claim session, as AWS's flow has it); the verification connect and every
    retry start after the claim connection has closed.
    """

    def __init__(
        self,
        cfg: HubConfig,
        handler: CertHandler,
        claim: Credentials | None,
        connector: Connector,
        clock: Callable[[], float],
        report: _Reporter,
    ) -> None:
        assert cfg.fleet is not None
        self.cfg = cfg
        self.fleet = cfg.fleet
        self.handler = handler
        self.store = ProgressStore(cfg.permanent_cert_dir)
        self.manifest = Manifest(cfg.permanent_cert_dir, cfg.path)
        self.binding = _binding(cfg, cfg.fleet)
        self.connector = connector
        self.clock = clock
        self.report = report
        self.deadline = connector.deadline()
        self._claim = claim
        self._session = contextlib.ExitStack()
        self._fleet: FleetApi | None = None
        self._restarted = False
        self._checked: tuple[Progress, Credentials] | None = None  # the last pair read and checked
        self._handlers: dict[Action, Callable[[Progress | None], Progress | None]] = {
            Action.CREATE_CERTIFICATE: self._create_certificate,
            Action.REGISTER_THING: self._register_thing,
            Action.VERIFY: self._verify,
        }

    def run(self) -> Progress:
        """Drive the table to WRITE_CONFIG, retrying with the connector's policy; the progress to record."""
        attempt = 0
        while True:
            progress = self.store.load()
            self._checked = None  # each attempt reads the pair on disk afresh
            action = next_action(progress, self.binding, self.clock())
            self._report_saved(progress, action)
            try:
                with self._session:  # the claim connection closes before any wait
                    return self._advance(progress, action)
            except ProvisioningError as exc:
                attempt += 1
                self.connector.wait_before_retry(exc, attempt, self.deadline, self.report.retry)

    def _report_saved(self, progress: Progress | None, action: Action) -> None:
        if progress is None:
            return
        if action is Action.CREATE_CERTIFICATE:
            self.report(
                OnboardingStep.STARTING_OVER,
                f"saved progress ({progress.step.value}) cannot be resumed; starting over",
            )
        else:
            self.report(OnboardingStep.resumed_after(progress.step), f"resuming after {progress.step.value}")

    def _advance(self, progress: Progress | None, action: Action) -> Progress:
        while action is not Action.WRITE_CONFIG:
            progress = self._handlers[action](progress)
            if progress is None:  # the record was dropped: a new certificate, on a new claim connection
                self._end_session()
            action = next_action(progress, self.binding, self.clock())
        assert progress is not None
        # The pair on disk must be the certificate RegisterThing activated, verification connect or not:
        # a hub must never be marked PROVISIONED with a key that does not match.
        self._stored_pair(progress)
        return progress

    # ------------------------------------------------------------------ the claim session

    def _fleet_api(self) -> FleetApi:
        if self._fleet is None:
            if self._claim is None:
                self._claim = _read_claim(self.fleet, self.handler)
            session = self.connector.claim_session(self.fleet.serial_number, self._claim, self.deadline)
            self._fleet = self._session.enter_context(session)
            self._session.callback(self._forget_fleet)
            self.report(
                OnboardingStep.CLAIM_CONNECTED,
                f"connected with the claim certificate as {self.fleet.serial_number!r}",
            )
        return self._fleet

    def _forget_fleet(self) -> None:
        self._fleet = None

    def _end_session(self) -> None:
        self._session.close()

    # ------------------------------------------------------------------ the actions

    def _create_certificate(self, _saved: Progress | None) -> Progress:
        fleet = self._fleet_api()
        cfg = self.cfg
        if self.handler.token_store is not None:
            return self._create_in_token(fleet)
        if self.fleet.certificate_method is CertificateMethod.CREATE_CERTIFICATE_FROM_CSR:
            key_pem, csr_pem = generate_key_and_csr((self.fleet.serial_number or "hub")[:_CSR_CN_MAX])
            issued = fleet.create_certificate_from_csr(csr_pem, key_pem)
        else:
            issued = fleet.create_keys_and_certificate()
        self._report_issued(issued.certificate_id)
        cert_path = cfg.permanent_cert_dir / PERMANENT_CERT_NAME
        key_path = cfg.permanent_cert_dir / PERMANENT_KEY_NAME
        # A record we are not resuming (another binding, a spent token) names these same files: it goes
        # before they are overwritten, so a cut between the key and the certificate can never leave an
        # old record that a later run would resume with a mismatched pair.
        self.store.clear()
        # What is about to be written is recorded first, so that reset knows these files as onboarding's.
        self.manifest.record(
            {
                PERMANENT_CERT_NAME: issued.credentials.certificate_pem,
                PERMANENT_KEY_NAME: issued.credentials.private_key_pem,
            }
        )
        # Credentials first, then the record that names them (and carries the token).
        self.handler.write_permanent_cert_and_private_key(
            issued.credentials.certificate_pem, issued.credentials.private_key_pem, cert_path, key_path
        )
        return self._save_issued(issued, str(key_path), f"credentials stored in {cfg.permanent_cert_dir}")

    def _report_issued(self, certificate_id: str) -> None:
        self.report(
            OnboardingStep.CERTIFICATE_ISSUED,
            f"certificate issued ({self.fleet.certificate_method.value}): {certificate_id[:16]}...",
        )

    def _save_issued(self, issued: IssuedCertificate, key_ref: str, stored: str) -> Progress:
        progress = Progress(
            step=Step.CERTIFICATE_ISSUED,
            binding=dict(self.binding),
            certificate_id=issued.certificate_id,
            certificate_path=str(self.cfg.permanent_cert_dir / PERMANENT_CERT_NAME),
            private_key_path=key_ref,
            token_issued_at=self.clock(),
            ownership_token=issued.ownership_token,
        )
        self.store.save(progress)
        self.report(OnboardingStep.CREDENTIALS_STORED, stored)
        return progress

    def _create_in_token(self, fleet: FleetApi) -> Progress:
        """The permanent key in the token: generated there for a CSR (the CSR signed there too), or the
        service's key imported there (CreateKeysAndCertificate). Only the certificate is a file.

        The record names the key by its URI. A power cut after the pair is made leaves it under the
        hub's label, where the next run finds and reuses it (or deletes it when half-made)."""
        label = permanent_key_label(self.fleet.serial_number)
        cert_path = self.cfg.permanent_cert_dir / PERMANENT_CERT_NAME
        if self.fleet.certificate_method is CertificateMethod.CREATE_CERTIFICATE_FROM_CSR:
            key, csr_pem = self.handler.make_permanent_key_and_csr(
                label, (self.fleet.serial_number or "hub")[:_CSR_CN_MAX]
            )
            self.report(OnboardingStep.KEY_IN_TOKEN, f"key pair in the token: {key.uri}")
            issued = fleet.create_certificate_from_csr(csr_pem, b"")
            self._report_issued(issued.certificate_id)
            self.store.clear()
            self.manifest.record({PERMANENT_CERT_NAME: issued.credentials.certificate_pem})
        else:
            issued = fleet.create_keys_and_certificate()
            self._report_issued(issued.certificate_id)
            # The service's key goes into the token and nowhere else (not a file, not the record). It
            # goes first: a token that filled up since check_ready then fails before this run has
            # written anything locally (the old record, if any, stays: it was not resumable anyway).
            try:
                key = self.handler.write_permanent_key_to_token(label, issued.credentials.private_key_pem)
            except (CredentialError, ConfigError) as exc:  # ConfigError: another config's key appeared
                # As after a power cut at this point (docs/reliability.md): the new certificate is
                # never activated, and AWS deletes a PENDING_ACTIVATION certificate after an hour.
                exc.amend(
                    f"{exc.message}; certificate {issued.certificate_id} was issued for that key and "
                    "stays unused (PENDING_ACTIVATION, never activated: AWS deletes it after an hour); "
                    "nothing was stored on the hub"
                )
                raise
            self.report(OnboardingStep.KEY_IN_TOKEN, f"the service's key imported into the token: {key.uri}")
            issued = replace(issued, credentials=replace(issued.credentials, private_key_pem=b""))
            self.store.clear()
            self.manifest.record({PERMANENT_CERT_NAME: issued.credentials.certificate_pem})
        self.handler.write_permanent_cert(issued.credentials.certificate_pem, cert_path)
        return self._save_issued(
            issued,
            key.uri,
            f"certificate stored in {self.cfg.permanent_cert_dir}, key in the token ({key.uri})",
        )

    def _register_thing(self, saved: Progress | None) -> Progress | None:
        assert saved is not None
        assert saved.ownership_token
        fleet = self._fleet_api()
        try:
            registered = fleet.register_thing(
                self.fleet.template_name, saved.ownership_token, self.fleet.register_parameters()
            )
        except IdentityError as exc:
            if self._restarted or not exc.token_refused:
                raise
            # The saved token was spent or expired (e.g. the answer to a RegisterThing was lost): the
            # only way forward is a new certificate, once.
            self.report(
                OnboardingStep.TOKEN_REFUSED,
                f"ownership token refused ({exc.error_message}); requesting a new certificate",
                logging.WARNING,
            )
            self._restarted = True
            self.store.clear()
            return None
        progress = saved.registered(registered.thing_name, registered.device_configuration)
        try:
            self.store.save(progress)
        except StorageError as exc:
            # The cloud has registered the thing: "nothing half-written" would hide that. The record
            # still holds the token, and the same RegisterThing again is answered the same.
            exc.amend(
                f"{exc.message.removesuffix('; nothing was left half-written')}; the cloud registered thing "
                f"{registered.thing_name} with this hub's certificate, which is kept: run provision again "
                "once there is room, and it finishes with the same certificate"
            )
            raise
        self.report(OnboardingStep.THING_REGISTERED, f"thing registered: {registered.thing_name}")
        return progress

    def _verify(self, saved: Progress | None) -> Progress:
        assert saved is not None
        self._end_session()  # the claim connection is done with before the new certificate connects
        creds = self._stored_pair(saved)
        if not self.fleet.verify_connection:
            self.report(
                OnboardingStep.VERIFY_SKIPPED,
                f"verification connect skipped (ro.{cfgmod.VERIFY_CONNECTION} is false)",
            )
            return saved.verified()
        client_id, _ = _identity(saved)
        self.connector.verify(client_id, creds, self.deadline)
        progress = saved.verified()
        self.store.save(progress)
        self.report(OnboardingStep.VERIFIED, f"connected with the new certificate as {client_id!r}")
        return progress

    def _stored_pair(self, progress: Progress) -> Credentials:
        """The permanent pair on disk, checked: key and certificate match, and it is the recorded one.

        Read once per record: the check before recording reuses the one made for the verification connect.
        """
        if self._checked is not None and _same_pair(self._checked[0], progress):
            return self._checked[1]
        creds = self.handler.read_cert_and_private_key(
            CertType.PERMANENT, progress.certificate_path, progress.private_key_path
        )
        if creds.certificate_id != progress.certificate_id:
            # The file on disk is not the certificate RegisterThing activated; nothing safe to resume.
            raise CredentialError(
                f"{progress.certificate_path} does not hold certificate "
                f"{progress.certificate_id[:16]}...; run reset, then provision again"
            )
        self._checked = (progress, creds)
        return creds


def _same_pair(a: Progress, b: Progress) -> bool:
    return (a.certificate_id, a.certificate_path, a.private_key_path) == (
        b.certificate_id,
        b.certificate_path,
        b.private_key_path,
    )
