"""The template engine, driven with plain values: bodies in, plans or errors out."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import re
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import example, given, settings
from hypothesis import strategies as st

from iot_core_local.errors import InvalidRequest, TemplateError, TemplateEvaluationError
from iot_core_local.model import CertificateStatus
from iot_core_local.templates import (
    BUILTIN_PARAMETERS,
    MAX_BODY_SIZE,
    MAX_FUNCTION_DEPTH,
    MAX_NESTING,
    CertificatePlan,
    Plan,
    PolicyPlan,
    ThingPlan,
    certificate_builtins,
    evaluate,
    validate_template,
)

CERT_ID = "c" * 64
BUILTINS = {"AWS::IoT::Certificate::Id": CERT_ID, "AWS::IoT::Certificate::CommonName": "cn-1"}
PARAMETERS = {
    "Serial": {"Type": "String"},
    "Location": {"Type": "String", "Default": "WA"},
    "Csv": {"Type": "String", "Default": "a,b,c"},
    "Idx": {"Type": "String", "Default": "1"},
}
MAPPINGS = {
    "Regions": {
        "WA": {"Url": "https://wa.example", "Zones": ["wa-1", "wa-2"]},
        "OR": {"Url": "https://or.example"},
    }
}
VALUES = {"Serial": "SN1"}


def body(**sections: Any) -> str:
    """A template body; sections left out get the defaults above (None drops a section)."""
    content: dict[str, Any] = {"Parameters": PARAMETERS, "Mappings": MAPPINGS, "Resources": {}}
    content.update(sections)
    return json.dumps({k: v for k, v in content.items() if v is not None})


def config_value(
    expr: Any, values: dict[str, str] | None = None, builtins: dict[str, str] | None = None
) -> str:
    """Evaluate one expression through DeviceConfiguration, the simplest place that holds one."""
    template = validate_template(body(DeviceConfiguration={"v": expr}))
    plan = evaluate(
        template, VALUES if values is None else values, BUILTINS if builtins is None else builtins
    )
    return plan.device_configuration["v"]


def thing(**properties: Any) -> dict[str, Any]:
    return {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": "t1", **properties}}


CERTIFICATE = {
    "Type": "AWS::IoT::Certificate",
    "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}},
}


# --- intrinsic functions ---------------------------------------------------------------------

INTRINSICS = [
    # Ref
    ("Ref parameter", {"Ref": "Serial"}, "SN1"),
    ("Ref default", {"Ref": "Location"}, "WA"),
    ("Ref built-in, undeclared", {"Ref": "AWS::IoT::Certificate::Id"}, CERT_ID),
    ("Ref JITP built-in", {"Ref": "AWS::IoT::Certificate::CommonName"}, "cn-1"),
    ("literal string", "plain", "plain"),
    # Fn::Join
    ("Join", {"Fn::Join": ["-", ["a", {"Ref": "Serial"}]]}, "a-SN1"),
    ("Join empty delimiter", {"Fn::Join": ["", ["a", "b", "c"]]}, "abc"),
    ("Join empty list", {"Fn::Join": [",", []]}, ""),
    ("Join one value", {"Fn::Join": [",", ["only"]]}, "only"),
    ("Join of Split", {"Fn::Join": ["|", {"Fn::Split": [",", {"Ref": "Csv"}]}]}, "a|b|c"),
    (
        "Join of a mapped list",
        {"Fn::Join": [",", {"Fn::FindInMap": ["Regions", "WA", "Zones"]}]},
        "wa-1,wa-2",
    ),
    (
        "Join of Joins",
        {"Fn::Join": ["/", [{"Fn::Join": ["", ["x", "y"]]}, {"Fn::Join": ["", ["z"]]}]]},
        "xy/z",
    ),
    # Fn::Select
    ("Select", {"Fn::Select": [1, ["x", "y", "z"]]}, "y"),
    ("Select index as string", {"Fn::Select": ["0", ["x", "y"]]}, "x"),
    ("Select index from Ref", {"Fn::Select": [{"Ref": "Idx"}, ["x", "y"]]}, "y"),
    ("Select of Split", {"Fn::Select": [2, {"Fn::Split": [",", {"Ref": "Csv"}]}]}, "c"),
    ("Select of functions", {"Fn::Select": [0, [{"Ref": "Serial"}, "b"]]}, "SN1"),
    ("Select of a mapped list", {"Fn::Select": [1, {"Fn::FindInMap": ["Regions", "WA", "Zones"]}]}, "wa-2"),
    # Fn::Split (a list: seen through Select or Join)
    ("Split without the delimiter", {"Fn::Select": [0, {"Fn::Split": [",", "abc"]}]}, "abc"),
    ("Split keeps empty fields", {"Fn::Join": ["+", {"Fn::Split": [",", "a,,b"]}]}, "a++b"),
    ("Split multi-char delimiter", {"Fn::Select": [1, {"Fn::Split": ["::", "a::b::c"]}]}, "b"),
    ("Split of Sub", {"Fn::Select": [1, {"Fn::Split": ["-", {"Fn::Sub": "x-${Serial}"}]}]}, "SN1"),
    # Fn::FindInMap
    ("FindInMap", {"Fn::FindInMap": ["Regions", "OR", "Url"]}, "https://or.example"),
    (
        "FindInMap key from Ref",
        {"Fn::FindInMap": ["Regions", {"Ref": "Location"}, "Url"]},
        "https://wa.example",
    ),
    (
        "FindInMap key from Select",
        {"Fn::FindInMap": ["Regions", {"Fn::Select": [0, ["OR", "WA"]]}, "Url"]},
        "https://or.example",
    ),
    (
        "FindInMap name from Sub",
        {"Fn::FindInMap": [{"Fn::Sub": ["${N}", {"N": "Regions"}]}, "OR", "Url"]},
        "https://or.example",
    ),
    # Fn::Sub
    ("Sub parameter", {"Fn::Sub": "hub-${Serial}"}, "hub-SN1"),
    ("Sub built-in", {"Fn::Sub": "${AWS::IoT::Certificate::Id}/x"}, f"{CERT_ID}/x"),
    ("Sub nothing to substitute", {"Fn::Sub": "plain $ {x} $x"}, "plain $ {x} $x"),
    ("Sub literal ${!Name}", {"Fn::Sub": "${!Serial}"}, "${Serial}"),
    ("Sub variable map", {"Fn::Sub": ["${A}-${Serial}", {"A": "x"}]}, "x-SN1"),
    ("Sub map shadows a parameter", {"Fn::Sub": ["${Serial}", {"Serial": "local"}]}, "local"),
    (
        "Sub map value is a function",
        {"Fn::Sub": ["${U}", {"U": {"Fn::FindInMap": ["Regions", "WA", "Url"]}}]},
        "https://wa.example",
    ),
    ("Sub repeated", {"Fn::Sub": "${Serial}${Serial}"}, "SN1SN1"),
    ("Sub list form, empty map", {"Fn::Sub": ["${Location}", {}]}, "WA"),
    # nesting, arbitrarily deep
    (
        "deep nesting",
        {
            "Fn::Join": [
                "/",
                [
                    {
                        "Fn::Sub": [
                            "${X}",
                            {
                                "X": {
                                    "Fn::Select": [
                                        0,
                                        {
                                            "Fn::Split": [
                                                "//",
                                                {"Fn::FindInMap": ["Regions", {"Ref": "Location"}, "Url"]},
                                            ]
                                        },
                                    ]
                                }
                            },
                        ]
                    },
                    "end",
                ],
            ]
        },
        "https:/end",
    ),
]


@pytest.mark.parametrize(("expr", "expected"), [c[1:] for c in INTRINSICS], ids=[c[0] for c in INTRINSICS])
def test_intrinsic_functions(expr: Any, expected: str) -> None:
    assert config_value(expr) == expected


# Expressions the template check refuses, and a fragment of the message (which names the place).
BAD_EXPRESSIONS = [
    ("Ref not a string", {"Ref": ["Serial"]}, "Ref takes a parameter name"),
    ("Ref undeclared", {"Ref": "Nope"}, "Ref to undeclared parameter 'Nope'"),
    ("Ref unknown AWS name", {"Ref": "AWS::Region"}, "undeclared parameter 'AWS::Region'"),
    ("Join one argument", {"Fn::Join": [","]}, "Fn::Join takes a list of 2 arguments"),
    ("Join not a list", {"Fn::Join": "a,b"}, "Fn::Join takes a list of 2 arguments"),
    ("Join delimiter not a string", {"Fn::Join": [1, ["a"]]}, "delimiter must be a string"),
    ("Join of a string", {"Fn::Join": [",", "abc"]}, "expected a list, got a string"),
    ("Join of a Ref", {"Fn::Join": [",", {"Ref": "Serial"}]}, "expected a list, got a string"),
    ("Join of nested list", {"Fn::Join": [",", [["a"]]]}, "[1][0]: expected a string, got a list"),
    ("Select negative", {"Fn::Select": [-1, ["a"]]}, "non-negative integer"),
    ("Select word index", {"Fn::Select": ["one", ["a"]]}, "non-negative integer"),
    ("Select boolean index", {"Fn::Select": [True, ["a"]]}, "non-negative integer"),
    ("Select out of range", {"Fn::Select": [2, ["a", "b"]]}, "index 2 is out of range"),
    ("Select of a string", {"Fn::Select": [0, "abc"]}, "expected a list, got a string"),
    ("Select three arguments", {"Fn::Select": [0, ["a"], "x"]}, "Fn::Select takes a list of 2"),
    (
        "Select index is a list",
        {"Fn::Select": [{"Fn::Split": [",", "1"]}, ["a"]]},
        "expected a string, got a list",
    ),
    ("Split empty delimiter", {"Fn::Join": ["", {"Fn::Split": ["", "abc"]}]}, "non-empty string"),
    ("Split one argument", {"Fn::Join": ["", {"Fn::Split": [","]}]}, "Fn::Split takes a list of 2"),
    ("Split of a list", {"Fn::Join": ["", {"Fn::Split": [",", ["a"]]}]}, "expected a string, got a list"),
    ("Split used as a string", {"Fn::Split": [",", "a,b"]}, "expected a string, got a list"),
    ("FindInMap two keys", {"Fn::FindInMap": ["Regions", "WA"]}, "Fn::FindInMap takes a list of 3"),
    ("FindInMap unknown map", {"Fn::FindInMap": ["Nope", "WA", "Url"]}, "finds no 'Nope'"),
    ("FindInMap unknown top key", {"Fn::FindInMap": ["Regions", "TX", "Url"]}, "finds no 'TX'"),
    ("FindInMap unknown second key", {"Fn::FindInMap": ["Regions", "OR", "Zones"]}, "finds no 'Zones'"),
    (
        "FindInMap list as a string",
        {"Fn::FindInMap": ["Regions", "WA", "Zones"]},
        "expected a string, got a list",
    ),
    (
        "FindInMap key is a number",
        {"Fn::FindInMap": ["Regions", 1, "Url"]},
        "expected a string or a function",
    ),
    ("Sub not a string", {"Fn::Sub": 5}, "Fn::Sub takes a string"),
    ("Sub map not an object", {"Fn::Sub": ["${A}", ["A"]]}, "Fn::Sub takes a string"),
    ("Sub undeclared", {"Fn::Sub": "x-${Nope}"}, "undeclared parameter 'Nope'"),
    ("Sub GetAtt-style", {"Fn::Sub": "${thing.Arn}"}, "undeclared parameter 'thing.Arn'"),
    ("Sub unterminated", {"Fn::Sub": "x-${Serial"}, "unterminated"),
    ("Sub map value a list", {"Fn::Sub": ["${A}", {"A": ["x"]}]}, "[1].A: expected a string, got a list"),
    ("unsupported function", {"Fn::GetAtt": ["thing", "Arn"]}, "unsupported function Fn::GetAtt"),
    ("Fn::If", {"Fn::If": ["c", "a", "b"]}, "unsupported function Fn::If"),
    ("call with extra key", {"Ref": "Serial", "x": 1}, "must be the only key"),
    ("plain object", {"a": "b"}, "expected a string or a function, got an object"),
    ("number", 5, "got a number"),
    ("null", None, "got null"),
    ("boolean", True, "got a boolean"),
    ("error deep inside", {"Fn::Join": ["", [{"Fn::Sub": ["${X}", {"X": {"Ref": "Nope"}}]}]]}, "'Nope'"),
]


@pytest.mark.parametrize(
    ("expr", "message"), [c[1:] for c in BAD_EXPRESSIONS], ids=[c[0] for c in BAD_EXPRESSIONS]
)
def test_bad_expressions_are_template_errors(expr: Any, message: str) -> None:
    with pytest.raises(TemplateError) as raised:
        validate_template(body(DeviceConfiguration={"v": expr}))
    assert message in raised.value.message
    assert raised.value.message.startswith("DeviceConfiguration.v")


# Well-formed expressions that only fail with the values of one request.
EVALUATION_ERRORS = [
    (
        "Select index from Ref out of range",
        {"Fn::Select": [{"Ref": "Idx"}, ["a"]]},
        {"Idx": "5"},
        "out of range",
    ),
    (
        "Select index from Ref not a number",
        {"Fn::Select": [{"Ref": "Idx"}, ["a"]]},
        {"Idx": "x"},
        "non-negative",
    ),
    (
        "Select of Split out of range",
        {"Fn::Select": [3, {"Fn::Split": [",", {"Ref": "Csv"}]}]},
        {},
        "index 3",
    ),
    (
        "FindInMap key from Ref missing",
        {"Fn::FindInMap": ["Regions", {"Ref": "Location"}, "Url"]},
        {"Location": "TX"},
        "finds no 'TX'",
    ),
    (
        "FindInMap value a list",
        {"Fn::FindInMap": ["Regions", {"Ref": "Location"}, "Zones"]},
        {},
        "expected a string, got a list",
    ),
    (
        "FindInMap value a string",
        {"Fn::Join": ["", {"Fn::FindInMap": ["Regions", {"Ref": "Location"}, "Url"]}]},
        {},
        "expected a list, got a string",
    ),
    (
        "Ref built-in absent",
        {"Ref": "AWS::IoT::Certificate::Country"},
        {},
        "no value for AWS::IoT::Certificate::Country",
    ),
    (
        "Sub built-in absent",
        {"Fn::Sub": "${AWS::IoT::Certificate::Title}"},
        {},
        "no value for AWS::IoT::Certificate::Title",
    ),
]


@pytest.mark.parametrize(
    ("expr", "values", "message"), [c[1:] for c in EVALUATION_ERRORS], ids=[c[0] for c in EVALUATION_ERRORS]
)
def test_evaluation_errors(expr: Any, values: dict[str, str], message: str) -> None:
    with pytest.raises(TemplateEvaluationError) as raised:
        config_value(expr, {**VALUES, **values})
    assert message in raised.value.message
    assert raised.value.message.startswith("DeviceConfiguration.v")


# --- template validation ---------------------------------------------------------------------

BAD_TEMPLATES = [
    ("not JSON", "{", "not valid JSON"),
    ("a list", "[]", "must be a JSON object"),
    ("too large", json.dumps({"Resources": {}, "DeviceConfiguration": {"k": "x" * 10300}}), "limit is 10240"),
    ("Conditions", body(Conditions={}), "section 'Conditions' is not supported"),
    ("Outputs", body(Outputs={}), "section 'Outputs'"),
    ("no Resources", body(Resources=None), "no Resources section"),
    ("Resources a list", body(Resources=[]), "Resources: must be an object"),
    ("Parameters a list", body(Parameters=[]), "Parameters: must be an object"),
    ("parameter a string", body(Parameters={"P": "String"}), "Parameters.P: must be an object"),
    ("parameter Type", body(Parameters={"P": {"Type": "List<String>"}}), "Parameters.P: Type must be one of"),
    ("parameter no Type", body(Parameters={"P": {}}), "Parameters.P: Type must be"),
    (
        "parameter key",
        body(Parameters={"P": {"Type": "String", "AllowedValues": []}}),
        "unknown key 'AllowedValues'",
    ),
    (
        "parameter Default",
        body(Parameters={"P": {"Type": "String", "Default": 5}}),
        "Parameters.P: Default must be",
    ),
    ("Number Default", body(Parameters={"P": {"Type": "Number", "Default": "five"}}), "is not a Number"),
    (
        "Mappings function",
        body(Mappings={"M": {"a": {"b": {"Ref": "Serial"}}}}),
        "Mappings.M.a.b: must be a string",
    ),
    ("Mappings flat", body(Mappings={"M": {"a": "b"}}), "Mappings.M.a: must be an object"),
    ("Mappings a list", body(Mappings={"M": []}), "Mappings.M: must be an object"),
    ("resource a string", body(Resources={"r": "x"}), "Resources.r: must be an object"),
    ("resource Type", body(Resources={"r": {"Type": "AWS::IoT::Job"}}), "Resources.r: Type must be one of"),
    ("resource no Type", body(Resources={"r": {"Properties": {}}}), "Resources.r: Type must be one of"),
    (
        "resource key",
        body(Resources={"r": {**thing(), "DependsOn": "x"}}),
        "Resources.r: unknown key 'DependsOn'",
    ),
    (
        "Properties a list",
        body(Resources={"r": {"Type": "AWS::IoT::Thing", "Properties": []}}),
        "r.Properties: must be",
    ),
    ("Thing property", body(Resources={"r": thing(Name="x")}), "unknown property 'Name' for AWS::IoT::Thing"),
    ("Thing without ThingName", body(Resources={"r": {"Type": "AWS::IoT::Thing"}}), "needs ThingName"),
    (
        "AttributePayload string",
        body(Resources={"r": thing(AttributePayload="a=b")}),
        "AttributePayload must be an object",
    ),
    (
        "AttributePayload Ref",
        body(Resources={"r": thing(AttributePayload={"Ref": "Serial"})}),
        "must be an object",
    ),
    (
        "attribute number",
        body(Resources={"r": thing(AttributePayload={"a": 1})}),
        "AttributePayload.a: expected a string",
    ),
    (
        "ThingGroups string",
        body(Resources={"r": thing(ThingGroups="g")}),
        "ThingGroups: expected a list, got a string",
    ),
    (
        "ThingTypeName list",
        body(Resources={"r": thing(ThingTypeName=["a"])}),
        "ThingTypeName: expected a string",
    ),
    (
        "BillingGroup undeclared",
        body(Resources={"r": thing(BillingGroup={"Ref": "X"})}),
        "BillingGroup.Ref: Ref to undeclared",
    ),
    (
        "Certificate CSR",
        body(
            Resources={
                "c": {"Type": "AWS::IoT::Certificate", "Properties": {"CertificateSigningRequest": "x"}}
            }
        ),
        "Resources.c.Properties.CertificateSigningRequest: not supported",
    ),
    (
        "Certificate PEM",
        body(Resources={"c": {"Type": "AWS::IoT::Certificate", "Properties": {"CertificatePem": "x"}}}),
        "CertificatePem: not supported",
    ),
    (
        "Certificate without id",
        body(Resources={"c": {"Type": "AWS::IoT::Certificate", "Properties": {"Status": "ACTIVE"}}}),
        "needs CertificateId",
    ),
    (
        "Certificate Status",
        body(
            Resources={
                "c": {
                    "Type": "AWS::IoT::Certificate",
                    "Properties": {"CertificateId": "x", "Status": "REVOKED"},
                }
            }
        ),
        "Status must be ACTIVE or INACTIVE, not 'REVOKED'",
    ),
    (
        "Policy both",
        body(
            Resources={
                "p": {
                    "Type": "AWS::IoT::Policy",
                    "Properties": {"PolicyName": "a", "PolicyDocument": {"Ref": "Serial"}},
                }
            }
        ),
        "exactly one of PolicyName or PolicyDocument",
    ),
    (
        "Policy neither",
        body(Resources={"p": {"Type": "AWS::IoT::Policy"}}),
        "exactly one of PolicyName or PolicyDocument",
    ),
    (
        "PolicyDocument not JSON",
        body(Resources={"p": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyDocument": "{nope"}}}),
        "Resources.p.Properties.PolicyDocument: Policy document is not valid JSON",
    ),
    (
        "PolicyDocument bad Effect",
        body(
            Resources={
                "p": {
                    "Type": "AWS::IoT::Policy",
                    "Properties": {
                        "PolicyDocument": json.dumps(
                            {"Statement": {"Effect": "Maybe", "Action": "*", "Resource": "*"}}
                        )
                    },
                }
            }
        ),
        "Effect must be Allow or Deny",
    ),
    (
        "PolicyDocument bad call inside",
        body(
            Resources={
                "p": {
                    "Type": "AWS::IoT::Policy",
                    "Properties": {"PolicyDocument": {"Statement": [{"Ref": "X"}]}},
                }
            }
        ),
        "PolicyDocument.Statement[0].Ref: Ref to undeclared parameter 'X'",
    ),
    (
        "two things",
        body(Resources={"a": thing(), "b": thing()}),
        "Resources.b: a template has at most one AWS::IoT::Thing",
    ),
    (
        "two certificates",
        body(Resources={"a": CERTIFICATE, "b": CERTIFICATE}),
        "at most one AWS::IoT::Certificate",
    ),
    (
        "OverrideSettings on a policy",
        body(
            Resources={
                "p": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": "a"}, "OverrideSettings": {}}
            }
        ),
        None,
    ),
    (
        "OverrideSettings non-empty on a policy",
        body(
            Resources={
                "p": {
                    "Type": "AWS::IoT::Policy",
                    "Properties": {"PolicyName": "a"},
                    "OverrideSettings": {"PolicyName": "FAIL"},
                }
            }
        ),
        "OverrideSettings: not available for AWS::IoT::Policy",
    ),
    (
        "override action",
        body(Resources={"r": {**thing(), "OverrideSettings": {"AttributePayload": "OVERWRITE"}}}),
        "OverrideSettings.AttributePayload: must be one of DO_NOTHING, FAIL, MERGE, REPLACE, not 'OVERWRITE'",
    ),
    (
        "MERGE on ThingTypeName",
        body(Resources={"r": {**thing(), "OverrideSettings": {"ThingTypeName": "MERGE"}}}),
        "OverrideSettings.ThingTypeName: must be one of DO_NOTHING, FAIL, REPLACE",
    ),
    (
        "MERGE on certificate Status",
        body(Resources={"c": {**CERTIFICATE, "OverrideSettings": {"Status": "MERGE"}}}),
        "OverrideSettings.Status: must be one of DO_NOTHING, FAIL, REPLACE",
    ),
    (
        "override ThingName",
        body(Resources={"r": {**thing(), "OverrideSettings": {"ThingName": "REPLACE"}}}),
        "'ThingName' cannot be overridden",
    ),
    (
        "OverrideSettings a list",
        body(Resources={"r": {**thing(), "OverrideSettings": []}}),
        "OverrideSettings: must be",
    ),
    (
        "DeviceConfiguration nested",
        body(DeviceConfiguration={"a": {"b": "c"}}),
        "DeviceConfiguration.a: expected a string",
    ),
    (
        "DeviceConfiguration list",
        body(DeviceConfiguration={"a": ["b"]}),
        "DeviceConfiguration.a: expected a string, got a list",
    ),
    ("DeviceConfiguration a list", body(DeviceConfiguration=[]), "DeviceConfiguration: must be an object"),
    (
        "DeviceConfiguration number",
        body(DeviceConfiguration={"a": 1}),
        "DeviceConfiguration.a: expected a string or a function",
    ),
]


@pytest.mark.parametrize(
    ("text", "message"), [c[1:] for c in BAD_TEMPLATES], ids=[c[0] for c in BAD_TEMPLATES]
)
def test_bad_templates(text: str, message: str | None) -> None:
    if message is None:  # a row that documents an accepted edge
        validate_template(text)
        return
    with pytest.raises(TemplateError) as raised:
        validate_template(text)
    assert message in raised.value.message
    assert isinstance(raised.value, InvalidRequest)
    assert raised.value.status == 400


def test_template_error_and_template_evaluation_error_are_invalid_requests() -> None:
    assert issubclass(TemplateError, InvalidRequest)
    assert issubclass(TemplateEvaluationError, InvalidRequest)
    assert TemplateEvaluationError("x").error_type == "InvalidRequestException"


def test_body_of_exactly_the_limit_is_accepted() -> None:
    text = json.dumps({"Resources": {}, "DeviceConfiguration": {"k": ""}})
    text = text.replace('""', '"' + "x" * (10240 - len(text)) + '"')
    assert len(text) == 10240
    validate_template(text)


# --- the fleet provisioning template of the AWS IoT developer guide, and its JITP one ----------

FLEET_GUIDE_TEMPLATE = {
    "Parameters": {"SerialNumber": {"Type": "String"}, "DeviceLocation": {"Type": "String"}},
    "Mappings": {"LocationTable": {"Seattle": {"LocationUrl": "https://example.aws"}}},
    "Resources": {
        "thing": {
            "Type": "AWS::IoT::Thing",
            "Properties": {
                "ThingName": {"Fn::Join": ["", ["hub_", {"Ref": "SerialNumber"}]]},
                "AttributePayload": {"version": "v1", "serialNumber": "serialNumber"},
                "ThingTypeName": {"Fn::Join": ["", ["ThingPrefix_", {"Ref": "SerialNumber"}]]},
                "ThingGroups": ["v1-lightbulbs", "WA"],
                "BillingGroup": "LightBulbBillingGroup",
            },
            "OverrideSettings": {
                "AttributePayload": "MERGE",
                "ThingTypeName": "REPLACE",
                "ThingGroups": "DO_NOTHING",
            },
        },
        "certificate": {
            "Type": "AWS::IoT::Certificate",
            "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "Active"},
        },
        "policy": {
            "Type": "AWS::IoT::Policy",
            "Properties": {
                "PolicyDocument": {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Action": ["iot:Publish"],
                            "Resource": ["arn:aws:iot:us-east-1:123456789012:topic/foo/bar"],
                        }
                    ],
                }
            },
        },
    },
    "DeviceConfiguration": {
        "FallbackUrl": "https://www.example.com/test-site",
        "LocationUrl": {"Fn::FindInMap": ["LocationTable", {"Ref": "DeviceLocation"}, "LocationUrl"]},
    },
}


def test_fleet_provisioning_template_from_the_guide() -> None:
    template = validate_template(json.dumps(FLEET_GUIDE_TEMPLATE))
    plan = evaluate(
        template,
        {"SerialNumber": "123", "DeviceLocation": "Seattle", "Unused": "ignored"},
        {"AWS::IoT::Certificate::Id": CERT_ID},
    )
    document = json.dumps(FLEET_GUIDE_TEMPLATE["Resources"]["policy"]["Properties"]["PolicyDocument"])  # type: ignore[index]
    assert plan == Plan(
        thing=ThingPlan(
            name="hub_123",
            thing_type_name="ThingPrefix_123",
            attributes={"version": "v1", "serialNumber": "serialNumber"},
            thing_groups=["v1-lightbulbs", "WA"],
            billing_group="LightBulbBillingGroup",
            overrides={"AttributePayload": "MERGE", "ThingTypeName": "REPLACE", "ThingGroups": "DO_NOTHING"},
        ),
        certificate=CertificatePlan(certificate_id=CERT_ID, status=CertificateStatus.ACTIVE),
        policies=[PolicyPlan(policy_document=document)],
        device_configuration={
            "FallbackUrl": "https://www.example.com/test-site",
            "LocationUrl": "https://example.aws",
        },
    )
    assert json.loads(plan.policies[0].policy_document or "") == json.loads(document)


def jitp_template(*subject_parameters: str) -> str:
    """The guide's JITP template, declaring the given subject built-ins as parameters."""
    return json.dumps(
        {
            "Parameters": {
                name: {"Type": "String"} for name in ("AWS::IoT::Certificate::Id", *subject_parameters)
            },
            "Resources": {
                "thing": {
                    "Type": "AWS::IoT::Thing",
                    "Properties": {
                        "ThingName": {"Ref": "AWS::IoT::Certificate::CommonName"},
                        "AttributePayload": {
                            "version": "v1",
                            "serialNumber": {"Ref": "AWS::IoT::Certificate::SerialNumber"},
                        },
                        "ThingTypeName": "lightBulb-versionA",
                        "ThingGroups": ["v1-lightbulbs", {"Ref": "AWS::IoT::Certificate::Country"}],
                    },
                    "OverrideSettings": {
                        "AttributePayload": "MERGE",
                        "ThingTypeName": "REPLACE",
                        "ThingGroups": "DO_NOTHING",
                    },
                },
                "certificate": {
                    "Type": "AWS::IoT::Certificate",
                    "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"},
                    "OverrideSettings": {"Status": "DO_NOTHING"},
                },
                "policy": {
                    "Type": "AWS::IoT::Policy",
                    "Properties": {
                        "PolicyDocument": json.dumps(
                            {
                                "Version": "2012-10-17",
                                "Statement": [
                                    {
                                        "Effect": "Allow",
                                        "Action": ["iot:Publish"],
                                        "Resource": ["arn:aws:iot:us-east-1:123456789012:topic/foo/bar"],
                                    }
                                ],
                            }
                        )
                    },
                },
            },
        }
    )


