"""DomainRouter: a table of address/rule cases, precedence, cache invalidation, rule API."""

from __future__ import annotations

import pytest

from dcrouter.config import parse_config
from dcrouter.config.email import DomainRuleOptions, TargetOptions
from dcrouter.email.routing import DomainRouter, describe_rules
from dcrouter.errors import ConfigError


def rule(pattern: str, mode: str = "mta") -> DomainRuleOptions:
    if mode == "forward":
        return DomainRuleOptions(pattern=pattern, mode=mode,
                                 target=TargetOptions(server="127.0.0.1", port=2626))
    return DomainRuleOptions(pattern=pattern, mode=mode)


# Config order matters for ties: the table below relies on it.
PATTERNS = [
    "*@*",                        # 0  catch-all
    "*@*.example.com",            # 1  subdomains
    "*@example.com",              # 2  the domain
    "alice@example.com",          # 3  exact
    "bob@*.example.com",          # 4  user at any subdomain
    "*@*.mail.example.com",       # 5  deeper suffix (more literal text)
    "a?c@example.org",            # 6  one-character wildcard
    "*@example.org",              # 7
    "info@*",                     # 8  a user at any domain
    "*@sub?.example.net",         # 9  ? in a domain label
    "*@*.example.net",            # 10
    "x*@tie.test",                # 11 tie: same class and literal length as 12
    "*y@tie.test",                # 12
    "Case@sensitive.test",        # 13
    "*@*example.io",              # 14 wildcard inside the first label
    "post.*@dots.test",           # 15 dots in local part
    "*@dots.test",                # 16
]

# (address, expected pattern or None)
CASES = [
    ("alice@example.com", "alice@example.com"),
    ("ALICE@EXAMPLE.COM", "alice@example.com"),        # case-insensitive by default
    ("<alice@example.com>", "alice@example.com"),      # angle brackets stripped
    ("alice@example.com.", "alice@example.com"),       # trailing root dot
    ("carol@example.com", "*@example.com"),
    ("Carol@Example.Com", "*@example.com"),
    ("carol@a.example.com", "*@*.example.com"),
    ("carol@a.b.example.com", "*@*.example.com"),      # * spans labels
    ("carol@x.mail.example.com", "*@*.mail.example.com"),
    ("carol@mail.example.com", "*@*.example.com"),     # *.mail needs a label before mail
    ("bob@a.example.com", "bob@*.example.com"),        # literal local beats *@*.example.com
    ("bob@x.mail.example.com", "*@*.mail.example.com"),  # 17 literal chars beat 15
    ("bob@example.com", "*@example.com"),              # literal domain beats everything wild
    ("alice@a.example.com", "*@*.example.com"),
    ("someone@elsewhere.test", "*@*"),
    ("info@elsewhere.test", "info@*"),                 # more literal text than *@*
    ("info@example.com", "*@example.com"),             # literal domain class beats info@*
    ("info@a.example.com", "*@*.example.com"),         # suffix class beats any-domain class
    ("abc@example.org", "a?c@example.org"),
    ("axc@example.org", "a?c@example.org"),
    ("ac@example.org", "*@example.org"),               # ? needs exactly one character
    ("abbc@example.org", "*@example.org"),
    ("someone@example.org", "*@example.org"),
    ("u@sub1.example.net", "*@sub?.example.net"),      # more literal than *.example.net
    ("u@sub12.example.net", "*@*.example.net"),
    ("u@sub.example.net", "*@*.example.net"),
    ("u@example.net", "*@*"),                          # subdomain rule excludes the apex
    ("xy@tie.test", "x*@tie.test"),                    # full tie: first listed wins
    ("xzy@tie.test", "x*@tie.test"),
    ("ay@tie.test", "*y@tie.test"),
    ("xa@tie.test", "x*@tie.test"),
    ("zz@tie.test", "*@*"),
    ("case@sensitive.test", "Case@sensitive.test"),    # insensitive by default
    ("u@myexample.io", "*@*example.io"),
    ("u@a.example.io", "*@*example.io"),
    ("u@example.io", "*@*example.io"),                 # * may match nothing
    ("post.master@dots.test", "post.*@dots.test"),
    ("postmaster@dots.test", "*@dots.test"),
    ("u@DOTS.TEST", "*@dots.test"),
    ("nodomain", None),                                # no @: nothing matches
    ("", None),
    ("u@", None),
    ("a@b@example.com", "*@example.com"),              # the last @ separates the domain
]


@pytest.fixture(scope="module")
def router() -> DomainRouter:
    return DomainRouter([rule(p) for p in PATTERNS])


@pytest.mark.parametrize("address,expected", CASES)
def test_table(router: DomainRouter, address: str, expected: str) -> None:
    found = router.match_rule(address)
    assert (found.pattern if found else None) == expected
    # the cached answer is the same
    again = router.match_rule(address)
    assert (again.pattern if again else None) == expected


def test_table_size() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("address,expected", CASES)
def test_table_without_cache(address: str, expected: str) -> None:
    r = DomainRouter([rule(p) for p in PATTERNS], cache_size=0)
    found = r.match_rule(address)
    assert (found.pattern if found else None) == expected
    assert r.get_stats()["cache_entries"] == 0


