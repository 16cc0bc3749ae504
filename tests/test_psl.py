"""The Public Suffix List look-up, on Debian's list file and on small lists with each rule kind."""

from __future__ import annotations

import os
from typing import Any

import pytest

from dcrouter.psl import (DEFAULT_PATH, PublicSuffixList, default_list, load_or_fallback,
                          suffix_list)


@pytest.fixture(scope="module")
def debian() -> PublicSuffixList:
    assert os.path.exists(DEFAULT_PATH), "make test installs Debian's publicsuffix package"
    return PublicSuffixList.load(DEFAULT_PATH)


@pytest.mark.parametrize("name, org", [
    ("mail.example.com", "example.com"),
    ("a.b.example.co.uk", "example.co.uk"),
    ("example.co.uk", "example.co.uk"),
    ("co.uk", "co.uk"),                       # a suffix is its own organisation
    ("foo.github.io", "foo.github.io"),        # private section: each user a domain
    ("x.foo.github.io", "foo.github.io"),
    ("www.example.org.es", "example.org.es"),
    ("a.b.c.kobe.jp", "b.c.kobe.jp"),          # wildcard *.kobe.jp
    ("a.city.kobe.jp", "city.kobe.jp"),        # exception !city.kobe.jp
    ("www.ck", "www.ck"),                      # exception !www.ck
    ("a.b.ck", "a.b.ck"),                      # wildcard *.ck
    ("Mail.Example.COM.", "example.com"),      # case and the root dot
    ("host.unlisted-tld", "host.unlisted-tld"),  # no rule: the default rule '*'
    ("xn--80ak6aa92e.com", "xn--80ak6aa92e.com"),
])
def test_debian_list(debian: PublicSuffixList, name: str, org: str) -> None:
    assert debian.organisational_domain(name) == org


def test_unicode_rules_match_their_idna_form(debian: PublicSuffixList) -> None:
    # the list writes some suffixes in Unicode (e.g. the IDN TLD of Russia, рф)
    assert debian.public_suffix("example.xn--p1ai") == "xn--p1ai"
    assert debian.organisational_domain("www.example.xn--p1ai") == "example.xn--p1ai"


def test_rule_kinds_on_a_small_list() -> None:
    psl = PublicSuffixList(["// comment", "", "uk", "co.uk", "*.wild.test", "!ex.wild.test",
                            "bad..rule"])
    assert psl.public_suffix("a.example.co.uk") == "co.uk"
    assert psl.public_suffix("a.b.wild.test") == "b.wild.test"
    assert psl.organisational_domain("a.b.wild.test") == "a.b.wild.test"
    assert psl.public_suffix("a.ex.wild.test") == "wild.test"
    assert psl.organisational_domain("a.ex.wild.test") == "ex.wild.test"
    assert len(psl) == 4


def test_fallback_when_the_file_is_missing_or_empty(tmp_path: Any) -> None:
    missing = load_or_fallback(str(tmp_path / "nothing.dat"))
    assert missing.source == "built-in"
    assert missing.organisational_domain("mail.example.com.au") == "example.com.au"
    empty = tmp_path / "empty.dat"
    empty.write_text("// only comments\n", encoding="utf-8")
    assert load_or_fallback(str(empty)).source == "built-in"


def test_cached_until_the_file_changes(tmp_path: Any) -> None:
    path = tmp_path / "list.dat"
    path.write_text("one.test\n", encoding="utf-8")
    first = suffix_list(str(path))
    assert suffix_list(str(path)) is first
    path.write_text("one.test\ntwo.test\n", encoding="utf-8")
    os.utime(path, (1, 1))
    second = suffix_list(str(path))
    assert second is not first and second.public_suffix("a.two.test") == "two.test"


def test_default_list_is_debians(debian: PublicSuffixList) -> None:
    assert default_list().source == DEFAULT_PATH
    assert len(default_list()) == len(debian)
