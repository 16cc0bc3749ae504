"""``dcrouterctl``: the operator's command line for a running dcrouter, through its API.

Examples::

    dcrouterctl status
    dcrouterctl queue list                       # like postqueue -p
    dcrouterctl queue retry 01JD3S5Q0B7X2C4D5E6F
    dcrouterctl queue retry --all
    dcrouterctl rules add '*@example.com' --mode forward --target 10.0.0.5:25
    dcrouterctl --json stats | jq .summary

Human tables by default, ``--json`` for scripts.  Exit codes scripts can trust:

* 0 - done;
* 1 - the API refused or failed (unknown queue id 404, invalid rule 422, 503 ...);
* 2 - usage error (bad arguments);
* 3 - cannot talk to the API: connection refused, timeout, not dcrouter,
  or authentication refused (401, or 429 after too many failures).

The URL defaults to http://127.0.0.1:8088 (``--url`` or ``DCROUTER_API_URL``);
the token comes from ``--token`` or ``DCROUTER_API_TOKEN``.  For an HTTPS API
(``--url https://...``) the server certificate is verified against the
system's CAs, or ``--cacert FILE`` (``DCROUTER_API_CACERT``) - e.g. the
router's self-signed ``state_dir/api/certs/*.crt``; ``--insecure`` skips the
verification.  ``--cert``/``--key`` (``DCROUTER_API_CERT``/``DCROUTER_API_KEY``)
present a client certificate when the API requires mutual TLS.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Optional, Sequence, TextIO

from dcrouter.api.ctlformat import duration, flatten, format_queue, table

EXIT_OK = 0
EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_CONNECTION = 3

DEFAULT_URL = "http://127.0.0.1:8088"


class CtlError(Exception):
    """A failure with the exit code it maps to and, for API errors, the JSON body."""

    def __init__(self, exit_code: int, message: str, body: Optional[dict] = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message
        self.body = body


class ApiClient:
    """A small blocking client of the management API (urllib, no dependencies)."""

    def __init__(self, url: str, token: str = "", timeout: float = 10.0,
                 ssl_context: Optional[ssl.SSLContext] = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.ssl_context = ssl_context

    def call(self, method: str, path: str, body: Any = None,
             query: Optional[dict[str, Any]] = None) -> Any:
        """One request; returns the parsed JSON or raises :class:`CtlError`."""
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout,
                                        context=self.ssl_context) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            raise self._http_error(e) from None
        except ssl.SSLCertVerificationError as e:
            raise CtlError(EXIT_CONNECTION, f"the certificate of {self.url} is not trusted: "
                           f"{e.verify_message} (pass --cacert FILE with the API's certificate "
                           "or its CA, or --insecure)") from None
        except ssl.SSLError as e:
            raise CtlError(EXIT_CONNECTION, f"TLS with {self.url} failed: {e.reason or e}"
                           f"{_tls_hint(e)}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, ssl.SSLCertVerificationError):
                raise CtlError(EXIT_CONNECTION, f"the certificate of {self.url} is not trusted: "
                               f"{e.reason.verify_message} (pass --cacert FILE with the API's "
                               "certificate or its CA, or --insecure)") from None
            if isinstance(e.reason, ssl.SSLError):
                raise CtlError(EXIT_CONNECTION, f"TLS with {self.url} failed: "
                               f"{e.reason.reason or e.reason}{_tls_hint(e.reason)}") from None
            raise CtlError(EXIT_CONNECTION, f"cannot reach the dcrouter API at {self.url}: "
                           f"{e.reason}") from None
        except http.client.HTTPException as e:
            raise CtlError(EXIT_CONNECTION, f"{self.url} did not answer like the dcrouter API "
                           f"({type(e).__name__})") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise CtlError(EXIT_CONNECTION, f"cannot reach the dcrouter API at {self.url}: "
                           f"{reason}") from None
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CtlError(EXIT_CONNECTION, f"{self.url} did not answer like the dcrouter API "
                           "(no JSON)") from None

    @staticmethod
    def _http_error(error: urllib.error.HTTPError) -> CtlError:
        try:
            body = json.loads(error.read().decode("utf-8"))
            detail = body["error"]
            message = str(detail["message"])
            if detail.get("path") and detail["path"] not in message:
                message = f"{detail['path']}: {message}"
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            body, message = None, f"HTTP {error.code} {error.reason}"
        if error.code == 401:
            hint = " (pass --token or set DCROUTER_API_TOKEN)"
            return CtlError(EXIT_CONNECTION, f"authentication refused: {message}{hint}", body)
        if error.code == 429:
            return CtlError(EXIT_CONNECTION, f"authentication refused: {message}", body)
        return CtlError(EXIT_API_ERROR, f"{message} (HTTP {error.code})", body)


def _tls_hint(error: ssl.SSLError) -> str:
    if "CERTIFICATE_REQUIRED" in str(error) or "HANDSHAKE_FAILURE" in str(error):
        return " (does the API require a client certificate? pass --cert/--key)"
    if "WRONG_VERSION_NUMBER" in str(error):
        return " (is the API speaking plain HTTP? use an http:// URL)"
    return ""


def make_ssl_context(cacert: str = "", insecure: bool = False, cert: str = "",
                     key: str = "") -> ssl.SSLContext:
    """A client TLS context: TLS 1.2 or newer, verifying against ``cacert`` (or system CAs).

    Raises :class:`CtlError` (usage) for unreadable files.
    """
    try:
        context = ssl.create_default_context(cafile=cacert or None)
    except (OSError, ssl.SSLError) as e:
        raise CtlError(EXIT_USAGE, f"cannot load --cacert {cacert}: {e}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert or key:
        try:
            context.load_cert_chain(cert or key, key or None)
        except (OSError, ssl.SSLError) as e:
            raise CtlError(EXIT_USAGE, f"cannot load the client certificate {cert or key}: "
                           f"{e}") from None
    return context


# -- commands --------------------------------------------------------------------

Printer = Callable[[str], None]


def cmd_status(client: ApiClient, args: argparse.Namespace, out: Printer) -> Any:
    """Services, listeners, version and uptime."""
    data = client.call("GET", "/api/status")
    if args.json:
        return data
    out(f"dcrouter {data.get('version', '?')}, up {duration(data.get('uptime', 0))}")
    rows = []
    for name, service in sorted(data.get("services", {}).items()):
        listeners = [f"{l['protocol']} {l['host']}:{l['port']}"
                     for l in service.get("listeners", [])]
        rows.append((name, "running" if service.get("running") else "stopped", listeners))
    out(table(rows, ("SERVICE", "STATE", "LISTENERS")))
    return None


def cmd_stats(client: ApiClient, args: argparse.Namespace, out: Printer) -> Any:
    """Every service's figures, flattened."""
    data = client.call("GET", "/api/stats")
    if args.json:
        return data
    rows = [(k, v) for k, v in flatten({k: v for k, v in data.items()
                                        if k not in ("version", "uptime")})]
    out(f"dcrouter {data.get('version', '?')}, up {duration(data.get('uptime', 0))}")
    out(table(rows, ("FIGURE", "VALUE")))
    return None


