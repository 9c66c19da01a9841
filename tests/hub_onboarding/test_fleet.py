"""Error mapping and answer validation of the fleet provisioning client (no network)."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub_onboarding import errors
from hub_onboarding.device_provisioner import is_retriable, raise_for_status, status_of
from hub_onboarding.errors import (
    FpStatus,
    IdentityError,
    MqttConnectionError,
    PublishTimeoutError,
    SubscribeTimeoutError,
)
from hub_onboarding.fleet import (
    IssuedCertificate,
    RegisteredThing,
    map_request_error,
    validate_issued,
    validate_registered,
)
from tests._support.certificates import make_pair, write_private
from tests._support.fake_cloud import FakeCloud


@dataclass
class V2ErrorResponse:  # the shape of awsiot.iotidentity.V2ErrorResponse
    status_code: Any = None
    error_code: Any = None
    error_message: Any = None


class V2ServiceException(Exception):  # the shape of awsiot.V2ServiceException
    def __init__(self, message: str, inner_error: Exception | None, modeled_error: Any) -> None:
        super().__init__(message)
        self.message = message
        self.inner_error = inner_error
        self.modeled_error = modeled_error


class AwsCrtError(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def test_the_real_sdk_types_have_the_shape_we_map() -> None:
    from awsiot import V2ServiceException as Real
    from awsiot.iotidentity import V2ErrorResponse as RealError

    modeled = RealError.from_payload(
        {"statusCode": 400, "errorCode": "InvalidParameters", "errorMessage": "Missing SerialNumber"}
    )
    exc = map_request_error(Real("register_thing failure", None, modeled), "RegisterThing", 30)
    assert isinstance(exc, IdentityError)
    assert (exc.status_code, exc.error_code, exc.error_message) == (
        400,
        "InvalidParameters",
        "Missing SerialNumber",
    )


@pytest.mark.parametrize(
    ("status", "code", "message", "hint", "retriable"),
    [
        (
            400,
            "InvalidCertificateOwnershipToken",
            "Certificate ownership token cannot be empty",
            "token",
            False,
        ),
        (400, "InvalidParameters", "bad", "check the provisioning template", False),
        (403, "AccessDenied", "hook said no", "pre-provisioning hook", False),
        (404, "ResourceNotFoundException", "no such template", "fp_template_name", False),
        (429, "Throttling", "slow down", "throttling", True),
        (400, "ThrottlingException", "Rate exceeded", "throttling", True),
        (500, "InternalFailure", "oops", "check", True),
    ],
)
def test_rejection_keeps_the_service_words(
    status: int, code: str, message: str, hint: str, retriable: bool
) -> None:
    exc = map_request_error(
        V2ServiceException("x", None, V2ErrorResponse(status, code, message)), "RegisterThing", 30
    )
    assert isinstance(exc, IdentityError)
    assert exc.status is FpStatus.FP_STATUS_IDENTITY_ERROR
    assert (exc.status_code, exc.error_code, exc.error_message) == (status, code, message)
    assert code in exc.message
    assert message in exc.message
    assert hint in exc.message
    assert exc.retriable is retriable
    assert exc.exit_code == 12
    assert exc.to_dict()["error_code"] == code


@pytest.mark.parametrize(
    ("crt_name", "cls"),
    [
        ("AWS_ERROR_MQTT_REQUEST_RESPONSE_SUBSCRIBE_FAILURE", SubscribeTimeoutError),
        ("AWS_ERROR_MQTT_REQUEST_RESPONSE_TIMEOUT", PublishTimeoutError),
        ("AWS_ERROR_MQTT_REQUEST_RESPONSE_PUBLISH_FAILURE", PublishTimeoutError),
        ("AWS_ERROR_MQTT_REQUEST_RESPONSE_CLIENT_SHUT_DOWN", MqttConnectionError),
        ("AWS_ERROR_MQTT5_OPERATION_FAILED_DUE_TO_OFFLINE_QUEUE_POLICY", MqttConnectionError),
        ("AWS_IO_SOCKET_CLOSED", MqttConnectionError),
    ],
)
def test_crt_errors_map_to_status_codes(crt_name: str, cls: type[errors.ProvisioningError]) -> None:
    exc = map_request_error(
        V2ServiceException("x", AwsCrtError(crt_name), None), "CreateKeysAndCertificate", 30
    )
    assert type(exc) is cls
    # a refused SUBSCRIBE or PUBLISH is an authorization answer: final; everything else may pass on retry
    assert exc.retriable is (
        crt_name
        not in (
            "AWS_ERROR_MQTT_REQUEST_RESPONSE_SUBSCRIBE_FAILURE",
            "AWS_ERROR_MQTT_REQUEST_RESPONSE_PUBLISH_FAILURE",
        )
    )
    assert is_retriable(exc) is exc.retriable


@pytest.mark.parametrize(
    ("operation", "topics"),
    [
        ("RegisterThing", "$aws/provisioning-templates/HubTemplate/provision/json/accepted and /rejected"),
        ("CreateKeysAndCertificate", "$aws/certificates/create/json/accepted and /rejected"),
        ("CreateCertificateFromCsr", "$aws/certificates/create-from-csr/json/accepted and /rejected"),
    ],
)
def test_a_refused_subscription_names_the_template_and_what_to_check(operation: str, topics: str) -> None:
    failure = V2ServiceException("x", AwsCrtError("AWS_ERROR_MQTT_REQUEST_RESPONSE_SUBSCRIBE_FAILURE"), None)
    exc = map_request_error(failure, operation, 30, "HubTemplate")
    assert type(exc) is SubscribeTimeoutError
    assert exc.retriable is False
    assert f"{operation}: the endpoint refused the subscription to {topics}" in exc.message
    assert "(template 'HubTemplate', fp_template_name)" in exc.message
    assert "check that this template exists in the account and region" in exc.message
    assert (
        "allows iot:Subscribe and iot:Receive on $aws/provisioning-templates/HubTemplate/provision/json/*"
        in (exc.message)
    )


def test_our_own_deadline_is_a_publish_timeout() -> None:
    exc = map_request_error(concurrent.futures.TimeoutError(), "RegisterThing", 12)
    assert isinstance(exc, PublishTimeoutError)
    assert "12 s" in exc.message


def test_undecodable_answer_is_an_identity_error_without_the_payload() -> None:
    secret = '{"privateKey": "-----BEGIN RSA PRIVATE KEY-----SECRET'
    try:
        json.loads(secret)
    except json.JSONDecodeError as decode_error:
        exc = map_request_error(V2ServiceException("x", decode_error, None), "CreateKeysAndCertificate", 30)
    assert isinstance(exc, IdentityError)
    assert not exc.retriable
    assert "SECRET" not in exc.message


def test_status_translation_table() -> None:
    raise_for_status(FpStatus.FP_STATUS_OK)
    for status, cls in [
        (FpStatus.FP_STATUS_MQTT_CONNECTION_ERROR, MqttConnectionError),
        (FpStatus.FP_STATUS_IDENTITY_ERROR, IdentityError),
        (FpStatus.FP_STATUS_SUBSCRIBE_TIMEOUT_ERROR, SubscribeTimeoutError),
        (FpStatus.FP_STATUS_PUBLISH_TIMEOUT_ERROR, PublishTimeoutError),
    ]:
        with pytest.raises(cls) as info:
            raise_for_status(status, "detail")
        assert status_of(info.value) is status
    assert status_of(None) is FpStatus.FP_STATUS_OK
    assert errors.FP_STATUS_OK == 0


def test_exit_codes_are_distinct() -> None:
    classes: list[type[errors.OnboardingError]] = [
        errors.OnboardingError,
        errors.ConfigError,
        errors.CredentialError,
        errors.StorageError,
        errors.BusyError,
        errors.ProvisioningError,
        MqttConnectionError,
        IdentityError,
        SubscribeTimeoutError,
        PublishTimeoutError,
    ]
    codes = [c.exit_code for c in classes]
    assert len(set(codes)) == len(codes)
    assert not {0, 2} & set(codes)


def test_retriable_policy() -> None:
    assert is_retriable(MqttConnectionError("x"))
    assert not is_retriable(IdentityError.from_rejection("RegisterThing", 400, "InvalidParameters", "x"))
    assert not is_retriable(errors.ConfigError("x"))


class Resp:
    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


def test_validate_issued_good_answer() -> None:
    pair = make_pair("new")
    issued = validate_issued(
        "CreateKeysAndCertificate",
        Resp(
            certificate_id="abc",
            certificate_pem=pair.cert_pem.decode(),
            private_key=pair.key_pem.decode(),
            certificate_ownership_token="TOKEN-123",
        ),
    )
    assert issued.ownership_token == "TOKEN-123"
    assert "TOKEN-123" not in repr(issued)
    assert issued.certificate_id == issued.credentials.certificate_id


def test_validate_issued_csr_answer_must_match_our_key() -> None:
    ours, other = make_pair(), make_pair()
    with pytest.raises(IdentityError, match="does not belong"):
        validate_issued(
            "CreateCertificateFromCsr",
            Resp(
                certificate_id="x", certificate_pem=other.cert_pem.decode(), certificate_ownership_token="t"
            ),
            ours.key_pem,
        )


junk = st.one_of(
    st.none(),
    st.integers(),
    st.floats(allow_nan=True),
    st.booleans(),
    st.text(max_size=50),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.just("-----BEGIN CERTIFICATE-----\n" + "A" * 70_000),
    st.binary(max_size=20),
)


@settings(max_examples=150, deadline=None)
@given(cert=junk, key=junk, token=junk, cert_id=junk)
def test_malformed_issued_answers_are_identity_errors(cert: Any, key: Any, token: Any, cert_id: Any) -> None:
    with pytest.raises(IdentityError) as info:
        validate_issued(
            "CreateKeysAndCertificate",
            Resp(
                certificate_pem=cert,
                private_key=key,
                certificate_ownership_token=token,
                certificate_id=cert_id,
            ),
        )
    assert not info.value.retriable


@settings(max_examples=150, deadline=None)
@given(thing=junk, config=st.one_of(junk, st.dictionaries(st.text(max_size=5), junk, max_size=3)))
def test_malformed_register_answers_never_crash(thing: Any, config: Any) -> None:
    try:
        registered = validate_registered(Resp(thing_name=thing, device_configuration=config))
    except IdentityError:
        return
    assert isinstance(registered.thing_name, str)
    assert registered.thing_name.strip()
    assert all(isinstance(v, str) for v in registered.device_configuration.values())


@settings(max_examples=200, deadline=None)
@given(status=junk, code=junk, message=st.one_of(junk, st.text(min_size=600, max_size=2000)))
def test_malformed_rejections_are_identity_errors(status: Any, code: Any, message: Any) -> None:
    exc = map_request_error(
        V2ServiceException("x", None, V2ErrorResponse(status, code, message)), "RegisterThing", 30
    )
    assert isinstance(exc, IdentityError)
    assert exc.status_code is None or isinstance(exc.status_code, int)
    assert exc.error_message is None or len(exc.error_message) <= 515
    assert "\n" not in exc.message.replace("\\n", "")
    json.dumps(exc.to_dict())


# ----------------------------------------------------------------------------------------------------------
# The same malformed answers through the whole flow (HubOnboarding, CertHandler, progress record, config):
# a typed IdentityError every time, and nothing half-written: the config is byte for byte what it was, and
# the credentials folder holds either nothing or a complete, matching, resumable pair.


def _flow_hub(folder: Any) -> Any:
    from pathlib import Path

    hub_dir = Path(folder)
    ca = make_pair("Test Root CA")
    claim = make_pair("claim", issuer=ca)
    (hub_dir / "ca.pem").write_bytes(ca.cert_pem)
    (hub_dir / "claim.crt").write_bytes(claim.cert_pem)
    write_private(hub_dir / "claim.key", claim.key_pem)
    ro = {
        "iot_provisioning_method": "FLEET_PROVISIONING",
        "iot_claim_cert_path": str(hub_dir / "claim.crt"),
        "iot_claim_pk_path": str(hub_dir / "claim.key"),
        "fp_template_name": "HubTemplate",
        "fp_certificate_method": "CreateKeysAndCertificate",
        "endpoint_url": "iot.example.com",
        "iot_root_ca_path": str(hub_dir / "ca.pem"),
        "SN": "SN-1",
        "UPC": "0123",
        "vendor": [1],
    }
    config = hub_dir / "iotmi_config.json"
    config.write_text(json.dumps({"ro": ro, "rw": {"iot_provisioning_state": "NOT_PROVISIONED"}}))
    return config


def _run_flow(config: Any, fleet: _JunkFleet) -> Exception | None:
    """Onboard `config` with `fleet` answering the claim session's requests; what came out, if anything."""
    try:
        FakeCloud(make_pair("ca"), fleet=fleet).onboarding(config).process_device()
    except Exception as exc:  # the property: only IdentityError may come out
        return exc
    return None


