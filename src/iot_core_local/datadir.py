"""The data dir's safety rules: whose it is, who may write to it, and files opened without following links.

The data dir holds the CA's private keys and the registry. A folder that another user owns, or that
group or others may write to, lets someone else plant a file or a symbolic link where the server is
about to write (`serve.lock` pointing at a victim file, say), so such a folder is refused at start
rather than narrowed behind the owner's back. Inside it, every file the server opens itself is opened
with O_NOFOLLOW, and an atomic write refuses a symbolic link at its target: a link in the data dir is
never followed, whoever planted it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import ServerError

__all__ = ["check_owned_dir", "open_nofollow", "read_nofollow", "refuse_links", "write_atomically"]


def check_owned_dir(path: Path) -> None:
    """ServerError unless `path` is a folder of this user that group and others cannot write to."""
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise ServerError(f"{path} is not a folder; choose a folder for --data-dir")
    if info.st_uid != os.geteuid():
        raise ServerError(
            f"{path} belongs to another user (uid {info.st_uid}, you are uid {os.geteuid()}); "
            "iot-core-local keeps its CA keys there: use a data dir of your own"
        )
    if info.st_mode & 0o022:
        raise ServerError(
            f"{path} can be written by group or others (mode {stat.S_IMODE(info.st_mode):04o}), who could "
            f"plant files in it; run `chmod go-w {path}` (or 700) or use another data dir"
        )


def refuse_links(paths: Iterable[Path]) -> None:
    """ServerError naming the first of `paths` that is a symbolic link."""
    for path in paths:
        if path.is_symlink():
            raise ServerError(_link_message(path))


def open_nofollow(path: Path, flags: int, mode: int = 0o600) -> int:
    """`os.open` that never follows a symbolic link at `path` (ServerError naming it instead)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ServerError(_link_message(path)) from None
        raise


def read_nofollow(path: Path) -> bytes:
    fd = open_nofollow(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write `data` so that a reader sees the old file or the new one, never a part.

    The temporary file is created exclusively (never through a link) with `mode` before the first byte,
    and a symbolic link at the target is refused, not replaced: someone put it there.
    """
    refuse_links([path])
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _link_message(path: Path) -> str:
    return (
        f"{path} is a symbolic link; iot-core-local follows no links in its data dir "
        "(one planted there could redirect its writes): remove it"
    )
