"""Pattern routing of recipient addresses to domain rules.

A rule's ``pattern`` is a glob on the full address (``local@domain``):
``*`` matches any run of characters, ``?`` exactly one.  Domains compare
case-insensitively; local parts case-insensitively too unless
``email.case_sensitive = true``.

Precedence with ``priority_order = "most-specific"`` (the default): every
matching rule is ranked by a class, then by the number of literal
(non-wildcard) characters, then by its position in the configuration:

==========================  ==============================  =====
pattern                     class                           rank
==========================  ==============================  =====
``alice@example.com``       exact address                   0
``a?ice@example.com``       literal domain, wildcard local  1
``*@example.com``           literal domain, wildcard local  1
``alice@*.example.com``     wildcard domain, literal suffix 2
``*@*.example.com``         wildcard domain, literal suffix 2
``*@*``, ``alice@*``        no literal domain label         3
==========================  ==============================  =====

So ``alice@example.com`` beats ``*@example.com`` beats ``*@*.example.com``
beats ``*@*``; between two rules of one class the one with more literal
text wins (``alice@*.example.com`` over ``*@*.example.com``,
``*@*.mail.example.com`` over ``*@*.example.com``); a full tie goes to the
rule listed first.  With ``"first-match"`` the rule listed first wins.

Lookups do not scan every rule: rules with a literal domain sit in a dict
keyed by that domain; rules whose domain ends in literal labels
(``*.example.com``) sit in a dict keyed by that suffix, and a lookup probes
each suffix of the address's domain (one probe per label); only rules with
no literal domain suffix sit in a dict keyed by their local part when it is
literal (``info@*``); only the rest (``*@*``, ``a*@*``) are checked on every
lookup.
Results are kept in a bounded LRU cache; a rule change drops exactly the
cached addresses the old or new pattern matches.
"""

from __future__ import annotations

import collections
import re
from typing import Any, Iterable, Mapping, Optional, Union

from dcrouter.config.base import build, unbuild
from dcrouter.config.email import DomainRuleOptions, EmailOptions, check_address_pattern
from dcrouter.errors import ConfigError

#: Rank classes of :func:`pattern_rank`.
EXACT, LITERAL_DOMAIN, DOMAIN_SUFFIX, ANY_DOMAIN = 0, 1, 2, 3


def _has_wildcard(text: str) -> bool:
    return "*" in text or "?" in text


def _glob_regex(glob: str, ignore_case: bool) -> "re.Pattern[str]":
    """Only ``*`` and ``?`` are special; everything else is literal."""
    parts = []
    for ch in glob:
        if ch == "*":
            parts.append(".*")
        elif ch == "?":
            parts.append(".")
        else:
            parts.append(re.escape(ch))
    return re.compile("".join(parts) + r"\Z", re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def split_address(address: str) -> tuple[str, str]:
    """``"<Alice@Example.COM.>"`` -> ``("Alice", "example.com")``; no ``@`` -> ``(address, "")``."""
    addr = address.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1].strip()
    if "@" not in addr:
        return addr, ""
    local, domain = addr.rsplit("@", 1)
    return local, domain.lower().rstrip(".")


def pattern_rank(pattern: str) -> tuple[int, int]:
    """``(class, -literal characters)`` of a normalised pattern; lower ranks win."""
    local, domain = pattern.rsplit("@", 1)
    literal = sum(1 for ch in pattern if ch not in "*?@")
    if not _has_wildcard(domain):
        cls = LITERAL_DOMAIN if _has_wildcard(local) else EXACT
    elif literal_suffix(domain):
        cls = DOMAIN_SUFFIX
    else:
        cls = ANY_DOMAIN
    return cls, -literal


def literal_suffix(domain: str) -> str:
    """The trailing labels of a domain pattern that hold no wildcard (``*.a.b`` -> ``a.b``)."""
    labels = domain.split(".")
    out: list[str] = []
    for label in reversed(labels):
        if _has_wildcard(label):
            break
        out.append(label)
    return ".".join(reversed(out))


