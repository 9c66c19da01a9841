"""Onboarding progress: what fleet provisioning has done so far, so a power cut resumes instead of restarting.

Everything that decides "what next" lives here, as data and one pure function (`next_action`):

    (no record) ──CreateKeys/CSR accepted──► CERTIFICATE_ISSUED ──RegisterThing accepted──► THING_REGISTERED
         ▲                                        │                                             │
         └─── token older than TOKEN_USABLE_FOR ──┘               verification connect succeeded
              (or refused): start over                                                          ▼
                                                     record deleted ◄── config written ◄── VERIFIED

The record is a sidecar file, `onboarding-progress.json`, in the permanent credentials folder (0700),
written 0600 and atomically. It is not in iotmi_config.json because it holds the certificate ownership
token, a secret, and the config file is shared with other hub processes. The new certificate and key
are written to their final paths before the record that names them (credentials before the state that
points at them); the record stores the certificate id so a mismatched file on disk is detected.

The token is dropped from the record as soon as RegisterThing has accepted it (it is single-use).
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hub_onboarding import _files
from hub_onboarding.errors import StorageError

log = logging.getLogger(__name__)

PROGRESS_FILE_NAME = "onboarding-progress.json"
RECORD_VERSION = 1
# AWS deletes a certificate whose token was not used within one hour. Leave a margin for clock error
# and for the RegisterThing round trip itself.
TOKEN_LIFETIME = 3600.0
TOKEN_USABLE_FOR = TOKEN_LIFETIME - 300.0


class Step(enum.StrEnum):
    CERTIFICATE_ISSUED = "CERTIFICATE_ISSUED"
    THING_REGISTERED = "THING_REGISTERED"
    VERIFIED = "VERIFIED"


class Action(enum.StrEnum):
    CREATE_CERTIFICATE = "CREATE_CERTIFICATE"
    REGISTER_THING = "REGISTER_THING"
    VERIFY = "VERIFY"
    WRITE_CONFIG = "WRITE_CONFIG"


@dataclass(frozen=True)
class Progress:
    """One fleet-provisioning attempt. `binding` ties it to the settings it was made with."""

    step: Step
    binding: Mapping[str, str]
    certificate_id: str
    certificate_path: str
    private_key_path: str
    token_issued_at: float = 0.0
    ownership_token: str | None = field(default=None, repr=False)
    thing_name: str | None = None
    device_configuration: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["version"] = RECORD_VERSION
        data["binding"] = dict(self.binding)
        data["device_configuration"] = dict(self.device_configuration)
        return data

    @classmethod
    def from_json(cls, data: object) -> Progress | None:
        """A record, or None when it is not one this version wrote (it is then ignored)."""
        if not isinstance(data, dict) or data.get("version") != RECORD_VERSION:
            return None
        try:
            step = Step(data["step"])
            binding = data["binding"]
            dev = data.get("device_configuration") or {}
            token = data.get("ownership_token")
            strings = (data["certificate_id"], data["certificate_path"], data["private_key_path"])
            issued = data.get("token_issued_at", 0.0)
            thing = data.get("thing_name")
            if not (
                isinstance(binding, dict)
                and all(isinstance(v, str) for v in binding.values())
                and isinstance(dev, dict)
                and all(isinstance(v, str) for v in dev.values())
                and all(isinstance(s, str) for s in strings)
                and (token is None or isinstance(token, str))
                and (thing is None or isinstance(thing, str))
                and isinstance(issued, int | float)
                and not isinstance(issued, bool)
            ):
                return None
        except (KeyError, ValueError, TypeError):
            return None
        return cls(
            step=step,
            binding=binding,
            certificate_id=strings[0],
            certificate_path=strings[1],
            private_key_path=strings[2],
            token_issued_at=float(issued),
            ownership_token=token,
            thing_name=thing,
            device_configuration=dev,
        )

    def registered(self, thing_name: str, device_configuration: Mapping[str, str]) -> Progress:
        # The token is spent once RegisterThing accepted it: do not keep a secret we no longer need.
        return replace(
            self,
            step=Step.THING_REGISTERED,
            ownership_token=None,
            thing_name=thing_name,
            device_configuration=dict(device_configuration),
        )

    def verified(self) -> Progress:
        return replace(self, step=Step.VERIFIED)


def next_action(progress: Progress | None, binding: Mapping[str, str], now: float) -> Action:
    """What fleet provisioning must do next, given the saved progress (pure: no I/O, no clock)."""
    if progress is None or dict(progress.binding) != dict(binding):
        return Action.CREATE_CERTIFICATE
    if progress.step is Step.CERTIFICATE_ISSUED:
        age = now - progress.token_issued_at
        if progress.ownership_token and 0 <= age < TOKEN_USABLE_FOR:
            return Action.REGISTER_THING
        return Action.CREATE_CERTIFICATE
    if progress.step is Step.THING_REGISTERED:
        return Action.VERIFY
    return Action.WRITE_CONFIG


class ProgressStore:
    """The sidecar record in the credentials folder."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / PROGRESS_FILE_NAME

    def load(self) -> Progress | None:
        """The saved record; None when there is none, or it is unreadable or invalid (then: start over).

        StorageError for what onboarding never writes there: a FIFO (which would block every run), a
        symlink (never read through), a device or a file too large to be a record (`_files.read_record`).
        """
        try:
            data = _files.read_record(self.path, "the onboarding progress record")
        except OSError as exc:
            log.warning("ignoring unreadable progress record %s (%s); starting over", self.path, exc)
            return None
        if data is None:
            return None
        try:
            progress = Progress.from_json(json.loads(data.decode("utf-8")))
        except (ValueError, RecursionError):  # not UTF-8, not JSON (or nested too deep to parse)
            progress = None
        if progress is None:
            log.warning("ignoring invalid progress record %s; starting over", self.path)
        return progress

    def save(self, progress: Progress) -> None:
        """Write the record 0600 and atomically (it holds the ownership token, a secret)."""
        data = (json.dumps(progress.to_json(), indent=2) + "\n").encode("utf-8")
        _files.write_private_file(self.path, data, _files.PRIVATE_FILE_MODE)

    def clear(self) -> None:
        """Delete the record, durably (a power cut right after must not bring it back).

        StorageError when it cannot be deleted (read-only folder, permissions): a stale record must not
        be left for a later run to trust, so onboarding stops there.
        """
        try:
            _files.remove(self.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(
                f"cannot delete the onboarding progress record {self.path}: "
                f"{exc.strerror or exc}; make its folder writable by onboarding (or delete "
                "the file by hand), then run the same command again"
            ) from None
