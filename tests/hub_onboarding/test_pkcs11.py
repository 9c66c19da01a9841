"""The pkcs11 handler against a real SoftHSM2 token (a fresh one per test): URIs, reads, CSRs, errors."""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pkcs11 as p11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hub_onboarding.certs import CertType
from hub_onboarding.config import SECURE_STORAGE, Pkcs11Config, TokenKeyType, parse_config
from hub_onboarding.errors import ConfigError, CredentialError
from hub_onboarding.pkcs11 import (
    Pkcs11CredentialStore,
    TokenUri,
    cert_handler,
    format_uri,
    open_token,
    owned_key_id,
    token_error,
)
from hub_onboarding.tools.softhsm import SoftHsmToken
from tests._support.certificates import make_pair, make_rsa_pair, write_private
from tests._support.hubs import HubFactory

# ------------------------------------------------------------------------------------------- URIs


def test_uri_round_trip_and_percent_encoding() -> None:
    uri = format_uri("my hub", "key;1", "private")
    assert uri == "pkcs11:token=my%20hub;object=key%3B1;type=private"
    assert TokenUri.parse(uri) == TokenUri(label="key;1", type="private", token="my hub")
    assert TokenUri.parse("pkcs11:object=claim-key") == TokenUri(label="claim-key")


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("pkcs11:object=k;pin-value=1234", "pin-value is not accepted"),
        ("pkcs11:object=k?pin-source=file:/x", "pin-source is not accepted"),
        ("pkcs11:token=hub;type=private", "no object=LABEL"),
        ("pkcs11:object=k;type=secret", "type=secret is not one of"),
        ("pkcs11:object", "has no value"),
    ],
)
def test_bad_uris(uri: str, words: str) -> None:
    with pytest.raises(CredentialError, match=words) as info:
        TokenUri.parse(uri)
    assert "1234" not in info.value.message


# ------------------------------------------------------------------------------------------ reading


def _claim_in_token(token: SoftHsmToken, tmp_path: Path) -> tuple[Pkcs11CredentialStore, Path, bytes]:
    pair = make_pair("claim")
    store = Pkcs11CredentialStore(token.config())
    store.import_private_key("claim-key", pair.key_pem)
    cert = tmp_path / "claim.crt"
    cert.write_bytes(pair.cert_pem)
    return store, cert, pair.cert_pem


def test_read_claim_key_from_token_with_pem_certificate(softhsm: SoftHsmToken, tmp_path: Path) -> None:
    _, cert, cert_pem = _claim_in_token(softhsm, tmp_path)
    handler = cert_handler(softhsm.config())
    creds = handler.read_cert_and_private_key(CertType.CLAIM, str(cert), "pkcs11:token=hub;object=claim-key")
    assert creds.certificate_pem == cert_pem
    assert creds.private_key_pem == b""
    assert creds.token_key is not None
    assert creds.token_key.uri == "pkcs11:token=hub;object=claim-key;type=private"
    assert creds.token_key.key_type == "EC"


def test_secure_storage_reads_the_default_objects(softhsm: SoftHsmToken, tmp_path: Path) -> None:
    store, _, cert_pem = _claim_in_token(softhsm, tmp_path)
    assert store.store_certificate("claim-cert", cert_pem) == "pkcs11:token=hub;object=claim-cert;type=cert"
    creds = cert_handler(softhsm.config()).read_cert_and_private_key(
        CertType.CLAIM, SECURE_STORAGE, SECURE_STORAGE
    )
    assert creds.certificate_pem == cert_pem
    assert creds.token_key is not None
    assert creds.token_key.label == "claim-key"


def test_imported_keys_are_sensitive_and_never_extractable(softhsm: SoftHsmToken, tmp_path: Path) -> None:
    store, _, _ = _claim_in_token(softhsm, tmp_path)
    assert store.describe_key("claim-key") == {
        "count": 1,
        "sensitive": [True],
        "extractable": [False],
        "kind": ["EC"],
    }
    with open_token(softhsm.config()) as session:
        key = session.get_key(object_class=p11.ObjectClass.PRIVATE_KEY, label="claim-key")
        with pytest.raises(p11.AttributeSensitive):
            key[p11.Attribute.VALUE]


