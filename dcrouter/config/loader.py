"""Reading configuration files: TOML -> :class:`DcRouterOptions`."""

from __future__ import annotations

import os
import tomllib
from typing import Any, Mapping

from dcrouter.config.base import build
from dcrouter.config.options import DcRouterOptions
from dcrouter.errors import ConfigError


def parse_config(data: Mapping[str, Any]) -> DcRouterOptions:
    """Validate a parsed TOML document and return the frozen options."""
    return build(DcRouterOptions, data, "")


def parse_config_text(text: str, source: str = "<string>") -> DcRouterOptions:
    """Parse TOML text; syntax errors become a ConfigError naming the line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, f"invalid TOML: {e}") from None
    return parse_config(data)


def load_config(path: str) -> DcRouterOptions:
    """Read and validate the TOML file at ``path``."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(path, "configuration file not found") from None
    except IsADirectoryError:
        raise ConfigError(path, "is a directory, not a configuration file") from None
    except PermissionError:
        raise ConfigError(path, "permission denied reading the configuration file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(path, "configuration file is not UTF-8") from None
    return parse_config_text(text, os.path.basename(path))
