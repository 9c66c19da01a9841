"""The rest-json codec on its own: no HTTP server, no registry; a small model written here, and botocore's."""

from __future__ import annotations

import base64
import datetime
import json
import re
from typing import Any

import botocore.session
import pytest
from botocore.model import ListShape, MapShape, ServiceModel, Shape, StructureShape
from hypothesis import given, settings
from hypothesis import strategies as st

from iot_core_local.control_plane.restjson import (
    Pager,
    Response,
    RestJsonService,
    _python_pattern,
    java_to_python,
    resume_index,
)
from iot_core_local.errors import InvalidRequest, ResourceAlreadyExists, ServiceError, UnknownOperation

# A made-up service with one of everything the codec reads and writes: greedy and plain labels, routes told
# apart by their query string alone, each location, each shape type, each kind of constraint.
_MODEL: dict[str, Any] = {
    "version": "2.0",
    "metadata": {
        "apiVersion": "2020-01-01",
        "endpointPrefix": "widgets",
        "protocol": "rest-json",
        "serviceFullName": "Widget Service",
        "serviceId": "Widgets",
        "signatureVersion": "v4",
        "signingName": "widgetsvc",
        "uid": "widgets-2020-01-01",
    },
    "operations": {
        "GetObject": {
            "name": "GetObject",
            "http": {"method": "GET", "requestUri": "/objects/{Key+}"},
            "input": {"shape": "KeyInput"},
        },
        "GetObjectTags": {
            "name": "GetObjectTags",
            "http": {"method": "GET", "requestUri": "/objects/{Key}/tags"},
            "input": {"shape": "KeyInput"},
        },
        "ListWidgets": {
            "name": "ListWidgets",
            "http": {"method": "GET", "requestUri": "/widgets"},
            "input": {"shape": "ListInput"},
        },
        "ListArchivedWidgets": {
            "name": "ListArchivedWidgets",
            "http": {"method": "GET", "requestUri": "/widgets?archived"},
        },
        "ListRedWidgets": {
            "name": "ListRedWidgets",
            "http": {"method": "GET", "requestUri": "/widgets?colour=red"},
        },
        "PutWidget": {
            "name": "PutWidget",
            "http": {"method": "POST", "requestUri": "/widgets/{Name}", "responseCode": 201},
            "input": {"shape": "PutWidgetInput"},
            "output": {"shape": "WidgetOutput"},
        },
        "UploadDrawing": {
            "name": "UploadDrawing",
            "http": {"method": "PUT", "requestUri": "/widgets/{Name}/drawing"},
            "input": {"shape": "UploadDrawingInput"},
            "output": {"shape": "UploadDrawingOutput"},
        },
    },
    "shapes": {
        "KeyInput": {
            "type": "structure",
            "required": ["Key"],
            "members": {"Key": {"shape": "Text", "location": "uri", "locationName": "Key"}},
        },
        "ListInput": {
            "type": "structure",
            "members": {
                "MaxResults": {"shape": "PageSize", "location": "querystring", "locationName": "maxResults"},
                "NextToken": {"shape": "Text", "location": "querystring", "locationName": "nextToken"},
                "Ids": {"shape": "IdList", "location": "querystring", "locationName": "id"},
                "Since": {"shape": "Time", "location": "querystring", "locationName": "since"},
                "Ratio": {"shape": "Ratio", "location": "querystring", "locationName": "ratio"},
                "Deep": {"shape": "Flag", "location": "querystring", "locationName": "deep"},
            },
        },
        "PutWidgetInput": {
            "type": "structure",
            "required": ["Name", "Colour"],
            "members": {
                "Name": {"shape": "Name", "location": "uri", "locationName": "Name"},
                "Token": {"shape": "Text", "location": "header", "locationName": "X-Token"},
                "DryRun": {"shape": "Flag", "location": "querystring", "locationName": "dryRun"},
                "Colour": {"shape": "Colour", "locationName": "colour"},
                "Size": {"shape": "Size"},
                "Tags": {"shape": "Tags"},
                "Parts": {"shape": "Parts"},
                "Created": {"shape": "Time"},
                "Data": {"shape": "Data"},
                "Ratio": {"shape": "Ratio"},
                "Spec": {"shape": "Spec"},
            },
        },
        "WidgetOutput": {
            "type": "structure",
            "members": {
                "Name": {"shape": "Name"},
                "Version": {"shape": "Size", "location": "header", "locationName": "X-Version"},
                "Fresh": {"shape": "Flag", "location": "header", "locationName": "X-Fresh"},
                "Status": {"shape": "Size", "location": "statusCode"},
                "Created": {"shape": "Time"},
                "Data": {"shape": "Data"},
                "Tags": {"shape": "Tags"},
                "Parts": {"shape": "Parts"},
                "Spec": {"shape": "Spec", "locationName": "spec"},
            },
        },
        "UploadDrawingInput": {
            "type": "structure",
            "required": ["Name"],
            "members": {
                "Name": {"shape": "Name", "location": "uri", "locationName": "Name"},
                "Drawing": {"shape": "Spec"},
            },
            "payload": "Drawing",
        },
        "UploadDrawingOutput": {
            "type": "structure",
            "members": {"Drawing": {"shape": "Spec"}},
            "payload": "Drawing",
        },
        "Spec": {
            "type": "structure",
            "required": ["Width"],
            "members": {"Width": {"shape": "Size"}, "Label": {"shape": "Text", "locationName": "label"}},
        },
        "Text": {"type": "string"},
        "Name": {"type": "string", "min": 2, "max": 5, "pattern": "^[a-z]+$"},
        "Colour": {"type": "string", "enum": ["RED", "GREEN"]},
        "Size": {"type": "integer", "min": 1, "max": 10},
        "PageSize": {"type": "integer", "min": 1, "max": 250},
        "Ratio": {"type": "double"},
        "Flag": {"type": "boolean"},
        "Time": {"type": "timestamp"},
        "Data": {"type": "blob", "max": 4},
        "Tags": {"type": "map", "key": {"shape": "TagKey"}, "value": {"shape": "Text"}, "max": 2},
        "TagKey": {"type": "string", "max": 3},
        "Parts": {"type": "list", "member": {"shape": "Name"}, "min": 1},
        "IdList": {"type": "list", "member": {"shape": "Size"}},
    },
}

