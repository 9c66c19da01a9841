"""End-to-end fixtures: one iot-core-local per module (real TLS, real Mosquitto), hubs in tmp folders."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from hub_onboarding.factory import write_claim_hub
from iot_core_local.claims import ClaimSetup, set_up_fleet_provisioning
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

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
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
