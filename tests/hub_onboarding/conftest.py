"""Fixtures for hub_onboarding's unit tests (the helpers themselves live in tests/_support)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._support.brokers import Broker, tls_mosquitto
from tests._support.hubs import Hub, HubFactory, write_offline_hub


@pytest.fixture
def make_hub(tmp_path: Path) -> HubFactory:
    """An offline hub in tmp_path/hub: test claim and DHA pairs, a config; see hubs.write_offline_hub."""

    def make(*args: Any, **kwargs: Any) -> Hub:
        return write_offline_hub(tmp_path / "hub", *args, **kwargs)

    return make


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A plain Mosquitto with mutual TLS, shared by a module's tests (see brokers.tls_mosquitto)."""
    with tls_mosquitto(tmp_path_factory.mktemp("mosquitto")) as running:
        yield running