class CompiledRule:
    """A rule with its pattern split, compiled and ranked."""

    __slots__ = ("rule", "pattern", "local", "domain", "local_re", "domain_re", "rank",
                 "position", "index_key")

    def __init__(self, rule: DomainRuleOptions, position: int, case_sensitive: bool) -> None:
        self.rule = rule
        pattern = check_address_pattern(rule.pattern, "pattern")
        local, domain = pattern.rsplit("@", 1)
        self.domain = domain.lower()
        self.local = local if case_sensitive else local.lower()
        self.pattern = f"{self.local}@{self.domain}"
        self.local_re = None if not _has_wildcard(self.local) else _glob_regex(
            self.local, not case_sensitive)
        self.domain_re = None if not _has_wildcard(self.domain) else _glob_regex(
            self.domain, True)
        self.position = position
        self.rank = pattern_rank(self.pattern) + (position,)
        if not _has_wildcard(self.domain):
            self.index_key = ("domain", self.domain)
        else:
            suffix = literal_suffix(self.domain)
            if suffix:
                self.index_key = ("suffix", suffix)
            elif self.local_re is None:
                self.index_key = ("local", self.local)
            else:
                self.index_key = ("any", "")

    def matches(self, local: str, domain: str) -> bool:
        """Does a normalised address match?"""
        if self.domain_re is None:
            if domain != self.domain:
                return False
        elif not self.domain_re.match(domain):
            return False
        if self.local_re is None:
            return local == self.local
        return self.local_re.match(local) is not None


RuleInput = Union[DomainRuleOptions, Mapping[str, Any]]


