"""Domain rules changed through the API, kept in ``state_dir/rules.toml``.

With ``api.persist_rules = true`` (the default) every rule change made
through the API is written to ``state_dir/rules.toml`` (atomically: a
temporary file, fsync, rename, fsync of the directory).  While that file
exists it replaces ``email.domain_rules`` of the configuration file, at
start and on every reload, so a restart never silently undoes an operator's
change.  Deleting the file (and reloading) returns to the file's rules.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from typing import Any, Iterable

from dcrouter.config.base import build, unbuild
from dcrouter.config.email import DomainRuleOptions
from dcrouter.config.options import DcRouterOptions
from dcrouter.config.toml_writer import dumps
from dcrouter.errors import ConfigError
from dcrouter.logsetup import get_logger

log = get_logger("api.rules")

RULES_FILE = "rules.toml"

_HEADER = ("# Domain rules written by dcrouter's management API (api.persist_rules = true).\n"
           "# While this file exists it replaces email.domain_rules of the configuration file.\n"
           "# Delete it and reload (SIGHUP or `dcrouterctl reload`) to use the file's rules.\n")


def rules_path(state_dir: str) -> str:
    """``state_dir/rules.toml``."""
    return os.path.join(state_dir, RULES_FILE)


def rules_to_toml(rules: Iterable[DomainRuleOptions]) -> str:
    """The TOML text of a rule list (``[[domain_rules]]`` tables)."""
    return _HEADER + dumps({"domain_rules": [unbuild(rule) for rule in rules]})


def save_rules(state_dir: str, rules: Iterable[DomainRuleOptions]) -> str:
    """Write the rules atomically; blocking (call it in a thread). Returns the path."""
    path = rules_path(state_dir)
    text = rules_to_toml(rules)
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_rules(path: str) -> tuple[DomainRuleOptions, ...]:
    """Read and validate a rules file; errors name the file and the key path."""
    source = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            data: dict[str, Any] = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, f"invalid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(source, f"cannot read {path}: {e.strerror}") from None
    unknown = sorted(set(data) - {"domain_rules"})
    if unknown:
        raise ConfigError(f"{source}:{unknown[0]}", "unknown key (only domain_rules belongs here)")
    raw = data.get("domain_rules", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{source}:domain_rules", "must be an array of tables")
    rules = []
    for i, entry in enumerate(raw):
        where = f"{source}:domain_rules[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(where, "must be a table")
        rules.append(build(DomainRuleOptions, entry, where))
    return tuple(rules)


def apply_persisted_rules(options: DcRouterOptions) -> DcRouterOptions:
    """``options`` with ``email.domain_rules`` replaced by ``state_dir/rules.toml`` if it applies.

    Applies when the API and email sections are present, ``api.persist_rules``
    is true and the file exists.  Raises ConfigError for a broken file.
    """
    if options.api is None or options.email is None or not options.api.persist_rules:
        return options
    path = rules_path(options.router.state_dir)
    if not os.path.exists(path):
        return options
    rules = load_rules(path)
    email = dataclasses.replace(options.email, domain_rules=rules)
    email.validate("email")
    log.info("email.domain_rules taken from {path} ({count} rules, written by the API)",
             path=path, count=len(rules))
    return dataclasses.replace(options, email=email)
