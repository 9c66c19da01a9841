"""AWS IoT policy evaluation (pure: no I/O, no registry).

The gateway calls `evaluate` on every connect, publish, subscribe and delivery, so each policy
document is parsed and compiled to regular expressions once (`_compile`, cached on the document
string) and a request only runs the compiled matchers.

Semantics, as AWS documents them for IoT policies:

- Explicit `Deny` wins over any `Allow`; nothing allowed means denied.
- `Action` / `NotAction` match case-insensitively with `*` and `?` wildcards (`iot:*`, `iot:Pub*`).
- `Resource` / `NotResource` are ARNs matched case-sensitively with `*` (any characters, `/` included)
  and `?` (one character). MQTT's `+` and `#` are literal characters in a policy: the resource
  `topicfilter/some/+/topic` allows subscribing to exactly that filter, nothing more.
- `${name}` is a policy variable (`iot:ClientId`, `iot:Connection.Thing.ThingName`, ...). Its value is
  matched literally, so a client id of `*` is not a wildcard. A statement that uses a variable the
  request does not have does not apply. `${*}`, `${?}` and `${$}` stand for the literal characters.
- `Condition` supports the String, Bool, Numeric and Arn operators and `Null` (`CONDITION_OPERATORS`),
  each with its `...IfExists` form and, but for Numeric, the `ForAnyValue:`/`ForAllValues:` prefixes.
  A key the request lacks follows IAM's rules (`_Condition`): a positive operator is false, a negated
  one is true (so a Deny on `StringNotEquals` applies), `...IfExists` is true, `Null` tests for it.
- A malformed statement never raises here: it simply does not apply. `validate_policy` is the strict
  check that CreatePolicy runs, so stored documents are well formed.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from .errors import MalformedPolicy
from .recipes.claims import THING_PREFIX

__all__ = [
    "CONDITION_OPERATORS",
    "MAX_DOCUMENT_SIZE",
    "PROVISIONING_CLAIM_POLICY_ID",
    "evaluate",
    "is_provisioning_claim_document",
    "provisioning_claim_document",
    "validate_policy",
]

# AWS IoT quota: a policy document holds at most 2048 characters, whitespace not counted.
MAX_DOCUMENT_SIZE = 2048
VERSIONS = ("2012-10-17", "2008-10-17")
EFFECTS = ("Allow", "Deny")


class _Malformed(ValueError):
    """Internal: why a document or statement is unusable (becomes MalformedPolicy, or a skip)."""


_VARIABLE = re.compile(r"\$\{([^}]*)\}")
# IAM escapes: let a policy say a literal `*`, `?` or `$` where the plain character would be special.
_ESCAPES = {"*": "*", "?": "?", "$": "$"}
_VALUES_CACHE_SIZE = 1024


@functools.lru_cache(maxsize=4096)
def _regex(source: str, flags: int) -> re.Pattern[str]:
    # Patterns with variables are rebuilt per request; the same client mostly repeats the same values.
    return re.compile(source, flags)


@dataclass(frozen=True)
class _Pattern:
    """An Action, Resource or condition value: regex source pieces, some of them variable names."""

    parts: tuple[tuple[bool, str], ...]  # (is_variable, regex source or variable name)
    flags: int
    compiled: re.Pattern[str] | None  # precompiled when the pattern has no variable
    names: tuple[str, ...]  # the variables, in order
    # Per-pattern regexes for the variable values seen lately (a connection repeats its values on every
    # publish, so the regex is built once per client, not once per message).
    _by_values: dict[tuple[str, ...], re.Pattern[str]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def parse(cls, text: str, *, wildcards: bool = True, ignore_case: bool = False) -> _Pattern:
        parts: list[tuple[bool, str]] = []
        position = 0
        for match in _VARIABLE.finditer(text):
            parts.extend(_literal_parts(text[position : match.start()], wildcards))
            name = match.group(1)
            if name in _ESCAPES:
                parts.append((False, re.escape(_ESCAPES[name])))
            else:
                parts.append((True, name))
            position = match.end()
        parts.extend(_literal_parts(text[position:], wildcards))
        flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0)
        names = tuple(name for is_variable, name in parts if is_variable)
        compiled = None if names else re.compile("".join(source for _, source in parts), flags)
        return cls(tuple(parts), flags, compiled, names)

    @property
    def variables(self) -> frozenset[str]:
        return frozenset(self.names)

    def matches(self, value: str, variables: Mapping[str, str]) -> bool:
        """Whole-string match; the caller has checked that every variable is present."""
        compiled = self.compiled
        if compiled is None:
            key = tuple(variables[name] for name in self.names)
            compiled = self._by_values.get(key)
            if compiled is None:
                if len(self._by_values) >= _VALUES_CACHE_SIZE:
                    self._by_values.clear()
                source = "".join(
                    re.escape(variables[text]) if is_var else text for is_var, text in self.parts
                )
                compiled = self._by_values[key] = _regex(source, self.flags)
        return compiled.fullmatch(value) is not None


def _literal_parts(text: str, wildcards: bool) -> list[tuple[bool, str]]:
    if not wildcards:
        return [(False, re.escape(text))] if text else []
    return [(False, ".*" if c == "*" else "." if c == "?" else re.escape(c)) for c in text]


@dataclass(frozen=True)
class _Operator:
    """A condition operator without its `ForAnyValue:`/`ForAllValues:` prefix or `IfExists` suffix."""

    family: str  # String, Bool, Numeric, Arn, Null: how a policy value is parsed and compared
    negated: bool = False  # true when the request's value matches none of the policy's values
    wildcards: bool = False
    ignore_case: bool = False
    compare: str = "=="  # Numeric only


_OPERATORS: Mapping[str, _Operator] = {
    "StringEquals": _Operator("String"),
    "StringNotEquals": _Operator("String", negated=True),
    "StringEqualsIgnoreCase": _Operator("String", ignore_case=True),
    "StringNotEqualsIgnoreCase": _Operator("String", negated=True, ignore_case=True),
    "StringLike": _Operator("String", wildcards=True),
    "StringNotLike": _Operator("String", negated=True, wildcards=True),
    "Bool": _Operator("Bool", ignore_case=True),
    "NumericEquals": _Operator("Numeric"),
    "NumericNotEquals": _Operator("Numeric", negated=True),
    "NumericLessThan": _Operator("Numeric", compare="<"),
    "NumericLessThanEquals": _Operator("Numeric", compare="<="),
    "NumericGreaterThan": _Operator("Numeric", compare=">"),
    "NumericGreaterThanEquals": _Operator("Numeric", compare=">="),
    # ArnEquals and ArnLike are the same test: each of an ARN's six colon-separated parts is matched
    # on its own, wildcards included.
    "ArnEquals": _Operator("Arn", wildcards=True),
    "ArnLike": _Operator("Arn", wildcards=True),
    "ArnNotEquals": _Operator("Arn", negated=True, wildcards=True),
    "ArnNotLike": _Operator("Arn", negated=True, wildcards=True),
    "Null": _Operator("Null"),
}
# The operators a Condition may name, before any `ForAnyValue:`/`ForAllValues:` prefix or `IfExists`.
CONDITION_OPERATORS: frozenset[str] = frozenset(_OPERATORS)
_SET_OPERATORS = ("ForAnyValue", "ForAllValues")
_COMPARE: Mapping[str, Callable[[float, float], bool]] = {
    "==": lambda a, b: a == b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


class _Value(Protocol):
    """One value listed under a condition key, compiled for its operator's family."""

    @property
    def variables(self) -> frozenset[str]: ...

    def matches(self, value: str, variables: Mapping[str, str]) -> bool: ...