def test_a_key_that_is_not_the_certificates_is_refused(softhsm: SoftHsmToken, tmp_path: Path) -> None:
    _, _, _ = _claim_in_token(softhsm, tmp_path)
    other = tmp_path / "other.crt"
    other.write_bytes(make_pair("someone else").cert_pem)
    with pytest.raises(CredentialError, match="does not belong to the certificate"):
        cert_handler(softhsm.config()).read_cert_and_private_key(
            CertType.CLAIM, str(other), "pkcs11:object=claim-key"
        )


# ------------------------------------------------------------------------------------- CSR in token


@pytest.mark.parametrize(
    ("key_type", "public_type"),
    [(TokenKeyType.EC_P256, ec.EllipticCurvePublicKey), (TokenKeyType.RSA_2048, rsa.RSAPublicKey)],
)
def test_csr_signed_inside_the_token(
    softhsm: SoftHsmToken, key_type: TokenKeyType, public_type: type
) -> None:
    store = Pkcs11CredentialStore(softhsm.config(key_type))
    key, spki = store.key_for_csr("hub-onboarding-SN1")
    csr = x509.load_pem_x509_csr(store.sign_csr(key, spki, "SN1"))
    assert csr.is_signature_valid
    assert isinstance(csr.public_key(), public_type)
    assert csr.signature_hash_algorithm is not None
    assert csr.signature_hash_algorithm.name == "sha256"
    assert csr.subject.rfc4514_string() == "CN=SN1"
    public = csr.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        assert public.key_size == 2048
    described = store.describe_key("hub-onboarding-SN1")
    assert described["count"] == 1
    assert described["sensitive"] == [True]
    assert described["extractable"] == [False]


def test_a_whole_pair_is_reused_and_a_half_made_one_replaced(softhsm: SoftHsmToken) -> None:
    store = Pkcs11CredentialStore(softhsm.config())
    _, first = store.key_for_csr("hub-onboarding-SN2")
    _, again = store.key_for_csr("hub-onboarding-SN2")
    assert again == first, "a whole pair left by a cut is reused"
    # A cut that left the private half alone (the public half gone): deleted and made anew.
    with open_token(softhsm.config()) as session:
        session.get_key(object_class=p11.ObjectClass.PUBLIC_KEY, label="hub-onboarding-SN2").destroy()
    _, fresh = store.key_for_csr("hub-onboarding-SN2")
    assert fresh != first
    assert store.describe_key("hub-onboarding-SN2")["count"] == 1, "never two keys under one label"
    assert store.delete_label("hub-onboarding-SN2") == 2
    assert store.describe_key("hub-onboarding-SN2")["count"] == 0


def _key_ids(token: SoftHsmToken, label: str) -> set[bytes]:
    with open_token(token.config()) as session:
        return {bytes(o[p11.Attribute.ID]) for o in session.get_objects({p11.Attribute.LABEL: label})}


def test_two_configs_with_one_label_never_touch_each_others_key(softhsm: SoftHsmToken) -> None:
    """The permanent key's CKA_ID names its config: another config (the same SN in the same token) finds
    a key it did not make under the label and is refused (ConfigError on ro.SN) by the check before
    traffic, by the CSR and by the import; its reset deletes nothing; the owner's pair stays, reusable."""
    label = "hub-onboarding-SN4"
    mine = Pkcs11CredentialStore(softhsm.config(), owner="/hub/a/iotmi_config.json")
    other = Pkcs11CredentialStore(softhsm.config(), owner="/hub/b/iotmi_config.json")
    _, first = mine.key_for_csr(label)
    assert _key_ids(softhsm, label) == {owned_key_id(label, "/hub/a/iotmi_config.json")}, "both halves"
    refusals: list[Callable[[], object]] = [
        lambda: other.check_ready(label),
        lambda: other.check_ready(label, need_room=True),
        lambda: other.check_ready(label, need_room=True, service_key=True),
        lambda: other.key_for_csr(label),
        lambda: other.import_private_key(label, make_rsa_pair("service", 2048)[1]),
    ]
    for refused in refusals:
        with pytest.raises(ConfigError, match="another config holds this SN's key in this token") as info:
            refused()
        assert info.value.key == "ro.SN"
        assert "ro.pkcs11_token_label" in info.value.message
        assert "use another ro.SN, or reset that config first" in info.value.message
    assert other.delete_own(label) == (0, 2), "reset of the other config deletes nothing, sees 2 objects"
    assert mine.key_for_csr(label)[1] == first, "the owner's pair is intact and reused"
    assert mine.delete_own(label) == (2, 0)


