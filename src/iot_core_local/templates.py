"""Provisioning template engine (pure: no I/O, no registry).

Two steps, as AWS splits them:

- `validate_template(body)` runs when CreateProvisioningTemplate / UpdateProvisioningTemplate (or a
  CA's registration config) receives a body. Everything that can be known without parameter values
  is checked here and reported as `TemplateError`, naming the section, resource and property at fault.
- `evaluate(template, parameters, builtins)` runs per RegisterThing or JITP connect. What depends on
  values (a missing parameter, `Fn::Select` out of range, a thing name AWS would refuse) is a
  `TemplateEvaluationError`, which the gateway sends back as a `/rejected` answer.

Both errors live in `errors.py` with the rest of the exception tree.

The intrinsic functions live in one table, `FUNCTIONS`: each has a `check` (syntax, declared names,
the kind of value it yields) and an `apply`. `apply` relies on `check` having run, which is why a
`Template` only comes out of `validate_template`.

Values are strings or lists of strings: every parameter is a string, `Fn::Split` makes a list,
everything a resource property or the device configuration ends up with is one or the other.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from cryptography import x509
from cryptography.x509.oid import NameOID

from . import policy
from .errors import InvalidRequest, TemplateError, TemplateEvaluationError
from .model import CertificateStatus

__all__ = [
    "BUILTIN_PARAMETERS",
    "FUNCTIONS",
    "MAX_BODY_SIZE",
    "MAX_FUNCTION_DEPTH",
    "MAX_NESTING",
    "CertificatePlan",
    "Parameter",
    "Plan",
    "PolicyPlan",
    "Resource",
    "Template",
    "ThingPlan",
    "certificate_builtins",
    "evaluate",
    "validate_template",
]


# templateBody: "Maximum length of 10240" in the AWS IoT API Reference (CreateProvisioningTemplate).
MAX_BODY_SIZE = 10240
# AWS documents no depth limit, but its size limit implies one and the checks here recurse, so depth is
# bounded before anything walks the body: a template nested deeper is refused, never a RecursionError.
# AWS's own examples nest at most 10 containers and 3 functions; an inline policy with a condition is
# 11 containers before any function, and each Fn::Join adds 3 (object, list, list). 32 nested functions
# and 128 containers leave room for any template written by hand or generated, and keep every recursive
# walk (a few frames per level) far from Python's recursion limit of 1,000 frames.
MAX_NESTING = 128  # JSON objects and lists inside one another
MAX_FUNCTION_DEPTH = 32  # intrinsic function calls inside one another
SECTIONS = ("Parameters", "Mappings", "Resources", "DeviceConfiguration")
PARAMETER_TYPES = ("String", "Number")
PARAMETER_KEYS = ("Type", "Default", "Description")

THING = "AWS::IoT::Thing"
CERTIFICATE = "AWS::IoT::Certificate"
POLICY = "AWS::IoT::Policy"

# What JITP extracts from the device certificate, keyed by the parameter name templates use.
_SUBJECT_FIELDS: Mapping[str, x509.ObjectIdentifier] = {
    "AWS::IoT::Certificate::CommonName": NameOID.COMMON_NAME,
    "AWS::IoT::Certificate::SerialNumber": NameOID.SERIAL_NUMBER,
    "AWS::IoT::Certificate::Country": NameOID.COUNTRY_NAME,
    "AWS::IoT::Certificate::Organization": NameOID.ORGANIZATION_NAME,
    "AWS::IoT::Certificate::OrganizationalUnit": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "AWS::IoT::Certificate::DistinguishedNameQualifier": NameOID.DN_QUALIFIER,
    "AWS::IoT::Certificate::StateName": NameOID.STATE_OR_PROVINCE_NAME,
    "AWS::IoT::Certificate::Locality": NameOID.LOCALITY_NAME,
    "AWS::IoT::Certificate::Title": NameOID.TITLE,
    "AWS::IoT::Certificate::Pseudonym": NameOID.PSEUDONYM,
    "AWS::IoT::Certificate::Email": NameOID.EMAIL_ADDRESS,
}
BUILTIN_PARAMETERS = frozenset({"AWS::IoT::Certificate::Id", *_SUBJECT_FIELDS})

_THING_NAME = re.compile(r"[a-zA-Z0-9:_-]{1,128}")  # botocore's ThingName shape
_NUMBER = re.compile(r"-?\d+(\.\d+)?")
# What a template may set a certificate to; the other statuses are not a template's to give.
_CERTIFICATE_STATUSES = (CertificateStatus.ACTIVE, CertificateStatus.INACTIVE)

# Kinds of values an expression yields; ANY is a Fn::FindInMap whose map holds both.
STR, LIST, ANY = "a string", "a list", "any"

Value = str | list[str]


# --- the template, as validate_template returns it -------------------------------------------


@dataclass(frozen=True)
class Parameter:
    name: str
    type: str
    default: str | None


@dataclass(frozen=True)
class Resource:
    logical_name: str
    type: str
    properties: Mapping[str, object]  # raw JSON, functions unevaluated
    overrides: Mapping[str, str]  # property name -> DO_NOTHING | REPLACE | FAIL | MERGE


@dataclass(frozen=True)
class Template:
    parameters: Mapping[str, Parameter]
    mappings: Mapping[str, Mapping[str, Mapping[str, object]]]
    resources: tuple[Resource, ...]
    device_configuration: Mapping[str, object]


# --- the plan, as evaluate returns it --------------------------------------------------------


@dataclass(frozen=True)
class ThingPlan:
    name: str
    thing_type_name: str | None
    attributes: dict[str, str]
    thing_groups: list[str]
    billing_group: str | None
    overrides: dict[str, str]  # property name -> action; a property not named means DO_NOTHING


@dataclass(frozen=True)
class CertificatePlan:
    certificate_id: str
    status: CertificateStatus  # ACTIVE | INACTIVE
    overrides: dict[str, str] = field(default_factory=dict)  # {"Status": action} if the template says


@dataclass(frozen=True)
class PolicyPlan:
    policy_name: str | None = None  # an existing policy
    policy_document: str | None = None  # or a document to create (JSON string)

    @property
    def name(self) -> str:
        """The policy's name; AWS names an inline document after its hash."""
        if self.policy_name is not None:
            return self.policy_name
        return hashlib.sha256((self.policy_document or "").encode()).hexdigest()


