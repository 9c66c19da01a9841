"""Fixtures shared by every test folder (a fresh SoftHSM2 token per test), and the order of the files."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings

from hub_onboarding.tools.softhsm import CONF_ENV, SoftHsmToken, activate, make_token

# No per-example deadline anywhere: on a shared 2-core machine one example can stall past hypothesis's
# 200 ms default, which fails a correct test (DeadlineExceeded, or "unreliable test timings").
settings.register_profile("hub-onboarding", deadline=None)
settings.load_profile("hub-onboarding")


@pytest.fixture
def softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftHsmToken:
    """A new SoftHSM2 token labelled `hub` in tmp_path/token, seen by this process (SOFTHSM2_CONF) and by
    the processes it starts; its user PIN is in token.pin_path (0600)."""
    token = make_token(tmp_path / "token")
    monkeypatch.setenv(CONF_ENV, str(token.conf))
    activate(token)
    return token


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Whole files in this order: those with a `slow` test, then the end-to-end ones, then the rest, each
    file's tests kept in their order. `make test`'s workers (pytest-xdist, --dist loadfile
    --no-loadscope-reorder) take files in this order: the long ones start first and the many short unit
    files fill in at the end, so the two workers finish together."""
    rank: dict[Path, int] = {}
    for item in items:
        here = 0 if item.get_closest_marker("slow") else 1 if item.get_closest_marker("e2e") else 2
        rank[item.path] = min(here, rank.get(item.path, here))
    items.sort(key=lambda item: rank[item.path])  # stable: each file's tests keep their order
