"""The hub's own files in real processes against a real iot-core-local: another hub's credentials folder,
records that are not what onboarding writes (a FIFO, a symlink), and files too large to read whole.

Each case reproduces a finding of a QA attack round (a FIFO at a record hung the hub, a second config took
another hub's key, 2 GB files filled its memory): the command must end at once with one line naming the
file and the fix, with its documented exit code, and send nothing to the cloud.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
from pathlib import Path
from typing import Any

import pytest

from tests._support.certificates import certificate_ids
from tests._support.hubs import CloudHubFactory, read_config, snapshot
from tests._support.processes import run_hub

pytestmark = [pytest.mark.e2e, pytest.mark.shared_claim]


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _error(stdout: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(stdout)["error"]
    return result


def test_a_second_config_never_takes_another_hubs_credentials(
    iot: Any, make_cloud_hub: CloudHubFactory
) -> None:
    # The mistake: hub B's config named hub A's credentials folder; B's provision overwrote A's certificate
    # and key (exit 0), B's reset deleted them, and A still said PROVISIONED with a key that was gone.
    a = make_cloud_hub()
    assert run_hub(a, verbosity="").returncode == 0
    certs = a.parent / "certs"
    before = _hashes(certs)
    assert {"certificate.pem.crt", "private.pem.key", "onboarding-files.json"} <= set(before)

    b = make_cloud_hub()
    doc = read_config(b)
    doc["ro"]["iot_permanent_cert_dir"] = str(certs)
    b.write_text(json.dumps(doc))
    certificates = certificate_ids(iot)
    done = run_hub(b, "--json", verbosity="")
    assert done.returncode == 3, done.stderr
    error = _error(done.stdout)
    assert error["key"] == "ro.iot_permanent_cert_dir"
    assert error["message"].startswith(f"ro.iot_permanent_cert_dir {certs} holds another hub's credentials")
    assert str(a) in error["message"]
    assert "Traceback" not in done.stderr
    assert certificate_ids(iot) == certificates, "nothing minted in the cloud"
    assert _hashes(certs) == before

    done = run_hub(b, "--yes", "--json", command="reset", verbosity="")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["deleted"] == []
    assert _hashes(certs) == before

    # Hub A is whole: still PROVISIONED with its own files, and its own reset deletes what it wrote.
    assert read_config(a)["rw"]["iot_provisioning_state"] == "PROVISIONED"
    done = run_hub(a, "--yes", "--json", command="reset", verbosity="")
    assert done.returncode == 0, done.stderr
    assert {Path(p).name for p in json.loads(done.stdout)["deleted"]} == {
        "certificate.pem.crt",
        "private.pem.key",
        "onboarding-files.json",
    }


@pytest.mark.parametrize(
    ("record", "commands"),
    [
        # reset never reads the progress record: it deletes the name, a FIFO's too (tested below).
        ("onboarding-progress.json", ("status", "provision")),
        # reset reads this one to know which files are onboarding's: it stops, having deleted nothing.
        ("onboarding-files.json", ("provision", "reset")),
    ],
)
def test_a_fifo_in_place_of_a_record_is_refused_at_once(
    iot: Any, make_cloud_hub: CloudHubFactory, record: str, commands: tuple[str, ...]
) -> None:
    # The mistake: `mkfifo certs/onboarding-progress.json` hung status, provision and reset forever.
    config = make_cloud_hub()
    certs = config.parent / "certs"
    certs.mkdir(mode=0o700)
    fifo = certs / record
    os.mkfifo(fifo, 0o600)
    certificates = certificate_ids(iot)
    before = snapshot(config.parent)
    for command in commands:
        extra = ("--yes",) if command == "reset" else ()
        # run_hub's timeout bounds a hang: the child is another process, with no event to wait on.
        done = run_hub(config, *extra, "--json", command=command, verbosity="", timeout=60)
        assert done.returncode == 5, (command, done.stderr)
        error = _error(done.stdout)
        assert error["message"].startswith(f"{fifo} ("), command
        assert "is a FIFO (named pipe), not the regular file onboarding writes" in error["message"]
        assert f"remove it (rm -r {fifo}), then run the same command again" in error["message"]
        after = snapshot(config.parent)
        after.pop("iotmi_config.json.lock", None)  # reset takes the lock first; it is never deleted
        assert after == before, command
    assert certificate_ids(iot) == certificates
    if record == "onboarding-progress.json":
        done = run_hub(config, "--yes", "--json", command="reset", verbosity="", timeout=60)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["deleted"] == [str(fifo)]


def test_a_symlink_in_place_of_the_progress_record_is_never_read(make_cloud_hub: CloudHubFactory) -> None:
    # The mistake: status read the file a symlink planted at onboarding-progress.json pointed at.
    config = make_cloud_hub()
    certs = config.parent / "certs"
    certs.mkdir(mode=0o700)
    victim = config.parent / "victim.json"
    victim.write_text('{"version": 1, "step": "VERIFIED"}')
    (certs / "onboarding-progress.json").symlink_to(victim)
    done = run_hub(config, "--json", command="status", verbosity="")
    assert done.returncode == 5, done.stderr
    assert "is a symbolic link, not the regular file onboarding writes" in _error(done.stdout)["message"]


def _sparse(path: Path, size: int) -> None:
    with path.open("wb") as fh:
        fh.truncate(size)


@pytest.mark.parametrize("what", ["root CA", "config", "progress record"])
def test_huge_files_are_refused_without_being_read(make_cloud_hub: CloudHubFactory, what: str) -> None:
    # The mistake: a 2 GB root CA took 2.1 GB of memory (the config 4.2 GB) before it was refused.
    config = make_cloud_hub()
    command, code = "provision", 3
    if what == "root CA":
        big = config.parent / "big.crt"
        _sparse(big, 2 * 1024**3)
        doc = read_config(config)
        doc["ro"]["iot_root_ca_path"] = str(big)
        config.write_text(json.dumps(doc))
        expected = f"ro.iot_root_ca_path: {big} is 2147483648 bytes, more than the 1 MiB limit"
    elif what == "config":
        _sparse(config, 2 * 1024**3)
        expected = f"config file {config} is 2147483648 bytes, more than the 1 MiB limit"
    else:
        certs = config.parent / "certs"
        certs.mkdir(mode=0o700)
        big = certs / "onboarding-progress.json"
        _sparse(big, 2 * 1024**3)
        big.chmod(0o600)
        command, code = "status", 5
        expected = f"{big} (the onboarding progress record) is 2147483648 bytes"
    done = run_hub(config, "--json", command=command, verbosity="")
    assert done.returncode == code, done.stderr
    assert _error(done.stdout)["message"].startswith(expected)
    # ru_maxrss (KiB) of the largest child waited for so far: far below the 2 GB a whole read takes.
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 512 * 1024
