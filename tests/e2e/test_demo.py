"""`hub-onboard demo`: the whole story with no arguments, ending in a PROVISIONED config."""

from __future__ import annotations

import json
import re

import pytest

from hub_onboarding.cli import main

pytestmark = pytest.mark.e2e


def test_demo_provisions_a_simulated_hub(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for step in ("starting iot-core-local", "claim certificate", "thing registered", "the cloud now has"):
        assert step in out
    config = json.loads(out[out.index("{", out.index("resulting iotmi_config.json")) :])
    assert config["rw"]["iot_provisioning_state"] == "PROVISIONED"
    assert config["rw"]["client_id"] == "hub-SN-DEMO-0001"
    assert re.search(r"certificate [0-9a-f]{16}\.\.\. ACTIVE", out)
    assert "PRIVATE KEY" not in out
