"""Managed integrations' documented flow with a real hub: `hub-onboard provision` (awscrt, TLS, Mosquitto)
against a provisioning profile and a pre-associated managed thing made through boto3 and the AWS CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hub_onboarding.cli import main
from hub_onboarding.tools.factory import write_claim_hub, write_jitr_hub
from iot_core_local.recipes.jitr import DeviceCA
from iot_core_local.server import LocalIotCore
from tests._support.devices import Lifecycle
from tests._support.hubs import read_config
from tests._support.network import connects

pytestmark = pytest.mark.e2e

UPC = "829576019524"


def aws(cloud: LocalIotCore, *args: str) -> Any:
    """The AWS CLI (awscli, in the dev extra) against the stand-in's control plane; its JSON output."""
    command = [str(Path(sys.executable).parent / "aws"), "iot-managed-integrations", *args]
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",  # a dummy: the stand-in checks no credentials
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    done = subprocess.run(
        [*command, "--endpoint-url", cloud.endpoint.api_url, "--output", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if done.stdout.strip() else None


def test_the_documented_flow(cloud: LocalIotCore, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mi = cloud.endpoint.client(service="iot-managed-integrations")
    endpoint = aws(cloud, "register-custom-endpoint")["EndpointAddress"]
    assert aws(cloud, "get-custom-endpoint")["EndpointAddress"] == endpoint == cloud.endpoint.mqtt_host
    profile = mi.create_provisioning_profile(ProvisioningType="FLEET_PROVISIONING", Name="HubProfile")
    serial = "AIDACKCEVSQ6C2EXAMPLE"
    created = aws(
        cloud,
        "create-managed-thing",
        "--role",
        "CONTROLLER",
        "--authentication-material-type",
        "WIFI_SETUP_QR_BAR_CODE",
        "--authentication-material",
        f"SN:{serial};UPC:{UPC}",
    )
    thing_id = created["Id"]
    assert mi.get_managed_thing(Identifier=thing_id)["ProvisioningStatus"] == "PRE_ASSOCIATED"

    def hub(name: str, code: str) -> Path:
        return write_claim_hub(
            tmp_path / name,
            endpoint_url=cloud.endpoint.mqtt_address,
            root_ca_path=cloud.endpoint.root_ca_path,
            claim_certificate_pem=profile["ClaimCertificate"],
            claim_private_key_pem=profile["ClaimCertificatePrivateKey"],
            template_name=profile["Name"],
            serial=serial,
            upc=code,
        )

    # A hub whose product code is not the managed thing's is refused, and writes nothing.
    wrong = hub("wrong-upc", "000000000000")
    assert main(["provision", "--config", str(wrong)]) == 12  # IdentityError
    assert "ProductCodeMismatch" in capsys.readouterr().err
    assert read_config(wrong)["rw"]["iot_provisioning_state"] == "NOT_PROVISIONED"

    config = hub("hub", UPC)
    watcher = Lifecycle(cloud)
    try:
        assert main(["provision", "--config", str(config)]) == 0
        # The hub verified its new identity: connected, then said goodbye with a DISCONNECT.
        watcher.wait_for((thing_id, False, "CLIENT_INITIATED_DISCONNECT"))
    finally:
        watcher.close()
    rw = read_config(config)["rw"]
    assert rw["iot_provisioning_state"] == "PROVISIONED"
    assert rw["managed_thing_id"] == thing_id == rw["client_id"]
    got = aws(cloud, "get-managed-thing", "--identifier", thing_id)
    assert (got["ProvisioningStatus"], got["SerialNumber"], got["UniversalProductCode"]) == (
        "ACTIVATED",
        serial,
        UPC,
    )
    assert "ActivatedAt" in got
    data = aws(cloud, "get-managed-thing-connectivity-data", "--identifier", thing_id)
    assert (data["Connected"], data["DisconnectReason"]) == (False, "CLIENT_INITIATED_DISCONNECT")
    assert connects(cloud, rw["iot_permanent_cert_path"], rw["iot_permanent_pk_path"], rw["client_id"])

    # The same serial again (a cloned hub, or the same hub after a reset without offboarding): refused.
    clone = hub("clone", UPC)
    assert main(["provision", "--config", str(clone)]) == 12
    assert "AlreadyOnboarded" in capsys.readouterr().err

    # Offboarding: the managed thing and the hub's identity are gone.
    aws(cloud, "delete-managed-thing", "--identifier", thing_id)
    with pytest.raises(mi.exceptions.ResourceNotFoundException):
        mi.get_managed_thing(Identifier=thing_id)
    assert not connects(cloud, rw["iot_permanent_cert_path"], rw["iot_permanent_pk_path"], rw["client_id"])


def test_an_unknown_serial_is_refused(
    cloud: LocalIotCore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mi = cloud.endpoint.client(service="iot-managed-integrations")
    profile = mi.create_provisioning_profile(ProvisioningType="FLEET_PROVISIONING", Name="Unknowns")
    config = write_claim_hub(
        tmp_path / "hub",
        endpoint_url=cloud.endpoint.mqtt_address,
        root_ca_path=cloud.endpoint.root_ca_path,
        claim_certificate_pem=profile["ClaimCertificate"],
        claim_private_key_pem=profile["ClaimCertificatePrivateKey"],
        template_name="Unknowns",
        serial="NEVER-CREATED",
        upc=UPC,
    )
    assert main(["provision", "--config", str(config)]) == 12
    err = capsys.readouterr().err
    assert "UnknownSerialNumber" in err
    assert "NEVER-CREATED" in err


def test_a_jitr_hub(cloud: LocalIotCore, tmp_path: Path) -> None:
    mi = cloud.endpoint.client(service="iot-managed-integrations")
    maker = DeviceCA("Managed Hub Maker CA")
    mi.create_provisioning_profile(
        ProvisioningType="JITR", Name="JitrHubs", CaCertificate=maker.certificate_pem
    )
    serial = "JITR-MI-0001"
    thing_id = mi.create_managed_thing(
        Role="CONTROLLER",
        AuthenticationMaterialType="WIFI_SETUP_QR_BAR_CODE",
        AuthenticationMaterial=f"SN:{serial};UPC:{UPC}",
    )["Id"]
    dha = maker.issue_device(f"hub-{serial}", serial_number=serial)
    config = write_jitr_hub(
        tmp_path / "hub",
        endpoint_url=cloud.endpoint.mqtt_address,
        root_ca_path=cloud.endpoint.root_ca_path,
        device_certificate_pem=dha.certificate_pem,
        device_private_key_pem=dha.private_key_pem,
        serial=serial,
        upc=UPC,
        extra_ro={"mqtt_retry_timeout_seconds": 60},
    )
    # No activator of the customer's: the service activates the DHA certificate its serial names.
    assert main(["provision", "--config", str(config)]) == 0
    rw = read_config(config)["rw"]
    assert (rw["iot_provisioning_state"], rw["client_id"]) == ("PROVISIONED", f"hub-{serial}")
    got = mi.get_managed_thing(Identifier=thing_id)
    assert got["ProvisioningStatus"] == "ACTIVATED"
    assert mi.get_managed_thing_certificate(Identifier=thing_id)["CertificatePem"] == dha.certificate_pem
