"""The managed integrations set-up recipe through boto3 against iot-core-local: a fresh run, a rerun that
finds everything and creates nothing, and the claim's private key, which only the first run gets."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from iot_core_local.recipes.managed_integrations import (
    Hub,
    ManagedIntegrationsSetup,
    set_up_managed_integrations,
)
from iot_core_local.server import LocalIotCore
from tests._support.certificates import make_pair

_names = (f"Line{i}" for i in itertools.count())


@pytest.fixture(scope="module")
def mi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with LocalIotCore(tmp_path_factory.mktemp("cloud")) as core:
        yield core.endpoint.client(service="iot-managed-integrations")


def _lines(setup: ManagedIntegrationsSetup) -> list[str]:
    return [str(step) for step in setup.steps]


def test_a_fresh_run_creates_everything_and_a_rerun_finds_it(mi: Any, tmp_path: Path) -> None:
    name = next(_names)
    hubs = [Hub(f"{name}-SN-1", upc="012345678905"), Hub(f"{name}-SN-2", ean="4006381333931")]
    claim = tmp_path / "claim"

    first = set_up_managed_integrations(mi, name, hubs, claim_folder=claim)

    assert all(step.created for step in first.steps[1:])  # the endpoint may be another test's
    assert first.template_name == name
    assert first.claim_private_key_pem is not None
    assert (claim / "claim.pem.key").read_text() == first.claim_private_key_pem
    assert (claim / "claim.pem.key").stat().st_mode & 0o777 == 0o600
    assert claim.stat().st_mode & 0o777 == 0o700
    for hub, managed in zip(hubs, first.hubs, strict=True):
        thing = mi.get_managed_thing(Identifier=managed.managed_thing_id)
        assert (thing["Role"], thing["ProvisioningStatus"], thing["SerialNumber"]) == (
            "CONTROLLER",
            "PRE_ASSOCIATED",
            hub.serial,
        )
    assert mi.get_managed_thing(Identifier=first.hubs[0].managed_thing_id)["UniversalProductCode"] == (
        "012345678905"
    )

    again = set_up_managed_integrations(mi, name, hubs, claim_folder=claim)

    assert not any(step.created for step in again.steps)
    assert again.claim_private_key_pem is None
    assert again.claim_certificate_pem == first.claim_certificate_pem
    assert [h.managed_thing_id for h in again.hubs] == [h.managed_thing_id for h in first.hubs]
    assert f"saved in {claim / 'claim.pem.crt'}" in _lines(again)[2]
    names = [p["Name"] for p in mi.list_provisioning_profiles()["Items"]]
    assert names.count(name) == 1
    assert len(mi.list_managed_things(SerialNumberFilter=hubs[0].serial)["Items"]) == 1


def test_a_rerun_without_the_saved_claim_says_the_key_was_returned_once(mi: Any, tmp_path: Path) -> None:
    name = next(_names)
    set_up_managed_integrations(mi, name, [], claim_folder=tmp_path / "first")
    again = set_up_managed_integrations(mi, name, [], claim_folder=tmp_path / "elsewhere")
    assert "returned once" in _lines(again)[2]
    assert "DeleteProvisioningProfile" in _lines(again)[2]
    assert not (tmp_path / "elsewhere").exists()
    without_folder = set_up_managed_integrations(mi, name, [])
    assert "returned once" in _lines(without_folder)[2]


def test_a_folder_holding_an_old_claim_is_refused_before_anything_is_created(mi: Any, tmp_path: Path) -> None:
    name = next(_names)
    (tmp_path / "claim.pem.key").write_text("an old key")
    with pytest.raises(FileExistsError, match=r"claim\.pem\.key exists"):
        set_up_managed_integrations(mi, name, [], claim_folder=tmp_path)
    assert name not in [p["Name"] for p in mi.list_provisioning_profiles()["Items"]]
    assert (tmp_path / "claim.pem.key").read_text() == "an old key"


def test_a_supplied_claim_certificate_is_the_profiles(mi: Any) -> None:
    pair = make_pair("maker claim")
    setup = set_up_managed_integrations(mi, next(_names), [], claim_certificate_pem=pair.cert_pem.decode())
    assert setup.claim_certificate_pem.strip() == pair.cert_pem.decode().strip()
    assert setup.claim_private_key_pem is None  # the maker has it


def test_a_hub_needs_one_product_code() -> None:
    with pytest.raises(ValueError, match="UPC or its EAN"):
        Hub("SN-1")
    with pytest.raises(ValueError, match="UPC or its EAN"):
        Hub("SN-1", upc="012345678905", ean="4006381333931")
    assert Hub("SN-1", upc="012345678905").material == "SN:SN-1;UPC:012345678905"


class _Late:
    """The real client, but its first List answer is empty: another run creates the resource between
    this run's look-up and its Create (the race a rerun on two machines meets)."""

    def __init__(self, client: Any, listing: str) -> None:
        self._client = client
        self._listing = listing
        self._hidden = True

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if name != self._listing or not self._hidden:
            return attribute

        def once(**request: Any) -> Any:
            self._hidden = False
            return {"Items": []}

        return once


def test_a_managed_thing_created_meanwhile_is_found_not_duplicated(mi: Any) -> None:
    name = next(_names)
    hub = Hub(f"{name}-SN-1", upc="012345678905")
    first = set_up_managed_integrations(mi, name, [hub])
    late = set_up_managed_integrations(_Late(mi, "list_managed_things"), name, [hub])
    assert [h.managed_thing_id for h in late.hubs] == [h.managed_thing_id for h in first.hubs]
    assert not late.steps[-1].created
    assert len(mi.list_managed_things(SerialNumberFilter=hub.serial)["Items"]) == 1


def test_a_profile_created_meanwhile_is_found_not_duplicated(mi: Any) -> None:
    name = next(_names)
    first = set_up_managed_integrations(mi, name, [])
    late = set_up_managed_integrations(_Late(mi, "list_provisioning_profiles"), name, [])
    assert late.profile_id == first.profile_id
    assert late.claim_private_key_pem is None
    assert [p["Name"] for p in mi.list_provisioning_profiles()["Items"]].count(name) == 1