@dataclass(frozen=True)
class _Number:
    number: float
    compare: Callable[[float, float], bool]
    variables: frozenset[str] = frozenset()

    def matches(self, value: str, variables: Mapping[str, str]) -> bool:
        try:
            actual = float(value)
        except ValueError:
            return False  # a request value that is no number matches no number
        return self.compare(actual, self.number)


@dataclass(frozen=True)
class _Arn:
    parts: tuple[_Pattern, ...]  # six: arn, partition, service, region, account, resource

    @property
    def variables(self) -> frozenset[str]:
        return frozenset().union(*(part.variables for part in self.parts))

    def matches(self, value: str, variables: Mapping[str, str]) -> bool:
        actual = value.split(":", 5)
        return len(actual) == len(self.parts) and all(
            part.matches(piece, variables) for part, piece in zip(self.parts, actual, strict=True)
        )


@dataclass(frozen=True)
class _Condition:
    """One key under one operator. IAM's rules for a key the request does not have:

    - a positive operator is false, a negated one (`StringNotEquals`, `ArnNotLike`, ...) is true;
    - an `...IfExists` operator is true; `Null: "true"` is true, `Null: "false"` is false;
    - `ForAllValues:` is true (every one of no values matched), `ForAnyValue:` is false.
    Context keys here hold one value, so a set operator sees a set of zero or one value.
    """

    key: str
    values: tuple[_Value, ...]
    negated: bool = False
    if_exists: bool = False
    set_operator: str | None = None
    null: tuple[bool, ...] | None = None  # Null's values: whether the key must be absent

    @property
    def variables(self) -> frozenset[str]:
        return frozenset().union(*(value.variables for value in self.values))

    def holds(self, variables: Mapping[str, str]) -> bool:
        actual = variables.get(self.key)
        if self.null is not None:
            return (actual is None) in self.null
        if actual is None and self.if_exists:
            return True
        present = () if actual is None else (actual,)
        if self.set_operator == "ForAllValues":
            return all(self._one(value, variables) for value in present)
        if self.set_operator == "ForAnyValue":
            return any(self._one(value, variables) for value in present)
        if actual is None:
            return self.negated
        return self._one(actual, variables)

    def _one(self, actual: str, variables: Mapping[str, str]) -> bool:
        return any(value.matches(actual, variables) for value in self.values) != self.negated


