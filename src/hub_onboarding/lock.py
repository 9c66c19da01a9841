"""The onboarding lock: two runs on one config never both onboard.

`<config>.lock` beside the config (beside the real file when the config is a symlink, so two names for
one config share one lock), held with fcntl.flock for the whole onboarding. flock is released by the
kernel when the process dies, so a crash never leaves a stale lock, and the lock file is never deleted
(deleting a lock file races with the next run opening it). While held, the file holds the holder's pid,
so a run that has to wait can say whom it waits for. It is opened without following a symlink.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from hub_onboarding._files import file_kind, real_path
from hub_onboarding.errors import BusyError, StorageError

DEFAULT_POLL = 0.1


def lock_path_for(config_path: str | os.PathLike[str]) -> Path:
    """`<config>.lock` beside the real file, so two names for one config (a symlink) share one lock."""
    p = real_path(config_path)
    return p.with_name(p.name + ".lock")


WaitListener = Callable[[str], None]


@contextlib.contextmanager
def onboarding_lock(
    config_path: str | os.PathLike[str],
    timeout: float,
    *,
    poll: float = DEFAULT_POLL,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    on_wait: WaitListener | None = None,
) -> Iterator[None]:
    """Hold an exclusive flock on `<config>.lock`, waiting at most `timeout` seconds for it.

    When another run holds it, `on_wait` hears so at once, in one line naming the holder's pid (when
    it wrote one) and how long this run will wait. The holder's pid is written into the file while
    the lock is held, and removed (the file emptied) before it is released.

    `clock` (monotonic seconds) and `sleep` are the time the wait is measured in; tests hand in a clock
    that `sleep` advances, so a contended lock is tested without waiting.
    """
    lp = lock_path_for(config_path)
    fd = _open_lock_file(lp)
    try:
        deadline = clock() + max(0.0, timeout)
        # flock cannot be given a timeout and a blocked flock cannot be cancelled, so the wait is a
        # series of non-blocking attempts; the holder is another process, with no event to wait on.
        told = False
        while not _try_lock(fd, lp):
            holder = _holder(fd)
            if not told and on_wait is not None:
                on_wait(
                    f"another hub-onboard{holder} is onboarding with {config_path}; waiting up to "
                    f"{timeout:g} s for it to finish (lock {lp})"
                )
            told = True
            if clock() >= deadline:
                raise BusyError(
                    f"another hub-onboard{holder} is onboarding with {config_path} (lock {lp} held for "
                    f"more than {timeout:g} s); wait for it to finish, then run provision again"
                )
            sleep(poll)
        _write_pid(fd)
        try:
            yield
        finally:
            _clear_pid(fd)
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _open_lock_file(lp: Path) -> int:
    """Open (or create) the lock file itself: never through a symlink, never anything but a regular file.

    A symlink planted at `<config>.lock` would make onboarding create or truncate the file it points at
    (O_NOFOLLOW refuses it: ELOOP); O_NONBLOCK keeps a FIFO planted there from blocking the open.
    """
    try:
        fd = os.open(lp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StorageError(
                f"the lock file {lp} is a symbolic link (to {_link_target(lp)}); onboarding does not "
                f"follow it: remove it ('rm {lp}'), then run the same command again"
            ) from None
        raise StorageError(
            f"cannot create the lock file {lp}: {exc.strerror or exc}; the config's folder "
            "must be writable by onboarding"
        ) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise StorageError(
            f"the lock file {lp} is {file_kind(mode)}, not a regular file; remove it ('rm {lp}'), then run "
            "the same command again"
        )
    return fd


def _link_target(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _holder(fd: int) -> str:
    """ " (pid N)" for the process that wrote its pid into the lock file, "" when it did not (yet)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""


def _write_pid(fd: int) -> None:
    """Say who holds the lock, for a run that waits on it. Best effort: a failure to write is no failure
    to lock."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)


def _clear_pid(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)


def _try_lock(fd: int, lp: Path) -> bool:
    """True when the exclusive lock was taken, False when another open file holds it."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except InterruptedError:
            continue
        except OSError as exc:  # ENOLCK (no lock support, e.g. some network filesystems), EBADF...
            raise StorageError(
                f"cannot lock {lp}: {exc.strerror or exc}; the config's folder must be on a filesystem "
                "that supports file locks (flock), e.g. a local one"
            ) from None
        return True