@dataclass(frozen=True)
class Plan:
    thing: ThingPlan | None
    certificate: CertificatePlan | None
    policies: list[PolicyPlan]
    device_configuration: dict[str, str]


# --- the intrinsic functions -----------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    """What `check` knows: declared parameter names and the mappings."""

    parameters: frozenset[str]
    mappings: Mapping[str, Mapping[str, Mapping[str, object]]]

    def knows(self, name: str) -> bool:
        return name in self.parameters or name in BUILTIN_PARAMETERS


@dataclass(frozen=True)
class _Scope:
    """What `apply` knows: every resolved parameter, the built-ins and the mappings."""

    values: Mapping[str, str]
    builtins: Mapping[str, str]
    mappings: Mapping[str, Mapping[str, Mapping[str, object]]]

    def lookup(self, name: str, where: str) -> str:
        if name in self.values:
            return self.values[name]
        value = self.builtins.get(name)
        if isinstance(value, str) and name in BUILTIN_PARAMETERS:
            return value
        raise TemplateEvaluationError(f"{where}: no value for {name}")


class Function(NamedTuple):
    check: Callable[[object, _Context, str], str]  # -> kind, or TemplateError
    apply: Callable[[object, _Scope, str], Value]  # -> value, or TemplateEvaluationError


def _args(arg: object, count: int, name: str, where: str) -> list[object]:
    if not isinstance(arg, list) or len(arg) != count:
        raise TemplateError(f"{where}: {name} takes a list of {count} arguments")
    return arg


def _check_ref(arg: object, ctx: _Context, where: str) -> str:
    if not isinstance(arg, str):
        raise TemplateError(f"{where}: Ref takes a parameter name")
    if not ctx.knows(arg):
        raise TemplateError(f"{where}: Ref to undeclared parameter {arg!r}")
    return STR


def _apply_ref(arg: object, scope: _Scope, where: str) -> Value:
    assert isinstance(arg, str)
    return scope.lookup(arg, where)


