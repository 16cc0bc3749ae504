"""Recipient checks at RCPT time: refuse what can never be delivered, before the data.

Accepting a recipient that later bounces sends a bounce to whatever sender the
client wrote - with spam, a forged one (backscatter).  Postfix avoids it by
knowing its users at RCPT (``smtpd_reject_unlisted_recipient`` with
``local_recipient_maps`` / ``relay_recipient_maps``); so does dcrouter, for
the rule that matched the recipient, in this order:

1. ``postmaster`` always exists (RFC 5321 4.5.1): none of the checks below.
2. From a client that may not relay, a local part that routes further -
   ``user%other@``, ``user!other@``, ``"user@other"@`` - is refused as
   relaying, ``554 5.7.1`` (Postfix's ``allow_untrusted_routing = no``).
3. A rule that delivers into Maildirs: the local part must make a Maildir
   name (:func:`dcrouter.address.maildir_name`), else ``550 5.1.1`` (``553
   5.6.7`` for a UTF-8 local part that cannot be one).
4. The rule's ``recipients`` / ``recipients_file`` list, when it has one:
   unlisted addresses get ``550 5.1.1``.
5. The rule's ``recipient_check`` plug-in (:class:`dcrouter.interfaces.IRecipientCheck`),
   when it has one: False is ``550 5.1.1``, an error ``451 4.3.0``.
"""

from __future__ import annotations

import unicodedata
from typing import Any, Optional

from twisted.internet import defer

from dcrouter.address import maildir_name, unquote_local
from dcrouter.config.email import DomainRuleOptions
from dcrouter.errors import ConfigError, PolicyRejection
from dcrouter.interfaces import IRecipientCheck
from dcrouter.logsetup import get_logger
from dcrouter.message import SessionInfo

log = get_logger("email.recipients")


def is_postmaster(address: str, hostname: str = "") -> bool:
    """``postmaster@any domain`` (any case); with ``hostname``: ``postmaster@hostname`` only."""
    local, _, domain = address.rpartition("@")
    if local.lower() != "postmaster":
        return False
    return not hostname or domain.lower().rstrip(".") == hostname.lower().rstrip(".")


def delivers_locally(rule: Optional[DomainRuleOptions]) -> bool:
    """Does mail matching ``rule`` go into Maildirs (as the processor routes it)?"""
    if rule is None or rule.mta_options is None or not rule.mta_options.allow_local_delivery:
        return False
    return not (rule.target is not None and rule.mode in ("forward", "process"))


def _sender_routing(address: str) -> bool:
    """Does the local part route further (``%``, ``!``, ``@`` - percent hack, bang path)?"""
    local = unquote_local(address.rpartition("@")[0])
    return "%" in local or "!" in local or "@" in local