def _issued() -> Resp:
    """A valid CreateKeysAndCertificate answer."""
    good = make_pair("issued")
    return Resp(
        certificate_pem=good.cert_pem.decode(),
        private_key=good.key_pem.decode(),
        certificate_ownership_token="TOKEN-1",
        certificate_id="x",
    )


class _JunkFleet:
    def __init__(self, issued: Any = None, registered: Any = None) -> None:
        self.issued, self.registered = issued, registered

    def create_keys_and_certificate(self) -> IssuedCertificate:
        return validate_issued("CreateKeysAndCertificate", self.issued)

    def create_certificate_from_csr(self, csr_pem: bytes, private_key_pem: bytes) -> IssuedCertificate:
        return validate_issued("CreateCertificateFromCsr", self.issued, private_key_pem)

    def register_thing(
        self, template_name: str, ownership_token: str, parameters: Mapping[str, str]
    ) -> RegisteredThing:
        return validate_registered(self.registered)


@settings(max_examples=60, deadline=None)
@given(cert=junk, key=junk, token=junk, cert_id=junk)
def test_malformed_issued_answers_through_the_flow_write_nothing(
    cert: Any, key: Any, token: Any, cert_id: Any
) -> None:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        config = _flow_hub(folder)
        before = config.read_bytes()
        error = _run_flow(
            config,
            _JunkFleet(
                issued=Resp(
                    certificate_pem=cert,
                    private_key=key,
                    certificate_ownership_token=token,
                    certificate_id=cert_id,
                )
            ),
        )
        assert isinstance(error, IdentityError), repr(error)
        assert config.read_bytes() == before
        certs = Path(folder) / "certs"
        assert not certs.exists() or list(certs.iterdir()) == []


