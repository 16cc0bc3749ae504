"""Helpers of the API tests: a running router with a token, an HTTP client, a queue stand-in."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Optional

import treq
from twisted.internet import defer

from dcrouter.message import DeliveryRequest, Destination, Route, new_correlation_id, new_queue_id
from dcrouter.router import DcRouter
from tests.support.configs import default_config_with_free_ports
from tests.support.router import options_from, start_router

TOKEN = "s3cret-token-for-tests"


@dataclasses.dataclass
class StandInItem:
    """A queue item of :class:`InMemoryQueue`."""

    id: str
    mail_from: str
    recipients: list[str]
    size: int
    status: str = "deferred"
    attempts: int = 1
    created_at: float = dataclasses.field(default_factory=time.time)
    next_attempt: float = 0.0
    last_error: str = "451 4.3.0 try later"

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as the real queue's items give."""
        return dataclasses.asdict(self)


class InMemoryQueue:
    """A small real queue for the API tests while the project's queue is a placeholder.

    Implements the queue's management contract: list_items (with a cursor),
    get_item, retry_now, retry_all, delete, pause, resume, flush, get_stats.
    """

    def __init__(self) -> None:
        self.items: dict[str, StandInItem] = {}
        self.paused = False
        self.flushes = 0

    def update_options(self, options: Any) -> None:
        """A reload hands the queue its options; the stand-in has none."""

    def add(self, item: StandInItem) -> None:
        """Put an item in."""
        self.items[item.id] = item

    def list_items(self, status: Optional[str] = None, limit: int = 100,
                   cursor: Optional[str] = None) -> tuple[list[StandInItem], Optional[str]]:
        """Items ordered by id, after ``cursor``; the next cursor when more remain."""
        ordered = [i for _, i in sorted(self.items.items())
                   if status is None or i.status == status]
        if cursor is not None:
            ordered = [i for i in ordered if i.id > cursor]
        page = ordered[:limit]
        return page, (page[-1].id if len(ordered) > limit else None)

    def get_item(self, item_id: str) -> Optional[StandInItem]:
        """One item or None."""
        return self.items.get(item_id)

    def retry_now(self, item_id: str) -> defer.Deferred:
        """Make an item due now (a Deferred, as a store-backed queue would)."""
        item = self.items.get(item_id)
        if item is None:
            return defer.fail(KeyError(item_id))
        if item.status not in ("deferred", "queued"):
            return defer.succeed(False)
        item.status = "queued"
        item.next_attempt = time.time()
        return defer.succeed(True)

    def retry_all(self) -> int:
        """Make every deferred item due now."""
        count = 0
        for item in self.items.values():
            if item.status == "deferred":
                item.status = "queued"
                count += 1
        return count

    def delete(self, item_id: str) -> bool:
        """Forget an item."""
        return self.items.pop(item_id, None) is not None

    def pause(self) -> None:
        """Stop delivering."""
        self.paused = True

    def resume(self) -> None:
        """Deliver again."""
        self.paused = False

    def flush(self) -> int:
        """Retry everything now."""
        self.flushes += 1
        return self.retry_all()

    def get_stats(self) -> dict[str, Any]:
        """Depth by status."""
        by_status: dict[str, int] = {}
        for item in self.items.values():
            by_status[item.status] = by_status.get(item.status, 0) + 1
        return {"size": len(self.items), "by_status": by_status, "paused": self.paused}


def router_config(state_dir: str, token: str = TOKEN, **api: Any) -> tuple[dict, dict]:
    """The default configuration on free ports with an API token."""
    data, ports = default_config_with_free_ports(state_dir)
    data["api"]["token"] = token
    data["api"].update(api)
    return data, ports


def start_api_router(state_dir: str, token: str = TOKEN, config_path: Optional[str] = None,
                     **api: Any) -> tuple[DcRouter, int]:
    """A started in-process router; returns (router, api port)."""
    data, ports = router_config(state_dir, token, **api)
    router = start_router(options_from(data, state_dir), config_path=config_path)
    return router, router.by_name["api"].listeners.port_for("api.port")


@dataclasses.dataclass
class Response:
    """What :class:`Client` returns."""

    status: int
    headers: Any
    text: str

    def json(self) -> Any:
        """The body parsed."""
        return json.loads(self.text)

    def header(self, name: str) -> Optional[str]:
        """A response header."""
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


class Client:
    """A treq client for one router's API."""

    def __init__(self, port: int, token: Optional[str] = TOKEN) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.token = token

    async def request(self, method: str, path: str, body: Any = None,
                      token: Any = "default", raw: Optional[bytes] = None,
                      headers: Optional[dict[str, str]] = None) -> Response:
        """One request; ``token=None`` sends no Authorization header."""
        token = self.token if token == "default" else token
        all_headers = dict(headers or {})
        if token:
            all_headers["Authorization"] = f"Bearer {token}"
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        response = await treq.request(method, self.base + path, data=data,
                                      headers={k: [v] for k, v in all_headers.items()},
                                      persistent=False)
        text = await treq.text_content(response, encoding="utf-8")
        return Response(response.code, response.headers, text)

    async def get(self, path: str, **kwargs: Any) -> Response:
        """GET."""
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, body: Any = None, **kwargs: Any) -> Response:
        """POST."""
        return await self.request("POST", path, body=body, **kwargs)

    async def put(self, path: str, body: Any = None, **kwargs: Any) -> Response:
        """PUT."""
        return await self.request("PUT", path, body=body, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> Response:
        """DELETE."""
        return await self.request("DELETE", path, **kwargs)


def assert_error(response: Response, status: int, code: str) -> dict:
    """The response is the API's JSON error with this status and code; returns the error."""
    assert response.status == status, (response.status, response.text)
    assert response.header("Content-Type") == "application/json"
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"], body
    assert "Traceback" not in response.text
    return body["error"]


#: A loopback port nothing listens on (port 9, "discard", is not served here).
UNREACHABLE_PORT = 9


async def hold_items(router: DcRouter, recipients: list[str], size: int = 0) -> list[str]:
    """Pause the router's real queue and enqueue one forward item per recipient.

    The queue stays paused, so the items wait as ``pending`` for the test to
    inspect, retry or delete; returns their ids in the order given.
    """
    queue = router.email.queue
    queue.pause()
    spool = os.path.join(router.options.router.state_dir, "spool")
    os.makedirs(spool, exist_ok=True)
    path = os.path.join(spool, new_queue_id() + ".eml")
    body = b"Subject: held\r\nFrom: sender@localhost\r\n\r\n" + b"x" * size + b"\r\n"
    with open(path, "wb") as f:
        f.write(body)
    requests = [DeliveryRequest(new_queue_id(), "forward", "*@hold.test", "sender@localhost",
                                [rcpt], Destination.to(Route("forward", server="127.0.0.1",
                                                             port=UNREACHABLE_PORT)),
                                path, new_correlation_id(), size=len(body))
                for rcpt in recipients]
    return list(await queue.enqueue(requests))