def read_recipients_file(path: str, key: str) -> list[str]:
    """One address or local part a line; blank lines and ``#`` comments ignored."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(key, f"cannot read '{path}': {e}") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


class RecipientList:
    """The addresses a rule accepts: full addresses and bare local parts."""

    def __init__(self, entries: list[str], case_sensitive: bool = False) -> None:
        self.case_sensitive = case_sensitive
        self.addresses: set[str] = set()
        self.locals: set[str] = set()
        for entry in entries:
            if "@" in entry:
                local, _, domain = entry.rpartition("@")
                self.addresses.add(f"{self._local(local)}@{domain.lower().rstrip('.')}")
            else:
                self.locals.add(self._local(entry))

    def _local(self, local: str) -> str:
        local = unicodedata.normalize("NFC", unquote_local(local))
        return local if self.case_sensitive else local.lower()

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        local, _, domain = address.rpartition("@")
        local = self._local(local)
        return local in self.locals or f"{local}@{domain.lower().rstrip('.')}" in self.addresses

    def __len__(self) -> int:
        return len(self.addresses) + len(self.locals)


class _RuleChecks:
    """The list and the plug-in of one rule, built once."""

    def __init__(self, rule: DomainRuleOptions, path: str, case_sensitive: bool) -> None:
        self.rule = rule
        entries = list(rule.recipients)
        if rule.recipients_file:
            entries += read_recipients_file(rule.recipients_file, f"{path}.recipients_file")
        self.listed: Optional[RecipientList] = \
            RecipientList(entries, case_sensitive) if entries or rule.recipients_file else None
        self.check: Any = None
        if rule.recipient_check:
            from dcrouter.email.transform import load_class
            key = f"{path}.recipient_check"
            factory = load_class(rule.recipient_check, key)
            try:
                self.check = factory()
            except TypeError as e:
                raise ConfigError(key, f"cannot build '{rule.recipient_check}': {e}") from None
            if not IRecipientCheck.providedBy(self.check) and not callable(
                    getattr(self.check, "recipient_exists", None)):
                raise ConfigError(key, f"'{rule.recipient_check}' is not an IRecipientCheck")


class RecipientPolicy:
    """Applies the RCPT-time recipient checks of the rules (see the module docstring)."""

    def __init__(self, rules: tuple[DomainRuleOptions, ...] = (), hostname: str = "",
                 case_sensitive: bool = False) -> None:
        self.hostname = hostname
        self.case_sensitive = case_sensitive
        self._rules: dict[int, _RuleChecks] = {}
        for i, rule in enumerate(rules):
            self._rules[id(rule)] = _RuleChecks(rule, f"email.domain_rules[{i}]", case_sensitive)

    def _checks(self, rule: DomainRuleOptions) -> _RuleChecks:
        checks = self._rules.get(id(rule))
        if checks is None or checks.rule is not rule:  # a rule added at runtime (API)
            checks = _RuleChecks(rule, f"email.domain_rules[{len(self._rules)}]",
                                 self.case_sensitive)
            self._rules[id(rule)] = checks
        return checks

    def listed_count(self, rule: DomainRuleOptions) -> Optional[int]:
        """Entries of the rule's recipient list, None without one."""
        listed = self._checks(rule).listed
        return None if listed is None else len(listed)

    @defer.inlineCallbacks
    def check(self, session: SessionInfo, recipient: str,
              rule: Optional[DomainRuleOptions]) -> Any:
        """Fires when ``recipient`` may be accepted; PolicyRejection otherwise."""
        if is_postmaster(recipient):
            return None
        if not session.may_relay and _sender_routing(recipient):
            log.info("sender-specified routing refused for {recipient} from {client_ip}",
                     recipient=recipient, client_ip=session.client_ip,
                     correlation_id=session.correlation_id)
            raise PolicyRejection(554, "5.7.1", f"<{recipient}>: Relay access denied",
                                  reason="relay")
        local = delivers_locally(rule)
        table = "local" if local else "relay"
        if local and maildir_name(recipient) is None:
            if not recipient.rpartition("@")[0].isascii():
                raise PolicyRejection(553, "5.6.7", f"<{recipient}>: Recipient address "
                                      "rejected: this UTF-8 local part cannot be a mailbox "
                                      "name", reason="unknown_recipient")
            raise self._unknown(recipient, table)
        if rule is None:
            return None
        checks = self._checks(rule)
        if checks.listed is not None and recipient not in checks.listed:
            raise self._unknown(recipient, table)
        if checks.check is not None:
            try:
                exists = yield defer.maybeDeferred(checks.check.recipient_exists, recipient,
                                                   rule.pattern, session)
            except Exception as e:  # noqa: BLE001 - a failing plug-in is a temporary failure
                log.warn("recipient check {check} failed for {recipient}: {error}",
                         check=rule.recipient_check, recipient=recipient, error=repr(e),
                         correlation_id=session.correlation_id)
                raise PolicyRejection(451, "4.3.0", f"<{recipient}>: Temporary lookup failure",
                                      reason="recipient_check") from None
            if not exists:
                raise self._unknown(recipient, table)
        return None

    @staticmethod
    def _unknown(recipient: str, table: str) -> PolicyRejection:
        return PolicyRejection(550, "5.1.1", f"<{recipient}>: Recipient address rejected: "
                               f"User unknown in {table} recipient table",
                               reason="unknown_recipient")


__all__ = ["RecipientList", "RecipientPolicy", "delivers_locally", "is_postmaster",
           "read_recipients_file"]