_CALLS: list[tuple[str, dict[str, Any]]] = []


def _put_widget(context: str, params: dict[str, Any]) -> dict[str, Any]:
    _CALLS.append((context, params))
    return {"Name": params["Name"], "Version": 3}


_SERVICE = RestJsonService[str](ServiceModel(_MODEL, service_name="widgets"), {"PutWidget": _put_widget})


def _parse(method: str, path: str, body: bytes = b"", **query: str) -> tuple[str, dict[str, Any]]:
    queries = {k: [v] for k, v in query.items()}
    operation, labels = _SERVICE.route(method, path, queries)
    return operation.name, _SERVICE.parse_request(operation, labels, queries, {}, body)


def _put(body: dict[str, Any], name: str = "abc") -> dict[str, Any]:
    return _parse("POST", f"/widgets/{name}", json.dumps(body).encode())[1]


def _invalid(call: Any) -> str:
    with pytest.raises(InvalidRequest) as error:
        call()
    return error.value.message


# ---- routing ------------------------------------------------------------------------------------


def test_a_greedy_label_takes_slashes_and_a_plain_one_takes_one_encoded_segment() -> None:
    assert _parse("GET", "/objects/a/b/c") == ("GetObject", {"Key": "a/b/c"})
    assert _parse("GET", "/objects/a%2Fb/tags") == ("GetObjectTags", {"Key": "a/b"})
    # The plain label cannot span segments, so the greedy route takes the whole rest, "/tags" included.
    assert _parse("GET", "/objects/a/b/tags") == ("GetObject", {"Key": "a/b/tags"})
    assert _parse("GET", "/objects/caf%C3%A9") == ("GetObject", {"Key": "caf\u00e9"})


