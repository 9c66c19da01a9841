"""What a factory line puts on a hub before it first powers on: credentials and `iotmi_config.json`.

Used by the demo, the fleet simulator and the tests; a hub maker's own line does the same with its
own paths. Credentials go in a 0700 folder, keys 0600 from their first byte.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def _write_credentials(
    hub_dir: Path, name: str, certificate_pem: str, private_key_pem: str
) -> tuple[Path, Path]:
    """`<hub>/<name>/<name>.pem.crt` and `.pem.key`: the folder 0700, the key 0600 from its first byte."""
    folder = hub_dir / name
    folder.mkdir(parents=True, mode=0o700)
    os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask; be sure
    cert_path, key_path = folder / f"{name}.pem.crt", folder / f"{name}.pem.key"
    cert_path.write_text(certificate_pem, encoding="utf-8")
    _write_private(key_path, private_key_pem)
    return cert_path, key_path


def _write_config(hub_dir: Path, ro: dict[str, Any], extra_ro: dict[str, Any] | None) -> Path:
    config_path = hub_dir / "iotmi_config.json"
    config = {"ro": {**ro, **(extra_ro or {})}, "rw": {"iot_provisioning_state": "NOT_PROVISIONED"}}
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return config_path


def write_claim_hub(
    hub_dir: Path,
    *,
    endpoint_url: str,
    root_ca_path: Path,
    claim_certificate_pem: str,
    claim_private_key_pem: str,
    template_name: str,
    serial: str,
    upc: str = "012345678905",
    certificate_method: str = "CreateCertificateFromCsr",
    extra_ro: dict[str, Any] | None = None,
) -> Path:
    """A hub set up for fleet provisioning by claim; returns the path of its config."""
    cert_path, key_path = _write_credentials(hub_dir, "claim", claim_certificate_pem, claim_private_key_pem)
    ro: dict[str, Any] = {
        "iot_provisioning_method": "FLEET_PROVISIONING",
        "iot_claim_cert_path": str(cert_path),
        "iot_claim_pk_path": str(key_path),
        "fp_template_name": template_name,
        "endpoint_url": endpoint_url,
        "iot_root_ca_path": str(root_ca_path),
        "fp_certificate_method": certificate_method,
        "SN": serial,
        "UPC": upc,
    }
    return _write_config(hub_dir, ro, extra_ro)


def write_jitr_hub(
    hub_dir: Path,
    *,
    endpoint_url: str,
    root_ca_path: Path,
    device_certificate_pem: str,
    device_private_key_pem: str,
    serial: str,
    upc: str = "012345678905",
    extra_ro: dict[str, Any] | None = None,
) -> Path:
    """A hub with a factory-installed device (DHA) certificate, onboarding by JITR."""
    cert_path, key_path = _write_credentials(hub_dir, "dha", device_certificate_pem, device_private_key_pem)
    ro: dict[str, Any] = {
        "iot_provisioning_method": "JITR",
        "iot_dha_cert_path": str(cert_path),
        "iot_dha_pk_path": str(key_path),
        "endpoint_url": endpoint_url,
        "iot_root_ca_path": str(root_ca_path),
        "SN": serial,
        "UPC": upc,
    }
    return _write_config(hub_dir, ro, extra_ro)