def test_index_agrees_with_brute_force(router: DomainRouter) -> None:
    """Every rule matching an address according to its own pattern is considered."""
    for address, _ in CASES:
        brute = [p for p in PATTERNS if router.matches_pattern(address, p)]
        assert sorted(r.pattern for r in router.get_all_matching_rules(address)) == sorted(brute)


def test_all_matching_rules_best_first(router: DomainRouter) -> None:
    patterns = [r.pattern for r in router.get_all_matching_rules("bob@x.mail.example.com")]
    assert patterns == ["*@*.mail.example.com", "bob@*.example.com", "*@*.example.com", "*@*"]


def test_first_match_order() -> None:
    r = DomainRouter([rule(p) for p in PATTERNS], priority_order="first-match")
    assert r.match_rule("alice@example.com").pattern == "*@*"
    r = DomainRouter([rule(p) for p in reversed(PATTERNS)], priority_order="first-match")
    assert r.match_rule("alice@example.com").pattern == "alice@example.com"
    assert r.match_rule("carol@example.com").pattern == "*@example.com"
    assert [x.pattern for x in r.get_all_matching_rules("alice@example.com")] == [
        "alice@example.com", "*@example.com", "*@*"]


def test_case_sensitive_local_parts() -> None:
    r = DomainRouter([rule("Case@sensitive.test"), rule("*@sensitive.test")],
                     case_sensitive=True)
    assert r.match_rule("Case@SENSITIVE.test").pattern == "Case@sensitive.test"
    assert r.match_rule("case@sensitive.test").pattern == "*@sensitive.test"
    r.update_options(case_sensitive=False)
    assert r.match_rule("case@sensitive.test").pattern == "Case@sensitive.test"


def test_bare_domain_pattern_is_shorthand() -> None:
    r = DomainRouter([rule("example.com")])
    assert r.match_rule("x@example.com") is not None
    assert r.get_rule("*@example.com") is not None
    assert r.get_rule("EXAMPLE.com") is not None


def test_cache_invalidation_is_exact() -> None:
    r = DomainRouter([rule("*@example.com"), rule("*@other.test")])
    assert r.match_rule("a@x.example.com") is None
    r.match_rule("a@example.com")
    r.match_rule("a@other.test")
    assert r.get_stats()["cache_entries"] == 3
    r.add_rule({"pattern": "*@*.example.com", "mode": "mta"})
    # only the address the new pattern matches was dropped
    assert r.get_stats()["cache_entries"] == 2
    assert r.match_rule("a@x.example.com").pattern == "*@*.example.com"
    hits = r.cache_hits
    assert r.match_rule("a@other.test").pattern == "*@other.test"
    assert r.cache_hits == hits + 1
    assert r.remove_rule("*@example.com")
    assert r.match_rule("a@example.com") is None
    assert r.match_rule("a@other.test").pattern == "*@other.test"
    r.clear_cache()
    assert r.get_stats()["cache_entries"] == 0


def test_cache_is_bounded_lru() -> None:
    r = DomainRouter([rule("*@example.com")], cache_size=3)
    for name in ("a", "b", "c"):
        r.match_rule(f"{name}@example.com")
    r.match_rule("a@example.com")  # a is now most recent
    r.match_rule("d@example.com")  # evicts b
    assert r.get_stats()["cache_entries"] == 3
    misses = r.cache_misses
    r.match_rule("a@example.com")
    assert r.cache_misses == misses
    r.match_rule("b@example.com")
    assert r.cache_misses == misses + 1


def test_update_rule_changes_mode_and_pattern() -> None:
    r = DomainRouter([rule("*@example.com"), rule("*@*")])
    assert r.match_rule("a@example.com").mode == "mta"
    assert r.update_rule("*@example.com", {"mode": "process"})
    assert r.match_rule("a@example.com").mode == "process"
    assert r.update_rule("*@example.com", {"pattern": "*@example.org"})
    assert r.match_rule("a@example.com").pattern == "*@*"
    assert r.match_rule("a@example.org").mode == "process"
    assert not r.update_rule("*@nope.test", {"mode": "mta"})
    assert not r.remove_rule("*@nope.test")
    with pytest.raises(ConfigError, match="already has a rule"):
        r.update_rule("*@example.org", {"pattern": "*@*"})


def test_add_rule_validates() -> None:
    r = DomainRouter([rule("*@example.com")])
    with pytest.raises(ConfigError, match=r"email.domain_rules\[1\].pattern"):
        r.add_rule({"pattern": "a@@b", "mode": "mta"})
    with pytest.raises(ConfigError, match=r"email.domain_rules\[1\].target"):
        r.add_rule({"pattern": "*@f.test", "mode": "forward"})
    with pytest.raises(ConfigError, match="already has a rule"):
        r.add_rule(rule("*@EXAMPLE.com"))
    added = r.add_rule(rule("*@f.test", "forward"))
    assert r.get_rules()[-1] is added


@pytest.mark.parametrize("pattern", ["a@@b", "@example.com", "a@", "a@exa..mple.com",
                                     "a@.example.com", "a b@example.com", "a@exa_mple.com"])
