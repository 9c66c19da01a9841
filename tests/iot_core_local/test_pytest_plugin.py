"""The `iot_core` pytest fixture that the package installs for other projects' tests."""

from __future__ import annotations

import json

from iot_core_local.server import LocalIotCore


def test_iot_core_fixture_is_a_running_server(iot_core: LocalIotCore) -> None:
    iot = iot_core.client()
    iot.create_thing(thingName="from-the-fixture")
    assert [t["thingName"] for t in iot.list_things()["things"]] == ["from-the-fixture"]
    on_disk = json.loads((iot_core.data_dir / "endpoint.json").read_text())
    assert on_disk == iot_core.endpoint.to_json()
    assert iot_core.endpoint.root_ca_path.is_file()
