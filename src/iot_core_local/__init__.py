"""iot_core_local: a local stand-in for the parts of AWS IoT Core that onboarding touches.

    from iot_core_local import LocalIotCore
    with LocalIotCore(data_dir) as core:
        iot = core.client()          # boto3, pointed at the control plane
        core.endpoint                # MQTT host/port, API URL, root CA path

The exception tree is in `iot_core_local.errors`.
"""

from iot_core_local.errors import IotCoreLocalError, ServerError, ServiceError
from iot_core_local.server import Endpoint, LocalIotCore

__all__ = ["Endpoint", "IotCoreLocalError", "LocalIotCore", "ServerError", "ServiceError"]