def test_routes_told_apart_by_their_query_string() -> None:
    def name(**query: list[str]) -> str:
        return _SERVICE.route("GET", "/widgets", query)[0].name

    assert name() == "ListWidgets"
    assert name(archived=[""]) == "ListArchivedWidgets"
    assert name(archived=["yes"]) == "ListArchivedWidgets"  # a bare key in requestUri: any value
    assert name(colour=["red"]) == "ListRedWidgets"
    assert name(colour=["blue"]) == "ListWidgets"  # key=value in requestUri: that value only
    assert name(colour=["blue", "red"]) == "ListRedWidgets"


def test_no_route_is_unknown_operation_named_after_the_service() -> None:
    for method, path in (("GET", "/nothing"), ("DELETE", "/widgets"), ("GET", "/widgets/abc/x/y")):
        assert _SERVICE.match(method, path, {}) is None
        with pytest.raises(UnknownOperation) as error:
            _SERVICE.route(method, path, {})
        assert error.value.message == f"No Widget Service operation matches {method} {path}"


# ---- parsing and validation ---------------------------------------------------------------------


def test_members_are_read_from_where_the_model_puts_them() -> None:
    operation, labels = _SERVICE.route("POST", "/widgets/abc", {})
    body = json.dumps({"colour": "RED", "Size": 3, "Data": base64.b64encode(b"\x00\xff").decode()}).encode()
    params = _SERVICE.parse_request(operation, labels, {"dryRun": ["TRUE"]}, {"x-token": "t0k"}, body)
    assert params == {
        "Name": "abc",
        "Token": "t0k",
        "DryRun": True,
        "Colour": "RED",
        "Size": 3,
        "Data": b"\x00\xff",
    }


def test_query_string_scalars_and_lists() -> None:
    _, params = _parse(
        "GET", "/widgets", maxResults="5", since="2024-01-02T03:04:05Z", ratio="0.5", deep="false"
    )
    assert params == {
        "MaxResults": 5,
        "Since": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC).timestamp(),
        "Ratio": 0.5,
        "Deep": False,
    }
    assert _parse("GET", "/widgets", since="1700000000.5")[1] == {"Since": 1700000000.5}
    operation, labels = _SERVICE.route("GET", "/widgets", {})
    assert _SERVICE.parse_request(operation, labels, {"id": ["1", "2"]}, {}, b"") == {"Ids": [1, 2]}
    assert (
        _invalid(lambda: _parse("GET", "/widgets", maxResults="x"))
        == "MaxResults must be an integer, not 'x'"
    )
    assert _invalid(lambda: _parse("GET", "/widgets", ratio="half")) == "Ratio must be a number, not 'half'"
    assert _invalid(lambda: _parse("GET", "/widgets", deep="1")) == "Deep must be true or false, not '1'"
    assert (
        _invalid(lambda: _parse("GET", "/widgets", since="noon")) == "Since must be a timestamp, not 'noon'"
    )


