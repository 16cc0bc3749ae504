"""The configuration reference, generated from the option classes.

``python -m dcrouter.config.reference > docs/configuration-keys.md`` writes
the table of every key; a test checks that ``docs/configuration.md`` names
every key, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

from dcrouter.config.base import iter_option_fields
from dcrouter.config.options import DcRouterOptions
from dcrouter.config.toml_writer import _value


def type_name(tp: Any) -> str:
    """A short human name for an option type."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " or ".join(type_name(a) for a in args)
        return inner if len(args) > 1 else f"{inner} (optional)"
    if origin in (tuple, list):
        return f"array of {type_name(typing.get_args(tp)[0])}"
    if origin is not None and "Mapping" in str(origin):
        return "table"
    if dataclasses.is_dataclass(tp):
        return "table"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(tp, str(tp))


def default_text(field: dataclasses.Field) -> str:
    """The default as TOML text, or 'required'."""
    if field.default is not dataclasses.MISSING:
        if field.default is None:
            return "(absent)"
        return f"`{_value(field.default)}`"
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(value):
            return "(table)"
        return f"`{_value(value)}`"
    return "required"


def all_key_paths() -> list[str]:
    """Every key path of the configuration (arrays of tables as ``name[]``)."""
    return [path for path, _tp, _f in iter_option_fields(DcRouterOptions)]


def render() -> str:
    """Markdown tables of every key, grouped by section."""
    out: list[str] = []
    section = None
    for path, tp, field in iter_option_fields(DcRouterOptions):
        head = path.split(".")[0]
        if head != section:
            section = head
            out.append("")
            out.append(f"### `[{head}]`")
            out.append("")
            out.append("| key | type | default | reload | meaning |")
            out.append("| --- | --- | --- | --- | --- |")
        doc = (field.metadata.get("doc") or "").replace("|", "\\|")
        reload = field.metadata.get("reload", "hot")
        out.append(f"| `{path}` | {type_name(tp)} | {default_text(field)} | {reload} | {doc} |")
    return "\n".join(out).lstrip() + "\n"


BEGIN = "<!-- BEGIN GENERATED REFERENCE -->"
END = "<!-- END GENERATED REFERENCE -->"


def write_into(path: str) -> None:
    """Replace the generated block of ``path`` (docs/configuration.md) with a fresh one."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} has no generated block ({BEGIN} ... {END})")
    head = text[:text.index(BEGIN) + len(BEGIN)]
    tail = text[text.index(END):]
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + "\n" + render() + tail)


if __name__ == "__main__":
    import sys
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        try:
            write_into(sys.argv[2])
        except (OSError, ValueError) as e:
            sys.stderr.write(f"dcrouter.config.reference: {e}\n")
            sys.exit(2)
    else:
        print(render())
