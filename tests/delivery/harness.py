"""A queue + delivery system pair running in the test reactor."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional

from twisted.internet import defer, reactor, task

from dcrouter.config.email import EmailOptions
from dcrouter.config.queue import DeliveryOptions, QueueOptions
from dcrouter.delivery import MultiModeDeliverySystem
from dcrouter.dkimkeys import DkimKeyStore
from dcrouter.message import DeliveryRequest, DkimSigning, Route, new_correlation_id, new_queue_id
from dcrouter.queue import UnifiedDeliveryQueue


def email_options(queue: Optional[dict[str, Any]] = None,
                  delivery: Optional[dict[str, Any]] = None) -> EmailOptions:
    """Options with tiny retry delays and timeouts for tests."""
    q = dict(storage_type="memory", base_retry_delay=0.2, max_retry_delay=0.4,
             check_interval=0.1, max_retries=3)
    q.update(queue or {})
    d = dict(connect_timeout=2.0, command_timeout=3.0, helo_name="dcrouter.test")
    d.update(delivery or {})
    return EmailOptions(hostname="dcrouter.test", queue=QueueOptions(**q),
                        delivery=DeliveryOptions(**d))


class Stack:
    """Queue and delivery system, started; ``send`` enqueues a message."""

    def __init__(self, state_dir: str, queue: Optional[dict[str, Any]] = None,
                 delivery: Optional[dict[str, Any]] = None, resolver: Any = None,
                 observers: Optional[list[Any]] = None, store: Any = None) -> None:
        self.state_dir = state_dir
        self.options = email_options(queue, delivery)
        self.dkim_keys = DkimKeyStore(state_dir)
        self.queue = UnifiedDeliveryQueue.from_options(self.options.queue, state_dir, store=store)
        self.delivery = MultiModeDeliverySystem(self.queue, self.options, self.dkim_keys,
                                                state_dir=state_dir, resolver=resolver,
                                                observers=observers)
        self.queue.startService()
        self.delivery.startService()

    def send(self, route: Route, recipients: list[str], body: bytes = b"",
             mail_from: str = "sender@example.org",
             dkim: Optional[DkimSigning] = None) -> defer.Deferred:
        """Spool ``body`` and enqueue it; fires with the item ids."""
        body = body or (b"From: <" + mail_from.encode() + b">\r\nTo: <" +
                        recipients[0].encode() + b">\r\nSubject: test " +
                        new_queue_id().encode() + b"\r\nMessage-ID: <" +
                        new_queue_id().encode() + b"@example.org>\r\n\r\nHello.\r\n")
        spool = os.path.join(self.state_dir, "spool")
        os.makedirs(spool, exist_ok=True)
        path = os.path.join(spool, new_queue_id() + ".eml")
        with open(path, "wb") as f:
            f.write(body)
        request = DeliveryRequest(queue_id=new_queue_id(), mode="forward", rule_pattern="*",
                                  mail_from=mail_from, recipients=recipients, route=route,
                                  body_path=path, correlation_id=new_correlation_id(),
                                  size=len(body), dkim=dkim)
        return self.queue.enqueue([request])

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
