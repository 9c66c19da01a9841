"""What a failed connection attempt tells the user to check, and whether it is tried again (pure).

mqtt.describe_connect_failure (awscrt's error), mqtt.describe_probe (the diagnostic handshake's verdict),
and DeviceProvisioner's retry policy for them: the figures of "gave up after", a refused certificate final
for a claim but retried during JITR and the verification connect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from hub_onboarding.certs import Credentials
from hub_onboarding.config import Endpoint
from hub_onboarding.device_provisioner import (
    Backoff,
    DeviceProvisioner,
    format_seconds,
)
from hub_onboarding.errors import CertificateRefusedError, MqttConnectionError
from hub_onboarding.mqtt import ConnectionSettings, describe_connect_failure, describe_probe
from hub_onboarding.tls_probe import ProbeResult, Verdict
from tests._support.fake_cloud import FakeClock

ENDPOINT = Endpoint("iot.example.com", 8883)


@dataclass
class CrtError:
    name: str


@pytest.mark.parametrize("key", ["endpoint_url", "iot_endpoint_url", "sh_endpoint_url"])
@pytest.mark.parametrize(
    "error",
    [
        "AWS_IO_SOCKET_CONNECTION_REFUSED",
        "AWS_IO_SOCKET_TIMEOUT",
        "AWS_IO_DNS_INVALID_NAME",
        "AWS_IO_DNS_QUERY_FAILED",
        "AWS_IO_TLS_NEGOTIATION_TIMEOUT",  # was told the certificate might be revoked
    ],
)
def test_endpoint_hints_name_the_key_the_endpoint_came_from(error: str, key: str) -> None:
    message = describe_connect_failure(CrtError(error), None, ENDPOINT, "hub-1", key)
    assert f"check {key} and" in message
    other_keys = {"endpoint_url", "iot_endpoint_url", "sh_endpoint_url"} - {key}
    assert not any(f"check {other} " in message for other in other_keys)
    assert message.startswith("could not connect to iot.example.com:8883 as 'hub-1' (" + error + ")")


def test_hints_that_are_not_about_the_endpoint_name_no_key() -> None:
    tls = describe_connect_failure(
        CrtError("AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE"), None, ENDPOINT, "hub-1", "iot_endpoint_url"
    )
    assert "iot_root_ca_path" in tls
    assert "endpoint_url" not in tls
    refused = describe_connect_failure(CrtError("whatever"), "NOT_AUTHORIZED", ENDPOINT, "hub-1", "x")
    assert "reason NOT_AUTHORIZED" in refused
    assert "iot:Connect for client id 'hub-1'" in refused


def test_an_unknown_error_is_named_and_blames_the_certificate_or_policy() -> None:
    message = describe_connect_failure(RuntimeError("boom"), None, ENDPOINT, "hub-1")
    assert "(RuntimeError)" in message
    assert "certificate may be unknown, inactive or revoked" in message


# ------------------------------------------------------------------------------ the TLS probe's verdicts


def _settings(root_ca_path: str | None = "/etc/hub/AmazonRootCA1.pem", key: str = "endpoint_url") -> Any:
    return ConnectionSettings(ENDPOINT, root_ca_path, 60, endpoint_key=key)


@pytest.mark.parametrize("root_ca_path", ["/etc/hub/AmazonRootCA1.pem", None])
def test_an_untrusted_endpoint_names_the_ca_setting_and_is_final(root_ca_path: str | None) -> None:
    result = ProbeResult(Verdict.UNTRUSTED, "unable to get local issuer certificate")
    error = describe_probe(result, _settings(root_ca_path), "hub-1")
    assert type(error) is MqttConnectionError
    assert error.retriable is False
    assert "does not chain to" in error.message
    assert "set iot_root_ca_path to the CA of this endpoint" in error.message
    if root_ca_path:
        assert f"iot_root_ca_path ({root_ca_path})" in error.message
    else:
        assert "the system trust store (iot_root_ca_path is not set)" in error.message


@pytest.mark.parametrize("key", ["endpoint_url", "iot_endpoint_url"])
def test_a_port_without_tls_names_the_endpoint_key_used_and_is_final(key: str) -> None:
    error = describe_probe(ProbeResult(Verdict.NOT_TLS, "it answered with HTTP"), _settings(key=key), "h")
    assert error is not None
    assert error.retriable is False
    assert f"it answered with HTTP, so this port does not speak MQTT over TLS: check {key} " in error.message
    host = describe_probe(ProbeResult(Verdict.WRONG_HOST, "Hostname mismatch"), _settings(key=key), "h")
    assert host is not None
    assert host.retriable is False
    assert f"check the host name in {key}" in host.message


def test_a_refused_certificate_is_its_own_error_and_inconclusive_probes_explain_nothing() -> None:
    refused = describe_probe(
        ProbeResult(Verdict.CERTIFICATE_REFUSED, "TLSV13_ALERT_CERTIFICATE_REQUIRED"), _settings(), "h"
    )
    assert isinstance(refused, CertificateRefusedError)
    assert refused.exit_code == 11
    assert refused.retriable is False
    assert "refused this client certificate in the TLS handshake" in refused.message
    assert "registered in this account and region and ACTIVE" in refused.message
    assert describe_probe(ProbeResult(Verdict.TLS_OK), _settings(), "h") is None
    assert describe_probe(ProbeResult(Verdict.INCONCLUSIVE, "timeout"), _settings(), "h") is None


# ------------------------------------------------------------------------------ the retry policy


@pytest.mark.parametrize(
    ("seconds", "text"), [(4.21114, "4.2"), (0.04, "0.0"), (284.4, "284"), (9.96, "10.0")]
)
def test_durations_are_rounded(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text


@dataclass
class _Refusing:
    """A Transport whose every connect fails with `errors[i]` (the last one repeats)."""

    errors: list[MqttConnectionError]
    clock: FakeClock
    took: float = 0.7  # each attempt's own duration
    connect_timeout: float = 30.0
    timeouts: list[float] = field(default_factory=list)

    def connect(self, client_id: str, credentials: Credentials, timeout: float | None = None) -> Any:
        self.timeouts.append(timeout or 0.0)
        self.clock.advance(self.took)
        raise self.errors[min(len(self.timeouts), len(self.errors)) - 1]

    def verify(self, client_id: str, credentials: Credentials, timeout: float | None = None) -> None:
        with self.connect(client_id, credentials, timeout):
            pass


def _provisioner(transport: _Refusing, clock: FakeClock, retry_timeout: float = 300) -> DeviceProvisioner:
    return DeviceProvisioner(
        transport,
        operation_timeout=30,
        retry_timeout=retry_timeout,
        backoff=Backoff(base=8.0, cap=30.0, rng=lambda: 1.0),
        clock=clock.now,
        sleep=clock.sleep,
    )


def _claim_until_final(dp: DeviceProvisioner, creds: Credentials) -> MqttConnectionError:
    deadline = dp.deadline()
    attempt = 0
    while True:
        attempt += 1
        try:
            with dp.claim_session("hub-1", creds, deadline):
                pass
        except MqttConnectionError as exc:
            try:
                dp.wait_before_retry(exc, attempt, deadline)
            except MqttConnectionError as final:
                return final


CREDS = Credentials(b"cert", b"key", "id")


def test_gave_up_reports_the_real_elapsed_time_not_the_budget() -> None:
    clock = FakeClock()
    transport = _Refusing([MqttConnectionError("down")], clock)
    final = _claim_until_final(_provisioner(transport, clock, retry_timeout=100), CREDS)
    elapsed = clock.now()
    assert elapsed == pytest.approx(8 + 16 + 30 + 30 + 5 * 0.7), "stops before a wait that would cross 100 s"
    assert f"in {format_seconds(elapsed)} s;" in final.message
    assert (
        "gave up after 5 attempt(s) in 88 s; the limit is ro.mqtt_retry_timeout_seconds = 100 s"
        in final.message
    )
    assert all(t == round(t, 1) for t in transport.timeouts), "each wait is a figure a message can show"


def test_a_refused_claim_certificate_is_final_at_once() -> None:
    clock = FakeClock()
    refused = CertificateRefusedError("refused this client certificate")
    transport = _Refusing([refused], clock)
    final = _claim_until_final(_provisioner(transport, clock), CREDS)
    assert final is refused
    assert len(transport.timeouts) == 1
    assert clock.sleeps == []


def test_jitr_and_the_verification_connect_retry_a_refused_certificate() -> None:
    clock = FakeClock()
    transport = _Refusing([CertificateRefusedError("refused")], clock)
    dp = _provisioner(transport, clock, retry_timeout=60)
    with pytest.raises(
        MqttConnectionError, match=r"JITR: no connection within 60 s after \d+ attempt\(s\) in [\d.]+ s"
    ) as info:
        dp.provision_jitr("hub-1", CREDS)
    assert len(transport.timeouts) > 2
    assert not isinstance(info.value, CertificateRefusedError)
    with pytest.raises(CertificateRefusedError) as verify:
        dp.verify("hub-1", CREDS, dp.deadline())
    assert verify.value.retriable is True, "a certificate registered a moment ago: worth another attempt"


def test_the_diagnostic_is_imported_only_when_a_connect_fails() -> None:
    # The probe pulls in ssl and socket (about 14 ms): a hub that connects at once never pays for them.
    import subprocess
    import sys

    code = (
        "import sys, hub_onboarding.cli, hub_onboarding.onboarding, hub_onboarding.mqtt, "
        "hub_onboarding.device_provisioner; print('hub_onboarding.tls_probe' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


# ------------------------------------------------------------------------------ a token awscrt cannot use


def test_a_token_awscrt_cannot_use_is_a_credential_error_naming_the_pkcs11_keys(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """Our own check of the token passed, yet awscrt's session fails (a store mounted read-only under a
    hardened unit, say): exit 4, which the boot service does not restart, naming the ro.pkcs11_* keys."""
    from hub_onboarding import mqtt
    from hub_onboarding.errors import CredentialError
    from hub_onboarding.mqtt import IotProvisioning
    from hub_onboarding.pkcs11 import TokenKey

    pin = tmp_path / "pin"
    pin.write_text("8642-secret-pin")
    pin.chmod(0o600)

    def refuse(credentials: Credentials) -> Any:
        raise RuntimeError("AWS_ERROR_PKCS11_CKR_GENERAL_ERROR: general error")

    monkeypatch.setattr(mqtt, "_mtls_options", refuse)
    key = TokenKey("/usr/lib/softhsm/libsofthsm2.so", "hub", "hub-onboarding-SN1", str(pin))
    credentials = Credentials(b"-----BEGIN CERTIFICATE-----", b"", "id", token_key=key)
    with pytest.raises(CredentialError) as caught:
        IotProvisioning(_settings()).connect("hub-1", credentials, timeout=1)
    error = caught.value
    assert error.exit_code == 4
    assert "'hub-onboarding-SN1' in PKCS#11 token 'hub'" in error.message
    assert "AWS_ERROR_PKCS11_CKR_GENERAL_ERROR" in error.message
    assert "check ro.pkcs11_module_path, ro.pkcs11_token_label and ro.pkcs11_pin_path" in error.message
    assert "ReadWritePaths" in error.message
    assert "iot_root_ca_path" not in error.message
    assert "8642-secret-pin" not in error.message
