"""Where a set-up leaves what a factory puts on its hubs: a certificate (0644) and its key (0600, from its
first byte) in a folder only its owner may enter (0700). Neither file may exist: nothing is overwritten."""

from __future__ import annotations

import os
from pathlib import Path

CERTIFICATE_MODE = 0o644
PRIVATE_KEY_MODE = 0o600
FOLDER_MODE = 0o700


def private_folder(folder: Path) -> None:
    """Create `folder` (0700) unless it exists, and each missing folder above it 0700 too.

    `mkdir(parents=True, mode=...)` gives the parents it creates the umask's mode (0755), not `mode`:
    `setup-jitr --out HUB` made `HUB/device-ca` first and left `HUB` readable by everyone.
    """
    missing: list[Path] = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(mode=FOLDER_MODE, exist_ok=True)


def write_pair(folder: Path, names: tuple[str, str], certificate_pem: str, private_key_pem: str) -> None:
    """The certificate and its key as `folder/names[0]` and `folder/names[1]`; FileExistsError when either
    name exists (O_EXCL: a planted symlink is not followed either)."""
    cert_path, key_path = (folder / n for n in names)
    for path, text, mode in (
        (cert_path, certificate_pem, CERTIFICATE_MODE),
        (key_path, private_key_pem, PRIVATE_KEY_MODE),
    ):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
