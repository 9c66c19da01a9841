"""A plain Mosquitto with mutual TLS (no gateway in front): what awscrt sees of any MQTT broker."""

from __future__ import annotations

import contextlib
import getpass
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trustme

from hub_onboarding.certs import CertType, Credentials, check_pair
from hub_onboarding.config import Endpoint
from tests._support.network import free_port

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)


@dataclass
class Broker:
    endpoint: Endpoint
    ca_path: Path
    client: Credentials  # a certificate the broker's CA signed (trustme), so Mosquitto accepts it


@contextlib.contextmanager
def tls_mosquitto(d: Path) -> Iterator[Broker]:
    """A Mosquitto requiring client certificates from its own trustme CA, in folder `d`, on a free port."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    server.cert_chain_pems[0].write_to_path(str(d / "server.pem"))
    server.private_key_pem.write_to_path(str(d / "server.key"))
    # the client certificate is signed by the broker's CA, so Mosquitto accepts it
    client = ca.issue_cert("hub-client-1")
    # free_port() only finds a port free now: another worker's outgoing connection may take it before
    # Mosquitto binds. A Mosquitto that ended before it was running is started again on another port.
    for attempt in range(3):
        port = free_port()
        (d / "mosquitto.conf").write_text(
            f"listener {port} 127.0.0.1\n"
            f"cafile {d / 'ca.pem'}\ncertfile {d / 'server.pem'}\nkeyfile {d / 'server.key'}\n"
            "require_certificate true\nallow_anonymous true\npersistence false\n"
            # as root, Mosquitto would switch to user 'mosquitto', who cannot read pytest's 0700 tmp folders
            f"user {getpass.getuser()}\n"
        )
        proc = subprocess.Popen(
            [str(MOSQUITTO), "-c", str(d / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        running, reader = _watch_log(proc)
        started = running.wait(10) and proc.poll() is None
        if started or attempt == 2 or proc.poll() is None:
            break
        reader.join(10)
        assert proc.stderr is not None
        proc.stderr.close()
    try:
        if not started:
            raise RuntimeError(f"mosquitto ({MOSQUITTO}) did not start on port {port}")
        creds = check_pair(
            client.cert_chain_pems[0].bytes(),
            client.private_key_pem.bytes(),
            str(CertType.DHA),
            check_validity=False,
        )
        yield Broker(Endpoint("127.0.0.1", port), d / "ca.pem", creds)
    finally:
        proc.terminate()
        proc.wait(10)
        reader.join(10)
        assert proc.stderr is not None
        proc.stderr.close()


def _watch_log(proc: subprocess.Popen[str]) -> tuple[threading.Event, threading.Thread]:
    """An event set once Mosquitto logs "... running" (its listener is open), or once it has ended.

    Mosquitto logs to stderr: the thread reads it to the end, so the pipe never fills.
    """
    running = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.rstrip().endswith(" running"):
                running.set()
        running.set()  # ended: wake the waiter, who sees the process is gone

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return running, reader