def test_malformed_patterns_rejected_at_load(pattern: str) -> None:
    data = {"email": {"domain_rules": [{"pattern": "*@ok.test", "mode": "mta"},
                                       {"pattern": pattern, "mode": "mta"}]}}
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.path == "email.domain_rules[1].pattern"


def test_from_options_and_describe() -> None:
    options = parse_config({"email": {
        "default_mode": "forward", "default_server": "10.0.0.1", "default_port": 2500,
        "domain_rules": [
            {"pattern": "*@*", "mode": "mta"},
            {"pattern": "user@x.test", "mode": "forward",
             "target": {"server": "127.0.0.1", "port": 2626}},
            {"pattern": "*@*.x.test", "mode": "process", "content_scanning": True,
             "scanners": [{"type": "spam"}],
             "transformations": [{"type": "add_header", "header": "X-A", "value": "b"}]},
            {"pattern": "*@local.test", "mode": "mta",
             "mta_options": {"allow_local_delivery": True}},
        ]}})
    assert options.email is not None
    r = DomainRouter.from_options(options.email)
    assert r.default_mode == "forward" and r.default_server == "10.0.0.1"
    assert r.match_rule("user@X.TEST").mode == "forward"
    lines = describe_rules(options.email)
    assert lines[0] == "  1. user@x.test -> forward (127.0.0.1:2626)"
    assert lines[1] == "  2. *@local.test -> mta (local Maildir state_dir/mail)"
    assert lines[2].startswith("  3. *@*.x.test -> process (scan spam; transform add_header")
    assert lines[3] == "  4. *@* -> mta (MX)"
    assert "forward (10.0.0.1:2500)" in lines[4]
    r.update_from_options(parse_config({"email": {}}).email)  # type: ignore[arg-type]
    assert r.get_rules() == [] and r.match_rule("user@x.test") is None


# -- property: the index finds exactly what testing every rule finds -------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dcrouter.email.routing import pattern_rank  # noqa: E402

_LOCALS = st.sampled_from(["*", "a", "b", "a*", "*b", "a?", "?", "ab", "A"])
_LABELS = st.sampled_from(["*", "x", "y", "x*", "?", "mail", "example", "ex?mple"])
_TLDS = st.sampled_from(["test", "com", "*", "t?st"])


@st.composite
def patterns(draw: st.DrawFn) -> str:
    labels = draw(st.lists(_LABELS, min_size=0, max_size=3))
    return f"{draw(_LOCALS)}@{'.'.join(labels + [draw(_TLDS)])}"


@st.composite
def addresses(draw: st.DrawFn) -> str:
    local = draw(st.sampled_from(["a", "b", "ab", "A", "abc", "x"]))
    labels = draw(st.lists(st.sampled_from(["x", "y", "mail", "example", "exomple", "xx"]),
                           min_size=0, max_size=4))
    return f"{local}@{'.'.join(labels + [draw(st.sampled_from(['test', 'com', 'tst']))])}"


def brute_force(rules: list[str], address: str, first_match: bool,
                case_sensitive: bool = False) -> list[str]:
    import fnmatch

    def norm(text: str) -> str:
        local, _, domain = text.rpartition("@")
        return f"{local if case_sensitive else local.lower()}@{domain.lower()}"

    found = [(i, p) for i, p in enumerate(rules) if fnmatch.fnmatchcase(norm(address), norm(p))]
    if first_match:
        return [p for _i, p in found]
    return [p for _i, p in sorted(found, key=lambda ip: pattern_rank(norm(ip[1])) + (ip[0],))]


@settings(max_examples=300, deadline=None)
@given(st.lists(patterns(), min_size=1, max_size=12, unique_by=str.lower),
       st.lists(addresses(), min_size=1, max_size=8), st.booleans(), st.booleans())
def test_index_matches_brute_force(rules: list[str], addrs: list[str], first: bool,
                                   case_sensitive: bool) -> None:
    router = DomainRouter([rule(p) for p in rules], case_sensitive=case_sensitive,
                          priority_order="first-match" if first else "most-specific")
    for address in addrs:
        expected = brute_force(rules, address, first, case_sensitive)
        assert [r.pattern for r in router.get_all_matching_rules(address)] == expected
        found = router.match_rule(address)
        assert (found.pattern if found else None) == (expected[0] if expected else None)


@settings(max_examples=100, deadline=None)
@given(st.lists(patterns(), min_size=2, max_size=10, unique_by=str.lower),
       st.lists(addresses(), min_size=1, max_size=8), st.data())
def test_cache_stays_correct_under_rule_changes(rules: list[str], addrs: list[str],
                                                data: st.DataObject) -> None:
    router = DomainRouter([rule(p) for p in rules[:-1]])
    for address in addrs:
        router.match_rule(address)                     # warm the cache
    router.add_rule(rule(rules[-1]))
    victim = data.draw(st.sampled_from(rules))
    router.remove_rule(victim)
    fresh = DomainRouter(router.get_rules(), cache_size=0)
    for address in addrs:
        assert router.match_rule(address) is fresh.match_rule(address)