@pytest.mark.parametrize(
    ("body", "name", "message"),
    [
        ({}, "abc", "Colour is required"),
        ({"colour": None}, "abc", "Colour is required"),
        ({"colour": "BLUE"}, "abc", "Colour must be one of RED, GREEN, not 'BLUE'"),
        ({"colour": "RED"}, "a", "Name must have at least 2 characters"),
        ({"colour": "RED"}, "abcdef", "Name must have at most 5 characters"),
        ({"colour": "RED"}, "AB", "Name 'AB' does not match the pattern ^[a-z]+$"),
        ({"colour": "RED", "Size": 0}, "abc", "Size must be at least 1"),
        ({"colour": "RED", "Size": 11}, "abc", "Size must be at most 10"),
        ({"colour": "RED", "Data": "AAAAAAA="}, "abc", "Data must have at most 4 bytes"),
        ({"colour": "RED", "Parts": []}, "abc", "Parts must have at least 1 items"),
        ({"colour": "RED", "Parts": ["ok", "X"]}, "abc", "Parts[1] must have at least 2 characters"),
        ({"colour": "RED", "Tags": {"a": "1", "b": "2", "c": "3"}}, "abc", "Tags must have at most 2 items"),
        ({"colour": "RED", "Tags": {"long": "1"}}, "abc", "Tags key must have at most 3 characters"),
        ({"colour": "RED", "Spec": {"label": "x"}}, "abc", "Spec.Width is required"),
        ({"colour": "RED", "Spec": {"Width": 99}}, "abc", "Spec.Width must be at most 10"),
    ],
)
def test_constraints_from_the_model(body: dict[str, Any], name: str, message: str) -> None:
    assert _invalid(lambda: _put(body, name)) == message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"colour": 1}, "Colour must be a string"),
        ({"colour": "RED", "Size": "3"}, "Size must be an integer"),
        ({"colour": "RED", "Size": True}, "Size must be an integer"),
        ({"colour": "RED", "Size": 2.5}, "Size must be an integer"),
        ({"colour": "RED", "Ratio": "x"}, "Ratio must be a number"),
        ({"colour": "RED", "Ratio": False}, "Ratio must be a number"),
        ({"colour": "RED", "Created": "2024-01-01"}, "Created must be a number"),
        ({"colour": "RED", "Data": 5}, "Data must be a base64 string"),
        ({"colour": "RED", "Data": "***"}, "Data must be valid base64"),
        ({"colour": "RED", "Tags": []}, "Tags must be a JSON object"),
        ({"colour": "RED", "Tags": {"k": 1}}, "Tags.k must be a string"),
        ({"colour": "RED", "Parts": "ab"}, "Parts must be a JSON array"),
        ({"colour": "RED", "Spec": [1]}, "Spec must be a JSON object"),
        ({"colour": "RED", "Spec": {"Width": 1, "label": 2}}, "Spec.Label must be a string"),
    ],
)
def test_json_types_from_the_model(body: dict[str, Any], message: str) -> None:
    assert _invalid(lambda: _put(body)) == message


def test_non_finite_numbers_and_bodies_that_are_not_json_objects() -> None:
    assert _invalid(lambda: _parse("POST", "/widgets/abc", b'{"colour": "RED", "Ratio": NaN}')) == (
        "Ratio must be a finite number"
    )
    assert _invalid(lambda: _parse("POST", "/widgets/abc", b'{"colour": "RED", "Created": Infinity}')) == (
        "Created must be a finite number"
    )
    assert (
        _invalid(lambda: _parse("POST", "/widgets/abc", b"[1]")) == "The request body must be a JSON object"
    )
    assert _invalid(lambda: _parse("POST", "/widgets/abc", b"{")).startswith(
        "The request body is not valid JSON"
    )
    assert _invalid(lambda: _parse("POST", "/widgets/abc", b"\xff")).startswith(
        "The request body is not valid JSON"
    )
    assert _invalid(lambda: _parse("POST", "/widgets/abc", b"[" * 100_000 + b"]" * 100_000)).startswith(
        "The request body is not valid JSON"
    )


def test_unknown_body_members_and_nulls_are_ignored() -> None:
    assert _put({"colour": "GREEN", "Size": None, "Extra": {"x": 1}}) == {"Name": "abc", "Colour": "GREEN"}
    assert _put({"colour": "GREEN", "Spec": {"Width": 2, "label": None, "Other": 1}})["Spec"] == {"Width": 2}


def test_a_payload_member_is_the_whole_body() -> None:
    assert _parse("PUT", "/widgets/abc/drawing", b'{"Width": 4, "label": "x"}') == (
        "UploadDrawing",
        {"Name": "abc", "Drawing": {"Width": 4, "Label": "x"}},
    )
    assert _parse("PUT", "/widgets/abc/drawing", b"  ") == ("UploadDrawing", {"Name": "abc"})
    assert _invalid(lambda: _parse("PUT", "/widgets/abc/drawing", b"[]")) == "Drawing must be a JSON object"