def make_certificate(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


JITP_SUBJECT = (
    (NameOID.COMMON_NAME, "bulb-17"),
    (NameOID.SERIAL_NUMBER, "SN-17"),
    (NameOID.COUNTRY_NAME, "US"),
)


def test_jitp_template_from_the_guide_with_certificate_builtins() -> None:
    template = validate_template(
        jitp_template(
            "AWS::IoT::Certificate::CommonName",
            "AWS::IoT::Certificate::SerialNumber",
            "AWS::IoT::Certificate::Country",
        )
    )
    builtins = certificate_builtins(make_certificate(*JITP_SUBJECT), CERT_ID)
    plan = evaluate(template, {}, builtins)
    assert plan.thing is not None
    assert plan.thing.name == "bulb-17"
    assert plan.thing.attributes == {"version": "v1", "serialNumber": "SN-17"}
    assert plan.thing.thing_groups == ["v1-lightbulbs", "US"]
    assert plan.certificate == CertificatePlan(CERT_ID, CertificateStatus.ACTIVE, {"Status": "DO_NOTHING"})
    assert plan.device_configuration == {}


def test_jitp_fails_when_the_certificate_lacks_a_declared_field() -> None:
    template = validate_template(
        jitp_template("AWS::IoT::Certificate::CommonName", "AWS::IoT::Certificate::Country")
    )
    builtins = certificate_builtins(make_certificate((NameOID.COMMON_NAME, "bulb-17")), CERT_ID)
    with pytest.raises(TemplateEvaluationError, match="AWS::IoT::Certificate::Country has no value"):
        evaluate(template, {}, builtins)


SUBJECT_FIELDS = [
    (NameOID.COMMON_NAME, "CommonName"),
    (NameOID.SERIAL_NUMBER, "SerialNumber"),
    (NameOID.COUNTRY_NAME, "Country"),
    (NameOID.ORGANIZATION_NAME, "Organization"),
    (NameOID.ORGANIZATIONAL_UNIT_NAME, "OrganizationalUnit"),
    (NameOID.DN_QUALIFIER, "DistinguishedNameQualifier"),
    (NameOID.STATE_OR_PROVINCE_NAME, "StateName"),
    (NameOID.LOCALITY_NAME, "Locality"),
    (NameOID.TITLE, "Title"),
    (NameOID.PSEUDONYM, "Pseudonym"),
    (NameOID.EMAIL_ADDRESS, "Email"),
]


@pytest.mark.parametrize(("oid", "field"), SUBJECT_FIELDS, ids=[f for _, f in SUBJECT_FIELDS])
def test_certificate_builtins_each_subject_field(oid: x509.ObjectIdentifier, field: str) -> None:
    value = "US" if oid == NameOID.COUNTRY_NAME else f"value-of-{field}"
    builtins = certificate_builtins(make_certificate((oid, value)), CERT_ID)
    assert builtins == {"AWS::IoT::Certificate::Id": CERT_ID, f"AWS::IoT::Certificate::{field}": value}
    assert set(builtins) <= BUILTIN_PARAMETERS


def test_certificate_builtins_of_an_empty_subject() -> None:
    assert certificate_builtins(make_certificate(), "id") == {"AWS::IoT::Certificate::Id": "id"}


# --- parameters ------------------------------------------------------------------------------


def test_missing_parameter_is_named() -> None:
    template = validate_template(body(DeviceConfiguration={"v": {"Ref": "Serial"}}))
    with pytest.raises(TemplateEvaluationError, match="Parameter Serial is required and has no default"):
        evaluate(template, {}, BUILTINS)


def test_unused_declared_parameter_is_still_required() -> None:
    # AWS checks every declared parameter, used or not (JITP fails on any subject field missing).
    template = validate_template(body())
    with pytest.raises(TemplateEvaluationError, match="Serial"):
        evaluate(template, {}, BUILTINS)


def test_extra_parameters_are_ignored() -> None:
    plan = evaluate(validate_template(body()), {"Serial": "1", "Other": "x"}, BUILTINS)
    assert plan == Plan(None, None, [], {})


def test_a_device_cannot_supply_a_builtin() -> None:
    # The certificate id comes from the server, never from RegisterThing's parameters.
    text = body(
        Parameters={"AWS::IoT::Certificate::Id": {"Type": "String"}},
        DeviceConfiguration={
            "a": {"Ref": "AWS::IoT::Certificate::Id"},
            "b": {"Fn::Sub": "${AWS::IoT::Certificate::Id}"},
        },
    )
    plan = evaluate(validate_template(text), {"AWS::IoT::Certificate::Id": "forged"}, BUILTINS)
    assert plan.device_configuration == {"a": CERT_ID, "b": CERT_ID}
    undeclared = validate_template(
        body(Parameters={}, DeviceConfiguration={"a": {"Ref": "AWS::IoT::Certificate::Id"}})
    )
    assert evaluate(undeclared, {"AWS::IoT::Certificate::Id": "forged"}, BUILTINS).device_configuration == {
        "a": CERT_ID
    }


NUMBER_PARAMETERS = [
    ("integer", "42", None),
    ("negative decimal", "-1.5", None),
    ("word", "forty", "must be a Number"),
    ("empty", "", "must be a Number"),
]


@pytest.mark.parametrize(
    ("value", "error"), [c[1:] for c in NUMBER_PARAMETERS], ids=[c[0] for c in NUMBER_PARAMETERS]
)
def test_number_parameters(value: str, error: str | None) -> None:
    template = validate_template(
        body(Parameters={"N": {"Type": "Number"}}, DeviceConfiguration={"n": {"Ref": "N"}})
    )
    if error is None:
        assert evaluate(template, {"N": value}, {}).device_configuration == {"n": value}
    else:
        with pytest.raises(TemplateEvaluationError, match=error):
            evaluate(template, {"N": value}, {})


def test_number_default_may_be_a_json_number() -> None:
    template = validate_template(
        body(Parameters={"N": {"Type": "Number", "Default": 3}}, DeviceConfiguration={"n": {"Ref": "N"}})
    )
    assert evaluate(template, {}, {}).device_configuration == {"n": "3"}


def test_non_string_parameter_value_is_a_provisioning_error() -> None:
    template = validate_template(body())
    with pytest.raises(TemplateEvaluationError, match="Parameter Serial must be a string"):
        evaluate(template, {"Serial": 5}, {})  # type: ignore[dict-item]


# --- resources -------------------------------------------------------------------------------


def plan_of(resources: dict[str, Any], values: dict[str, str] | None = None) -> Plan:
    return evaluate(validate_template(body(Resources=resources)), {**VALUES, **(values or {})}, BUILTINS)


def test_thing_defaults() -> None:
    assert plan_of({"t": thing()}).thing == ThingPlan("t1", None, {}, [], None, {})


def test_thing_groups_from_a_function() -> None:
    plan = plan_of({"t": thing(ThingGroups={"Fn::Split": [",", {"Ref": "Csv"}]})})
    assert plan.thing is not None
    assert plan.thing.thing_groups == ["a", "b", "c"]


THING_NAMES = [
    ("valid", "hub_SN-1:a", None),
    ("space", "hub 1", "is not a valid thing name"),
    ("slash", "a/b", "is not a valid thing name"),
    ("empty", "", "is not a valid thing name"),
    ("129 characters", "a" * 129, "is not a valid thing name"),
]


@pytest.mark.parametrize(("name", "error"), [c[1:] for c in THING_NAMES], ids=[c[0] for c in THING_NAMES])
def test_thing_name_must_be_what_aws_accepts(name: str, error: str | None) -> None:
    resources = {"t": thing(ThingName={"Ref": "Serial"})}
    if error is None:
        assert plan_of(resources, {"Serial": name}).thing == ThingPlan(name, None, {}, [], None, {})
    else:
        with pytest.raises(TemplateEvaluationError, match=f"Resources.t.Properties.ThingName: .*{error}"):
            plan_of(resources, {"Serial": name})


CERTIFICATE_STATUSES = [
    ("default", None, "ACTIVE", None),
    ("literal", "INACTIVE", "INACTIVE", None),
    ("any case", "Active", "ACTIVE", None),
    ("from a parameter", {"Ref": "Serial"}, "INACTIVE", None),
    ("bad from a parameter", {"Ref": "Location"}, None, "must be ACTIVE or INACTIVE, not 'WA'"),
]


@pytest.mark.parametrize(
    ("status", "expected", "error"),
    [c[1:] for c in CERTIFICATE_STATUSES],
    ids=[c[0] for c in CERTIFICATE_STATUSES],
)
def test_certificate_status(status: Any, expected: str | None, error: str | None) -> None:
    properties: dict[str, Any] = {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}}
    if status is not None:
        properties["Status"] = status
    resources = {"c": {"Type": "AWS::IoT::Certificate", "Properties": properties}}
    if error is None:
        assert expected is not None
        assert plan_of(resources, {"Serial": "inactive"}).certificate == CertificatePlan(
            CERT_ID, CertificateStatus(expected)
        )
    else:
        with pytest.raises(TemplateEvaluationError, match=error):
            plan_of(resources)


