"""The onboarding lock: contention, waiting on an injected clock, and the failures it names."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hub_onboarding import lock
from hub_onboarding.errors import BusyError, StorageError


class FakeTime:
    """A monotonic clock that only moves when the lock sleeps; `on_sleep` runs at each sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.on_sleep: list[Callable[[], None]] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        for action in self.on_sleep:
            action()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "iotmi_config.json"
    path.write_text(json.dumps({"ro": {}}))
    return path


def test_lock_contention(config: Path) -> None:
    fake = FakeTime()
    with lock.onboarding_lock(config, timeout=1):
        # flock is per open file: a second open in the same process contends like another process.
        with (
            pytest.raises(BusyError) as info,
            lock.onboarding_lock(config, timeout=0.5, poll=0.1, clock=fake.clock, sleep=fake.sleep),
        ):
            pass
        assert info.value.exit_code == 6
        assert "another hub-onboard" in info.value.message
        assert "held for more than 0.5 s" in info.value.message
        assert str(lock.lock_path_for(config)) in info.value.message
        assert fake.now >= 1000.5  # it waited the whole timeout, in the injected time
        assert fake.sleeps == pytest.approx([0.1] * len(fake.sleeps))
    with lock.onboarding_lock(config, timeout=0):
        pass  # released when the holder left


def test_lock_waits_for_the_holder_to_leave(config: Path) -> None:
    fake = FakeTime()
    holder = contextlib.ExitStack()
    holder.enter_context(lock.onboarding_lock(config, timeout=0))

    def leave_at_the_third_sleep() -> None:
        if len(fake.sleeps) == 3:
            holder.close()

    fake.on_sleep.append(leave_at_the_third_sleep)
    with lock.onboarding_lock(config, timeout=10, poll=0.25, clock=fake.clock, sleep=fake.sleep):
        assert fake.sleeps == [0.25, 0.25, 0.25]  # taken on the first try after the holder left
        with pytest.raises(BusyError), lock.onboarding_lock(config, timeout=0):
            pass


def test_no_wait_without_contention(config: Path) -> None:
    fake = FakeTime()
    with lock.onboarding_lock(config, timeout=5, clock=fake.clock, sleep=fake.sleep):
        pass
    assert fake.sleeps == []


def test_lock_file_is_beside_the_real_config_and_kept(config: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.json"
    link.symlink_to(config)
    assert lock.lock_path_for(link) == config.with_name("iotmi_config.json.lock")
    # the link and the file it names share one lock
    with (
        lock.onboarding_lock(link, timeout=0),
        pytest.raises(BusyError),
        lock.onboarding_lock(config, timeout=0),
    ):
        pass
    assert lock.lock_path_for(config).exists()  # never deleted: deleting a lock file races


def test_lock_in_read_only_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "iotmi_config.json").write_text("{}")
    folder.chmod(0o500)  # enough when not root
    if os.geteuid() == 0:
        # Root writes through permission bits; simulate what the kernel says for a read-only folder or
        # mount instead: creating a file there fails with EACCES (or EROFS).
        real_open = os.open

        def fake_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if flags & os.O_CREAT and Path(os.fsdecode(path)).parent == folder:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", fake_open)
    try:
        config_path = folder / "iotmi_config.json"
        with pytest.raises(StorageError) as info, lock.onboarding_lock(config_path, timeout=0):
            pass
        assert "cannot create the lock file" in info.value.message
        assert not (folder / "iotmi_config.json.lock").exists()
    finally:
        folder.chmod(0o700)


def test_lock_on_a_filesystem_without_locks(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", flock)
    with pytest.raises(StorageError, match="supports file locks") as info, lock.onboarding_lock(config, 1):
        pass
    assert str(config.parent) in info.value.message


def test_an_interrupted_flock_is_retried(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_flock = fcntl.flock
    calls: list[int] = []

    def flock(fd: int, op: int) -> None:
        calls.append(op)
        if len(calls) == 1:
            raise InterruptedError(errno.EINTR, os.strerror(errno.EINTR))
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    fake = FakeTime()
    with lock.onboarding_lock(config, timeout=0, clock=fake.clock, sleep=fake.sleep):
        pass
    assert len(calls) == 2
    assert fake.sleeps == []


def test_a_symlink_planted_as_the_lock_file_is_refused(config: Path, tmp_path: Path) -> None:
    # The mistake: <config>.lock followed a planted symlink, creating (or locking) the file it names.
    victim = tmp_path / "elsewhere" / "victim"
    victim.parent.mkdir()
    lock.lock_path_for(config).symlink_to(victim)
    with pytest.raises(StorageError) as info, lock.onboarding_lock(config, timeout=0):
        pass
    assert info.value.exit_code == 5
    assert (
        f"the lock file {lock.lock_path_for(config)} is a symbolic link (to {victim})" in info.value.message
    )
    assert "remove it" in info.value.message
    assert not victim.exists()


def test_a_fifo_planted_as_the_lock_file_is_refused(config: Path) -> None:
    os.mkfifo(lock.lock_path_for(config))
    with (
        pytest.raises(StorageError, match=r"is a FIFO \(named pipe\), not a regular file"),
        lock.onboarding_lock(config, timeout=0),
    ):
        pass


def test_the_holder_writes_its_pid_and_empties_the_file_on_release(config: Path) -> None:
    with lock.onboarding_lock(config, timeout=0):
        assert lock.lock_path_for(config).read_text() == f"{os.getpid()}\n"
    assert lock.lock_path_for(config).read_text() == ""


def test_waiting_says_so_at_once_with_the_holders_pid_and_the_wait(config: Path) -> None:
    # The mistake: a second provision waiting on the lock printed nothing for up to 600 s.
    fake = FakeTime()
    heard: list[tuple[float, str]] = []
    with (
        lock.onboarding_lock(config, timeout=0),
        pytest.raises(BusyError) as info,
        lock.onboarding_lock(
            config,
            timeout=2,
            poll=0.5,
            clock=fake.clock,
            sleep=fake.sleep,
            on_wait=lambda text: heard.append((fake.now, text)),
        ),
    ):
        pass
    pid = os.getpid()
    assert heard == [
        (
            1000.0,  # before the first sleep
            f"another hub-onboard (pid {pid}) is onboarding with {config}; waiting up to 2 s for it to "
            f"finish (lock {lock.lock_path_for(config)})",
        )
    ]
    assert f"(pid {pid})" in info.value.message


def test_a_holder_that_wrote_no_pid_is_waited_for_all_the_same(config: Path) -> None:
    fd = os.open(lock.lock_path_for(config), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # an older hub-onboard: holds the lock, says nothing
        heard: list[str] = []
        fake = FakeTime()
        with (
            pytest.raises(BusyError),
            lock.onboarding_lock(config, timeout=0, clock=fake.clock, sleep=fake.sleep, on_wait=heard.append),
        ):
            pass
        assert heard == [
            f"another hub-onboard is onboarding with {config}; waiting up to 0 s for it to finish "
            f"(lock {lock.lock_path_for(config)})"
        ]
    finally:
        os.close(fd)
