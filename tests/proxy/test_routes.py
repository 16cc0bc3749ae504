"""The route table: precedence, port modes, configuration errors, check-config output."""

from __future__ import annotations

import pytest

from dcrouter.config import parse_config
from dcrouter.errors import ConfigError
from dcrouter.proxy.routes import RouteTable, describe_routes, domain_rank
from tests.support.configs import write_config
from tests.support.proc import run_cli


def table(*routes: dict, **proxy: object) -> RouteTable:
    options = parse_config({"proxy": {"routes": list(routes), **proxy}})
    assert options.proxy is not None
    return RouteTable(options.proxy)


def test_domain_ranks() -> None:
    assert domain_rank("a.test", "a.test") == 0
    assert domain_rank("*.a.test", "x.y.a.test") == 1
    assert domain_rank("*.a.test", "a.test") is None
    assert domain_rank("*.a.test", "xa.test") is None
    assert domain_rank("*", None) == 2
    assert domain_rank("a.test", None) is None


def test_precedence_exact_then_wildcard_then_star_then_order() -> None:
    t = table(
        {"name": "star", "ports": [443], "domains": ["*"], "tls": "passthrough", "targets": ["h:1"]},
        {"name": "wild", "ports": [443], "domains": ["*.example.test"], "tls": "passthrough",
         "targets": ["h:2"]},
        {"name": "wild2", "ports": [443], "domains": ["*.example.test"], "tls": "passthrough",
         "targets": ["h:3"]},
        {"name": "exact", "ports": ["443-444"], "domains": ["API.example.test"], "tls": "terminate",
         "targets": ["h:4"]},
        {"name": "lan", "ports": [443], "domains": ["lan.example.test"], "tls": "passthrough",
         "client_ips": ["10.0.0.0/8"], "targets": ["h:5"]},
    )
    assert t.match(443, "api.example.test", "1.2.3.4").key == "exact"
    assert t.match(444, "api.example.test.", "1.2.3.4").key == "exact"
    assert t.match(443, "www.example.test", "1.2.3.4").key == "wild"
    assert t.match(443, "other.test", "1.2.3.4").key == "star"
    assert t.match(443, None, "1.2.3.4").key == "star"
    assert t.match(443, "lan.example.test", "10.1.1.1").key == "lan"
    assert t.match(443, "lan.example.test", "::ffff:10.1.1.1").key == "lan"
    assert t.match(443, "lan.example.test", "11.1.1.1").key == "wild"
    assert t.match(444, "www.example.test", "1.2.3.4") is None
    assert t.mode(443) == "tls"


def test_http_path_prefix_and_modes() -> None:
    t = table(
        {"name": "api", "ports": [80], "domains": ["w.test"], "path_prefix": "/api", "targets": ["h:1"]},
        {"name": "w", "ports": [80], "domains": ["w.test"], "targets": ["h:2"]},
        {"name": "raw", "ports": [25000], "targets": ["h:3"]},
    )
    assert t.mode(80) == "http" and t.mode(25000) == "tcp"
    assert t.match(80, "w.test", "1.1.1.1", "/api/x").key == "api"
    assert t.match(80, "w.test", "1.1.1.1", "/other").key == "w"


def test_mixed_tls_and_plain_on_one_port_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as e:
        table({"ports": [443], "tls": "passthrough", "targets": ["h:1"]},
              {"ports": [443], "domains": ["a.test"], "targets": ["h:2"]})
    assert "mixes TLS and plain" in str(e.value) and e.value.path == "proxy.routes[1].ports"


def test_port_shared_with_email_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"email": {"ports": [2525], "hostname": "mx.test"},
                      "proxy": {"routes": [{"ports": ["2500-2600"], "targets": ["h:1"]}]}})
    assert "2525" in str(e.value)


def test_describe_routes_lists_the_resolved_table(tmp_path) -> None:
    data = {"proxy": {"routes": [
        {"name": "star", "ports": [8443], "domains": ["*"], "tls": "passthrough",
         "targets": ["127.0.0.1:1", "127.0.0.1:2"]},
        {"name": "exact", "ports": [8443], "domains": ["a.test", "*.a.test"], "tls": "terminate",
         "targets": ["127.0.0.1:3"], "send_proxy_protocol": "v2"},
        {"name": "http", "ports": [8080], "domains": ["w.test"], "redirect_to_https": True},
    ]}}
    options = parse_config(data)
    lines = describe_routes(options.proxy)
    assert lines[0] == "  port 8080/tcp (http):"
    assert "w.test [exact] -> route http: http, redirect to https -> 301 https://" in lines[1]
    assert lines[2] == "  port 8443/tcp (tls):"
    assert lines[3].strip().startswith("1. a.test [exact] -> route exact: terminate, http, PROXY v2")
    assert lines[4].strip().startswith("2. *.a.test [wildcard] -> route exact")
    assert lines[5].strip() == ("3. * [any] -> route star: passthrough -> 127.0.0.1:1, "
                                "127.0.0.1:2 [round-robin]")
    path = write_config(str(tmp_path / "c.toml"), data)
    result = run_cli("check-config", path)
    assert result.returncode == 0, result.stderr
    assert "1. a.test [exact] -> route exact" in result.stdout