def cmd_queue_list(client: ApiClient, args: argparse.Namespace, out: Printer) -> Any:
    """Every item (following cursors), postqueue -p style."""
    items: list[dict] = []
    cursor = None
    scope = None
    while True:
        page_size = min(500, args.limit - len(items)) if args.limit else 500
        page = client.call("GET", "/api/queue",
                           query={"status": args.status, "limit": page_size, "cursor": cursor})
        items.extend(page.get("items", []))
        scope = page.get("scope", scope)
        cursor = page.get("next_cursor")
        if not cursor or (args.limit and len(items) >= args.limit):
            break
    if args.json:
        return {"items": items, "count": len(items), **({"scope": scope} if scope else {})}
    out(format_queue(items))
    if scope:
        out(f"-- {scope.get('note', 'part of the queue only')}")
    return None


def cmd_queue_show(client: ApiClient, args: argparse.Namespace, out: Printer) -> Any:
    """One item's fields."""
    data = client.call("GET", f"/api/queue/{_q(args.id)}")
    if args.json:
        return data
    out(table(flatten(data.get("item", {})), ("FIELD", "VALUE")))
    return None


def cmd_queue_retry(client: ApiClient, args: argparse.Namespace, out: Printer) -> Any:
    """Retry one item, or every deferred one with --all."""
    if args.all == bool(args.id):
        raise CtlError(EXIT_USAGE, "queue retry needs a queue id or --all (not both)")
    if args.all:
        data = client.call("POST", "/api/queue/retry")
        message = f"retrying {data.get('retried')} item(s)" \
            if isinstance(data.get("retried"), int) else "retrying every deferred item"
    else:
        data = client.call("POST", f"/api/queue/{_q(args.id)}/retry")
        message = f"{args.id}: retry scheduled"
    if args.json:
        return data
    out(message)
    return None