def _check_join(arg: object, ctx: _Context, where: str) -> str:
    delimiter, values = _args(arg, 2, "Fn::Join", where)
    if not isinstance(delimiter, str):
        raise TemplateError(f"{where}: Fn::Join's delimiter must be a string")
    _check_kind(values, LIST, ctx, f"{where}[1]")
    return STR


def _apply_join(arg: object, scope: _Scope, where: str) -> Value:
    delimiter, values = _args(arg, 2, "Fn::Join", where)
    assert isinstance(delimiter, str)
    return delimiter.join(_list(values, scope, f"{where}[1]"))


def _index(value: object) -> int | None:
    # CloudFormation accepts the index as a number or as a string of digits.
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _check_select(arg: object, ctx: _Context, where: str) -> str:
    index, values = _args(arg, 2, "Fn::Select", where)
    if _index(index) is None:
        if not _is_call(index):
            raise TemplateError(f"{where}: Fn::Select's index must be a non-negative integer")
        _check_kind(index, STR, ctx, f"{where}[0]")
    _check_kind(values, LIST, ctx, f"{where}[1]")
    literal_index = _index(index)
    if isinstance(values, list) and literal_index is not None and literal_index >= len(values):
        raise TemplateError(f"{where}: Fn::Select index {literal_index} is out of range")
    return STR


def _apply_select(arg: object, scope: _Scope, where: str) -> Value:
    index_expr, values_expr = _args(arg, 2, "Fn::Select", where)
    index = _index(index_expr)
    if index is None:
        index = _index(_string(index_expr, scope, f"{where}[0]"))
        if index is None:
            raise TemplateEvaluationError(f"{where}: Fn::Select's index is not a non-negative integer")
    values = _list(values_expr, scope, f"{where}[1]")
    if index >= len(values):
        raise TemplateEvaluationError(
            f"{where}: Fn::Select index {index} is out of range ({len(values)} values)"
        )
    return values[index]


def _check_split(arg: object, ctx: _Context, where: str) -> str:
    delimiter, source = _args(arg, 2, "Fn::Split", where)
    if not isinstance(delimiter, str) or not delimiter:
        raise TemplateError(f"{where}: Fn::Split's delimiter must be a non-empty string")
    _check_kind(source, STR, ctx, f"{where}[1]")
    return LIST


def _apply_split(arg: object, scope: _Scope, where: str) -> Value:
    delimiter, source = _args(arg, 2, "Fn::Split", where)
    assert isinstance(delimiter, str)
    return _string(source, scope, f"{where}[1]").split(delimiter)


def _check_find_in_map(arg: object, ctx: _Context, where: str) -> str:
    keys = _args(arg, 3, "Fn::FindInMap", where)
    for i, key in enumerate(keys):
        _check_kind(key, STR, ctx, f"{where}[{i}]")
    # With literal keys the lookup can be checked now; otherwise it waits for the values.
    level: object = ctx.mappings
    for key in keys:
        if not isinstance(key, str):
            return ANY
        if not isinstance(level, Mapping) or key not in level:
            raise TemplateError(f"{where}: Fn::FindInMap finds no {key!r} in Mappings")
        level = level[key]
    return STR if isinstance(level, str) else LIST


def _apply_find_in_map(arg: object, scope: _Scope, where: str) -> Value:
    keys = [
        _string(key, scope, f"{where}[{i}]") for i, key in enumerate(_args(arg, 3, "Fn::FindInMap", where))
    ]
    level: object = scope.mappings
    for key in keys:
        if not isinstance(level, Mapping) or key not in level:
            raise TemplateEvaluationError(f"{where}: Fn::FindInMap finds no {key!r} in Mappings")
        level = level[key]
    assert isinstance(level, str | list)
    return level


# ${Name} substitutes; ${!Name} is the literal text ${Name}.
_SUB_VARIABLE = re.compile(r"\$\{(!?)([^}]*)\}")


def _sub_parts(arg: object, where: str) -> tuple[str, Mapping[str, object]]:
    if isinstance(arg, str):
        return arg, {}
    if isinstance(arg, list) and len(arg) == 2 and isinstance(arg[0], str) and isinstance(arg[1], dict):
        return arg[0], arg[1]
    raise TemplateError(f"{where}: Fn::Sub takes a string, or a list of a string and an object of variables")


