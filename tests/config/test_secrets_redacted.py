"""Secret options: redacted by unbuild(redact=True), restored from the placeholder, never echoed."""

from __future__ import annotations

import pytest

from dcrouter.config.base import REDACTED, build, restore_redacted, unbuild
from dcrouter.config.email import DomainRuleOptions
from dcrouter.errors import ConfigError

RULE = {"pattern": "*@fwd.test", "mode": "forward",
        "target": {"server": "10.0.0.1", "authentication": {"user": "u", "pass": "hunter2"}}}


def test_redacted_and_restored():
    rule = build(DomainRuleOptions, RULE, "rule")
    shown = unbuild(rule, redact=True)
    assert shown["target"]["authentication"] == {"user": "u", "pass": REDACTED}
    assert unbuild(rule)["target"]["authentication"]["pass"] == "hunter2"
    back = restore_redacted(shown, unbuild(rule), "rule")
    assert build(DomainRuleOptions, back, "rule") == rule
    with pytest.raises(ConfigError) as e:
        restore_redacted(shown, {}, "rule")
    assert e.value.path == "rule.target.authentication.pass"


def test_a_bad_secret_is_not_echoed_in_the_error():
    bad = {**RULE, "target": {"server": "10.0.0.1",
                              "authentication": {"user": "u", "pass": 987654321}}}
    with pytest.raises(ConfigError) as e:
        build(DomainRuleOptions, bad, "rule")
    assert e.value.path == "rule.target.authentication.pass"
    assert "987654321" not in str(e.value) and "not shown" in str(e.value)
