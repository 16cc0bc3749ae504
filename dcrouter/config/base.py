"""The machinery that turns parsed TOML into frozen, typed option objects.

Option classes are frozen dataclasses.  Each field's type hint says what the
TOML value must be (``int``, ``str``, ``bool``, ``float``, ``Optional[X]``,
``tuple[X, ...]``, ``Mapping[str, X]``, or another option class); its
metadata may add:

* ``doc``: one sentence for the configuration reference;
* ``key``: the TOML key when it differs from the attribute (``pass``);
* ``check``: a callable ``check(value, path) -> value`` that validates and
  may normalise the value, raising :class:`~dcrouter.errors.ConfigError`;
* ``reload``: how a change takes effect (``"hot"``: SIGHUP applies it,
  ``"rebind"``: SIGHUP re-binds the listener, ``"restart"``: needs a restart);
* ``secret``: the value is a password or a key: ``unbuild(..., redact=True)``
  (what API answers use) shows :data:`REDACTED` instead.

A class may define ``validate(self, path)`` for checks across its fields and
``__extra_field__`` naming a ``Mapping`` field that collects unknown keys
(for free-form sections such as transformations).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import ipaddress
import types
import typing
from typing import Any, Callable, Iterable, Mapping, Optional, TypeVar, Union

from dcrouter.errors import ConfigError

T = TypeVar("T")

Check = Callable[[Any, str], Any]

#: Shown instead of a secret option's value (API answers, logs).
REDACTED = "********"


def option(default: Any = dataclasses.MISSING, *, doc: str = "", key: Optional[str] = None,
           check: Optional[Check] = None, reload: str = "hot",
           default_factory: Any = dataclasses.MISSING, secret: bool = False) -> Any:
    """Declare an option field: a dataclass field with documentation metadata."""
    metadata = {"doc": doc, "key": key, "check": check, "reload": reload, "secret": secret}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def join_path(parent: str, key: str) -> str:
    """``join_path("email", "tls")`` -> ``email.tls``."""
    return f"{parent}.{key}" if parent else key


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is str:
        return "a string"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if origin in (tuple, list):
        return "an array"
    if origin in (dict, collections.abc.Mapping) or dataclasses.is_dataclass(tp):
        return "a table"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return str(tp)


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def convert(tp: Any, value: Any, path: str) -> Any:
    """Convert a parsed TOML ``value`` to type ``tp`` or raise ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(arg, value, path)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(path, f"must be {_type_name(tp)}, got {_describe(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"must be true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(path, f"must be an integer, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(path, f"must be a number, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, f"must be a string, got {_describe(value)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"must be an array, got {_describe(value)}")
        (item_type, *_rest) = typing.get_args(tp) or (Any,)
        return tuple(convert(item_type, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (dict, collections.abc.Mapping) or tp in (dict, Mapping):
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a table, got {_describe(value)}")
        args = typing.get_args(tp)
        value_type = args[1] if len(args) == 2 else Any
        return types.MappingProxyType(
            {str(k): convert(value_type, v, join_path(path, str(k))) for k, v in value.items()})
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a table, got {_describe(value)}")
        return build(tp, value, path)  # type: ignore[arg-type]
    raise TypeError(f"unsupported option type {tp!r} at {path}")


def build(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build option class ``cls`` from the TOML table ``data``.

    Unknown keys are errors (with a "did you mean" hint); missing keys take
    the field default; a field without default is required.
    """
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
    by_key = {(f.metadata.get("key") or f.name): f for f in fields}
    extra_field = getattr(cls, "__extra_field__", None)
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        field = by_key.get(key)
        if field is None or field.name == extra_field:
            if extra_field:
                extra[key] = value
                continue
            known = sorted(k for k in by_key if k != extra_field)
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(join_path(path, key), f"unknown key{hint}")
        field_path = join_path(path, key)
        try:
            converted = convert(hints[field.name], value, field_path)
            check = field.metadata.get("check")
            if check is not None and converted is not None:
                converted = check(converted, field_path)
        except ConfigError as e:
            if not field.metadata.get("secret"):
                raise
            # the error goes to logs and API answers: never with the secret in it
            raise ConfigError(e.path, f"must be {_type_name(hints[field.name])} (a secret: "
                              "its value is not shown)") from None
        kwargs[field.name] = converted
    for key, field in by_key.items():
        if field.name == extra_field:
            continue
        if (field.name not in kwargs and field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING):
            raise ConfigError(join_path(path, key), "required key is missing")
    if extra_field:
        kwargs[extra_field] = types.MappingProxyType(extra)
    instance = cls(**kwargs)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        validate(path)
    return instance


def unbuild(options: Any, redact: bool = False) -> Any:
    """The inverse of :func:`build`: option objects back to plain TOML data.

    ``redact``: secret options (passwords, inline keys) that are set become
    :data:`REDACTED` - for answers and logs, never for files dcrouter reads back.
    """
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        out: dict[str, Any] = {}
        extra_field = getattr(options, "__extra_field__", None)
        for f in dataclasses.fields(options):
            value = getattr(options, f.name)
            if f.name == extra_field:
                out.update({k: unbuild(v, redact) for k, v in value.items()})
                continue
            if value is None:
                continue
            if redact and f.metadata.get("secret") and value:
                out[f.metadata.get("key") or f.name] = REDACTED
                continue
            out[f.metadata.get("key") or f.name] = unbuild(value, redact)
        return out
    if isinstance(options, (tuple, list)):
        return [unbuild(v, redact) for v in options]
    if isinstance(options, Mapping):
        return {k: unbuild(v, redact) for k, v in options.items()}
    return options


def restore_redacted(data: Any, current: Any, path: str = "") -> Any:
    """``data`` (plain TOML data sent back by a client) with every :data:`REDACTED` value
    replaced by the value at the same place in ``current`` (plain data of the options in
    force), so a rule read from the API and written back keeps its password.

    A placeholder with nothing to restore is a :class:`ConfigError` naming the key.
    """
    if isinstance(data, str) and data == REDACTED:
        if not isinstance(current, str) or not current or current == REDACTED:
            raise ConfigError(path or "value", f"is the redacted placeholder {REDACTED!r} and "
                              "there is no stored secret to keep: send the value")
        return current
    if isinstance(data, dict):
        here = current if isinstance(current, dict) else {}
        return {k: restore_redacted(v, here.get(k), join_path(path, str(k)))
                for k, v in data.items()}
    if isinstance(data, list):
        here_list = current if isinstance(current, list) else []
        return [restore_redacted(v, here_list[i] if i < len(here_list) else None,
                                 f"{path}[{i}]") for i, v in enumerate(data)]
    return data


# -- reusable checks -------------------------------------------------------

def check_port(value: int, path: str) -> int:
    """A TCP/UDP port number: 1..65535 (0 is allowed: an ephemeral port)."""
    if not 0 <= value <= 65535:
        raise ConfigError(path, f"must be 1..65535, got {value}")
    return value


def check_ports(value: tuple[int, ...], path: str) -> tuple[int, ...]:
    """A list of ports, each valid, none repeated."""
    seen = set()
    for i, port in enumerate(value):
        check_port(port, f"{path}[{i}]")
        if port in seen and port != 0:
            raise ConfigError(f"{path}[{i}]", f"port {port} is listed twice")
        seen.add(port)
    return value


def check_positive(value: Union[int, float], path: str) -> Union[int, float]:
    """A number greater than zero."""
    if value <= 0:
        raise ConfigError(path, f"must be greater than 0, got {value}")
    return value


def check_non_negative(value: Union[int, float], path: str) -> Union[int, float]:
    """A number of zero or more."""
    if value < 0:
        raise ConfigError(path, f"must be 0 or more, got {value}")
    return value


def one_of(*choices: str) -> Check:
    """A check that accepts only the given strings."""
    def check(value: str, path: str) -> str:
        if value not in choices:
            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            listed = ", ".join(f"'{c}'" for c in choices)
            raise ConfigError(path, f"must be one of {listed}, got '{value}'{hint}")
        return value
    return check


def check_networks(value: tuple[str, ...], path: str) -> tuple[str, ...]:
    """A list of CIDR networks or single addresses, IPv4 or IPv6."""
    for i, net in enumerate(value):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"{path}[{i}]", f"must be an IP network like '10.0.0.0/8', got '{net}'") from None
    return value


def check_ip(value: str, path: str) -> str:
    """A literal IPv4 or IPv6 address."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(path, f"must be an IP address, got '{value}'") from None
    return value


def split_host_port(value: str, path: str, default_port: Optional[int] = None) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port`` (port optional with a default)."""
    host, port_text = value, ""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ConfigError(path, f"must be host:port, got '{value}'")
        host, rest = value[1:end], value[end + 1:]
        if rest.startswith(":"):
            port_text = rest[1:]
        elif rest:
            raise ConfigError(path, f"must be host:port, got '{value}'")
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    if not host:
        raise ConfigError(path, f"must be host:port, got '{value}'")
    if not port_text:
        if default_port is None:
            raise ConfigError(path, f"must be host:port, got '{value}'")
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ConfigError(path, f"port must be 1..65535, got '{port_text}'")
    return host, int(port_text)


def check_host_ports(value: tuple[str, ...], path: str) -> tuple[str, ...]:
    """A list of ``host:port`` strings."""
    for i, item in enumerate(value):
        split_host_port(item, f"{path}[{i}]")
    return value


def iter_option_fields(cls: type, prefix: str = "") -> Iterable[tuple[str, Any, dataclasses.Field]]:
    """Walk every option key of ``cls`` and its nested sections.

    Yields ``(key_path, type, field)``; arrays of tables appear as ``name[]``.
    Used to generate and check the configuration reference.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == getattr(cls, "__extra_field__", None):
            continue
        key = f.metadata.get("key") or f.name
        path = join_path(prefix, key)
        tp = hints[f.name]
        yield path, tp, f
        inner = tp
        suffix = ""
        if typing.get_origin(inner) in (Union, types.UnionType):
            non_none = [a for a in typing.get_args(inner) if a is not type(None)]
            inner = non_none[0] if len(non_none) == 1 else inner
        if typing.get_origin(inner) in (tuple, list):
            inner = typing.get_args(inner)[0]
            suffix = "[]"
        if dataclasses.is_dataclass(inner):
            yield from iter_option_fields(inner, path + suffix)  # type: ignore[arg-type]
