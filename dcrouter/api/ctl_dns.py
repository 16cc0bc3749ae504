"""``dcrouterctl dns ...``: the DNS commands of the control tool.

``dcrouterctl dns ds ZONE`` prints the DS record(s) the registrar should
hold for a signed zone (one line each, as a zone file has them), then the
zone's keys with their states; ``--submitted`` tells dcrouter the parent
now serves the new DS, so a KSK rollover waiting for it can finish.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from dcrouter.api.ctl import ApiClient, Printer


def cmd_dns_ds(client: "ApiClient", args: argparse.Namespace, out: "Printer") -> Any:
    """DS records for the registrar, then the keys."""
    from dcrouter.api.ctl import table
    zone = args.zone.rstrip(".") + "."
    path = f"/api/dns/zones/{quote(zone, safe='')}/ds"
    data = client.call("POST" if args.submitted else "GET",
                       path + ("/submitted" if args.submitted else ""))
    if args.json:
        return data
    if args.submitted:
        marked = data.get("marked")
        out(f"; recorded: the parent serves the DS of KSK {marked}" if marked else
            "; no KSK was waiting for its DS")
    for line in data.get("ds", []):
        out(line)
    waiting = data.get("waiting_for_ds")
    if waiting:
        out(f"; KSK {waiting} is waiting: give the registrar the DS above, then run "
            f"'dcrouterctl dns ds {zone} --submitted' (unless dnssec.parent_servers shows it)")
    if args.keys:
        rows = [(k.get("tag"), str(k.get("role", "")).upper(), k.get("algorithm"),
                 k.get("state")) for k in data.get("keys", [])]
        out(table(rows, ("TAG", "ROLE", "ALGORITHM", "STATE")))
    return None


def add_dns_commands(sub: Any) -> None:
    """Register ``dns ds`` on the top-level sub-parsers."""
    dns_cmd = sub.add_parser("dns", help="the DNS server").add_subparsers(
        dest="dns_command", metavar="ACTION", required=True)
    p = dns_cmd.add_parser("ds", help="the DS records of a signed zone, for the registrar")
    p.add_argument("zone", help="a zone with dnssec = true, e.g. example.com")
    p.add_argument("--submitted", action="store_true",
                   help="the parent now serves the new DS: let the KSK rollover finish")
    p.add_argument("--keys", action="store_true", help="also list the keys and their states")
    p.set_defaults(func=cmd_dns_ds)