def test_an_operation_without_input_takes_nothing() -> None:
    assert _parse("GET", "/widgets", b"{}", archived="") == ("ListArchivedWidgets", {})


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
_MEMBERS = st.sampled_from(["colour", "Size", "Tags", "Parts", "Created", "Data", "Ratio", "Spec", "Token"])


@settings(deadline=None)  # a busy machine must not fail a pure function for its pace
@given(document=st.dictionaries(_MEMBERS, _JSON, max_size=6))
def test_any_json_body_is_parsed_or_refused_with_invalid_request(document: dict[str, Any]) -> None:
    try:
        params = _put(document)
    except InvalidRequest:
        return
    assert params["Colour"] in ("RED", "GREEN")


# ---- output -------------------------------------------------------------------------------------


def test_output_members_go_where_the_model_puts_them() -> None:
    operation = _SERVICE.model.operation_model("PutWidget")
    created = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)
    response = _SERVICE.serialise_response(
        operation,
        {
            "Name": "abc",
            "Version": 7,
            "Fresh": False,
            "Created": created,
            "Data": b"\x00\x01",
            "Tags": {"k": "v"},
            "Parts": ["ab", "cd"],
            "Spec": {"Width": 2, "Label": "x", "Ignored": None},
            "Unknown": "not in the model",
        },
    )
    assert response.status == 201
    assert response.headers == {"X-Version": "7", "X-Fresh": "false"}
    assert json.loads(response.body) == {
        "Name": "abc",
        "Created": created.timestamp(),
        "Data": "AAE=",
        "Tags": {"k": "v"},
        "Parts": ["ab", "cd"],
        "spec": {"Width": 2, "label": "x"},
    }


def test_timestamps_as_numbers_a_status_code_member_and_absent_members() -> None:
    operation = _SERVICE.model.operation_model("PutWidget")
    response = _SERVICE.serialise_response(operation, {"Created": 1700000000, "Status": 202, "Name": None})
    assert response == Response(202, {}, b'{"Created": 1700000000.0}')
    assert _SERVICE.serialise_response(operation, {}) == Response(201, {}, b"{}")


def test_a_payload_member_is_the_whole_output_and_no_output_is_an_empty_object() -> None:
    upload = _SERVICE.model.operation_model("UploadDrawing")
    assert _SERVICE.serialise_response(upload, {"Drawing": {"Width": 3}}) == Response(
        200, {}, b'{"Width": 3}'
    )
    listing = _SERVICE.model.operation_model("ListWidgets")
    assert _SERVICE.serialise_response(listing, {"anything": 1}) == Response(200, {}, b"{}")


_TIMESTAMPS = st.floats(min_value=0, max_value=4e9, allow_nan=False).map(lambda t: round(t, 3))


@settings(deadline=None)  # a busy machine must not fail a pure function for its pace
@given(
    created=_TIMESTAMPS,
    data=st.binary(max_size=4),
    tags=st.dictionaries(st.text(min_size=0, max_size=3), st.text(max_size=10), max_size=2),
    parts=st.lists(st.from_regex(r"[a-z]{2,5}", fullmatch=True), min_size=1, max_size=3),
)
def test_output_reads_back_as_the_same_input(
    created: float, data: bytes, tags: dict[str, str], parts: list[str]
) -> None:
    output = {"Created": created, "Data": data, "Tags": tags, "Parts": parts}
    body = json.loads(_SERVICE.serialise_response(_SERVICE.model.operation_model("PutWidget"), output).body)
    assert _put({"colour": "RED", **body}) == {"Name": "abc", "Colour": "RED", **output}


def test_errors_answer_with_their_type_status_and_body() -> None:
    assert RestJsonService.error_response(InvalidRequest("bad")) == Response(
        400, {"x-amzn-ErrorType": "InvalidRequestException"}, b'{"message": "bad"}'
    )
    exists = ResourceAlreadyExists("there", resource_id="i", resource_arn="a")
    assert RestJsonService.error_response(exists) == Response(
        409,
        {"x-amzn-ErrorType": "ResourceAlreadyExistsException"},
        b'{"message": "there", "resourceId": "i", "resourceArn": "a"}',
    )
    assert RestJsonService.error_response(ServiceError("oops")).status == 500


