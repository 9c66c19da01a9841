"""Fixtures shared by every test folder: a fresh SoftHSM2 token per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub_onboarding.tools.softhsm import CONF_ENV, SoftHsmToken, activate, make_token


@pytest.fixture
def softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftHsmToken:
    """A new SoftHSM2 token labelled `hub` in tmp_path/token, seen by this process (SOFTHSM2_CONF) and by
    the processes it starts; its user PIN is in token.pin_path (0600)."""
    token = make_token(tmp_path / "token")
    monkeypatch.setenv(CONF_ENV, str(token.conf))
    activate(token)
    return token
