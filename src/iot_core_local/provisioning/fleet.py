"""Fleet provisioning by claim: CreateKeysAndCertificate, CreateCertificateFromCsr, RegisterThing.

Every method here is synchronous; `prepare` says which requests may block long enough to stall an event
loop, and the service facade (`provisioning/__init__.py`) runs those in a thread. Every failure
becomes a `/rejected` answer `{"statusCode", "errorCode", "errorMessage"}`, never an exception. Nothing here
logs a private key or an ownership token; `Answer.summary` is what may be logged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .. import templates
from ..ca import CertificateAuthority, certificate_id, load_csr
from ..errors import HookDenied, InvalidRequest, ServiceError, TemplateEvaluationError
from ..hook import call_hook, hosted_functions
from ..model import Certificate, CertificateStatus, ProvisioningTemplate, TokenGrant
from ..registry import Registry
from .topics import CREATE_FROM_CSR, CREATE_KEYS, REGISTER_THING, Answer, Request, Requester

if TYPE_CHECKING:
    from .managed import ManagedMatcher

__all__ = ["FleetProvisioning", "Prepared", "Rejected", "apply_plan", "validated_template"]

log = logging.getLogger("iot_core_local.gateway")


@dataclass(frozen=True)
class Prepared:
    """What the service needs to know before running a request, read once: whether it may block.

    `template` is RegisterThing's stored template (None if it does not exist); `handle` works from this
    same snapshot, so a template updated in between (a hook added, say) cannot make a request that was
    judged quick run the hook on the event loop.
    """

    blocks: bool
    template: ProvisioningTemplate | None = None
    hook: bool = False  # RegisterThing calls the template's pre-provisioning hook
    hook_timeout: float | None = None  # what is left of the hook's time limit; None: all of it


_QUICK = Prepared(False)
_SLOW = Prepared(True)


class Rejected(Exception):
    """A request refused as AWS refuses it: HTTP-like status, error code, message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _PeekOnly(Exception):
    """Rolls back a transaction whose only purpose was to look at a token without spending it."""


def _roll_back() -> NoReturn:
    raise _PeekOnly


