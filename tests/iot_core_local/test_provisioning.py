"""The fleet provisioning MQTT API through real clients: awsiotsdk's IotIdentityClientV2 and paho."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import cbor2
import mqtt5
import pytest

from iot_core_local.recipes.claims import ClaimSetup, set_up_fleet_provisioning
from iot_core_local.server import LocalIotCore
from tests._support.clients import identity_client, register_thing
from tests._support.devices import (
    Credentials,
    DeviceCA,
    Paho,
    RawClient,
    make_csr,
    write_credentials,
)
from tests._support.hooks import HookServer, hook_server
from tests._support.logs import watch_log

CSR_TOPIC = "$aws/certificates/create-from-csr/json"
KEYS_TOPIC = "$aws/certificates/create/json"


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalIotCore]:
    with LocalIotCore(tmp_path_factory.mktemp("prov") / "data", hook_timeout=1.0) as running:
        yield running


_counter = iter(range(1_000_000))


@pytest.fixture
def claim(core: LocalIotCore, tmp_path: Path) -> tuple[ClaimSetup, Credentials]:
    # The provisioning API's own answers, under a template without a hook: the recipe's default takeover
    # guard would refuse some requests first (a missing serial, say); it has tests of its own.
    setup = set_up_fleet_provisioning(core.client(), f"Tmpl{next(_counter)}", takeover_guard=False)
    creds = write_credentials(
        tmp_path, "claim", setup.certificate_id, setup.certificate_pem, setup.private_key_pem
    )
    return setup, creds


def register_topic(template: str, fmt: str = "json") -> str:
    return f"$aws/provisioning-templates/{template}/provision/{fmt}"


def request(client: RawClient, topic: str, payload: bytes) -> tuple[str, Any]:
    """Subscribe to both answers, publish, return (accepted|rejected, decoded answer)."""
    codes = client.subscribe(f"{topic}/accepted", f"{topic}/rejected")
    assert codes == [1, 1]
    assert client.publish(topic, payload) == 0
    answer = client.receive_type(mqtt5.PublishPacket)
    decoded = cbor2.loads(answer.payload) if topic.endswith("/cbor") else json.loads(answer.payload)
    return answer.topic.rsplit("/", 1)[1], decoded


def connect_claim(core: LocalIotCore, creds: Credentials, client_id: str) -> RawClient:
    client = RawClient(core, creds)
    assert client.connect(client_id).reason_code == 0
    return client


# ---- the whole flow through AWS's own device SDK ---------------------------------------------


def _settle(future: Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


def _aws_connect(core: LocalIotCore, creds: Credentials, client_id: str) -> tuple[Any, threading.Event]:
    """An awscrt MQTT 5 client, connected; and the event its stop sets."""
    from awscrt import mqtt5 as crt_mqtt5
    from awsiot import mqtt5_client_builder

    connected: Future[bool] = Future()
    stopped = threading.Event()
    client = mqtt5_client_builder.mtls_from_path(
        cert_filepath=creds.cert_path,
        pri_key_filepath=creds.key_path,
        endpoint=core.endpoint.mqtt_host,
        port=core.endpoint.mqtt_port,
        ca_filepath=str(core.endpoint.root_ca_path),
        client_id=client_id,
        session_behavior=crt_mqtt5.ClientSessionBehaviorType.CLEAN,
        on_lifecycle_connection_success=lambda data: _settle(connected, True),
        on_lifecycle_connection_failure=lambda data: _settle(connected, False),
        on_lifecycle_stopped=lambda data: stopped.set(),
    )
    client.start()
    assert connected.result(10), f"awscrt could not connect as {client_id}"
    return client, stopped


def _aws_stop(client: Any, stopped: threading.Event) -> None:
    client.stop()
    assert stopped.wait(5), "awscrt client did not stop"


@pytest.mark.parametrize("operation", ["CreateKeysAndCertificate", "CreateCertificateFromCsr"])
def test_claim_flow_with_iot_identity_client_v2(
    core: LocalIotCore, claim: tuple[ClaimSetup, Credentials], tmp_path: Path, operation: str
) -> None:
    from awsiot import iotidentity
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    setup, claim_creds = claim
    crt, stopped = _aws_connect(core, claim_creds, f"SN-{operation}")  # a claim connects as its serial
    try:
        identity = identity_client(crt)
        if operation == "CreateKeysAndCertificate":
            issued = identity.create_keys_and_certificate(
                iotidentity.CreateKeysAndCertificateRequest()
            ).result(10)
            key_pem = issued.private_key
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            from cryptography import x509
            from cryptography.hazmat.primitives import hashes
            from cryptography.x509.oid import NameOID

            csr = (
                x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hub")]))
                .sign(key, hashes.SHA256())
                .public_bytes(serialization.Encoding.PEM)
                .decode()
            )
            issued = identity.create_certificate_from_csr(
                iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=csr)
            ).result(10)
            key_pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ).decode()
        assert core.registry.get_certificate(issued.certificate_id).status == "PENDING_ACTIVATION"
        registered = register_thing(
            identity, setup.template_name, issued.certificate_ownership_token, f"SN-{operation}"
        )
    finally:
        _aws_stop(crt, stopped)
    thing = f"hub-SN-{operation}"
    assert registered.thing_name == thing
    assert registered.device_configuration == {"ClientId": thing, "ManagedThingId": f"mt-SN-{operation}"}
    assert core.registry.get_certificate(issued.certificate_id).status == "ACTIVE"
    assert core.registry.get_thing(thing).attributes == {"upc": "012345"}

    # The device reconnects with its new certificate, as its thing (the hub policy wants that).
    device = write_credentials(tmp_path, "device", issued.certificate_id, issued.certificate_pem, key_pem)
    client = RawClient(core, device)
    assert client.connect(thing).reason_code == 0
    assert client.subscribe(f"things/{thing}/cmd") == [1]
    client.close()
    wrong = RawClient(core, device)
    assert wrong.connect("someone-else").reason_code == mqtt5.ConnAckReasonCode.NOT_AUTHORIZED
    wrong.close()


def test_cbor_flow_with_paho(core: LocalIotCore, claim: tuple[ClaimSetup, Credentials]) -> None:
    setup, creds = claim
    hub = Paho(core, creds, "cbor-hub")
    try:
        assert hub.connect() == 0
        assert hub.subscribe(
            "$aws/certificates/create/cbor/+", f"{register_topic(setup.template_name, 'cbor')}/+"
        ) == [1, 1]
        hub.publish("$aws/certificates/create/cbor", b"", qos=1)
        created = hub.message()
        assert created.topic == "$aws/certificates/create/cbor/accepted"
        issued = cbor2.loads(created.payload)
        assert {"certificateId", "certificatePem", "privateKey", "certificateOwnershipToken"} <= set(issued)
        body = {
            "certificateOwnershipToken": issued["certificateOwnershipToken"],
            "parameters": {"SerialNumber": "CB1"},
        }
        hub.publish(register_topic(setup.template_name, "cbor"), cbor2.dumps(body), qos=1)
        registered = hub.message()
        assert registered.topic.endswith("/cbor/accepted")
        assert cbor2.loads(registered.payload)["thingName"] == "hub-CB1"
    finally:
        hub.close()


def test_two_hubs_on_one_claim_each_see_only_their_answer(
    core: LocalIotCore, claim: tuple[ClaimSetup, Credentials]
) -> None:
    _, creds = claim
    first, second = connect_claim(core, creds, "SN-a"), connect_claim(core, creds, "SN-b")
    try:
        for client in (first, second):
            assert client.subscribe(f"{KEYS_TOPIC}/accepted", f"{KEYS_TOPIC}/rejected") == [1, 1]
        assert first.publish(KEYS_TOPIC, b"{}") == 0
        assert second.publish(KEYS_TOPIC, b"{}") == 0
        mine = [json.loads(c.receive_type(mqtt5.PublishPacket).payload) for c in (first, second)]
        assert mine[0]["certificateId"] != mine[1]["certificateId"]
        # Nothing else arrives: neither hub sees the other's private key.
        for client in (first, second):
            client.sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                client.receive_type(mqtt5.PublishPacket)
    finally:
        first.close()
        second.close()


def test_answer_without_subscription_is_dropped(
    core: LocalIotCore, claim: tuple[ClaimSetup, Credentials]
) -> None:
    _, creds = claim
    client = connect_claim(core, creds, "no-sub")
    try:
        assert client.publish(KEYS_TOPIC, b"{}") == 0
        client.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            client.receive_type(mqtt5.PublishPacket)
    finally:
        client.close()


# ---- every failure is a /rejected answer ------------------------------------------------------


def _rejected(answer: tuple[str, Any], status: int, code: str, fragment: str) -> None:
    outcome, body = answer
    assert outcome == "rejected", body
    assert body["statusCode"] == status, body
    assert body["errorCode"] == code, body
    assert fragment.lower() in body["errorMessage"].lower(), body


def _issue(client: RawClient) -> dict[str, Any]:
    outcome, body = request(client, CSR_TOPIC, json.dumps({"certificateSigningRequest": make_csr()}).encode())
    assert outcome == "accepted", body
    return dict(body)


def test_rejections(core: LocalIotCore, claim: tuple[ClaimSetup, Credentials]) -> None:
    setup, creds = claim
    template = setup.template_name
    client = connect_claim(core, creds, "rejections")
    try:
        _rejected(request(client, CSR_TOPIC, b"{not json"), 400, "InvalidPayload", "JSON")
        _rejected(
            request(client, "$aws/certificates/create-from-csr/cbor", b"\xff\x00garbage"),
            400,
            "InvalidPayload",
            "CBOR",
        )
        _rejected(
            request(
                client, CSR_TOPIC, json.dumps({"certificateSigningRequest": make_csr(weak=True)}).encode()
            ),
            400,
            "InvalidCsr",
            "curve",
        )
        _rejected(
            request(client, CSR_TOPIC, json.dumps({"certificateSigningRequest": "nope"}).encode()),
            400,
            "InvalidCsr",
            "does not parse",
        )
        topic = register_topic(template)
        _rejected(
            request(client, topic, json.dumps({"parameters": {"SerialNumber": "X"}}).encode()),
            400,
            "InvalidCertificateOwnershipToken",
            "cannot be empty",
        )
        _rejected(
            request(client, topic, json.dumps({"certificateOwnershipToken": "forged"}).encode()),
            400,
            "InvalidCertificateOwnershipToken",
            "invalid",
        )
        issued = _issue(client)
        # Missing parameter: rejected, and the token stays usable (nothing happened).
        _rejected(
            request(
                client,
                topic,
                json.dumps(
                    {"certificateOwnershipToken": issued["certificateOwnershipToken"], "parameters": {}}
                ).encode(),
            ),
            400,
            "InvalidParameters",
            "SerialNumber",
        )
        body = {
            "certificateOwnershipToken": issued["certificateOwnershipToken"],
            "parameters": {"SerialNumber": "R1"},
        }
        first = request(client, topic, json.dumps(body).encode())
        assert first[0] == "accepted"
        # The same request again (a hub that lost the answer): the same answer, nothing done twice.
        assert request(client, topic, json.dumps(body).encode()) == first
        # Anything else with the spent token is refused.
        other = {**body, "parameters": {"SerialNumber": "R2"}}
        _rejected(
            request(client, topic, json.dumps(other).encode()),
            400,
            "InvalidCertificateOwnershipToken",
            "used",
        )
        assert core.registry.find_thing("R2") is None
    finally:
        client.close()


def test_unknown_and_disabled_templates(core: LocalIotCore, claim: tuple[ClaimSetup, Credentials]) -> None:
    setup, creds = claim
    iot = core.client()
    # The claim policy only allows its own template, so widen it for this test.
    iot.create_policy(
        policyName=f"{setup.template_name}-any",
        policyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]}
        ),
    )
    iot.attach_policy(
        policyName=f"{setup.template_name}-any", target=core.registry.cert_arn(setup.certificate_id)
    )
    client = connect_claim(core, creds, "templates")
    try:
        token = _issue(client)["certificateOwnershipToken"]
        body = json.dumps({"certificateOwnershipToken": token, "parameters": {"SerialNumber": "T"}}).encode()
        _rejected(
            request(client, register_topic("NoSuchTemplate"), body), 404, "ResourceNotFound", "NoSuchTemplate"
        )
        iot.update_provisioning_template(templateName=setup.template_name, enabled=False)
        _rejected(
            request(client, register_topic(setup.template_name), body), 400, "InvalidRequest", "disabled"
        )
    finally:
        client.close()


def test_a_stored_template_past_the_nesting_limit_is_a_rejected_400(
    core: LocalIotCore, claim: tuple[ClaimSetup, Credentials]
) -> None:
    # A body stored before the limit existed (straight into the registry, as an older version wrote it):
    # RegisterThing checks it again and answers /rejected 400, where it was a RecursionError (500).
    setup, creds = claim
    expr: Any = {"Ref": "SerialNumber"}
    for _ in range(200):
        expr = {"Fn::Sub": ["${V}", {"V": expr}]}
    deep = {
        "Parameters": {"SerialNumber": {"Type": "String"}},
        "Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": expr}}},
    }
    core.registry.update_template(setup.template_name, body=json.dumps(deep, separators=(",", ":")))
    client = connect_claim(core, creds, "deep-template")
    try:
        issued = _issue(client)
        body = {
            "certificateOwnershipToken": issued["certificateOwnershipToken"],
            "parameters": {"SerialNumber": "D"},
        }
        _rejected(
            request(client, register_topic(setup.template_name), json.dumps(body).encode()),
            400,
            "InvalidRequest",
            "nests functions more than 32 deep, the limit",
        )
    finally:
        client.close()
    assert core.registry.find_thing("D") is None


def test_expired_token(tmp_path: Path) -> None:
    # A token that expires as it is issued: expired when it is used, without waiting for time to pass.
    with LocalIotCore(tmp_path / "short", token_ttl=0) as short:
        setup = set_up_fleet_provisioning(short.client(), "Short")
        creds = write_credentials(
            tmp_path, "claim", setup.certificate_id, setup.certificate_pem, setup.private_key_pem
        )
        client = connect_claim(short, creds, "expired")
        try:
            token = _issue(client)["certificateOwnershipToken"]
            body = json.dumps(
                {"certificateOwnershipToken": token, "parameters": {"SerialNumber": "E"}}
            ).encode()
            _rejected(
                request(client, register_topic("Short"), body),
                400,
                "InvalidCertificateOwnershipToken",
                "expired",
            )
        finally:
            client.close()


# ---- the pre-provisioning hook ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "hold", "fragment"),
    [
        ({"allowProvisioning": False}, False, "denied"),
        ({"something": "else"}, False, "allowProvisioning"),
        ({"allowProvisioning": True}, True, "within"),  # no answer before the hook timeout (1 s)
    ],
)
def test_hook_that_denies(
    core: LocalIotCore, tmp_path: Path, answer: dict[str, Any], hold: bool, fragment: str
) -> None:
    with hook_server(answer, hold=hold) as (url, seen):
        name = f"Hook{next(_counter)}"
        setup = set_up_fleet_provisioning(core.client(), name, hook_url=url)
        creds = write_credentials(
            tmp_path, "claim", setup.certificate_id, setup.certificate_pem, setup.private_key_pem
        )
        client = connect_claim(core, creds, "hooked")
        try:
            issued = _issue(client)
            body = {
                "certificateOwnershipToken": issued["certificateOwnershipToken"],
                "parameters": {"SerialNumber": "H"},
            }
            _rejected(
                request(client, register_topic(name), json.dumps(body).encode()),
                403,
                "AccessDenied",
                fragment,
            )
        finally:
            client.close()
        assert core.registry.find_thing("hub-H") is None
        assert seen[0]["certificateId"] == issued["certificateId"]
        assert seen[0]["claimCertificateId"] == setup.certificate_id
        assert seen[0]["clientId"] == "hooked"
        assert seen[0]["parameters"] == {"SerialNumber": "H"}
        assert seen[0]["templateArn"].endswith(f":provisioningtemplate/{name}")
        assert "BEGIN CERTIFICATE" in seen[0]["certificatePem"]


def test_hook_that_overrides_parameters(core: LocalIotCore, tmp_path: Path) -> None:
    answer = {"allowProvisioning": True, "parameterOverrides": {"SerialNumber": "FROM-HOOK"}}
    with hook_server(answer) as (url, _):
        name = f"Hook{next(_counter)}"
        setup = set_up_fleet_provisioning(core.client(), name, hook_url=url)
        creds = write_credentials(
            tmp_path, "claim", setup.certificate_id, setup.certificate_pem, setup.private_key_pem
        )
        client = connect_claim(core, creds, "overridden")
        try:
            issued = _issue(client)
            body = {
                "certificateOwnershipToken": issued["certificateOwnershipToken"],
                "parameters": {"SerialNumber": "DEV"},
            }
            outcome, registered = request(client, register_topic(name), json.dumps(body).encode())
        finally:
            client.close()
    assert outcome == "accepted", registered
    assert registered["thingName"] == "hub-FROM-HOOK"


# ---- a hook's time limit covers the whole call, and hooks have threads of their own -------------


def _publish_register(client: RawClient, template: str, serial: str) -> None:
    """RegisterThing without waiting for its answer (subscribed first, so the answer is kept)."""
    topic = register_topic(template)
    issued = _issue(client)
    assert client.subscribe(f"{topic}/accepted", f"{topic}/rejected") == [1, 1]
    body = {
        "certificateOwnershipToken": issued["certificateOwnershipToken"],
        "parameters": {"SerialNumber": serial},
    }
    assert client.publish(topic, json.dumps(body).encode()) == 0


def _answer(client: RawClient) -> tuple[str, Any]:
    answer = client.receive_type(mqtt5.PublishPacket)
    return answer.topic.rsplit("/", 1)[1], json.loads(answer.payload)


def test_a_hook_that_trickles_its_headers_is_cut_off_at_the_time_limit(
    core: LocalIotCore, tmp_path: Path
) -> None:
    # One byte every 100 ms: each read finishes well within any socket timeout, the headers never end.
    with HookServer({"allowProvisioning": True}, trickle=0.1) as hook:
        name = f"Hook{next(_counter)}"
        setup = set_up_fleet_provisioning(core.client(), name, hook_url=hook.url)
        creds = write_credentials(
            tmp_path, "claim", setup.certificate_id, setup.certificate_pem, setup.private_key_pem
        )
        client = connect_claim(core, creds, "trickled")
        try:
            _publish_register(client, name, "TR")
            started = time.monotonic()
            answer = _answer(client)
            elapsed = time.monotonic() - started
        finally:
            client.close()
    _rejected(answer, 403, "AccessDenied", f"within {core.hook_timeout:g} seconds")
    assert elapsed < core.hook_timeout + 3.0, elapsed  # it held RegisterThing for 14-25 s before
    assert core.registry.find_thing("hub-TR") is None


def test_slow_hooks_do_not_hold_back_other_hubs_create_keys(tmp_path: Path) -> None:
    slow = 10  # more than the provisioning service's 8 workers, which hooks used to share
    with (
        LocalIotCore(tmp_path / "data", hook_timeout=30.0) as hooked,
        HookServer({"allowProvisioning": True}, trickle=0.1) as hook,
    ):
        setup = set_up_fleet_provisioning(hooked.client(), "Slow", hook_url=hook.url)
        creds = write_credentials(
            tmp_path, "claim", setup.certificate_id, setup.certificate_pem, setup.private_key_pem
        )
        waiting = [connect_claim(hooked, creds, f"slow-{i}") for i in range(slow)]
        other = connect_claim(hooked, creds, "other-hub")
        try:
            for i, client in enumerate(waiting):
                _publish_register(client, "Slow", f"S{i}")
            for _ in range(slow):
                assert hook.arrived.acquire(timeout=30.0)  # every hook is running (and trickling)
            started = time.monotonic()
            outcome, body = request(other, KEYS_TOPIC, b"")
            elapsed = time.monotonic() - started
            assert outcome == "accepted", body
            assert "privateKey" in body
            # Answered while every hook still trickles (they have 30 s): before, it waited for a worker.
            assert elapsed < 5.0, elapsed
            assert len(hook.requests) == slow
        finally:
            for client in [*waiting, other]:
                client.close()


def test_a_hook_without_a_free_slot_is_throttled_within_the_time_limit(tmp_path: Path) -> None:
    with (
        LocalIotCore(tmp_path / "data", hook_timeout=1.0, hook_workers=2) as small,
        HookServer({"allowProvisioning": True}) as hook,
    ):
        setup = set_up_fleet_provisioning(small.client(), "Few", hook_url=hook.url)
        creds = write_credentials(
            tmp_path, "claim", setup.certificate_id, setup.certificate_pem, setup.private_key_pem
        )
        # Both hook slots taken, as two hooks slower than the limit would hold them.
        slots = small.gateway.provisioning.hook_slots
        for _ in range(2):
            asyncio.run_coroutine_threadsafe(slots.acquire(), small.loop).result(5.0)
        client = connect_claim(small, creds, "few")
        try:
            _publish_register(client, "Few", "F")
            started = time.monotonic()
            answer = _answer(client)
            elapsed = time.monotonic() - started
            for _ in range(2):
                small.loop.call_soon_threadsafe(slots.release)
            # With a slot free again, the same hub provisions.
            _publish_register(client, "Few", "G")
            assert _answer(client)[0] == "accepted"
        finally:
            client.close()
    _rejected(answer, 429, "ThrottlingException", "all 2 pre-provisioning hook slots stayed busy for 1 s")
    assert elapsed < 1.0 + 3.0, elapsed  # the 1 s limit, with room for a loaded machine
    assert len(hook.requests) == 1  # only the second request reached the hook


# ---- logs ---------------------------------------------------------------------------------------


def test_logs_name_connections_and_requests_but_no_secrets(
    core: LocalIotCore, claim: tuple[ClaimSetup, Credentials], caplog: pytest.LogCaptureFixture
) -> None:
    setup, creds = claim
    caplog.set_level(logging.DEBUG)
    client = connect_claim(core, creds, "logged-hub")
    # The answer goes out before its log line is written: the last one is waited for, not slept for.
    # A /rejected answer is told once per interval (gateway.rejected_requests), each at DEBUG.
    last_line = watch_log(
        "iot_core_local.gateway",
        lambda m: "provisioning RegisterThing" in m and "InvalidCertificateOwnershipToken" in m,
        level=logging.DEBUG,
    )
    with last_line as logged:
        try:
            outcome, issued = request(client, KEYS_TOPIC, b"")
            assert outcome == "accepted"
            body = {
                "certificateOwnershipToken": issued["certificateOwnershipToken"],
                "parameters": {"SerialNumber": "L"},
            }
            registered = request(client, register_topic(setup.template_name), json.dumps(body).encode())
            assert registered[0] == "accepted"
            reused = {**body, "parameters": {"SerialNumber": "L2"}}  # the spent token, another request
            used = request(client, register_topic(setup.template_name), json.dumps(reused).encode())
            assert used[0] == "rejected"
        finally:
            client.close()
        assert logged.wait(timeout=5)
    text = "\n".join(r.getMessage() for r in caplog.records)
    key_body = issued["privateKey"].split("-----")[2].strip().splitlines()[1]
    assert key_body not in text
    assert "PRIVATE KEY" not in text
    assert issued["certificateOwnershipToken"] not in text
    gateway_lines = [r.getMessage() for r in caplog.records if r.name == "iot_core_local.gateway"]
    assert any(
        "logged-hub" in line and "accepted" in line and setup.certificate_id in line for line in gateway_lines
    )
    assert any(
        line.startswith("provisioning CreateKeysAndCertificate") and "logged-hub" in line
        for line in gateway_lines
    )
    assert any(
        "provisioning RegisterThing" in line and "InvalidCertificateOwnershipToken" in line
        for line in gateway_lines
    )


def test_register_thing_uses_the_template_it_was_judged_by(
    core: LocalIotCore, claim: tuple[ClaimSetup, Credentials], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hook added just after the gateway decided the request needs no thread must not be called
    (on the event loop): decision and work use one snapshot of the template."""
    setup, creds = claim
    name = setup.template_name
    registry = core.registry
    original = registry.find_template
    with hook_server({"allowProvisioning": False}) as (url, seen):
        hook = {"targetArn": url, "payloadVersion": "2020-04-01"}
        updated: list[bool] = []

        def find_template_then_update(template_name: str) -> Any:
            found = original(template_name)
            if template_name == name and not updated:
                updated.append(True)
                registry.update_template(name, hook=hook)  # UpdateProvisioningTemplate commits now
            return found

        client = connect_claim(core, creds, "snapshot")
        try:
            issued = _issue(client)
            monkeypatch.setattr(registry, "find_template", find_template_then_update)
            body = {
                "certificateOwnershipToken": issued["certificateOwnershipToken"],
                "parameters": {"SerialNumber": "SNAP"},
            }
            outcome, registered = request(client, register_topic(name), json.dumps(body).encode())
        finally:
            client.close()
            monkeypatch.undo()
    assert updated == [True]
    assert seen == []  # the hook was not in the snapshot the request was judged by
    assert outcome == "accepted", registered