def _split_operator(name: str, where: str) -> tuple[_Operator, str | None, bool]:
    """`ForAnyValue:StringNotLikeIfExists` -> (StringNotLike, "ForAnyValue", True)."""
    set_operator, _, base = name.rpartition(":")
    if set_operator and set_operator not in _SET_OPERATORS:
        raise _Malformed(f"{where}: unsupported Condition operator {name!r}")
    if_exists = base.endswith("IfExists") and base != "IfExists"
    base = base.removesuffix("IfExists") if if_exists else base
    operator = _OPERATORS.get(base)
    if operator is None:
        raise _Malformed(f"{where}: unsupported Condition operator {name!r}")
    if operator.family == "Null" and (if_exists or set_operator):
        raise _Malformed(f"{where}: Null takes neither IfExists nor {set_operator or 'a set operator'}")
    if operator.family == "Numeric" and set_operator:
        raise _Malformed(f"{where}: {set_operator} does not apply to {base}")
    return operator, set_operator or None, if_exists


def _value(operator: _Operator, text: str, where: str) -> _Value:
    if operator.family == "Numeric":
        try:
            number = float(text)
        except ValueError:
            raise _Malformed(f"{where}: {text!r} is not a number") from None
        return _Number(number, _COMPARE[operator.compare])
    if operator.family == "Arn":
        return _Arn(tuple(_Pattern.parse(part) for part in text.split(":", 5)))
    return _Pattern.parse(text, wildcards=operator.wildcards, ignore_case=operator.ignore_case)


def _null_values(values: list[str], where: str) -> tuple[bool, ...]:
    if any(value.lower() not in ("true", "false") for value in values):
        raise _Malformed(f'{where}: Null takes "true" or "false"')
    return tuple(value.lower() == "true" for value in values)


