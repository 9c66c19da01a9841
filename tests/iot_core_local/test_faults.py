"""The fault switch (faults.py) through real clients, a restart on the same ports, and the gaps closed
alongside it: trust of a certificate registered without CA on its first connect, policies changed while
connected, PUBACK 0 for a publish nobody hears, the expired-token sweep after a restart."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mqtt5
import pytest
from bench.loadgen import client_context as loadgen_context
from bench.loadgen import provision_one

from iot_core_local.faults import parse_spec
from iot_core_local.recipes.claims import ClaimSetup, set_up_fleet_provisioning
from iot_core_local.server import LocalIotCore
from tests._support.devices import (
    OPEN_POLICY,
    Credentials,
    RawClient,
    make_csr,
    new_device,
    write_credentials,
)
from tests._support.logs import watch_log
from tests._support.network import free_port

CSR_TOPIC = "$aws/certificates/create-from-csr/json"
KEYS_TOPIC = "$aws/certificates/create/json"


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalIotCore]:
    with LocalIotCore(tmp_path_factory.mktemp("faults") / "data", faults_enabled=True) as running:
        yield running


@pytest.fixture(autouse=True)
def no_faults_left(core: LocalIotCore) -> Iterator[None]:
    core.faults.clear()
    yield
    core.faults.clear()


_counter = iter(range(1_000_000))


@pytest.fixture
def claim(core: LocalIotCore, tmp_path: Path) -> tuple[ClaimSetup, Credentials]:
    setup = set_up_fleet_provisioning(core.client(), f"Fault{next(_counter)}")
    creds = write_credentials(
        tmp_path, "claim", setup.certificate_id, setup.certificate_pem, setup.private_key_pem
    )
    return setup, creds


def register_topic(template: str) -> str:
    return f"$aws/provisioning-templates/{template}/provision/json"


def connect(core: LocalIotCore, creds: Credentials, client_id: str) -> RawClient:
    client = RawClient(core, creds)
    assert client.connect(client_id).reason_code == 0
    return client


def ask(client: RawClient, topic: str, payload: bytes) -> tuple[str, dict[str, Any]]:
    """Subscribe to both answers, publish, return (accepted|rejected, answer)."""
    return client.ask(topic, payload)


def csr_body() -> bytes:
    return json.dumps({"certificateSigningRequest": make_csr()}).encode()


def register_body(token: str, serial: str) -> bytes:
    return json.dumps({"certificateOwnershipToken": token, "parameters": {"SerialNumber": serial}}).encode()


def connack_or_close(core: LocalIotCore, creds: Credentials, client_id: str, within: float = 5.0) -> Any:
    """The CONNACK the server sends, or None if it closes the connection without one."""
    client = RawClient(core, creds, timeout=within)
    try:
        client.send(mqtt5.ConnectPacket(client_id, clean_start=True, keep_alive=60))
        seen = client.expect_closed(within=within)
    finally:
        client.close()
    connacks = [p for p in seen if isinstance(p, mqtt5.ConnAckPacket)]
    return connacks[0] if connacks else None


# ---- the spec, the Python form --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("throttle:RegisterThing:2", ("throttle", "RegisterThing", 2, 0.0)),
        ("drop", ("drop", "any", 1, 0.0)),
        ("delay:createcertificatefromcsr:1:2.5", ("delay", "CreateCertificateFromCsr", 1, 2.5)),
        ("refuse:Connect:3", ("refuse", "Connect", 3, 0.0)),
        ("ignore:*", ("ignore", "any", 1, 0.0)),
    ],
)
def test_fault_specs(spec: str, expected: tuple[str, str, int, float]) -> None:
    fault = parse_spec(spec)
    assert (fault.kind, fault.operation, fault.remaining, fault.seconds) == expected


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("", "expected KIND"),
        ("explode", "unknown fault kind"),
        ("throttle:Publish", "unknown operation"),
        ("throttle:RegisterThing:0", "count must be a positive integer"),
        ("throttle:RegisterThing:x", "COUNT is an integer"),
        ("delay:RegisterThing:1", "delay needs seconds"),
        ("delay:any:1:-1", "seconds must be a number"),
        ("delay:any:1:nan", "seconds must be a number"),
        ("refuse:RegisterThing", "refuse applies to Connect only"),
        ("a:b:1:2:3", "expected KIND"),
    ],
)
def test_bad_fault_specs_are_refused(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_spec(spec)


# ---- each fault on provisioning requests ---------------------------------------------------------


def test_throttle_rejects_with_429_then_clears(
    core: LocalIotCore, claim: tuple[ClaimSetup, Credentials], caplog: pytest.LogCaptureFixture
) -> None:
    setup, creds = claim
    caplog.set_level(logging.INFO)
    # /rejected answers are told once per interval (gateway.rejected_requests), each one at DEBUG: on this
    # module's shared server an earlier rejection may have had the interval's line.
    caplog.set_level(logging.DEBUG, "iot_core_local.gateway")
    client = connect(core, creds, "throttled-hub")
    try:
        outcome, issued = ask(client, CSR_TOPIC, csr_body())
        assert outcome == "accepted"
        core.faults.add("throttle", "RegisterThing", count=2)
        body = register_body(issued["certificateOwnershipToken"], "T1")
        for _ in range(2):
            outcome, answer = ask(client, register_topic(setup.template_name), body)
            assert outcome == "rejected"
            assert answer == {
                "statusCode": 429,
                "errorCode": "ThrottlingException",
                "errorMessage": "Rate exceeded",
            }
        assert core.faults.snapshot() == []
        # Nothing was done while throttled: the token is still good.
        outcome, answer = ask(client, register_topic(setup.template_name), body)
        assert outcome == "accepted", answer
    finally:
        client.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "iot_core_local.gateway"]
    assert any(
        "fault injected: throttle" in line and "throttled-hub" in line and setup.certificate_id in line
        for line in lines
    )
    assert any("rejected 429 ThrottlingException" in line and "throttled-hub" in line for line in lines)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert issued["certificateOwnershipToken"] not in text


def test_drop_closes_the_connection_mid_request_then_clears(
    core: LocalIotCore, claim: tuple[ClaimSetup, Credentials]
) -> None:
    _, creds = claim
    core.faults.add("drop", "CreateCertificateFromCsr")
    before = len(core.registry.list_certificates())
    client = connect(core, creds, "dropped-hub")
    try:
        assert client.subscribe(f"{CSR_TOPIC}/accepted", f"{CSR_TOPIC}/rejected") == [1, 1]
        client.send(mqtt5.PublishPacket(CSR_TOPIC, csr_body(), qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=9))
        assert client.expect_closed() == []  # no PUBACK, no answer, no DISCONNECT: just gone
    finally:
        client.close()
    assert len(core.registry.list_certificates()) == before  # nothing was issued
    again = connect(core, creds, "dropped-hub")
    try:
        assert ask(again, CSR_TOPIC, csr_body())[0] == "accepted"
    finally:
        again.close()


def test_ignore_swallows_the_request_then_clears(
    core: LocalIotCore, claim: tuple[ClaimSetup, Credentials]
) -> None:
    _, creds = claim
    core.faults.add("ignore", "CreateKeysAndCertificate")
    client = connect(core, creds, "ignored-hub")
    try:
        assert client.subscribe(f"{KEYS_TOPIC}/accepted", f"{KEYS_TOPIC}/rejected") == [1, 1]
        assert client.subscribe(f"{CSR_TOPIC}/accepted", f"{CSR_TOPIC}/rejected") == [1, 1]
        assert client.publish(KEYS_TOPIC, b"{}") == 0  # PUBACK comes: the request was taken
        assert client.publish(CSR_TOPIC, csr_body()) == 0
        # Requests on one connection are answered in order, so the first answer to arrive being the
        # second request's proves the first was swallowed.
        answer = client.receive_type(mqtt5.PublishPacket)
        assert answer.topic == f"{CSR_TOPIC}/accepted"
        assert ask(client, KEYS_TOPIC, b"{}")[0] == "accepted"  # cleared after one
    finally:
        client.close()


def test_delay_answers_late(core: LocalIotCore, claim: tuple[ClaimSetup, Credentials]) -> None:
    _, creds = claim
    core.faults.add("delay", "CreateCertificateFromCsr", seconds=0.6)
    client = connect(core, creds, "delayed-hub")
    try:
        started = time.monotonic()
        assert ask(client, CSR_TOPIC, csr_body())[0] == "accepted"
        assert time.monotonic() - started >= 0.6
    finally:
        client.close()


# ---- each fault at CONNECT ----------------------------------------------------------------------


def test_refuse_closes_new_connections_without_connack_then_clears(
    core: LocalIotCore, claim: tuple[ClaimSetup, Credentials]
) -> None:
    _, creds = claim
    core.faults.add_spec("refuse:Connect:2")
    assert connack_or_close(core, creds, "refused-1") is None
    assert connack_or_close(core, creds, "refused-2") is None
    connect(core, creds, "refused-3").close()


def test_throttle_at_connect_is_connack_151(
    core: LocalIotCore, claim: tuple[ClaimSetup, Credentials]
) -> None:
    _, creds = claim
    core.faults.add("throttle", "any")  # "any": the CONNECT is the first operation to come
    connack = connack_or_close(core, creds, "throttled-connect")
    assert connack is not None
    assert int(connack.reason_code) == 151
    connect(core, creds, "throttled-connect").close()


def test_throttle_over_mqtt311(core: LocalIotCore, claim: tuple[ClaimSetup, Credentials]) -> None:
    # 3.1.1 has no "quota exceeded": a throttled CONNECT gets return code 3 (server unavailable); a
    # throttled request is a /rejected 429, as over MQTT 5.
    _, creds = claim
    core.faults.add("throttle", "any")
    client = RawClient(core, creds, mqtt311=True)
    try:
        client.send(mqtt5.ConnectPacket("throttled-311", clean_start=True, keep_alive=60))
        assert client.sock.recv(16) == b"\x20\x02\x00\x03"
    finally:
        client.close()
    client = RawClient(core, creds, mqtt311=True)
    try:
        assert client.connect("throttled-311").reason_code == 0
        core.faults.add("throttle", "CreateKeysAndCertificate")
        outcome, answer = ask(client, KEYS_TOPIC, b"{}")
        assert (outcome, answer["statusCode"], answer["errorCode"]) == (
            "rejected",
            429,
            "ThrottlingException",
        )
        outcome, _ = ask(client, KEYS_TOPIC, b"{}")
        assert outcome == "accepted"
    finally:
        client.close()


def test_drop_and_delay_at_connect(core: LocalIotCore, claim: tuple[ClaimSetup, Credentials]) -> None:
    _, creds = claim
    core.faults.add("drop", "Connect")
    assert connack_or_close(core, creds, "dropped-connect") is None
    core.faults.add("delay", "Connect", seconds=0.5)
    started = time.monotonic()
    connect(core, creds, "delayed-connect").close()
    assert time.monotonic() - started >= 0.5


def test_ignore_at_connect_never_answers_and_lets_go_when_the_client_does(
    core: LocalIotCore, claim: tuple[ClaimSetup, Credentials]
) -> None:
    _, creds = claim
    core.faults.add("ignore", "Connect")
    with watch_log("iot_core_local.gateway", lambda m: "CONNECT never answered" in m) as let_go:
        client = RawClient(core, creds, timeout=1.0)
        client.send(mqtt5.ConnectPacket("ignored-connect", clean_start=True, keep_alive=60))
        with pytest.raises((TimeoutError, socket.timeout)):
            client.receive()
        client.close()
        # The server lets the connection go as soon as the client does (deadline: nothing hangs).
        assert let_go.wait(timeout=5)
    connect(core, creds, "ignored-connect").close()


def test_faults_apply_to_the_loadgen_client_and_count_down(
    core: LocalIotCore, claim: tuple[ClaimSetup, Credentials]
) -> None:
    setup, creds = claim
    core.faults.add("throttle", "RegisterThing", count=3)
    ctx = loadgen_context(str(core.endpoint.root_ca_path), creds.cert_path, creds.key_path)

    async def run() -> list[Any]:
        return [
            await provision_one(
                core.endpoint.mqtt_host,
                core.endpoint.mqtt_port,
                ctx,
                setup.template_name,
                f"LG{i}",
                make_csr(),
            )
            for i in range(4)
        ]

    results = asyncio.run(run())
    assert [r.ok for r in results] == [False, False, False, True]
    assert all("ThrottlingException" in r.error for r in results[:3])


# ---- the HTTP and CLI forms --------------------------------------------------------------------


def _http(core: LocalIotCore, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(core.endpoint.api_url + path, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_faults_over_http(core: LocalIotCore, claim: tuple[ClaimSetup, Credentials]) -> None:
    _, creds = claim
    status, body = _http(
        core, "POST", "/_local/faults", {"kind": "refuse", "operation": "Connect", "count": 1}
    )
    assert status == 200
    assert body["fault"] == {"kind": "refuse", "operation": "Connect", "remaining": 1, "seconds": 0.0}
    status, body = _http(core, "POST", "/_local/faults", {"spec": "throttle:RegisterThing:5"})
    assert status == 200
    assert [f["kind"] for f in body["faults"]] == ["refuse", "throttle"]
    assert connack_or_close(core, creds, "http-refused") is None
    status, body = _http(core, "GET", "/_local/faults")
    assert status == 200
    assert body == {
        "faults": [{"kind": "throttle", "operation": "RegisterThing", "remaining": 5, "seconds": 0.0}]
    }
    assert _http(core, "DELETE", "/_local/faults") == (200, {"faults": []})
    assert not core.faults.armed
    for bad in ({"kind": "explode"}, {"spec": 3}, [1], {"kind": "delay", "seconds": "soon"}, b"{not json"):
        status, body = _http(core, "POST", "/_local/faults", bad)
        assert status == 400
        assert body["message"].startswith("Bad fault")
    assert _http(core, "GET", "/_local/nothing")[0] == 404
    assert _http(core, "PUT", "/_local/faults", {})[0] == 405
    # The AWS API beside it is untouched.
    assert core.client().describe_endpoint(endpointType="iot:Data-ATS")["endpointAddress"]


def test_cli_fault_option(tmp_path: Path) -> None:
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "iot_core_local",
            "serve",
            "--data-dir",
            str(tmp_path / "d"),
            "--fault",
            "boom",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2
    assert "unknown fault kind" in bad.stderr
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "iot_core_local",
            "serve",
            "--data-dir",
            str(tmp_path / "d"),
            "--mqtt-port",
            "0",
            "--api-port",
            "0",
            "--faults",
            "--fault",
            "throttle:RegisterThing:2",
            "--fault",
            "refuse:Connect",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        endpoint = json.loads(proc.stdout.readline())
        with urllib.request.urlopen(endpoint["apiUrl"] + "/_local/faults", timeout=5) as response:
            armed = json.loads(response.read())["faults"]
        assert [(f["kind"], f["operation"], f["remaining"]) for f in armed] == [
            ("throttle", "RegisterThing", 2),
            ("refuse", "Connect", 1),
        ]
    finally:
        proc.terminate()
        returncode = proc.wait(30)
        assert proc.stdout is not None
        proc.stdout.close()
    assert returncode == 0


# ---- restart in the middle of onboarding, on the same ports -----------------------------------------


def test_restart_on_the_same_ports_mid_onboarding(tmp_path: Path) -> None:
    mqtt_port, api_port = free_port(), free_port()
    data = tmp_path / "data"
    # The first server's clock stands still, so no token ever expires for its sweep: only the second
    # server (after the restart) can delete the certificate whose token expires unused.
    stopped = time.time()
    with LocalIotCore(
        data, mqtt_port=mqtt_port, api_port=api_port, token_ttl=0.5, clock=lambda: stopped
    ) as first:
        setup = set_up_fleet_provisioning(first.client(), "Restart")
        creds = write_credentials(
            tmp_path, "claim", setup.certificate_id, setup.certificate_pem, setup.private_key_pem
        )
        client = connect(first, creds, "restarting-hub")
        outcome, issued = ask(client, CSR_TOPIC, csr_body())
        assert outcome == "accepted"
        abandoned = issued["certificateId"]
        outcome, issued = ask(client, CSR_TOPIC, csr_body())
        # The hub's connection is open when the server goes: the server side ends in TIME_WAIT.
        assert first.registry.find_certificate(abandoned) is not None
    client.expect_closed()
    client.close()
    swept = watch_log("iot_core_local.gateway", lambda m: "ownership token expired unused" in m)
    # The second server's clock runs a second ahead: the first server's tokens (0.5 s) have expired.
    ahead = LocalIotCore(
        data, mqtt_port=mqtt_port, api_port=api_port, token_ttl=3600, clock=lambda: time.time() + 1.0
    )
    with swept as sweep, ahead as second:
        assert (second.endpoint.mqtt_port, second.endpoint.api_url) == (
            mqtt_port,
            f"http://127.0.0.1:{api_port}",
        )
        # The certificate whose token expired unused is swept after the restart too.
        assert sweep.wait(timeout=5)
        assert second.registry.find_certificate(abandoned) is None
        # The hub picks up where it was: a new token (the old one expired), then RegisterThing.
        client = connect(second, creds, "restarting-hub")
        try:
            outcome, issued = ask(client, CSR_TOPIC, csr_body())
            assert outcome == "accepted"
            body = register_body(issued["certificateOwnershipToken"], "R1")
            assert ask(client, register_topic(setup.template_name), body)[0] == "accepted"
        finally:
            client.close()


# ---- gaps closed ------------------------------------------------------------------------------------


def test_certificate_registered_without_ca_connects_at_once(core: LocalIotCore, tmp_path: Path) -> None:
    from tests._support.devices import DeviceCA

    maker = DeviceCA("Unregistered Maker CA")
    device = maker.device(tmp_path, "no-ca-device")
    iot = core.client()
    registered = iot.register_certificate_without_ca(certificatePem=device.certificate_pem, status="ACTIVE")
    iot.create_policy(policyName="no-ca-open", policyDocument=OPEN_POLICY)
    iot.attach_policy(policyName="no-ca-open", target=registered["certificateArn"])
    # The very next connect, without a refused attempt first to prompt a rescan.
    client = connect(core, device, "no-ca-device")
    client.close()


def test_policy_changes_apply_to_a_connected_client(core: LocalIotCore, tmp_path: Path) -> None:
    device = new_device(core, tmp_path, "policy-change", policy=None)
    iot = core.client()
    arn = f"arn:aws:iot:us-east-1:123456789012:cert/{device.certificate_id}"
    connect_only = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}],
        }
    )
    iot.create_policy(policyName="pc-connect", policyDocument=connect_only)
    iot.attach_policy(policyName="pc-connect", target=arn)
    client = connect(core, device, "policy-change")
    try:
        assert client.publish("pc/topic", b"1") == 135
        iot.create_policy(policyName="pc-open", policyDocument=OPEN_POLICY)
        iot.attach_policy(policyName="pc-open", target=arn)
        assert client.publish("pc/topic", b"2") == 0
        assert client.subscribe("pc/topic") == [1]
        iot.detach_policy(policyName="pc-open", target=arn)
        assert client.publish("pc/topic", b"3") == 135
        assert client.subscribe("pc/other") == [135]
    finally:
        client.close()


def test_publish_nobody_hears_is_puback_0(core: LocalIotCore, tmp_path: Path) -> None:
    client = connect(core, new_device(core, tmp_path, "lonely"), "lonely")
    try:
        assert client.publish("nobody/listens/here", b"x") == 0  # Mosquitto says 16; AWS says 0
    finally:
        client.close()


def test_fault_paths_are_logged_with_ids_and_no_secrets(
    core: LocalIotCore, claim: tuple[ClaimSetup, Credentials], caplog: pytest.LogCaptureFixture
) -> None:
    _, creds = claim
    caplog.set_level(logging.INFO)
    core.faults.add("refuse", "Connect")
    assert connack_or_close(core, creds, "logged-refused") is None
    client = connect(core, creds, "logged-faults")
    try:
        outcome, issued = ask(client, KEYS_TOPIC, b"")
        assert outcome == "accepted"
        core.faults.add("ignore", "CreateCertificateFromCsr")
        assert client.publish(CSR_TOPIC, csr_body()) == 0
        core.faults.add("drop", "any")
        client.send(mqtt5.PublishPacket(KEYS_TOPIC, b"", qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=77))
        client.expect_closed()
    finally:
        client.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "iot_core_local.gateway"]
    cid = creds.certificate_id
    for fragment, client_id in [
        ("fault injected at CONNECT: refuse", "logged-refused"),
        ("fault injected: ignore", "logged-faults"),
        ("fault injected: drop", "logged-faults"),
    ]:
        assert any(fragment in line and client_id in line and cid in line for line in lines), fragment
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "PRIVATE KEY" not in text
    assert issued["privateKey"].split("-----")[2].strip().splitlines()[1] not in text
    assert issued["certificateOwnershipToken"] not in text
