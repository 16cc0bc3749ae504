"""The delivery queue endpoints: list, inspect, retry, delete, pause, resume, flush.

The queue (``context.services["email"].queue``) is reached duck-typed; its
methods may answer plainly or with Deferreds.  A missing method is a 503, an
unknown id a 404, an item in a state that forbids the operation a 409.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from dcrouter.api import errors
from dcrouter.api.types import ApiRequest, jsonable
from dcrouter.errors import QueueError
from dcrouter.logsetup import get_logger
from dcrouter.service import RouterContext

log = get_logger("api.queue")

MAX_QUEUE_PAGE = 1000


class QueueEndpoints:
    """``/api/queue`` and its item and action paths."""

    def __init__(self, context: RouterContext) -> None:
        self.context = context

    def _queue_call(self, method: str, *args: Any, **kwargs: Any) -> defer.Deferred:
        email = self.context.services.get("email")
        if email is None:
            raise errors.service_unavailable("the email service is not configured")
        queue = getattr(email, "queue", None)
        func = getattr(queue, method, None)
        if not callable(func):
            raise errors.service_unavailable(f"the delivery queue does not support {method}")
        d = defer.maybeDeferred(func, *args, **kwargs)
        d.addErrback(_queue_failure)
        return d

    @defer.inlineCallbacks
    def list_queue(self, request: ApiRequest) -> Any:
        """``?status=&limit=&cursor=`` -> ``{"items", "next_cursor"}``."""
        limit_text = request.arg("limit", "100")
        try:
            limit = int(limit_text or "100")
        except ValueError:
            raise errors.bad_request(f"limit must be an integer, got '{limit_text}'")
        if not 1 <= limit <= MAX_QUEUE_PAGE:
            raise errors.bad_request(f"limit must be 1..{MAX_QUEUE_PAGE}, got {limit}")
        status = request.arg("status") or None
        cursor = request.arg("cursor") or None
        try:
            result = yield self._queue_call("list_items", status=status, limit=limit,
                                            cursor=cursor)
        except errors.ApiError as e:
            if e.status == 409:  # the queue refused the query itself (an unknown status)
                raise errors.bad_request(e.message) from None
            raise
        if isinstance(result, tuple) and len(result) == 2:
            items, next_cursor = result
        else:
            items, next_cursor = result, None
        out = {"items": [jsonable(i) for i in items], "next_cursor": next_cursor,
               "count": len(items)}
        scope = self._scope()
        if scope is not None:
            out["scope"] = scope
        return out

    def _scope(self) -> Any:
        """With several worker processes and per-worker queue shards: what this API sees."""
        worker = self.context.worker
        email = self.context.services.get("email")
        store = getattr(getattr(email, "queue", None), "store", None)
        if worker is None or worker.count <= 1 or getattr(store, "shared", False):
            return None
        return {"worker": worker.index, "workers": worker.count,
                "note": f"worker {worker.index}'s queue shard only; the other "
                        f"{worker.count - 1} workers queue their own mail"}

    @defer.inlineCallbacks
    def get_item(self, request: ApiRequest) -> Any:
        """One item, or 404."""
        item_id = request.params["id"]
        item = yield self._queue_call("get_item", item_id)
        if item is None:
            raise errors.not_found(f"no queue item '{item_id}'")
        return {"item": jsonable(item)}

    @defer.inlineCallbacks
    def retry_item(self, request: ApiRequest) -> Any:
        """Make one item due now."""
        item_id = request.params["id"]
        done = yield self._queue_call("retry_now", item_id)
        if done is False:
            yield self._refuse_existing(item_id, "retried (only waiting items can be)")
        log.info("queue item {queue_id} retried through the API", queue_id=item_id,
                 client_ip=request.client_ip)
        return {"id": item_id, "retried": True}

    @defer.inlineCallbacks
    def _refuse_existing(self, item_id: str, verb: str) -> Any:
        """After the queue said no: 404 for an unknown id, 409 naming the item's status."""
        item = None
        try:
            item = yield self._queue_call("get_item", item_id)
        except errors.ApiError:
            item = None
        if item is None:
            raise errors.not_found(f"no queue item '{item_id}'")
        status = jsonable(item).get("status", "unknown") if hasattr(item, "to_dict") or \
            isinstance(item, dict) else getattr(item, "status", "unknown")
        raise errors.conflict(f"queue item '{item_id}' is {status} and cannot be {verb}")

    @defer.inlineCallbacks
    def retry_all(self, request: ApiRequest) -> Any:
        """Make every deferred item due now."""
        count = yield self._queue_call("retry_all")
        log.info("every queue item retried through the API", client_ip=request.client_ip)
        return {"retried": count if isinstance(count, int) else True}

    @defer.inlineCallbacks
    def delete_item(self, request: ApiRequest) -> Any:
        """Forget one item without a bounce."""
        item_id = request.params["id"]
        done = yield self._queue_call("delete", item_id)
        if done is False:
            yield self._refuse_existing(item_id, "deleted")
        log.info("queue item {queue_id} deleted through the API", queue_id=item_id,
                 client_ip=request.client_ip)
        return {"id": item_id, "deleted": True}

    @defer.inlineCallbacks
    def pause_queue(self, request: ApiRequest) -> Any:
        """Stop starting deliveries (items keep arriving)."""
        yield self._queue_call("pause")
        log.info("queue paused through the API", client_ip=request.client_ip)
        return {"paused": True}

    @defer.inlineCallbacks
    def resume_queue(self, request: ApiRequest) -> Any:
        """Start deliveries again."""
        yield self._queue_call("resume")
        log.info("queue resumed through the API", client_ip=request.client_ip)
        return {"paused": False}

    @defer.inlineCallbacks
    def flush_queue(self, request: ApiRequest) -> Any:
        """Attempt every deferred item now."""
        count = yield self._queue_call("flush")
        log.info("queue flushed through the API", client_ip=request.client_ip)
        return {"flushed": count if isinstance(count, int) else True}


def _queue_failure(failure: Any) -> Any:
    """Queue exceptions -> API errors (unknown id: 404, refused: 409)."""
    if failure.check(errors.ApiError):
        return failure
    if failure.check(KeyError, LookupError):
        value = failure.value
        text = value.args[0] if isinstance(value, KeyError) and value.args else str(value)
        raise errors.not_found(f"no queue item {text!r}" if isinstance(text, str)
                               else "no such queue item")
    if failure.check(QueueError):
        message = str(failure.value)
        if message.lower().startswith("unknown status"):
            raise errors.bad_request(message)
        if "not found" in message.lower() or "unknown" in message.lower() \
                or "no such" in message.lower():
            raise errors.not_found(message)
        raise errors.conflict(message)
    if failure.check(ValueError):
        raise errors.bad_request(str(failure.value))
    return failure
