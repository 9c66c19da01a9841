"""The record of the files onboarding wrote, so that `reset` deletes those and nothing else.

`onboarding-files.json` in the credentials folder (0600, replaced atomically) maps each file name onboarding
wrote there to the SHA-256 of every content it wrote under that name. It is written BEFORE the files it
names, so a power cut between the two leaves a record that names a file not yet written, never a file
that the record does not name. Hashes accumulate until a reset (an attempt that started over wrote other
bytes under the same names), so a file is known as onboarding's by its content, whatever wrote the name
last: a file another process put there, or one the config names, does not match and is left alone.

The record also names its owner, the real path of the config whose onboarding wrote it (`config`). A
second config whose credentials folder is this one is refused before it writes anything, and its reset
deletes nothing here, while that owner still exists and still uses this folder: the folder holds another
hub's identity. A folder moved or copied with its hub (the owner gone, or using its own folder) is the new
config's. (A record written before owners were recorded has none; it is taken as this config's own.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hub_onboarding import _files
from hub_onboarding import config as cfgmod
from hub_onboarding.errors import OnboardingError, StorageError

log = logging.getLogger(__name__)

MANIFEST_FILE_NAME = "onboarding-files.json"
MANIFEST_VERSION = 1
_MAX_FILE_BYTES = 1024 * 1024  # onboarding writes PEM files of a few KiB; anything larger is not one
_WHAT = "the record of the files onboarding wrote"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class FilesRecord:
    """What the record says: name -> hashes, and the config that wrote it (None: not recorded)."""

    files: dict[str, list[str]] = field(default_factory=dict)
    config: str | None = None


class Manifest:
    """The record in `directory` (the credentials folder), kept for the config at `config_path`."""

    def __init__(self, directory: Path, config_path: str | os.PathLike[str] | None = None) -> None:
        self.directory = directory
        self.path = directory / MANIFEST_FILE_NAME
        # Real path: the same config reached through a symlink or `..` is the same owner.
        self.owner = os.path.realpath(config_path) if config_path is not None else None

    def exists(self) -> bool:
        return os.path.lexists(self.path)

    def load(self) -> dict[str, list[str]]:
        """name -> hashes; empty when there is no record or it is not one this version wrote."""
        return self.read().files

    def read(self) -> FilesRecord:
        """The whole record; empty when there is none or it is not one this version wrote.

        StorageError when something onboarding never writes is there (a FIFO, a symlink, a device, a
        huge file: `_files.read_record`).
        """
        try:
            raw = _files.read_record(self.path, _WHAT)
        except OSError as exc:
            log.warning("ignoring unreadable record of onboarding's files %s (%s)", self.path, exc)
            return FilesRecord()
        if raw is None:
            return FilesRecord()
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            log.warning("ignoring unreadable record of onboarding's files %s (%s)", self.path, exc)
            return FilesRecord()
        files = (
            data.get("files") if isinstance(data, dict) and data.get("version") == MANIFEST_VERSION else None
        )
        if not isinstance(files, dict):
            log.warning("ignoring invalid record of onboarding's files %s", self.path)
            return FilesRecord()
        owner = data.get("config")
        return FilesRecord(
            {
                name: [h for h in hashes if isinstance(h, str)]
                for name, hashes in files.items()
                if isinstance(name, str) and isinstance(hashes, list)
            },
            owner if isinstance(owner, str) else None,
        )

    def other_owner(self, record: FilesRecord) -> str | None:
        """The config that owns `record` when it is another live hub's: it still exists and its
        credentials folder is this very folder (None: ours, no owner recorded, or an owner that no longer
        uses this folder)."""
        if record.config is None or self.owner is None or record.config == self.owner:
            return None
        # A hub folder moved, restored from a backup or copied keeps its record naming the old path: that
        # config is gone, or uses its own folder (a copy's folder is not the original's), so nothing here
        # is another hub's identity and this config may reset and onboard it.
        if not _uses_folder(record.config, self.directory):
            return None
        return record.config

    def record(self, contents: Mapping[str, bytes]) -> None:
        """Add the files about to be written (name -> bytes), atomically, before they are written."""
        files = self.load()
        for name, data in contents.items():
            hashes = files.setdefault(name, [])
            if digest(data) not in hashes:
                hashes.append(digest(data))
        doc: dict[str, object] = {"version": MANIFEST_VERSION, "files": files}
        if self.owner is not None:
            doc["config"] = self.owner
        _files.write_private_file(self.path, (json.dumps(doc, indent=2) + "\n").encode("utf-8"))

    def written_by_onboarding(self, name: str, recorded: Mapping[str, list[str]]) -> bool:
        """Whether `directory/name` is a regular file (not a link) holding bytes onboarding wrote there."""
        path = self.directory / name
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return False
            data = _files.read_at_most(path, _MAX_FILE_BYTES + 1, follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(
                f"cannot read {path} to tell whether onboarding wrote it: {exc.strerror or exc}"
            ) from None
        return digest(data) in recorded.get(name, [])


def _uses_folder(config_path: str, directory: Path) -> bool:
    """Whether the config at `config_path` exists and its credentials folder is `directory` itself."""
    try:
        doc = json.loads(_files.read_regular_file(config_path, cfgmod.MAX_CONFIG_BYTES))
        ro = doc.get("ro") if isinstance(doc, dict) else None
        folder = cfgmod.permanent_cert_dir(config_path, ro if isinstance(ro, dict) else {})
        return os.path.samefile(folder, directory)
    except (OSError, ValueError, RecursionError, OnboardingError):
        return False  # gone, unreadable or not JSON: no live hub that could be using this folder
