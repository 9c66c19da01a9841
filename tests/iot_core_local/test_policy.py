"""IoT policy evaluation, driven with plain values: documents, an action, a resource, variables.

Where the condition rules in `ABSENT_KEY_CASES` and `OPERATOR_CASES` come from (AWS IAM User Guide):

- "IAM JSON policy elements: Condition operators": a key absent from the request context makes a
  condition false, except that a negated operator (`StringNotLike`, `ArnNotLike`, ...) is then true;
  `...IfExists` is true when the key is absent and otherwise the plain operator; `Null: "true"` holds
  when the key is absent, `Null: "false"` when it is present; several values under one key are ORed,
  a negated operator holds when the request's value matches none of them; Numeric operators compare
  numbers; ArnEquals and ArnLike match each of an ARN's six colon-separated parts with `*` and `?`.
- "Single-valued vs. multivalued context keys" (set operators): `ForAllValues:` is true when the key
  is absent (no value fails), `ForAnyValue:` is false (no value matches).
- AWS IoT "Retained message policy examples": a retained PUBLISH needs iot:Publish and
  iot:RetainPublish on the topic (tested through a client in test_gateway.py).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iot_core_local.errors import InvalidRequest, MalformedPolicy
from iot_core_local.policy import evaluate, validate_policy

ARN = "arn:aws:iot:us-east-1:123456789012"
CONNECT, PUBLISH, SUBSCRIBE, RECEIVE = "iot:Connect", "iot:Publish", "iot:Subscribe", "iot:Receive"


def doc(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def allow(action: Any, resource: Any, **extra: Any) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": action, "Resource": resource, **extra}


def deny(action: Any, resource: Any, **extra: Any) -> dict[str, Any]:
    return {"Effect": "Deny", "Action": action, "Resource": resource, **extra}


def topic(name: str) -> str:
    return f"{ARN}:topic/{name}"


def topicfilter(name: str) -> str:
    return f"{ARN}:topicfilter/{name}"


def client(name: str) -> str:
    return f"{ARN}:client/{name}"


VARS = {"iot:ClientId": "hub-1", "iot:Connection.Thing.ThingName": "thing-1"}

# (id, statements, action, resource, variables, allowed)
CASES: list[tuple[str, list[dict[str, Any]], str, str, dict[str, str], bool]] = [
    # Allow, default deny
    ("no statements apply", [allow(PUBLISH, topic("a"))], PUBLISH, topic("b"), {}, False),
    ("exact allow", [allow(PUBLISH, topic("a"))], PUBLISH, topic("a"), {}, True),
    ("other action", [allow(PUBLISH, topic("a"))], RECEIVE, topic("a"), {}, False),
    ("action list", [allow([RECEIVE, PUBLISH], topic("a"))], PUBLISH, topic("a"), {}, True),
    ("resource list", [allow(PUBLISH, [topic("x"), topic("a")])], PUBLISH, topic("a"), {}, True),
    ("no prefix match", [allow(PUBLISH, topic("a"))], PUBLISH, topic("ab"), {}, False),
    ("resource is case-sensitive", [allow(PUBLISH, topic("a"))], PUBLISH, topic("A"), {}, False),
    ("action is case-insensitive", [allow("IOT:publish", topic("a"))], PUBLISH, topic("a"), {}, True),
    # Deny wins
    ("deny wins", [allow("iot:*", "*"), deny(PUBLISH, topic("a"))], PUBLISH, topic("a"), {}, False),
    (
        "deny first still wins",
        [deny(PUBLISH, topic("a")), allow("iot:*", "*")],
        PUBLISH,
        topic("a"),
        {},
        False,
    ),
    ("deny elsewhere", [allow("iot:*", "*"), deny(PUBLISH, topic("a"))], PUBLISH, topic("b"), {}, True),
    ("deny other action", [allow("iot:*", "*"), deny(SUBSCRIBE, "*")], PUBLISH, topic("a"), {}, True),
    ("deny alone", [deny(PUBLISH, topic("b"))], PUBLISH, topic("a"), {}, False),
    # action wildcards
    ("iot:*", [allow("iot:*", topic("a"))], SUBSCRIBE, topic("a"), {}, True),
    ("*", [allow("*", topic("a"))], CONNECT, topic("a"), {}, True),
    ("iot:Pub*", [allow("iot:Pub*", topic("a"))], PUBLISH, topic("a"), {}, True),
    ("iot:Pub* not Receive", [allow("iot:Pub*", topic("a"))], RECEIVE, topic("a"), {}, False),
    ("iot:?ublish", [allow("iot:?ublish", topic("a"))], PUBLISH, topic("a"), {}, True),
    ("other service", [allow("greengrass:*", "*")], PUBLISH, topic("a"), {}, False),
    # resource wildcards
    ("* everything", [allow(PUBLISH, "*")], PUBLISH, topic("a/b/c"), {}, True),
    ("* crosses levels", [allow(PUBLISH, topic("a/*"))], PUBLISH, topic("a/b/c"), {}, True),
    ("* matches empty", [allow(PUBLISH, topic("a/*"))], PUBLISH, topic("a/"), {}, True),
    ("* needs the prefix", [allow(PUBLISH, topic("a/*"))], PUBLISH, topic("a"), {}, False),
    ("* in the middle", [allow(PUBLISH, topic("a/*/c"))], PUBLISH, topic("a/b/x/c"), {}, True),
    ("? one character", [allow(PUBLISH, topic("room?"))], PUBLISH, topic("room1"), {}, True),
    ("? not two", [allow(PUBLISH, topic("room?"))], PUBLISH, topic("room12"), {}, False),
    ("* in region", [allow(PUBLISH, "arn:aws:iot:*:*:topic/a")], PUBLISH, topic("a"), {}, True),
    (
        "regex characters are literal",
        [allow(PUBLISH, topic("a.b(c)[d]"))],
        PUBLISH,
        topic("axb(c)[d]"),
        {},
        False,
    ),
    (
        "regex characters match themselves",
        [allow(PUBLISH, topic("a.b(c)"))],
        PUBLISH,
        topic("a.b(c)"),
        {},
        True,
    ),
    ("topic is not topicfilter", [allow(SUBSCRIBE, topic("a"))], SUBSCRIBE, topicfilter("a"), {}, False),
    ("$ is literal", [allow(PUBLISH, topic("$aws/things/x"))], PUBLISH, topic("$aws/things/x"), {}, True),
    ("newline in the topic", [allow(PUBLISH, topic("a/*"))], PUBLISH, topic("a/x\ny"), {}, True),
    # MQTT wildcards are literal characters in a policy
    (
        "+ literal allows +",
        [allow(SUBSCRIBE, topicfilter("some/+/topic"))],
        SUBSCRIBE,
        topicfilter("some/+/topic"),
        {},
        True,
    ),
    (
        "+ is no wildcard",
        [allow(SUBSCRIBE, topicfilter("some/+/topic"))],
        SUBSCRIBE,
        topicfilter("some/x/topic"),
        {},
        False,
    ),
    ("# is no wildcard", [allow(SUBSCRIBE, topicfilter("a/#"))], SUBSCRIBE, topicfilter("a/b"), {}, False),
    ("* allows # filter", [allow(SUBSCRIBE, topicfilter("a/*"))], SUBSCRIBE, topicfilter("a/#"), {}, True),
    ("* allows + filter", [allow(SUBSCRIBE, topicfilter("*"))], SUBSCRIBE, topicfilter("+/x"), {}, True),
    # policy variables
    ("ClientId", [allow(CONNECT, client("${iot:ClientId}"))], CONNECT, client("hub-1"), VARS, True),
    ("ClientId other", [allow(CONNECT, client("${iot:ClientId}"))], CONNECT, client("hub-2"), VARS, False),
    (
        "ThingName",
        [allow(PUBLISH, topic("${iot:Connection.Thing.ThingName}/*"))],
        PUBLISH,
        topic("thing-1/x"),
        VARS,
        True,
    ),
    (
        "ThingName other",
        [allow(PUBLISH, topic("${iot:Connection.Thing.ThingName}/*"))],
        PUBLISH,
        topic("thing-2/x"),
        VARS,
        False,
    ),
    (
        "two variables",
        [allow(PUBLISH, topic("${iot:ClientId}/${iot:Connection.Thing.ThingName}"))],
        PUBLISH,
        topic("hub-1/thing-1"),
        VARS,
        True,
    ),
    (
        "variable value is literal",
        [allow(PUBLISH, topic("${iot:ClientId}/x"))],
        PUBLISH,
        topic("abc/x"),
        {"iot:ClientId": "a*"},
        False,
    ),
    (
        "variable value with regex chars",
        [allow(PUBLISH, topic("${iot:ClientId}"))],
        PUBLISH,
        topic("a.b"),
        {"iot:ClientId": "a.b"},
        True,
    ),
    (
        "variable value . not a wildcard",
        [allow(PUBLISH, topic("${iot:ClientId}"))],
        PUBLISH,
        topic("axb"),
        {"iot:ClientId": "a.b"},
        False,
    ),
    (
        "missing variable: allow does not apply",
        [allow(CONNECT, client("${iot:Connection.Thing.ThingName}"))],
        CONNECT,
        client("hub-1"),
        {"iot:ClientId": "hub-1"},
        False,
    ),
    (
        "missing variable: whole statement",
        [allow(CONNECT, [client("${iot:Connection.Thing.ThingName}"), "*"])],
        CONNECT,
        client("x"),
        {},
        False,
    ),
    (
        "missing variable: deny does not apply",
        [allow("iot:*", "*"), deny(PUBLISH, topic("${iot:Connection.Thing.ThingName}/*"))],
        PUBLISH,
        topic("x/y"),
        {},
        True,
    ),
    (
        "empty variable value",
        [allow(PUBLISH, topic("${iot:ClientId}x"))],
        PUBLISH,
        topic("x"),
        {"iot:ClientId": ""},
        True,
    ),
    ("${*} is a literal *", [allow(PUBLISH, topic("a${*}"))], PUBLISH, topic("a*"), {}, True),
    ("${*} is no wildcard", [allow(PUBLISH, topic("a${*}"))], PUBLISH, topic("ab"), {}, False),
    ("${?} and ${$}", [allow(PUBLISH, topic("${?}${$}"))], PUBLISH, topic("?$"), {}, True),
    (
        "IsAttached in a resource",
        [allow(CONNECT, client("${iot:Connection.Thing.IsAttached}"))],
        CONNECT,
        client("true"),
        {"iot:Connection.Thing.IsAttached": "true"},
        True,
    ),
    # NotAction / NotResource
    (
        "NotAction",
        [{"Effect": "Allow", "NotAction": PUBLISH, "Resource": "*"}],
        SUBSCRIBE,
        topicfilter("a"),
        {},
        True,
    ),
    (
        "NotAction excludes",
        [{"Effect": "Allow", "NotAction": PUBLISH, "Resource": "*"}],
        PUBLISH,
        topic("a"),
        {},
        False,
    ),
    (
        "NotResource",
        [{"Effect": "Deny", "Action": "iot:*", "NotResource": topic("ok")}, allow("iot:*", "*")],
        PUBLISH,
        topic("no"),
        {},
        False,
    ),
    (
        "NotResource excludes",
        [{"Effect": "Deny", "Action": "iot:*", "NotResource": topic("ok")}, allow("iot:*", "*")],
        PUBLISH,
        topic("ok"),
        {},
        True,
    ),
    # conditions
    (
        "Bool IsAttached true",
        [allow(CONNECT, "*", Condition={"Bool": {"iot:Connection.Thing.IsAttached": "true"}})],
        CONNECT,
        client("a"),
        {"iot:Connection.Thing.IsAttached": "true"},
        True,
    ),
    (
        "Bool IsAttached false",
        [allow(CONNECT, "*", Condition={"Bool": {"iot:Connection.Thing.IsAttached": ["true"]}})],
        CONNECT,
        client("a"),
        {"iot:Connection.Thing.IsAttached": "false"},
        False,
    ),
    (
        "Bool key absent",
        [allow(CONNECT, "*", Condition={"Bool": {"iot:Connection.Thing.IsAttached": "true"}})],
        CONNECT,
        client("a"),
        {},
        False,
    ),
    (
        "Bool any case",
        [allow(CONNECT, "*", Condition={"Bool": {"iot:Connection.Thing.IsAttached": "True"}})],
        CONNECT,
        client("a"),
        {"iot:Connection.Thing.IsAttached": "true"},
        True,
    ),
    (
        "StringEquals",
        [allow(CONNECT, "*", Condition={"StringEquals": {"iot:ClientId": ["a", "hub-1"]}})],
        CONNECT,
        client("x"),
        VARS,
        True,
    ),
    (
        "StringEquals no * wildcard",
        [allow(CONNECT, "*", Condition={"StringEquals": {"iot:ClientId": "hub*"}})],
        CONNECT,
        client("x"),
        VARS,
        False,
    ),
    (
        "StringLike",
        [allow(CONNECT, "*", Condition={"StringLike": {"iot:ClientId": "hub-*"}})],
        CONNECT,
        client("x"),
        VARS,
        True,
    ),
    (
        "StringNotLike",
        [deny(CONNECT, "*", Condition={"StringNotLike": {"iot:ClientId": "hub-*"}}), allow(CONNECT, "*")],
        CONNECT,
        client("x"),
        {"iot:ClientId": "rogue"},
        False,
    ),
    (
        "StringNotEquals",
        [allow(CONNECT, "*", Condition={"StringNotEquals": {"iot:ClientId": "hub-2"}})],
        CONNECT,
        client("x"),
        VARS,
        True,
    ),
    (
        "StringEqualsIgnoreCase",
        [allow(CONNECT, "*", Condition={"StringEqualsIgnoreCase": {"iot:ClientId": "HUB-1"}})],
        CONNECT,
        client("x"),
        VARS,
        True,
    ),
    (
        "condition with a variable",
        [
            allow(
                CONNECT,
                "*",
                Condition={"StringEquals": {"iot:ClientId": "${iot:Connection.Thing.ThingName}"}},
            )
        ],
        CONNECT,
        client("x"),
        {**VARS, "iot:ClientId": "thing-1"},
        True,
    ),
    (
        "all conditions must hold",
        [
            allow(
                CONNECT,
                "*",
                Condition={
                    "StringEquals": {"iot:ClientId": "hub-1"},
                    "Bool": {"iot:Connection.Thing.IsAttached": "true"},
                },
            )
        ],
        CONNECT,
        client("x"),
        VARS,
        False,
    ),
    (
        "unsupported operator never matches",
        [allow(CONNECT, "*", Condition={"DateLessThan": {"aws:CurrentTime": "x"}})],
        CONNECT,
        client("x"),
        {"aws:CurrentTime": "x"},
        False,
    ),
    # malformed statements are skipped, the rest still counts
    (
        "bad Effect skipped",
        [{"Effect": "allow", "Action": "*", "Resource": "*"}],
        CONNECT,
        client("a"),
        {},
        False,
    ),
    (
        "no Resource skipped",
        [{"Effect": "Allow", "Action": "*"}, allow(PUBLISH, topic("a"))],
        PUBLISH,
        topic("a"),
        {},
        True,
    ),
    (
        "Action a number skipped",
        [{"Effect": "Allow", "Action": 5, "Resource": "*"}],
        CONNECT,
        client("a"),
        {},
        False,
    ),
    (
        "empty Action list skipped",
        [{"Effect": "Allow", "Action": [], "Resource": "*"}],
        CONNECT,
        client("a"),
        {},
        False,
    ),
    (
        "bad deny skipped, allow counts",
        [{"Effect": "Deny", "Action": [1], "Resource": "*"}, allow("*", "*")],
        CONNECT,
        client("a"),
        {},
        True,
    ),
    ("statement a string skipped", ["nope", allow("*", "*")], CONNECT, client("a"), {}, True),  # type: ignore[list-item]
    (
        "Action and NotAction skipped",
        [{"Effect": "Allow", "Action": "*", "NotAction": "x", "Resource": "*"}],
        CONNECT,
        client("a"),
        {},
        False,
    ),
]
# The Statement may be a single object rather than a list.
_SINGLE = json.dumps({"Version": "2012-10-17", "Statement": allow(PUBLISH, topic("a"))})


@pytest.mark.parametrize(
    ("statements", "action", "resource", "variables", "expected"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_policy_matching(
    statements: list[dict[str, Any]], action: str, resource: str, variables: dict[str, str], expected: bool
) -> None:
    assert evaluate([doc(*statements)], action, resource, variables) is expected


def test_statement_as_a_single_object() -> None:
    assert evaluate([_SINGLE], PUBLISH, topic("a"), {}) is True
    assert evaluate([_SINGLE], PUBLISH, topic("b"), {}) is False


SEVERAL_DOCUMENTS = [
    ("no documents", [], False),
    ("allow in one", [doc(allow(PUBLISH, topic("x"))), doc(allow(PUBLISH, topic("a")))], True),
    ("deny in another wins", [doc(allow("iot:*", "*")), doc(deny(PUBLISH, topic("a")))], False),
    ("a broken document does not spoil the others", ["not json", doc(allow("*", "*"))], True),
    ("non-string document ignored", [None, doc(allow("*", "*"))], True),
]


@pytest.mark.parametrize(
    ("documents", "expected"), [c[1:] for c in SEVERAL_DOCUMENTS], ids=[c[0] for c in SEVERAL_DOCUMENTS]
)
def test_several_documents(documents: list[str], expected: bool) -> None:
    assert evaluate(documents, PUBLISH, topic("a"), {}) is expected


# The claim certificate's policy, as the reference describes it: it can do nothing but provision.
TEMPLATE = "HubTemplate"
CLAIM_POLICY = doc(
    allow(CONNECT, "*"),
    allow(
        [PUBLISH, RECEIVE],
        [
            topic("$aws/certificates/create/*"),
            topic("$aws/certificates/create-from-csr/*"),
            topic(f"$aws/provisioning-templates/{TEMPLATE}/provision/*"),
        ],
    ),
    allow(
        SUBSCRIBE,
        [
            topicfilter("$aws/certificates/create/*"),
            topicfilter("$aws/certificates/create-from-csr/*"),
            topicfilter(f"$aws/provisioning-templates/{TEMPLATE}/provision/*"),
        ],
    ),
)
CLAIM_CASES = [
    (CONNECT, client("any-hub"), True),
    (PUBLISH, topic("$aws/certificates/create/json"), True),
    (PUBLISH, topic("$aws/certificates/create-from-csr/cbor"), True),
    (PUBLISH, topic(f"$aws/provisioning-templates/{TEMPLATE}/provision/json"), True),
    (RECEIVE, topic("$aws/certificates/create-from-csr/json/accepted"), True),
    (RECEIVE, topic(f"$aws/provisioning-templates/{TEMPLATE}/provision/json/rejected"), True),
    (SUBSCRIBE, topicfilter("$aws/certificates/create/json/accepted"), True),
    (SUBSCRIBE, topicfilter("$aws/certificates/create-from-csr/+"), True),
    (SUBSCRIBE, topicfilter(f"$aws/provisioning-templates/{TEMPLATE}/provision/json/rejected"), True),
    (PUBLISH, topic("$aws/provisioning-templates/OtherTemplate/provision/json"), False),
    (SUBSCRIBE, topicfilter("$aws/provisioning-templates/OtherTemplate/provision/json/accepted"), False),
    (PUBLISH, topic("hub/telemetry"), False),
    (SUBSCRIBE, topicfilter("#"), False),
    (SUBSCRIBE, topicfilter("$aws/#"), False),
    (SUBSCRIBE, topicfilter("$aws/certificates/#"), False),
    (RECEIVE, topic("$aws/events/certificates/registered/abc"), False),
    (PUBLISH, topic("$aws/certificates/create"), False),
    (SUBSCRIBE, topic("$aws/certificates/create/json/accepted"), False),
    ("iot:UpdateThingShadow", f"{ARN}:thing/x", False),
]


@pytest.mark.parametrize(
    ("action", "resource", "expected"),
    CLAIM_CASES,
    ids=[f"{a} {r.split(':', 5)[5]}" for a, r, _ in CLAIM_CASES],
)
def test_claim_certificate_policy_allows_only_provisioning(
    action: str, resource: str, expected: bool
) -> None:
    validate_policy(CLAIM_POLICY)
    assert evaluate([CLAIM_POLICY], action, resource, {"iot:ClientId": "hub-1"}) is expected


def test_the_documented_registered_device_policy() -> None:
    # AWS IoT developer guide's publish/subscribe policy example for registered devices: connect as
    # the thing name, publish under it, except .../bar.
    document = doc(
        allow(CONNECT, client("${iot:Connection.Thing.ThingName}")),
        allow(PUBLISH, topic("${iot:Connection.Thing.ThingName}/*")),
        deny(PUBLISH, topic("${iot:Connection.Thing.ThingName}/bar")),
    )
    variables = {"iot:ClientId": "lamp", "iot:Connection.Thing.ThingName": "lamp"}
    assert evaluate([document], CONNECT, client("lamp"), variables)
    assert not evaluate([document], CONNECT, client("other"), variables)
    assert evaluate([document], PUBLISH, topic("lamp/state"), variables)
    assert not evaluate([document], PUBLISH, topic("lamp/bar"), variables)
    assert not evaluate([document], PUBLISH, topic("other/state"), variables)
    # A certificate attached to no thing: the variable is absent, nothing applies.
    assert not evaluate([document], CONNECT, client("lamp"), {"iot:ClientId": "lamp"})


# --- validate_policy -------------------------------------------------------------------------

BAD_POLICIES = [
    ("not JSON", "{", "not valid JSON"),
    ("a list", "[]", "must be a JSON object"),
    ("no Statement", json.dumps({"Version": "2012-10-17"}), "has no Statement"),
    ("Statement a string", json.dumps({"Statement": "x"}), "Statement must be an object or a non-empty list"),
    ("Statement empty", json.dumps({"Statement": []}), "non-empty list"),
    (
        "bad Version",
        json.dumps({"Version": "2020-01-01", "Statement": [allow("*", "*")]}),
        "Version must be one of",
    ),
    (
        "bad Effect",
        doc({"Effect": "Permit", "Action": "*", "Resource": "*"}),
        "Statement 0: Effect must be Allow or Deny, not 'Permit'",
    ),
    ("no Effect", doc({"Action": "*", "Resource": "*"}), "Effect must be Allow or Deny, not None"),
    ("no Action", doc({"Effect": "Allow", "Resource": "*"}), "needs exactly one of Action or NotAction"),
    (
        "Action and NotAction",
        doc({"Effect": "Allow", "Action": "*", "NotAction": "*", "Resource": "*"}),
        "exactly one of Action",
    ),
    ("no Resource", doc({"Effect": "Allow", "Action": "*"}), "needs exactly one of Resource or NotResource"),
    (
        "Action a number",
        doc({"Effect": "Allow", "Action": 1, "Resource": "*"}),
        "Action must be a string or a non-empty list",
    ),
    ("Resource empty", doc({"Effect": "Allow", "Action": "*", "Resource": []}), "Resource must be"),
    (
        "Resource list with a number",
        doc({"Effect": "Allow", "Action": "*", "Resource": ["a", 1]}),
        "Resource must be",
    ),
    ("second statement", doc(allow("*", "*"), {"Effect": "Deny"}), "Statement 1:"),
    ("statement a string", json.dumps({"Statement": ["x"]}), "Statement 0: must be an object"),
    ("Condition a list", doc(allow("*", "*", Condition=[])), "Condition must be an object"),
    (
        "Condition operator",
        doc(allow("*", "*", Condition={"DateLessThan": {}})),
        "unsupported Condition operator 'DateLessThan'",
    ),
    ("Condition block", doc(allow("*", "*", Condition={"Bool": "x"})), "Condition Bool must be an object"),
    (
        "Condition value",
        doc(allow("*", "*", Condition={"Bool": {"k": 1}})),
        "k must be a string or a non-empty list",
    ),
    ("too large", doc(allow("*", [topic(f"t{i}") for i in range(60)])), "the limit is 2048"),
]


@pytest.mark.parametrize(
    ("document", "message"), [c[1:] for c in BAD_POLICIES], ids=[c[0] for c in BAD_POLICIES]
)
def test_validate_policy_rejects(document: str, message: str) -> None:
    with pytest.raises(MalformedPolicy) as raised:
        validate_policy(document)
    assert message in raised.value.message
    assert isinstance(raised.value, InvalidRequest)
    assert raised.value.error_type == "MalformedPolicyException"
    assert raised.value.status == 400


GOOD_POLICIES = [
    ("claim policy", CLAIM_POLICY),
    ("single statement object", _SINGLE),
    ("no Version", json.dumps({"Statement": allow("*", "*")})),
    ("old Version", json.dumps({"Version": "2008-10-17", "Statement": allow("*", "*")})),
    ("NotAction NotResource", doc({"Effect": "Deny", "NotAction": "iot:Connect", "NotResource": "*"})),
    (
        "condition",
        doc(allow(CONNECT, "*", Condition={"Bool": {"iot:Connection.Thing.IsAttached": ["true"]}})),
    ),
    ("whitespace does not count", json.dumps({"Statement": allow("*", "*")}, indent=4) + " " * 3000),
]


@pytest.mark.parametrize("document", [c[1] for c in GOOD_POLICIES], ids=[c[0] for c in GOOD_POLICIES])
def test_validate_policy_accepts(document: str) -> None:
    validate_policy(document)


# --- never raises ----------------------------------------------------------------------------

_WORDS = st.sampled_from(
    [
        "Version",
        "Statement",
        "Effect",
        "Allow",
        "Deny",
        "Action",
        "NotAction",
        "Resource",
        "NotResource",
        "Condition",
        "Bool",
        "StringLike",
        "iot:*",
        "*",
        "${iot:ClientId}",
        "${",
        "}",
        "2012-10-17",
        "iot:Publish",
    ]
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _WORDS | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(_WORDS | st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(
    document=_JSON.map(json.dumps) | st.text(max_size=40),
    action=_WORDS | st.text(max_size=10),
    resource=_WORDS | st.text(max_size=20),
    variables=st.dictionaries(_WORDS | st.just("iot:ClientId"), st.text(max_size=6), max_size=3),
)
def test_evaluate_never_raises(document: str, action: str, resource: str, variables: dict[str, str]) -> None:
    assert evaluate([document], action, resource, variables) in (True, False)
    with contextlib.suppress(MalformedPolicy):
        validate_policy(document)


@settings(max_examples=200, deadline=None)
@given(pattern=st.text(alphabet="ab*?$/+#.{}", max_size=8), value=st.text(alphabet="ab*?$/+#.", max_size=8))
def test_wildcards_agree_with_a_reference_matcher(pattern: str, value: str) -> None:
    document = doc(allow(PUBLISH, topic(pattern)))
    assert evaluate([document], PUBLISH, topic(value), {}) is _reference_match(pattern, value)


def _reference_match(pattern: str, value: str) -> bool:
    """Slow, obviously right: `*` any run, `?` one character, the rest literal (no ${...} in alphabet use)."""
    if "${" in pattern:
        # Variables and escapes are covered by the table; keep the reference simple.
        return evaluate([doc(allow(PUBLISH, topic(pattern)))], PUBLISH, topic(value), {})
    if not pattern:
        return not value
    head, rest = pattern[0], pattern[1:]
    if head == "*":
        return any(_reference_match(rest, value[i:]) for i in range(len(value) + 1))
    if not value:
        return False
    return (head == "?" or head == value[0]) and _reference_match(rest, value[1:])


# ---- conditions on a key the request may lack -------------------------------------------------------

ABSENT = {"iot:ClientId": "hub-1"}  # iot:Connection.Thing.ThingName is absent
THING = "iot:Connection.Thing.ThingName"


def _deny_when(operator: str, value: Any) -> list[dict[str, Any]]:
    """Allow everything, but Deny when `operator` holds for the thing name: denied iff the condition holds."""
    return [allow("*", "*"), deny("*", "*", Condition={operator: {THING: value}})]


# (operator, value, condition holds when the key is absent)
ABSENT_KEY_CASES: list[tuple[str, Any, bool]] = [
    ("StringEquals", "thing-1", False),
    ("StringNotEquals", "thing-1", True),
    ("StringEqualsIgnoreCase", "thing-1", False),
    ("StringNotEqualsIgnoreCase", "thing-1", True),
    ("StringLike", "*", False),
    ("StringNotLike", "thing-*", True),
    ("Bool", "true", False),
    ("NumericEquals", "1", False),
    ("NumericNotEquals", "1", True),
    ("NumericLessThan", "1", False),
    ("NumericGreaterThanEquals", "1", False),
    ("ArnEquals", "arn:aws:iot:*:*:thing/*", False),
    ("ArnLike", "arn:aws:iot:*:*:thing/*", False),
    ("ArnNotEquals", "arn:aws:iot:*:*:thing/x", True),
    ("ArnNotLike", "arn:aws:iot:*:*:thing/*", True),
    ("StringEqualsIfExists", "thing-1", True),
    ("StringNotEqualsIfExists", "thing-1", True),
    ("StringLikeIfExists", "x*", True),
    ("BoolIfExists", "true", True),
    ("NumericLessThanIfExists", "1", True),
    ("ArnLikeIfExists", "arn:*", True),
    ("ArnNotLikeIfExists", "arn:*", True),
    ("Null", "true", True),
    ("Null", "false", False),
    ("Null", "TRUE", True),
    ("ForAllValues:StringEquals", "thing-1", True),
    ("ForAllValues:StringNotEquals", "thing-1", True),
    ("ForAnyValue:StringEquals", "thing-1", False),
    ("ForAnyValue:StringNotLike", "thing-*", False),
    ("ForAnyValue:StringEqualsIfExists", "thing-1", True),
]


@pytest.mark.parametrize(
    ("operator", "value", "holds"), ABSENT_KEY_CASES, ids=[f"{c[0]}={c[1]}" for c in ABSENT_KEY_CASES]
)
def test_condition_on_an_absent_key(operator: str, value: Any, holds: bool) -> None:
    # The Deny applies exactly when its condition holds: a negated operator fails closed.
    assert evaluate([doc(*_deny_when(operator, value))], PUBLISH, topic("a"), ABSENT) is (not holds)


def test_negated_operator_deny_applies_when_the_key_is_absent() -> None:
    """A Deny for devices that are not thing-1 also covers a device with no thing (fail closed)."""
    document = doc(allow("*", "*"), deny(PUBLISH, "*", Condition={"StringNotEquals": {THING: "thing-1"}}))
    assert evaluate([document], PUBLISH, topic("a"), ABSENT) is False
    assert evaluate([document], PUBLISH, topic("a"), {**ABSENT, THING: "thing-1"}) is True
    assert evaluate([document], PUBLISH, topic("a"), {**ABSENT, THING: "thing-2"}) is False


# (operator, values, request's value, condition holds) with the key present
OPERATOR_CASES: list[tuple[str, Any, str, bool]] = [
    ("StringEquals", ["a", "thing-1"], "thing-1", True),
    ("StringEquals", "Thing-1", "thing-1", False),
    ("StringNotEquals", ["a", "b"], "thing-1", True),
    ("StringNotEquals", ["a", "thing-1"], "thing-1", False),
    ("StringNotEqualsIgnoreCase", "THING-1", "thing-1", False),
    ("StringNotLike", ["x*", "thing-?"], "thing-1", False),
    ("StringNotLike", "x*", "thing-1", True),
    ("StringEqualsIfExists", "thing-1", "thing-1", True),
    ("StringEqualsIfExists", "thing-2", "thing-1", False),
    ("StringNotEqualsIfExists", "thing-1", "thing-1", False),
    ("StringNotEqualsIfExists", "thing-2", "thing-1", True),
    ("Null", "false", "thing-1", True),
    ("Null", "true", "thing-1", False),
    ("Null", ["true", "false"], "thing-1", True),
    ("NumericEquals", "10", "10.0", True),
    ("NumericNotEquals", "10", "11", True),
    ("NumericNotEquals", "10", "10", False),
    ("NumericLessThan", "10", "9", True),
    ("NumericLessThan", "10", "10", False),
    ("NumericLessThanEquals", "10", "10", True),
    ("NumericGreaterThan", "10", "10", False),
    ("NumericGreaterThanEquals", "10", "10", True),
    ("NumericEquals", "10", "ten", False),
    ("NumericNotEquals", "10", "ten", True),
    ("ArnEquals", "arn:aws:iot:*:*:thing/t?", "arn:aws:iot:us-east-1:1:thing/t1", True),
    ("ArnLike", "arn:aws:iot:*:*:thing/*", "arn:aws:iot:us-east-1:1:thing/a:b", True),
    ("ArnLike", "arn:aws:*:thing/*", "arn:aws:iot:us-east-1:1:thing/t1", False),
    ("ArnLike", "arn:aws:iot:*:*:thing/*", "not-an-arn", False),
    ("ArnNotLike", "arn:aws:iot:*:*:thing/*", "arn:aws:iot:us-east-1:1:thing/t1", False),
    ("ArnNotEquals", "arn:aws:iot:*:*:thing/x", "arn:aws:iot:us-east-1:1:thing/t1", True),
    ("ForAllValues:StringEquals", ["thing-1", "x"], "thing-1", True),
    ("ForAllValues:StringEquals", "x", "thing-1", False),
    ("ForAnyValue:StringLike", "thing-*", "thing-1", True),
    ("ForAnyValue:StringNotEquals", "thing-1", "thing-1", False),
    ("BoolIfExists", "false", "true", False),
]


@pytest.mark.parametrize(
    ("operator", "values", "actual", "holds"),
    OPERATOR_CASES,
    ids=[f"{c[0]}={c[1]}<-{c[2]}" for c in OPERATOR_CASES],
)
def test_condition_on_a_present_key(operator: str, values: Any, actual: str, holds: bool) -> None:
    variables = {**ABSENT, THING: actual}
    assert evaluate([doc(*_deny_when(operator, values))], PUBLISH, topic("a"), variables) is (not holds)


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ({"NullIfExists": {THING: "true"}}, "Null takes neither IfExists"),
        ({"ForAnyValue:Null": {THING: "true"}}, "Null takes neither IfExists nor ForAnyValue"),
        ({"Null": {THING: "yes"}}, 'Null takes "true" or "false"'),
        ({"ForAllValues:NumericEquals": {THING: "1"}}, "ForAllValues does not apply to NumericEquals"),
        ({"NumericLessThan": {THING: "ten"}}, "'ten' is not a number"),
        ({"ForSomeValues:StringEquals": {THING: "a"}}, "unsupported Condition operator"),
        ({"IfExists": {THING: "a"}}, "unsupported Condition operator 'IfExists'"),
    ],
)
def test_validate_policy_rejects_bad_conditions(condition: dict[str, Any], message: str) -> None:
    with pytest.raises(MalformedPolicy, match=message):
        validate_policy(doc(allow("*", "*", Condition=condition)))
