"""The record of the files onboarding wrote, so that `reset` deletes those and nothing else.

`onboarding-files.json` in the credentials folder (0600, replaced atomically) maps each file name onboarding
wrote there to the SHA-256 of every content it wrote under that name. It is written BEFORE the files it
names, so a power cut between the two leaves a record that names a file not yet written, never a file
that the record does not name. Hashes accumulate until a reset (an attempt that started over wrote other
bytes under the same names), so a file is known as onboarding's by its content, whatever wrote the name
last: a file another process put there, or one the config names, does not match and is left alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from hub_onboarding import _files
from hub_onboarding.errors import StorageError

log = logging.getLogger(__name__)

MANIFEST_FILE_NAME = "onboarding-files.json"
MANIFEST_VERSION = 1
_MAX_FILE_BYTES = 1024 * 1024  # onboarding writes PEM files of a few KiB; anything larger is not one


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Manifest:
    """The record in `directory` (the credentials folder)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / MANIFEST_FILE_NAME

    def exists(self) -> bool:
        return os.path.lexists(self.path)

    def load(self) -> dict[str, list[str]]:
        """name -> hashes; empty when there is no record or it is not one this version wrote."""
        try:
            data = json.loads(_files.read_at_most(self.path, _MAX_FILE_BYTES, follow_symlinks=False))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable record of onboarding's files %s (%s)", self.path, exc)
            return {}
        files = (
            data.get("files") if isinstance(data, dict) and data.get("version") == MANIFEST_VERSION else None
        )
        if not isinstance(files, dict):
            log.warning("ignoring invalid record of onboarding's files %s", self.path)
            return {}
        return {
            name: [h for h in hashes if isinstance(h, str)]
            for name, hashes in files.items()
            if isinstance(name, str) and isinstance(hashes, list)
        }

    def record(self, contents: Mapping[str, bytes]) -> None:
        """Add the files about to be written (name -> bytes), atomically, before they are written."""
        files = self.load()
        for name, data in contents.items():
            hashes = files.setdefault(name, [])
            if digest(data) not in hashes:
                hashes.append(digest(data))
        doc = {"version": MANIFEST_VERSION, "files": files}
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
