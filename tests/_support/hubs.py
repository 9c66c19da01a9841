"""Hub folders for tests: an offline one with test certificates (unit tests), reading configs, snapshots."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hub_onboarding.tools.factory import write_jitr_hub
from iot_core_local.recipes.claims import hub_policy_document
from iot_core_local.recipes.jitr import DeviceCA, JitrActivator
from iot_core_local.server import LocalIotCore
from tests._support.certificates import Pair, make_pair, write_private

if TYPE_CHECKING:
    from iot_core_local.recipes.claims import ClaimSetup
    from iot_core_local.server import LocalIotCore


@dataclass
class Hub:
    """An offline hub folder: claim and DHA pairs signed by a test CA, and its iotmi_config.json."""

    dir: Path
    config: Path
    claim: Pair
    dha: Pair
    ca: Pair

    def doc(self) -> dict[str, Any]:
        return read_config(self.config)

    def write(self, doc: dict[str, Any]) -> None:
        self.config.write_text(json.dumps(doc))


# make_hub(method="FLEET_PROVISIONING", ro=None, rw=None, drop=(), **top) -> Hub
HubFactory = Callable[..., Hub]
# make_cloud_hub(serial=None, **write_claim_hub options) -> the config path of a hub aimed at iot-core-local
CloudHubFactory = Callable[..., Path]


def write_offline_hub(
    hub_dir: Path,
    method: str = "FLEET_PROVISIONING",
    ro: dict[str, Any] | None = None,
    rw: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    **top: Any,
) -> Hub:
    """A hub folder with claim and DHA credentials and a config; `ro`/`rw`/`top` override, `drop` removes."""
    hub_dir.mkdir(exist_ok=True)
    ca = make_pair("Test Root CA")
    claim = make_pair("claim", issuer=ca)
    dha = make_pair("dha-device-0001", issuer=ca)
    (hub_dir / "ca.pem").write_bytes(ca.cert_pem)
    (hub_dir / "claim.crt").write_bytes(claim.cert_pem)
    write_private(hub_dir / "claim.key", claim.key_pem)
    (hub_dir / "dha.crt").write_bytes(dha.cert_pem)
    write_private(hub_dir / "dha.key", dha.key_pem)
    base: dict[str, Any] = {
        "iot_provisioning_method": method,
        "iot_claim_cert_path": str(hub_dir / "claim.crt"),
        "iot_claim_pk_path": str(hub_dir / "claim.key"),
        "iot_dha_cert_path": str(hub_dir / "dha.crt"),
        "iot_dha_pk_path": str(hub_dir / "dha.key"),
        "fp_template_name": "HubTemplate",
        "endpoint_url": "iot.example.com:8883",
        "iot_root_ca_path": str(hub_dir / "ca.pem"),
        "SN": "SN-0001",
        "UPC": "012345678905",
    }
    base.update(ro or {})
    for key in drop:
        base.pop(key, None)
    doc: dict[str, Any] = {"ro": base, "rw": {"iot_provisioning_state": "NOT_PROVISIONED", **(rw or {})}}
    doc.update(top)
    config = hub_dir / "iotmi_config.json"
    config.write_text(json.dumps(doc, indent=2))
    return Hub(hub_dir, config, claim, dha, ca)


def cloud_claim_hub(
    cloud: LocalIotCore, claim: ClaimSetup, hub_dir: Path, serial: str, **options: Any
) -> Path:
    """A factory-fresh hub in `hub_dir` aimed at `cloud` with `claim`; `options`: write_claim_hub's others."""
    from hub_onboarding.tools.factory import write_claim_hub

    return write_claim_hub(
        hub_dir,
        endpoint_url=cloud.endpoint.mqtt_address,
        root_ca_path=cloud.endpoint.root_ca_path,
        claim_certificate_pem=claim.certificate_pem,
        claim_private_key_pem=claim.private_key_pem,
        template_name=claim.template_name,
        serial=serial,
        **options,
    )


def read_config(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(path.read_text())
    return result


Snapshot = dict[str, tuple[str, int, bytes]]


def snapshot(folder: Path) -> Snapshot:
    """Every entry under `folder`: kind, permission bits, and content (file bytes or link target)."""
    result: Snapshot = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(folder))
        if stat.S_ISLNK(st.st_mode):
            result[rel] = ("link", 0, os.readlink(path).encode())
        elif stat.S_ISDIR(st.st_mode):
            result[rel] = ("dir", stat.S_IMODE(st.st_mode), b"")
        elif stat.S_ISREG(st.st_mode):
            result[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
        else:  # a FIFO or a device: never read it
            result[rel] = ("other", stat.S_IMODE(st.st_mode), b"")
    return result


@dataclass
class JitrCloudHub:
    """A JITR hub aimed at an iot-core-local: its config, its DHA pair, the device CA's id, and the
    activator (a customer's JITR Lambda) the test starts and stops around the onboarding."""

    config: Path
    dha_certificate_pem: str
    dha_private_key_pem: str
    ca_id: str
    activator: JitrActivator


def write_jitr_cloud_hub(
    cloud: LocalIotCore,
    iot: Any,
    folder: Path,
    name: str,
    *,
    activator_client_id: str | None = None,
    **overrides: Any,
) -> JitrCloudHub:
    """A device CA registered for JITR, a hub policy `name`, the activator, and a hub with a DHA certificate
    (CN `hub-<name>`, serial `name`) that the CA issued; `overrides` go to write_jitr_hub."""
    device_ca = DeviceCA()
    ca_id = device_ca.register(iot)
    iot.create_policy(policyName=name, policyDocument=hub_policy_document("us-east-1", "123456789012"))
    options: dict[str, Any] = {} if activator_client_id is None else {"client_id": activator_client_id}
    activator = JitrActivator(
        iot,
        host=cloud.endpoint.mqtt_host,
        port=cloud.endpoint.mqtt_port,
        root_ca_pem=cloud.endpoint.root_ca_path.read_bytes(),
        ca_certificate_id=ca_id,
        device_policy_name=name,
        **options,
    )
    dha = device_ca.issue_device(f"hub-{name}")
    settings: dict[str, Any] = {
        "endpoint_url": cloud.endpoint.mqtt_address,
        "root_ca_path": cloud.endpoint.root_ca_path,
        "device_certificate_pem": dha.certificate_pem,
        "device_private_key_pem": dha.private_key_pem,
        "serial": name,
        "extra_ro": {"mqtt_retry_timeout_seconds": 60},
    }
    settings.update(overrides)
    config = write_jitr_hub(folder, **settings)
    return JitrCloudHub(config, dha.certificate_pem, dha.private_key_pem, ca_id, activator)