OVERRIDES = [
    ("none", "t", {}, {}),
    (
        "all four actions",
        "t",
        {"AttributePayload": "MERGE", "ThingGroups": "FAIL", "ThingTypeName": "REPLACE"},
        {"AttributePayload": "MERGE", "ThingGroups": "FAIL", "ThingTypeName": "REPLACE"},
    ),
    ("DO_NOTHING", "t", {"ThingGroups": "DO_NOTHING"}, {"ThingGroups": "DO_NOTHING"}),
    (
        "prose spelling",
        "t",
        {"ATTRIBUTE_PAYLOAD": "MERGE", "THING_TYPE_NAME": "FAIL", "THING_GROUPS": "MERGE"},
        {"AttributePayload": "MERGE", "ThingTypeName": "FAIL", "ThingGroups": "MERGE"},
    ),
    ("certificate Status", "c", {"Status": "REPLACE"}, {"Status": "REPLACE"}),
    ("certificate Status FAIL", "c", {"Status": "FAIL"}, {"Status": "FAIL"}),
]


@pytest.mark.parametrize(
    ("resource", "settings", "expected"), [c[1:] for c in OVERRIDES], ids=[c[0] for c in OVERRIDES]
)
def test_override_settings(resource: str, settings: dict[str, str], expected: dict[str, str]) -> None:
    declaration = thing() if resource == "t" else dict(CERTIFICATE)
    plan = plan_of({resource: {**declaration, "OverrideSettings": settings}})
    got = plan.thing.overrides if plan.thing else plan.certificate.overrides if plan.certificate else None
    assert got == expected


