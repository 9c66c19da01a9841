"""The onboarding lock: two runs on one config never both onboard.

`<config>.lock` beside the config (beside the real file when the config is a symlink, so two names for
one config share one lock), held with fcntl.flock for the whole onboarding. flock is released by the
kernel when the process dies, so a crash never leaves a stale lock, and the lock file is never deleted
(deleting a lock file races with the next run opening it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from hub_onboarding._files import real_path
from hub_onboarding.errors import BusyError, StorageError

DEFAULT_POLL = 0.1


def lock_path_for(config_path: str | os.PathLike[str]) -> Path:
    """`<config>.lock` beside the real file, so two names for one config (a symlink) share one lock."""
    p = real_path(config_path)
    return p.with_name(p.name + ".lock")


@contextlib.contextmanager
def onboarding_lock(
    config_path: str | os.PathLike[str],
    timeout: float,
    *,
    poll: float = DEFAULT_POLL,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[None]:
    """Hold an exclusive flock on `<config>.lock`, waiting at most `timeout` seconds for it.

    `clock` (monotonic seconds) and `sleep` are the time the wait is measured in; tests hand in a clock
    that `sleep` advances, so a contended lock is tested without waiting.
    """
    lp = lock_path_for(config_path)
    try:
        fd = os.open(lp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StorageError(
            f"cannot create the lock file {lp}: {exc.strerror or exc}; the config's folder "
            "must be writable by onboarding"
        ) from None
    try:
        deadline = clock() + max(0.0, timeout)
        # flock cannot be given a timeout and a blocked flock cannot be cancelled, so the wait is a
        # series of non-blocking attempts; the holder is another process, with no event to wait on.
        while not _try_lock(fd, lp):
            if clock() >= deadline:
                raise BusyError(
                    f"another hub-onboard is onboarding with {config_path} (lock {lp} held for more than "
                    f"{timeout:g} s); wait for it to finish, then run provision again"
                )
            sleep(poll)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


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
