"""AWS's rest-json protocol, driven by botocore's model of a service: routing, parsing, validation, output.

A `RestJsonService` is built from a botocore `ServiceModel` and a table of handlers (operation name to a
function of a context and the parsed parameters). It knows nothing of HTTP servers or of what the handlers
do: it turns (method, path, query, headers, body) into validated parameters, and a handler's result (or a
`ServiceError`) into (status, headers, body). A path, a parameter's location, a timestamp's encoding or an
error's status code is therefore never written down twice: the model says it once, for every service.

Any operation of the model without a handler is recognised and answered "not supported".
"""

from __future__ import annotations

import base64
import binascii
import datetime
import functools
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import unicodedata
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar, cast

from botocore.model import ListShape, MapShape, OperationModel, ServiceModel, Shape, StructureShape

from iot_core_local.errors import InvalidRequest, ServiceError, UnknownOperation

__all__ = [
    "Cursor",
    "Handler",
    "HandlerTable",
    "Pager",
    "Response",
    "RestJsonService",
    "SortKey",
    "clip",
    "from_json",
    "java_to_python",
    "resume_index",
    "validate",
]

log = logging.getLogger(__name__)

C = TypeVar("C")

# A handler gets its service's context (whatever the service needs: a registry, a CA...) and the parsed,
# validated input members by name; it returns the output members by name (None values are left out).
Handler = Callable[[C, dict[str, Any]], Mapping[str, Any]]


class HandlerTable(dict[str, Handler[C]]):
    """Operation name -> handler, filled at import by the `operation` decorator (one per service module)."""

    def operation(self, name: str) -> Callable[[Handler[C]], Handler[C]]:
        def register(fn: Handler[C]) -> Handler[C]:
            self[name] = fn
            return fn

        return register


