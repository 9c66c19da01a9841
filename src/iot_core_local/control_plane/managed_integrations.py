"""The managed integrations operations the stand-in answers, as handlers of the rest-json machinery.

Each handler gets the `ManagedIntegrations` state (managed.py) and the request's parameters, parsed and
validated against botocore's model of `iot-managed-integrations` (2025-03-03); it returns the output
members by name. Bad input is the model's ValidationException (InvalidRequestException for the tag
operations, whose model names that one). Any other operation of the model is answered "not supported".
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from botocore.model import OperationModel

from iot_core_local.control_plane.restjson import HandlerTable, Pager, RestJsonService
from iot_core_local.errors import InvalidRequest, ServiceError, Validation
from iot_core_local.managed import DETAIL_MEMBERS, ManagedIntegrations, ManagedThing, Profile

__all__ = ["SUPPORTED_OPERATIONS", "ManagedIntegrationsService", "service"]

_PAGER = Pager(size_params=("MaxResults",), token_params=("NextToken",), default_size=100)

_HANDLERS: HandlerTable[ManagedIntegrations] = HandlerTable()
_operation = _HANDLERS.operation


# ---- custom endpoint ------------------------------------------------------------------------------


@_operation("RegisterCustomEndpoint")
def _register_custom_endpoint(mi: ManagedIntegrations, params: dict[str, Any]) -> Mapping[str, Any]:
    return {"EndpointAddress": mi.register_custom_endpoint()}


@_operation("GetCustomEndpoint")
def _get_custom_endpoint(mi: ManagedIntegrations, params: dict[str, Any]) -> Mapping[str, Any]:
    return {"EndpointAddress": mi.get_custom_endpoint()}


# ---- provisioning profiles ------------------------------------------------------------------------


def _profile_view(profile: Profile) -> dict[str, Any]:
    return {
        "Arn": profile.arn,
        "Name": profile.name,
        "ProvisioningType": profile.provisioning_type,
        "Id": profile.id,
        "Status": profile.status,
        "ClaimCertificate": profile.claim_certificate_pem,
    }


@_operation("CreateProvisioningProfile")
def _create_provisioning_profile(mi: ManagedIntegrations, params: dict[str, Any]) -> Mapping[str, Any]:
    _check_tag_keys(params.get("Tags"))
    profile, key = mi.create_profile(params)
    return {**_profile_view(profile), "ClaimCertificatePrivateKey": key}


@_operation("GetProvisioningProfile")
def _get_provisioning_profile(mi: ManagedIntegrations, params: dict[str, Any]) -> Mapping[str, Any]:
    profile = mi.get_profile(params["Identifier"])
    return {**_profile_view(profile), "Tags": profile.tags or None}


@_operation("ListProvisioningProfiles")
def _list_provisioning_profiles(mi: ManagedIntegrations, params: dict[str, Any]) -> Mapping[str, Any]:
    page, token = _PAGER.page(
        mi.list_profiles(), params, "ListProvisioningProfiles", lambda p: (p.created, p.id)
    )
    items = [{k: v for k, v in _profile_view(p).items() if k != "ClaimCertificate"} for p in page]
    return {"Items": items, "NextToken": token}


@_operation("DeleteProvisioningProfile")
def _delete_provisioning_profile(mi: ManagedIntegrations, params: dict[str, Any]) -> Mapping[str, Any]:
    mi.delete_profile(params["Identifier"])
    return {}


# ---- managed things -------------------------------------------------------------------------------


def _thing_view(thing: ManagedThing) -> dict[str, Any]:
    view: dict[str, Any] = {k: v for k, v in thing.details.items() if k in DETAIL_MEMBERS}
    view.update(
        {
            "Id": thing.id,
            "Arn": thing.arn,
            "Role": thing.role,
            "ProvisioningStatus": thing.status,
            "SerialNumber": thing.serial,
            "UniversalProductCode": thing.upc,
            "InternationalArticleNumber": thing.ean,
            "CreatedAt": thing.created,
            "UpdatedAt": thing.updated,
            "ActivatedAt": thing.activated,
            "Tags": thing.tags or None,
        }
    )
    return view


_SUMMARY_MEMBERS = (
    "Id",
    "Arn",
    "Name",
    "Model",
    "Brand",
    "Owner",
    "CredentialLockerId",
    "Role",
    "ProvisioningStatus",
    "SerialNumber",
    "CreatedAt",
    "UpdatedAt",
    "ActivatedAt",
)


@_operation("CreateManagedThing")
def _create_managed_thing(mi: ManagedIntegrations, params: dict[str, Any]) -> Mapping[str, Any]:
    _check_tag_keys(params.get("Tags"))
    thing = mi.create_thing(params)
    return {"Id": thing.id, "Arn": thing.arn, "CreatedAt": thing.created}


@_operation("GetManagedThing")
def _get_managed_thing(mi: ManagedIntegrations, params: dict[str, Any]) -> Mapping[str, Any]:
    return _thing_view(mi.get_thing(params["Identifier"]))


# Filters on what no managed thing here has (a parent controller, a cloud connector): set, they match
# nothing, as AWS's would for an account without connectors.
_UNMATCHABLE_FILTERS = (
    "ParentControllerIdentifierFilter",
    "ConnectorPolicyIdFilter",
    "ConnectorDestinationIdFilter",
    "ConnectorDeviceIdFilter",
)


@_operation("ListManagedThings")
def _list_managed_things(mi: ManagedIntegrations, params: dict[str, Any]) -> Mapping[str, Any]:
    if any(params.get(name) is not None for name in _UNMATCHABLE_FILTERS):
        return {"Items": []}
    things = mi.list_things(
        {
            "role": params.get("RoleFilter"),
            "serial": params.get("SerialNumberFilter"),
            "status": params.get("ProvisioningStatusFilter"),
            "owner": params.get("OwnerFilter"),
            "credential_locker": params.get("CredentialLockerFilter"),
        }
    )
    page, token = _PAGER.page(things, params, "ListManagedThings", lambda t: (t.created, t.id))
    items = [{k: v for k, v in _thing_view(t).items() if k in _SUMMARY_MEMBERS} for t in page]
    return {"Items": items, "NextToken": token}


@_operation("UpdateManagedThing")
def _update_managed_thing(mi: ManagedIntegrations, params: dict[str, Any]) -> Mapping[str, Any]:
    mi.update_thing(params["Identifier"], params)
    return {}


@_operation("DeleteManagedThing")
def _delete_managed_thing(mi: ManagedIntegrations, params: dict[str, Any]) -> Mapping[str, Any]:
    mi.delete_thing(params["Identifier"], force=bool(params.get("Force")))
    return {}


@_operation("GetManagedThingConnectivityData")
def _get_connectivity(mi: ManagedIntegrations, params: dict[str, Any]) -> Mapping[str, Any]:
    thing = mi.get_thing(params["Identifier"])
    return {
        "ManagedThingId": thing.id,
        "Connected": thing.connected,
        "Timestamp": thing.connectivity_at,
        "DisconnectReason": None
        if thing.connected or thing.connectivity_at is None
        else thing.disconnect_reason,
    }


@_operation("GetManagedThingCertificate")
def _get_certificate(mi: ManagedIntegrations, params: dict[str, Any]) -> Mapping[str, Any]:
    return {
        "ManagedThingId": params["Identifier"],
        "CertificatePem": mi.certificate_pem(params["Identifier"]),
    }


# ---- tags -----------------------------------------------------------------------------------------


def _check_tag_keys(tags: Mapping[str, str] | None) -> None:
    # AWS reserves the aws: prefix (any case) for its own tags; users may neither add nor change them.
    for key in tags or {}:
        if key.lower().startswith("aws:"):
            # Tags are sensitive in the model: the key is described, not quoted.
            raise InvalidRequest(
                "A tag key starts with 'aws:', which is reserved for AWS's use; choose another key"
            )


@_operation("TagResource")
def _tag_resource(mi: ManagedIntegrations, params: dict[str, Any]) -> Mapping[str, Any]:
    _check_tag_keys(params["Tags"])
    mi.tag(params["ResourceArn"], params["Tags"])
    return {}


@_operation("UntagResource")
def _untag_resource(mi: ManagedIntegrations, params: dict[str, Any]) -> Mapping[str, Any]:
    mi.untag(params["ResourceArn"], params["TagKeys"])
    return {}


@_operation("ListTagsForResource")
def _list_tags(mi: ManagedIntegrations, params: dict[str, Any]) -> Mapping[str, Any]:
    return {"tags": mi.tags(params["ResourceArn"]) or None}


SUPPORTED_OPERATIONS = frozenset(_HANDLERS)


class ManagedIntegrationsService(RestJsonService[ManagedIntegrations]):
    """The rest-json machinery, with bad input answered as each operation's model says: ValidationException
    where the operation lists it, InvalidRequestException (the tag operations) where it lists that."""

    def operation_error(self, operation: OperationModel, error: ServiceError) -> ServiceError:
        if not isinstance(error, InvalidRequest | Validation):
            return error
        modeled = {shape.name for shape in operation.error_shapes}
        if isinstance(error, InvalidRequest) and "ValidationException" in modeled:
            return Validation(error.message)
        if (
            isinstance(error, Validation)
            and "ValidationException" not in modeled
            and "InvalidRequestException" in modeled
        ):
            # Its body's member is spelt as the model's (`Message`) by error_answer.
            return InvalidRequest(error.message)
        return error


@functools.cache
def service() -> ManagedIntegrationsService:
    """Managed integrations as botocore models it, with these handlers (built once)."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("iot-managed-integrations")
    return ManagedIntegrationsService(model, _HANDLERS)
