"""The control plane's key pair: an AWS access key id and secret, made once per data dir.

`serve` writes it as `DIR/credentials` (0600), in the AWS shared-credentials-file format under the
`default` profile, so `AWS_SHARED_CREDENTIALS_FILE=DIR/credentials` is all the AWS CLI and boto3 need to
sign requests the control plane accepts. The file is kept across restarts (scripts and shells that
exported it keep working); delete it to get a new pair. The secret is never logged nor printed: only
the file's path is named.
"""

from __future__ import annotations

import configparser
import os
import secrets
import stat
import string
from dataclasses import dataclass, field
from pathlib import Path

from .datadir import open_nofollow, write_atomically
from .errors import ServerError

__all__ = ["CREDENTIALS_FILE", "PROFILE", "AccessKey", "load_or_create", "read_access_key"]

CREDENTIALS_FILE = "credentials"
PROFILE = "default"  # what the AWS CLI and boto3 read when AWS_PROFILE is not set

_ALPHABET = string.ascii_uppercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits + "+/"
_MAX_SIZE = 64 * 1024  # a key pair is ~150 bytes; anything this large is not ours


@dataclass(frozen=True)
class AccessKey:
    """An access key id (it may be logged) and its secret (never printed: kept out of repr)."""

    access_key_id: str
    secret_access_key: str = field(repr=False)

    @classmethod
    def generate(cls) -> AccessKey:
        # The shapes AWS uses (AKIA + 16, 40 characters of secret), so tools that check them are content.
        key_id = "AKIA" + "".join(secrets.choice(_ALPHABET) for _ in range(16))
        secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(40))
        return cls(key_id, secret)

    def to_file(self) -> bytes:
        return (
            "# iot-core-local's control plane key pair; use it with "
            "AWS_SHARED_CREDENTIALS_FILE=<this file>\n"
            f"[{PROFILE}]\naws_access_key_id = {self.access_key_id}\n"
            f"aws_secret_access_key = {self.secret_access_key}\n"
        ).encode()


def read_access_key(path: Path) -> AccessKey:
    """The pair in `path`; ServerError naming the file and the fix when it is not one of ours."""
    # One descriptor for the mode and the content: what is checked is what is read.
    with os.fdopen(open_nofollow(path, os.O_RDONLY), "rb") as file:
        if stat.S_IMODE(os.fstat(file.fileno()).st_mode) & 0o077:
            raise ServerError(
                f"{path} can be read by others; run chmod 600 {path} (or delete it for a new pair)"
            )
        content = file.read(_MAX_SIZE + 1)
    if len(content) > _MAX_SIZE:
        raise ServerError(f"{path} is too large for a key pair; delete it for a new pair")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(content.decode())
        section = parser[PROFILE]
        pair = AccessKey(section["aws_access_key_id"].strip(), section["aws_secret_access_key"].strip())
    except (configparser.Error, KeyError, UnicodeDecodeError):
        raise ServerError(
            f"{path} is not a credentials file with a [{PROFILE}] key pair; delete it for a new pair"
        ) from None
    if not pair.access_key_id or not pair.secret_access_key:
        raise ServerError(f"{path} has an empty key pair; delete it for a new pair")
    return pair


def load_or_create(path: Path) -> AccessKey:
    """The data dir's key pair: read from `path`, or made and written there (0600) the first time."""
    try:
        return read_access_key(path)
    except FileNotFoundError:
        pass
    pair = AccessKey.generate()
    write_atomically(path, pair.to_file(), 0o600)
    return pair