def test_thing_groups_in_a_template_are_reported_as_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from iot_core_local import templates
    from iot_core_local.ca import CertificateAuthority
    from iot_core_local.provisioning import ProvisioningService
    from iot_core_local.registry import Registry

    ca = CertificateAuthority(tmp_path / "ca")
    registry = Registry(tmp_path / "registry.sqlite3")
    pem, _key = ca.create_keys_and_certificate()
    cert = registry.add_certificate(pem, "PENDING_ACTIVATION")
    body = json.dumps(
        {
            "Parameters": {"AWS::IoT::Certificate::Id": {"Type": "String"}},
            "Resources": {
                "thing": {
                    "Type": "AWS::IoT::Thing",
                    "Properties": {"ThingName": "grouped", "ThingGroups": ["line-1"]},
                },
                "certificate": {
                    "Type": "AWS::IoT::Certificate",
                    "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}},
                },
            },
        }
    )
    plan = templates.evaluate(
        templates.validate_template(body), {}, {"AWS::IoT::Certificate::Id": cert.certificate_id}
    )
    with caplog.at_level("WARNING"):
        ProvisioningService(registry, ca).apply_plan(plan, cert)
    assert "ThingGroups/BillingGroup in the template are ignored" in caplog.text
    assert registry.get_thing("grouped").name == "grouped"
    assert registry.get_certificate(cert.certificate_id).status == "ACTIVE"
    registry.close()