ALLOW_ALL = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]}
)

POLICIES = [
    ("by name", {"PolicyName": "existing"}, PolicyPlan(policy_name="existing")),
    ("by name from Sub", {"PolicyName": {"Fn::Sub": "p-${Serial}"}}, PolicyPlan(policy_name="p-SN1")),
    ("document string", {"PolicyDocument": ALLOW_ALL}, PolicyPlan(policy_document=ALLOW_ALL)),
    (
        "document from Sub",
        {"PolicyDocument": {"Fn::Sub": ALLOW_ALL.replace('"*"}', '"topic/${Serial}"}')}},
        PolicyPlan(policy_document=ALLOW_ALL.replace('"*"}', '"topic/SN1"}')),
    ),
    (
        "document object with functions",
        {
            "PolicyDocument": {
                "Statement": {"Effect": "Deny", "Action": "iot:*", "Resource": [{"Ref": "Serial"}, "x"]}
            }
        },
        PolicyPlan(
            policy_document=json.dumps(
                {"Statement": {"Effect": "Deny", "Action": "iot:*", "Resource": ["SN1", "x"]}}
            )
        ),
    ),
]


@pytest.mark.parametrize(("properties", "expected"), [c[1:] for c in POLICIES], ids=[c[0] for c in POLICIES])
def test_policy_resources(properties: dict[str, Any], expected: PolicyPlan) -> None:
    plan = plan_of({"p": {"Type": "AWS::IoT::Policy", "Properties": properties}})
    assert plan.policies == [expected]


