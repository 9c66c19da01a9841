"""hub-onboard against iot-core-local: real TLS, real Mosquitto, awscrt on the hub, boto3 in the cloud."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hub_onboarding import HubOnboarding, IdentityError
from hub_onboarding.certs import Credentials
from hub_onboarding.cli import main
from hub_onboarding.config import Endpoint
from hub_onboarding.mqtt import ConnectionSettings, IotProvisioning
from iot_core_local.model import CertificateStatus
from iot_core_local.recipes.claims import ClaimSetup, set_up_fleet_provisioning
from iot_core_local.server import LocalIotCore
from tests._support.certificates import pem_certificate_id
from tests._support.hubs import CloudHubFactory, cloud_claim_hub, read_config, write_jitr_cloud_hub
from tests._support.network import connects

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("method", "key_type"),
    [
        ("CreateKeysAndCertificate", rsa.RSAPrivateKey),
        ("CreateCertificateFromCsr", ec.EllipticCurvePrivateKey),
    ],
)
def test_fleet_provisioning(
    cloud: LocalIotCore,
    iot: Any,
    make_cloud_hub: CloudHubFactory,
    method: str,
    key_type: type,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config_path = make_cloud_hub(certificate_method=method)
    assert main(["provision", "--config", str(config_path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    rw = read_config(config_path)["rw"]
    assert rw["iot_provisioning_state"] == "PROVISIONED"
    serial = read_config(config_path)["ro"]["SN"]
    assert rw["client_id"] == f"hub-{serial}" == printed["client_id"]
    assert rw["managed_thing_id"] == f"mt-{serial}"
    assert isinstance(rw["metadata"]["last_updated_epoch_time"], int)

    cert_pem = Path(rw["iot_permanent_cert_path"]).read_bytes()
    key_path = Path(rw["iot_permanent_pk_path"])
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, key_type), "CSR keys are made on the hub (EC); CreateKeys keys come from AWS (RSA)"
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert key_path.parent.stat().st_mode & 0o777 == 0o700

    cert_id = pem_certificate_id(cert_pem)
    assert iot.describe_certificate(certificateId=cert_id)["certificateDescription"]["status"] == "ACTIVE"
    thing = f"hub-{serial}"
    assert iot.describe_thing(thingName=thing)["attributes"] == {"upc": "012345678905"}
    assert [p.rsplit("/", 1)[1] for p in iot.list_thing_principals(thingName=thing)["principals"]] == [
        cert_id
    ]
    # The new identity really works, seen by a client that is not ours.
    assert connects(cloud, str(rw["iot_permanent_cert_path"]), str(key_path), rw["client_id"])


def test_second_provision_creates_nothing_and_keeps_unknown_keys(
    iot: Any, make_cloud_hub: CloudHubFactory
) -> None:
    config_path = make_cloud_hub()
    doc = read_config(config_path)
    doc["ro"]["vendor_setting"] = {"nested": [1, 2, 3]}
    doc["rw"]["proxy_state"] = "kept"
    doc["vendor_section"] = {"a": "b"}
    config_path.write_text(json.dumps(doc))

    assert main(["provision", "--config", str(config_path)]) == 0
    after_first = read_config(config_path)
    certificates = iot.list_certificates()["certificates"]
    things = iot.list_things()["things"]

    assert main(["provision", "--config", str(config_path)]) == 0
    assert read_config(config_path) == after_first, "a provisioned hub must not rewrite its config"
    assert iot.list_certificates()["certificates"] == certificates
    assert iot.list_things()["things"] == things
    assert after_first["ro"]["vendor_setting"] == {"nested": [1, 2, 3]}
    assert after_first["rw"]["proxy_state"] == "kept"
    assert after_first["vendor_section"] == {"a": "b"}
    assert after_first["ro"] == doc["ro"], "ro is never written"


def _provision_error(config_path: Path) -> IdentityError:
    with pytest.raises(IdentityError) as caught:
        HubOnboarding(config_path).process_device()
    return caught.value


def test_unknown_template_is_an_identity_error_with_the_services_words(
    make_cloud_hub: CloudHubFactory, iot: Any, claim: ClaimSetup, capsys: pytest.CaptureFixture[str]
) -> None:
    # The usual claim policy names its template, so an unknown one would be refused at SUBSCRIBE
    # (a SubscribeTimeoutError). Widen it, as a maker with several templates would, to reach the service.
    prefix = "arn:aws:iot:us-east-1:123456789012"
    every_template = "$aws/provisioning-templates/*"
    iot.create_policy(
        policyName=f"{claim.template_name}-any-template",
        policyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Action": ["iot:Publish", "iot:Receive"],
                        "Resource": f"{prefix}:topic/{every_template}",
                    },
                    {
                        "Effect": "Allow",
                        "Action": "iot:Subscribe",
                        "Resource": f"{prefix}:topicfilter/{every_template}",
                    },
                ],
            }
        ),
    )
    iot.attach_policy(
        policyName=f"{claim.template_name}-any-template",
        target=iot.describe_certificate(certificateId=claim.certificate_id)["certificateDescription"][
            "certificateArn"
        ],
    )
    config_path = make_cloud_hub(template_name="NoSuchTemplate")
    before = config_path.read_bytes()
    error = _provision_error(config_path)
    assert error.status_code == 404
    assert error.error_code
    assert "NoSuchTemplate" in (error.error_message or "")
    assert main(["provision", "--config", str(config_path)]) == IdentityError.exit_code
    err = capsys.readouterr().err
    assert "NoSuchTemplate" in err
    assert "Traceback" not in err
    assert read_config(config_path)["rw"]["iot_provisioning_state"] == "NOT_PROVISIONED"
    assert json.loads(config_path.read_bytes()) == json.loads(before)


def test_denying_hook_is_an_identity_error(
    iot: Any, cloud: LocalIotCore, tmp_path: Path, hook_server: Any
) -> None:
    hook = hook_server({"allowProvisioning": False})
    claim = set_up_fleet_provisioning(iot, "DenyHookTemplate", hook_url=hook.url)
    config_path = cloud_claim_hub(cloud, claim, tmp_path / "hub", "SN-DENIED")
    error = _provision_error(config_path)
    assert error.status_code == 403
    assert hook.requests
    assert hook.requests[0]["parameters"]["SerialNumber"] == "SN-DENIED"
    assert read_config(config_path)["rw"]["iot_provisioning_state"] == "NOT_PROVISIONED"
    assert iot.list_things()["things"] == [] or all(
        t["thingName"] != "hub-SN-DENIED" for t in iot.list_things()["things"]
    )


def test_overriding_hook_changes_the_thing(
    iot: Any, cloud: LocalIotCore, tmp_path: Path, hook_server: Any
) -> None:
    hook = hook_server(
        {"allowProvisioning": True, "parameterOverrides": {"UniversalProductCode": "OVERRIDDEN"}}
    )
    claim = set_up_fleet_provisioning(iot, "OverrideHookTemplate", hook_url=hook.url)
    config_path = cloud_claim_hub(cloud, claim, tmp_path / "hub", "SN-OVERRIDE")
    HubOnboarding(config_path).process_device()
    assert iot.describe_thing(thingName="hub-SN-OVERRIDE")["attributes"] == {"upc": "OVERRIDDEN"}


def test_bogus_token_is_an_identity_error(cloud: LocalIotCore, claim: ClaimSetup) -> None:
    settings = ConnectionSettings(
        endpoint=Endpoint(cloud.endpoint.mqtt_host, cloud.endpoint.mqtt_port),
        root_ca_path=str(cloud.endpoint.root_ca_path),
        keep_alive=60,
    )
    credentials = Credentials(claim.certificate_pem.encode(), claim.private_key_pem.encode())
    with IotProvisioning(settings).connect("SN-BOGUS", credentials) as connection:
        fleet = connection.fleet_provisioning(operation_timeout=10)
        with pytest.raises(IdentityError) as caught:
            fleet.register_thing(claim.template_name, "not-a-real-token", {"SerialNumber": "SN-BOGUS"})
    assert caught.value.status_code == 400
    assert caught.value.error_code == "InvalidCertificateOwnershipToken"
    assert caught.value.error_message


def test_jitr_with_an_activator_like_a_lambda(cloud: LocalIotCore, iot: Any, tmp_path: Path) -> None:
    jitr = write_jitr_cloud_hub(cloud, iot, tmp_path / "hub", "JITR-0001")
    config_path, ca_id, activator = jitr.config, jitr.ca_id, jitr.activator
    activator.start()
    try:
        assert main(["provision", "--config", str(config_path)]) == 0
    finally:
        activator.stop()
    doc = read_config(config_path)
    rw = doc["rw"]
    assert rw["iot_provisioning_state"] == "PROVISIONED"
    assert rw["client_id"] == "hub-JITR-0001", "JITR's client id is the DHA certificate's common name"
    assert rw["iot_permanent_cert_path"] == doc["ro"]["iot_dha_cert_path"]
    assert rw["iot_permanent_pk_path"] == doc["ro"]["iot_dha_pk_path"]
    cert_id = pem_certificate_id(Path(doc["ro"]["iot_dha_cert_path"]).read_bytes())
    assert activator.activated == [cert_id]
    assert activator.events
    assert activator.events[0]["caCertificateId"] == ca_id
    described = iot.describe_certificate(certificateId=cert_id)["certificateDescription"]
    assert described["status"] == "ACTIVE"
    assert described["caCertificateId"] == ca_id


def test_reset_then_onboard_again(iot: Any, make_cloud_hub: CloudHubFactory) -> None:
    config_path = make_cloud_hub()
    assert main(["provision", "--config", str(config_path)]) == 0
    provisioned = read_config(config_path)
    old_cert = Path(provisioned["rw"]["iot_permanent_cert_path"])
    old_key = Path(provisioned["rw"]["iot_permanent_pk_path"])
    claim_key = Path(provisioned["ro"]["iot_claim_pk_path"])
    old_id = pem_certificate_id(old_cert.read_bytes())

    assert main(["reset", "--config", str(config_path)]) != 0, "reset without --yes must refuse"
    assert read_config(config_path) == provisioned
    assert main(["reset", "--config", str(config_path), "--yes"]) == 0
    after = read_config(config_path)
    assert after["ro"] == provisioned["ro"]
    assert after["rw"]["iot_provisioning_state"] == "NOT_PROVISIONED"
    assert set(after["rw"]) <= {"iot_provisioning_state", "metadata"}
    assert not old_cert.exists()
    assert not old_key.exists()
    assert claim_key.exists(), "reset never deletes the factory's claim credentials"

    # The old certificate is still ACTIVE in the cloud (reset does not touch it): the recipe's takeover
    # guard refuses the serial until the maker deactivates it, as it would refuse another hub.
    assert main(["provision", "--config", str(config_path)]) == IdentityError.exit_code
    iot.update_certificate(certificateId=old_id, newStatus="INACTIVE")
    assert main(["provision", "--config", str(config_path)]) == 0
    again = read_config(config_path)["rw"]
    assert again["iot_provisioning_state"] == "PROVISIONED"
    new_id = pem_certificate_id(Path(again["iot_permanent_cert_path"]).read_bytes())
    assert new_id != old_id
    # Both certificates are the thing's now (reset does not touch the cloud); ListThingPrincipals' order
    # is not defined, so compare as sets.
    principals = iot.list_thing_principals(thingName=again["client_id"])["principals"]
    assert {arn.rsplit("/", 1)[1] for arn in principals} == {old_id, new_id}


def test_credentials_are_private_whatever_the_umask(make_cloud_hub: CloudHubFactory) -> None:
    config_path = make_cloud_hub()
    old = os.umask(0)
    try:
        HubOnboarding(config_path).process_device()
    finally:
        os.umask(old)
    rw = read_config(config_path)["rw"]
    key = Path(rw["iot_permanent_pk_path"])
    assert key.stat().st_mode & 0o077 == 0
    assert key.parent.stat().st_mode & 0o077 == 0
    assert config_path.stat().st_mode & 0o777 == (config_path.stat().st_mode & 0o777), "config mode kept"


def test_no_secret_reaches_the_logs(
    make_cloud_hub: CloudHubFactory,
    claim: ClaimSetup,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config_path = make_cloud_hub(certificate_method="CreateKeysAndCertificate")
    with caplog.at_level(logging.DEBUG):
        assert main(["provision", "--config", str(config_path), "-vv"]) == 0
    out = capsys.readouterr()
    rw = read_config(config_path)["rw"]
    secrets = [
        _key_body(claim.private_key_pem),
        _key_body(Path(rw["iot_permanent_pk_path"]).read_text()),
    ]
    text = caplog.text + out.out + out.err
    assert "Onboard" in text or "onboard" in text or rw["client_id"] in text, "the logs were captured"
    for secret in secrets:
        assert secret not in text


def _key_body(pem: str) -> str:
    """A distinctive line from the middle of a PEM key: enough to find it in any log."""
    lines = [line for line in pem.strip().splitlines() if not line.startswith("-----")]
    return lines[len(lines) // 2]


def test_jitr_activator_activates_once_for_two_events(cloud: LocalIotCore, iot: Any, tmp_path: Path) -> None:
    """A hub that retries while its certificate is still PENDING_ACTIVATION makes a second registration
    event; two workers handling both at once activate (and attach) once."""
    jitr = write_jitr_cloud_hub(cloud, iot, tmp_path / "hub", "JITR-TWICE")
    # As the gateway does at the DHA certificate's first connect (its own tests show that part).
    cloud.registry.add_certificate(
        jitr.dha_certificate_pem, CertificateStatus.PENDING_ACTIVATION, ca_certificate_id=jitr.ca_id
    )
    cert_id = pem_certificate_id(jitr.dha_certificate_pem.encode())
    described = iot.describe_certificate(certificateId=cert_id)["certificateDescription"]
    assert described["status"] == "PENDING_ACTIVATION"
    event = {
        "certificateId": cert_id,
        "caCertificateId": jitr.ca_id,
        "certificateStatus": "PENDING_ACTIVATION",
    }
    start = threading.Barrier(2)

    def handle() -> None:
        start.wait(timeout=10)
        jitr.activator.handle_event(event)

    workers = [threading.Thread(target=handle) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    assert jitr.activator.activated == [cert_id]
    assert iot.describe_certificate(certificateId=cert_id)["certificateDescription"]["status"] == "ACTIVE"
    assert iot.list_thing_principals(thingName="hub-JITR-TWICE")["principals"] == [
        described["certificateArn"]
    ]