def _check_sub(arg: object, ctx: _Context, where: str) -> str:
    text, variables = _sub_parts(arg, where)
    for name, expr in variables.items():
        _check_kind(expr, STR, ctx, f"{where}[1].{name}")
    if "${" in _SUB_VARIABLE.sub("", text):
        raise TemplateError(f"{where}: Fn::Sub has an unterminated ${{")
    for bang, name in _SUB_VARIABLE.findall(text):
        if not bang and name not in variables and not ctx.knows(name):
            raise TemplateError(f"{where}: Fn::Sub refers to undeclared parameter {name!r}")
    return STR


def _apply_sub(arg: object, scope: _Scope, where: str) -> Value:
    text, variables = _sub_parts(arg, where)
    values = {name: _string(expr, scope, f"{where}[1].{name}") for name, expr in variables.items()}

    def replace(match: re.Match[str]) -> str:
        bang, name = match.groups()
        if bang:
            return "${" + name + "}"
        return values[name] if name in values else scope.lookup(name, where)

    return _SUB_VARIABLE.sub(replace, text)


FUNCTIONS: Mapping[str, Function] = {
    "Ref": Function(_check_ref, _apply_ref),
    "Fn::Join": Function(_check_join, _apply_join),
    "Fn::Select": Function(_check_select, _apply_select),
    "Fn::Split": Function(_check_split, _apply_split),
    "Fn::FindInMap": Function(_check_find_in_map, _apply_find_in_map),
    "Fn::Sub": Function(_check_sub, _apply_sub),
}


def _is_call(expr: object) -> bool:
    return isinstance(expr, dict) and len(expr) == 1 and next(iter(expr)) in FUNCTIONS


def _looks_like_call(key: str) -> bool:
    return key == "Ref" or key.startswith("Fn::")


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _check(expr: object, ctx: _Context, where: str) -> str:
    """The kind of value `expr` yields; TemplateError if it is not a well-formed expression."""
    if isinstance(expr, str):
        return STR
    if isinstance(expr, list):
        for i, item in enumerate(expr):
            _check_kind(item, STR, ctx, f"{where}[{i}]")
        return LIST
    if isinstance(expr, dict):
        calls = [key for key in expr if _looks_like_call(key)]
        if len(expr) == 1 and calls:
            name, arg = next(iter(expr.items()))
            if name not in FUNCTIONS:
                raise TemplateError(f"{where}: unsupported function {name}")
            return FUNCTIONS[name].check(arg, ctx, f"{where}.{name}")
        if calls:
            raise TemplateError(
                f"{where}: a function call must be the only key of its object, {calls[0]} is not"
            )
    raise TemplateError(f"{where}: expected a string or a function, got {_json_type(expr)}")


def _check_kind(expr: object, want: str, ctx: _Context, where: str) -> None:
    kind = _check(expr, ctx, where)
    if kind not in (want, ANY):
        raise TemplateError(f"{where}: expected {want}, got {kind}")


def _value(expr: object, scope: _Scope, where: str) -> Value:
    if isinstance(expr, str):
        return expr
    if isinstance(expr, list):
        return [_string(item, scope, f"{where}[{i}]") for i, item in enumerate(expr)]
    if _is_call(expr):
        assert isinstance(expr, dict)
        name, arg = next(iter(expr.items()))
        return FUNCTIONS[name].apply(arg, scope, f"{where}.{name}")
    raise TemplateEvaluationError(f"{where}: expected a string or a function, got {_json_type(expr)}")


def _string(expr: object, scope: _Scope, where: str) -> str:
    value = _value(expr, scope, where)
    if not isinstance(value, str):
        raise TemplateEvaluationError(f"{where}: expected a string, got a list")
    return value


def _list(expr: object, scope: _Scope, where: str) -> list[str]:
    value = _value(expr, scope, where)
    if not isinstance(value, list):
        raise TemplateEvaluationError(f"{where}: expected a list, got a string")
    return value


# --- resources: which properties each type takes, which overrides apply ----------------------

OBJECT, DOCUMENT = "an object", "a policy document"
_ALL_ACTIONS = frozenset({"DO_NOTHING", "REPLACE", "FAIL", "MERGE"})
_NO_MERGE = _ALL_ACTIONS - {"MERGE"}


@dataclass(frozen=True)
class _ResourceSpec:
    properties: Mapping[str, str]  # property -> kind it must yield
    required: frozenset[str]
    overrides: Mapping[str, frozenset[str]]  # property -> allowed override actions


