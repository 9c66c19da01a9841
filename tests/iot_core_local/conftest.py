"""Fixtures of the control-plane tests (prefixed `cp_` so they never clash with other suites')."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from iot_core_local.ca import CertificateAuthority
from iot_core_local.control_plane import ControlPlane
from iot_core_local.registry import Registry
from tests._support.clients import iot_client


@pytest.fixture(scope="session")
def cp_session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cp")


@pytest.fixture(scope="session")
def cp_ca(cp_session_dir: Path) -> CertificateAuthority:
    # One CA for the session: key generation is the slow part, and the CA is read-only once created.
    return CertificateAuthority(cp_session_dir / "ca")


@pytest.fixture
def cp_registry(tmp_path: Path) -> Iterator[Registry]:
    registry = Registry(tmp_path / "registry.sqlite3")
    yield registry
    registry.close()


@pytest.fixture
def cp_plane(cp_registry: Registry, cp_ca: CertificateAuthority) -> Iterator[ControlPlane]:
    plane = ControlPlane(cp_registry, cp_ca, host="127.0.0.1", port=0, endpoint_address=lambda: "localhost")
    plane.start()
    yield plane
    plane.stop()


@pytest.fixture
def cp_client(cp_plane: ControlPlane) -> Any:
    return iot_client(cp_plane.url)