def test_a_key_another_config_makes_meanwhile_wins_the_label(
    softhsm: SoftHsmToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs racing past their checks: the one that finds the other's key beside its own after making
    it deletes its own and is refused, so a label never keeps two keys, and the other's is untouched."""
    from hub_onboarding import pkcs11 as module

    label = "hub-onboarding-SN5"
    made = module._generate  # noqa: SLF001 (the real maker, wrapped to stage the race)

    def racing(session: object, token: Pkcs11Config, name: str, key_id: bytes) -> object:
        made(session, token, name, owned_key_id(name, "/hub/racer/iotmi_config.json"))  # the other run's
        return made(session, token, name, key_id)

    monkeypatch.setattr(module, "_generate", racing)
    store = Pkcs11CredentialStore(softhsm.config(), owner="/hub/a/iotmi_config.json")
    with pytest.raises(ConfigError, match=r"another config holds this SN's key.*its objects deleted"):
        store.key_for_csr(label)
    assert _key_ids(softhsm, label) == {owned_key_id(label, "/hub/racer/iotmi_config.json")}
    assert store.describe_key(label)["count"] == 1


@pytest.mark.parametrize("service_key", [False, True])
def test_no_room_check_when_the_run_needs_no_new_room(
    softhsm: SoftHsmToken, monkeypatch: pytest.MonkeyPatch, service_key: bool
) -> None:
    """A whole pair of ours (a CSR rerun after a cut at KEY_IN_TOKEN) is reused, and an import deletes
    our key before it stores the new one: neither needs room, so no trial key is made (a full token
    would refuse it). A fresh label, or another key type wanted, does get the trial."""
    from hub_onboarding import pkcs11 as module

    trials: list[str] = []
    monkeypatch.setattr(module, "_prove_room", lambda _s, _t, label, _i, **_k: trials.append(label))
    store = Pkcs11CredentialStore(softhsm.config(), owner="/hub/a/iotmi_config.json")
    store.check_ready("hub-onboarding-SN6", need_room=True, service_key=service_key)
    assert trials == ["hub-onboarding-SN6.room-check"]
    store.key_for_csr("hub-onboarding-SN6")
    store.check_ready("hub-onboarding-SN6", need_room=True, service_key=service_key)
    assert len(trials) == 1, "no trial: the run needs no new room"
    if not service_key:  # a pair of another type is replaced, not reused: that needs room
        rsa_store = Pkcs11CredentialStore(softhsm.config(TokenKeyType.RSA_2048), owner=store.owner)
        rsa_store.check_ready("hub-onboarding-SN6", need_room=True)
        assert len(trials) == 2


def test_certificate_issued_for_the_csr_proves_the_token_key(softhsm: SoftHsmToken, tmp_path: Path) -> None:
    """What onboarding reads back after CSR: a certificate for the token's key passes the signature check."""
    store = Pkcs11CredentialStore(softhsm.config())
    key, spki = store.key_for_csr("hub-onboarding-SN3")
    csr = x509.load_pem_x509_csr(store.sign_csr(key, spki, "SN3"))
    ca = make_pair("CA")
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(x509.load_pem_x509_certificate(ca.cert_pem).subject)
        .public_key(csr.public_key())
        .serial_number(7)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )
    path = tmp_path / "perm.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    creds = cert_handler(softhsm.config()).read_cert_and_private_key(CertType.PERMANENT, str(path), key.uri)
    assert creds.token_key == key


# ------------------------------------------------------------------------------------------- errors


def _read(token: Pkcs11Config, cert: Path, key_ref: str = "pkcs11:object=claim-key") -> None:
    cert_handler(token).read_cert_and_private_key(CertType.CLAIM, str(cert), key_ref)


