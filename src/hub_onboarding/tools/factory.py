"""What a factory line puts on a hub before it first powers on: credentials and `iotmi_config.json`.

Used by the demo, the fleet simulator and the tests; a hub maker's own line does the same with its
own paths. Credentials go in a 0700 folder, keys 0600 from their first byte.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hub_onboarding.config import SECURE_STORAGE, Pkcs11Config


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


def _token_credentials(
    token: Pkcs11Config,
    name: str,
    certificate_pem: str,
    private_key_pem: str,
    hub_dir: Path,
    *,
    cert_in_token: bool,
) -> tuple[str, str, dict[str, Any]]:
    """The key (and, when asked, the certificate) into the token under the handler's default labels
    (claim-key/claim-cert, dha-key/dha-cert). Returns the values of the path keys and the token's ro keys.

    Keys are imported sensitive and non-extractable; nothing of the key is written to a file."""
    from hub_onboarding.pkcs11 import DEFAULT_OBJECTS, Pkcs11CredentialStore

    cert_label, key_label = DEFAULT_OBJECTS["claim" if name == "claim" else "DHA"]
    store = Pkcs11CredentialStore(token)
    key_ref = store.import_private_key(key_label, private_key_pem.encode()).uri
    if cert_in_token:
        store.store_certificate(cert_label, certificate_pem.encode())
        cert_ref = SECURE_STORAGE  # the default objects: the handler's own names for them
        key_ref = SECURE_STORAGE
    else:
        folder = hub_dir / name
        folder.mkdir(parents=True, mode=0o700)
        os.chmod(folder, 0o700)
        cert_path = folder / f"{name}.pem.crt"
        cert_path.write_text(certificate_pem, encoding="utf-8")
        cert_ref = str(cert_path)
    ro = {
        "pkcs11_module_path": token.module_path,
        "pkcs11_token_label": token.token_label,
        "pkcs11_pin_path": token.pin_path,
        "pkcs11_key_type": token.key_type.value,
    }
    return cert_ref, key_ref, ro


def _credentials(
    hub_dir: Path,
    name: str,
    certificate_pem: str,
    private_key_pem: str,
    token: Pkcs11Config | None,
    cert_in_token: bool,
) -> tuple[str, str, dict[str, Any]]:
    """The pair as files, or into `token`: the values of the path keys, and the token's ro keys."""
    if token is None:
        cert_path, key_path = _write_credentials(hub_dir, name, certificate_pem, private_key_pem)
        return str(cert_path), str(key_path), {}
    hub_dir.mkdir(parents=True, exist_ok=True)
    return _token_credentials(
        token, name, certificate_pem, private_key_pem, hub_dir, cert_in_token=cert_in_token
    )


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
    token: Pkcs11Config | None = None,
    cert_in_token: bool = False,
) -> Path:
    """A hub set up for fleet provisioning by claim; returns the path of its config.

    `token`: the claim key goes into that PKCS#11 token (and the certificate too with `cert_in_token`,
    then both named SECURE_STORAGE), and the hub keeps its permanent key there as well."""
    cert_ref, key_ref, token_ro = _credentials(
        hub_dir, "claim", claim_certificate_pem, claim_private_key_pem, token, cert_in_token
    )
    ro: dict[str, Any] = {
        "iot_provisioning_method": "FLEET_PROVISIONING",
        "iot_claim_cert_path": cert_ref,
        "iot_claim_pk_path": key_ref,
        "fp_template_name": template_name,
        "endpoint_url": endpoint_url,
        "iot_root_ca_path": str(root_ca_path),
        "fp_certificate_method": certificate_method,
        "SN": serial,
        "UPC": upc,
        **token_ro,
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
    token: Pkcs11Config | None = None,
    cert_in_token: bool = False,
) -> Path:
    """A hub with a factory-installed device (DHA) certificate, onboarding by JITR (`token`: the DHA key
    in that PKCS#11 token, as for write_claim_hub)."""
    cert_ref, key_ref, token_ro = _credentials(
        hub_dir, "dha", device_certificate_pem, device_private_key_pem, token, cert_in_token
    )
    ro: dict[str, Any] = {
        "iot_provisioning_method": "JITR",
        "iot_dha_cert_path": cert_ref,
        "iot_dha_pk_path": key_ref,
        "endpoint_url": endpoint_url,
        "iot_root_ca_path": str(root_ca_path),
        "SN": serial,
        "UPC": upc,
        **token_ro,
    }
    return _write_config(hub_dir, ro, extra_ro)
