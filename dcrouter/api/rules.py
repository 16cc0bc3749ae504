"""The email domain rule endpoints: CRUD validated like the configuration file.

A rule arrives as JSON, is built with :func:`dcrouter.config.base.build` (so
errors name the key path like a configuration error, 422), and is applied
through ``DcRouter.update_domain_rules`` so the router's options stay the
single source of truth and the next message is routed by it.  Changes are
serialised by a lock and, with ``api.persist_rules``, written to
``state_dir/rules.toml`` (:mod:`dcrouter.api.persist`).

Answers never carry a secret: a target's password (and an inline DKIM key)
is shown as ``********``.  A rule sent back with that placeholder keeps the
secret of the rule it replaces, so a client can read, edit and write a rule
without ever holding the password.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet import defer, threads

from dcrouter.api import errors
from dcrouter.api.persist import save_rules
from dcrouter.api.types import ApiRequest, Reply, router_method
from dcrouter.config.base import build, restore_redacted, unbuild
from dcrouter.config.email import DomainRuleOptions, check_address_pattern
from dcrouter.errors import ConfigError
from dcrouter.logsetup import get_logger
from dcrouter.service import RouterContext

log = get_logger("api.rules")


class RuleEndpoints:
    """``/api/email/rules`` and ``/api/email/rules/{pattern}``."""

    def __init__(self, context: RouterContext) -> None:
        self.context = context
        self._rules_lock = defer.DeferredLock()

    def _email_options(self) -> Any:
        email = self.context.options.email
        if email is None or "email" not in self.context.services:
            raise errors.service_unavailable("the email service is not configured")
        return email

    def _find(self, rules: tuple, pattern: str) -> int:
        email = self._email_options()
        try:
            wanted = check_address_pattern(pattern, "pattern")
        except ConfigError:
            wanted = pattern
        for i, rule in enumerate(rules):
            if rule.pattern == wanted or (not email.case_sensitive
                                          and rule.pattern.lower() == wanted.lower()):
                return i
        raise errors.not_found(f"no domain rule with pattern '{pattern}'")

    def list_rules(self, request: ApiRequest) -> dict:
        """The rules in the order the router holds them."""
        email = self._email_options()
        return {"rules": [_shown(r) for r in email.domain_rules],
                "persisted": self._persist_enabled()}

    def get_rule(self, request: ApiRequest) -> dict:
        """One rule by pattern."""
        rules = self._email_options().domain_rules
        return {"rule": _shown(rules[self._find(rules, request.params["pattern"])])}

    @staticmethod
    def _build_rule(data: Any, where: str = "rule",
                    current: Optional[DomainRuleOptions] = None) -> DomainRuleOptions:
        if not isinstance(data, dict):
            raise errors.bad_request("the body must be a JSON object (one domain rule)")
        try:
            data = restore_redacted(data, unbuild(current) if current is not None else {},
                                    where)
            return build(DomainRuleOptions, data, where)
        except ConfigError as e:
            raise errors.invalid_config(e) from None

    def add_rule(self, request: ApiRequest) -> defer.Deferred:
        """Validate and append (or insert at ``?position=``) a rule."""
        data = request.json()
        position = request.arg("position")
        rule = self._build_rule(data)

        def change(rules: list) -> Reply:
            try:
                self._find(tuple(rules), rule.pattern)
            except errors.ApiError:
                pass
            else:
                raise errors.conflict(f"a rule with pattern '{rule.pattern}' exists; "
                                      "use PUT to replace it")
            index = len(rules)
            if position is not None:
                try:
                    index = int(position)
                except ValueError:
                    raise errors.bad_request(f"position must be an integer, got '{position}'")
                if not 0 <= index <= len(rules):
                    raise errors.bad_request(f"position must be 0..{len(rules)}, got {index}")
            rules.insert(index, rule)
            return Reply({"rule": _shown(rule), "position": index}, status=201)

        return self._change_rules(change, request, "added", rule.pattern)

    def replace_rule(self, request: ApiRequest) -> defer.Deferred:
        """Replace a rule in place; the body's pattern may rename it."""
        data = request.json()
        pattern = request.params["pattern"]
        if isinstance(data, dict) and "pattern" not in data:
            data = dict(data, pattern=pattern)
        email = self._email_options()
        current = email.domain_rules[self._find(email.domain_rules, pattern)]
        rule = self._build_rule(data, current=current)

        def change(rules: list) -> dict:
            index = self._find(tuple(rules), pattern)
            others = tuple(r for i, r in enumerate(rules) if i != index)
            try:
                self._find(others, rule.pattern)
            except errors.ApiError:
                pass
            else:
                raise errors.conflict(f"another rule has pattern '{rule.pattern}'")
            rules[index] = rule
            return {"rule": _shown(rule), "position": index}

        return self._change_rules(change, request, "replaced", pattern)

    def remove_rule(self, request: ApiRequest) -> defer.Deferred:
        """Remove a rule by pattern."""
        pattern = request.params["pattern"]

        def change(rules: list) -> dict:
            removed = rules.pop(self._find(tuple(rules), pattern))
            return {"removed": _shown(removed)}

        return self._change_rules(change, request, "removed", pattern)

    def _persist_enabled(self) -> bool:
        api = self.context.options.api
        return bool(api is not None and api.persist_rules)

    def _change_rules(self, change: Callable[[list], Any], request: ApiRequest, verb: str,
                      pattern: str) -> defer.Deferred:
        """Apply ``change`` to a copy of the rules under a lock, through the router."""
        @defer.inlineCallbacks
        def locked() -> Any:
            email = self._email_options()
            router = router_method(self.context, "update_domain_rules")
            rules = list(email.domain_rules)
            result = change(rules)
            try:
                yield defer.maybeDeferred(router.update_domain_rules, rules)
            except ConfigError as e:
                raise errors.invalid_config(e)
            if self._persist_enabled():
                state_dir = self.context.options.router.state_dir
                yield threads.deferToThread(save_rules, state_dir, rules)
                # router.workers > 1: the other worker processes re-read the saved rules
                getattr(self.context.router, "rules_saved", lambda: None)()
            log.info("domain rule {pattern} {verb} through the API", pattern=pattern, verb=verb,
                     client_ip=request.client_ip, rules=len(rules))
            return result
        return self._rules_lock.run(locked)


def _shown(rule: DomainRuleOptions) -> dict:
    """A rule as answers show it: secrets redacted."""
    result: dict = unbuild(rule, redact=True)
    return result
