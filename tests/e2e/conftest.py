"""End-to-end fixtures: one iot-core-local per module (real TLS, real Mosquitto), hubs in tmp folders.

The helpers behind them (child processes, the shim, the TCP proxy, the hook server) are in tests/_support.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hub_onboarding.tools.factory import write_claim_hub
from iot_core_local.recipes.claims import ClaimSetup, set_up_fleet_provisioning
from iot_core_local.server import LocalIotCore
from tests._support.hooks import HookServer
from tests._support.hubs import CloudHubFactory
from tests._support.network import TcpProxy
from tests._support.processes import write_shim

_names = itertools.count()


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalIotCore]:
    with LocalIotCore(tmp_path_factory.mktemp("cloud")) as core:
        yield core


@pytest.fixture
def iot(cloud: LocalIotCore) -> Any:
    return cloud.client()


@pytest.fixture
def claim(request: pytest.FixtureRequest, iot: Any) -> ClaimSetup:
    """A template and an ACTIVE claim certificate of this test's own; in a module marked `shared_claim`
    (whose tests never change a claim or its template in the cloud) one for the whole module."""
    if request.node.get_closest_marker("shared_claim") is not None:
        shared: ClaimSetup = request.getfixturevalue("module_claim")
        return shared
    return set_up_fleet_provisioning(iot, f"Tmpl{next(_names)}")


@pytest.fixture(scope="module")
def module_claim(cloud: LocalIotCore) -> ClaimSetup:
    # Creating a claim costs a CreateKeysAndCertificate (an RSA key) and five API calls per test.
    return set_up_fleet_provisioning(cloud.client(), f"Tmpl{next(_names)}")


@pytest.fixture
def make_cloud_hub(cloud: LocalIotCore, claim: ClaimSetup, tmp_path: Path) -> CloudHubFactory:
    """A factory-fresh fleet-provisioning hub aimed at the module's iot-core-local, with this test's claim.

    Returns its config path; keyword arguments override write_claim_hub's defaults.
    """

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


@pytest.fixture
def hook_server() -> Iterator[Callable[..., HookServer]]:
    servers: list[HookServer] = []

    def start(answer: dict[str, Any] | None, delay: float = 0.0) -> HookServer:
        server = HookServer(answer, delay=delay)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="session")
def shim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the test-only sitecustomize that freezes a child hub-onboard (processes.CHILD_SHIM)."""
    return write_shim(tmp_path_factory.mktemp("shim"))


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
