"""Migration of the seed's camelCase TypeScript configuration to dcrouter's TOML.

:func:`migrate` converts an ``IDcRouterOptions`` JSON object (``emailConfig``,
``smartProxyConfig``, ``dnsServerConfig``, ``tls``) and the legacy
``smtpConfig`` of the seed plan's sections 7.1/7.2 into the TOML data of
``docs/configuration.md``.  Whatever cannot be carried over is listed in the
returned notes (the CLI prints them on stderr); the result is validated with
the same loader as any configuration file.

Durations: the TypeScript version counted milliseconds (``connectionTimeout:
60000``); dcrouter counts seconds, so values are divided by 1000.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from dcrouter.config.loader import parse_config
from dcrouter.config.toml_writer import dumps
from dcrouter.errors import ConfigError


class Migration:
    """Collects the converted data and the notes about what was left out."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.data: dict[str, Any] = {}

    def note(self, path: str, text: str) -> None:
        """Record something not carried over (or changed) at ``path``."""
        self.notes.append(f"{path}: {text}")

    def leftover(self, source: Mapping[str, Any], used: set[str], path: str) -> None:
        """Note every key of ``source`` that was not used."""
        for key in source:
            if key not in used:
                self.note(f"{path}.{key}" if path else key, "not carried over (no equivalent)")


def _seconds(ms: Any) -> Any:
    if isinstance(ms, (int, float)) and not isinstance(ms, bool):
        value = ms / 1000.0
        return int(value) if value == int(value) else value
    return ms


def _pattern_for_domain(domain: str) -> str:
    domain = domain.strip()
    return domain if "@" in domain else f"*@{domain}"


