"""pytest fixtures for projects that test against iot-core-local.

`iot_core`: a running LocalIotCore in a temporary folder, stopped after the test.
Installed as a pytest11 entry point, so `pip install hub-onboarding[server]` makes it available.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .server import LocalIotCore


@pytest.fixture
def iot_core(tmp_path: Path) -> Iterator[LocalIotCore]:
    with LocalIotCore(tmp_path / "iot-core-local") as core:
        yield core
