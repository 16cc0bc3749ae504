"""A small TOML writer for the data dcrouter's configuration uses.

Tables become ``[section]`` headers, arrays of tables ``[[section]]``; tables
nested inside an array-of-tables entry are written inline so each rule or
route stays in one place.  Only strings, booleans, integers, floats, arrays
and tables are supported: exactly what :mod:`tomllib` reads back.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError("TOML cannot hold NaN or infinity here")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_key(str(k))} = {_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(v, Mapping) for v in value)


def _emit(table: Mapping[str, Any], prefix: str, lines: list[str], inline_nested: bool) -> None:
    subtables = []
    arrays = []
    for key, value in table.items():
        if value is None:
            continue
        if isinstance(value, Mapping) and not inline_nested:
            subtables.append((key, value))
        elif _is_table_array(value) and not inline_nested:
            arrays.append((key, value))
        else:
            lines.append(f"{_key(str(key))} = {_value(value)}")
    for key, value in subtables:
        name = f"{prefix}.{_key(key)}" if prefix else _key(key)
        lines.append("")
        lines.append(f"[{name}]")
        _emit(value, name, lines, False)
    for key, items in arrays:
        name = f"{prefix}.{_key(key)}" if prefix else _key(key)
        for item in items:
            lines.append("")
            lines.append(f"[[{name}]]")
            _emit(item, name, lines, True)


def dumps(data: Mapping[str, Any]) -> str:
    """Serialise ``data`` as TOML text."""
    lines: list[str] = []
    _emit(data, "", lines, False)
    return "\n".join(lines).lstrip("\n") + "\n"
