"""hub_onboarding: onboard a smart-home hub to AWS IoT Core (fleet provisioning or JITR).

    from hub_onboarding import HubOnboarding
    hub = HubOnboarding("/data/aws/iotmi/config/iotmi_config.json")
    if not hub.is_provisioned():
        hub.process_device()

`HubOnboarding(path, on_step=listener)` tells `listener` each step as a StepEvent (`.step`, an
OnboardingStep; `.message`, the line it logs).

FP_STATUS codes and the exception tree map onto each other with `raise_for_status(status)` and
`status_of(exc)`. The names are imported lazily (PEP 562) so that `import hub_onboarding` stays cheap
on a hub: awscrt and cryptography load only when a connection or a certificate needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hub_onboarding.errors import (
    FP_STATUS_IDENTITY_ERROR,
    FP_STATUS_MQTT_CONNECTION_ERROR,
    FP_STATUS_OK,
    FP_STATUS_PUBLISH_TIMEOUT_ERROR,
    FP_STATUS_SUBSCRIBE_TIMEOUT_ERROR,
    BusyError,
    CertificateRefusedError,
    ConfigError,
    CredentialError,
    FpStatus,
    IdentityError,
    MqttConnectionError,
    OnboardingError,
    ProvisioningError,
    PublishTimeoutError,
    StorageError,
    SubscribeTimeoutError,
)

__all__ = [
    "FP_STATUS_IDENTITY_ERROR",
    "FP_STATUS_MQTT_CONNECTION_ERROR",
    "FP_STATUS_OK",
    "FP_STATUS_PUBLISH_TIMEOUT_ERROR",
    "FP_STATUS_SUBSCRIBE_TIMEOUT_ERROR",
    "BusyError",
    "CertHandler",
    "CertType",
    "CertificateRefusedError",
    "ConfigError",
    "CredentialError",
    "CredentialStore",
    "Credentials",
    "DeviceProvisioner",
    "FileCredentialStore",
    "FleetProvisioning",
    "FpStatus",
    "HubConfig",
    "HubOnboarding",
    "IdentityError",
    "IotProvisioning",
    "MqttConnectionError",
    "OnboardingError",
    "OnboardingResult",
    "OnboardingStep",
    "ProvisioningError",
    "PublishTimeoutError",
    "StepEvent",
    "StorageError",
    "SubscribeTimeoutError",
    "Timeouts",
    "parse_config",
    "raise_for_status",
    "status_of",
]

_WHERE = {
    "HubOnboarding": "onboarding",
    "OnboardingResult": "onboarding",
    "OnboardingStep": "onboarding",
    "StepEvent": "onboarding",
    "Timeouts": "onboarding",
    "DeviceProvisioner": "device_provisioner",
    "raise_for_status": "device_provisioner",
    "status_of": "device_provisioner",
    "IotProvisioning": "mqtt",
    "FleetProvisioning": "fleet",
    "CertHandler": "certs",
    "CertType": "certs",
    "Credentials": "certs",
    "CredentialStore": "certs",
    "FileCredentialStore": "certs",
    "HubConfig": "config",
    "parse_config": "config",
}

if TYPE_CHECKING:
    from hub_onboarding.certs import CertHandler, CertType, Credentials, CredentialStore, FileCredentialStore
    from hub_onboarding.config import HubConfig, parse_config
    from hub_onboarding.device_provisioner import DeviceProvisioner, raise_for_status, status_of
    from hub_onboarding.fleet import FleetProvisioning
    from hub_onboarding.mqtt import IotProvisioning
    from hub_onboarding.onboarding import HubOnboarding, OnboardingResult, OnboardingStep, StepEvent, Timeouts


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'hub_onboarding' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hub_onboarding.{module}"), name)
    globals()[name] = value
    return value
