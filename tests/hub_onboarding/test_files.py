"""_files: atomic replacement, reads that refuse planted symlinks, durable removal, private folders."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from hub_onboarding import _files
from hub_onboarding.errors import CredentialError, StorageError


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_replace_shared_file_creates_a_missing_file_0644(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        written = _files.replace_shared_file(tmp_path / "shared.json", b"{}")
    finally:
        os.umask(old)
    assert written == tmp_path / "shared.json"
    assert mode(written) == 0o644
    assert written.read_bytes() == b"{}"


def test_replace_shared_file_writes_through_a_symlink_and_keeps_the_mode(tmp_path: Path) -> None:
    target = tmp_path / "real" / "file"
    target.parent.mkdir()
    target.write_bytes(b"old")
    target.chmod(0o640)
    link = tmp_path / "link"
    link.symlink_to(target)
    assert _files.replace_shared_file(link, b"new") == target
    assert link.is_symlink()
    assert target.read_bytes() == b"new"
    assert mode(target) == 0o640
    assert sorted(p.name for p in target.parent.iterdir()) == ["file"]  # no temp file left


def test_atomic_write_leaves_no_temp_file_when_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"before")

    def fail(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="Input/output error"):
        _files.atomic_write(path, b"after", 0o600)
    assert path.read_bytes() == b"before"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_read_at_most_refuses_a_symlink_when_told_not_to_follow(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.write_bytes(b"0123456789")
    link = tmp_path / "link"
    link.symlink_to(real)
    assert _files.read_at_most(real, 4, follow_symlinks=False) == b"0123"
    assert _files.read_at_most(link, 100, follow_symlinks=True) == b"0123456789"
    with pytest.raises(OSError, match=re.escape(os.strerror(errno.ELOOP))) as info:
        _files.read_at_most(link, 100, follow_symlinks=False)
    assert info.value.errno == errno.ELOOP


def test_remove_is_false_for_a_missing_file(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("x")
    assert _files.remove(tmp_path / "a") is True
    assert _files.remove(tmp_path / "a") is False
    assert not (tmp_path / "a").exists()


def test_private_folder_is_made_0700_and_a_wide_one_refused(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"
    _files.check_private_dir(folder)  # missing is fine
    _files.ensure_private_dir(folder)
    assert mode(folder) == 0o700
    _files.ensure_private_dir(folder)  # existing and private: used as it is
    folder.chmod(0o750)
    with pytest.raises(CredentialError, match="open to other users"):
        _files.ensure_private_dir(folder)
    assert mode(folder) == 0o750  # never narrowed


def test_write_private_file_mode_from_the_first_byte(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        _files.write_private_file(tmp_path / "d" / "secret", b"s")
    finally:
        os.umask(old)
    assert mode(tmp_path / "d") == 0o700
    assert mode(tmp_path / "d" / "secret") == 0o600


def _unlink_answers(err: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Path.unlink fails with `err` whether or not the name exists, as a read-only filesystem answers."""

    def unlink(self: Path, missing_ok: bool = False) -> None:
        raise OSError(err, os.strerror(err), str(self))

    monkeypatch.setattr(Path, "unlink", unlink)


def test_remove_of_a_missing_file_on_a_read_only_filesystem_is_no_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The mistake: unlink answers EROFS even for a file that does not exist, and onboarding then blamed
    # a progress record that was never there (exit 5).
    _unlink_answers(errno.EROFS, monkeypatch)
    assert _files.remove(tmp_path / "never-written.json") is False
    present = tmp_path / "present.json"
    present.write_text("{}")
    with pytest.raises(OSError, match="Read-only file system"):
        _files.remove(present)


def test_read_regular_file_never_blocks_on_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(_files.NotRegularFileError) as info:
        _files.read_regular_file(fifo, 100)  # no writer: a plain open would block here forever
    assert info.value.kind == "a FIFO (named pipe)"
    with pytest.raises(IsADirectoryError):
        _files.read_regular_file(tmp_path, 100)
    (tmp_path / "f").write_bytes(b"data")
    assert _files.read_regular_file(tmp_path / "f", 100) == b"data"


def test_probe_writable_leaves_nothing_and_judges_a_missing_folder_by_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _files.probe_writable(tmp_path)
    _files.probe_writable(tmp_path / "not" / "yet")  # created later: tmp_path takes it
    assert list(tmp_path.iterdir()) == []
    real_open = os.open

    def read_only(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_CREAT and Path(os.fsdecode(path)).parent == tmp_path:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OSError, match="Read-only file system"):
        _files.probe_writable(tmp_path / "not" / "yet")


def test_read_regular_file_refuses_beyond_its_limit_without_reading(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with big.open("wb") as fh:
        fh.truncate(2 * 1024**3)  # sparse: reading it whole would take 2 GB of memory
    with pytest.raises(_files.FileTooLargeError) as info:
        _files.read_regular_file(big, 1024)
    assert (info.value.size, info.value.limit) == (2 * 1024**3, 1024)
    exact = tmp_path / "exact"
    exact.write_bytes(b"x" * 1024)
    assert _files.read_regular_file(exact, 1024) == b"x" * 1024


def test_read_regular_file_without_following_names_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"secret")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(_files.NotRegularFileError) as info:
        _files.read_regular_file(link, 100, follow_symlinks=False)
    assert info.value.kind == "a symbolic link"
    assert _files.read_regular_file(link, 100) == b"secret"


def test_read_at_most_never_blocks_on_a_fifo(tmp_path: Path) -> None:
    # The mistake: the record of onboarding's files was opened without O_NONBLOCK: a FIFO there hung reset.
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(_files.NotRegularFileError):
        _files.read_at_most(fifo, 100, follow_symlinks=False)


@pytest.mark.parametrize("kind", ["fifo", "symlink", "folder", "huge"])
def test_read_record_refuses_what_onboarding_never_writes(tmp_path: Path, kind: str) -> None:
    record = tmp_path / "onboarding-progress.json"
    target = tmp_path / "elsewhere"
    target.write_text('{"version": 1}')
    words = {
        "fifo": "is a FIFO (named pipe), not the regular file onboarding writes",
        "symlink": "is a symbolic link, not the regular file onboarding writes",
        "folder": "is a folder, not the regular file onboarding writes",
        "huge": f"is {2 * 1024**3} bytes, more than the 1 MiB such a record can be",
    }
    if kind == "fifo":
        os.mkfifo(record)
    elif kind == "symlink":
        record.symlink_to(target)
    elif kind == "folder":
        record.mkdir()
    else:
        with record.open("wb") as fh:
            fh.truncate(2 * 1024**3)
    with pytest.raises(StorageError) as info:
        _files.read_record(record, "the onboarding progress record")
    assert info.value.exit_code == 5
    assert info.value.key == "ro.iot_permanent_cert_dir"
    assert info.value.message == (
        f"{record} (the onboarding progress record) {words[kind]}, so something else put it there and "
        f"onboarding does not read it; remove it (rm -r {record}), then run the same command again"
    )


def test_read_record_of_a_missing_file_is_none(tmp_path: Path) -> None:
    assert _files.read_record(tmp_path / "onboarding-files.json", "the record") is None