def _parse_conditions(value: object, where: str) -> tuple[_Condition, ...]:
    if not isinstance(value, dict):
        raise _Malformed(f"{where}: Condition must be an object")
    conditions = []
    for name, block in value.items():
        operator, set_operator, if_exists = _split_operator(name, where)
        if not isinstance(block, dict):
            raise _Malformed(f"{where}: Condition {name} must be an object")
        for key, expected in block.items():
            texts = _strings({key: expected}, key, f"{where}: Condition {name}")
            if operator.family == "Null":
                conditions.append(_Condition(key, (), null=_null_values(texts, f"{where}: Condition")))
                continue
            values = tuple(_value(operator, text, f"{where}: Condition {name}") for text in texts)
            conditions.append(_Condition(key, values, operator.negated, if_exists, set_operator))
    return tuple(conditions)


@dataclass(frozen=True)
class _Statement:
    allow: bool
    actions: tuple[_Pattern, ...]
    not_action: bool
    resources: tuple[_Pattern, ...]
    not_resource: bool
    conditions: tuple[_Condition, ...]
    variables: frozenset[str]  # every variable the statement needs

    def applies(self, action: str, resource: str, variables: Mapping[str, str]) -> bool:
        if not self.variables <= variables.keys():
            return False
        if any(p.matches(action, variables) for p in self.actions) == self.not_action:
            return False
        if any(p.matches(resource, variables) for p in self.resources) == self.not_resource:
            return False
        return all(condition.holds(variables) for condition in self.conditions)


def _strings(statement: Mapping[str, object], key: str, where: str) -> list[str]:
    value = statement[key]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(item, str) for item in items):
        raise _Malformed(f"{where}: {key} must be a string or a non-empty list of strings")
    return [item for item in items if isinstance(item, str)]


def _one_of(statement: Mapping[str, object], keys: tuple[str, str], where: str) -> str:
    present = [key for key in keys if key in statement]
    if len(present) != 1:
        raise _Malformed(f"{where}: needs exactly one of {keys[0]} or {keys[1]}")
    return present[0]


def _parse_statement(statement: object, where: str) -> _Statement:
    if not isinstance(statement, dict):
        raise _Malformed(f"{where}: must be an object")
    effect = statement.get("Effect")
    if effect not in EFFECTS:
        raise _Malformed(f"{where}: Effect must be Allow or Deny, not {effect!r}")
    action_key = _one_of(statement, ("Action", "NotAction"), where)
    resource_key = _one_of(statement, ("Resource", "NotResource"), where)
    actions = tuple(_Pattern.parse(a, ignore_case=True) for a in _strings(statement, action_key, where))
    resources = tuple(_Pattern.parse(r) for r in _strings(statement, resource_key, where))
    conditions = _parse_conditions(statement["Condition"], where) if "Condition" in statement else ()
    patterns = [*actions, *resources]
    return _Statement(
        allow=effect == "Allow",
        actions=actions,
        not_action=action_key == "NotAction",
        resources=resources,
        not_resource=resource_key == "NotResource",
        conditions=conditions,
        variables=frozenset().union(*(p.variables for p in patterns), *(c.variables for c in conditions)),
    )