_RESOURCE_SPECS: Mapping[str, _ResourceSpec] = {
    THING: _ResourceSpec(
        properties={
            "ThingName": STR,
            "AttributePayload": OBJECT,
            "ThingTypeName": STR,
            "ThingGroups": LIST,
            "BillingGroup": STR,
        },
        required=frozenset({"ThingName"}),
        # MERGE is only meaningful for the two properties that hold several values.
        overrides={"AttributePayload": _ALL_ACTIONS, "ThingTypeName": _NO_MERGE, "ThingGroups": _ALL_ACTIONS},
    ),
    CERTIFICATE: _ResourceSpec(
        properties={"CertificateId": STR, "Status": STR},
        required=frozenset({"CertificateId"}),
        overrides={"Status": _NO_MERGE},
    ),
    POLICY: _ResourceSpec(
        properties={"PolicyName": STR, "PolicyDocument": DOCUMENT},
        required=frozenset(),
        overrides={},
    ),
}
# AWS IoT's provisioning-template documentation spells override keys both ways: ATTRIBUTE_PAYLOAD in
# its prose, AttributePayload in its examples.
_OVERRIDE_ALIASES = {
    "ATTRIBUTE_PAYLOAD": "AttributePayload",
    "THING_TYPE_NAME": "ThingTypeName",
    "THING_GROUPS": "ThingGroups",
    "STATUS": "Status",
}
_UNSUPPORTED_PROPERTIES = {
    "CertificateSigningRequest": "bulk registration",
    "CertificatePem": "bulk registration",
    "CACertificatePem": "bulk registration",
}


def _check_property(name: str, expr: object, kind: str, ctx: _Context, where: str) -> None:
    if kind == OBJECT:
        if not isinstance(expr, dict) or _is_call(expr):
            raise TemplateError(f"{where}: {name} must be an object of names to values")
        for key, value in expr.items():
            _check_kind(value, STR, ctx, f"{where}.{key}")
    elif kind == DOCUMENT:
        if isinstance(expr, dict) and not _is_call(expr):
            _check_document(
                expr, ctx, where
            )  # an inline policy object, as AWS's fleet provisioning example has
        else:
            _check_kind(expr, STR, ctx, where)
            if isinstance(expr, str):
                try:
                    policy.validate_policy(expr)
                except InvalidRequest as e:
                    raise TemplateError(f"{where}: {e.message}") from None
    else:
        _check_kind(expr, kind, ctx, where)
        if name == "Status" and isinstance(expr, str) and expr.upper() not in _CERTIFICATE_STATUSES:
            raise TemplateError(f"{where}: Status must be ACTIVE or INACTIVE, not {expr!r}")


def _check_document(expr: object, ctx: _Context, where: str) -> None:
    """An inline JSON policy: plain JSON, except that a function call anywhere is evaluated."""
    if _is_call(expr) or (isinstance(expr, dict) and any(_looks_like_call(k) for k in expr)):
        _check(expr, ctx, where)
    elif isinstance(expr, dict):
        for key, value in expr.items():
            _check_document(value, ctx, f"{where}.{key}")
    elif isinstance(expr, list):
        for i, item in enumerate(expr):
            _check_document(item, ctx, f"{where}[{i}]")


def _apply_document(expr: object, scope: _Scope, where: str) -> object:
    if _is_call(expr):
        return _value(expr, scope, where)
    if isinstance(expr, dict):
        return {key: _apply_document(value, scope, f"{where}.{key}") for key, value in expr.items()}
    if isinstance(expr, list):
        return [_apply_document(item, scope, f"{where}[{i}]") for i, item in enumerate(expr)]
    return expr