def test_policy_document_that_evaluates_to_a_bad_policy() -> None:
    message = "Resources.p.Properties.PolicyDocument: Policy document is not valid"
    with pytest.raises(TemplateEvaluationError, match=re.escape(message)):
        plan_of({"p": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyDocument": {"Ref": "Serial"}}}})


def test_several_policies_in_order_and_their_names() -> None:
    plan = plan_of(
        {
            "first": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": "named"}},
            "second": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyDocument": ALLOW_ALL}},
        }
    )
    assert [p.name for p in plan.policies] == ["named", hashlib.sha256(ALLOW_ALL.encode()).hexdigest()]


def test_certificate_id_from_the_builtin() -> None:
    assert plan_of({"c": CERTIFICATE}).certificate == CertificatePlan(CERT_ID, CertificateStatus.ACTIVE)


# --- properties: nothing but TemplateError / TemplateEvaluationError, whatever comes in -------------

_NAMES = ["Serial", "Location", "M", "k", "AWS::IoT::Certificate::Id", "AWS::IoT::Certificate::Country"]
_FUNCTION_NAMES = ["Ref", "Fn::Join", "Fn::Select", "Fn::Split", "Fn::FindInMap", "Fn::Sub", "Fn::GetAtt"]
_PROPERTIES = ["ThingName", "AttributePayload", "ThingGroups", "ThingTypeName", "BillingGroup"]
_PROPERTIES += ["CertificateId", "Status", "PolicyName", "PolicyDocument", "CertificateSigningRequest"]
_TYPES = ["AWS::IoT::Thing", "AWS::IoT::Certificate", "AWS::IoT::Policy", "String", "Number"]
_WORDS = [
    *_NAMES,
    *_TYPES,
    "MERGE",
    "REPLACE",
    "ACTIVE",
    "Active",
    "${Serial}",
    "${k}",
    "${!k}",
    ",",
    "",
    "1",
]
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 5), st.sampled_from([*_WORDS, ALLOW_ALL]), st.text(max_size=5)
)
_KEYS = st.sampled_from([*_NAMES, *_FUNCTION_NAMES, *_PROPERTIES, "Type", "Default"]) | st.text(max_size=3)
# Arbitrary JSON, with function calls (well formed or not) far likelier than chance would make them.
_EXPR = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(_KEYS, inner, max_size=3),
        st.builds(lambda name, arg: {name: arg}, st.sampled_from(_FUNCTION_NAMES), inner),
    ),
    max_leaves=15,
)
_RESOURCE = st.fixed_dictionaries(
    {"Type": st.sampled_from(_TYPES[:3])},
    optional={
        "Properties": st.dictionaries(st.sampled_from(_PROPERTIES), _EXPR, max_size=4),
        "OverrideSettings": st.dictionaries(
            st.sampled_from(_PROPERTIES), st.sampled_from(_WORDS), max_size=2
        ),
    },
)
_PARAMETER = st.fixed_dictionaries(
    {"Type": st.sampled_from(["String", "Number"])}, optional={"Default": _SCALARS}
)
_TEMPLATES = st.fixed_dictionaries(
    {"Resources": st.dictionaries(st.sampled_from(["a", "b", "c"]), _RESOURCE | _EXPR, max_size=3)},
    optional={
        "Parameters": st.dictionaries(st.sampled_from(_NAMES), _PARAMETER | _EXPR, max_size=3),
        "Mappings": st.dictionaries(
            st.sampled_from(_NAMES),
            st.dictionaries(st.sampled_from(_NAMES), st.dictionaries(_KEYS, _EXPR)),
            max_size=2,
        ),
        "DeviceConfiguration": st.dictionaries(st.text(max_size=3), _EXPR, max_size=3),
    },
)