class DomainRouter:
    """Matches recipient addresses to ``[[email.domain_rules]]`` (the seed's DomainRouter).

    Also carries the fallback for unmatched addresses (``default_mode``,
    ``default_server``, ``default_port``, ``default_tls``), which the
    processor applies to relay-permitted senders only.
    """

    def __init__(self, rules: Iterable[DomainRuleOptions] = (), *, default_mode: str = "mta",
                 default_server: str = "", default_port: int = 25, default_tls: bool = False,
                 case_sensitive: bool = False, priority_order: str = "most-specific",
                 cache_size: int = 10000) -> None:
        self.default_mode = default_mode
        self.default_server = default_server
        self.default_port = default_port
        self.default_tls = default_tls
        self.case_sensitive = case_sensitive
        self.priority_order = priority_order
        self.cache_size = cache_size
        self._rules: list[DomainRuleOptions] = list(rules)
        self._cache: "collections.OrderedDict[tuple[str, str], Optional[CompiledRule]]" = \
            collections.OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0
        self._rebuild()

    # -- construction ------------------------------------------------------

    @classmethod
    def from_options(cls, options: EmailOptions) -> "DomainRouter":
        """Build from ``[email]``."""
        return cls(options.domain_rules, default_mode=options.default_mode,
                   default_server=options.default_server, default_port=options.default_port,
                   default_tls=options.default_tls, case_sensitive=options.case_sensitive,
                   priority_order=options.priority_order, cache_size=options.route_cache_size)

    def update_from_options(self, options: EmailOptions) -> None:
        """Apply a new ``[email]`` section (SIGHUP, API)."""
        self.update_options(domain_rules=options.domain_rules, default_mode=options.default_mode,
                            default_server=options.default_server,
                            default_port=options.default_port, default_tls=options.default_tls,
                            case_sensitive=options.case_sensitive,
                            priority_order=options.priority_order,
                            cache_size=options.route_cache_size)

    def update_options(self, *, domain_rules: Optional[Iterable[DomainRuleOptions]] = None,
                       default_mode: Optional[str] = None, default_server: Optional[str] = None,
                       default_port: Optional[int] = None, default_tls: Optional[bool] = None,
                       case_sensitive: Optional[bool] = None,
                       priority_order: Optional[str] = None,
                       cache_size: Optional[int] = None) -> None:
        """Change some options (the seed's ``updateOptions(Partial<...>)``); drops the cache."""
        if priority_order is not None and priority_order not in ("most-specific", "first-match"):
            raise ConfigError("email.priority_order",
                              f"must be 'most-specific' or 'first-match', got '{priority_order}'")
        for name, value in (("default_mode", default_mode), ("default_server", default_server),
                            ("default_port", default_port), ("default_tls", default_tls),
                            ("case_sensitive", case_sensitive),
                            ("priority_order", priority_order), ("cache_size", cache_size)):
            if value is not None:
                setattr(self, name, value)
        if domain_rules is not None:
            self._rules = list(domain_rules)
        self._rebuild()

    def _rebuild(self) -> None:
        compiled = []
        for i, rule in enumerate(self._rules):
            try:
                compiled.append(CompiledRule(rule, i, self.case_sensitive))
            except ConfigError as e:
                raise ConfigError(f"email.domain_rules[{i}].pattern", e.problem) from None
        self._compiled = compiled
        self._by_domain: dict[str, list[CompiledRule]] = {}
        self._by_suffix: dict[str, list[CompiledRule]] = {}
        self._by_local: dict[str, list[CompiledRule]] = {}
        self._any: list[CompiledRule] = []
        for c in compiled:
            kind, key = c.index_key
            if kind == "domain":
                self._by_domain.setdefault(key, []).append(c)
            elif kind == "suffix":
                self._by_suffix.setdefault(key, []).append(c)
            elif kind == "local":
                self._by_local.setdefault(key, []).append(c)
            else:
                self._any.append(c)
        self._by_pattern = {c.pattern: c for c in compiled}
        self._cache.clear()

    # -- matching ----------------------------------------------------------

    def _normalise(self, address: str) -> tuple[str, str]:
        local, domain = split_address(address)
        return (local if self.case_sensitive else local.lower()), domain

    def _candidates(self, local: str, domain: str) -> Iterable[CompiledRule]:
        yield from self._by_domain.get(domain, ())
        if self._by_local:
            yield from self._by_local.get(local, ())
        if self._by_suffix:
            labels = domain.split(".")
            for i in range(len(labels)):
                rules = self._by_suffix.get(".".join(labels[i:]))
                if rules:
                    yield from rules
        yield from self._any

    def _matching(self, key: tuple[str, str]) -> list[CompiledRule]:
        local, domain = key
        if not domain:
            return []
        return [c for c in self._candidates(local, domain) if c.matches(local, domain)]

    def _best(self, key: tuple[str, str]) -> Optional[CompiledRule]:
        found = self._matching(key)
        if not found:
            return None
        if self.priority_order == "first-match":
            return min(found, key=lambda c: c.position)
        return min(found, key=lambda c: c.rank)

    def match_rule(self, address: str) -> Optional[DomainRuleOptions]:
        """The rule that handles mail to ``address``, or None (then the default applies)."""
        key = self._normalise(address)
        if self.cache_size > 0:
            try:
                hit = self._cache[key]
            except KeyError:
                pass
            else:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                return hit.rule if hit is not None else None
        self.cache_misses += 1
        best = self._best(key)
        if self.cache_size > 0:
            self._cache[key] = best
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return best.rule if best is not None else None

    def matches_pattern(self, address: str, pattern: str) -> bool:
        """Does ``address`` match ``pattern`` (with this router's case rules)?"""
        compiled = CompiledRule(DomainRuleOptions(pattern=pattern, mode="mta"), 0,
                                self.case_sensitive)
        local, domain = self._normalise(address)
        return bool(domain) and compiled.matches(local, domain)

    def get_all_matching_rules(self, address: str) -> list[DomainRuleOptions]:
        """Every matching rule, best first (in the configured priority order)."""
        found = self._matching(self._normalise(address))
        if self.priority_order == "first-match":
            found.sort(key=lambda c: c.position)
        else:
            found.sort(key=lambda c: c.rank)
        return [c.rule for c in found]

    # -- rule management -----------------------------------------------------

    def _pattern_key(self, pattern: str) -> str:
        normal = check_address_pattern(pattern, "pattern")
        local, domain = normal.rsplit("@", 1)
        return f"{local if self.case_sensitive else local.lower()}@{domain.lower()}"

    def _as_rule(self, rule: RuleInput, path: str) -> DomainRuleOptions:
        if isinstance(rule, DomainRuleOptions):
            check_address_pattern(rule.pattern, f"{path}.pattern")
            rule.validate(path)
            return rule
        return build(DomainRuleOptions, dict(rule), path)

    def _invalidate(self, *patterns: str) -> None:
        """Drop cached results of addresses any of ``patterns`` matches."""
        if not self._cache:
            return
        compiled = [CompiledRule(DomainRuleOptions(pattern=p, mode="mta"), 0, self.case_sensitive)
                    for p in patterns]
        stale = [k for k in self._cache if any(c.matches(k[0], k[1]) for c in compiled)]
        for k in stale:
            del self._cache[k]

    def _replace_rules(self, rules: list[DomainRuleOptions], *changed: str) -> None:
        cache = self._cache.copy()
        self._rules = rules
        self._rebuild()
        self._cache = cache
        self._invalidate(*changed)

    def add_rule(self, rule: RuleInput) -> DomainRuleOptions:
        """Append a rule (a DomainRuleOptions or a TOML-like dict); its pattern must be new."""
        path = f"email.domain_rules[{len(self._rules)}]"
        new = self._as_rule(rule, path)
        if self._pattern_key(new.pattern) in self._by_pattern:
            raise ConfigError(f"{path}.pattern", f"pattern '{new.pattern}' already has a rule")
        self._replace_rules(self._rules + [new], new.pattern)
        return new

    def update_rule(self, pattern: str, updates: Mapping[str, Any]) -> bool:
        """Change fields of the rule with ``pattern``; False when there is none."""
        current = self._by_pattern.get(self._pattern_key(pattern))
        if current is None:
            return False
        position = current.position
        path = f"email.domain_rules[{position}]"
        data = unbuild(current.rule)
        data.update({k: unbuild(v) for k, v in updates.items()})
        new = build(DomainRuleOptions, data, path)
        key = self._pattern_key(new.pattern)
        if key != current.pattern and key in self._by_pattern:
            raise ConfigError(f"{path}.pattern", f"pattern '{new.pattern}' already has a rule")
        rules = list(self._rules)
        rules[position] = new
        self._replace_rules(rules, current.rule.pattern, new.pattern)
        return True

    def remove_rule(self, pattern: str) -> bool:
        """Remove the rule with ``pattern``; False when there is none."""
        current = self._by_pattern.get(self._pattern_key(pattern))
        if current is None:
            return False
        rules = [r for i, r in enumerate(self._rules) if i != current.position]
        self._replace_rules(rules, current.rule.pattern)
        return True

    def get_rule(self, pattern: str) -> Optional[DomainRuleOptions]:
        """The rule whose pattern is ``pattern`` (normalised: ``example.com`` = ``*@example.com``)."""
        current = self._by_pattern.get(self._pattern_key(pattern))
        return current.rule if current is not None else None

    def get_rules(self) -> list[DomainRuleOptions]:
        """Every rule, in configuration order."""
        return list(self._rules)

    def rules_in_match_order(self) -> list[DomainRuleOptions]:
        """Every rule, in the order precedence considers them."""
        if self.priority_order == "first-match":
            return list(self._rules)
        return [c.rule for c in sorted(self._compiled, key=lambda c: c.rank)]

    def clear_cache(self) -> None:
        """Forget every cached match."""
        self._cache.clear()

    def get_stats(self) -> dict:
        """Rules, cache size and hit counts."""
        return {"rules": len(self._rules), "cache_entries": len(self._cache),
                "cache_hits": self.cache_hits, "cache_misses": self.cache_misses}


