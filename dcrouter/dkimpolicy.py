"""Which mail dcrouter DKIM-signs, with which ``d=``: the signing identities of the configuration.

The rule, as OpenDKIM applies it for InternalHosts and authenticated clients:

* only mail from a session that may relay (AUTH, or a client inside
  ``email.relay_networks``) is signed; mail from anyone else never is,
  whatever its envelope or headers say;
* ``d=`` is a *configured* signing domain - ``email.dkim.domains`` (every
  route), a rule's own (``mta_options.dkim_sign``: ``dkim_options.domain_name``
  or the domain its pattern names) or a ``dkim_sign`` transformation's - and
  it must be the domain of the message's ``From:`` header (or its parent, with
  ``email.dkim.sign_subdomains``).  A message whose ``From:`` is missing,
  repeated, holds several addresses or does not parse is delivered unsigned;
* keys exist for these identities only: :meth:`SigningPolicy.identities`
  lists what to create at start and on reload, never what a message asks for.

This module is pure (no I/O besides :func:`read_author_domain`), shared by
the processor (``email/``) and the DNS publisher (``dns/``).
"""

from __future__ import annotations

import dataclasses
import email.parser
import email.policy
import re
from typing import Any, Iterable, Optional

from dcrouter.config.email import (
    DomainRuleOptions, EmailOptions, check_dkim_domain, check_dkim_selector,
)
from dcrouter.dkimkeys import DEFAULT_SELECTOR
from dcrouter.errors import ConfigError

#: Header bytes read at most to find ``From:`` (a longer header block: no From, unsigned).
MAX_HEADER_BYTES = 1 << 20
_GLOB = frozenset("*?[]!")
_FOLD = re.compile(r"\r?\n(?=[ \t])")


@dataclasses.dataclass(frozen=True)
class SigningIdentity:
    """One configured signing key: ``d=``, ``s=`` and where the private key comes from."""

    domain: str
    selector: str = DEFAULT_SELECTOR
    private_key_path: str = ""
    private_key: str = ""

    @property
    def name(self) -> tuple[str, str]:
        """``(domain, selector)``: the key store's name of the key."""
        return (self.domain, self.selector)


def pattern_domain(pattern: str) -> str:
    """The domain a rule pattern names (``*@example.com`` -> ``example.com``), else ''."""
    _local, at, domain = pattern.rpartition("@")
    if not at:
        domain = pattern
    if not domain or any(c in _GLOB for c in domain):
        return ""
    try:
        return check_dkim_domain(domain, "pattern")
    except ConfigError:
        return ""


