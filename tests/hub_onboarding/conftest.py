"""Fixtures for hub_onboarding's unit tests (the helpers themselves live in tests/_support)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests._support.hubs import Hub, HubFactory, write_offline_hub


@pytest.fixture
def make_hub(tmp_path: Path) -> HubFactory:
    """An offline hub in tmp_path/hub: test claim and DHA pairs, a config; see hubs.write_offline_hub."""

    def make(*args: Any, **kwargs: Any) -> Hub:
        return write_offline_hub(tmp_path / "hub", *args, **kwargs)

    return make
