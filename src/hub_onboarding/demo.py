"""`hub-onboard demo`: the whole story on one machine, with no AWS account.

Starts iot-core-local in a temporary folder, does what a hub maker does once in the cloud (template,
policies, claim certificate) through the boto3 control plane, writes the config a factory would put on
a hub, and onboards a simulated hub through the real MQTT path.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


def write_demo_hub(hub_dir: Path, endpoint_url: str, root_ca: Path, claim: Any, serial: str) -> Path:
    """Lay out a factory-fresh hub: claim credentials (0600 in a 0700 folder) and its config."""
    creds = hub_dir / "claim"
    creds.mkdir(parents=True, mode=0o700)
    os.chmod(creds, 0o700)
    cert_path = creds / "claim.pem.crt"
    key_path = creds / "claim.pem.key"
    cert_path.write_text(claim.certificate_pem, encoding="utf-8")
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(claim.private_key_pem)
    config_path = hub_dir / "iotmi_config.json"
    config = {
        "ro": {
            "iot_provisioning_method": "FLEET_PROVISIONING",
            "iot_claim_cert_path": str(cert_path),
            "iot_claim_pk_path": str(key_path),
            "fp_template_name": claim.template_name,
            "endpoint_url": endpoint_url,
            "iot_root_ca_path": str(root_ca),
            "fp_certificate_method": "CreateCertificateFromCsr",
            "SN": serial,
            "UPC": "012345678905",
        },
        "rw": {"iot_provisioning_state": "NOT_PROVISIONED"},
    }
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return config_path


def run_demo() -> int:
    from iot_core_local.claims import set_up_fleet_provisioning
    from iot_core_local.server import LocalIotCore

    from .onboarding import HubOnboarding

    with tempfile.TemporaryDirectory(prefix="hub-onboard-demo-") as tmp:
        root = Path(tmp)
        _step("starting iot-core-local (gateway, Mosquitto, control plane)")
        with LocalIotCore(root / "cloud") as core:
            endpoint = core.endpoint
            print(f"    MQTT   mqtts://{endpoint.mqtt_address}")
            print(f"    API    {endpoint.api_url}")
            _step(
                "creating the provisioning template, hub policy, claim policy and claim certificate (boto3)"
            )
            iot = core.client()
            claim = set_up_fleet_provisioning(iot, "DemoHubTemplate")
            print(
                f"    claim certificate {claim.certificate_id[:16]}... attached to {claim.claim_policy_name}"
            )
            _step("writing a factory-fresh hub config")
            config_path = write_demo_hub(
                root / "hub", endpoint.mqtt_address, endpoint.root_ca_path, claim, "SN-DEMO-0001"
            )
            hub = HubOnboarding(config_path)
            print(f"    {config_path}: provisioned = {hub.is_provisioned()}")
            _step("onboarding the hub (claim connect, CreateCertificateFromCsr, RegisterThing, verify)")
            hub.process_device()
            _step("the cloud now has")
            for thing in iot.list_things()["things"]:
                principals = iot.list_thing_principals(thingName=thing["thingName"])["principals"]
                print(f"    thing {thing['thingName']} attributes {thing.get('attributes', {})}")
                for arn in principals:
                    cert_id = arn.rsplit("/", 1)[1]
                    described = iot.describe_certificate(certificateId=cert_id)
                    status = described["certificateDescription"]["status"]
                    print(f"      certificate {cert_id[:16]}... {status}")
            _step("running onboarding again (a reboot): nothing to do")
            again = HubOnboarding(config_path)
            print(f"    provisioned = {again.is_provisioned()}")
            _step(f"resulting {config_path.name}")
            print(config_path.read_text(encoding="utf-8"))
            state = json.loads(config_path.read_text(encoding="utf-8"))["rw"]["iot_provisioning_state"]
    return 0 if state == "PROVISIONED" else 1


if __name__ == "__main__":
    sys.exit(run_demo())