def describe_rule(rule: DomainRuleOptions) -> str:
    """``user@x.test -> forward (127.0.0.1:2626)``: one rule, for ``check-config``."""
    detail = ""
    if rule.mode == "forward" and rule.target is not None:
        detail = f"{rule.target.server}:{rule.target.port}" + (", tls" if rule.target.use_tls
                                                                else "")
    elif rule.mode == "mta":
        mta = rule.mta_options
        if mta is not None and mta.allow_local_delivery:
            detail = f"local Maildir {mta.local_delivery_path or 'state_dir/mail'}"
        else:
            detail = "MX"
        if mta is not None and mta.dkim_sign:
            detail += ", DKIM"
    elif rule.mode == "process":
        bits = []
        if rule.content_scanning and rule.scanners:
            bits.append("scan " + ",".join(s.type for s in rule.scanners))
        if rule.transformations:
            bits.append("transform " + ",".join(t.type for t in rule.transformations))
        mta = rule.mta_options
        if rule.target is not None:
            bits.append(f"then {rule.target.server}:{rule.target.port}")
        elif mta is not None and mta.allow_local_delivery:
            bits.append(f"then local Maildir {mta.local_delivery_path or 'state_dir/mail'}")
        else:
            bits.append("then MX")
        detail = "; ".join(bits)
    return f"{rule.pattern} -> {rule.mode}" + (f" ({detail})" if detail else "")


def describe_rules(email: EmailOptions) -> list[str]:
    """The rules in match order, numbered, plus the default for unmatched addresses."""
    router = DomainRouter.from_options(email)
    lines = [f"  {i + 1}. {describe_rule(r)}" for i, r in enumerate(router.rules_in_match_order())]
    if email.default_mode == "forward":
        fallback = f"forward ({email.default_server}:{email.default_port})"
    else:
        fallback = f"{email.default_mode} (MX)"
    lines.append(f"  otherwise (relay-permitted senders only) -> {fallback}")
    return lines


__all__ = ["DomainRouter", "CompiledRule", "describe_rule", "describe_rules", "pattern_rank",
           "split_address"]
