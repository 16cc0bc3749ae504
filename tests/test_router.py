"""DcRouter in the test's reactor: the tree, the seed API, reload and stats."""

from __future__ import annotations

import dataclasses

import pytest
import pytest_twisted
from twisted.internet import defer

from dcrouter.config import parse_config
from dcrouter.config.base import build
from dcrouter.config.email import DomainRuleOptions
from dcrouter.config.toml_writer import dumps
from dcrouter.errors import ConfigError
from tests.support.net import free_port, free_tcp_udp_port
from tests.support.router import options_from, port_of, start_router, stop_router


def _api_only(state_dir: str, port: int) -> dict:
    return {"router": {"state_dir": state_dir}, "api": {"listen": "127.0.0.1", "port": port}}


def test_absent_sections_start_nothing(tmp_path):
    router = start_router(options_from({}, str(tmp_path / "s")))
    try:
        assert router.by_name == {}
        assert (tmp_path / "s").stat().st_mode & 0o777 == 0o700
        stats = router.get_stats()
        assert stats["version"] and stats["uptime"] >= 0
    finally:
        router.stopService()


@pytest_twisted.inlineCallbacks
def test_reload_adds_and_removes_services(tmp_path):
    config = tmp_path / "dcrouter.toml"
    state = str(tmp_path / "state")
    config.write_text(dumps({"router": {"state_dir": state}}))
    router = start_router(parse_config({"router": {"state_dir": state}}),
                          config_path=str(config))
    try:
        assert router.by_name == {}
        port = free_port()
        config.write_text(dumps(_api_only(state, port)))
        applied = yield router.reload()
        assert applied is True and "api" in router.by_name
        assert port_of(router, "api") == port
        config.write_text("[api]\nport = 'x'\n")
        applied = yield router.reload()
        assert applied is False and router.options.api.port == port
        config.write_text(dumps({"router": {"state_dir": state}}))
        applied = yield router.reload()
        assert applied is True and router.by_name == {}
    finally:
        yield stop_router(router)


@pytest_twisted.inlineCallbacks
def test_update_domain_rules_validates_and_applies(tmp_path):
    data = {"email": {"listen": "127.0.0.1", "ports": [free_port()],
                      "queue": {"storage_type": "memory"}}}
    router = start_router(options_from(data, str(tmp_path / "s")))
    try:
        rule = build(DomainRuleOptions, {"pattern": "*@a.test", "mode": "mta"}, "rule")
        yield router.update_domain_rules([rule])
        assert router.options.email.domain_rules == (rule,)
        with pytest.raises(ConfigError):
            yield router.update_domain_rules([rule, rule])
        assert router.options.email.domain_rules == (rule,)
        faster = dataclasses.replace(router.options.email, max_recipients=5)
        yield router.update_email_config(faster)
        assert router.options.email.max_recipients == 5
    finally:
        yield stop_router(router)


@pytest_twisted.inlineCallbacks
def test_bound_addresses_report_real_ports(tmp_path):
    data = {"api": {"listen": "127.0.0.1", "port": 0},
            "dns": {"listen": "127.0.0.1", "port": 0}}
    router = start_router(options_from(data, str(tmp_path / "s")))
    try:
        addresses = router.bound_addresses()
        assert addresses["api"][0][2] > 0
        assert {a[0] for a in addresses["dns"]} == {"udp", "tcp"}
    finally:
        yield stop_router(router)


@pytest_twisted.inlineCallbacks
def test_reload_with_unknown_transformation_keeps_running_config(tmp_path):
    state = str(tmp_path / "state")
    port = free_port()

    def config(transform_type: str) -> dict:
        return {"router": {"state_dir": state},
                "email": {"listen": "127.0.0.1", "ports": [port],
                          "queue": {"storage_type": "memory"},
                          "domain_rules": [{"pattern": "*@p.test", "mode": "process",
                                            "target": {"server": "127.0.0.1", "port": 2},
                                            "transformations": [{"type": transform_type,
                                                                 "header": "X-A",
                                                                 "value": "1"}]}]}}

    path = tmp_path / "dcrouter.toml"
    path.write_text(dumps(config("add_header")))
    router = start_router(parse_config(config("add_header")), config_path=str(path))
    try:
        path.write_text(dumps(config("no_such_transformation")))
        applied = yield router.reload()
        assert applied is False
        rule = router.options.email.domain_rules[0]
        assert rule.transformations[0].type == "add_header"
        assert router.by_name["email"].domain_router.get_rules()[0].transformations[0].type == \
            "add_header"
    finally:
        yield stop_router(router)


@pytest_twisted.inlineCallbacks
def test_reload_is_all_or_nothing_across_services(tmp_path):
    """A bad API certificate or a bad zone refuses the whole reload: DNS (applied before the
    API) keeps its running zones too."""
    state = str(tmp_path / "state")
    api_port, dns_port = free_port(), free_tcp_udp_port()

    def config(**api_extra: str) -> dict:
        return {"router": {"state_dir": state},
                "api": {"listen": "127.0.0.1", "port": api_port, **api_extra},
                "dns": {"listen": "127.0.0.1", "port": dns_port,
                        "zones": [{"origin": "first.test"}]}}

    path = tmp_path / "dcrouter.toml"
    path.write_text(dumps(config()))
    router = start_router(parse_config(config()), config_path=str(path))
    try:
        changed = config(tls_cert=str(tmp_path / "missing.crt"),
                         tls_key=str(tmp_path / "missing.key"))
        changed["dns"]["zones"] = [{"origin": "second.test"}]
        path.write_text(dumps(changed))
        assert (yield router.reload()) is False
        assert [z["origin"] for z in router.by_name["dns"].zones()] == ["first.test."]
        assert router.options.dns.zones[0].origin == "first.test"
        # the same change without the broken certificate applies
        del changed["api"]["tls_cert"], changed["api"]["tls_key"]
        path.write_text(dumps(changed))
        assert (yield router.reload()) is True
        assert [z["origin"] for z in router.by_name["dns"].zones()] == ["second.test."]
    finally:
        yield stop_router(router)
