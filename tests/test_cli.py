"""``python -m dcrouter check-config`` and ``migrate-config`` as real subprocesses."""

from __future__ import annotations

import json
import os
import tomllib

from dcrouter.config import parse_config
from tests.support.proc import REPO, run_cli


def test_check_config_summarises_what_would_run():
    result = run_cli("check-config", os.path.join(REPO, "etc", "dcrouter.toml"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "services: email, proxy, dns, api" in out
    assert "port 2465/tcp (implicit TLS)" in out
    assert "port 2587/tcp (STARTTLS, AUTH required)" in out
    assert "*@localhost" in out
    assert "processes: one" in out and "api: http://127.0.0.1:8088/" in out


def test_check_config_shows_workers_https_and_acme(tmp_path):
    config = tmp_path / "dcrouter.toml"
    config.write_text('[router]\nworkers = 3\n[api]\nlisten = "127.0.0.1"\ntls = true\n'
                      '[proxy]\n[proxy.acme]\nenabled = true\nchallenge = "dns-01"\n')
    result = run_cli("check-config", str(config))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "processes: a master and 3 workers sharing every port (bound once by the master); " \
        "the API in worker 0" in out
    assert "api: https://127.0.0.1:" in out
    assert "(dns-01; wildcards by dns-01)" in out


def test_check_config_error_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[email]\nports = [0, 99999]\n')
    result = run_cli("check-config", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip() == \
        "dcrouter: configuration error: email.ports[1]: must be 1..65535, got 99999"
    assert result.stdout == ""


SEED = {
    "emailConfig": {
        "ports": [25, 587, 465],
        "hostname": "mail.example.com",
        "maxMessageSize": 10485760,
        "tls": {"certPath": "/etc/cert.pem", "keyPath": "/etc/key.pem"},
        "auth": {"required": False, "methods": ["PLAIN", "LOGIN", "OAUTH2"],
                 "users": [{"username": "u", "password": "p"}]},
        "defaultMode": "forward", "defaultServer": "fallback.example.com", "defaultPort": 25,
        "domainRules": [
            {"pattern": "*@task.vc", "mode": "forward",
             "target": {"server": "10.0.0.5", "port": 2525, "useTls": True,
                        "authentication": {"user": "a", "pass": "b"}}},
            {"pattern": "*@lossless.digital", "mode": "mta",
             "mtaOptions": {"allowLocalDelivery": True, "localDeliveryPath": "/var/mail",
                            "dkimSign": True,
                            "dkimOptions": {"domainName": "lossless.digital",
                                            "keySelector": "mail",
                                            "privateKey": "/etc/dkim.key"}}},
            {"pattern": "*@*.example.net", "mode": "process", "contentScanning": True,
             "scanners": [{"type": "spam", "threshold": 5, "action": "tag"},
                          {"type": "attachment", "blockedExtensions": [".exe"],
                           "action": "reject"}],
             "transformations": [{"type": "addHeader", "header": "X-Gateway",
                                  "value": "dcrouter"}],
             "rateLimits": {"maxMessagesPerMinute": 100, "maxRecipientsPerMessage": 50}},
        ],
        "queue": {"storageType": "disk", "persistentPath": "/var/q", "maxRetries": 3,
                  "baseRetryDelay": 60000, "maxRetryDelay": 3600000},
        "mtaGlobalOptions": {"smtpBanner": "hi", "spoolDir": "/var/spool"},
    },
    "smartProxyConfig": {
        "fromPort": 443, "toPort": 8080, "targetIP": "10.0.0.10", "sniEnabled": True,
        "acme": {"port": 80, "enabled": True, "autoRenew": True, "useProduction": True,
                 "renewThresholdDays": 30, "accountEmail": "admin@example.com"},
        "globalPortRanges": [{"from": 80, "to": 80}, {"from": 443, "to": 443}],
        "domainConfigs": [{
            "domains": ["example.com", "www.example.com"],
            "allowedIPs": ["0.0.0.0/0"], "blockedIPs": ["1.2.3.4/32"],
            "targetIPs": ["10.0.0.10", "10.0.0.11"],
            "portRanges": [{"from": 80, "to": 80}, {"from": 443, "to": 443}],
            "connectionTimeout": 60000, "useNetworkProxy": True,
        }],
    },
    "dnsServerConfig": {"udpPort": 5353},
    "somethingElse": True,
}


def _migrate(tmp_path, data):
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    return run_cli("migrate-config", str(path))


def test_migrate_consolidated_config(tmp_path):
    result = _migrate(tmp_path, SEED)
    assert result.returncode == 0, result.stderr
    new = tomllib.loads(result.stdout)
    options = parse_config(new)
    email = options.email
    assert email.hostname == "mail.example.com"
    assert email.effective_submission_ports == (587,)
    assert email.auth.methods == ("PLAIN", "LOGIN", "XOAUTH2")
    assert email.default_mode == "forward" and email.default_server == "fallback.example.com"
    forward, mta, process = email.domain_rules
    assert forward.target.server == "10.0.0.5" and forward.target.use_tls
    assert forward.target.authentication.password == "b"
    assert mta.mta_options.dkim_options.private_key_path == "/etc/dkim.key"
    assert mta.mta_options.dkim_options.key_selector == "mail"
    assert process.scanners[1].blocked_extensions == (".exe",)
    assert process.transformations[0].type == "add_header"
    assert email.queue.base_retry_delay == 60 and email.queue.max_retry_delay == 3600
    assert email.banner == "hi"
    routes = options.proxy.routes
    assert {r.tls for r in routes} == {"passthrough", ""}
    tls_route = next(r for r in routes if r.tls == "passthrough")
    assert tls_route.ports == (443,) and tls_route.targets == ("10.0.0.10:8080", "10.0.0.11:8080")
    assert tls_route.blocked_ips == ("1.2.3.4/32",) and tls_route.connection_timeout == 60
    assert options.proxy.acme.enabled and options.proxy.acme.account_email == "admin@example.com"
    assert options.dns.port == 5353
    notes = result.stderr
    assert "somethingElse" in notes
    assert "emailConfig.mtaGlobalOptions.spoolDir" in notes
    assert "milliseconds converted" in notes


def test_migrate_legacy_smtp_config(tmp_path):
    legacy = {"smtpConfig": {
        "ports": [25, 587, 465], "hostname": "mail.example.com",
        "maxMessageSize": 52428800,
        "tls": {"certPath": "/c.pem", "keyPath": "/k.pem"},
        "domainConfigs": [{
            "domains": ["example.com", "*.example.com"],
            "targetIPs": ["mail1.example.com", "mail2.example.com"],
            "port": 25, "useTls": True,
            "addHeaders": True,
            "headerInfo": [{"name": "X-Processed-By", "value": "gateway"}],
            "signDkim": True,
            "dkimOptions": {"domainName": "example.com", "keySelector": "mail",
                            "privateKey": "/dkim.key"},
            "rateLimits": {"maxMessagesPerMinute": 100, "maxRecipientsPerMessage": 50},
        }],
        "defaultServer": "fallback-mail.example.com", "defaultPort": 25, "useTls": True,
        "queueStorage": "disk", "persistentPath": "/var/mail/queue", "maxRetries": 5,
        "contentScanning": True,
        "scanners": [{"type": "virus", "action": "reject"}],
        "transformations": [{"type": "addHeader", "header": "X-Gateway", "value": "DcRouter"},
                            {"type": "dkimSign", "domains": ["example.com"]}],
    }}
    result = _migrate(tmp_path, legacy)
    assert result.returncode == 0, result.stderr
    options = parse_config(tomllib.loads(result.stdout))
    email = options.email
    patterns = [r.pattern for r in email.domain_rules]
    assert patterns == ["*@example.com", "*@*.example.com"]
    rule = email.domain_rules[0]
    assert rule.mode == "process" and rule.target.server == "mail1.example.com"
    assert [t.type for t in rule.transformations] == ["add_header", "dkim_sign", "add_header"]
    assert rule.scanners[0].type == "virus"
    assert email.default_server == "fallback-mail.example.com" and email.default_tls
    assert email.queue.persistent_path == "/var/mail/queue"
    assert "only the first target (mail1.example.com)" in result.stderr


def test_migrate_bad_json_is_one_line(tmp_path):
    path = tmp_path / "old.json"
    path.write_text("{nope")
    result = run_cli("migrate-config", str(path))
    assert result.returncode == 2
    assert "invalid JSON" in result.stderr and "Traceback" not in result.stderr


def test_migrate_invalid_result_is_reported(tmp_path):
    result = _migrate(tmp_path, {"emailConfig": {"ports": [25], "domainRules": [
        {"pattern": "*@x.test", "mode": "teleport"}]}})
    assert result.returncode == 2
    assert "email.domain_rules[0].mode: must be one of" in result.stderr


def test_hash_password_produces_a_hash_the_server_accepts():
    import subprocess
    import sys
    from dcrouter.email.auth import verify_password
    from tests.support.proc import twistd_env
    result = subprocess.run([sys.executable, "-m", "dcrouter", "hash-password"], input="s3cret\n",
                            capture_output=True, text=True, env=twistd_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr
    stored = result.stdout.strip()
    assert stored.startswith("{SCRYPT}")
    assert verify_password(stored, "s3cret") and not verify_password(stored, "S3cret")
