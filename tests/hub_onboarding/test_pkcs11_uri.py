"""RFC 7512 URIs in key and certificate settings: a PIN in any spelling is refused and never repeated,
only the attributes onboarding reads are accepted (each once), and `type`/`id` must fit the object."""

from __future__ import annotations

import hashlib
import json
import logging
import urllib.parse
from pathlib import Path

import pytest

from hub_onboarding.certs import CertType
from hub_onboarding.cli import main
from hub_onboarding.errors import CredentialError
from hub_onboarding.pkcs11 import Pkcs11CredentialStore, TokenUri, cert_handler
from hub_onboarding.tools.softhsm import SoftHsmToken
from tests._support.hubs import HubFactory

PIN = "4321"

# Every spelling RFC 7512 makes the same attribute: names are case-insensitive (RFC 5234 literals) and
# percent-decoded; in the path (';') or the query ('?', '&').
PIN_URIS = [
    f"pkcs11:token=hub;object=claim-key;type=private;pin-value={PIN}",
    f"pkcs11:token=hub;object=claim-key;type=private;PIN-VALUE={PIN}",
    f"pkcs11:token=hub;object=claim-key;type=private;pin%2Dvalue={PIN}",
    f"pkcs11:token=hub;object=claim-key;type=private;Pin%2dValue={PIN}",
    f"pkcs11:token=hub;object=claim-key;type=private?pin-value={PIN}",
    f"pkcs11:token=hub;object=claim-key?module-name=x&PIN-Source=file:/{PIN}",
    f"pkcs11:token=other;object=claim-key;type=private;PIN-VALUE={PIN}",  # the QA repro: other token
    f"pkcs11:PIN-VALUE={PIN};object=claim-key;object=claim-key;x-foo=1",  # the PIN outranks other faults
]


@pytest.mark.parametrize("uri", PIN_URIS)
def test_a_pin_in_any_spelling_is_refused_without_repeating_it(uri: str) -> None:
    with pytest.raises(CredentialError) as info:
        TokenUri.parse(uri, part="private key")
    message = info.value.message
    assert "is not accepted; put the user PIN in the file named by ro.pkcs11_pin_path" in message
    assert PIN not in message
    assert "pkcs11:" not in message, "the URI itself is never repeated"
    assert info.value.part == "private key"


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("pkcs11:object=k;module-path=/tmp/evil.so", "module-path is not accepted; the library is set by "),
        ("pkcs11:object=k?module-name=evil", "module-name is not accepted; the library is set by "),
        ("pkcs11:object=k;x-foo=bar", "x-foo is not an attribute onboarding reads"),
        ("pkcs11:object=k;library-manufacturer=bar", "library-manufacturer is not an attribute onboarding"),
        ("pkcs11:object=k;OBJECT=k2", "object is given twice"),
        ("pkcs11:object=k;type=private;typ%65=cert", "type is given twice"),
        ("pkcs11:object=k?token=hub", "token belongs in the path, before any '?'"),
        ("pkcs11:object=k;type", "type has no value; write type=VALUE"),
        ("pkcs11:object=k;type=secret-key", "type=secret-key is not one of private, cert, public"),
        ("PKCS11:token=hub", "no object=LABEL"),
    ],
)
def test_attributes_onboarding_does_not_read_are_refused_by_name(uri: str, words: str) -> None:
    with pytest.raises(CredentialError, match=words) as info:
        TokenUri.parse(uri, part="certificate")
    assert info.value.part == "certificate"
    for value in ("/tmp/evil.so", "evil", "bar", "k2"):
        assert value not in info.value.message


def test_an_unknown_name_that_may_be_a_typed_pin_is_not_repeated() -> None:
    with pytest.raises(CredentialError, match="attribute 2 is not an attribute onboarding reads") as info:
        TokenUri.parse(f"pkcs11:object=k;{PIN}")
    assert PIN not in info.value.message


def test_names_and_values_are_percent_decoded() -> None:
    uri = TokenUri.parse("pkcs11:T%6Fken=my%20hub;Object=claim-key;TYPE=private;id=%01%ff")
    assert uri == TokenUri(label="claim-key", type="private", token="my hub", id=b"\x01\xff")


# ------------------------------------------------------------------------ against a SoftHSM2 token


def _claim_in_token(softhsm: SoftHsmToken, make_hub: HubFactory, key_ref: str, **ro: object) -> Path:
    """A hub whose claim key is `claim-key` in the token and whose iot_claim_pk_path is `key_ref`."""
    hub = make_hub(
        ro={
            "pkcs11_module_path": softhsm.module_path,
            "pkcs11_token_label": softhsm.label,
            "pkcs11_pin_path": str(softhsm.pin_path),
            "iot_claim_pk_path": key_ref,
            # A URI wrongly accepted fails fast (exit 11) instead of retrying an unreachable endpoint.
            "endpoint_url": "127.0.0.1:1",
            "mqtt_retry_timeout_seconds": 1,
            **ro,
        }
    )
    Pkcs11CredentialStore(softhsm.config()).import_private_key("claim-key", hub.claim.key_pem)
    return hub.config