@settings(max_examples=60, deadline=None)
@given(thing=junk, config_value=st.one_of(junk, st.dictionaries(st.text(max_size=5), junk, max_size=3)))
def test_malformed_register_answers_through_the_flow_never_half_write(thing: Any, config_value: Any) -> None:
    import tempfile
    from pathlib import Path

    from hub_onboarding.certs import check_pair
    from hub_onboarding.progress import ProgressStore, Step

    issued = _issued()
    with tempfile.TemporaryDirectory() as folder:
        config = _flow_hub(folder)
        before = config.read_bytes()
        error = _run_flow(
            config,
            _JunkFleet(issued=issued, registered=Resp(thing_name=thing, device_configuration=config_value)),
        )
        doc = json.loads(config.read_text())
        certs = Path(folder) / "certs"
        if error is None:
            assert doc["rw"]["iot_provisioning_state"] == "PROVISIONED"
            assert isinstance(doc["rw"]["client_id"], str)
            assert doc["rw"]["client_id"]
            rw = doc["rw"]
            check_pair(
                Path(rw["iot_permanent_cert_path"]).read_bytes(),
                Path(rw["iot_permanent_pk_path"]).read_bytes(),
                "permanent",
                check_validity=False,
            )
        else:
            assert isinstance(error, IdentityError), repr(error)
            assert config.read_bytes() == before
            if error.invalid_identity_answer:  # an identity the hub cannot use: nothing of it is kept
                assert list(certs.iterdir()) == []
                return
            # What is on disk is complete and resumable: the pair matches and the record names it.
            progress = ProgressStore(certs).load()
            assert progress is not None
            assert progress.step is Step.CERTIFICATE_ISSUED
            check_pair(
                (certs / "certificate.pem.crt").read_bytes(),
                (certs / "private.pem.key").read_bytes(),
                "permanent",
                check_validity=False,
            )
            assert not [p for p in certs.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("status", "code", "message", "refused"),
    [
        (400, "InvalidRequest", "Certificate ownership token has already been used", True),  # iot-core-local
        (400, "InvalidCertificateOwnershipToken", "Invalid ownership", True),
        (401, "InvalidCertificateOwnershipToken", None, True),
        (403, "AccessDenied", "ownership token expired", True),
        (404, "ResourceNotFound", "Template HubTemplate not found", False),
        (429, "ThrottlingException", "token bucket empty", False),  # throttling is retried, never a refusal
        (500, "InternalFailure", "token store unavailable", False),
        (None, "InvalidCertificateOwnershipToken", None, False),
    ],
)
def test_token_refusal_is_one_predicate(
    status: int | None, code: str, message: str | None, refused: bool
) -> None:
    exc = IdentityError.from_rejection("RegisterThing", status, code, message)
    assert exc.token_refused is refused
    assert errors.is_token_refusal(status, code, message) is refused
    # the hint the user reads agrees with what the flow does
    assert ("ownership token was refused" in exc.message) is refused


