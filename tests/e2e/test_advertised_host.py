"""Hubs on other machines: `serve --host 0.0.0.0 --advertise NAME`.

A server listening everywhere must tell clients an address they can reach (0.0.0.0 is none), and its
certificate must name that address, or every hub's TLS check fails. 127.0.0.2 stands in for the LAN
address: it reaches this machine's loopback, yet is not among the names the certificate has by default.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from hub_onboarding.cli import main
from iot_core_local.ca import server_alt_names
from iot_core_local.recipes.claims import set_up_fleet_provisioning
from iot_core_local.server import LocalIotCore
from tests._support.hubs import cloud_claim_hub, read_config

LAN = "127.0.0.2"


def tls_names(core: LocalIotCore) -> set[str]:
    """The subjectAltNames of the certificate the gateway presents."""
    with socket.create_connection(("127.0.0.1", core.endpoint.mqtt_port), timeout=5) as raw:
        context = ssl.create_default_context(cafile=str(core.endpoint.root_ca_path))
        context.check_hostname = False
        with context.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    sans = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return {str(value) for value in sans.value.get_values_for_type(x509.IPAddress)} | set(
        sans.value.get_values_for_type(x509.DNSName)
    )


def test_a_hub_onboards_through_the_advertised_address(tmp_path: Path) -> None:
    with LocalIotCore(tmp_path / "cloud", host="0.0.0.0", advertise=LAN) as core:
        assert core.endpoint.mqtt_host == LAN
        assert json.loads((core.data_dir / "endpoint.json").read_text())["mqttHost"] == LAN
        assert core.client().describe_endpoint(endpointType="iot:Data-ATS")["endpointAddress"] == LAN
        assert LAN in tls_names(core)
        claim = set_up_fleet_provisioning(core.client(), "LanTemplate")
        config = cloud_claim_hub(core, claim, tmp_path / "hub", "SN-LAN-1")
        assert read_config(config)["ro"]["endpoint_url"] == f"{LAN}:{core.endpoint.mqtt_port}"
        # The hub's awscrt checks the server certificate against 127.0.0.2: it must be named there.
        assert main(["provision", "--config", str(config)]) == 0
        assert read_config(config)["rw"]["iot_provisioning_state"] == "PROVISIONED"


def test_listening_everywhere_without_a_name_tells_clients_loopback(tmp_path: Path) -> None:
    with LocalIotCore(tmp_path / "cloud", host="0.0.0.0", api_host="0.0.0.0") as core:
        assert core.endpoint.mqtt_host == "127.0.0.1"  # never 0.0.0.0: no client can connect there
        assert core.endpoint.api_url.startswith("http://127.0.0.1:")
        assert core.client().describe_endpoint(endpointType="iot:Data-ATS")["endpointAddress"] == "127.0.0.1"


def test_a_new_advertised_name_renews_the_server_certificate(tmp_path: Path) -> None:
    data = tmp_path / "cloud"
    with LocalIotCore(data) as core:
        assert LAN not in tls_names(core)
        first = (data / "ca" / "server.pem").read_bytes()
    with LocalIotCore(data) as core:  # same names: the certificate is kept
        assert (data / "ca" / "server.pem").read_bytes() == first
    with LocalIotCore(data, advertise=LAN) as core:
        assert LAN in tls_names(core)
        assert {"localhost", "127.0.0.1", "::1"} <= tls_names(core)
        assert core.client().list_things()["things"] == []  # the same CA: earlier clients still trust it


def test_server_names_are_typed_as_tls_clients_match_them() -> None:
    names = server_alt_names(["Hub-Lab.Example", "192.168.1.20", "[fe80::1]", "localhost", "127.0.0.1"])
    assert names == [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.DNSName("hub-lab.example"),
        x509.IPAddress(ipaddress.ip_address("192.168.1.20")),
        x509.IPAddress(ipaddress.ip_address("fe80::1")),
    ]


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("0.0.0.0", "is where a server listens, not an address hubs can reach"),
        ("::", "is where a server listens, not an address hubs can reach"),
        ("hub lab", "not a host name or IP address: 'hub lab'"),
        ("-hub.example", "not a host name or IP address"),
        ("fe80::1%eth0", "has a zone (%...), which no hub can use"),
        ("0", "is neither a host name nor a complete IP address"),
        ("::ffff:0.0.0.0", "is where a server listens, not an address hubs can reach"),
    ],
)
def test_serve_refuses_an_advertised_name_no_hub_can_use(tmp_path: Path, value: str, says: str) -> None:
    data = tmp_path / "data"
    run = subprocess.run(
        [sys.executable, "-m", "iot_core_local", "serve", "--data-dir", str(data), f"--advertise={value}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    # argparse's usage, then one line naming the flag, the problem and what to give instead.
    last = run.stderr.splitlines()[-1]
    assert last.startswith("iot-core-local serve: error: argument --advertise: ")
    assert says in last
    assert not data.exists()


def test_a_zoned_listening_address_needs_an_advertised_name(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run = subprocess.run(
        [sys.executable, "-m", "iot_core_local", "serve", "--data-dir", str(data), "--host", "fe80::1%lo"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.strip() == (
        "iot-core-local serve: --host fe80::1%lo has a zone (%...), which hubs cannot be told: add "
        "--advertise with a global address or a host name hubs reach this machine by"
    )
    assert not data.exists()