def _check_resource(logical_name: str, resource: object, ctx: _Context) -> Resource:
    where = f"Resources.{logical_name}"
    if not isinstance(resource, dict):
        raise TemplateError(f"{where}: must be an object")
    unknown = set(resource) - {"Type", "Properties", "OverrideSettings"}
    if unknown:
        raise TemplateError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    kind = resource.get("Type")
    if not isinstance(kind, str) or kind not in _RESOURCE_SPECS:
        raise TemplateError(f"{where}: Type must be one of {', '.join(_RESOURCE_SPECS)}, not {kind!r}")
    spec = _RESOURCE_SPECS[kind]
    properties = resource.get("Properties", {})
    if not isinstance(properties, dict):
        raise TemplateError(f"{where}.Properties: must be an object")
    for name, expr in properties.items():
        if name in _UNSUPPORTED_PROPERTIES and kind == CERTIFICATE:
            raise TemplateError(
                f"{where}.Properties.{name}: not supported ({_UNSUPPORTED_PROPERTIES[name]}); "
                "fleet provisioning and JITP templates name the certificate with CertificateId"
            )
        if name not in spec.properties:
            raise TemplateError(f"{where}.Properties: unknown property {name!r} for {kind}")
        _check_property(name, expr, spec.properties[name], ctx, f"{where}.Properties.{name}")
    missing = sorted(spec.required - set(properties))
    if missing:
        raise TemplateError(f"{where}.Properties: {kind} needs {missing[0]}")
    if kind == POLICY and len({"PolicyName", "PolicyDocument"} & set(properties)) != 1:
        raise TemplateError(f"{where}.Properties: {POLICY} needs exactly one of PolicyName or PolicyDocument")
    return Resource(logical_name, kind, properties, _check_overrides(resource, kind, spec, where))


def _check_overrides(
    resource: Mapping[str, object], kind: str, spec: _ResourceSpec, where: str
) -> dict[str, str]:
    settings = resource.get("OverrideSettings", {})
    if not isinstance(settings, dict):
        raise TemplateError(f"{where}.OverrideSettings: must be an object")
    if settings and not spec.overrides:
        raise TemplateError(f"{where}.OverrideSettings: not available for {kind}")
    overrides: dict[str, str] = {}
    for key, action in settings.items():
        name = _OVERRIDE_ALIASES.get(key) or str(key)
        allowed = spec.overrides.get(name)
        if allowed is None:
            choices = ", ".join(spec.overrides)
            raise TemplateError(
                f"{where}.OverrideSettings: {key!r} cannot be overridden; use one of {choices}"
            )
        if action not in allowed:
            raise TemplateError(
                f"{where}.OverrideSettings.{key}: must be one of {', '.join(sorted(allowed))}, not {action!r}"
            )
        overrides[name] = str(action)
    return overrides


# --- the sections ----------------------------------------------------------------------------


def _section(body: Mapping[str, object], name: str) -> dict[str, object]:
    value = body.get(name, {})
    if not isinstance(value, dict):
        raise TemplateError(f"{name}: must be an object")
    return value


def _check_parameters(section: Mapping[str, object]) -> dict[str, Parameter]:
    parameters = {}
    for name, declaration in section.items():
        where = f"Parameters.{name}"
        if not isinstance(declaration, dict):
            raise TemplateError(f"{where}: must be an object with a Type")
        unknown = set(declaration) - set(PARAMETER_KEYS)
        if unknown:
            raise TemplateError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        kind = declaration.get("Type")
        if kind not in PARAMETER_TYPES:
            raise TemplateError(f"{where}: Type must be one of {', '.join(PARAMETER_TYPES)}, not {kind!r}")
        default = declaration.get("Default")
        if isinstance(default, int | float) and not isinstance(default, bool) and kind == "Number":
            default = json.dumps(default)
        if default is not None and not isinstance(default, str):
            raise TemplateError(f"{where}: Default must be a string")
        if default is not None and kind == "Number" and not _NUMBER.fullmatch(default):
            raise TemplateError(f"{where}: Default {default!r} is not a Number")
        parameters[name] = Parameter(name, kind, default)
    return parameters


def _check_mappings(section: Mapping[str, object]) -> dict[str, dict[str, dict[str, object]]]:
    # Mappings are plain data: AWS's template documentation allows no parameters and no functions in them.
    for map_name, top in section.items():
        if not isinstance(top, dict):
            raise TemplateError(f"Mappings.{map_name}: must be an object")
        for top_key, second in top.items():
            if not isinstance(second, dict):
                raise TemplateError(f"Mappings.{map_name}.{top_key}: must be an object")
            for key, value in second.items():
                is_list = isinstance(value, list) and all(isinstance(v, str) for v in value)
                if not isinstance(value, str) and not is_list:
                    raise TemplateError(
                        f"Mappings.{map_name}.{top_key}.{key}: must be a string or a list of strings"
                    )
    return section  # type: ignore[return-value]  # shape checked above


