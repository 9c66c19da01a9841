"""CertHandler: modes from the first byte, "no wider than" checks, mismatches, symlinks, validity."""

from __future__ import annotations

import importlib.metadata
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hub_onboarding import _files, certs
from hub_onboarding.certs import CertHandler, CertType
from hub_onboarding.errors import ConfigError, CredentialError
from tests._support.certificates import Pair, make_pair, write_private


@pytest.fixture(params=[0o000, 0o022, 0o077], ids=["umask000", "umask022", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def pair_files(tmp_path: Path, pair: Pair, key_mode: int = 0o600) -> tuple[str, str]:
    cert = tmp_path / "c.pem"
    cert.write_bytes(pair.cert_pem)
    key = write_private(tmp_path / "k.pem", pair.key_pem, key_mode)
    return str(cert), str(key)


def test_write_permanent_pair_modes_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    pair = make_pair()
    folder = tmp_path / "certs" / "nested"
    CertHandler().write_permanent_cert_and_private_key(
        pair.cert_pem, pair.key_pem, folder / "cert.pem", folder / "key.pem"
    )
    assert mode(folder) == 0o700
    assert mode(folder / "key.pem") == 0o600
    assert mode(folder / "cert.pem") == 0o644
    assert (folder / "key.pem").read_bytes() == pair.key_pem
    assert sorted(p.name for p in folder.iterdir()) == ["cert.pem", "key.pem"]  # no temp files left


@pytest.mark.parametrize("umask", [0o000], indirect=True, ids=["umask000"])
def test_key_is_never_readable_by_others_while_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask: int
) -> None:
    """Watch every fd the writer opens: the key's temp file is 0600 before its first byte (umask 000,
    restored afterwards: a umask left at 000 made later tests' files world-writable)."""
    seen: list[int] = []
    real_fdopen = os.fdopen

    def spy(fd: int, *args: Any, **kwargs: Any) -> Any:
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", spy)
    pair = make_pair()
    CertHandler().write_file(tmp_path / "d" / "key.pem", pair.key_pem, 0o600)
    assert seen
    assert all(m & 0o077 == 0 for m in seen)


def test_existing_wide_folder_is_refused_not_narrowed(tmp_path: Path) -> None:
    # It may be shared (the config's own folder, with iot_permanent_cert_dir "."): narrowing it would lock
    # the other hub processes out.
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o755)
    with pytest.raises(CredentialError, match=r"ro\.iot_permanent_cert_dir") as info:
        CertHandler().write_file(folder / "key.pem", make_pair().key_pem, 0o600)
    assert str(folder) in info.value.message
    assert "chmod 700" in info.value.message
    assert info.value.exit_code == 4
    assert mode(folder) == 0o755
    assert list(folder.iterdir()) == []


def test_existing_private_folder_is_used_as_it_is(tmp_path: Path) -> None:
    folder = tmp_path / "certs"
    folder.mkdir()
    folder.chmod(0o700)
    CertHandler().write_file(folder / "key.pem", make_pair().key_pem, 0o600)
    assert mode(folder) == 0o700
    assert mode(folder / "key.pem") == 0o600


def test_read_good_pair(tmp_path: Path) -> None:
    pair = make_pair("device-1")
    cert, key = pair_files(tmp_path, pair)
    creds = CertHandler().read_cert_and_private_key(CertType.DHA, cert, key)
    assert creds.certificate_pem == pair.cert_pem
    assert len(creds.certificate_id) == 64
    assert "PRIVATE" not in repr(creds)
    assert certs.common_name(certs.load_certificate(pair.cert_pem, "x")) == "device-1"


@pytest.mark.parametrize("key_mode", [0o600, 0o400, 0o700])
def test_key_mode_no_wider_than_0600_is_accepted(tmp_path: Path, key_mode: int) -> None:
    cert, key = pair_files(tmp_path, make_pair(), key_mode)
    CertHandler().read_cert_and_private_key(CertType.DHA, cert, key)


@pytest.mark.parametrize("key_mode", [0o640, 0o604, 0o644, 0o660, 0o666])
def test_key_readable_by_others_is_refused(tmp_path: Path, key_mode: int) -> None:
    cert, key = pair_files(tmp_path, make_pair(), key_mode)
    with pytest.raises(CredentialError, match="chmod 600") as info:
        CertHandler().read_cert_and_private_key(CertType.CLAIM, cert, key)
    assert info.value.exit_code == 4


def test_key_and_cert_that_do_not_match(tmp_path: Path) -> None:
    a, b = make_pair(), make_pair()
    cert = tmp_path / "a.pem"
    cert.write_bytes(a.cert_pem)
    key = write_private(tmp_path / "b.key", b.key_pem)
    with pytest.raises(CredentialError, match="does not belong"):
        CertHandler().read_cert_and_private_key(CertType.CLAIM, str(cert), str(key))


def test_symlinked_key_is_refused(tmp_path: Path) -> None:
    cert, key = pair_files(tmp_path, make_pair())
    link = tmp_path / "link.key"
    link.symlink_to(key)
    with pytest.raises(CredentialError, match="symbolic link"):
        CertHandler().read_cert_and_private_key(CertType.CLAIM, cert, str(link))


def test_encrypted_key_is_refused(tmp_path: Path) -> None:
    cert, key = pair_files(tmp_path, make_pair(password=b"secret"))
    with pytest.raises(CredentialError, match="encrypted"):
        CertHandler().read_cert_and_private_key(CertType.CLAIM, cert, key)