class SigningPolicy:
    """The signing identities of one ``[email]`` section, per route.

    Built once per configuration (cheap, no I/O); raises ConfigError naming
    the key when two entries give one ``(domain, selector)`` different keys.
    """

    def __init__(self, options: Optional[EmailOptions]) -> None:
        self._by_name: dict[tuple[str, str], tuple[SigningIdentity, str]] = {}
        self._rule_identities: dict[int, tuple[DomainRuleOptions, Optional[SigningIdentity]]] = {}
        self.sign_subdomains = False
        self.global_identities: tuple[SigningIdentity, ...] = ()
        if options is None:   # signs nothing
            return
        self.sign_subdomains = options.dkim.sign_subdomains
        self.global_identities = tuple(
            self._add(SigningIdentity(domain, options.dkim.selector), f"email.dkim.domains[{i}]")
            for i, domain in enumerate(options.dkim.domains))
        for i, rule in enumerate(options.domain_rules):
            self._rule(rule, f"email.domain_rules[{i}]")

    def _add(self, identity: SigningIdentity, path: str) -> SigningIdentity:
        known = self._by_name.get(identity.name)
        if known is not None and (known[0].private_key_path, known[0].private_key) != (
                identity.private_key_path, identity.private_key):
            raise ConfigError(path, f"DKIM key {identity.selector}._domainkey.{identity.domain} "
                              f"is already given a different key by {known[1]}")
        if known is None:
            self._by_name[identity.name] = (identity, path)
        return identity

    def _rule(self, rule: DomainRuleOptions, path: str) -> Optional[SigningIdentity]:
        identity = None
        mta = rule.mta_options
        # mta_options apply where the route is the rule's own (mta; process without target)
        uses_mta = rule.mode == "mta" or (rule.mode == "process" and rule.target is None)
        if mta is not None and mta.dkim_sign and uses_mta:
            dk = mta.dkim_options
            domain = (dk.domain_name if dk is not None else "") or pattern_domain(rule.pattern)
            if domain:
                identity = self._add(SigningIdentity(
                    domain, (dk.key_selector if dk is not None else "") or DEFAULT_SELECTOR,
                    dk.private_key_path if dk is not None else "",
                    dk.private_key if dk is not None else ""), f"{path}.mta_options")
        for j, t in enumerate(rule.transformations):
            if t.type == "dkim_sign" and rule.mode == "process":
                self.for_transform(t.params, f"{path}.transformations[{j}]")
        self._rule_identities[id(rule)] = (rule, identity)
        return identity

    def for_rule(self, rule: Optional[DomainRuleOptions]) -> tuple[SigningIdentity, ...]:
        """The identities mail routed by ``rule`` (None: the default route) may be signed with."""
        if rule is None:
            return self.global_identities
        entry = self._rule_identities.get(id(rule))
        if entry is None or entry[0] is not rule:   # not of this configuration
            try:
                self._rule(rule, f"email.domain_rules[{len(self._rule_identities)}]")
            except ConfigError:
                return self.global_identities
            entry = self._rule_identities[id(rule)]
        own = entry[1]
        return self.global_identities if own is None else (own, *self.global_identities)

    def for_transform(self, params: Any, path: str) -> tuple[SigningIdentity, ...]:
        """The identities of a ``dkim_sign`` transformation (``domain``, ``selector``,
        ``private_key_path``; without ``domain``: ``email.dkim.domains`` with its selector)."""
        params = params or {}
        selector = params.get("selector") or DEFAULT_SELECTOR
        domain = params.get("domain") or ""
        if not isinstance(selector, str) or not isinstance(domain, str):
            raise ConfigError(path, "dkim_sign: domain and selector must be strings")
        identities = self.transform_identities(
            check_dkim_domain(domain, f"{path}.domain"),
            check_dkim_selector(selector, f"{path}.selector"),
            str(params.get("private_key_path") or ""))
        return tuple(self._add(identity, path) for identity in identities)

    def transform_identities(self, domain: str, selector: str, private_key_path: str = ""
                             ) -> tuple[SigningIdentity, ...]:
        """What a ``dkim_sign`` transformation with these (checked) parameters signs with;
        registers nothing (safe from the worker thread a transformation runs in)."""
        if domain:
            return (SigningIdentity(domain, selector, private_key_path),)
        return tuple(SigningIdentity(g.domain, selector) for g in self.global_identities)

    def identities(self) -> list[SigningIdentity]:
        """Every key the configuration signs with (to create at start and on reload)."""
        return [identity for identity, _path in self._by_name.values()]

    def choose(self, author_domain: Optional[str], candidates: Iterable[SigningIdentity]
               ) -> Optional[SigningIdentity]:
        """The candidate aligned with the ``From:`` domain: the same domain, else (with
        ``sign_subdomains``) the closest parent; None when none is."""
        if not author_domain:
            return None
        best: Optional[SigningIdentity] = None
        for identity in candidates:
            if identity.domain == author_domain:
                return identity
            if self.sign_subdomains and author_domain.endswith("." + identity.domain) and (
                    best is None or len(identity.domain) > len(best.domain)):
                best = identity
        return best


def author_domain(values: list[str]) -> Optional[str]:
    """The domain of the one address in the one ``From:`` field; None when there is not
    exactly one field with exactly one well-formed address (RFC 5322 3.6.2)."""
    if len(values) != 1:
        return None
    value = _FOLD.sub("", str(values[0]))
    if not value.isascii():
        try:   # raw 8-bit header bytes (SMTPUTF8) arrive as surrogate escapes
            value = value.encode("utf-8", "surrogateescape").decode("utf-8")
        except UnicodeError:
            return None   # not UTF-8: no address to align with
    try:
        header = email.policy.default.header_factory("From", value)
        if header.defects:
            return None
        addresses: Any = getattr(header, "addresses", ())
        if len(addresses) != 1:
            return None
        domain = addresses[0].domain
        if not domain or not addresses[0].username:
            return None
    except Exception:  # noqa: BLE001 - the stdlib parser raises assorted errors on junk
        return None
    try:
        return check_dkim_domain(domain, "From") or None
    except ConfigError:
        return None


def author_domain_of_header(message: bytes) -> Optional[str]:
    """The ``From:`` domain of a message (its header block: the bytes up to the first
    empty line, or all of them), as :func:`author_domain` finds it."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        end = message.find(b"\n\n")
    head = message[:end + 2] if end >= 0 else message
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    return author_domain([str(v) for v in parsed.get_all("From") or []])


def read_author_domain(path: str) -> Optional[str]:
    """The ``From:`` domain of the message file ``path`` (blocking: call in a thread).

    A header block longer than :data:`MAX_HEADER_BYTES` counts as no ``From:``.
    """
    with open(path, "rb") as f:
        head = f.read(MAX_HEADER_BYTES)
    if b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) >= MAX_HEADER_BYTES:
        return None
    return author_domain_of_header(head)


__all__ = ["DEFAULT_SELECTOR", "SigningIdentity", "SigningPolicy", "author_domain",
           "author_domain_of_header", "pattern_domain", "read_author_domain"]
