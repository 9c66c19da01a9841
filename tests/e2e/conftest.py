"""End-to-end fixtures: one iot-core-local per module (real TLS, real Mosquitto), hubs in tmp folders."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from hub_onboarding.factory import write_claim_hub
from iot_core_local.recipes.claims import ClaimSetup, set_up_fleet_provisioning
from iot_core_local.server import LocalIotCore

_names = itertools.count()


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalIotCore]:
    with LocalIotCore(tmp_path_factory.mktemp("cloud")) as core:
        yield core


@pytest.fixture
def iot(cloud: LocalIotCore) -> Any:
    return cloud.client()


@pytest.fixture
def claim(iot: Any) -> ClaimSetup:
    return set_up_fleet_provisioning(iot, f"Tmpl{next(_names)}")


HubFactory = Callable[..., Path]


@pytest.fixture
def make_hub(cloud: LocalIotCore, claim: ClaimSetup, tmp_path: Path) -> HubFactory:
    """Write a factory-fresh fleet-provisioning hub; keyword arguments override the defaults."""

    def make(serial: str | None = None, **overrides: Any) -> Path:
        serial = serial or f"SN{next(_names):06d}"
        options: dict[str, Any] = {
            "endpoint_url": cloud.endpoint.mqtt_address,
            "root_ca_path": cloud.endpoint.root_ca_path,
            "claim_certificate_pem": claim.certificate_pem,
            "claim_private_key_pem": claim.private_key_pem,
            "template_name": claim.template_name,
            "serial": serial,
        }
        options.update(overrides)
        return write_claim_hub(tmp_path / serial, **options)

    return make


class _HookHTTPServer(ThreadingHTTPServer):
    # Join handler threads on close, so a slow hook's late answer never lands in a later test's output,
    # and stay quiet when the gateway has already given up on it (a hook past 5 s writes to a closed socket).
    daemon_threads = False
    block_on_close = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class HookServer:
    """A pre-provisioning hook target: answers every POST with `answer`, records what it got."""

    def __init__(self, answer: dict[str, Any] | None, delay: float = 0.0) -> None:
        self.answer = answer
        self.delay = delay
        self.requests: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                hook.requests.append(json.loads(self.rfile.read(length)))
                if hook.delay:
                    threading.Event().wait(hook.delay)
                body = json.dumps(hook.answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = _HookHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook_server() -> Iterator[Callable[..., HookServer]]:
    servers: list[HookServer] = []

    def start(answer: dict[str, Any] | None, delay: float = 0.0) -> HookServer:
        server = HookServer(answer, delay)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def read_config(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(path.read_text())
    return result


# ------------------------------------------------------------------------------------------------------
# Reliability helpers (issue 4): real `hub-onboard` processes, killed or frozen from outside; a TCP proxy;
# an independent MQTT client; snapshots of a hub folder.

# A test-only `sitecustomize` for the child process (never part of the product). When HUBTEST_FREEZE is
# set, the child stops itself with SIGSTOP at one exact point, so the harness can SIGKILL it there:
#   {"kind": "line", "text": ..., "nth": n}     after the n-th stderr write containing `text` (a log line)
#   {"kind": "replace", "path": ..., "nth": n}  right after the n-th os.replace onto `path` (a config write)
#   {"kind": "fsync", "prefix": ..., "nth": n}  right after the n-th fsync of a temp file named prefix*.tmp,
#                                               i.e. in the middle of an atomic write (before its rename)
# HUBTEST_OPENLOG=path records every file the child opens (Python's audit hook), one per line.
_SHIM = r"""
import json, os, signal, sys

def _freeze():
    try:
        sys.stderr.flush()
    except Exception:
        pass
    os.kill(os.getpid(), signal.SIGSTOP)

_spec_text = os.environ.get("HUBTEST_FREEZE")
if _spec_text:
    _spec = json.loads(_spec_text)
    _count = [0]

    def _hit():
        _count[0] += 1
        if _count[0] == _spec.get("nth", 1):
            _freeze()

    if _spec["kind"] == "line":
        class _Tee:
            def __init__(self, stream):
                self._stream = stream
            def write(self, text):
                n = self._stream.write(text)
                if _spec["text"] in text:
                    self._stream.flush()
                    _hit()
                return n
            def __getattr__(self, name):
                return getattr(self._stream, name)
        sys.stderr = _Tee(sys.stderr)
    elif _spec["kind"] == "replace":
        _real_replace = os.replace
        def _replace(src, dst, *args, **kwargs):
            _real_replace(src, dst, *args, **kwargs)
            if os.path.abspath(dst) == _spec["path"]:
                _hit()
        os.replace = _replace
    elif _spec["kind"] == "fsync":
        _real_fsync = os.fsync
        def _fsync(fd):
            _real_fsync(fd)
            try:
                name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                return
            if name.startswith(_spec["prefix"]) and name.endswith(".tmp"):
                _hit()
        os.fsync = _fsync