def test_expired_claim_certificate(tmp_path: Path) -> None:
    cert, key = pair_files(tmp_path, make_pair(starts_in_days=-10, days_valid=2))
    with pytest.raises(CredentialError, match="expired"):
        CertHandler().read_cert_and_private_key(CertType.CLAIM, cert, key)


def test_not_yet_valid_claim_certificate(tmp_path: Path) -> None:
    cert, key = pair_files(tmp_path, make_pair(starts_in_days=5))
    with pytest.raises(CredentialError, match="not valid yet"):
        CertHandler().read_cert_and_private_key(CertType.CLAIM, cert, key)


def test_expired_dha_is_not_refused_by_the_hub(tmp_path: Path) -> None:
    # Only the claim certificate's dates are checked locally; for others the cloud decides.
    cert, key = pair_files(tmp_path, make_pair(starts_in_days=-10, days_valid=2))
    CertHandler().read_cert_and_private_key(CertType.DHA, cert, key)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "does not exist"),
        ("folder", "is a folder"),
        ("garbage", "not a PEM"),
        ("huge", "too large"),
        ("fifo", "not a regular file"),
    ],
)
def test_unusable_files(tmp_path: Path, setup: str, message: str) -> None:
    pair = make_pair()
    cert = tmp_path / "c.pem"
    cert.write_bytes(pair.cert_pem)
    key = tmp_path / "k.pem"
    if setup == "folder":
        key.mkdir(mode=0o700)
    elif setup == "garbage":
        write_private(key, b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    elif setup == "huge":
        write_private(key, b"x" * 100_000)
    elif setup == "fifo":
        os.mkfifo(key, 0o600)
    with pytest.raises(CredentialError, match=message):
        CertHandler().read_cert_and_private_key(CertType.CLAIM, str(cert), str(key))


def test_garbage_certificate(tmp_path: Path) -> None:
    pair = make_pair()
    cert = tmp_path / "c.pem"
    cert.write_text("hello")
    key = write_private(tmp_path / "k.pem", pair.key_pem)
    with pytest.raises(CredentialError, match=r"not a PEM X\.509"):
        CertHandler().read_cert_and_private_key(CertType.CLAIM, str(cert), str(key))


class FakeSecureStore:
    pair = make_pair("secure-claim")

    def read_credentials(self, cert_type: CertType, cert_ref: str, key_ref: str) -> tuple[bytes, bytes]:
        return self.pair.cert_pem, self.pair.key_pem


class FakeEntryPoint:
    def __init__(self, name: str, obj: object) -> None:
        self.name = name
        self._obj = obj

    def load(self) -> object:
        return self._obj


def test_secure_storage_selects_the_installed_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    eps = [FakeEntryPoint("file", certs.FileCredentialStore), FakeEntryPoint("tpm", FakeSecureStore)]
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: eps)
    creds = CertHandler().read_cert_and_private_key(CertType.CLAIM, "SECURE_STORAGE", "SECURE_STORAGE")
    assert creds.certificate_pem == FakeSecureStore.pair.cert_pem


def test_secure_storage_without_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "importlib.metadata.entry_points", lambda group: [FakeEntryPoint("file", certs.FileCredentialStore)]
    )
    with pytest.raises(ConfigError, match="secure_storage_handler") as info:
        CertHandler().read_cert_and_private_key(CertType.CLAIM, "SECURE_STORAGE", "SECURE_STORAGE")
    assert info.value.key == "ro.secure_storage_handler"
    with pytest.raises(ConfigError, match="no handler named 'hsm'"):
        CertHandler("hsm").read_cert_and_private_key(CertType.CLAIM, "SECURE_STORAGE", "SECURE_STORAGE")


def test_the_file_store_is_registered_as_an_entry_point() -> None:
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=certs.ENTRY_POINT_GROUP)}
    assert names.get("file") == "hub_onboarding.certs:FileCredentialStore"
    assert isinstance(certs.load_store("file"), certs.FileCredentialStore)


def test_generate_key_and_csr() -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    key_pem, csr_pem = certs.generate_key_and_csr("SN-1")
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    public = csr.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    assert b"PRIVATE KEY" in key_pem


def test_delete_only_existing(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("x")
    assert _files.delete_files([tmp_path / "a", tmp_path / "b"]) == [tmp_path / "a"]


@pytest.mark.parametrize(
    ("breakage", "part"),
    [
        ("key mode", "private key"),
        ("key missing", "private key"),
        ("key encrypted", "private key"),
        ("certificate missing", "certificate"),
        ("certificate garbage", "certificate"),
        ("pair mismatched", None),
    ],
)
def test_a_credential_error_says_which_file_of_the_pair_is_at_fault(
    tmp_path: Path, breakage: str, part: str | None
) -> None:
    """So the caller can name that file's own config setting (iot_claim_pk_path for the key)."""
    pair = make_pair("claim")
    cert, key = pair_files(tmp_path, pair)
    if breakage == "key mode":
        os.chmod(key, 0o644)
    elif breakage == "key missing":
        os.unlink(key)
    elif breakage == "key encrypted":
        write_private(Path(key), make_pair("claim", password=b"pass").key_pem)
    elif breakage == "certificate missing":
        os.unlink(cert)
    elif breakage == "certificate garbage":
        Path(cert).write_bytes(b"garbage")
    else:
        write_private(Path(key), make_pair("other").key_pem)
    with pytest.raises(CredentialError) as info:
        CertHandler().read_cert_and_private_key(CertType.CLAIM, cert, key)
    assert info.value.part == part