@pytest.mark.parametrize(
    "key_ref",
    # ... and with the scheme in capitals (RFC 3986: schemes are case-insensitive), once read as a path
    # and echoed, PIN and all, in "does not exist".
    [
        *PIN_URIS[:4],
        f"PKCS11:token=hub;object=claim-key;type=private;PIN-VALUE={PIN}",
        f" pkcs11:token=hub;object=claim-key;type=private;pin-value={PIN}",  # once read as a path
    ],
)
def test_provision_json_never_shows_the_pin(
    softhsm: SoftHsmToken,
    make_hub: HubFactory,
    key_ref: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The QA repro: with token=hub, PIN-VALUE and pin%2Dvalue were accepted and the hub provisioned."""
    config = _claim_in_token(softhsm, make_hub, key_ref)
    with caplog.at_level(logging.DEBUG):
        assert main(["provision", "--config", str(config), "--json"]) == 4
    captured = capsys.readouterr()
    error = json.loads(captured.out)["error"]
    assert error["key"] == "ro.iot_claim_pk_path"
    assert "is not accepted; put the user PIN in the file named by ro.pkcs11_pin_path" in error["message"]
    for text in (captured.out, captured.err, caplog.text, json.dumps(error)):
        assert PIN not in text


@pytest.mark.parametrize(
    ("key_ref", "words"),
    [
        ("pkcs11:token=hub;object=claim-key;type=secret-key", "type=secret-key is not one of"),
        ("pkcs11:token=hub;object=claim-key;type=cert", "type=cert but this setting names a private key"),
        ("pkcs11:object=claim-key;object=hub-onboarding-SN-0001", "object is given twice"),
        ("pkcs11:object=claim-key;module-path=/tmp/evil.so", "module-path is not accepted"),
        ("pkcs11:token=other;object=claim-key", "token='other' but ro.pkcs11_token_label is 'hub'"),
        ("pkcs11:object=claim-key;id=%00%01", "has another id than the URI's id="),
    ],
)
def test_a_bad_key_uri_names_the_key_setting(
    softhsm: SoftHsmToken,
    make_hub: HubFactory,
    key_ref: str,
    words: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = _claim_in_token(softhsm, make_hub, key_ref)
    assert main(["provision", "--config", str(config), "--json"]) == 4
    error = json.loads(capsys.readouterr().out)["error"]
    assert words in error["message"]
    assert error["key"] == "ro.iot_claim_pk_path", "the key's own setting, not ro.iot_claim_cert_path"
    assert "pkcs11:" not in error["message"], "the URI itself is never repeated"


def test_a_key_type_on_a_certificate_uri_names_the_certificate_setting(
    softhsm: SoftHsmToken, make_hub: HubFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _claim_in_token(
        softhsm,
        make_hub,
        "pkcs11:object=claim-key;type=private",
        iot_claim_cert_path="pkcs11:object=claim-cert;type=private",
    )
    assert main(["provision", "--config", str(config), "--json"]) == 4
    error = json.loads(capsys.readouterr().out)["error"]
    assert "type=private but this setting names a certificate; write type=cert" in error["message"]
    assert error["key"] == "ro.iot_claim_cert_path"


def test_matching_type_and_id_are_accepted(softhsm: SoftHsmToken, make_hub: HubFactory) -> None:
    hub_config = _claim_in_token(softhsm, make_hub, "pkcs11:object=claim-key")
    cert = hub_config.parent / "claim.crt"
    store = Pkcs11CredentialStore(softhsm.config())
    store.store_certificate("claim-cert", cert.read_bytes())
    key_id = urllib.parse.quote_from_bytes(hashlib.sha256(b"claim-key").digest()[:16])  # as imported
    creds = cert_handler(softhsm.config()).read_cert_and_private_key(
        CertType.CLAIM,
        "pkcs11:token=hub;object=claim-cert;TYPE=cert",
        f"pkcs11:token=hub;object=claim-key;type=private;ID={key_id}",
    )
    assert creds.token_key is not None
    assert creds.token_key.label == "claim-key"
    with pytest.raises(CredentialError, match="certificate object 'claim-cert' has another id") as info:
        cert_handler(softhsm.config()).read_cert_and_private_key(
            CertType.CLAIM, "pkcs11:object=claim-cert;id=%01", "pkcs11:object=claim-key"
        )
    assert info.value.part == "certificate"
