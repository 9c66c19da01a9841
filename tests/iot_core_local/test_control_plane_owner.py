"""The control plane has an owner (issue 11, point 11): `--api-host` apart from MQTT's `--host`, SigV4
signatures with the data dir's key pair wherever the API is bound off loopback, and a fault switch that
exists only when enabled.

The rule goes by the address the control plane is bound to, not by where a request comes from: bound to
0.0.0.0, a request through 127.0.0.1 must be signed too (anyone on the network could send the same).
The signed requests come from boto3 and from the AWS CLI (`awscli`, in the [dev] extra) run as README
shows it, with `AWS_SHARED_CREDENTIALS_FILE` naming the data dir's key pair.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from iot_core_local.addresses import is_loopback
from iot_core_local.ca import CertificateAuthority
from iot_core_local.control_plane import ControlPlane
from iot_core_local.control_plane.restjson import RestJsonService
from iot_core_local.control_plane.signature import verify
from iot_core_local.credentials import AccessKey, read_access_key
from iot_core_local.errors import (
    InvalidSignature,
    MissingAuthenticationToken,
    ServerError,
    UnrecognizedClient,
)
from iot_core_local.quotas import Quotas, RateLimiter
from iot_core_local.registry import Registry
from iot_core_local.server import Endpoint, LocalIotCore
from tests._support.fake_cloud import FakeClock

_ONCE = botocore.config.Config(retries={"total_max_attempts": 1})


def boto3_client(url: str, key_id: str, secret: str, region: str = "us-east-1") -> Any:
    return boto3.client(
        "iot",
        endpoint_url=url,
        region_name=region,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        config=_ONCE,
    )


def via_loopback(core: LocalIotCore) -> str:
    """The API URL of a server bound to 0.0.0.0, reached through 127.0.0.1."""
    return f"http://127.0.0.1:{core.endpoint.api_url.rsplit(':', 1)[1]}"


def raw(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, dict(e.headers), json.loads(e.read())


@pytest.fixture(scope="module")
def open_core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalIotCore]:
    """The API bound to every address (MQTT stays on loopback)."""
    with LocalIotCore(tmp_path_factory.mktemp("owner") / "data", api_host="0.0.0.0") as core:
        yield core


def test_the_key_pair_file(open_core: LocalIotCore) -> None:
    path = open_core.endpoint.credentials_path
    assert path == (open_core.data_dir / "credentials").resolve()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = read_access_key(path)
    assert key.access_key_id.startswith("AKIA")
    assert len(key.access_key_id) == 20
    assert len(key.secret_access_key) == 40
    assert key.secret_access_key not in repr(key)
    assert json.loads((open_core.data_dir / "endpoint.json").read_text())["credentialsFile"] == str(path)
    assert key.secret_access_key not in (open_core.data_dir / "endpoint.json").read_text()


def test_signed_with_the_written_pair_works(open_core: LocalIotCore) -> None:
    assert open_core.signatures_required
    key = read_access_key(open_core.endpoint.credentials_path)  # type: ignore[arg-type]
    iot = boto3_client(via_loopback(open_core), key.access_key_id, key.secret_access_key)
    iot.create_thing(thingName="owned", attributePayload={"attributes": {"by": "owner"}})
    assert iot.describe_thing(thingName="owned")["attributes"] == {"by": "owner"}  # a GET, a query-less path
    assert [t["thingName"] for t in iot.list_things(maxResults=5)["things"]] == ["owned"]  # a query string
    assert open_core.client().describe_thing(thingName="owned")["thingName"] == "owned"


def test_the_shared_credentials_file_works_as_the_aws_cli_reads_it(
    open_core: LocalIotCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(open_core.endpoint.credentials_path))
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    session = boto3.session.Session(region_name="us-east-1")
    iot = session.client("iot", endpoint_url=via_loopback(open_core), config=_ONCE)
    assert "endpointAddress" in iot.describe_endpoint(endpointType="iot:Data-ATS")


def test_another_secret_or_key_is_refused_403(open_core: LocalIotCore) -> None:
    key = read_access_key(open_core.endpoint.credentials_path)  # type: ignore[arg-type]
    url = via_loopback(open_core)
    for key_id, secret, code in (
        (key.access_key_id, "not-the-secret", "InvalidSignatureException"),
        ("AKIAOTHER0000000000", key.secret_access_key, "UnrecognizedClientException"),
    ):
        with pytest.raises(ClientError) as caught:
            boto3_client(url, key_id, secret).list_things()
        response = caught.value.response
        assert (response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Code"]) == (403, code)
        assert key.secret_access_key not in str(response)


def test_unsigned_requests_are_refused_403(open_core: LocalIotCore) -> None:
    url = via_loopback(open_core)
    status, headers, body = raw(url + "/things")
    assert (status, headers["x-amzn-ErrorType"]) == (403, "MissingAuthenticationTokenException")
    assert body == {"message": "Missing Authentication Token"}
    # The fault switch is behind the same rule (and off here besides).
    assert raw(url + "/_local/faults")[0] == 403


def test_a_body_changed_after_signing_is_refused(open_core: LocalIotCore) -> None:
    key = read_access_key(open_core.endpoint.credentials_path)  # type: ignore[arg-type]
    url = via_loopback(open_core) + "/policies/tampered"
    signed = AWSRequest(method="POST", url=url, data=b'{"policyDocument": "{}"}')
    signed.headers["Content-Type"] = "application/json"
    SigV4Auth(Credentials(key.access_key_id, key.secret_access_key), "iot", "us-east-1").add_auth(signed)

    def send(body: bytes) -> tuple[int, str]:
        request = urllib.request.Request(url, data=body, headers=dict(signed.headers.items()), method="POST")
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=5)
        with caught.value as error:
            return error.code, error.headers["x-amzn-ErrorType"]

    # As signed, it reaches CreatePolicy (which refuses the empty document); changed, it does not.
    assert send(b'{"policyDocument": "{}"}') == (400, "MalformedPolicyException")
    assert send(b'{"policyDocument": "[]"}') == (403, "InvalidSignatureException")


def _send_raw(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str | None, bytes]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, None, response.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers["x-amzn-ErrorType"], e.read()


def test_the_signature_covers_the_body_whatever_x_amz_content_sha256_says(open_core: LocalIotCore) -> None:
    """A captured request replayed with another body and the original body's hash in an unsigned
    X-Amz-Content-SHA256 header is refused (the server hashes the body itself), as is UNSIGNED-PAYLOAD."""
    key = read_access_key(open_core.endpoint.credentials_path)  # type: ignore[arg-type]
    credentials = Credentials(key.access_key_id, key.secret_access_key)
    url = via_loopback(open_core) + "/policies/captured"
    benign = json.dumps({"policyDocument": json.dumps({"Statement": [{"Effect": "Allow"}]})}).encode()
    evil = json.dumps(
        {
            "policyDocument": json.dumps(
                {"Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]}
            )
        }
    ).encode()
    captured = AWSRequest(method="POST", url=url, data=benign, headers={"Content-Type": "application/json"})
    SigV4Auth(credentials, "iot", "us-east-1").add_auth(captured)
    headers = dict(captured.headers.items())
    assert "x-amz-content-sha256" not in headers["Authorization"]

    status, error, _ = _send_raw(
        url, evil, {**headers, "X-Amz-Content-SHA256": hashlib.sha256(benign).hexdigest()}
    )
    assert (status, error) == (403, "InvalidSignatureException")

    # Signed as UNSIGNED-PAYLOAD (S3's way): refused, any body.
    unsigned = AWSRequest(
        method="POST",
        url=url,
        data=evil,
        headers={"Content-Type": "application/json", "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"},
    )
    SigV4Auth(credentials, "iot", "us-east-1").add_auth(unsigned)
    assert "x-amz-content-sha256" in unsigned.headers["Authorization"]
    status, error, body = _send_raw(url, evil, dict(unsigned.headers.items()))
    assert (status, error) == (403, "InvalidSignatureException")
    assert b"UNSIGNED-PAYLOAD" in body

    # Signed with the body's true hash in the header: accepted (what S3-style signers send).
    honest = AWSRequest(
        method="POST",
        url=url,
        data=benign,
        headers={
            "Content-Type": "application/json",
            "X-Amz-Content-SHA256": hashlib.sha256(benign).hexdigest(),
        },
    )
    SigV4Auth(credentials, "iot", "us-east-1").add_auth(honest)
    # (the policy document lacks a Version: CreatePolicy itself refuses it, past the signature)
    assert _send_raw(url, benign, dict(honest.headers.items()))[:2] != (403, "InvalidSignatureException")
    assert _send_raw(url, evil, dict(honest.headers.items()))[:2] == (403, "InvalidSignatureException")
    with pytest.raises(ClientError):
        open_core.client().get_policy(policyName="captured")


def test_mqtt_stays_on_its_own_host(open_core: LocalIotCore) -> None:
    assert open_core.endpoint.mqtt_host == "127.0.0.1"
    # Listening everywhere, it tells clients an address they can connect to, never 0.0.0.0.
    assert open_core.endpoint.api_url.startswith("http://127.0.0.1:")


# ---- loopback -------------------------------------------------------------------------------------


def test_loopback_checks_nothing_unless_told_to(tmp_path: Path) -> None:
    with LocalIotCore(tmp_path / "plain") as core:
        assert not core.signatures_required
        assert boto3_client(core.endpoint.api_url, "any", "thing").list_things()["things"] == []
    with LocalIotCore(tmp_path / "strict", require_signature=True) as core:
        assert core.signatures_required
        assert raw(core.endpoint.api_url + "/things")[0] == 403
        with pytest.raises(ClientError) as caught:
            boto3_client(core.endpoint.api_url, "any", "thing").list_things()
        assert caught.value.response["Error"]["Code"] == "UnrecognizedClientException"
        assert core.client().list_things()["things"] == []  # signed with the data dir's pair


def test_the_key_pair_is_kept_across_restarts_and_a_loose_file_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with LocalIotCore(data):
        first = read_access_key(data / "credentials")
    with LocalIotCore(data):
        assert read_access_key(data / "credentials") == first
    (data / "credentials").chmod(0o644)
    with pytest.raises(ServerError, match="chmod 600"):
        LocalIotCore(data).start()
    (data / "credentials").write_text("[other]\naws_access_key_id = A\n")
    (data / "credentials").chmod(0o600)
    with pytest.raises(ServerError, match=r"not a credentials file with a \[default\] key pair"):
        LocalIotCore(data).start()
    (data / "credentials").unlink()
    target = tmp_path / "elsewhere"
    target.write_text("kept")
    (data / "credentials").symlink_to(target)
    with pytest.raises(ServerError, match="symbolic link"):
        LocalIotCore(data).start()
    assert target.read_text() == "kept"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("hub.example", False),
    ],
)
def test_what_counts_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# ---- the verifier on its own: dates, malformed headers ---------------------------------------------


def _signed(
    key: AccessKey, when: datetime.datetime, *, region: str = "us-east-1", service: str = "iot"
) -> AWSRequest:
    request = AWSRequest(method="GET", url="http://api.test:8080/things?maxResults=5", data=b"")
    signer = SigV4Auth(Credentials(key.access_key_id, key.secret_access_key), service, region)
    request.context["timestamp"] = when.strftime("%Y%m%dT%H%M%SZ")
    request.headers["X-Amz-Date"] = request.context["timestamp"]
    request.headers["Host"] = "api.test:8080"
    canonical = signer.canonical_request(request)
    signature = signer.signature(signer.string_to_sign(request, canonical), request)
    signed_headers = signer.signed_headers(signer.headers_to_sign(request))
    request.headers["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={signer.scope(request)}, SignedHeaders={signed_headers}, "
        f"Signature={signature}"
    )
    return request


def test_signatures_more_than_5_minutes_off_are_refused() -> None:
    key = AccessKey.generate()
    signed_at = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    request = _signed(key, signed_at)
    headers = list(request.headers.items())
    target = "/things?maxResults=5"
    at = signed_at.timestamp()
    assert verify(key, "GET", target, headers, b"", now=at + 5 * 60) == "iot"
    assert verify(key, "GET", target, headers, b"", now=at - 5 * 60) == "iot"
    with pytest.raises(InvalidSignature, match="Signature expired: 20260102T030405Z is now earlier than"):
        verify(key, "GET", target, headers, b"", now=at + 5 * 60 + 1)
    with pytest.raises(InvalidSignature, match="Signature not yet current: 20260102T030405Z"):
        verify(key, "GET", target, headers, b"", now=at - 5 * 60 - 1)
    with pytest.raises(InvalidSignature, match="does not match"):
        verify(key, "GET", "/things?maxResults=6", headers, b"", now=at)


def test_the_credential_scope_must_name_this_region_and_a_hosted_service() -> None:
    key = AccessKey.generate()
    signed_at = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    at = signed_at.timestamp()
    target = "/things?maxResults=5"
    hosted = {"iot", "iotmanagedintegrations"}
    good = list(_signed(key, signed_at).headers.items())
    assert verify(key, "GET", target, good, b"", now=at, region="us-east-1", services=hosted) == "iot"
    for region, service, message in (
        ("eu-west-1", "iot", "Credential should be scoped to a valid region"),
        ("us-east-1", "s3", "Credential should be scoped to correct service"),
        ("us-east-1", "..%2Fx", "Credential should be scoped to correct service"),
    ):
        headers = list(_signed(key, signed_at, region=region, service=service).headers.items())
        with pytest.raises(InvalidSignature, match=message):
            verify(key, "GET", target, headers, b"", now=at, region="us-east-1", services=hosted)


def test_a_scope_of_another_region_is_refused_by_the_server(open_core: LocalIotCore) -> None:
    key = read_access_key(open_core.endpoint.credentials_path)  # type: ignore[arg-type]
    iot = boto3_client(via_loopback(open_core), key.access_key_id, key.secret_access_key, "eu-west-1")
    with pytest.raises(ClientError) as caught:
        iot.list_things()
    response = caught.value.response
    assert (response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Code"]) == (
        403,
        "InvalidSignatureException",
    )
    assert "Credential should be scoped to a valid region" in response["Error"]["Message"]


@pytest.mark.parametrize(
    ("authorization", "error"),
    [
        (None, MissingAuthenticationToken),
        ("Bearer abc", InvalidSignature),
        (
            "AWS4-HMAC-SHA256 Credential=AKIA/20260102/us-east-1/iot/aws4_request, SignedHeaders=host, "
            "Signature=" + "0" * 64,
            UnrecognizedClient,
        ),
    ],
)
def test_malformed_or_foreign_authorization(authorization: str | None, error: type[Exception]) -> None:
    headers = [("Host", "api.test"), ("X-Amz-Date", "20260102T030405Z")]
    if authorization is not None:
        headers.append(("Authorization", authorization))
    with pytest.raises(error):
        verify(AccessKey.generate(), "GET", "/things", headers, b"", now=1767322800.0)


# ---- the fault switch exists only when enabled ------------------------------------------------------


def test_the_fault_switch_is_off_unless_enabled(tmp_path: Path) -> None:
    with LocalIotCore(tmp_path / "off") as core:
        status, _, body = raw(core.endpoint.api_url + "/_local/faults")
        assert status == 404
        assert "No such local endpoint" in body["message"]
        assert raw(core.endpoint.api_url + "/_local/faults", "POST", b'{"kind": "drop"}')[0] == 404
        assert not core.faults.armed
        core.faults.add("throttle", "RegisterThing")  # the Python API arms faults regardless
        assert core.faults.armed
    with LocalIotCore(tmp_path / "on", faults_enabled=True) as core:
        status, _, body = raw(core.endpoint.api_url + "/_local/faults", "POST", b'{"kind": "drop"}')
        assert status == 200
        assert body["faults"][0]["kind"] == "drop"


def test_cli_fault_needs_faults(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "iot_core_local", "serve", "--data-dir", str(tmp_path / "d")]
    refused = subprocess.run(
        [*command, "--fault", "throttle:RegisterThing"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2
    assert "--fault arms the fault switch, which is off: add --faults" in refused.stderr
    assert not (tmp_path / "d").exists()  # nothing written for a usage error
    both = subprocess.run(
        [*command, "--quota", "fleet:RegisterThing=5", "--no-quotas"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert both.returncode == 2
    assert "choose one" in both.stderr
    bad = subprocess.run(
        [*command, "--quota", "fleet:RegisterThing=0"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2
    assert "positive number" in bad.stderr


# ---- serve --api-host, and the AWS CLI as README shows it -------------------------------------------


def test_serve_api_host_and_the_aws_cli(tmp_path: Path) -> None:
    data = tmp_path / "data"
    command = [sys.executable, "-m", "iot_core_local", "serve", "--data-dir", str(data)]
    with subprocess.Popen(
        [*command, "--api-host", "0.0.0.0", "--api-port", "0", "--mqtt-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            printed = json.loads(proc.stdout.readline())
            credentials = Path(printed["credentialsFile"])
            assert credentials == (data / "credentials").resolve()
            assert printed["mqttHost"] == "127.0.0.1"  # --host untouched
            port = printed["apiUrl"].rsplit(":", 1)[1]
            url = f"http://127.0.0.1:{port}"
            assert raw(url + "/things")[0] == 403

            env = {
                "PATH": os.environ.get("PATH", ""),
                "HOME": str(tmp_path),
                "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
                "AWS_CONFIG_FILE": os.devnull,
                "AWS_DEFAULT_REGION": "us-east-1",
            }
            aws = [str(Path(sys.executable).parent / "aws"), "--endpoint-url", url, "iot"]
            made = subprocess.run(
                [*aws, "create-thing", "--thing-name", "by-cli"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert made.returncode == 0, made.stderr
            listed = subprocess.run(
                [*aws, "list-things"], env=env, capture_output=True, text=True, timeout=60
            )
            assert [t["thingName"] for t in json.loads(listed.stdout)["things"]] == ["by-cli"]

            forged = tmp_path / "forged"
            key = read_access_key(credentials)
            forged.write_text(AccessKey(key.access_key_id, "x" * 40).to_file().decode())
            refused = subprocess.run(
                [*aws, "list-things"],
                env={**env, "AWS_SHARED_CREDENTIALS_FILE": str(forged)},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert refused.returncode != 0
            assert "InvalidSignatureException" in refused.stderr
        finally:
            proc.send_signal(2)  # SIGINT: a clean stop
            _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert str(credentials) in stderr  # named in its output...
    assert key.secret_access_key not in stderr + json.dumps(printed)  # ...never its secret
    assert "signatures required" in stderr


# ---- every hosted service, not only AWS IoT -----------------------------------------------------------


def test_signatures_and_quotas_apply_to_every_hosted_service(
    cp_registry: Registry, cp_ca: CertificateAuthority
) -> None:
    """A second rest-json service (here botocore's `iot-data`, signed as `iotdata`) hosted beside AWS IoT
    gets the same owner and the same quotas, by its own signing name."""
    import botocore.session

    second = RestJsonService(
        botocore.session.get_session().get_service_model("iot-data"),
        {"ListRetainedMessages": lambda context, params: {"retainedTopics": []}},
    )
    key = AccessKey.generate()
    clock = FakeClock()
    limiter = RateLimiter(Quotas({"iotdata:*": 1.0}), clock.now)
    plane = ControlPlane(cp_registry, cp_ca, access_key=key, require_signature=True, limiter=limiter)
    plane.host_service(second, None)
    with plane:

        def data_client(secret: str) -> Any:
            return boto3.client(
                "iot-data",
                endpoint_url=plane.url,
                region_name="us-east-1",
                aws_access_key_id=key.access_key_id,
                aws_secret_access_key=secret,
                config=_ONCE,
            )

        assert data_client(key.secret_access_key).list_retained_messages()["retainedTopics"] == []
        with pytest.raises(ClientError) as throttled:
            data_client(key.secret_access_key).list_retained_messages()
        assert throttled.value.response["Error"]["Code"] == "ThrottlingException"
        with pytest.raises(ClientError) as forged:
            data_client("forged").list_retained_messages()
        assert forged.value.response["Error"]["Code"] == "InvalidSignatureException"
        assert raw(plane.url + "/retainedMessage")[0] == 403
        clock.advance(1.0)
        assert data_client(key.secret_access_key).list_retained_messages()["retainedTopics"] == []
        # AWS IoT beside it: the same key pair, its own buckets (no rate given for iot here).
        iot = boto3_client(plane.url, key.access_key_id, key.secret_access_key)
        assert all(iot.list_things()["things"] == [] for _ in range(3))


def test_the_endpoint_s_client_signs_for_the_server_s_region(tmp_path: Path) -> None:
    """A stand-in of another region: the client the endpoint (file) gives is scoped to it, so it passes the
    region check that a checked signature gets."""
    with LocalIotCore(tmp_path / "data", region="eu-west-1", require_signature=True) as core:
        again = Endpoint.from_json(json.loads((core.data_dir / "endpoint.json").read_text()))
        assert again.region == "eu-west-1"
        assert again.client().list_things()["things"] == []


@pytest.mark.parametrize("extra_first", [False, True])
def test_two_authorization_headers_are_refused(open_core: LocalIotCore, extra_first: bool) -> None:
    """A valid signature plus a second Authorization header: which one counts is never guessed."""
    import http.client
    import urllib.parse

    key = read_access_key(open_core.endpoint.credentials_path)  # type: ignore[arg-type]
    url = via_loopback(open_core) + "/things"
    signed = AWSRequest(method="GET", url=url)
    SigV4Auth(Credentials(key.access_key_id, key.secret_access_key), "iot", "us-east-1").add_auth(signed)
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=5)
    try:
        connection.putrequest("GET", parts.path, skip_host=True, skip_accept_encoding=True)
        headers = list(signed.headers.items())
        garbage = ("Authorization", "AWS4-HMAC-SHA256 Credential=x/y, SignedHeaders=host, Signature=0")
        for name, value in [garbage, *headers] if extra_first else [*headers, garbage]:
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        assert (response.status, response.getheader("x-amzn-ErrorType")) == (403, "InvalidSignatureException")
        assert "more than one Authorization header" in json.loads(response.read())["message"]
    finally:
        connection.close()