# ---- handlers -----------------------------------------------------------------------------------


def test_invoke_calls_the_handler_with_its_context_and_parsed_input() -> None:
    _CALLS.clear()
    operation, labels = _SERVICE.route("POST", "/widgets/abc", {})
    response = _SERVICE.invoke("ctx", operation, labels, {}, {}, b'{"colour": "RED"}')
    assert response == Response(201, {"X-Version": "3"}, b'{"Name": "abc"}')
    assert _CALLS == [("ctx", {"Name": "abc", "Colour": "RED"})]
    assert _SERVICE.supported_operations == frozenset({"PutWidget"})


def test_an_operation_without_handler_is_not_supported_even_with_bad_input() -> None:
    operation, labels = _SERVICE.route("PUT", "/widgets/A/drawing", {})
    assert _invalid(lambda: _SERVICE.invoke("ctx", operation, labels, {}, {}, b"not json")) == (
        "Operation UploadDrawing is not supported by iot-core-local"
    )


def test_a_handler_for_an_operation_the_model_lacks_is_refused() -> None:
    with pytest.raises(ValueError, match="widgets has no operation named Nope"):
        RestJsonService(ServiceModel(_MODEL, service_name="widgets"), {"Nope": _put_widget})


# ---- paging -------------------------------------------------------------------------------------

_PAGER = Pager(size_params=("pageSize", "maxResults"), token_params=("marker", "nextToken"), default_size=3)


def _ident(item: int) -> tuple[int]:
    return (item,)


def _pages(items: list[int], params: dict[str, Any]) -> tuple[list[int], str | None]:
    return _PAGER.page(items, params, "ListWidgets", _ident)


def test_pages_and_tokens() -> None:
    items = list(range(7))
    page, token = _pages(items, {})
    assert page == [0, 1, 2]
    assert token is not None
    assert _pages(items, {"maxResults": 5, "nextToken": token}) == ([3, 4, 5, 6], None)
    page, token = _pages(items, {"pageSize": 2, "maxResults": 5})
    assert page == [0, 1]
    assert _pages(items, {"pageSize": 2, "maxResults": 5, "marker": token})[0] == [2, 3]
    assert _PAGER.size({"marker": "", "nextToken": token}) == 3


def test_a_page_resumes_after_the_last_item_handed_out() -> None:
    items = list(range(10))
    page, token = _pages(items, {"pageSize": 3})
    # Its items deleted: the next page starts at 3, not at the offset 3 (which is now 6).
    assert _pages(items[3:], {"pageSize": 3, "marker": token})[0] == [3, 4, 5]
    # The last item handed out gone too, and new items before the resume point: still 3.
    assert _pages([-5, -4, 3, 4, 5, 6], {"pageSize": 3, "marker": token})[0] == [3, 4, 5]
    # Descending order resumes below the last key.
    page, token = _PAGER.page(items[::-1], {"pageSize": 4}, "ListWidgets", _ident, descending=True)
    assert page == [9, 8, 7, 6]
    rest = [5, 4, 3, 2, 1, 0]
    assert _PAGER.page(rest, {"marker": token}, "ListWidgets", _ident, descending=True)[0] == [5, 4, 3]


def test_resume_index() -> None:
    assert resume_index([(1,), (3,), (5,)], (3,)) == 2
    assert resume_index([(1,), (3,), (5,)], (4,)) == 2
    assert resume_index([(1,), (3,), (5,)], (9,)) == 3
    assert resume_index([(5,), (3,), (1,)], (4,), descending=True) == 1
    assert resume_index([], (4,)) == 0