@pytest.mark.parametrize(
    ("status", "code", "hint"),
    [
        (
            404,
            "UnknownSerialNumber",
            "no managed thing is pre-associated with this hub's serial number: check ro.SN",
        ),
        (403, "ProductCodeMismatch", "created with another product code: check ro.UPC"),
        (409, "AlreadyOnboarded", "already onboarded: offboard it (DeleteManagedThing)"),
    ],
)
def test_a_managed_integrations_refusal_gets_the_hint_of_its_error_code(
    status: int, code: str, hint: str
) -> None:
    exc = IdentityError.from_rejection("RegisterThing", status, code, "the service's own words")
    assert hint in exc.message
    # never the status code's generic guess: a 404 here is not a missing template
    assert "fp_template_name" not in exc.message
    assert "check the provisioning template" not in exc.message
    assert exc.retriable is False


def test_jitr_does_not_retry_a_failure_that_cannot_succeed(tmp_path: Any) -> None:
    # Through the real IotProvisioning: awscrt refusing the CA file (retriable False) used to be retried
    # until ro.mqtt_retry_timeout_seconds (5 minutes by default) ran out.
    from hub_onboarding.certs import check_pair
    from hub_onboarding.config import Endpoint
    from hub_onboarding.device_provisioner import Backoff, DeviceProvisioner, Retry
    from hub_onboarding.mqtt import ConnectionSettings, IotProvisioning

    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("not a certificate")
    iot = IotProvisioning(ConnectionSettings(Endpoint("127.0.0.1", 1), str(bad_ca), 60, connect_timeout=1))
    sleeps: list[float] = []
    retries: list[Retry] = []
    dp = DeviceProvisioner(
        iot, operation_timeout=1, retry_timeout=2, backoff=Backoff(rng=lambda: 0.1), sleep=sleeps.append
    )
    pair = make_pair("dha")
    with pytest.raises(MqttConnectionError, match="could not set up the MQTT client") as info:
        dp.provision_jitr(
            "dha", check_pair(pair.cert_pem, pair.key_pem, "DHA", check_validity=False), retries.append
        )
    assert info.value.retriable is False
    assert sleeps == []
    assert retries == []


