"""The floor: fleet provisioning written by hand with awsiotsdk, as a user would after reading AWS's sample.

No persistence, no checks, no resume: connect with the claim certificate, one certificate request and
RegisterThing through IotIdentityClientV2, optionally the reconnect with the new certificate, disconnect.
Run as a script to measure a process (`python bench/raw_sdk.py CONFIG [--csr] [--verify]`), or call
`provision()` in a loop. `connect()` and `stop()` are the bare awscrt connection the other benchmarks
(JITR's floor, delayed ACKs) time as well.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from awscrt import mqtt5, mqtt_request_response
from awsiot import iotidentity, mqtt5_client_builder

TIMEOUT = 30.0


def connect(
    host: str, port: int, cert: bytes, key: bytes, ca: bytes, client_id: str
) -> tuple[Any, threading.Event]:
    """A started mqtt5 client connected with mutual TLS, and the event its stop sets; ConnectionError."""
    connected: Future[None] = Future()
    stopped = threading.Event()

    def succeeded(_data: Any) -> None:
        if not connected.done():
            connected.set_result(None)

    def failed(data: Any) -> None:
        if not connected.done():
            connected.set_exception(ConnectionError(str(data.exception)))

    client = mqtt5_client_builder.mtls_from_bytes(
        endpoint=host,
        port=port,
        cert_bytes=cert,
        pri_key_bytes=key,
        ca_bytes=ca,
        client_id=client_id,
        clean_session=True,
        on_lifecycle_connection_success=succeeded,
        on_lifecycle_connection_failure=failed,
        on_lifecycle_stopped=lambda _d: stopped.set(),
    )
    client.start()
    try:
        connected.result(TIMEOUT)
    except Exception:
        client.stop()
        stopped.wait(TIMEOUT)
        raise
    return client, stopped


def stop(client: Any, stopped: threading.Event) -> None:
    """Disconnect and wait for the client to stop."""
    client.stop(mqtt5.DisconnectPacket())
    stopped.wait(TIMEOUT)


def provision(config_path: Path, *, csr: bool, verify: bool) -> dict[str, Any]:
    ro = json.loads(config_path.read_text())["ro"]
    host, _, port = ro["endpoint_url"].partition(":")
    ca = Path(ro["iot_root_ca_path"]).read_bytes()
    claim_cert = Path(ro["iot_claim_cert_path"]).read_bytes()
    claim_key = Path(ro["iot_claim_pk_path"]).read_bytes()
    client, stopped = connect(host, int(port or 8883), claim_cert, claim_key, ca, ro["SN"])
    try:
        identity = iotidentity.IotIdentityClientV2(
            client,
            mqtt_request_response.ClientOptions(
                max_request_response_subscriptions=2,
                max_streaming_subscriptions=0,
                operation_timeout_in_seconds=int(TIMEOUT),
            ),
        )
        if csr:
            from cryptography import x509
            from cryptography.hazmat.primitives import hashes, serialization
            from cryptography.hazmat.primitives.asymmetric import ec
            from cryptography.x509.oid import NameOID

            key = ec.generate_private_key(ec.SECP256R1())
            request = (
                x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ro["SN"])]))
                .sign(key, hashes.SHA256())
            )
            created = identity.create_certificate_from_csr(
                iotidentity.CreateCertificateFromCsrRequest(
                    certificate_signing_request=request.public_bytes(serialization.Encoding.PEM).decode()
                )
            ).result(TIMEOUT)
            key_pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        else:
            created = identity.create_keys_and_certificate(
                iotidentity.CreateKeysAndCertificateRequest()
            ).result(TIMEOUT)
            key_pem = created.private_key.encode()
        registered = identity.register_thing(
            iotidentity.RegisterThingRequest(
                template_name=ro["fp_template_name"],
                certificate_ownership_token=created.certificate_ownership_token,
                parameters={"SerialNumber": ro["SN"], "UniversalProductCode": ro["UPC"]},
            )
        ).result(TIMEOUT)
    finally:
        stop(client, stopped)
    if verify:
        client_id = registered.device_configuration.get("ClientId", registered.thing_name)
        client, stopped = connect(
            host, int(port or 8883), created.certificate_pem.encode(), key_pem, ca, client_id
        )
        stop(client, stopped)
    return {"thingName": registered.thing_name, "certificateId": created.certificate_id}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", type=Path)
    parser.add_argument("--csr", action="store_true")
    parser.add_argument("--verify", action="store_true")
    args = parser.parse_args()
    print(json.dumps(provision(args.config, csr=args.csr, verify=args.verify)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