def _check_depth(parsed: object) -> None:
    """TemplateError if containers or function calls nest deeper than the limits; walks without recursion."""
    # `where` names the section, resource and property at fault: the first few levels, not the whole chain.
    stack: list[tuple[object, str, int, int]] = [(parsed, "", 1, 0)]
    while stack:
        node, where, depth, calls = stack.pop()
        if isinstance(node, dict):
            if len(node) == 1 and _looks_like_call(next(iter(node))):
                calls += 1
            children = [(value, _deeper(where, depth, f".{key}")) for key, value in node.items()]
        elif isinstance(node, list):
            children = [(item, _deeper(where, depth, f"[{i}]")) for i, item in enumerate(node)]
        else:
            continue
        if depth > MAX_NESTING:
            raise TemplateError(
                f"{where}: the template nests objects and lists more than {MAX_NESTING} deep, "
                "the limit; flatten it"
            )
        if calls > MAX_FUNCTION_DEPTH:
            raise TemplateError(
                f"{where}: the template nests functions more than {MAX_FUNCTION_DEPTH} deep, "
                "the limit; use fewer nested functions (one Fn::Join or Fn::Sub takes many parts)"
            )
        stack.extend((child, path, depth + 1, calls) for child, path in children)


def _deeper(where: str, depth: int, step: str) -> str:
    if depth > 4:
        return where
    return f"{where}{step}" if where else step.lstrip(".")