_openlog = os.environ.get("HUBTEST_OPENLOG")
if _openlog:
    _fd = os.open(_openlog, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    def _audit(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            os.write(_fd, os.fsencode(os.fspath(args[0])) + b"\n")
    sys.addaudithook(_audit)
"""


@pytest.fixture(scope="session")
def shim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shim")
    (folder / "sitecustomize.py").write_text(_SHIM)
    return folder


def _process_state(pid: int) -> str:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return text.rsplit(")", 1)[1].split()[0]


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    elapsed: float


class HubProcess:
    """`hub-onboard provision --config X -vv` as a real child process (python -m hub_onboarding.cli)."""

    def __init__(
        self,
        config: Path,
        *args: str,
        shim_dir: Path | None = None,
        freeze: dict[str, Any] | None = None,
        openlog: Path | None = None,
        umask: int | None = None,
        command: str = "provision",
        verbosity: str = "-vv",
    ) -> None:
        env = dict(os.environ)
        if shim_dir is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim_dir), env.get("PYTHONPATH")]))
        if freeze is not None:
            env["HUBTEST_FREEZE"] = json.dumps(freeze)
        if openlog is not None:
            env["HUBTEST_OPENLOG"] = str(openlog)
        argv = [sys.executable, "-m", "hub_onboarding.cli", command, "--config", str(config)]
        if verbosity:
            argv.append(verbosity)
        argv.extend(args)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._stdout: list[str] = []
        self._readers = [
            threading.Thread(target=self._read_stderr, daemon=True),
            threading.Thread(target=self._read_stdout, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        self._stdout.append(self.proc.stdout.read())

    def wait_for_line(self, text: str, timeout: float = 30.0) -> str:
        """The first stderr line containing `text` (as soon as the child writes it)."""
        with self._changed:
            found = self._changed.wait_for(
                lambda: any(text in line for line in self.lines) or self.proc.poll() is not None, timeout
            )
            for line in self.lines:
                if text in line:
                    return line
        raise AssertionError(f"no line with {text!r} within {timeout} s (finished={found}): {self.stderr}")

    def wait_frozen(self, timeout: float = 30.0) -> None:
        """Wait until the child stopped itself (SIGSTOP from the shim)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = _process_state(self.proc.pid)
            if state == "T":
                return
            if state in ("gone", "Z") or self.proc.poll() is not None:
                raise AssertionError(f"the child ended before the freeze point: {self.stderr}")
            time.sleep(0.002)
        raise AssertionError(f"the child did not reach the freeze point within {timeout} s: {self.stderr}")

    def kill(self) -> Finished:
        """SIGKILL from outside (a power cut), then collect what it printed."""
        os.kill(self.proc.pid, signal.SIGKILL)
        return self.finish(10)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def finish(self, timeout: float = 60.0) -> Finished:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"hub-onboard did not finish within {timeout} s: {self.stderr}") from None
        for reader in self._readers:
            reader.join(10)
        return Finished(self.proc.returncode, self.stdout, self.stderr, time.monotonic() - self.started)

    @property
    def stderr(self) -> str:
        with self._changed:
            return "".join(self.lines)

    @property
    def stdout(self) -> str:
        return "".join(self._stdout)


def run_hub(config: Path, *args: str, timeout: float = 60.0, **options: Any) -> Finished:
    """Run `hub-onboard` to completion in a child process."""
    return HubProcess(config, *args, **options).finish(timeout)


def connects(
    cloud: LocalIotCore,
    cert: str | Path,
    key: str | Path,
    client_id: str,
    host: str | None = None,
    port: int | None = None,
) -> bool:
    """Connect with paho (an MQTT 5 client that is not the hub's) and report whether CONNACK was success."""
    import ssl

    import paho.mqtt.client as paho

    result: dict[str, Any] = {}
    done = threading.Event()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.tls_set(
        ca_certs=str(cloud.endpoint.root_ca_path),
        certfile=str(cert),
        keyfile=str(key),
        cert_reqs=ssl.CERT_REQUIRED,
    )

    def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        result["ok"] = not reason.is_failure
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = lambda *a: done.set()
    try:
        client.connect(host or cloud.endpoint.mqtt_host, port or cloud.endpoint.mqtt_port, keepalive=30)
    except (OSError, ssl.SSLError):
        return False
    client.loop_start()
    done.wait(10)
    client.disconnect()
    client.loop_stop()
    return bool(result.get("ok"))


def certificate_ids(iot: Any) -> set[str]:
    """Every certificate the cloud knows (boto3 list_certificates, all pages)."""
    ids: set[str] = set()
    for page in iot.get_paginator("list_certificates").paginate(pageSize=250):
        ids.update(c["certificateId"] for c in page["certificates"])
    return ids


def pem_certificate_id(pem: bytes) -> str:
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def key_matches_certificate(cert_pem: bytes, key_pem: bytes) -> bool:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return bool(key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki))


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


class TcpProxy:
    """A TCP forwarder between the hub and the gateway that a test can turn off, cut or blackhole.

    `listen()` opens the port (again), `close_listener()` makes it refuse connections (endpoint down),
    `cut()` drops every open connection, `blackhole = True` keeps connections open but forwards nothing.
    """

    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = port
        self.blackhole = False
        self.connections = 0
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        if port == 0:
            with socket.socket() as probe:  # reserve a free port number, keep it closed for now
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if not self.blackhole:
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def cut(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.close_listener()
        self.cut()


@pytest.fixture
def tcp_proxy(cloud: LocalIotCore) -> Iterator[Callable[..., TcpProxy]]:
    proxies: list[TcpProxy] = []

    def make(listening: bool = True) -> TcpProxy:
        proxy = TcpProxy(cloud.endpoint.mqtt_host, cloud.endpoint.mqtt_port)
        if listening:
            proxy.listen()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()
