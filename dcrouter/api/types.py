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
        """The body parsed as JSON (400 when it is not JSON)."""
        if self.content_type and "json" not in self.content_type.lower():
            raise errors.ApiError(415, "unsupported_media_type",
                                  f"the body must be application/json, not {self.content_type}")
        if not self.body.strip():
            raise errors.bad_request("a JSON body is required")
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
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