def _statements(document: str) -> list[object]:
    try:
        parsed = json.loads(document)
    except (ValueError, RecursionError) as e:
        raise _Malformed(f"Policy document is not valid JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise _Malformed("Policy document must be a JSON object")
    if "Statement" not in parsed:
        raise _Malformed("Policy document has no Statement")
    version = parsed.get("Version", VERSIONS[0])
    if version not in VERSIONS:
        raise _Malformed(f"Policy document Version must be one of {', '.join(VERSIONS)}, not {version!r}")
    statements = parsed["Statement"]
    statements = [statements] if isinstance(statements, dict) else statements
    if not isinstance(statements, list) or not statements:
        raise _Malformed("Policy document Statement must be an object or a non-empty list")
    return statements


@functools.lru_cache(maxsize=1024)
def _compile(document: str) -> tuple[_Statement, ...]:
    """The usable statements of a document; anything malformed is left out, never raised."""
    try:
        statements = _statements(document)
    except _Malformed:
        return ()
    compiled = []
    for index, statement in enumerate(statements):
        try:
            compiled.append(_parse_statement(statement, f"Statement {index}"))
        except _Malformed:
            continue
    return tuple(compiled)


def evaluate(documents: list[str], action: str, resource: str, variables: dict[str, str]) -> bool:
    """Whether the policies allow `action` on `resource` (an ARN): explicit Deny wins, default deny."""
    allowed = False
    for document in documents:
        if not isinstance(document, str):
            continue
        for statement in _compile(document):
            if statement.applies(action, resource, variables):
                if not statement.allow:
                    return False
                allowed = True
    return allowed


def validate_policy(document: str) -> None:
    """CreatePolicy's check: raise MalformedPolicy (an InvalidRequest) naming the problem."""
    if not isinstance(document, str):
        raise MalformedPolicy("Policy document must be a string")
    size = len("".join(document.split()))
    if size > MAX_DOCUMENT_SIZE:
        raise MalformedPolicy(
            f"Policy document is {size} characters without whitespace; the limit is {MAX_DOCUMENT_SIZE}"
        )
    try:
        for index, statement in enumerate(_statements(document)):
            _parse_statement(statement, f"Statement {index}")
    except _Malformed as e:
        raise MalformedPolicy(str(e)) from None


# The client ids provisioned hubs use under this project's recipes: `hub-<serial>` (recipes/claims.py's
# THING_PREFIX) and managed integrations' 32-character managed thing ids (managed.CLAIM_DENIED_CLIENT_IDS;
# a test keeps the two equal, since managed.py cannot be imported here without a cycle). A provisioning
# claim connecting with one of them would take that hub's session over (one connection per client id).
PROVISIONED_CLIENT_IDS = (f"{THING_PREFIX}*", "?" * 32)


# The `Id` of that implicit policy: how the gateway tells it from the policies attached to a certificate
# (a claim may not take a session over when this is all that lets it connect).
PROVISIONING_CLAIM_POLICY_ID = "iot-core-local-provisioning-claim"


def is_provisioning_claim_document(document: str) -> bool:
    """Whether `document` is the implicit policy of a CreateProvisioningClaim certificate."""
    return f'"Id": "{PROVISIONING_CLAIM_POLICY_ID}"' in document and _claim_id(document)


@functools.lru_cache(maxsize=256)
def _claim_id(document: str) -> bool:
    try:
        parsed = json.loads(document)
    except (ValueError, RecursionError):
        return False
    return isinstance(parsed, dict) and parsed.get("Id") == PROVISIONING_CLAIM_POLICY_ID


def provisioning_claim_document(arn_prefix: str, template_name: str) -> str:
    """The implicit policy of a CreateProvisioningClaim certificate: connect (never as a provisioned hub),
    and the provisioning topics of its own template (the MQTT API's certificate topics and that template's
    RegisterThing), nothing else. `arn_prefix` is `arn:aws:iot:REGION:ACCOUNT:`. AWS's SDK samples
    provision with such a certificate directly, with no policy attached."""
    topics = [
        "$aws/certificates/create/*",
        "$aws/certificates/create-from-csr/*",
        f"$aws/provisioning-templates/{template_name}/provision/*",
    ]
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Id": PROVISIONING_CLAIM_POLICY_ID,
            "Statement": [
                {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{arn_prefix}client/*"},
                {
                    "Effect": "Deny",
                    "Action": "iot:Connect",
                    "Resource": [f"{arn_prefix}client/{ids}" for ids in PROVISIONED_CLIENT_IDS],
                },
                {
                    "Effect": "Allow",
                    "Action": ["iot:Publish", "iot:Receive"],
                    "Resource": [f"{arn_prefix}topic/{topic}" for topic in topics],
                },
                {
                    "Effect": "Allow",
                    "Action": "iot:Subscribe",
                    "Resource": [f"{arn_prefix}topicfilter/{topic}" for topic in topics],
                },
            ],
        }
    )
