"""HubOnboarding: the orchestrator. Reads the config, drives fleet provisioning or JITR, records the result.

    HubOnboarding(config_path).is_provisioned()   -> bool (reads rw.iot_provisioning_state only)
    HubOnboarding(config_path).process_device()   -> OnboardingResult (no network when provisioned)

Order of work in process_device, so that a power cut anywhere leaves a hub that resumes:
 1. validate the config and read the credentials the next step needs (no network, nothing written);
 2. take the onboarding lock (`<config>.lock`); re-read the config: if another run finished meanwhile,
    report its result;
 3. fleet provisioning, resumable (see progress.py): connect with the claim certificate (client id: SN),
    CreateKeysAndCertificate / CreateCertificateFromCsr, store the new pair and the progress record,
    RegisterThing, record its answer, connect with the new certificate (verification);
    or JITR: connect with the DHA certificate, retrying with backoff until the cloud has activated it;
 4. update the config: paths, client_id, managed_thing_id, then state PROVISIONED (each an atomic
    write that also sets metadata.last_updated_epoch_time); then delete the progress record.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    HubConfig,
    ProvisioningMethod,
    ProvisioningState,
)
from hub_onboarding.errors import CredentialError, IdentityError, ProvisioningError
from hub_onboarding.progress import Action, Progress, ProgressStore, Step, next_action

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
        method=s(ro.get(cfgmod.PROVISIONING_METHOD)),
        client_id=s(rw.get(cfgmod.CLIENT_ID)),
        managed_thing_id=s(rw.get(cfgmod.MANAGED_THING_ID)),
        certificate_path=s(rw.get(cfgmod.PERMANENT_CERT_PATH)),
        private_key_path=s(rw.get(cfgmod.PERMANENT_PK_PATH)),
        thing_name=thing_name,
        changed=changed,
    )


class HubOnboarding:
    """The SDK's HubOnboarding, in Python. `on_step` receives one short line per step (for a CLI)."""

    def __init__(
        self,
        config_path: str | Path = DEFAULT_CONFIG_PATH,
        *,
        timeouts: Timeouts | None = None,
        on_step: Callable[[str], None] | None = None,
    ) -> None:
        self.config_path = Path(config_path)
        self.timeouts = timeouts or Timeouts()
        self._on_step = on_step
        # Read once now, as the SDK's constructor does, so a missing or broken file fails early.
        self._doc = cfgmod.read_document(self.config_path)

    # ------------------------------------------------------------------ public API

    def is_provisioned(self) -> bool:
        """True when the config says PROVISIONED (re-read from disk: other runs may have changed it)."""
        self._doc = cfgmod.read_document(self.config_path)
        return cfgmod.provisioning_state(self._doc) is ProvisioningState.PROVISIONED

    def process_device(self) -> OnboardingResult:
        """Onboard the hub unless it already is; return the resulting identity."""
        if self.is_provisioned():
            self._step("already PROVISIONED; nothing to do")
            return _result_from(self._doc, changed=False)
        cfg = cfgmod.parse_config(self.config_path, self._doc)
        self._step(f"config valid: {cfg.method.value} via {cfg.endpoint}")
        handler = CertHandler(cfg.secure_storage_handler)
        # Credentials are read and checked before the lock file or any connection exists, so a bad
        # input writes nothing and sends nothing.
        creds = self._read_initial_credentials(cfg, handler)
        if cfg.method is ProvisioningMethod.FLEET_PROVISIONING:
            # New credentials go there: refuse a folder open to others before a certificate is minted.
            CertHandler.check_private_dir(cfg.permanent_cert_dir)
        with cfgmod.onboarding_lock(self.config_path, self.timeouts.lock):
            if self.is_provisioned():
                self._step("another run provisioned this hub meanwhile")
                return _result_from(self._doc, changed=False)
            cfg = cfgmod.parse_config(self.config_path, self._doc)
            if cfg.method is ProvisioningMethod.FLEET_PROVISIONING:
                return self._fleet_provisioning(cfg, handler, creds)
            assert creds is not None  # JITR always reads its DHA credentials first
            return self._jitr(cfg, creds)

    def status(self) -> dict[str, Any]:
        """What the config and the saved progress say (no secrets)."""
        doc = cfgmod.read_document(self.config_path)
        result = _result_from(doc, changed=False).to_dict()
        result.pop("changed")
        result.pop("thing_name")
        result["config_path"] = str(self.config_path)
        progress = ProgressStore(cfgmod.permanent_cert_dir(self.config_path, doc[cfgmod.RO])).load()
        result["progress"] = progress.step.value if progress else None
        return result

    def reset(self) -> list[Path]:
        """Local offboarding: rw back to NOT_PROVISIONED (+ metadata), onboarding's own files deleted.

        ro is untouched, and files the config names in ro (claim, DHA: JITR's permanent pair is the DHA
        pair) are never deleted. The config is reset before the files are deleted, so a crash in between
        leaves an unprovisioned hub with stray files, never a provisioned hub without its key.
        """
        with cfgmod.onboarding_lock(self.config_path, self.timeouts.lock):
            doc = cfgmod.read_document(self.config_path)
            ro, rw = doc[cfgmod.RO], doc.get(cfgmod.RW) or {}
            cert_dir = cfgmod.permanent_cert_dir(self.config_path, ro)
            # Compared as real paths: a file named through `..` or a symlinked folder is still that file.
            protected = {
                os.path.realpath(cfgmod.resolve_path(self.config_path, v))
                for v in ro.values()
                if isinstance(v, str) and v.strip()
            }
            candidates = [
                cert_dir / PERMANENT_CERT_NAME,
                cert_dir / PERMANENT_KEY_NAME,
                ProgressStore(cert_dir).path,
            ]
            for key in (cfgmod.PERMANENT_CERT_PATH, cfgmod.PERMANENT_PK_PATH):
                value = rw.get(key)
                if isinstance(value, str) and value.strip():
                    p = Path(cfgmod.resolve_path(self.config_path, value))
                    # only what onboarding wrote: inside its credentials folder
                    if os.path.realpath(p.parent) == os.path.realpath(cert_dir):
                        candidates.append(p)
            # The names themselves are deleted (a symlink, not what it points at), once per real file.
            by_real = {os.path.realpath(p): p for p in reversed(candidates)}
            targets = sorted(p for real, p in by_real.items() if real not in protected)
            cfgmod.reset_rw(self.config_path)
            deleted = CertHandler.delete(targets)
            self._doc = cfgmod.read_document(self.config_path)
        for p in deleted:
            log.info("deleted %s", p)
        return deleted

    # ------------------------------------------------------------------ steps

    def _step(self, text: str) -> None:
        log.info("%s", text)
        if self._on_step is not None:
            self._on_step(text)

    def _retry_timeout(self, cfg: HubConfig) -> float:
        return self.timeouts.retry if self.timeouts.retry is not None else cfg.retry_timeout

    def _device_provisioner(self, cfg: HubConfig) -> Any:
        from hub_onboarding.device_provisioner import DeviceProvisioner
        from hub_onboarding.provisioning import ConnectionSettings, IotProvisioning

        settings = ConnectionSettings(cfg.endpoint, cfg.root_ca_path, cfg.keep_alive, self.timeouts.connect)
        return DeviceProvisioner(
            IotProvisioning(settings),
            operation_timeout=self.timeouts.operation,
            retry_timeout=self._retry_timeout(cfg),
        )

    def _read_initial_credentials(self, cfg: HubConfig, handler: CertHandler) -> Credentials | None:
        if cfg.method is ProvisioningMethod.JITR:
            assert cfg.dha_cert_path is not None
            assert cfg.dha_pk_path is not None
            return self._read(handler, CertType.DHA, cfg.dha_cert_path, cfg.dha_pk_path, cfgmod.DHA_CERT_PATH)
        progress = ProgressStore(cfg.permanent_cert_dir).load()
        if next_action(progress, self._binding(cfg), time.time()) in (
            Action.CREATE_CERTIFICATE,
            Action.REGISTER_THING,
        ):
            return self._read_claim(cfg, handler)
        return None  # resuming after RegisterThing: the claim credentials are not needed any more

    def _read(
        self, handler: CertHandler, cert_type: CertType, cert_ref: str, key_ref: str, key: str
    ) -> Credentials:
        try:
            return handler.read_cert_and_private_key(cert_type, cert_ref, key_ref)
        except CredentialError as exc:
            # Name the config key so the user knows which entry to fix.
            exc.message = f"{exc.message} (from ro.{key} and its key)"
            exc.args = (exc.message,)
            raise

    def _read_claim(self, cfg: HubConfig, handler: CertHandler) -> Credentials:
        assert cfg.claim_cert_path is not None
        assert cfg.claim_pk_path is not None
        return self._read(
            handler, CertType.CLAIM, cfg.claim_cert_path, cfg.claim_pk_path, cfgmod.CLAIM_CERT_PATH
        )

    @staticmethod
    def _binding(cfg: HubConfig) -> dict[str, str]:
        """What a progress record must match to be resumed (a changed setting means start over)."""
        return {
            "endpoint": str(cfg.endpoint),
            "template": cfg.template_name or "",
            "serial_number": cfg.serial_number or "",
            "certificate_method": cfg.certificate_method.value,
            # Real paths: after a power cut the hub may reach the same files through another name
            # (a symlinked folder, `..`), and that is no reason to mint a second certificate.
            "certificate_path": os.path.realpath(cfg.permanent_cert_dir / PERMANENT_CERT_NAME),
            "private_key_path": os.path.realpath(cfg.permanent_cert_dir / PERMANENT_KEY_NAME),
        }

    def _fleet_provisioning(
        self, cfg: HubConfig, handler: CertHandler, claim: Credentials | None
    ) -> OnboardingResult:
        assert cfg.serial_number is not None
        assert cfg.template_name is not None
        store = ProgressStore(cfg.permanent_cert_dir)
        binding = self._binding(cfg)
        dp = self._device_provisioner(cfg)
        deadline = dp.deadline()
        attempt = 0
        restarted = False
        while True:
            progress = store.load()
            action = next_action(progress, binding, time.time())
            if progress is not None and action is Action.CREATE_CERTIFICATE:
                log.info("saved progress (%s) cannot be resumed; starting over", progress.step.value)
            elif progress is not None:
                self._step(f"resuming after {progress.step.value}")
            try:
                if action in (Action.CREATE_CERTIFICATE, Action.REGISTER_THING):
                    claim = claim or self._read_claim(cfg, handler)
                    with dp.claim_session(cfg.serial_number, claim, deadline) as fp:
                        self._step(f"connected with the claim certificate as {cfg.serial_number!r}")
                        if action is Action.CREATE_CERTIFICATE or progress is None:
                            progress = self._create_certificate(cfg, handler, store, fp, binding)
                        try:
                            progress = self._register_thing(cfg, store, fp, progress)
                        except IdentityError as exc:
                            if restarted or not exc.token_refused:
                                raise
                            # The saved token was spent or expired (e.g. the answer to a RegisterThing
                            # was lost): the only way forward is a new certificate, once.
                            log.warning(
                                "ownership token refused (%s); requesting a new certificate",
                                exc.error_message,
                            )
                            restarted = True
                            store.clear()
                            continue
                    action = Action.VERIFY
                assert progress is not None
                # The pair on disk must be the certificate RegisterThing activated, verification connect
                # or not: a hub must never be marked PROVISIONED with a key that does not match.
                creds = self._stored_pair(handler, progress)
                if action is Action.VERIFY:
                    if cfg.verify_connection:
                        progress = self._verify(creds, store, dp, progress, deadline)
                    else:
                        progress = progress.verified()
                        self._step(f"verification connect skipped (ro.{cfgmod.VERIFY_CONNECTION} is false)")
                break
            except ProvisioningError as exc:
                attempt += 1
                dp.wait_before_retry(exc, attempt, deadline)
        assert progress is not None
        return self._record(
            progress.certificate_path,
            progress.private_key_path,
            *self._identity(progress),
            thing_name=progress.thing_name,
            store=store,
        )

    def _create_certificate(
        self, cfg: HubConfig, handler: CertHandler, store: ProgressStore, fp: Any, binding: Mapping[str, str]
    ) -> Progress:
        if cfg.certificate_method is CertificateMethod.CREATE_CERTIFICATE_FROM_CSR:
            key_pem, csr_pem = generate_key_and_csr((cfg.serial_number or "hub")[:_CSR_CN_MAX])
            issued = fp.create_certificate_from_csr(csr_pem, key_pem)
        else:
            issued = fp.create_keys_and_certificate()
        self._step(f"certificate issued ({cfg.certificate_method.value}): {issued.certificate_id[:16]}...")
        cert_path = cfg.permanent_cert_dir / PERMANENT_CERT_NAME
        key_path = cfg.permanent_cert_dir / PERMANENT_KEY_NAME
        # A record we are not resuming (another binding, a spent token) names these same files: it goes
        # before they are overwritten, so a cut between the key and the certificate can never leave an
        # old record that a later run would resume with a mismatched pair.
        store.clear()
        # Credentials first, then the record that names them (and carries the token).
        handler.write_permanent_cert_and_private_key(
            issued.credentials.certificate_pem, issued.credentials.private_key_pem, cert_path, key_path
        )
        progress = Progress(
            step=Step.CERTIFICATE_ISSUED,
            binding=dict(binding),
            certificate_id=issued.certificate_id,
            certificate_path=str(cert_path),
            private_key_path=str(key_path),
            token_issued_at=time.time(),
            ownership_token=issued.ownership_token,
        )
        store.save(progress)
        self._step(f"credentials stored in {cfg.permanent_cert_dir}")
        return progress

    def _register_thing(self, cfg: HubConfig, store: ProgressStore, fp: Any, progress: Progress) -> Progress:
        assert cfg.template_name is not None
        assert progress.ownership_token
        registered = fp.register_thing(cfg.template_name, progress.ownership_token, cfg.register_parameters())
        progress = progress.registered(registered.thing_name, registered.device_configuration)
        store.save(progress)
        self._step(f"thing registered: {registered.thing_name}")
        return progress

    @staticmethod
    def _stored_pair(handler: CertHandler, progress: Progress) -> Credentials:
        """The permanent pair on disk, checked: key and certificate match, and it is the recorded one."""
        creds = handler.read_cert_and_private_key(
            CertType.PERMANENT, progress.certificate_path, progress.private_key_path
        )
        if creds.certificate_id != progress.certificate_id:
            # The file on disk is not the certificate RegisterThing activated; nothing safe to resume.
            raise CredentialError(
                f"{progress.certificate_path} does not hold certificate "
                f"{progress.certificate_id[:16]}...; run reset, then provision again"
            )
        return creds

    def _verify(
        self, creds: Credentials, store: ProgressStore, dp: Any, progress: Progress, deadline: float
    ) -> Progress:
        client_id, _ = self._identity(progress)
        dp.verify(client_id, creds, deadline)
        progress = progress.verified()
        store.save(progress)
        self._step(f"connected with the new certificate as {client_id!r}")
        return progress

    @staticmethod
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

    def _jitr(self, cfg: HubConfig, dha: Credentials) -> OnboardingResult:
        assert cfg.dha_cert_path is not None
        assert cfg.dha_pk_path is not None
        client_id = cfg.client_id_override or common_name(load_certificate(dha.certificate_pem, "DHA"))
        if not client_id:
            raise CredentialError(
                "the DHA certificate has no common name to use as client id; set ro.client_id"
            )
        dp = self._device_provisioner(cfg)
        attempts = dp.provision_jitr(client_id, dha)
        self._step(f"connected with the DHA certificate as {client_id!r} (attempt {attempts})")
        return self._record(cfg.dha_cert_path, cfg.dha_pk_path, client_id, None, thing_name=None, store=None)

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
        path = self.config_path
        cfgmod.update_rw(path, {cfgmod.PERMANENT_CERT_PATH: cert_path, cfgmod.PERMANENT_PK_PATH: key_path})
        cfgmod.update_rw(path, {cfgmod.CLIENT_ID: client_id})
        if managed_thing_id is not None:
            cfgmod.update_rw(path, {cfgmod.MANAGED_THING_ID: managed_thing_id})
        doc = cfgmod.update_rw(path, {cfgmod.PROVISIONING_STATE: ProvisioningState.PROVISIONED.value})
        self._doc = doc
        if store is not None:
            store.clear()
        self._step(
            f"PROVISIONED: client_id {client_id!r}"
            + (f", managed_thing_id {managed_thing_id!r}" if managed_thing_id else "")
        )
        return _result_from(doc, changed=True, thing_name=thing_name)
