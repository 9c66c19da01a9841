"""The control plane: AWS REST APIs (rest-json) as boto3 and the AWS CLI speak them, over HTTP.

    restjson.py  routing, parsing, validation, output and paging from a botocore service model (pure)
    iot.py       the AWS IoT operations, as handlers of restjson
    http.py      the HTTP server hosting one or more such services: ControlPlane

Imports go one way: http -> iot -> restjson. A second AWS service is a sibling of iot.py (its handlers and
a `RestJsonService` built from its botocore model) that `ControlPlane.host_service` adds.
"""

from iot_core_local.control_plane.http import MAX_BODY, ControlPlane
from iot_core_local.control_plane.iot import CLAIM_TTL, SUPPORTED_OPERATIONS
from iot_core_local.control_plane.restjson import RestJsonService

__all__ = [
    "CLAIM_TTL",
    "MAX_BODY",
    "SUPPORTED_OPERATIONS",
    "ControlPlane",
    "HostedServices",
    "RestJsonService",
]