def test_missing_and_unloadable_module(softhsm: SoftHsmToken, tmp_path: Path) -> None:
    _, cert, _ = _claim_in_token(softhsm, tmp_path)
    base = softhsm.config()
    missing = Pkcs11Config(str(tmp_path / "nope.so"), base.token_label, base.pin_path)
    with pytest.raises(CredentialError, match=r"ro.pkcs11_module_path: .*nope.so does not exist") as info:
        _read(missing, cert)
    assert info.value.key == "ro.pkcs11_module_path"
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not a library")
    with pytest.raises(CredentialError, match="cannot be loaded as a PKCS#11 library") as info:
        _read(Pkcs11Config(str(junk), base.token_label, base.pin_path), cert)
    assert info.value.key == "ro.pkcs11_module_path"


def test_wrong_pin_and_open_pin_file(softhsm: SoftHsmToken, tmp_path: Path) -> None:
    _, cert, _ = _claim_in_token(softhsm, tmp_path)
    wrong = write_private(tmp_path / "wrong.pin", b"00000000\n")
    config = Pkcs11Config(softhsm.module_path, "hub", str(wrong))
    with pytest.raises(CredentialError, match="refused the PIN") as info:
        _read(config, cert)
    assert info.value.key == "ro.pkcs11_pin_path"
    assert "00000000" not in info.value.message
    os.chmod(softhsm.pin_path, 0o644)
    with pytest.raises(CredentialError, match=r"mode 0644.*chmod 600") as info:
        _read(softhsm.config(), cert)
    assert info.value.key == "ro.pkcs11_pin_path"
    assert softhsm.pin_path.read_text().strip() not in info.value.message


def test_a_symlinked_pin_file_is_refused(softhsm: SoftHsmToken, tmp_path: Path) -> None:
    _, cert, _ = _claim_in_token(softhsm, tmp_path)
    link = tmp_path / "planted.pin"
    link.symlink_to(softhsm.pin_path)
    with pytest.raises(CredentialError, match="is a symbolic link") as info:
        _read(Pkcs11Config(softhsm.module_path, "hub", str(link)), cert)
    assert info.value.key == "ro.pkcs11_pin_path"


def test_token_not_present(softhsm: SoftHsmToken, tmp_path: Path) -> None:
    _, cert, _ = _claim_in_token(softhsm, tmp_path)
    config = Pkcs11Config(softhsm.module_path, "elsewhere", str(softhsm.pin_path))
    with pytest.raises(
        CredentialError, match=r"no token labelled 'elsewhere' is present \(tokens present: 'hub'\)"
    ) as info:
        _read(config, cert)
    assert info.value.key == "ro.pkcs11_token_label"