class Response(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes


def clip(text: str, limit: int = 80) -> str:
    """`text`, cut to a length that is fit to echo in an error message."""
    return text if len(text) <= limit else text[:limit] + "..."


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _bad(member: str, problem: str) -> InvalidRequest:
    return InvalidRequest(f"{member} {problem}")


# ---- routing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Route:
    operation: OperationModel
    path: re.Pattern[str]
    labels: tuple[str, ...]  # regex group i+1 is the URI label labels[i]
    query: tuple[tuple[str, str | None], ...]  # literal query parts of requestUri ("?a=b", "?c")
    literal_chars: int  # more literal characters = more specific

    def query_matches(self, query: Mapping[str, list[str]]) -> bool:
        return all(key in query and (value is None or value in query[key]) for key, value in self.query)

    def labels_of(self, found: re.Match[str]) -> dict[str, str]:
        return {name: urllib.parse.unquote(found.group(i + 1)) for i, name in enumerate(self.labels)}


def _compile_route(operation: OperationModel) -> _Route:
    uri = operation.http["requestUri"]
    path, _, query = uri.partition("?")
    labels: list[str] = []
    pattern = ""
    pos = 0
    for match in re.finditer(r"\{([^}]+)\}", path):
        pattern += re.escape(path[pos : match.start()])
        name = match.group(1)
        greedy = name.endswith("+")
        labels.append(name.rstrip("+"))
        # Labels match the raw (still percent-encoded) path: botocore encodes "/" in a non-greedy label.
        pattern += "(.+)" if greedy else "([^/]+)"
        pos = match.end()
    pattern += re.escape(path[pos:])
    literal_query = tuple(
        (key, value if sep else None)
        for key, sep, value in (part.partition("=") for part in query.split("&") if part)
    )
    literal = len(re.sub(r"\{[^}]+\}", "", path))
    return _Route(operation, re.compile(pattern), tuple(labels), literal_query, literal)


def _compile_routes(model: ServiceModel) -> dict[str, list[_Route]]:
    by_method: dict[str, list[_Route]] = {}
    for name in model.operation_names:
        operation = model.operation_model(name)
        by_method.setdefault(operation.http["method"], []).append(_compile_route(operation))
    for routes in by_method.values():
        # A route with literal query parts, then a longer literal path, wins over a more general one.
        routes.sort(key=lambda r: (-len(r.query), -r.literal_chars))
    return by_method


# ---- values from the URI, the query string and headers ------------------------------------------


def _integer_from_text(text: str, member: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _bad(member, f"must be an integer, not {text!r}") from None


def _number_from_text(text: str, member: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _bad(member, f"must be a number, not {text!r}") from None


def _boolean_from_text(text: str, member: str) -> bool:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    raise _bad(member, f"must be true or false, not {text!r}")


def _timestamp_from_text(text: str, member: str) -> float:
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise _bad(member, f"must be a timestamp, not {text!r}") from None


_FROM_TEXT: dict[str, Callable[[str, str], Any]] = {
    "integer": _integer_from_text,
    "long": _integer_from_text,
    "double": _number_from_text,
    "float": _number_from_text,
    "boolean": _boolean_from_text,
    "timestamp": _timestamp_from_text,
}


def _scalar_from_text(shape: Shape, text: str, member: str) -> Any:
    """A value from the URI, the query string or a header (strings stay as they are)."""
    parse = _FROM_TEXT.get(shape.type_name)
    return text if parse is None else parse(text, member)


# ---- values from a JSON body --------------------------------------------------------------------


def _structure_from_json(shape: Shape, value: Any, member: str) -> Any:
    if not isinstance(value, dict):
        raise _bad(member, "must be a JSON object")
    result: dict[str, Any] = {}
    for name, member_shape in cast(StructureShape, shape).members.items():
        key = member_shape.serialization.get("name", name)
        if key in value and value[key] is not None:
            result[name] = from_json(member_shape, value[key], _join(member, name))
    return result


def _list_from_json(shape: Shape, value: Any, member: str) -> Any:
    if not isinstance(value, list):
        raise _bad(member, "must be a JSON array")
    item_shape = cast(ListShape, shape).member
    return [from_json(item_shape, item, f"{member}[{i}]") for i, item in enumerate(value)]


# JSON's \ud800 escape alone (no low surrogate after it) decodes to a code point that is no character:
# stored, it would come back as JSON no strict reader (the AWS CLI's) accepts, for every reader after.
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _text(value: str, member: str) -> str:
    if _LONE_SURROGATE.search(value):
        raise _bad(
            member, "has a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair): not text"
        )
    return value


def _map_from_json(shape: Shape, value: Any, member: str) -> Any:
    if not isinstance(value, dict):
        raise _bad(member, "must be a JSON object")
    value_shape = cast(MapShape, shape).value
    result: dict[str, Any] = {}
    for k, v in value.items():
        key = _text(str(k), f"{member} key")
        label = f"{member} value" if shape.metadata.get("sensitive") else f"{member}.{key}"
        result[key] = from_json(value_shape, v, label)
    return result


def _string_from_json(shape: Shape, value: Any, member: str) -> Any:
    if not isinstance(value, str):
        raise _bad(member, "must be a string")
    return _text(value, member)


def _boolean_from_json(shape: Shape, value: Any, member: str) -> Any:
    if not isinstance(value, bool):
        raise _bad(member, "must be true or false")
    return value


def _integer_from_json(shape: Shape, value: Any, member: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(member, "must be an integer")
    return value


def _number_from_json(shape: Shape, value: Any, member: str) -> Any:
    # Timestamps too: rest-json bodies carry them as epoch seconds.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(member, "must be a number")
    if not math.isfinite(value):
        raise _bad(member, "must be a finite number")
    return value


def _blob_from_json(shape: Shape, value: Any, member: str) -> Any:
    if not isinstance(value, str):
        raise _bad(member, "must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(member, "must be valid base64") from None


def _any_from_json(shape: Shape, value: Any, member: str) -> Any:
    # A document member: any JSON, whose strings (keys too) must still be text. A loop, not recursion: a
    # document may nest as deep as json.loads went.
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            _text(item, member)
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
    return value


_FROM_JSON: dict[str, Callable[[Shape, Any, str], Any]] = {
    "structure": _structure_from_json,
    "list": _list_from_json,
    "map": _map_from_json,
    "string": _string_from_json,
    "boolean": _boolean_from_json,
    "integer": _integer_from_json,
    "long": _integer_from_json,
    "double": _number_from_json,
    "float": _number_from_json,
    "timestamp": _number_from_json,
    "blob": _blob_from_json,
}


def from_json(shape: Shape, value: Any, member: str) -> Any:
    """A JSON body value checked against its shape (types only; `validate` checks the constraints).

    `member` names the value in error messages ("attributePayload.attributes").
    """
    return _FROM_JSON.get(shape.type_name, _any_from_json)(shape, value, member)


# ---- constraints --------------------------------------------------------------------------------


# Java's POSIX classes are US-ASCII only (without UNICODE_CHARACTER_CLASS, which AWS's models do not use).
_POSIX_CLASSES = {
    "Lower": "a-z",
    "Upper": "A-Z",
    "ASCII": "\\x00-\\x7f",
    "Alpha": "A-Za-z",
    "Digit": "0-9",
    "Alnum": "0-9A-Za-z",
    "Punct": "!-/:-@\\[-`{-~",
    "Graph": "!-~",
    "Print": " -~",
    "Blank": " \\t",
    "Cntrl": "\\x00-\\x1f\\x7f",
    "XDigit": "0-9A-Fa-f",
    "Space": " \\t\\n\\x0b\\f\\r",
}
# Java's \p{X} for a Unicode general category, or a group of them (\p{L}: every L? category).
_UNICODE_CATEGORY = re.compile(r"[LMNPSZC][a-z]?")
# A Java construct Python's re lacks: \p{Name}, \P{Name}, \x{HHHH}. Anything else is left as it is.
_JAVA_ESCAPE = re.compile(r"\\(?:([pP])\{(\w+)\}|x\{([0-9A-Fa-f]{1,6})\})")


def _escaped(code: int) -> str:
    return f"\\U{code:08x}"


@functools.cache
def _category_ranges(name: str) -> str:
    """The code points of a Unicode category ("L", "Nd"...) as the inside of a character class."""
    ranges: list[str] = []
    start = -1
    for code in range(0x110001):
        inside = code < 0x110000 and unicodedata.category(chr(code)).startswith(name)
        if inside and start < 0:
            start = code
        elif not inside and start >= 0:
            last = code - 1
            ranges.append(_escaped(start) if start == last else f"{_escaped(start)}-{_escaped(last)}")
            start = -1
    return "".join(ranges)


def _class_body(name: str) -> str:
    if name in _POSIX_CLASSES:
        return _POSIX_CLASSES[name]
    if _UNICODE_CATEGORY.fullmatch(name):
        return _category_ranges(name)
    raise ValueError(f"no translation for the Java class \\p{{{name}}}")


def java_to_python(pattern: str) -> str:
    """A model pattern (a Java regex) in Python's `re` syntax, to compile with re.ASCII (Java's \\d, \\w,
    \\s and \\b are ASCII, as Python's are only with that flag).

    Java's \\p{...} classes become explicit ranges (Python has none), \\x{HHHH} an \\U escape. A \\P{...}
    inside a character class has no Python spelling: ValueError, as for a class name not known here.
    """
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            found = _JAVA_ESCAPE.match(pattern, i)
            if found is None:
                out.append(pattern[i : i + 2])
                i += 2
                continue
            kind, name, hex_code = found.groups()
            if hex_code is not None:
                out.append(_escaped(int(hex_code, 16)))
            elif kind == "p":
                body = _class_body(name)
                out.append(body if in_class else f"[{body}]")
            elif in_class:
                raise ValueError(f"no translation for \\P{{{name}}} inside a character class")
            else:
                out.append(f"[^{_class_body(name)}]")
            i = found.end()
            continue
        if char == "[" and not in_class:
            in_class = True
            # A "]" right after "[" or "[^" is a literal, not the end of the class.
            opening = "[^" if pattern.startswith("[^", i) else "["
            out.append(opening)
            i += len(opening)
            if pattern.startswith("]", i):
                out.append("\\]")
                i += 1
            continue
        if char == "]" and in_class:
            in_class = False
        out.append(char)
        i += 1
    return "".join(out)


@functools.cache
def _python_pattern(pattern: str) -> re.Pattern[str] | None:
    # The model's patterns are Java regexes. One that cannot be translated is logged and skipped, not
    # enforced wrongly; a test compiles every pattern of the models served, so none is skipped today.
    try:
        return re.compile(java_to_python(pattern), re.ASCII)
    except (re.error, ValueError) as exc:
        log.warning("the model's pattern %r is not enforced: %s", pattern, exc)
        return None


_SIZE_UNITS = {"string": "characters", "blob": "bytes", "list": "items", "map": "items"}


# A value the model marks `sensitive` (an authentication material, a serial, a certificate, a tag map) is
# never echoed in a message: error messages reach logs and terminals its owner may not control.
_NOT_ECHOED = "(its value is not shown: the model marks it sensitive)"


def _check_structure(shape: Shape, value: Any, member: str, secret: bool) -> None:
    structure = cast(StructureShape, shape)
    for name in structure.required_members:
        if value.get(name) is None:
            raise InvalidRequest(f"{_join(member, name)} is required")
    for name, item in value.items():
        _validate(structure.members[name], item, _join(member, name), secret)


def _check_size(shape: Shape, value: Any, member: str, secret: bool) -> None:
    meta = shape.metadata
    size = len(value)
    if "min" in meta and size < meta["min"]:
        raise _bad(member, f"must have at least {meta['min']} {_SIZE_UNITS[shape.type_name]}")
    if "max" in meta and size > meta["max"]:
        raise _bad(member, f"must have at most {meta['max']} {_SIZE_UNITS[shape.type_name]}")


def _check_enum(shape: Shape, value: Any, member: str, secret: bool) -> None:
    meta = shape.metadata
    if "enum" in meta and value not in meta["enum"]:
        shown = _NOT_ECHOED if secret else f"not {value!r}"
        raise _bad(member, f"must be one of {', '.join(meta['enum'])}, {shown}")


def _check_pattern(shape: Shape, value: Any, member: str, secret: bool) -> None:
    meta = shape.metadata
    pattern = _python_pattern(meta["pattern"]) if "pattern" in meta else None
    if pattern is not None and not pattern.fullmatch(value):
        if secret:
            raise _bad(member, f"does not match the pattern {meta['pattern']} {_NOT_ECHOED}")
        raise _bad(member, f"{clip(value)!r} does not match the pattern {meta['pattern']}")


def _check_range(shape: Shape, value: Any, member: str, secret: bool) -> None:
    meta = shape.metadata
    if "min" in meta and value < meta["min"]:
        raise _bad(member, f"must be at least {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise _bad(member, f"must be at most {meta['max']}")


def _check_items(shape: Shape, value: Any, member: str, secret: bool) -> None:
    item_shape = cast(ListShape, shape).member
    for i, item in enumerate(value):
        _validate(item_shape, item, f"{member}[{i}]", secret)


def _check_entries(shape: Shape, value: Any, member: str, secret: bool) -> None:
    map_shape = cast(MapShape, shape)
    for key, item in value.items():
        _validate(map_shape.key, key, f"{member} key", secret)
        # A sensitive map's keys are part of its secret: the entry is not named by its key then.
        _validate(map_shape.value, item, f"{member} value" if secret else f"{member}.{key}", secret)


_Check = Callable[[Shape, Any, str, bool], None]
# The checks of each shape type, in the order their errors take precedence.
_CHECKS: dict[str, tuple[_Check, ...]] = {
    "structure": (_check_structure,),
    "string": (_check_size, _check_enum, _check_pattern),
    "blob": (_check_size,),
    "list": (_check_size, _check_items),
    "map": (_check_size, _check_entries),
    "integer": (_check_range,),
    "long": (_check_range,),
}


def _validate(shape: Shape, value: Any, member: str, secret: bool) -> None:
    secret = secret or bool(shape.metadata.get("sensitive"))
    for check in _CHECKS.get(shape.type_name, ()):
        check(shape, value, member, secret)


def validate(shape: Shape, value: Any, member: str) -> None:
    """Required members, lengths, ranges, patterns and enums, as the model states them. The value of a
    shape the model marks sensitive (or of anything inside one) is never quoted in the error."""
    _validate(shape, value, member, False)


# ---- requests -----------------------------------------------------------------------------------


class _Request(NamedTuple):
    labels: Mapping[str, str]
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]
    body: bytes
    document: Any  # the parsed JSON body ({} when there is none)
    payload_member: str | None  # the member that is the whole body, if the input has one


_MISSING: Any = object()


def _from_uri(request: _Request, name: str, wire: str, member: Shape) -> Any:
    if wire not in request.labels:
        return _MISSING
    return _scalar_from_text(member, request.labels[wire], name)


def _from_query(request: _Request, name: str, wire: str, member: Shape) -> Any:
    if wire not in request.query:
        return _MISSING
    if member.type_name == "list":
        item_shape = cast(ListShape, member).member
        return [_scalar_from_text(item_shape, v, name) for v in request.query[wire]]
    return _scalar_from_text(member, request.query[wire][0], name)


def _from_header(request: _Request, name: str, wire: str, member: Shape) -> Any:
    if wire.lower() not in request.headers:
        return _MISSING
    return _scalar_from_text(member, request.headers[wire.lower()], name)


def _from_body(request: _Request, name: str, wire: str, member: Shape) -> Any:
    if name == request.payload_member:
        return from_json(member, request.document, name) if request.body.strip() else _MISSING
    document = request.document
    if isinstance(document, dict) and document.get(wire) is not None:
        return from_json(member, document[wire], name)
    return _MISSING


def _from_nowhere(request: _Request, name: str, wire: str, member: Shape) -> Any:
    return _MISSING  # a location this protocol subset does not read (a header prefix map, say)


_Reader = Callable[[_Request, str, str, Shape], Any]
_READERS: dict[str | None, _Reader] = {
    "uri": _from_uri,
    "querystring": _from_query,
    "header": _from_header,
    None: _from_body,
}


class _InputPlan(NamedTuple):
    """Where each input member of an operation is read from, worked out once per operation."""

    shape: StructureShape | None
    payload_member: str | None
    members: tuple[tuple[str, str, Shape, _Reader], ...]  # (name, name on the wire, shape, reader)


def _document(body: bytes, has_payload_member: bool) -> Any:
    document: Any = {}
    if body.strip():
        try:
            document = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
        except ValueError:
            # int() past Python's 4,300-digit limit: bad input, not a server fault (and its message's
            # advice, sys.set_int_max_str_digits, is for the server's code, not for the client).
            raise InvalidRequest(
                "The request body is not valid JSON: it has an integer of more than 4300 digits"
            ) from None
    if not has_payload_member and not isinstance(document, dict):
        raise InvalidRequest("The request body must be a JSON object")
    return document


# ---- responses ----------------------------------------------------------------------------------


def _to_json(shape: Shape, value: Any) -> Any:
    kind = shape.type_name
    if kind == "structure":
        return {
            member.serialization.get("name", name): _to_json(member, value[name])
            for name, member in cast(StructureShape, shape).members.items()
            if value.get(name) is not None
        }
    if kind == "list":
        return [_to_json(cast(ListShape, shape).member, item) for item in value]
    if kind == "map":
        return {k: _to_json(cast(MapShape, shape).value, v) for k, v in value.items()}
    if kind == "timestamp":
        # rest-json bodies carry epoch seconds, which botocore turns back into datetimes.
        return value.timestamp() if isinstance(value, datetime.datetime) else float(value)
    if kind == "blob":
        return base64.b64encode(value).decode()
    return value


def _header_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# ---- the service --------------------------------------------------------------------------------


class RestJsonService(Generic[C]):
    """One rest-json service: botocore's model of it, and the handlers of the operations it answers.

    Built once (the route table is compiled here); every method is then a pure function of its arguments,
    safe to call from any number of threads.
    """

    def __init__(self, model: ServiceModel, handlers: Mapping[str, Handler[C]]) -> None:
        unknown = sorted(set(handlers) - set(model.operation_names))
        if unknown:
            raise ValueError(f"{model.service_name} has no operation named {', '.join(unknown)}")
        self.model = model
        self.handlers: Mapping[str, Handler[C]] = dict(handlers)
        # How the service names itself in messages ("AWS IoT"), and how clients sign for it ("iot").
        self.title: str = model.metadata.get("serviceFullName", model.service_name)
        self.signing_name: str = model.signing_name
        self._routes = _compile_routes(model)
        self._inputs: dict[str, _InputPlan] = {}
        # Error type -> {member name in lower case: the model's spelling of it}.
        self._error_members: dict[str, dict[str, str]] = {
            shape.name: {
                name.lower(): member.serialization.get("name", name)
                for name, member in cast(StructureShape, shape).members.items()
            }
            for shape in model.error_shapes
        }

    @property
    def supported_operations(self) -> frozenset[str]:
        return frozenset(self.handlers)

    def match(
        self, method: str, path: str, query: Mapping[str, list[str]]
    ) -> tuple[OperationModel, dict[str, str]] | None:
        """The operation at (method, raw path, query) and its decoded URI labels, or None."""
        # The path regex first and inline: a method has up to a hundred routes, and this runs per request.
        for route in self._routes.get(method, ()):
            found = route.path.fullmatch(path)
            if found is not None and (not route.query or route.query_matches(query)):
                return route.operation, route.labels_of(found)
        return None

    def route(
        self, method: str, path: str, query: Mapping[str, list[str]]
    ) -> tuple[OperationModel, dict[str, str]]:
        """As `match`, raising UnknownOperation when nothing matches."""
        found = self.match(method, path, query)
        if found is None:
            raise UnknownOperation(f"No {self.title} operation matches {method} {path}")
        return found

    def parse_request(
        self,
        operation: OperationModel,
        labels: Mapping[str, str],
        query: Mapping[str, list[str]],
        headers: Mapping[str, str],
        body: bytes,
    ) -> dict[str, Any]:
        """The input members of `operation`, read from where the model puts them, and validated.

        `headers` are keyed in lower case; `query` maps each name to all its values.
        """
        plan = self._inputs.get(operation.name) or self._plan_input(operation)
        if plan.shape is None:
            return {}
        document = _document(body, plan.payload_member is not None)
        request = _Request(labels, query, headers, body, document, plan.payload_member)
        params: dict[str, Any] = {}
        for name, wire, member, read in plan.members:
            value = read(request, name, wire, member)
            if value is not _MISSING:
                params[name] = value
        validate(plan.shape, params, "")
        return params

    def _plan_input(self, operation: OperationModel) -> _InputPlan:
        # Computed on an operation's first request, then reused (a race computes it twice, harmlessly).
        shape = operation.input_shape
        members = tuple(
            (
                name,
                member.serialization.get("name", name),
                member,
                _READERS.get(member.serialization.get("location"), _from_nowhere),
            )
            for name, member in (shape.members.items() if shape is not None else ())
        )
        payload_member = shape.serialization.get("payload") if shape is not None else None
        plan = _InputPlan(shape, payload_member, members)
        self._inputs[operation.name] = plan
        return plan

    def serialise_response(self, operation: OperationModel, output: Mapping[str, Any]) -> Response:
        """A handler's output members as the model places them: status code, headers, JSON body."""
        status = int(operation.http.get("responseCode", 200))
        headers: dict[str, str] = {}
        shape = operation.output_shape
        if status == 204:
            # No body may follow a 204: a client would read the bytes as the start of the next answer.
            return Response(status, headers, b"")
        if shape is None:
            return Response(status, headers, b"{}")
        payload_member = shape.serialization.get("payload")
        body: dict[str, Any] = {}
        for name, member in shape.members.items():
            value = output.get(name)
            if value is None:
                continue
            location = member.serialization.get("location")
            wire = member.serialization.get("name", name)
            if location == "statusCode":
                status = int(value)
            elif location == "header":
                headers[wire] = _header_text(value)
            elif name == payload_member:
                return Response(status, headers, json.dumps(_to_json(member, value)).encode())
            else:
                body[wire] = _to_json(member, value)
        return Response(status, headers, json.dumps(body).encode())

    @staticmethod
    def error_response(error: ServiceError) -> Response:
        """The answer botocore reads an error from: its status, its type in a header, a JSON body."""
        return Response(
            error.status, {"x-amzn-ErrorType": error.error_type}, json.dumps(error.body()).encode()
        )

    def error_answer(self, error: ServiceError) -> Response:
        """As `error_response`, with the body's members spelt as this service's model spells them for the
        error's type (ThrottlingException's is `message` in AWS IoT, `Message` in managed integrations)."""
        spelling = self._error_members.get(error.error_type)
        if spelling is None:
            return self.error_response(error)
        body = {spelling.get(key.lower(), key): value for key, value in error.body().items()}
        return Response(error.status, {"x-amzn-ErrorType": error.error_type}, json.dumps(body).encode())

    def operation_error(self, operation: OperationModel, error: ServiceError) -> ServiceError:
        """`error` as `operation` models it. Here unchanged; a service whose operations name bad input
        differently (ValidationException) says so by overriding this."""
        return error

    def invoke(
        self,
        context: C,
        operation: OperationModel,
        labels: Mapping[str, str],
        query: Mapping[str, list[str]],
        headers: Mapping[str, str],
        body: bytes,
    ) -> Response:
        """Parse, call the operation's handler with `context`, serialise. ServiceErrors propagate."""
        try:
            handler = self.handlers.get(operation.name)
            if handler is None:
                raise InvalidRequest(f"Operation {operation.name} is not supported by iot-core-local")
            params = self.parse_request(operation, labels, query, headers, body)
            return self.serialise_response(operation, handler(context, params))
        except ServiceError as e:
            modeled = self.operation_error(operation, e)
            if modeled is e:
                raise
            raise modeled from None


# ---- paging -------------------------------------------------------------------------------------

# Tokens are signed with a key of this process: a token is then only ever one this server handed out, for
# the operation and filters it was handed out for. (They do not outlive a restart; AWS's expire too.)
_TOKEN_KEY = secrets.token_bytes(32)
_TOKEN_MAC = 16  # bytes of HMAC-SHA256 kept
# The sort key of an item: what a page resumes after. Strings and numbers only (they go through JSON).
SortKey = tuple[str | int | float, ...]
_T = TypeVar("_T")


class Cursor(NamedTuple):
    """Where the next page starts: after the item with sort key `last`, which was just before
    `position` when the token was handed out (a hint: items may have come and gone since)."""

    last: SortKey
    position: int


@dataclass(frozen=True)
class Pager:
    """Page size and position from a list operation's parameters, and the token for the next page.

    A token names the sort key of the last item handed out, so the next page resumes after that item
    wherever it now is: a client deleting as it pages skips nothing, and one creating sees no repeat. It is
    bound by an HMAC to the operation and to every other parameter of the request (its filters, its
    order): a token replayed on another operation or filter, or forged, is an InvalidRequest, as AWS
    answers a bad nextToken. The encoding is unpadded base32, which fits both AWS IoT's Marker pattern
    (`[A-Za-z0-9+/]+={0,2}`) and managed integrations' NextToken pattern (`[a-zA-Z0-9=_-]+`).

    `size_params` and `token_params` name the service's members, first found wins (AWS IoT: pageSize or
    maxResults, marker or nextToken).
    """

    size_params: tuple[str, ...]
    token_params: tuple[str, ...]
    default_size: int = 250

    def size(self, params: Mapping[str, Any]) -> int:
        return int(_first(params, self.size_params) or self.default_size)

    def page(
        self,
        items: list[_T],
        params: Mapping[str, Any],
        operation: str,
        key: Callable[[_T], SortKey],
        *,
        descending: bool = False,
    ) -> tuple[list[_T], str | None]:
        """One page of `items` (ordered by `key`, descending if so) and the token for the next, or None."""
        size = self.size(params)
        keys = [key(item) for item in items]
        cursor = self.cursor(params, operation)
        start = 0 if cursor is None else resume_index(keys, cursor.last, descending=descending)
        end = start + size
        if end >= len(items):
            return items[start:], None
        return items[start:end], self.token(params, operation, keys[end - 1], end)

    def cursor(self, params: Mapping[str, Any], operation: str) -> Cursor | None:
        """The request's token decoded (None: the first page); InvalidRequest if it is not one this
        server handed out for `operation` with these same parameters."""
        token = _first(params, self.token_params)
        if not token:
            return None
        invalid = InvalidRequest(
            f"The pagination token {clip(token)!r} is not valid for this request: pass the token the "
            "previous page of the same call, with the same parameters, returned"
        )
        try:
            raw = base64.b32decode(token + "=" * (-len(token) % 8))
        except (binascii.Error, ValueError):
            raise invalid from None
        payload, mac = raw[:-_TOKEN_MAC], raw[-_TOKEN_MAC:]
        if len(raw) <= _TOKEN_MAC or not hmac.compare_digest(mac, self._mac(params, operation, payload)):
            raise invalid
        last, position = json.loads(payload)  # ours, as the MAC shows: well formed
        return Cursor(tuple(last), position)

    def token(self, params: Mapping[str, Any], operation: str, last: SortKey, position: int) -> str:
        """The token of the page after the item whose sort key is `last`, at index `position - 1`."""
        payload = json.dumps([list(last), position], separators=(",", ":")).encode()
        raw = payload + self._mac(params, operation, payload)
        return base64.b32encode(raw).decode().rstrip("=")

    def _mac(self, params: Mapping[str, Any], operation: str, payload: bytes) -> bytes:
        # Every parameter but the page size and the token itself: the filters and the order.
        bound = {k: v for k, v in params.items() if k not in self.size_params + self.token_params}
        context = json.dumps([operation, bound], sort_keys=True, default=str).encode()
        message = len(context).to_bytes(8, "big") + context + payload
        return hmac.new(_TOKEN_KEY, message, hashlib.sha256).digest()[:_TOKEN_MAC]


def resume_index(keys: list[SortKey], last: SortKey, *, descending: bool = False) -> int:
    """The index of the first key after `last` in `keys` (sorted, descending if so): just after `last`
    when it is still there, else where it would be."""
    for i, k in enumerate(keys):
        if k == last:
            return i + 1
        if (k < last) if descending else (k > last):
            return i
    return len(keys)


def _first(params: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        value = params.get(name)
        if value:
            return value
    return None