# ---- the service on its own, with a clock the test moves ------------------------------------------


class FakeClock:
    """Epoch seconds that move only when the test says so."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_expired_tokens_are_swept_when_the_clock_says_so(tmp_path: Path) -> None:
    from iot_core_local.ca import CertificateAuthority
    from iot_core_local.provisioning import ProvisioningService, Requester, parse_request_topic
    from iot_core_local.registry import Registry

    ca = CertificateAuthority(tmp_path / "ca")
    clock = FakeClock(time.time())  # one clock for the registry (token expiry) and the service (sweeps)
    registry = Registry(tmp_path / "registry.sqlite3", clock=clock)
    service = ProvisioningService(registry, ca, token_ttl=60.0, clock=clock)
    request = parse_request_topic(CSR_TOPIC)
    assert request is not None

    async def scenario() -> tuple[str, bool, bool]:
        answer = await service.answer(
            request,
            json.dumps({"certificateSigningRequest": make_csr()}).encode(),
            Requester(claim_certificate_id="claim", client_id="hub"),
        )
        assert answer.accepted, answer.summary
        issued = json.loads(answer.payload)["certificateId"]
        await service.maintain()  # the first sweep: nothing has expired yet
        kept = registry.find_certificate(issued) is not None
        clock.advance(61.0)
        await service.maintain()  # a minute later the token has expired unused
        swept = registry.find_certificate(issued) is None
        await service.close()
        return issued, kept, swept

    try:
        _issued, kept, swept = asyncio.run(scenario())
    finally:
        registry.close()
    assert kept
    assert swept


def test_jitr_event_is_dated_by_the_clock(tmp_path: Path) -> None:
    from cryptography import x509

    from iot_core_local.ca import certificate_id
    from iot_core_local.provisioning.jit import JustInTime, Registered
    from iot_core_local.registry import Registry

    registry = Registry(tmp_path / "registry.sqlite3")
    maker = DeviceCA("Clock CA")
    ca = registry.add_ca_certificate(
        maker.pem, status="ACTIVE", auto_registration=True, registration_config=None, mode="SNI_ONLY"
    )
    device = maker.device(tmp_path, "clocked")
    cert = x509.load_pem_x509_certificate(device.certificate_pem.encode())
    try:
        outcome = JustInTime(registry, FakeClock(1_700_000_000.25)).register(
            cert, certificate_id(cert), ca, None
        )
    finally:
        registry.close()
    assert isinstance(outcome, Registered)
    event = json.loads(outcome.event)
    assert event["timestamp"] == 1_700_000_000_250
    assert event["certificateId"] == device.certificate_id
    assert event["certificateStatus"] == "PENDING_ACTIVATION"


def test_a_retained_provisioning_request_needs_retain_publish(
    core: LocalIotCore, claim: tuple[ClaimSetup, Credentials]
) -> None:
    """Like any retained publish, a retained request asks for iot:RetainPublish, which the claim policy
    does not grant: refused (135) and not answered, while the same request without retain is."""
    _, creds = claim
    client = connect_claim(core, creds, "retained-request")
    try:
        assert client.subscribe(f"{CSR_TOPIC}/accepted", f"{CSR_TOPIC}/rejected") == [1, 1]
        body = json.dumps({"certificateSigningRequest": make_csr()}).encode()
        assert client.publish(CSR_TOPIC, body, retain=True) == mqtt5.PubAckReasonCode.NOT_AUTHORIZED
        assert client.publish(CSR_TOPIC, body) == 0
        answer = client.receive_type(mqtt5.PublishPacket)
        assert answer.topic == f"{CSR_TOPIC}/accepted"  # the first answer is the plain request's
    finally:
        client.close()


@pytest.mark.parametrize("offboarded", ["certificate revoked", "certificate inactive", "thing deleted"])
def test_a_withdrawn_identity_is_not_answered_again(
    core: LocalIotCore, claim: tuple[ClaimSetup, Credentials], offboarded: str
) -> None:
    """The identical RegisterThing again is answered only while the identity it made still stands: an
    operator who revoked or deactivated the certificate, or deleted the thing, gets no "accepted" back."""
    setup, creds = claim
    iot = core.client()
    topic = register_topic(setup.template_name)
    serial = f"W-{offboarded.split()[1]}"
    client = connect_claim(core, creds, f"withdrawn-{serial}")
    try:
        issued = _issue(client)
        body = json.dumps(
            {
                "certificateOwnershipToken": issued["certificateOwnershipToken"],
                "parameters": {"SerialNumber": serial},
            }
        ).encode()
        first = request(client, topic, body)
        assert first[0] == "accepted"
        assert request(client, topic, body) == first  # still standing: the same answer
        cid = issued["certificateId"]
        if offboarded == "thing deleted":
            arn = iot.describe_certificate(certificateId=cid)["certificateDescription"]["certificateArn"]
            iot.detach_thing_principal(thingName=first[1]["thingName"], principal=arn)
            iot.delete_thing(thingName=first[1]["thingName"])
        else:
            iot.update_certificate(certificateId=cid, newStatus=offboarded.split()[1].upper())
        _rejected(request(client, topic, body), 400, "InvalidCertificateOwnershipToken", "used")
    finally:
        client.close()


@pytest.mark.parametrize(
    "target",
    [
        "arn:aws:lambda:us-east-1:123456789012:function:SomeoneElsesHook",
        "arn:aws:lambda:eu-west-1:123456789012:function:HubTakeoverGuard",  # another region's guard
        "arn:aws:lambda:us-east-1:210987654321:function:HubTakeoverGuard",  # another account's guard
    ],
)
def test_a_lambda_hook_iot_core_local_does_not_host_is_refused(
    core: LocalIotCore, tmp_path: Path, target: str
) -> None:
    name = f"Lambda{next(_counter)}"
    setup = set_up_fleet_provisioning(core.client(), name, hook_url=target)
    creds = write_credentials(
        tmp_path, "claim", setup.certificate_id, setup.certificate_pem, setup.private_key_pem
    )
    client = connect_claim(core, creds, "lambda")
    try:
        issued = _issue(client)
        body = {
            "certificateOwnershipToken": issued["certificateOwnershipToken"],
            "parameters": {"SerialNumber": name},
        }
        _rejected(
            request(client, register_topic(name), json.dumps(body).encode()),
            403,
            "AccessDenied",
            "arn:aws:lambda:us-east-1:123456789012:function:HubTakeoverGuard)",  # names what it hosts
        )
    finally:
        client.close()
    assert core.registry.find_thing(f"hub-{name}") is None


def test_two_hubs_sending_one_new_serial_at_once_onboard_one(core: LocalIotCore, tmp_path: Path) -> None:
    # The recipe's default hook, hosted in-process: its verdict and the registration run in one step on
    # the event loop, so the second request sees the first one's ACTIVE certificate.
    name = f"Race{next(_counter)}"
    setup = set_up_fleet_provisioning(core.client(), name)
    creds = write_credentials(
        tmp_path, "claim", setup.certificate_id, setup.certificate_pem, setup.private_key_pem
    )
    hubs = [connect_claim(core, creds, f"race-{i}") for i in range(2)]
    try:
        topic = register_topic(name)
        bodies = [
            json.dumps(
                {
                    "certificateOwnershipToken": _issue(hub)["certificateOwnershipToken"],
                    "parameters": {"SerialNumber": name},
                }
            ).encode()
            for hub in hubs
        ]
        for hub in hubs:
            assert hub.subscribe(f"{topic}/accepted", f"{topic}/rejected") == [1, 1]
        for hub, body in zip(hubs, bodies, strict=True):
            assert hub.publish(topic, body) == 0
        outcomes = sorted(hub.receive_type(mqtt5.PublishPacket).topic.rsplit("/", 1)[1] for hub in hubs)
    finally:
        for hub in hubs:
            hub.close()
    assert outcomes == ["accepted", "rejected"]
    principals = core.registry.list_thing_principals(f"hub-{name}")
    assert len(principals) == 1
