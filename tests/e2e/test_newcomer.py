"""What a newcomer following the README met on a fresh clone, each fixed and kept fixed: the managed
integrations walkthrough and the local one sharing a scratch folder, and a gateway on IPv6 loopback whose
custom endpoint must fit the model's pattern."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hub_onboarding import cli as hub_cli
from iot_core_local import cli as local_cli
from iot_core_local.managed import endpoint_name
from iot_core_local.server import LocalIotCore
from tests._support.hubs import read_config
from tests.e2e.test_walkthroughs import hand_written_config

pytestmark = pytest.mark.e2e

# GetCustomEndpoint's EndpointAddress in botocore's iot-managed-integrations model.
ENDPOINT_ADDRESS = re.compile(r"[A-Za-z0-9._@-]+")


def test_setup_fleet_refuses_a_claim_another_profile_left_in_its_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # setup-managed then setup-fleet into one folder: the profile's claim used to be reported as
    # "exists" for the template, and the hub then failed at RegisterThing with a refused subscription.
    cloud, hub = tmp_path / "cloud", tmp_path / "hub"
    with LocalIotCore(cloud):
        managed = [
            "setup-managed",
            "--data-dir",
            str(cloud),
            "--out",
            str(hub),
            "--hub",
            "SN-0001:012345678905",
        ]
        assert local_cli.main(managed) == 0
        claim = (hub / "claim.pem.crt").read_bytes()
        capsys.readouterr()
        assert local_cli.main(["setup-fleet", "--data-dir", str(cloud), "--out", str(hub)]) == 3
        err = capsys.readouterr().err
        assert f"{hub / 'claim.pem.crt'} is the claim of another template or profile" in err
        assert "HubProfile-claim" in err
        assert "HubTemplate-claim" in err
        assert "use another --out folder" in err
        assert (hub / "claim.pem.crt").read_bytes() == claim
        # The template's own claim, in its own folder, is reported as existing on a rerun.
        fleet = ["setup-fleet", "--data-dir", str(cloud), "--out", str(tmp_path / "fleet")]
        assert local_cli.main(fleet) == 0
        assert local_cli.main(fleet) == 0
        assert "claim certificate " in capsys.readouterr().out


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "iot.example.com"])
def test_a_custom_endpoint_other_than_ipv6_is_the_host(host: str) -> None:
    assert endpoint_name(host) == host
    assert ENDPOINT_ADDRESS.fullmatch(host)


def test_an_ipv6_gateway_has_no_custom_endpoint_and_says_what_works(tmp_path: Path) -> None:
    # The model's pattern cannot carry "::1" (it used to be answered as is, breaking boto3's callers).
    with LocalIotCore(tmp_path / "cloud", host="::1") as core:
        mi = core.endpoint.client(core.region, service="iot-managed-integrations")
        with pytest.raises(mi.exceptions.ValidationException) as refused:
            mi.register_custom_endpoint()
        message = refused.value.response["Error"]["Message"]
        assert "IPv6 address ::1" in message
        assert "--host localhost" in message
        assert "[::1]:PORT" in message
        with pytest.raises(mi.exceptions.ResourceNotFoundException):
            mi.get_custom_endpoint()  # nothing was registered
        assert core.endpoint.mqtt_address == f"[::1]:{core.endpoint.mqtt_port}"


def test_a_hub_onboards_through_the_custom_endpoint_of_a_gateway_on_localhost(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    with LocalIotCore(tmp_path / "cloud", host="localhost") as core:
        mi = core.endpoint.client(core.region, service="iot-managed-integrations")
        address = mi.register_custom_endpoint()["EndpointAddress"]
        assert address == mi.get_custom_endpoint()["EndpointAddress"] == "localhost"
        assert ENDPOINT_ADDRESS.fullmatch(address)
        profile = mi.create_provisioning_profile(ProvisioningType="FLEET_PROVISIONING", Name="HubProfile")
        hub.mkdir(mode=0o700)
        (hub / "claim.pem.crt").write_text(profile["ClaimCertificate"], encoding="utf-8")
        (hub / "claim.pem.key").write_text(profile["ClaimCertificatePrivateKey"], encoding="utf-8")
        (hub / "claim.pem.key").chmod(0o600)
        thing_id = mi.create_managed_thing(
            Role="CONTROLLER",
            AuthenticationMaterialType="WIFI_SETUP_QR_BAR_CODE",
            AuthenticationMaterial="SN:SN-0001;UPC:012345678905",
        )["Id"]
        config = hand_written_config(
            hub,
            core,
            {
                "endpoint_url": f"{address}:{core.endpoint.mqtt_port}",
                "iot_provisioning_method": "FLEET_PROVISIONING",
                "iot_claim_cert_path": "claim.pem.crt",
                "iot_claim_pk_path": "claim.pem.key",
                "fp_template_name": "HubProfile",
                "SN": "SN-0001",
                "UPC": "012345678905",
            },
        )
        assert hub_cli.main(["provision", "--config", str(config)]) == 0
        assert read_config(config)["rw"]["managed_thing_id"] == thing_id
        assert mi.get_managed_thing(Identifier=thing_id)["ProvisioningStatus"] == "ACTIVATED"
