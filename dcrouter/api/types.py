"""The shapes the API's endpoint handlers work with, independent of ``twisted.web``.

:class:`ApiRequest` is one call as a handler sees it, :class:`Reply` an
answer with a status other than 200, :func:`jsonable` turns service objects
into JSON-safe data and :func:`router_method` finds an operation of the
router or answers 503.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

from dcrouter.api import errors
from dcrouter.service import RouterContext


@dataclasses.dataclass
class ApiRequest:
    """One API call as the handlers see it."""

    method: str
    path: str
    params: dict[str, str]
    query: dict[str, list[str]]
    body: bytes
    content_type: str
    client_ip: str

    def arg(self, name: str, default: Optional[str] = None) -> Optional[str]:
        """The first value of query parameter ``name``."""
        values = self.query.get(name)
        return values[0] if values else default

    def json(self) -> Any:
        """The body parsed as JSON (400 when it is not JSON, or nests or counts too deep)."""
        if self.content_type and "json" not in self.content_type.lower():
            raise errors.ApiError(415, "unsupported_media_type",
                                  f"the body must be application/json, not {self.content_type}")
        if not self.body.strip():
            raise errors.bad_request("a JSON body is required")
        return parse_json(self.body)


#: Deepest nesting of arrays and objects an API body may have.
MAX_JSON_DEPTH = 32
#: Most digits of a JSON number (Python's int parser allows 4300).
MAX_JSON_NUMBER = 64


def json_depth_exceeds(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``text`` nests ``[``/``{`` deeper than ``limit`` (outside strings).

    Checked before parsing, because ``json.loads`` recurses once per level and
    a body of a few kilobytes of ``[`` would exhaust the interpreter's stack.
    """
    if text.count("[") + text.count("{") <= limit:
        return False                    # the common case, at C speed
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _bounded_number(kind: type) -> Any:
    def parse(literal: str) -> Any:
        if len(literal) > MAX_JSON_NUMBER:
            raise ValueError(f"a number has more than {MAX_JSON_NUMBER} characters")
        value = kind(literal)
        if kind is float and value in (float("inf"), float("-inf")):
            raise ValueError(f"{literal[:20]} is out of range")
        return value
    return parse


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(body: bytes) -> Any:
    """A request body as JSON; ``400`` for anything else, never a 500.

    Bounded work: nesting deeper than :data:`MAX_JSON_DEPTH`, numbers longer
    than :data:`MAX_JSON_NUMBER` characters, infinities and ``NaN`` are
    refused (strings are bounded by ``api.max_body_size``).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise errors.bad_request(f"the body is not valid JSON: {e}") from None
    if json_depth_exceeds(text):
        raise errors.bad_request(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text, parse_int=_bounded_number(int),
                          parse_float=_bounded_number(float), parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:   # JSONDecodeError is a ValueError
        raise errors.bad_request(f"the body is not valid JSON: {e}") from None


@dataclasses.dataclass
class Reply:
    """A JSON answer with a status other than 200 (or extra headers)."""

    body: Any
    status: int = 200
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


def jsonable(value: Any) -> Any:
    """``value`` made JSON-safe: objects with ``to_dict``, dataclasses, tuples, sets, bytes."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return jsonable(to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    return str(value)


def router_method(context: RouterContext, what: str) -> Any:
    """The router, when it offers ``what``; otherwise a 503."""
    router = context.router
    if router is None or not callable(getattr(router, what, None)):
        raise errors.service_unavailable(f"the router does not support {what}")
    return router