def test_fp_status_mapping_is_public_and_follows_the_tree() -> None:
    import hub_onboarding
    from hub_onboarding import device_provisioner

    assert {"raise_for_status", "status_of"} <= set(hub_onboarding.__all__)
    assert hub_onboarding.raise_for_status is device_provisioner.raise_for_status
    assert hub_onboarding.status_of is device_provisioner.status_of
    for status in FpStatus:
        if status is FpStatus.FP_STATUS_OK:
            hub_onboarding.raise_for_status(status)  # returns: OK raises nothing
            continue
        with pytest.raises(errors.ProvisioningError) as info:
            hub_onboarding.raise_for_status(status)
        assert type(info.value).status is status  # the class raised is the one the tree names for it
        assert hub_onboarding.status_of(info.value) is status


def test_retry_delays_start_at_the_base_and_double() -> None:
    from hub_onboarding.device_provisioner import Backoff, DeviceProvisioner
    from hub_onboarding.errors import MqttConnectionError

    slept: list[float] = []
    dp = DeviceProvisioner(
        None,  # type: ignore[arg-type]  # the retry policy needs no connection
        operation_timeout=1,
        retry_timeout=1000,
        backoff=Backoff(base=1.0, cap=30.0, rng=lambda: 1.0),  # the top of each jitter window
        clock=lambda: 0.0,
        sleep=slept.append,
    )
    for attempt in range(1, 7):
        dp.wait_before_retry(MqttConnectionError("refused"), attempt, deadline=1000.0)
    assert slept == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0]