def _tls(src: Mapping[str, Any], m: Migration, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for old, new in (("certPath", "cert_path"), ("keyPath", "key_path"), ("caPath", "ca_path"),
                     ("minVersion", "min_version"), ("ciphers", "ciphers")):
        if old in src:
            out[new] = src[old]
    m.leftover(src, {"certPath", "keyPath", "caPath", "minVersion", "ciphers"}, path)
    return out


def _auth(src: Mapping[str, Any], m: Migration, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "required" in src:
        out["required"] = bool(src["required"])
    if "methods" in src:
        methods = ["XOAUTH2" if x == "OAUTH2" else x for x in src["methods"]]
        out["methods"] = methods
    if "users" in src:
        out["users"] = [{"username": u.get("username", ""), "password": u.get("password", "")}
                        for u in src["users"]]
    m.leftover(src, {"required", "methods", "users"}, path)
    return out


def _mta_options(src: Mapping[str, Any], m: Migration, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for old, new in (("domain", "domain"), ("allowLocalDelivery", "allow_local_delivery"),
                     ("localDeliveryPath", "local_delivery_path"), ("dkimSign", "dkim_sign")):
        if old in src:
            out[new] = src[old]
    if "dkimOptions" in src:
        out["dkim_options"] = _dkim_options(src["dkimOptions"], m, f"{path}.dkimOptions")
    m.leftover(src, {"domain", "allowLocalDelivery", "localDeliveryPath", "dkimSign",
                     "dkimOptions"}, path)
    return out


def _dkim_options(src: Mapping[str, Any], m: Migration, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "domainName" in src:
        out["domain_name"] = src["domainName"]
    if "keySelector" in src:
        out["key_selector"] = src["keySelector"]
    key = src.get("privateKey")
    if key:
        if "BEGIN" in str(key):
            out["private_key"] = key
            m.note(f"{path}.privateKey", "inline key kept as private_key; better move it to a "
                   "file and set private_key_path")
        else:
            out["private_key_path"] = key
    m.leftover(src, {"domainName", "keySelector", "privateKey"}, path)
    return out


def _scanners(src: list, m: Migration, path: str) -> list[dict[str, Any]]:
    out = []
    for i, s in enumerate(src):
        item: dict[str, Any] = {"type": s.get("type", ""), "action": s.get("action", "tag")}
        if "threshold" in s:
            item["threshold"] = float(s["threshold"])
        if "blockedExtensions" in s:
            item["blocked_extensions"] = list(s["blockedExtensions"])
        m.leftover(s, {"type", "action", "threshold", "blockedExtensions"}, f"{path}[{i}]")
        out.append(item)
    return out


_TRANSFORM_TYPES = {"addHeader": "add_header", "removeHeader": "remove_header",
                    "rewriteSubject": "rewrite_subject", "dkimSign": "dkim_sign",
                    "addFooter": "add_footer"}


def _transformations(src: list, m: Migration, path: str) -> list[dict[str, Any]]:
    out = []
    for i, t in enumerate(src):
        kind = t.get("type", "")
        item: dict[str, Any] = {"type": _TRANSFORM_TYPES.get(kind, kind)}
        for key, value in t.items():
            if key == "type":
                continue
            if kind == "dkimSign" and key == "domains":
                m.note(f"{path}[{i}].domains", "dkim_sign signs for email.dkim.domains (or its "
                       "own 'domain'): move the listed domains there")
                continue
            item[_snake(key)] = value
        out.append(item)
    return out


def _snake(name: str) -> str:
    out = []
    for ch in name:
        if ch.isupper():
            out.append("_" + ch.lower())
        else:
            out.append(ch)
    return "".join(out)


def _rate_limits(src: Mapping[str, Any], m: Migration, path: str) -> dict[str, Any]:
    out = {}
    for old, new in (("maxMessagesPerMinute", "max_messages_per_minute"),
                     ("maxRecipientsPerMessage", "max_recipients_per_message")):
        if old in src:
            out[new] = src[old]
    m.leftover(src, {"maxMessagesPerMinute", "maxRecipientsPerMessage"}, path)
    return out


def _target(src: Mapping[str, Any], m: Migration, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {"server": src.get("server", "")}
    if "port" in src:
        out["port"] = src["port"]
    if "useTls" in src:
        out["use_tls"] = bool(src["useTls"])
    auth = src.get("authentication")
    if auth:
        out["authentication"] = {"user": auth.get("user", ""), "pass": auth.get("pass", "")}
    m.leftover(src, {"server", "port", "useTls", "authentication"}, path)
    return out


def _domain_rule(src: Mapping[str, Any], m: Migration, path: str) -> dict[str, Any]:
    rule: dict[str, Any] = {"pattern": _pattern_for_domain(src.get("pattern", "")),
                            "mode": src.get("mode", "")}
    if "target" in src:
        rule["target"] = _target(src["target"], m, f"{path}.target")
    if "mtaOptions" in src:
        rule["mta_options"] = _mta_options(src["mtaOptions"], m, f"{path}.mtaOptions")
    if "contentScanning" in src:
        rule["content_scanning"] = bool(src["contentScanning"])
    if "scanners" in src:
        rule["scanners"] = _scanners(src["scanners"], m, f"{path}.scanners")
    if "transformations" in src:
        rule["transformations"] = _transformations(src["transformations"], m,
                                                   f"{path}.transformations")
    if "rateLimits" in src:
        rule["rate_limits"] = _rate_limits(src["rateLimits"], m, f"{path}.rateLimits")
    m.leftover(src, {"pattern", "mode", "target", "mtaOptions", "contentScanning", "scanners",
                     "transformations", "rateLimits"}, path)
    return rule


def _queue(src: Mapping[str, Any], m: Migration, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "storageType" in src:
        out["storage_type"] = src["storageType"]
    if "persistentPath" in src:
        out["persistent_path"] = src["persistentPath"]
    if "maxRetries" in src:
        out["max_retries"] = src["maxRetries"]
    for old, new in (("baseRetryDelay", "base_retry_delay"), ("maxRetryDelay", "max_retry_delay")):
        if old in src:
            out[new] = _seconds(src[old])
            m.note(f"{path}.{old}", f"milliseconds converted to seconds ({out[new]})")
    for old, new in (("maxQueueSize", "max_queue_size"), ("maxPerDestination",
                                                           "max_per_destination")):
        if old in src:
            out[new] = src[old]
    if "checkInterval" in src:
        out["check_interval"] = _seconds(src["checkInterval"])
    m.leftover(src, {"storageType", "persistentPath", "maxRetries", "baseRetryDelay",
                     "maxRetryDelay", "maxQueueSize", "maxPerDestination", "checkInterval"}, path)
    return out


def _email_config(src: Mapping[str, Any], m: Migration, path: str) -> dict[str, Any]:
    email: dict[str, Any] = {}
    for old, new in (("hostname", "hostname"), ("ports", "ports"),
                     ("maxMessageSize", "max_message_size"), ("defaultMode", "default_mode"),
                     ("defaultServer", "default_server"), ("defaultPort", "default_port"),
                     ("defaultTls", "default_tls")):
        if old in src:
            email[new] = src[old]
    if "tls" in src:
        email["tls"] = _tls(src["tls"], m, f"{path}.tls")
    if "auth" in src:
        email["auth"] = _auth(src["auth"], m, f"{path}.auth")
    if "domainRules" in src:
        email["domain_rules"] = [_domain_rule(r, m, f"{path}.domainRules[{i}]")
                                 for i, r in enumerate(src["domainRules"])]
    if "queue" in src:
        email["queue"] = _queue(src["queue"], m, f"{path}.queue")
    g = src.get("mtaGlobalOptions") or {}
    if g:
        gp = f"{path}.mtaGlobalOptions"
        if "smtpBanner" in g:
            email["banner"] = g["smtpBanner"]
        if "maxConnections" in g:
            email["max_connections"] = g["maxConnections"]
        if "connTimeout" in g:
            email["connection_timeout"] = _seconds(g["connTimeout"])
            m.note(f"{gp}.connTimeout", "milliseconds converted to seconds")
        if "spoolDir" in g:
            m.note(f"{gp}.spoolDir", "the spool lives under router.state_dir; set that instead")
        if "dkimKeyPath" in g:
            m.note(f"{gp}.dkimKeyPath", "keys live under router.state_dir/dkim or in each "
                   "rule's dkim_options.private_key_path")
        m.leftover(g, {"smtpBanner", "maxConnections", "connTimeout", "spoolDir",
                       "dkimKeyPath"}, gp)
    _add_special_ports(email)
    m.leftover(src, {"hostname", "ports", "maxMessageSize", "defaultMode", "defaultServer",
                     "defaultPort", "defaultTls", "tls", "auth", "domainRules", "queue",
                     "mtaGlobalOptions"}, path)
    return email


def _add_special_ports(email: dict[str, Any]) -> None:
    ports = email.get("ports") or []
    if 587 in ports and "submission_ports" not in email:
        email["submission_ports"] = [587]
    if 465 in ports and "implicit_tls_ports" not in email:
        email["implicit_tls_ports"] = [465]


def _legacy_smtp(src: Mapping[str, Any], m: Migration, path: str) -> dict[str, Any]:
    """The pre-consolidation ``smtpConfig`` of the seed's sections 7.1/7.2."""
    email: dict[str, Any] = {}
    for old, new in (("hostname", "hostname"), ("ports", "ports"),
                     ("maxMessageSize", "max_message_size")):
        if old in src:
            email[new] = src[old]
    if "tls" in src:
        email["tls"] = _tls(src["tls"], m, f"{path}.tls")
    global_scanners = _scanners(src.get("scanners", []), m, f"{path}.scanners")
    global_transforms = _transformations(src.get("transformations", []), m,
                                         f"{path}.transformations")
    scanning = bool(src.get("contentScanning"))
    rules: list[dict[str, Any]] = []
    for i, dc in enumerate(src.get("domainConfigs", [])):
        dpath = f"{path}.domainConfigs[{i}]"
        targets = dc.get("targetIPs") or []
        if len(targets) > 1:
            m.note(f"{dpath}.targetIPs", f"only the first target ({targets[0]}) is used; "
                   "dcrouter relays each rule to one server")
        transforms = list(global_transforms)
        if dc.get("addHeaders"):
            for h in dc.get("headerInfo", []):
                transforms.append({"type": "add_header", "header": h.get("name", ""),
                                   "value": h.get("value", "")})
        if dc.get("signDkim") and not any(t["type"] == "dkim_sign" for t in transforms):
            transforms.append({"type": "dkim_sign"})
        processing = scanning or bool(transforms)
        for domain in dc.get("domains", []):
            rule: dict[str, Any] = {"pattern": _pattern_for_domain(domain),
                                    "mode": "process" if processing else "forward"}
            if targets:
                target: dict[str, Any] = {"server": targets[0]}
                if "port" in dc:
                    target["port"] = dc["port"]
                if "useTls" in dc:
                    target["use_tls"] = bool(dc["useTls"])
                rule["target"] = target
            if scanning:
                rule["content_scanning"] = True
                rule["scanners"] = global_scanners
            if transforms:
                rule["transformations"] = transforms
            if dc.get("signDkim") and dc.get("dkimOptions"):
                rule["mta_options"] = {"dkim_sign": True, "dkim_options": _dkim_options(
                    dc["dkimOptions"], m, f"{dpath}.dkimOptions")}
            if "rateLimits" in dc:
                rule["rate_limits"] = _rate_limits(dc["rateLimits"], m, f"{dpath}.rateLimits")
            rules.append(rule)
        m.leftover(dc, {"domains", "targetIPs", "port", "useTls", "addHeaders", "headerInfo",
                        "signDkim", "dkimOptions", "rateLimits"}, dpath)
    if rules:
        email["domain_rules"] = rules
    if src.get("defaultServer"):
        email["default_mode"] = "forward"
        email["default_server"] = src["defaultServer"]
        if "defaultPort" in src:
            email["default_port"] = src["defaultPort"]
        if "useTls" in src:
            email["default_tls"] = bool(src["useTls"])
    queue: dict[str, Any] = {}
    if "queueStorage" in src:
        queue["storage_type"] = src["queueStorage"]
    if "persistentPath" in src:
        queue["persistent_path"] = src["persistentPath"]
    if "maxRetries" in src:
        queue["max_retries"] = src["maxRetries"]
    if queue:
        email["queue"] = queue
    _add_special_ports(email)
    m.leftover(src, {"hostname", "ports", "maxMessageSize", "tls", "domainConfigs",
                     "defaultServer", "defaultPort", "useTls", "queueStorage", "persistentPath",
                     "maxRetries", "contentScanning", "scanners", "transformations"}, path)
    return email


def _port_ranges(ranges: Any) -> list[Any]:
    out: list[Any] = []
    for r in ranges or []:
        lo, hi = r.get("from"), r.get("to", r.get("from"))
        out.append(lo if lo == hi else f"{lo}-{hi}")
    return out


def _smart_proxy(src: Mapping[str, Any], m: Migration, path: str,
                 acme_email: str = "") -> dict[str, Any]:
    proxy: dict[str, Any] = {}
    routes = []
    to_port = src.get("toPort")
    default_target = src.get("targetIP")
    sni = bool(src.get("sniEnabled"))
    global_ports = _port_ranges(src.get("globalPortRanges")) or (
        [src["fromPort"]] if "fromPort" in src else [])
    for i, dc in enumerate(src.get("domainConfigs", [])):
        dpath = f"{path}.domainConfigs[{i}]"
        ports = _port_ranges(dc.get("portRanges")) or global_ports
        targets = dc.get("targetIPs") or ([default_target] if default_target else [])
        if to_port is None:
            m.note(f"{dpath}", "no toPort: targets use the listening port 443/80 as given")
        tls_ports = [p for p in ports if p == 443 or (isinstance(p, int) and sni and p != 80)]
        plain_ports = [p for p in ports if p not in tls_ports]
        base: dict[str, Any] = {"domains": list(dc.get("domains", ["*"]))}
        if "allowedIPs" in dc:
            base["allowed_ips"] = list(dc["allowedIPs"])
        if "blockedIPs" in dc:
            base["blocked_ips"] = list(dc["blockedIPs"])
        if "connectionTimeout" in dc:
            base["connection_timeout"] = _seconds(dc["connectionTimeout"])
        for kind, group in (("tls", tls_ports), ("plain", plain_ports)):
            if not group:
                continue
            route = {"name": f"{(dc.get('domains') or ['route'])[0]}-{kind}".replace("*", "any"),
                     "ports": group, **base}
            port_for_target = to_port if to_port is not None else group[0]
            route["targets"] = [f"{t}:{port_for_target}" for t in targets]
            if kind == "tls":
                route["tls"] = "passthrough"
            routes.append(route)
        if dc.get("useNetworkProxy") is not None:
            m.note(f"{dpath}.useNetworkProxy", "not needed: dcrouter always proxies at TCP level")
        m.leftover(dc, {"domains", "allowedIPs", "blockedIPs", "targetIPs", "portRanges",
                        "connectionTimeout", "useNetworkProxy"}, dpath)
    if routes:
        proxy["routes"] = routes
    acme = src.get("acme")
    if acme:
        a: dict[str, Any] = {"enabled": bool(acme.get("enabled"))}
        if acme.get("accountEmail") or acme_email:
            a["account_email"] = acme.get("accountEmail") or acme_email
        if "renewThresholdDays" in acme:
            a["renew_threshold_days"] = acme["renewThresholdDays"]
        if acme.get("useProduction") is False:
            a["directory_url"] = "https://acme-staging-v02.api.letsencrypt.org/directory"
        if "port" in acme:
            a["http_port"] = acme["port"]   # where http-01 validation requests arrive
        if "autoRenew" in acme and not acme["autoRenew"]:
            m.note(f"{path}.acme.autoRenew", "dcrouter always renews")
        m.leftover(acme, {"enabled", "accountEmail", "renewThresholdDays", "useProduction",
                          "port", "autoRenew"}, f"{path}.acme")
        proxy["acme"] = a
    m.leftover(src, {"fromPort", "toPort", "targetIP", "sniEnabled", "acme", "globalPortRanges",
                     "domainConfigs"}, path)
    return proxy


def _dns(src: Mapping[str, Any], m: Migration, path: str) -> dict[str, Any]:
    dns: dict[str, Any] = {}
    port = src.get("udpPort", src.get("port"))
    if port is not None:
        dns["port"] = port
    if "dnssecZone" in src:
        dns["zones"] = [{"origin": src["dnssecZone"]}]
        m.note(f"{path}.dnssecZone", "zone created without records and without DNSSEC signing")
    m.leftover(src, {"udpPort", "port", "dnssecZone"}, path)
    return dns


def migrate(old: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Convert seed-style options; returns (TOML data, notes on what was not carried over)."""
    if not isinstance(old, Mapping):
        raise ConfigError("", "the old configuration must be a JSON object")
    m = Migration()
    data = m.data
    tls = old.get("tls") or {}
    if "emailConfig" in old:
        data["email"] = _email_config(old["emailConfig"], m, "emailConfig")
    if "smtpConfig" in old:
        legacy = _legacy_smtp(old["smtpConfig"], m, "smtpConfig")
        if "email" in data:
            m.note("smtpConfig", "both emailConfig and smtpConfig given; emailConfig wins, "
                   "smtpConfig domain rules are appended")
            rules = data["email"].setdefault("domain_rules", [])
            known = {r["pattern"] for r in rules}
            rules.extend(r for r in legacy.get("domain_rules", []) if r["pattern"] not in known)
        else:
            data["email"] = legacy
    if "domainRules" in old:
        email = data.setdefault("email", {})
        email.setdefault("domain_rules", []).extend(
            _domain_rule(r, m, f"domainRules[{i}]") for i, r in enumerate(old["domainRules"]))
    if "smartProxyConfig" in old:
        data["proxy"] = _smart_proxy(old["smartProxyConfig"], m, "smartProxyConfig",
                                     tls.get("contactEmail", ""))
    if "dnsServerConfig" in old:
        data["dns"] = _dns(old["dnsServerConfig"], m, "dnsServerConfig")
    if tls:
        if "email" in data and tls.get("certPath") and "tls" not in data["email"]:
            data["email"]["tls"] = {"cert_path": tls["certPath"], "key_path": tls.get("keyPath", "")}
        if tls.get("contactEmail") and "proxy" not in data:
            m.note("tls.contactEmail", "no smartProxyConfig: no ACME account to attach it to")
        m.leftover(tls, {"certPath", "keyPath", "contactEmail", "domain"}, "tls")
    m.leftover(old, {"emailConfig", "smtpConfig", "domainRules", "smartProxyConfig",
                     "dnsServerConfig", "tls"}, "")
    return data, m.notes


def migrate_to_toml(old: Mapping[str, Any]) -> tuple[str, list[str]]:
    """Convert and serialise; the TOML is validated (a ConfigError names what is wrong)."""
    data, notes = migrate(old)
    text = "# Migrated from a seed-style (TypeScript) dcrouter configuration.\n" + dumps(data)
    parse_config(data)
    return text, notes


def first_error(old: Mapping[str, Any]) -> Optional[str]:
    """The validation error of the migrated configuration, or None."""
    try:
        migrate_to_toml(old)
    except ConfigError as e:
        return str(e)
    return None
