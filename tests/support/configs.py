"""Building test configurations: the embedded default with ephemeral loopback ports."""

from __future__ import annotations

import os
import re
import tomllib
from typing import Any

from dcrouter.config.toml_writer import dumps
from tests.support.net import free_port, free_tcp_udp_port
from tests.support.proc import REPO


def default_config_with_free_ports(state_dir: str) -> tuple[dict[str, Any], dict[str, int]]:
    """etc/dcrouter.toml with every port replaced by a free loopback port.

    Returns (config data, {"smtp": .., "submission": .., "smtps": .., "https": ..,
    "http": .., "dns": .., "api": ..}).
    """
    with open(os.path.join(REPO, "etc", "dcrouter.toml"), "rb") as f:
        data = tomllib.load(f)
    taken: set[int] = set()

    def unique(pick) -> int:  # type: ignore[no-untyped-def]
        # a port freed and picked again by the kernel must not serve two listeners
        while True:
            port = pick()
            if port not in taken:
                taken.add(port)
                return port

    ports = {
        "dns": unique(free_tcp_udp_port),
        "smtp": unique(free_port), "submission": unique(free_port), "smtps": unique(free_port),
        "https": unique(free_port), "http": unique(free_port), "api": unique(free_port),
    }
    data["router"]["state_dir"] = state_dir
    email = data["email"]
    email["listen"] = "127.0.0.1"
    email["ports"] = [ports["smtp"], ports["submission"], ports["smtps"]]
    email["submission_ports"] = [ports["submission"]]
    email["implicit_tls_ports"] = [ports["smtps"]]
    email["queue"]["persistent_path"] = os.path.join(state_dir, "queue")
    email["delivery"]["nameservers"] = [f"127.0.0.1:{ports['dns']}"]
    for rule in email["domain_rules"]:
        if "mta_options" in rule and "local_delivery_path" in rule["mta_options"]:
            rule["mta_options"]["local_delivery_path"] = os.path.join(state_dir, "mail")
    data["proxy"]["listen"] = "127.0.0.1"
    data["proxy"]["routes"][0]["ports"] = [ports["https"]]
    data["proxy"]["routes"][1]["ports"] = [ports["http"]]
    data["dns"]["listen"] = "127.0.0.1"
    data["dns"]["port"] = ports["dns"]
    data["api"]["port"] = ports["api"]
    return data, ports


def write_config(path: str, data: dict[str, Any]) -> str:
    """Write config data as TOML; returns the path."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(dumps(data))
    return path


def toml_text_with(base: str, **replacements: str) -> str:
    """Regex-replace in TOML text (small edits for error-class tests)."""
    for pattern, repl in replacements.items():
        base = re.sub(pattern, repl, base)
    return base
