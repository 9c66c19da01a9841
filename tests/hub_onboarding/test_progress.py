"""The resume state machine (pure) and its sidecar record."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from hub_onboarding.errors import StorageError
from hub_onboarding.progress import (
    TOKEN_USABLE_FOR,
    Action,
    Progress,
    ProgressStore,
    Step,
    next_action,
)

BINDING = {"endpoint": "e:8883", "template": "T"}


def issued(at: float = 1000.0, token: str | None = "SECRET-TOKEN-9") -> Progress:
    return Progress(
        step=Step.CERTIFICATE_ISSUED,
        binding=BINDING,
        certificate_id="c" * 64,
        certificate_path="/x/cert",
        private_key_path="/x/key",
        token_issued_at=at,
        ownership_token=token,
    )


@pytest.mark.parametrize(
    ("progress", "binding", "now", "action"),
    [
        (None, BINDING, 0.0, Action.CREATE_CERTIFICATE),
        (issued(), BINDING, 1000.0, Action.REGISTER_THING),
        (issued(), BINDING, 1000.0 + TOKEN_USABLE_FOR - 1, Action.REGISTER_THING),
        (issued(), BINDING, 1000.0 + TOKEN_USABLE_FOR + 1, Action.CREATE_CERTIFICATE),  # token too old
        (issued(), BINDING, 500.0, Action.CREATE_CERTIFICATE),  # clock went backwards: do not trust the token
        (issued(token=None), BINDING, 1000.0, Action.CREATE_CERTIFICATE),
        (issued(), {"endpoint": "other:8883", "template": "T"}, 1000.0, Action.CREATE_CERTIFICATE),
        (issued().registered("thing", {"ClientId": "c"}), BINDING, 99999.0, Action.VERIFY),
        (issued().registered("thing", {}).verified(), BINDING, 99999.0, Action.WRITE_CONFIG),
    ],
)
def test_next_action(progress: Progress | None, binding: dict[str, str], now: float, action: Action) -> None:
    assert next_action(progress, binding, now) is action


def test_registered_drops_the_token() -> None:
    p = issued().registered("thing", {"ClientId": "c"})
    assert p.ownership_token is None
    assert p.step is Step.THING_REGISTERED
    assert "SECRET-TOKEN-9" not in repr(issued())


def test_round_trip_and_mode(tmp_path: Path) -> None:
    store = ProgressStore(tmp_path / "certs")
    assert store.load() is None
    store.save(issued())
    assert store.load() == issued()
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    store.clear()
    store.clear()
    assert store.load() is None


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        '{"version": 99}',
        '{"version": 1, "step": "NOPE"}',
        json.dumps({**issued().to_json(), "binding": {"a": 1}}),
        json.dumps({**issued().to_json(), "token_issued_at": "yesterday"}),
        json.dumps({**issued().to_json(), "ownership_token": 5}),
        "\udcff",  # not UTF-8 once written with surrogateescape
        "[" * 100_000,  # nested too deep to parse
        '{"version": ' + "9" * 5000 + "}",  # an integer too long to convert
    ],
)
def test_invalid_records_are_ignored(tmp_path: Path, content: str) -> None:
    store = ProgressStore(tmp_path)
    store.path.write_text(content, errors="surrogateescape")
    assert store.load() is None


def test_to_json_is_serialisable() -> None:
    data: dict[str, Any] = issued().registered("t", {"k": "v"}).to_json()
    assert json.loads(json.dumps(data))["device_configuration"] == {"k": "v"}


def test_clear_without_a_record_on_a_read_only_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The mistake: a read-only credentials folder gave exit 5 blaming a progress file that did not exist.
    def unlink(self: Path, missing_ok: bool = False) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "unlink", unlink)
    ProgressStore(tmp_path).clear()  # nothing there: nothing to do, no error


def test_a_fifo_record_is_refused_at_once(tmp_path: Path) -> None:
    # The mistake: a FIFO planted at onboarding-progress.json hung provision, status and reset forever.
    store = ProgressStore(tmp_path)
    os.mkfifo(store.path, 0o600)
    with pytest.raises(StorageError, match=r"is a FIFO \(named pipe\), not the regular file onboarding"):
        store.load()


def test_a_symlinked_record_is_never_read_through(tmp_path: Path) -> None:
    # The mistake: the record was read through a symlink planted in its place (it read the target).
    store = ProgressStore(tmp_path / "certs")
    target = tmp_path / "victim.json"
    target.write_text(json.dumps(issued().to_json()))
    store.path.parent.mkdir(mode=0o700)
    store.path.symlink_to(target)
    with pytest.raises(StorageError, match="is a symbolic link, not the regular file onboarding writes"):
        store.load()