@settings(max_examples=500, deadline=None)
@given(
    document=_TEMPLATES | st.dictionaries(_KEYS, _EXPR, max_size=3) | _EXPR,
    values=st.dictionaries(st.sampled_from(_NAMES), _SCALARS, max_size=3),
)
def test_arbitrary_json_only_raises_template_or_provisioning_errors(
    document: Any, values: dict[str, Any]
) -> None:
    try:
        template = validate_template(json.dumps(document))
    except TemplateError:
        return
    with contextlib.suppress(TemplateEvaluationError):
        evaluate(template, values, BUILTINS)


# Well-formed expressions built from the grammar: check and evaluation must agree on them.
_STRING_LEAVES = st.sampled_from(
    [
        {"Ref": "Serial"},
        {"Ref": "Idx"},
        {"Ref": "AWS::IoT::Certificate::Id"},
        "a,b",
        "WA",
        "OR",
        "Url",
        "Zones",
        "0",
    ]
)


def _expressions(strings: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    lists = st.one_of(
        st.lists(strings, max_size=3),
        st.builds(lambda d, s: {"Fn::Split": [d, s]}, st.sampled_from([",", "-"]), strings),
        st.builds(lambda k: {"Fn::FindInMap": ["Regions", k, "Zones"]}, strings),
    )
    return st.one_of(
        st.builds(lambda d, xs: {"Fn::Join": [d, xs]}, st.sampled_from(["", "-"]), lists),
        st.builds(lambda i, xs: {"Fn::Select": [i, xs]}, st.one_of(st.integers(0, 3), strings), lists),
        st.builds(lambda a, b: {"Fn::FindInMap": ["Regions", a, b]}, strings, strings),
        st.builds(lambda v: {"Fn::Sub": ["${Serial}/${X}", {"X": v}]}, strings),
    )


_EXPRESSIONS = st.recursive(_STRING_LEAVES, _expressions, max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(
    expr=_EXPRESSIONS,
    serial=st.sampled_from(["SN1", "WA", "2", "x,y"]),
    idx=st.sampled_from(["0", "1", "9", "z"]),
)
def test_generated_expressions_evaluate_to_a_string_or_a_provisioning_error(
    expr: Any, serial: str, idx: str
) -> None:
    try:
        template = validate_template(body(DeviceConfiguration={"v": expr}))
    except TemplateError:
        return  # e.g. a literal Select index out of range, or a literal FindInMap key that is absent
    try:
        value = evaluate(template, {"Serial": serial, "Idx": idx}, BUILTINS).device_configuration["v"]
    except TemplateEvaluationError:
        return
    assert isinstance(value, str)


# --- nesting and size limits: refused as a TemplateError, never a RecursionError ---------------


def _nested(function: str, depth: int, leaf: Any = "x") -> Any:
    """`depth` calls of one function, each the argument of the next."""
    expr = leaf
    for _ in range(depth):
        expr = {"Fn::Join": ["", [expr]]} if function == "Fn::Join" else {"Fn::Sub": ["${V}", {"V": expr}]}
    return expr


@pytest.mark.parametrize("function", ["Fn::Join", "Fn::Sub"])
def test_200_nested_functions_are_refused_naming_the_limit(function: str) -> None:
    text = json.dumps(
        {"Resources": {}, "DeviceConfiguration": {"v": _nested(function, 200)}}, separators=(",", ":")
    )
    assert len(text) <= MAX_BODY_SIZE  # the size limit alone does not catch it
    with pytest.raises(TemplateError, match=f"nests functions more than {MAX_FUNCTION_DEPTH} deep"):
        validate_template(text)


@pytest.mark.parametrize("function", ["Fn::Join", "Fn::Sub"])
def test_functions_nested_up_to_the_limit_evaluate(function: str) -> None:
    template = validate_template(body(DeviceConfiguration={"v": _nested(function, MAX_FUNCTION_DEPTH)}))
    assert evaluate(template, VALUES, BUILTINS).device_configuration == {"v": "x"}
    with pytest.raises(TemplateError, match=r"DeviceConfiguration\.v"):
        validate_template(body(DeviceConfiguration={"v": _nested(function, MAX_FUNCTION_DEPTH + 1)}))


def test_deeply_nested_lists_are_refused_naming_the_limit() -> None:
    text = '{"Resources": {}, "DeviceConfiguration": {"v": ' + "[" * 200 + "]" * 200 + "}}"
    assert len(text) <= MAX_BODY_SIZE
    with pytest.raises(TemplateError, match=f"objects and lists more than {MAX_NESTING} deep"):
        validate_template(text)


def test_a_body_over_the_size_limit_is_refused_naming_the_limit() -> None:
    text = body(DeviceConfiguration={"v": "x" * MAX_BODY_SIZE})
    with pytest.raises(TemplateError, match=f"the limit is {MAX_BODY_SIZE}"):
        validate_template(text)


_NESTABLE = st.sampled_from(["Fn::Join", "Fn::Sub", "Fn::Select", "Fn::Split", "Fn::FindInMap", "Ref"])


def _wrap(name: str, inner: Any) -> Any:
    shapes: dict[str, Any] = {
        "Fn::Join": {"Fn::Join": ["-", [inner]]},
        "Fn::Sub": {"Fn::Sub": ["${V}", {"V": inner}]},
        "Fn::Select": {"Fn::Select": [0, [inner]]},
        "Fn::Split": {"Fn::Split": [",", inner]},
        "Fn::FindInMap": {"Fn::FindInMap": ["Regions", inner, "Url"]},
        "Ref": {"Ref": inner},
    }
    return shapes[name]


@settings(max_examples=200, deadline=None)
@example(chain=["Fn::Join"] * 200, leaf="x", place="DeviceConfiguration")  # the 500s of the report
@example(chain=["Fn::Sub"] * 200, leaf="x", place="ThingName")
@example(chain=["Fn::Select", "Fn::Split"] * 150, leaf="a,b", place="PolicyDocument")
@given(
    chain=st.lists(_NESTABLE, min_size=0, max_size=400),
    leaf=st.sampled_from(["x", "WA", {"Ref": "Serial"}, ["a"], 1, None]),
    place=st.sampled_from(["DeviceConfiguration", "ThingName", "PolicyDocument"]),
)
def test_arbitrarily_nested_functions_only_raise_template_errors(
    chain: list[str], leaf: Any, place: str
) -> None:
    expr = leaf
    for name in chain:
        expr = _wrap(name, expr)
    if place == "DeviceConfiguration":
        text = body(DeviceConfiguration={"v": expr})
    elif place == "ThingName":
        text = body(Resources={"t": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": expr}}})
    else:
        document = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": expr}],
        }
        text = body(Resources={"p": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyDocument": document}}})
    try:
        template = validate_template(text)
    except TemplateError:
        return
    with contextlib.suppress(TemplateEvaluationError):
        evaluate(template, VALUES, BUILTINS)
