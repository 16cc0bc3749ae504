"""Configuration loading: defaults, the contract file, and every class of error."""

from __future__ import annotations

import os

import pytest

from dcrouter.config import load_config, parse_config, parse_config_text
from dcrouter.errors import ConfigError
from tests.support.proc import REPO

CONTRACT = os.path.join(os.path.dirname(REPO), "shared", "contract", "dcrouter.toml")


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config_text(text)
    return str(info.value)


def test_embedded_default_loads():
    options = load_config(os.path.join(REPO, "etc", "dcrouter.toml"))
    assert options.email.ports == (2525, 2587, 2465)
    assert options.email.effective_submission_ports == (2587,)
    assert options.email.queue.storage_type == "disk"
    assert options.dns.port == 5353
    assert options.api.listen == "127.0.0.1"


@pytest.mark.skipif(not os.path.exists(CONTRACT), reason="contract not beside the checkout")
def test_contract_file_loads_with_every_key():
    options = load_config(CONTRACT)
    rules = options.email.domain_rules
    assert [r.mode for r in rules] == ["mta", "forward", "process"]
    assert rules[1].target.port == 2626
    assert rules[2].transformations[0].params["header"] == "X-Gateway"
    assert rules[2].rate_limits.max_messages_per_minute == 600
    assert options.proxy.routes[0].tls == "passthrough"
    assert options.proxy.acme.renew_threshold_days == 30
    assert options.dns.zones[0].records[1].name == "mail"


def test_absent_sections_do_not_run():
    options = parse_config({})
    assert options.email is None and options.proxy is None
    assert options.dns is None and options.api is None
    assert options.router.state_dir == "var"


def test_defaults_for_optional_keys():
    options = parse_config({"email": {"ports": [25, 587, 465]}})
    assert options.email.max_message_size == 52428800
    assert options.email.effective_submission_ports == (587,)
    assert options.email.effective_implicit_tls_ports == (465,)
    assert options.email.tls.min_version == "TLSv1.2"
    assert options.email.queue.max_retries == 5


def test_port_out_of_range_names_the_key_path():
    text = """
[email]
ports = [2525]
[[email.domain_rules]]
pattern = "*@a.test"
mode = "mta"
[[email.domain_rules]]
pattern = "*@b.test"
mode = "mta"
[[email.domain_rules]]
pattern = "*@c.test"
mode = "forward"
target = { server = "127.0.0.1", port = 70000 }
"""
    assert error_of(text) == "email.domain_rules[2].target.port: must be 1..65535, got 70000"


def test_wrong_type():
    assert error_of('[email]\nmax_connections = "many"\n') == \
        "email.max_connections: must be an integer, got 'many'"
    assert error_of('[email]\nports = 25\n') == "email.ports: must be an array, got 25"
    assert error_of('[api]\nport = true\n') == "api.port: must be an integer, got true"


def test_malformed_glob_pattern():
    msg = error_of('[email]\n[[email.domain_rules]]\npattern = "*@@x"\nmode = "mta"\n')
    assert msg.startswith("email.domain_rules[0].pattern: malformed pattern")
    msg = error_of('[email]\n[[email.domain_rules]]\npattern = "*@a..b"\nmode = "mta"\n')
    assert "bad domain" in msg


def test_unknown_mode_suggests():
    msg = error_of('[email]\n[[email.domain_rules]]\npattern = "*@a.test"\nmode = "forwrd"\n')
    assert msg.startswith("email.domain_rules[0].mode: must be one of")
    assert "did you mean 'forward'" in msg


def test_unknown_key_did_you_mean():
    assert error_of('[email]\nmax_mesage_size = 10\n') == \
        "email.max_mesage_size: unknown key (did you mean 'max_message_size'?)"
    assert error_of('[emial]\n') == "emial: unknown key (did you mean 'email'?)"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "nope.toml"))
    assert "configuration file not found" in str(info.value)


def test_toml_syntax_error():
    msg = error_of("[email\nports = [1]\n")
    assert msg.startswith("<string>: invalid TOML")


def test_required_keys():
    assert error_of('[email]\n[[email.domain_rules]]\nmode = "mta"\n') == \
        "email.domain_rules[0].pattern: required key is missing"


def test_forward_rule_needs_target():
    msg = error_of('[email]\n[[email.domain_rules]]\npattern = "*@a.test"\nmode = "forward"\n')
    assert msg.startswith("email.domain_rules[0].target:")


def test_submission_port_must_be_listed():
    msg = error_of('[email]\nports = [2525]\nsubmission_ports = [2587]\n')
    assert msg == "email.submission_ports[0]: port 2587 is not one of email.ports"


def test_port_conflict_between_services():
    msg = error_of('[email]\nports = [2525]\n[api]\nport = 2525\n')
    assert msg == "api.port: port 2525 is already used by email.ports[0]"
    msg = error_of('[email]\nports = [8443]\n[proxy]\n[[proxy.routes]]\nports = ["8440-8450"]\n'
                   'targets = ["127.0.0.1:1"]\n')
    assert msg == "proxy.routes[0].ports: port 8443 is already used by email.ports[0]"


def test_api_non_loopback_needs_token():
    assert error_of('[api]\nlisten = "0.0.0.0"\n') == \
        "api.token: required when api.listen (0.0.0.0) is not a loopback address"
    assert parse_config({"api": {"listen": "0.0.0.0", "token": "s3cret"}}).api.token == "s3cret"


def test_bad_networks_and_targets():
    msg = error_of('[email]\nrelay_networks = ["10.0.0.0/33"]\n')
    assert msg.startswith("email.relay_networks[0]: must be an IP network")
    msg = error_of('[proxy]\n[[proxy.routes]]\nports = [1]\ntargets = ["nohost"]\n')
    assert msg == "proxy.routes[0].targets[0]: must be host:port, got 'nohost'"


def test_options_are_frozen():
    options = parse_config({"email": {}})
    with pytest.raises(Exception):
        options.email.hostname = "x"  # type: ignore[misc]


def test_transformation_params_are_collected():
    options = parse_config({"email": {"domain_rules": [{
        "pattern": "*@a.test", "mode": "process",
        "transformations": [{"type": "add_header", "header": "X-A", "value": "1"}]}]}})
    t = options.email.domain_rules[0].transformations[0]
    assert t.type == "add_header" and dict(t.params) == {"header": "X-A", "value": "1"}


def test_log_levels_table():
    options = parse_config({"router": {"log_levels": {"email.delivery": "debug"}}})
    assert dict(options.router.log_levels) == {"email.delivery": "debug"}
    assert error_of('[router]\nlog_levels = { "email.delivry" = "debug" }\n') == \
        "router.log_levels.email.delivry: unknown subsystem (did you mean 'email.delivery'?)"
    assert error_of('[router]\nlog_levels = { "dns" = "loud" }\n').startswith(
        "router.log_levels.dns: must be one of")


def test_non_ascii_digits_in_a_port_are_a_config_error():
    """'¹' passes str.isdigit() but not int(): a clear error, never a traceback."""
    assert error_of('[email.delivery]\nnameservers = ["127.0.0.1:\u00b9"]\n') == \
        "email.delivery.nameservers[0]: port must be 1..65535, got '\u00b9'"
