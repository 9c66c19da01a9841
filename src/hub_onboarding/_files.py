"""Every file onboarding writes or deletes goes through here: atomic, durable, private where it must be.

- Atomic writes: a reader (another hub process, or this one after a power cut) sees the old file or
  the new one, never a mix. The temp file is made in the target's own folder, so the final os.replace
  is a rename on one filesystem; its mode is set before the first byte; data and folder are fsynced.
- Replacing a shared file (the config) keeps its mode, owner and group, and writes through a symlink
  to the file it points at, so the link stays a link.
- The private folder (the credentials folder, the only one onboarding owns) is created 0700 whatever
  the umask; an existing folder is never narrowed (it may be shared, e.g. the config's own folder):
  one open to other users is refused.
- Deletions are made durable by an fsync of the folder, so a power cut does not bring a file back; a name
  that does not exist is no failure, even where the kernel answers EROFS for it.
- Reads never block on a FIFO or a device and never take more memory than a real file needs: a file a
  user names (the config, the root CA) through `read_regular_file` with a size limit, onboarding's own
  records (progress, files) through `read_record`, which also refuses a symlink planted in their place.
  `probe_writable` tells whether a folder takes a new file, before any traffic.

Functions raise OSError where the caller knows best what to tell the user (each says what was left
as it was); the private-folder and deletion checks raise the typed errors themselves, because their
messages are the same for every caller.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import tempfile
from pathlib import Path

from hub_onboarding.errors import CredentialError, StorageError

log = logging.getLogger(__name__)

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
SHARED_FILE_MODE = 0o644  # a shared file onboarding creates (the config, when it did not exist)


def fsync_dir(directory: Path) -> None:
    """Make a rename or deletion in `directory` durable (a power cut afterwards keeps it)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never a mix.

    The temp file is created with `mode` from its first byte (O_CREAT|O_EXCL, then fchmod to defeat
    the umask). `owner` (uid, gid) is given to the temp file before any data when it differs from ours;
    EPERM (not root) is ignored. OSError when anything fails; no temp file is left behind.
    """
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        if owner is not None:
            _give(fd, owner, path)
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


def _give(fd: int, owner: tuple[int, int], path: Path) -> None:
    st = os.fstat(fd)
    if (st.st_uid, st.st_gid) == owner:
        return
    try:
        os.fchown(fd, *owner)
    except PermissionError:
        log.debug("cannot give %s to uid %d gid %d (not root); it keeps ours", path, *owner)


def replace_shared_file(path: str | os.PathLike[str], data: bytes) -> Path:
    """Atomically replace a file other processes share, keeping its permission bits, owner and group.

    A symlink stays a symlink: the file it points at is the one replaced (the temp file goes in that
    file's folder, so the rename stays on one filesystem). A missing file is created with mode 0644.
    Returns the path of the file written; OSError when it could not be (the old file is left as it was).
    """
    target = real_path(path)
    owner: tuple[int, int] | None
    try:
        st = target.stat()
        mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
    except FileNotFoundError:
        mode, owner = SHARED_FILE_MODE, None
    atomic_write(target, data, mode, owner)
    return target


def real_path(path: str | os.PathLike[str]) -> Path:
    """The file a name stands for, through symlinks: what a write replaces and what a lock is tied to."""
    return Path(os.path.realpath(path))


class NotRegularFileError(OSError):
    """A path names a FIFO, a device or a socket where a regular file is expected (`kind` says which)."""

    def __init__(self, path: str | os.PathLike[str], kind: str) -> None:
        super().__init__(f"{os.fspath(path)} is {kind}, not a regular file")
        self.kind = kind


def file_kind(mode: int) -> str:
    """What a stat mode names, in words for a message ("a FIFO (named pipe)", "a folder"...)."""
    kinds = (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    )
    return next((word for test, word in kinds if test(mode)), "not a regular file")


class FileTooLargeError(OSError):
    """A file is larger than the limit its reader sets (`size`, `limit` in bytes)."""

    def __init__(self, path: str | os.PathLike[str], size: int, limit: int) -> None:
        super().__init__(f"{os.fspath(path)} is {size} bytes, more than the limit of {limit} bytes")
        self.size = size
        self.limit = limit


def describe_limit(limit: int) -> str:
    """A byte limit in words for a message ("1 MiB", "64 KiB")."""
    for unit, size in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if limit >= size and limit % size == 0:
            return f"{limit // size} {unit}"
    return f"{limit} bytes"


def read_regular_file(path: str | os.PathLike[str], limit: int, *, follow_symlinks: bool = True) -> bytes:
    """The whole content of a regular file of at most `limit` bytes; never blocks on what is not one.

    Opened with O_NONBLOCK and examined with fstat before any read: a FIFO given where a file is
    expected would otherwise block the open (or the read) until a writer comes, i.e. forever. The size
    is checked before the read (and again after it, for a file that grew meanwhile), so a huge file
    costs no memory. With follow_symlinks False a symlink at `path` is refused by the kernel (O_NOFOLLOW)
    and reported as NotRegularFileError, never read through.
    IsADirectoryError for a folder, NotRegularFileError for a FIFO, a device, a socket or a refused
    symlink, FileTooLargeError beyond `limit`, OSError else.
    """
    fd = _open_regular(path, follow_symlinks)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fd).st_size
        if size > limit:
            raise FileTooLargeError(path, size, limit)
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise FileTooLargeError(path, len(data), limit)
    return data


def read_at_most(path: Path, limit: int, *, follow_symlinks: bool) -> bytes:
    """Up to `limit` bytes of a regular file; never blocks on what is not one (see read_regular_file).

    With follow_symlinks False a symlink planted at `path` after the caller examined it is refused by
    the kernel (O_NOFOLLOW: ELOOP) instead of being read through."""
    fd = _open_regular(path, follow_symlinks, loop_is_symlink=False)
    with os.fdopen(fd, "rb") as fh:
        return fh.read(limit)


def _open_regular(
    path: str | os.PathLike[str], follow_symlinks: bool, *, loop_is_symlink: bool = True
) -> int:
    """A read-only descriptor of a regular file; raises (closing it) for anything else."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        # O_NOFOLLOW answers ELOOP for a symlink: say what it is (callers that examined the path
        # themselves keep the kernel's error).
        if exc.errno == errno.ELOOP and not follow_symlinks and loop_is_symlink:
            raise NotRegularFileError(path, "a symbolic link") from None
        raise
    try:
        _require_regular(path, os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _require_regular(path: str | os.PathLike[str], mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(path, file_kind(mode))


# The records onboarding writes in the credentials folder (progress, files) are a few KiB: the largest
# part, a deviceConfiguration, came in one MQTT message, which AWS IoT caps at 128 KiB. 1 MiB is far
# beyond any real record and small enough to read on the smallest hub.
RECORD_LIMIT = 1024 * 1024


def read_record(path: Path, what: str) -> bytes | None:
    """One of onboarding's own records in the credentials folder, or None when there is none.

    Onboarding only ever writes these as regular files (atomic renames), so anything else there (a FIFO
    that would hang every run, a symlink to another file, a device, a huge file) was put there by
    something else: StorageError naming the file and the fix, before anything is read. Other OSErrors
    (permissions) are raised as they are, for the caller to decide.
    """
    try:
        return read_regular_file(path, RECORD_LIMIT, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except (IsADirectoryError, NotRegularFileError) as exc:
        kind = exc.kind if isinstance(exc, NotRegularFileError) else "a folder"
        problem = f"is {kind}, not the regular file onboarding writes"
    except FileTooLargeError as exc:
        problem = f"is {exc.size} bytes, more than the {describe_limit(RECORD_LIMIT)} such a record can be"
    raise StorageError(
        f"{path} ({what}) {problem}, so something else put it there and onboarding does not read it; "
        f"remove it (rm -r {path}), then run the same command again",
        key="ro.iot_permanent_cert_dir",
    )


# ---------------------------------------------------------------------------------- private folder


def check_private_dir(directory: Path) -> None:
    """Refuse an existing credentials folder that other users can enter or list (a missing one is fine).

    Onboarding never changes the mode of a folder it did not create: with iot_permanent_cert_dir "."
    or a shared folder, narrowing it would lock the other hub processes out of their files.
    CredentialError (exit 4), like a key file readable by others: the key would not be private there.
    """
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StorageError(
            f"cannot examine the credentials folder {directory}: {exc.strerror or exc}"
        ) from None
    if stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077:
        raise CredentialError(
            f"the credentials folder {directory} (ro.iot_permanent_cert_dir) has mode "
            f"{stat.S_IMODE(st.st_mode):04o}, open to other users, and onboarding does not narrow a "
            f"folder it did not create; set ro.iot_permanent_cert_dir to a folder of its own (onboarding "
            f"creates it with mode 0700), or run 'chmod 700 {directory}' if nothing else uses it",
            key="ro.iot_permanent_cert_dir",
        )


def probe_writable(directory: Path) -> None:
    """Check that a file can be created in `directory`, the way onboarding will create one; OSError if not.

    A file is created and deleted at once (a temp name): nothing else tells EROFS, EACCES, an immutable
    folder, ACLs or quotas apart as truthfully, and checking before any traffic means no certificate is
    minted that could not be stored. A folder that does not exist yet is judged by the nearest existing
    one above it, where it will be created.
    """
    target = directory
    while not _exists(target) and target.parent != target:
        target = target.parent
    fd, tmp = tempfile.mkstemp(prefix=".onboarding-probe.", suffix=".tmp", dir=target)
    os.close(fd)
    os.unlink(tmp)


def ensure_private_dir(directory: Path) -> None:
    """Create `directory` with mode 0700; an existing one must already be private (check_private_dir)."""
    try:
        directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True)
    except FileExistsError:
        check_private_dir(directory)
        return
    except OSError as exc:
        raise StorageError(
            f"cannot create the credentials folder {directory} with mode 0700: {exc.strerror or exc}"
        ) from None
    try:
        # mkdir's mode is filtered by the umask; chmod sets exactly 0700 on the folder we just made.
        os.chmod(directory, PRIVATE_DIR_MODE)
    except OSError as exc:
        raise StorageError(
            f"cannot set mode 0700 on the credentials folder {directory}: {exc.strerror or exc}"
        ) from None


def write_private_file(path: Path, data: bytes, mode: int = PRIVATE_FILE_MODE) -> None:
    """Write one file atomically with `mode` from its first byte, in a private folder (made if missing)."""
    ensure_private_dir(path.parent)
    try:
        atomic_write(path, data, mode)
    except OSError as exc:
        raise StorageError(
            f"cannot write {path}: {exc.strerror or exc}; nothing was left half-written"
        ) from None


# ---------------------------------------------------------------------------------------- deletion


def remove(path: Path) -> bool:
    """Delete one file durably; False when it did not exist. OSError when it cannot be deleted."""
    if not remove_name(path):
        return False
    fsync_dir(path.parent)
    return True


def remove_name(path: Path) -> bool:
    """Unlink one name (not durable on its own); False when it did not exist. OSError when it cannot be.

    A read-only filesystem answers EROFS to unlink even for a name that does not exist: nothing to
    delete is not a failure, so the name is looked up before the error is believed.
    """
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError:
        if not _exists(path):
            return False
        raise
    return True


def _exists(path: Path) -> bool:
    """Whether the name exists (a dangling symlink does); an lstat that fails otherwise counts as yes."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True


def delete_files(paths: list[Path]) -> list[Path]:
    """Delete the files that exist among `paths`, durably; return the ones deleted.

    StorageError when one cannot be deleted (permissions, read-only folder); the message names what
    was deleted before it, and what is left.
    """
    deleted: list[Path] = []
    try:
        for i, p in enumerate(paths):
            try:
                if not remove_name(p):
                    continue
            except OSError as exc:
                left = ", ".join(str(q) for q in paths[i:])
                done = ", ".join(str(q) for q in deleted) or "nothing"
                raise StorageError(
                    f"cannot delete {p}: {exc.strerror or exc} (deleted so far: {done}; left: {left}); "
                    "fix the folder's permissions and run reset again, or delete them by hand"
                ) from None
            deleted.append(p)
    finally:
        # One fsync per folder, also after a failure: what was deleted stays deleted.
        for folder in {q.parent for q in deleted}:
            with contextlib.suppress(OSError):
                fsync_dir(folder)
    return deleted