def cmd_queue_delete(client: ApiClient, args: argparse.Namespace, out: Printer) -> Any:
    """Delete one item (no bounce is sent)."""
    data = client.call("DELETE", f"/api/queue/{_q(args.id)}")
    if args.json:
        return data
    out(f"{args.id}: deleted")
    return None


def _queue_action(action: str, message: str) -> Callable[..., Any]:
    def run(client: ApiClient, args: argparse.Namespace, out: Printer) -> Any:
        data = client.call("POST", f"/api/queue/{action}")
        if args.json:
            return data
        out(message)
        return None
    run.__doc__ = message
    return run


def cmd_rules_list(client: ApiClient, args: argparse.Namespace, out: Printer) -> Any:
    """The domain rules in order."""
    data = client.call("GET", "/api/email/rules")
    if args.json:
        return data
    rows = []
    for i, rule in enumerate(data.get("rules", [])):
        target = rule.get("target") or {}
        where = f"{target.get('server')}:{target.get('port', 25)}" if target else ""
        mta = rule.get("mta_options") or {}
        if not where and mta.get("allow_local_delivery"):
            where = f"local {mta.get('local_delivery_path', '')}".strip()
        rows.append((i, rule.get("pattern"), rule.get("mode"), where or "-"))
    out(table(rows, ("#", "PATTERN", "MODE", "TARGET")))
    if not data.get("persisted"):
        out("(api.persist_rules = false: API changes last until the next restart or reload)")
    return None