# ----------------------------------------------------------------------------------------------------------
# The identity RegisterThing hands the hub: checked before anything of it is stored (issue 9 point 6).


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"ClientId": "a" * 129, "ManagedThingId": "mt-1"}, "'" + "a" * 80 + "'... (129 characters)"),
        ({"ClientId": "é" * 65, "ManagedThingId": "mt-1"}, "128 bytes"),  # 65 characters, 130 bytes
        ({"ClientId": "hub\x00one", "ManagedThingId": "mt-1"}, "'hub\\x00one'"),
        ({"ClientId": "hub\u0085one"}, "'hub\\x85one'"),
        ({"ClientId": "hub\ud800"}, "'hub\\ud800'"),
        ({"ClientId": ""}, "ClientId '', which is empty"),
        ({"ClientId": "hub-1", "ManagedThingId": "mt/1"}, "ManagedThingId 'mt/1'"),
        ({"ClientId": "hub-1", "ManagedThingId": ""}, "ManagedThingId ''"),
        ({"ClientId": "hub-1", "ManagedThingId": "m" * 65}, "ManagedThingId 'mmm"),
        ({"ManagedThingId": "mt 1"}, "ManagedThingId 'mt 1'"),
    ],
)
def test_an_unusable_identity_is_an_identity_error_naming_it(config: dict[str, str], named: str) -> None:
    with pytest.raises(IdentityError) as info:
        validate_registered(Resp(thing_name="hub-1", device_configuration=config))
    error = info.value
    assert named in error.message
    assert error.invalid_identity_answer
    assert not error.retriable
    assert "\n" not in error.message
    assert error.exit_code == 12


@pytest.mark.parametrize(
    "config",
    [
        {"ClientId": "a" * 128, "ManagedThingId": "m" * 64},
        {"ClientId": "hub-SN:1_é", "ManagedThingId": "a:b_c-D9"},
        {},  # neither: the hub falls back to the thing name, as before
    ],
)
def test_a_usable_identity_passes(config: dict[str, str]) -> None:
    assert (
        validate_registered(Resp(thing_name="hub-1", device_configuration=config)).device_configuration
        == config
    )


def test_without_a_client_id_the_thing_name_must_be_one() -> None:
    with pytest.raises(IdentityError, match=r"thingName \(the client id: there is no ClientId\) 'hub\\x1b'"):
        validate_registered(Resp(thing_name="hub\x1b", device_configuration={"ManagedThingId": "mt-1"}))
    # with a ClientId, the thing name is only a name
    registered = validate_registered(Resp(thing_name="hub\x1b", device_configuration={"ClientId": "hub-1"}))
    assert registered.thing_name == "hub\x1b"


def test_a_service_rejection_is_not_an_invalid_identity() -> None:
    rejected = IdentityError.from_rejection("RegisterThing", 400, "InvalidIdentity", "no")
    assert not rejected.invalid_identity_answer


@pytest.mark.parametrize(
    "device_configuration",
    [{"ClientId": "hub\nSN-1", "ManagedThingId": "mt-1"}, {"ClientId": "hub-SN-1", "ManagedThingId": "mt#1"}],
)
def test_an_unusable_identity_through_the_flow_keeps_nothing(
    tmp_path: Any, device_configuration: Any
) -> None:
    issued = _issued()
    config = _flow_hub(tmp_path)
    before = config.read_bytes()
    registered = Resp(thing_name="hub-SN-1", device_configuration=device_configuration)
    error = _run_flow(config, _JunkFleet(issued=issued, registered=registered))
    assert isinstance(error, IdentityError)
    assert error.invalid_identity_answer
    assert config.read_bytes() == before  # rw untouched
    assert list((tmp_path / "certs").iterdir()) == []  # no certificate, key, progress record or manifest


@pytest.mark.parametrize(
    ("status", "code", "key"),
    [
        (403, "AccessDenied", "ro.SN"),
        (404, "ResourceNotFoundException", "ro.fp_template_name"),
        (404, "UnknownSerialNumber", "ro.SN"),
        (403, "ProductCodeMismatch", "ro.UPC"),
        (409, "AlreadyOnboarded", "ro.SN"),
        (400, "InvalidParameters", None),
        (429, "ThrottlingException", None),
    ],
)
def test_a_rejection_names_the_config_key_it_is_about(status: int, code: str, key: str | None) -> None:
    # `--json` gives every other error's key; a refusal at RegisterThing had none.
    exc = map_request_error(
        V2ServiceException("x", None, V2ErrorResponse(status, code, "why")), "RegisterThing", 30
    )
    assert isinstance(exc, IdentityError)
    assert exc.key == key
    assert exc.to_dict().get("key") == key