def _request_digest(claim_certificate_id: str | None, template: str, parameters: dict[str, str]) -> str:
    """What makes two RegisterThing requests the same one, for the answer kept with its token."""
    canonical = json.dumps([claim_certificate_id, template, parameters], sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _token_error(message: str) -> Rejected:
    return Rejected(400, "InvalidCertificateOwnershipToken", message)


def _from_service_error(e: ServiceError) -> Rejected:
    if isinstance(e, TemplateEvaluationError):
        return Rejected(400, "InvalidParameters", e.message)
    return Rejected(e.status, e.error_type.removesuffix("Exception"), e.message)


@functools.lru_cache(maxsize=256)
def validated_template(body: str) -> templates.Template:
    # Keyed on the body itself, so an updated template is validated again and never served stale.
    return templates.validate_template(body)


def _decode(payload: bytes, payload_format: str) -> dict[str, Any]:
    if not payload.strip():
        return {}  # CreateKeysAndCertificate is sent with an empty payload by some SDKs
    try:
        data = json.loads(payload) if payload_format == "json" else cbor2.loads(payload)
    except Exception as e:  # cbor2 raises several unrelated types for bad input
        kind = "JSON" if payload_format == "json" else "CBOR"
        raise Rejected(400, "InvalidPayload", f"The request payload is not valid {kind}: {e}") from None
    if not isinstance(data, dict):
        raise Rejected(400, "InvalidPayload", "The request payload must be an object")
    return data


def _encode(data: dict[str, Any], payload_format: str) -> bytes:
    if payload_format == "json":
        return json.dumps(data, separators=(",", ":")).encode()
    return bytes(cbor2.dumps(data))


def _string_map(value: object, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise Rejected(400, "InvalidParameters", f"{what} must be an object of string values")
    return dict(value)


class FleetProvisioning:
    """The three requests of the fleet provisioning MQTT API, over one registry and CA."""

    def __init__(
        self, registry: Registry, ca: CertificateAuthority, *, token_ttl: float, hook_timeout: float
    ) -> None:
        self.registry = registry
        self.ca = ca
        self.token_ttl = token_ttl
        self.hook_timeout = hook_timeout
        self.hosted = hosted_functions(registry)  # the hook functions answered in-process (takeover guard)
        self.matcher: ManagedMatcher | None = None  # set by the server: managed integrations' matching

    def prepare(self, request: Request) -> Prepared:
        """Whether `request` may take long enough to stall an event loop (so it must run in a thread),
        and for RegisterThing the template it is to use; pass the result to `handle`.

        CreateKeysAndCertificate may have to generate its RSA key (50-150 ms) when the CA's key pool is
        empty, and a pre-provisioning hook may take up to 5 s. Signing a CSR and a RegisterThing without
        a hook take well under a millisecond: running them in a thread would cost more in hand-offs and
        GIL contention than the work itself.
        """
        if request.operation == CREATE_KEYS:
            return _SLOW
        if request.operation == REGISTER_THING and request.template_name is not None:
            stored = self.registry.find_template(request.template_name)
            target = (stored.hook or {}).get("targetArn") if stored is not None else None
            # A hosted hook function is a registry lookup, as quick as the rest of RegisterThing: it runs
            # where that does. Only a hook over the network needs a hook thread.
            hooked = bool(target) and self.hosted.find(str(target)) is None
            return Prepared(hooked, stored, hook=hooked)
        return _QUICK

    def handle(
        self, request: Request, payload: bytes, requester: Requester, prepared: Prepared | None = None
    ) -> Answer:
        """Run one request; every failure becomes a /rejected answer, never an exception.

        `prepared` is what `prepare(request)` said; without it the template is read here.
        """
        claim_certificate_id = requester.claim_certificate_id
        try:
            body = _decode(payload, request.payload_format)
            if request.operation == CREATE_KEYS:
                result, summary = self._create_keys(claim_certificate_id)
            elif request.operation == CREATE_FROM_CSR:
                result, summary = self._create_from_csr(body, claim_certificate_id)
            else:
                if prepared is None:
                    prepared = self.prepare(request)
                result, summary = self._register_thing(request, prepared, body, requester)
        except Rejected as e:
            return self._rejected(request, e)
        except ServiceError as e:
            return self._rejected(request, _from_service_error(e))
        except Exception:
            log.exception("%s failed unexpectedly", request.operation)
            return self._rejected(request, Rejected(500, "InternalFailure", "Internal error"))
        return Answer(
            request.operation,
            f"{request.topic}/accepted",
            _encode(result, request.payload_format),
            True,
            f"accepted ({summary})",
        )

    def throttled(self, request: Request, why: str = "") -> Answer:
        """The answer AWS gives a request over its rate limit (the fault switch; hooks without a slot)."""
        message = f"Rate exceeded: {why}" if why else "Rate exceeded"
        return self._rejected(request, Rejected(429, "ThrottlingException", message))

    def _rejected(self, request: Request, e: Rejected) -> Answer:
        body = {"statusCode": e.status, "errorCode": e.code, "errorMessage": e.message}
        return Answer(
            request.operation,
            f"{request.topic}/rejected",
            _encode(body, request.payload_format),
            False,
            f"rejected {e.status} {e.code}: {e.message}",
        )

    def _register_new(self, pem: str, claim_certificate_id: str) -> tuple[str, str]:
        cid = certificate_id(x509.load_pem_x509_certificate(pem.encode()))
        with self.registry.transaction():
            self.registry.add_certificate(
                pem, CertificateStatus.PENDING_ACTIVATION, ca_certificate_id=self.ca.issuing_ca_id
            )
            token = self.registry.issue_token(cid, claim_certificate_id, self.token_ttl)
        return cid, token

    def _create_keys(self, claim_certificate_id: str) -> tuple[dict[str, Any], str]:
        certificate_pem, private_key = self.ca.create_keys_and_certificate()
        cid, token = self._register_new(certificate_pem, claim_certificate_id)
        result = {
            "certificateId": cid,
            "certificatePem": certificate_pem,
            "privateKey": private_key,
            "certificateOwnershipToken": token,
        }
        return result, f"certificate {cid}"

    def _create_from_csr(self, body: dict[str, Any], claim_certificate_id: str) -> tuple[dict[str, Any], str]:
        csr_pem = body.get("certificateSigningRequest")
        if not isinstance(csr_pem, str) or not csr_pem.strip():
            raise Rejected(400, "InvalidCsr", "certificateSigningRequest must be a PEM string")
        try:
            csr = load_csr(csr_pem)
        except InvalidRequest as e:
            raise Rejected(400, "InvalidCsr", e.message) from None
        cert = self.ca.sign_csr(csr)
        certificate_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        cid, token = self._register_new(certificate_pem, claim_certificate_id)
        result = {"certificateId": cid, "certificatePem": certificate_pem, "certificateOwnershipToken": token}
        return result, f"certificate {cid}"

    def _peek_token(self, token: str) -> TokenGrant:
        """The certificate id a token grants, checked as spending it would, but left unspent.

        The token is spent in the same transaction that registers the thing, so a request that fails
        on the way (hook, missing parameter) leaves the token usable, as it leaves everything else.
        """
        grant = None
        try:
            with self.registry.transaction():
                grant = self.registry.consume_token(token)
                _roll_back()
        except _PeekOnly:
            pass
        except InvalidRequest as e:
            raise _token_error(e.message) from None
        assert grant is not None
        return grant

    def _grant_or_answer(self, token: str, request_digest: str) -> TokenGrant | dict[str, Any]:
        """What an unspent token grants; for a spent one, the answer kept for the identical request that
        spent it (a hub that lost that answer learns its identity no other way); Rejected otherwise.

        The kept answer is looked up only for a token that cannot be spent, so a first request pays
        nothing for it."""
        try:
            return self._peek_token(token)
        except Rejected:
            answer = self.registry.token_answer(token, request_digest)
            if answer is None:
                raise
            return answer

    def _register_thing(
        self,
        request: Request,
        prepared: Prepared,
        body: dict[str, Any],
        requester: Requester,
    ) -> tuple[dict[str, Any], str]:
        stored = prepared.template
        name = request.template_name or ""
        claim_certificate_id = requester.claim_certificate_id
        token = body.get("certificateOwnershipToken")
        if token is None or token == "":
            raise _token_error("Certificate ownership token cannot be empty")
        if not isinstance(token, str):
            raise _token_error("Certificate ownership token must be a string")
        parameters = _string_map(body.get("parameters"), "parameters")
        request_digest = _request_digest(claim_certificate_id, name, parameters)
        if stored is None:
            raise Rejected(404, "ResourceNotFound", f"The provisioning template {name} does not exist")
        if not stored.enabled:
            raise Rejected(400, "InvalidRequest", f"The provisioning template {name} is disabled")
        if stored.template_type != "FLEET_PROVISIONING":
            raise Rejected(
                400, "InvalidRequest", f"The provisioning template {name} is not of type FLEET_PROVISIONING"
            )
        template = validated_template(stored.body)

        grant = self._grant_or_answer(token, request_digest)
        if isinstance(grant, dict):
            return grant, f"thing {grant.get('thingName')} (the answer to an earlier, identical request)"
        cid = grant.certificate_id
        # Bound to the claim certificate that asked for it: a token overheard elsewhere is worthless.
        if grant.claim_certificate_id is not None and grant.claim_certificate_id != claim_certificate_id:
            raise _token_error("Certificate ownership token was issued to another claim certificate")
        certificate = self.registry.find_certificate(cid)
        if certificate is None:
            raise _token_error("Certificate ownership token is invalid")

        hook = stored.hook or {}
        target = hook.get("targetArn")
        if target:
            hook_input: dict[str, object] = {
                "claimCertificateId": claim_certificate_id,
                "certificateId": cid,
                "certificatePem": certificate.pem,
                "templateArn": stored.arn,
                "clientId": requester.client_id,
                "parameters": parameters,
            }
            try:
                hook_timeout = self.hook_timeout if prepared.hook_timeout is None else prepared.hook_timeout
                result = call_hook(
                    target, hook_input, hook_timeout, limit=self.hook_timeout, hosted=self.hosted
                )
            except HookDenied as e:
                raise Rejected(403, "AccessDenied", e.message) from None
            parameters = {**parameters, **result.parameter_overrides}

        # Managed integrations: a profile's template must match a pre-associated hub (managed.py).
        match = self.matcher.match(name, parameters) if self.matcher is not None else None
        builtins = {"AWS::IoT::Certificate::Id": cid, **(match.builtins if match is not None else {})}
        plan = templates.evaluate(template, parameters, builtins)
        if plan.certificate is not None and plan.certificate.certificate_id != cid:
            raise Rejected(
                400,
                "InvalidParameters",
                "The template's certificate must be the one the ownership token was issued for",
            )
        result_body: dict[str, Any] = {"deviceConfiguration": plan.device_configuration}
        thing = plan.thing.name if plan.thing is not None else None
        if thing is not None:
            result_body["thingName"] = thing
        with self.registry.transaction():
            self.registry.consume_token(token)
            apply_plan(self.registry, plan, certificate)
            if match is not None and self.matcher is not None:
                self.matcher.commit(match, cid)
            self.registry.record_token_answer(token, request_digest, result_body)
        if match is not None and self.matcher is not None:
            self.matcher.committed(match)
        return result_body, f"certificate {cid}, thing {thing}"


# ---- what RegisterThing and JITP do ---------------------------------------------------------------


def apply_plan(registry: Registry, plan: templates.Plan, certificate: Certificate) -> None:
    """Create or update the thing, attach certificate and policies, set the status: all or nothing."""
    if plan.thing is not None and (plan.thing.thing_groups or plan.thing.billing_group):
        # The registry has no thing groups or billing groups; say so rather than pretend.
        log.warning(
            "thing %s: ThingGroups/BillingGroup in the template are ignored (iot-core-local has none)",
            plan.thing.name,
        )
    with registry.transaction():
        if plan.thing is not None:
            _apply_thing(registry, plan.thing)
            registry.attach_thing_principal(plan.thing.name, certificate.arn)
        for policy_plan in plan.policies:
            name = policy_plan.name
            if policy_plan.policy_document is not None and registry.find_policy(name) is None:
                registry.create_policy(name, policy_plan.policy_document)
            else:
                registry.get_policy(name)  # ResourceNotFound names the missing policy
            registry.attach_policy(name, certificate.arn)
        status = plan.certificate.status if plan.certificate is not None else CertificateStatus.ACTIVE
        registry.set_certificate_status(certificate.certificate_id, status)


def _apply_thing(registry: Registry, thing: templates.ThingPlan) -> None:
    existing = registry.find_thing(thing.name)
    if existing is None:
        registry.create_thing(thing.name, thing_type_name=thing.thing_type_name, attributes=thing.attributes)
        return
    # An existing thing changes only as OverrideSettings say; a property not named: DO_NOTHING.
    attributes_action = thing.overrides.get("AttributePayload", "DO_NOTHING")
    type_action = thing.overrides.get("ThingTypeName", "DO_NOTHING")
    if attributes_action == "FAIL" and thing.attributes != existing.attributes:
        raise Rejected(
            400, "InvalidParameters", f"Thing {thing.name} exists with other attributes (override FAIL)"
        )
    if type_action == "FAIL" and thing.thing_type_name not in (None, existing.thing_type_name):
        raise Rejected(
            400, "InvalidParameters", f"Thing {thing.name} exists with another thing type (override FAIL)"
        )
    new_attributes = None
    merge = True
    if attributes_action in ("REPLACE", "MERGE"):
        new_attributes = thing.attributes
        merge = attributes_action == "MERGE"
    new_type = thing.thing_type_name if type_action == "REPLACE" else None
    if new_attributes is not None or new_type is not None:
        registry.update_thing(thing.name, thing_type_name=new_type, attributes=new_attributes, merge=merge)