def validate_template(body: str) -> Template:
    """Parse and check a template body; TemplateError names the problem."""
    if not isinstance(body, str):
        raise TemplateError("Template body must be a string")
    if len(body) > MAX_BODY_SIZE:
        raise TemplateError(f"Template body is {len(body)} characters; the limit is {MAX_BODY_SIZE}")
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise TemplateError(f"Template body is not valid JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise TemplateError("Template body must be a JSON object")
    _check_depth(parsed)
    for name in parsed:
        if name not in SECTIONS:
            raise TemplateError(f"Template section {name!r} is not supported; use {', '.join(SECTIONS)}")
    if "Resources" not in parsed:
        raise TemplateError("Template has no Resources section")

    parameters = _check_parameters(_section(parsed, "Parameters"))
    mappings = _check_mappings(_section(parsed, "Mappings"))
    ctx = _Context(frozenset(parameters), mappings)

    resources = []
    seen: dict[str, str] = {}
    for logical_name, declaration in _section(parsed, "Resources").items():
        resource = _check_resource(logical_name, declaration, ctx)
        # One thing and one certificate per device; policies may be several ("one or more").
        if resource.type != POLICY and resource.type in seen:
            raise TemplateError(
                f"Resources.{logical_name}: a template has at most one {resource.type} "
                f"(already declared as {seen[resource.type]!r})"
            )
        seen[resource.type] = logical_name
        resources.append(resource)

    device_configuration = _section(parsed, "DeviceConfiguration")
    for key, expr in device_configuration.items():
        _check_kind(expr, STR, ctx, f"DeviceConfiguration.{key}")

    return Template(parameters, mappings, tuple(resources), device_configuration)


# --- evaluation ------------------------------------------------------------------------------


def _resolve_parameters(
    template: Template, parameters: Mapping[str, str], builtins: Mapping[str, str]
) -> dict[str, str]:
    values = {}
    for name, declaration in template.parameters.items():
        # A device must never supply a built-in (it could claim another certificate's id), so names in
        # AWS's namespace come only from the server's built-ins.
        source = builtins if name.startswith("AWS::") else parameters
        value = source.get(name)
        if value is None:
            value = declaration.default
        if value is None:
            if name.startswith("AWS::"):
                raise TemplateEvaluationError(
                    f"Parameter {name} has no value: the certificate does not provide it"
                )
            raise TemplateEvaluationError(f"Parameter {name} is required and has no default")
        if not isinstance(value, str):
            raise TemplateEvaluationError(f"Parameter {name} must be a string")
        if declaration.type == "Number" and not _NUMBER.fullmatch(value):
            raise TemplateEvaluationError(f"Parameter {name} must be a Number, not {value!r}")
        values[name] = value
    return values


def _optional(properties: Mapping[str, object], name: str, scope: _Scope, where: str) -> str | None:
    return _string(properties[name], scope, f"{where}.{name}") if name in properties else None


def _thing_plan(resource: Resource, scope: _Scope) -> ThingPlan:
    where = f"Resources.{resource.logical_name}.Properties"
    props = resource.properties
    name = _string(props["ThingName"], scope, f"{where}.ThingName")
    if not _THING_NAME.fullmatch(name):
        raise TemplateEvaluationError(f"{where}.ThingName: {name!r} is not a valid thing name")
    attribute_exprs = props.get("AttributePayload", {})
    assert isinstance(attribute_exprs, dict)
    attributes = {k: _string(v, scope, f"{where}.AttributePayload.{k}") for k, v in attribute_exprs.items()}
    groups = _list(props["ThingGroups"], scope, f"{where}.ThingGroups") if "ThingGroups" in props else []
    return ThingPlan(
        name=name,
        thing_type_name=_optional(props, "ThingTypeName", scope, where),
        attributes=attributes,
        thing_groups=groups,
        billing_group=_optional(props, "BillingGroup", scope, where),
        overrides=dict(resource.overrides),
    )


def _certificate_plan(resource: Resource, scope: _Scope) -> CertificatePlan:
    where = f"Resources.{resource.logical_name}.Properties"
    certificate_id = _string(resource.properties["CertificateId"], scope, f"{where}.CertificateId")
    status = (_optional(resource.properties, "Status", scope, where) or CertificateStatus.ACTIVE).upper()
    if status not in _CERTIFICATE_STATUSES:
        raise TemplateEvaluationError(f"{where}.Status: must be ACTIVE or INACTIVE, not {status!r}")
    return CertificatePlan(certificate_id, CertificateStatus(status), dict(resource.overrides))


def _policy_plan(resource: Resource, scope: _Scope) -> PolicyPlan:
    where = f"Resources.{resource.logical_name}.Properties"
    if "PolicyName" in resource.properties:
        return PolicyPlan(
            policy_name=_string(resource.properties["PolicyName"], scope, f"{where}.PolicyName")
        )
    expr = resource.properties["PolicyDocument"]
    if isinstance(expr, dict) and not _is_call(expr):
        document = json.dumps(_apply_document(expr, scope, f"{where}.PolicyDocument"))
    else:
        document = _string(expr, scope, f"{where}.PolicyDocument")
    try:
        policy.validate_policy(document)
    except InvalidRequest as e:
        raise TemplateEvaluationError(f"{where}.PolicyDocument: {e.message}") from None
    return PolicyPlan(policy_document=document)


def evaluate(template: Template, parameters: dict[str, str], builtins: dict[str, str]) -> Plan:
    """Resolve every value of the template; TemplateEvaluationError names what cannot be resolved.

    `parameters` are the device's (or the hook's overrides); extra ones are ignored. `builtins` are
    the server's: "AWS::IoT::Certificate::Id" and, for JITP, `certificate_builtins(...)`.
    """
    scope = _Scope(_resolve_parameters(template, parameters, builtins), builtins, template.mappings)
    thing = certificate = None
    policies = []
    for resource in template.resources:
        if resource.type == THING:
            thing = _thing_plan(resource, scope)
        elif resource.type == CERTIFICATE:
            certificate = _certificate_plan(resource, scope)
        else:
            policies.append(_policy_plan(resource, scope))
    device_configuration = {
        key: _string(expr, scope, f"DeviceConfiguration.{key}")
        for key, expr in template.device_configuration.items()
    }
    return Plan(thing, certificate, policies, device_configuration)


def certificate_builtins(cert: x509.Certificate, certificate_id: str) -> dict[str, str]:
    """The built-in parameters JITP offers for a device certificate: its id and subject fields.

    A field the subject lacks is absent, so a template declaring it fails to provision, as AWS does.
    """
    builtins = {"AWS::IoT::Certificate::Id": certificate_id}
    for name, oid in _SUBJECT_FIELDS.items():
        attributes = cert.subject.get_attributes_for_oid(oid)
        if attributes and isinstance(attributes[0].value, str):
            builtins[name] = attributes[0].value
    return builtins
