"""``python -m dcrouter``: commands that work without a running router.

* ``init [DIR]`` - write the embedded default configuration to DIR (default: .)
  with a fresh API token and demo password (:mod:`dcrouter.initconfig`).
* ``check-config FILE`` - validate and print what would run.
* ``migrate-config OLD.json`` - convert a seed-style configuration to TOML.
* ``hash-password`` - print a password hash for ``email.auth.users``.

Errors print one line on stderr and exit non-zero; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence, TextIO

from dcrouter.config import DcRouterOptions, load_config
from dcrouter.errors import ConfigError


def _rule_lines(options: DcRouterOptions) -> list[str]:
    from dcrouter.email.routing import describe_rules
    assert options.email is not None
    return describe_rules(options.email)


def _route_lines(options: DcRouterOptions) -> list[str]:
    from dcrouter.proxy.routes import describe_routes
    assert options.proxy is not None
    return describe_routes(options.proxy)


def summarize(options: DcRouterOptions) -> str:
    """What would run, for ``check-config``: services, ports, rules in match order."""
    out = [f"state_dir: {options.router.state_dir}"]
    services = [n for n in ("email", "proxy", "dns", "api") if getattr(options, n) is not None]
    out.append(f"services: {', '.join(services) or 'none'}")
    workers = options.router.effective_workers
    out.append("processes: one" if workers <= 1 else
               f"processes: a master and {workers} workers sharing every port "
               f"(bound once by the master)"
               f"{'; the API in worker 0' if options.api is not None else ''}")
    if options.email is not None:
        e = options.email
        out.append("")
        out.append(f"email: {e.hostname} on {e.listen}")
        for port in e.ports:
            kind = ("implicit TLS" if port in e.effective_implicit_tls_ports else "STARTTLS")
            if port in e.effective_submission_ports or e.auth.required:
                kind += ", AUTH required"
            out.append(f"  port {port}/tcp ({kind})")
        out.append(f"  queue: {e.queue.storage_type}; default mode: {e.default_mode}")
        out.append(f"  rules in match order ({e.priority_order}):")
        out.extend(_rule_lines(options))
    if options.proxy is not None:
        out.append("")
        out.append(f"proxy: on {options.proxy.listen}")
        out.extend(_route_lines(options))
        if options.proxy.acme.enabled:
            out.append(f"  acme: {options.proxy.acme.directory_url} "
                       f"({options.proxy.acme.challenge}; wildcards by dns-01)")
    if options.dns is not None:
        d = options.dns
        out.append("")
        out.append(f"dns: {d.listen}:{d.port} udp+tcp; zones: "
                   f"{', '.join(z.origin for z in d.zones) or 'none'}; email records: "
                   f"{'published' if d.publish_email_records else 'off'}")
    if options.api is not None:
        a = options.api
        out.append("")
        scheme = "https" if a.https else "http"
        out.append(f"api: {scheme}://{a.listen}:{a.port}/ (token {'set' if a.token else 'not set'}"
                   f"{', client certificates required' if a.tls_client_ca else ''})")
    return "\n".join(out)


def check_config(path: str, out: TextIO) -> int:
    """Validate ``path``; print the summary; 0 when valid."""
    options = load_config(path)
    out.write(f"{path}: OK\n")
    out.write(summarize(options) + "\n")
    return 0


def migrate_config(path: str, out: TextIO, err: TextIO) -> int:
    """Convert the JSON file at ``path`` to TOML on ``out``; notes on ``err``."""
    from dcrouter.config.migrate import migrate_to_toml
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(path, f"invalid JSON: {e}") from None
    text, notes = migrate_to_toml(old)
    out.write(text)
    for note in notes:
        err.write(f"not carried over: {note}\n")
    return 0


def hash_password_command(scheme: str, stdin: TextIO, out: TextIO) -> int:
    """Read a password (prompt on a terminal, else the first line of stdin) and print its hash."""
    from dcrouter.email.auth import hash_password
    if stdin.isatty():
        import getpass
        password = getpass.getpass("password: ")
    else:
        password = stdin.readline().rstrip("\r\n")
    if not password:
        raise ConfigError("password", "must not be empty")
    out.write(hash_password(password, scheme) + "\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m dcrouter``."""
    parser = argparse.ArgumentParser(prog="python -m dcrouter",
                                     description="dcrouter offline commands")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="write a working configuration (fresh API token and demo "
                       "password) and print how to start it")
    p.add_argument("directory", nargs="?", default=".")
    p = sub.add_parser("check-config", help="validate a configuration and summarise it")
    p.add_argument("file")
    p = sub.add_parser("migrate-config", help="convert a seed-style JSON configuration to TOML")
    p.add_argument("file")
    p = sub.add_parser("hash-password", help="print a hashed password for email.auth.users "
                       "(reads the password from stdin or a prompt)")
    p.add_argument("--scheme", default="SCRYPT", choices=["SCRYPT", "SSHA512", "SHA512-CRYPT"])
    args = parser.parse_args(argv)
    try:
        if args.command == "init":
            from dcrouter.initconfig import init
            return init(args.directory, sys.stdout)
        if args.command == "check-config":
            return check_config(args.file, sys.stdout)
        if args.command == "hash-password":
            return hash_password_command(args.scheme, sys.stdin, sys.stdout)
        return migrate_config(args.file, sys.stdout, sys.stderr)
    except ConfigError as e:
        sys.stderr.write(f"dcrouter: configuration error: {e}\n")
        return 2