def test_a_token_is_bound_to_its_operation_and_parameters() -> None:
    items = list(range(7))
    _, token = _pages(items, {"colour": "RED"})
    assert _pages(items, {"colour": "RED", "marker": token})[0] == [3, 4, 5]
    assert _pages(items, {"colour": "RED", "marker": token, "pageSize": 1})[0] == [3]  # size may change
    for params, operation in (
        ({"colour": "BLUE", "marker": token}, "ListWidgets"),
        ({"marker": token}, "ListWidgets"),
        ({"colour": "RED", "marker": token}, "ListGadgets"),
    ):
        message = _invalid(lambda p=params, o=operation: _PAGER.page(items, p, o, _ident))
        assert message.startswith("The pagination token '")


@pytest.mark.parametrize(
    "token",
    [
        base64.b64encode(str(2**63).encode()).decode(),  # the offsets tokens once were
        base64.b64encode(b"3").decode(),
        base64.b64encode(b"ten").decode(),
        base64.b64encode(b"\xff\xfe").decode(),
        "not base64!",
        "x" * 200,
        "A" * 40,
    ],
)
def test_tokens_not_handed_out_are_invalid_requests(token: str) -> None:
    message = _invalid(lambda: _pages(list(range(7)), {"marker": token}))
    assert message.startswith("The pagination token '")
    assert "is not valid for this request" in message
    assert len(message) < 250  # a long token is clipped, not echoed whole


def test_tokens_fit_both_services_patterns() -> None:
    names = [f"thing-{i:03d}-" + "x" * 100 for i in range(5)]
    _, token = _PAGER.page(names, {"pageSize": 1}, "ListThings", lambda n: (n, 1.5e9))
    assert token is not None
    assert re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", token)  # AWS IoT's Marker
    assert re.fullmatch(r"[a-zA-Z0-9=_-]+", token)  # managed integrations' NextToken
    assert len(token) <= 1024


@settings(deadline=None)  # a busy machine must not fail a pure function for its pace
@given(items=st.lists(st.integers(), max_size=30, unique=True), size=st.integers(min_value=1, max_value=8))
def test_paging_through_visits_every_item_once_in_order(items: list[int], size: int) -> None:
    items = sorted(items)
    seen: list[int] = []
    params: dict[str, Any] = {"pageSize": size}
    while True:
        page, token = _pages(items, params)
        assert len(page) <= size
        seen += page
        if token is None:
            break
        params = {"pageSize": size, "marker": token}
    assert seen == items


@settings(deadline=None)
@given(
    items=st.lists(st.integers(), max_size=30, unique=True),
    size=st.integers(min_value=1, max_value=8),
    data=st.data(),
)
def test_deleting_listed_items_while_paging_skips_none(items: list[int], size: int, data: Any) -> None:
    live = sorted(items)
    seen: list[int] = []
    params: dict[str, Any] = {"pageSize": size}
    while True:
        page, token = _pages(live, params)
        seen += page
        # Delete any subset of what was handed out so far.
        doomed = data.draw(st.sets(st.sampled_from(page))) if page else set()
        live = [i for i in live if i not in doomed]
        if token is None:
            break
        params = {"pageSize": size, "marker": token}
    assert seen == sorted(items)


# ---- the same codec, other models ---------------------------------------------------------------


def _botocore_model(name: str) -> ServiceModel:
    return botocore.session.get_session().get_service_model(name)


def test_the_codec_reads_managed_integrations_unchanged() -> None:
    service = RestJsonService[None](_botocore_model("iot-managed-integrations"), {})
    assert (service.signing_name, service.title) == (
        "iotmanagedintegrations",
        "Managed integrations for AWS IoT Device Management",
    )
    operation, labels = service.route("GET", "/managed-things/thing-1", {})
    assert (operation.name, labels) == ("GetManagedThing", {"Identifier": "thing-1"})
    assert service.parse_request(operation, labels, {}, {}, b"") == {"Identifier": "thing-1"}
    operation, labels = service.route("GET", "/managed-things/" + "x" * 65, {})
    assert _invalid(lambda: service.parse_request(operation, labels, {}, {}, b"")) == (
        "Identifier must have at most 64 characters"
    )
    with pytest.raises(
        UnknownOperation, match="No Managed integrations for AWS IoT Device Management operation"
    ):
        service.route("GET", "/things", {})


