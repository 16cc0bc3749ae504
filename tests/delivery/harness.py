"""A queue + delivery system pair running in the test reactor."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional, Union

from twisted.internet import defer, reactor, task

from dcrouter.config.base import build
from dcrouter.config.email import DomainRuleOptions, EmailOptions
from dcrouter.config.queue import DeliveryOptions, QueueOptions
from dcrouter.delivery import MultiModeDeliverySystem
from dcrouter.delivery.transport import transport_for_rule
from dcrouter.dkimkeys import DkimKeyStore
from dcrouter.email.routing import DomainRouter
from dcrouter.message import (
    RULE_DESTINATION, DeliveryRequest, Destination, DkimSigning, Route, new_correlation_id, new_queue_id,
)
from dcrouter.queue import UnifiedDeliveryQueue


def email_options(queue: Optional[dict[str, Any]] = None,
                  delivery: Optional[dict[str, Any]] = None,
                  rules: Optional[list[dict[str, Any]]] = None, **email: Any) -> EmailOptions:
    """Options with tiny retry delays and timeouts for tests (``rules``: TOML-like tables)."""
    q = dict(storage_type="memory", base_retry_delay=0.2, max_retry_delay=0.4,
             check_interval=0.1, max_retries=3)
    q.update(queue or {})
    d = dict(connect_timeout=2.0, command_timeout=3.0, helo_name="dcrouter.test")
    d.update(delivery or {})
    built = tuple(build(DomainRuleOptions, r, f"rules[{i}]") for i, r in enumerate(rules or ()))
    return EmailOptions(hostname="dcrouter.test", queue=QueueOptions(**q),
                        delivery=DeliveryOptions(**d), domain_rules=built, **email)


class Stack:
    """Queue and delivery system, started; ``send`` enqueues a message.

    ``rules`` are domain rules (TOML-like tables) the delivery system resolves
    rule references with; ``reload`` replaces them as a SIGHUP would.
    """

    def __init__(self, state_dir: str, queue: Optional[dict[str, Any]] = None,
                 delivery: Optional[dict[str, Any]] = None, resolver: Any = None,
                 observers: Optional[list[Any]] = None, store: Any = None,
                 rules: Optional[list[dict[str, Any]]] = None, **email: Any) -> None:
        self.state_dir = state_dir
        self.options = email_options(queue, delivery, rules, **email)
        self.router = DomainRouter.from_options(self.options)
        self.dkim_keys = DkimKeyStore(state_dir)
        self.queue = UnifiedDeliveryQueue.from_options(self.options.queue, state_dir, store=store)
        self.delivery = MultiModeDeliverySystem(self.queue, self.options, self.dkim_keys,
                                                state_dir=state_dir, resolver=resolver,
                                                observers=observers, rules=self.router)
        self.queue.startService()
        self.delivery.startService()

    def reload(self, rules: list[dict[str, Any]], **email: Any) -> None:
        """New rules (and ``[email]`` keys) for the running stack, as a reload applies them."""
        self.options = email_options(None, None, rules, **email)
        self.options = dataclasses.replace(self.options, queue=self.queue.options,
                                           delivery=self.delivery.options.delivery)
        self.router.update_from_options(self.options)
        self.delivery.update_options(self.options)

    def send(self, route: Union[Route, str], recipients: list[str], body: bytes = b"",
             mail_from: str = "sender@example.org", mode: str = "forward",
             **request: Any) -> defer.Deferred:
        """Spool ``body`` and enqueue it; fires with the item ids.

        ``route``: a literal next hop, or the pattern of one of the stack's rules.
        """
        body = body or (b"From: <" + mail_from.encode() + b">\r\nTo: <" +
                        recipients[0].encode() + b">\r\nSubject: test " +
                        new_queue_id().encode() + b"\r\nMessage-ID: <" +
                        new_queue_id().encode() + b"@example.org>\r\n\r\nHello.\r\n")
        spool = os.path.join(self.state_dir, "spool")
        os.makedirs(spool, exist_ok=True)
        path = os.path.join(spool, new_queue_id() + ".eml")
        with open(path, "wb") as f:
            f.write(body)
        if isinstance(route, Route):
            via, pattern = Destination.to(route), "*"
        else:   # as the processor does: the rule by reference, and its scheduling key
            via, pattern = RULE_DESTINATION, route
            hop = transport_for_rule(self.router.get_rule(route), self.options, self.state_dir)
            request.setdefault("destination", "" if hop.kind == "mx" else hop.destination)
        item = DeliveryRequest(queue_id=new_queue_id(), mode=mode, rule_pattern=pattern,
                               mail_from=mail_from, recipients=recipients, via=via,
                               body_path=path, correlation_id=new_correlation_id(),
                               size=len(body), **request)
        return self.queue.enqueue([item])

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """Stop both services."""
        yield self.delivery.stopService()
        yield self.queue.stopService()


@defer.inlineCallbacks
def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll ``predicate()`` in the reactor until truthy; fires with its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        yield task.deferLater(reactor, interval, lambda: None)


@defer.inlineCallbacks
def item_state(queue: UnifiedDeliveryQueue, item_id: str) -> Any:
    """The item's current status (queued or recently finished)."""
    item = yield queue.get_item(item_id)
    return item