def test_token_not_present_without_softhsm2_conf_says_to_set_it(
    softhsm: SoftHsmToken, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The usual cause with SoftHSM2: a new shell without SOFTHSM2_CONF looks in another token store."""
    _, cert, _ = _claim_in_token(softhsm, tmp_path)
    config = Pkcs11Config(softhsm.module_path, "elsewhere", str(softhsm.pin_path))
    with pytest.raises(CredentialError) as with_conf:
        _read(config, cert)
    assert "SOFTHSM2_CONF" not in with_conf.value.message  # set: the label is what is wrong
    monkeypatch.delenv("SOFTHSM2_CONF")
    with pytest.raises(CredentialError) as without:
        _read(config, cert)
    assert without.value.message.endswith(
        "; SOFTHSM2_CONF is not set: set it to the SoftHSM2 config the token was made with"
    )


def test_unknown_key_object(softhsm: SoftHsmToken, tmp_path: Path) -> None:
    _, cert, _ = _claim_in_token(softhsm, tmp_path)
    with pytest.raises(CredentialError, match="no private key 'nope' in token 'hub'") as info:
        _read(softhsm.config(), cert, "pkcs11:object=nope;type=private")
    assert info.value.part == "private key"


def test_without_python_pkcs11_one_line_names_the_extra(
    softhsm: SoftHsmToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pkcs11", None)  # as on a hub image installed without [pkcs11]
    with pytest.raises(
        CredentialError, match=r"python-pkcs11 is not installed; .*hub-onboarding\[pkcs11\]"
    ) as info:
        Pkcs11CredentialStore(softhsm.config()).check_ready()
    assert info.value.key == "ro.pkcs11_module_path"


def test_token_full_is_named() -> None:
    token = Pkcs11Config("lib.so", "hub", "pin")
    for exc in (p11.DeviceMemory(), p11.HostMemory()):
        error = token_error(exc, token, "store the new key")
        assert error.key == "ro.pkcs11_token_label"
        assert error.message.startswith("ro.pkcs11_token_label: token 'hub' is full and could not store")
    assert "is not present" in token_error(p11.TokenNotPresent(), token, "x").message


def test_key_type_the_endpoint_cannot_use(softhsm: SoftHsmToken, tmp_path: Path) -> None:
    cert_pem, key_pem = make_rsa_pair("weak", 1024)
    path = tmp_path / "weak.crt"
    path.write_bytes(cert_pem)
    Pkcs11CredentialStore(softhsm.config()).import_private_key("claim-key", key_pem)
    with pytest.raises(CredentialError, match="RSA-1024, a type the endpoint cannot use"):
        _read(softhsm.config(), path)


# ------------------------------------------------------------------------------------------- config


_TOKEN_RO = {
    "pkcs11_module_path": "lib/softhsm2.so",
    "pkcs11_token_label": "hub",
    "pkcs11_pin_path": "token/user.pin",
    "iot_claim_pk_path": "pkcs11:token=hub;object=claim-key;type=private",
}


def test_config_reads_the_token_settings(make_hub: HubFactory) -> None:
    hub = make_hub(ro=_TOKEN_RO)
    cfg = parse_config(hub.config)
    assert cfg.pkcs11 == Pkcs11Config(
        str(hub.dir / "lib/softhsm2.so"), "hub", str(hub.dir / "token/user.pin"), TokenKeyType.EC_P256
    ), "paths relative to the config's folder, EC P-256 by default"
    assert cfg.fleet is not None
    assert cfg.fleet.claim_pk_path == _TOKEN_RO["iot_claim_pk_path"], "a URI is not a path"
    assert "iot_claim_pk_path" not in cfg.read_paths
    assert parse_config(make_hub(ro={**_TOKEN_RO, "pkcs11_key_type": "RSA_2048"}).config).pkcs11 is not None


@pytest.mark.parametrize(
    ("change", "drop", "key"),
    [
        ({}, ("pkcs11_pin_path",), "ro.pkcs11_pin_path"),
        ({}, ("pkcs11_module_path",), "ro.pkcs11_module_path"),
        ({"pkcs11_key_type": "EC_P521"}, (), "ro.pkcs11_key_type"),
        ({"pkcs11_token_label": 7}, (), "ro.pkcs11_token_label"),
    ],
)
def test_config_refuses_incomplete_token_settings(
    make_hub: HubFactory, change: dict[str, object], drop: tuple[str, ...], key: str
) -> None:
    ro = {k: v for k, v in {**_TOKEN_RO, **change}.items() if k not in drop}
    with pytest.raises(ConfigError) as info:
        parse_config(make_hub(ro=ro, drop=drop).config)
    assert info.value.key == key


def test_dha_secure_storage_needs_a_token(make_hub: HubFactory) -> None:
    both = {"iot_dha_cert_path": SECURE_STORAGE, "iot_dha_pk_path": SECURE_STORAGE}
    with pytest.raises(ConfigError, match="for DHA credentials when a PKCS#11 token is set"):
        parse_config(make_hub("JITR", ro=both).config)
    token = {k: v for k, v in _TOKEN_RO.items() if k != "iot_claim_pk_path"}
    cfg = parse_config(make_hub("JITR", ro={**both, **token}).config)
    assert cfg.jitr is not None
    assert cfg.jitr.dha_pk_path == SECURE_STORAGE


def test_the_pkcs11_handler_is_declared_as_an_entry_point() -> None:
    """pyproject names the handler in hub_onboarding.secure_storage (read from the file: an editable
    install's metadata is as old as its last install), and the name loads the store."""
    import importlib
    import tomllib

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text())["project"]["entry-points"][
        "hub_onboarding.secure_storage"
    ]
    module, _, name = declared["pkcs11"].partition(":")
    assert getattr(importlib.import_module(module), name) is Pkcs11CredentialStore
    assert "pkcs11" in tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