def _rule_from_args(args: argparse.Namespace) -> dict:
    if args.rule_json:
        try:
            text = sys.stdin.read() if args.rule_json == "-" else \
                open(args.rule_json, encoding="utf-8").read()
            loaded = json.loads(text)
        except OSError as e:
            raise CtlError(EXIT_USAGE, f"cannot read {args.rule_json}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise CtlError(EXIT_USAGE, f"{args.rule_json} is not JSON: {e}") from None
        if not isinstance(loaded, dict):
            raise CtlError(EXIT_USAGE, "the rule JSON must be an object")
        loaded.setdefault("pattern", args.pattern)
        if args.mode:
            loaded["mode"] = args.mode
        return loaded
    if not args.mode:
        raise CtlError(EXIT_USAGE, "rules add needs --mode (or --rule-json)")
    rule: dict[str, Any] = {"pattern": args.pattern, "mode": args.mode}
    if args.target:
        host, sep, port = args.target.rpartition(":")
        if not sep or not (port.isascii() and port.isdigit()):
            host, port = args.target, "25"
        target: dict[str, Any] = {"server": host.strip("[]"), "port": int(port)}
        if args.tls:
            target["use_tls"] = True
        rule["target"] = target
    if args.local_delivery_path:
        rule["mta_options"] = {"allow_local_delivery": True,
                               "local_delivery_path": args.local_delivery_path}
    if args.content_scanning:
        rule["content_scanning"] = True
    return rule


def cmd_rules_add(client: ApiClient, args: argparse.Namespace, out: Printer) -> Any:
    """Add a rule (validated by the router like the configuration file)."""
    rule = _rule_from_args(args)
    data = client.call("POST", "/api/email/rules", body=rule,
                       query={"position": args.position})
    if args.json:
        return data
    out(f"added {data['rule']['pattern']} ({data['rule']['mode']}) at position "
        f"{data.get('position')}")
    return None


def cmd_rules_remove(client: ApiClient, args: argparse.Namespace, out: Printer) -> Any:
    """Remove a rule by pattern."""
    data = client.call("DELETE", f"/api/email/rules/{_q(args.pattern)}")
    if args.json:
        return data
    out(f"removed {data['removed']['pattern']}")
    return None


def cmd_reload(client: ApiClient, args: argparse.Namespace, out: Printer) -> Any:
    """Re-read the configuration file (as SIGHUP)."""
    data = client.call("POST", "/api/reload")
    if args.json:
        return data
    out(f"reloaded {data.get('config_path', 'the configuration')}")
    return None


def cmd_suppression_list(client: ApiClient, args: argparse.Namespace, out: Printer) -> Any:
    """Recipients refused after a hard bounce."""
    data = client.call("GET", "/api/email/suppression")
    if args.json:
        return data
    entries = data.get("suppressed", [])
    if not entries:
        out("no suppressed recipients")
        return None
    for entry in entries:
        expires = time.strftime("%Y-%m-%d %H:%M", time.gmtime(entry.get("expires", 0)))
        out(f"{entry['address']:<40} until {expires}  {entry.get('reason', '')}")
    return None


def cmd_suppression_remove(client: ApiClient, args: argparse.Namespace, out: Printer) -> Any:
    """Lift one suppression."""
    data = client.call("DELETE", f"/api/email/suppression/{_q(args.address)}")
    if args.json:
        return data
    out(f"{args.address}: no longer suppressed")
    return None


def _q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


# -- argument parsing ----------------------------------------------------------------

EPILOG = """exit codes:
  0  done
  1  the API refused or failed (e.g. 404 unknown queue id, 422 invalid rule, 503)
  2  usage error
  3  cannot talk to the API (connection refused, timeout, not dcrouter) or
     authentication refused (401; 429 after too many failed attempts)

environment: DCROUTER_API_URL, DCROUTER_API_TOKEN, DCROUTER_API_CACERT,
             DCROUTER_API_CERT, DCROUTER_API_KEY
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render --help)."""
    parser = argparse.ArgumentParser(
        prog="dcrouterctl", description="Operate a running dcrouter through its management API.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("DCROUTER_API_URL", DEFAULT_URL),
                        help=f"API base URL (default {DEFAULT_URL}, or DCROUTER_API_URL)")
    parser.add_argument("--token", default=None,
                        help="API bearer token (default: DCROUTER_API_TOKEN)")
    parser.add_argument("--cacert", default=os.environ.get("DCROUTER_API_CACERT", ""),
                        metavar="FILE", help="PEM CA or certificate that the HTTPS API's "
                        "certificate must chain to (default: system CAs, or DCROUTER_API_CACERT)")
    parser.add_argument("--insecure", action="store_true",
                        help="HTTPS without verifying the API's certificate")
    parser.add_argument("--cert", default=os.environ.get("DCROUTER_API_CERT", ""),
                        metavar="FILE", help="client certificate (PEM) for mutual TLS "
                        "(or DCROUTER_API_CERT)")
    parser.add_argument("--key", default=os.environ.get("DCROUTER_API_KEY", ""),
                        metavar="FILE", help="private key of --cert when not in the same file "
                        "(or DCROUTER_API_KEY)")
    parser.add_argument("--json", action="store_true", help="print the API's JSON")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("status", help="services, listeners, uptime")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("stats", help="figures of every service")
    p.set_defaults(func=cmd_stats)

    queue = sub.add_parser("queue", help="the delivery queue").add_subparsers(
        dest="queue_command", metavar="ACTION", required=True)
    p = queue.add_parser("list", help="items, like postqueue -p")
    p.add_argument("--status", help="only items with this status")
    p.add_argument("--limit", type=int, default=0, help="at most this many items")
    p.set_defaults(func=cmd_queue_list)
    p = queue.add_parser("show", help="one item")
    p.add_argument("id")
    p.set_defaults(func=cmd_queue_show)
    p = queue.add_parser("retry", help="retry an item now (or --all)")
    p.add_argument("id", nargs="?")
    p.add_argument("--all", action="store_true", help="every deferred item")
    p.set_defaults(func=cmd_queue_retry)
    p = queue.add_parser("delete", help="delete an item (no bounce)")
    p.add_argument("id")
    p.set_defaults(func=cmd_queue_delete)
    for action, message in (("pause", "queue paused: no new delivery attempts"),
                            ("resume", "queue resumed"),
                            ("flush", "flushing: every deferred item is attempted now")):
        p = queue.add_parser(action, help=message.split(":")[0])
        p.set_defaults(func=_queue_action(action, message))

    rules = sub.add_parser("rules", help="email domain rules").add_subparsers(
        dest="rules_command", metavar="ACTION", required=True)
    p = rules.add_parser("list", help="the rules in order")
    p.set_defaults(func=cmd_rules_list)
    p = rules.add_parser("add", help="add a rule")
    p.add_argument("pattern", help="e.g. '*@example.com'")
    p.add_argument("--mode", choices=("forward", "mta", "process"))
    p.add_argument("--target", help="forward target host:port")
    p.add_argument("--tls", action="store_true", help="require TLS to the target")
    p.add_argument("--local-delivery-path", help="mta: deliver into Maildirs under this path")
    p.add_argument("--content-scanning", action="store_true", help="process: run scanners")
    p.add_argument("--position", type=int, help="insert at this index (default: append)")
    p.add_argument("--rule-json", metavar="FILE", help="the whole rule as JSON ('-': stdin)")
    p.set_defaults(func=cmd_rules_add)
    p = rules.add_parser("remove", help="remove a rule")
    p.add_argument("pattern")
    p.set_defaults(func=cmd_rules_remove)

    suppression = sub.add_parser("suppression", help="recipients refused after hard bounces"
                                 ).add_subparsers(dest="suppression_command", required=True)
    p = suppression.add_parser("list", help="suppressed recipients")
    p.set_defaults(func=cmd_suppression_list)
    p = suppression.add_parser("remove", help="lift one suppression")
    p.add_argument("address")
    p.set_defaults(func=cmd_suppression_remove)

    p = sub.add_parser("reload", help="re-read the configuration file (as SIGHUP)")
    p.set_defaults(func=cmd_reload)
    from dcrouter.api.ctl_dns import add_dns_commands
    add_dns_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None, stdout: Optional[TextIO] = None,
         stderr: Optional[TextIO] = None) -> int:
    """Run one command; returns the exit code (the console script exits with it)."""
    out_stream = stdout or sys.stdout
    err_stream = stderr or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    token = args.token if args.token is not None else os.environ.get("DCROUTER_API_TOKEN", "")

    def out(text: str) -> None:
        out_stream.write(text + "\n")

    try:
        context = None
        if urllib.parse.urlsplit(args.url).scheme == "https":
            context = make_ssl_context(args.cacert, args.insecure, args.cert, args.key)
        client = ApiClient(args.url, token, args.timeout, context)
        result = args.func(client, args, out)
    except CtlError as e:
        if args.json and e.body is not None:
            out(json.dumps(e.body, indent=2))
        err_stream.write(f"dcrouterctl: {e.message}\n")
        return e.exit_code
    if args.json:
        out(json.dumps(result, indent=2, default=str))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