def test_the_codec_routes_aws_iot_greedy_labels() -> None:
    service = RestJsonService[None](_botocore_model("iot"), {})
    arn = "arn:aws:iot:us-east-1:123456789012:ruledestination/http/a%2Fb"
    operation, labels = service.route("GET", f"/destinations/{arn}", {})
    assert (operation.name, labels) == ("GetTopicRuleDestination", {"arn": arn.replace("%2F", "/")})
    assert service.title == "AWS IoT"


# ---- the models' Java patterns --------------------------------------------------------------------


def _input_patterns(model: ServiceModel) -> set[str]:
    patterns: set[str] = set()
    seen: set[str] = set()
    pending: list[Shape] = []
    for name in model.operation_names:
        input_shape = model.operation_model(name).input_shape
        if input_shape is not None:
            pending.append(input_shape)
    while pending:
        shape = pending.pop()
        if shape.name in seen:
            continue
        seen.add(shape.name)
        if "pattern" in shape.metadata:
            patterns.add(shape.metadata["pattern"])
        if isinstance(shape, StructureShape):
            pending.extend(shape.members.values())
        elif isinstance(shape, ListShape):
            pending.append(shape.member)
        elif isinstance(shape, MapShape):
            pending.extend((shape.key, shape.value))
    return patterns


@pytest.mark.parametrize("service", ["iot", "iot-managed-integrations"])
def test_every_pattern_of_the_models_served_is_enforced(service: str) -> None:
    """None is skipped as untranslatable (they once were: \\p{L}, \\x{0022}...)."""
    patterns = _input_patterns(botocore.session.get_session().get_service_model(service))
    assert len(patterns) > 40  # the walk found the models' patterns
    skipped = sorted(p for p in patterns if _python_pattern(p) is None)
    assert skipped == []


@pytest.mark.parametrize(
    ("pattern", "value", "matches"),
    [
        (r"[\p{L}\p{N} ._-]+", "bad/name", False),
        (r"[\p{L}\p{N} ._-]+", "Hub 2 ünï Ω", True),
        (r"[\p{L}\p{N} ._-]+", "\u0663\u00b2", True),  # Arabic-Indic three, superscript two: \p{N}
        (r"[\p{L}\p{N} ._-]+", "_", True),
        (r"[\p{L}\p{N} ._-]+", "tab\there", False),
        (r"[a-z\x{0022}]+", 'a"b', True),
        (r"[a-z\x{0022}]+", "a'b", False),
        (r"[^\p{C}]*", "ok ü \U0001f600", True),
        (r"[^\p{C}]*", "zero\u200bwidth", False),  # Cf, a format character
        (r"[^\p{C}]*", "nul\x00", False),
        (r"[\p{Graph}\x20]*", "a b~", True),
        (r"[\p{Graph}\x20]*", "é", False),  # Java's POSIX classes are ASCII
        (r"[\p{Upper}\p{Digit}_]+", "AB_9", True),
        (r"[\p{Upper}\p{Digit}_]+", "Ab", False),
        (r"\p{L}+", "Wort", True),
        (r"\P{L}+", "123", True),
        (r"[\d]+", "\u0663", False),  # Java's \\d is ASCII digits
        (r"[]a]+", "]a", True),
    ],
)
def test_java_patterns_are_translated(pattern: str, value: str, matches: bool) -> None:
    compiled = _python_pattern(pattern)
    assert compiled is not None
    assert bool(compiled.fullmatch(value)) is matches


def test_a_java_construct_without_a_python_spelling_is_refused_not_guessed() -> None:
    with pytest.raises(ValueError, match="inside a character class"):
        java_to_python(r"[\P{L}a]")
    with pytest.raises(ValueError, match="IsGreek"):
        java_to_python(r"\p{IsGreek}")
    assert _python_pattern(r"\p{IsGreek}") is None
