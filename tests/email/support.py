"""Helpers for the processor tests: a recording queue, sessions, spool files, messages."""

from __future__ import annotations

import base64
import os
import shutil
from typing import Any, Optional

from twisted.internet import defer, reactor

from dcrouter.email.processor import MultiModeProcessor
from dcrouter.email.routing import DomainRouter
from dcrouter.errors import QueueFullError
from dcrouter.message import DeliveryRequest, ReceivedMessage, SessionInfo, new_queue_id
from dcrouter.service import Extensions, RouterContext
from tests.support.router import options_from


class RecordingQueue:
    """A real, tiny queue: copies each body into its own directory and records the requests."""

    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.requests: list[DeliveryRequest] = []
        self.bodies: dict[str, bytes] = {}
        self.full_destinations: set[str] = set()
        self.full = False
        self.checked: list[list[str]] = []

    def check_capacity(self, destinations: list[str]) -> None:
        self.checked.append(list(destinations))
        if self.full or any(d in self.full_destinations for d in destinations):
            raise QueueFullError("queue full", destinations=destinations)

    def enqueue(self, requests: list[DeliveryRequest]) -> defer.Deferred:
        if self.full:
            return defer.fail(QueueFullError("queue full"))
        for r in requests:
            with open(r.body_path, "rb") as f:
                self.bodies[r.queue_id] = f.read()
            self.requests.append(r)
        for n, path in enumerate(dict.fromkeys(r.body_path for r in requests)):
            # take the bodies over, as the real queue does (shared ones once)
            shutil.move(path, os.path.join(self.root, f"{requests[0].queue_id}.body{n}"))
        return defer.succeed([r.queue_id for r in requests])

    def body(self, request: DeliveryRequest) -> bytes:
        return self.bodies[request.queue_id]


class Suppression:
    """A suppression list of fixed addresses."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = {a.lower() for a in addresses}

    def is_suppressed(self, address: str) -> bool:
        return address.lower() in self.addresses


def make_processor(tmp: str, email: dict[str, Any], *, extensions: Optional[Extensions] = None,
                   suppression: Any = None) -> tuple[MultiModeProcessor, RecordingQueue]:
    """A processor over a RecordingQueue for the ``[email]`` table ``email``."""
    options = options_from({"email": email}, tmp)
    assert options.email is not None
    context = RouterContext(options, reactor, extensions or Extensions())
    queue = RecordingQueue(os.path.join(tmp, "queue"))
    router = DomainRouter.from_options(options.email)
    return MultiModeProcessor(options.email, router, queue, context, suppression), queue


def session(client_ip: str = "192.0.2.10", *, relay: bool = False, user: str = "",
            helo: str = "client.example") -> SessionInfo:
    """A session as the server would fill it."""
    from dcrouter.message import new_correlation_id
    return SessionInfo(correlation_id=new_correlation_id(), client_ip=client_ip,
                       client_port=40000, local_port=25, helo=helo, relay_permitted=relay,
                       auth_user=user)


def spool(tmp: str, data: bytes, mail_from: str, recipients: list[str],
          sess: Optional[SessionInfo] = None) -> ReceivedMessage:
    """Write ``data`` as a spool file and describe it as the server would."""
    qid = new_queue_id()
    folder = os.path.join(tmp, "spool")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, qid)
    received = b"Received: from client.example ([192.0.2.10]) by mx.test with ESMTP id " + \
        qid.encode() + b"\r\n"
    with open(path, "wb") as f:
        f.write(received + data)
    return ReceivedMessage(queue_id=qid, mail_from=mail_from, recipients=list(recipients),
                           spool_path=path, size=len(received) + len(data),
                           session=sess or session(relay=True))


@defer.inlineCallbacks
def transaction(processor: MultiModeProcessor, tmp: str, data: bytes, mail_from: str,
                recipients: list[str], sess: Optional[SessionInfo] = None) -> Any:
    """MAIL, every RCPT, then the message - as the server drives the processor."""
    sess = sess or session(relay=True)
    yield defer.maybeDeferred(processor.check_sender, sess, mail_from)
    for rcpt in recipients:
        yield defer.maybeDeferred(processor.check_recipient, sess, mail_from, rcpt)
    msg = spool(tmp, data, mail_from, recipients, sess)
    ids = yield processor.handle_message(msg)
    return ids


def simple_message(subject: str = "Hello", body: str = "Just a friendly note.\r\n",
                   sender: str = "alice@sender.test", extra: str = "") -> bytes:
    return (f"From: Alice <{sender}>\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
            f"Date: Wed, 25 Nov 2026 09:00:00 +0000\r\nMessage-ID: <m1@sender.test>\r\n"
            f"{extra}MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"{body}").encode()


def multipart(parts: list[tuple[str, str, bytes]], subject: str = "Files",
              boundary: str = "BOUNDARY1") -> bytes:
    """multipart/mixed with a text part then ``(content-type line, disposition line, body)``."""
    out = [f"From: alice@sender.test\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
           f"Date: Wed, 25 Nov 2026 09:00:00 +0000\r\nMessage-ID: <m2@sender.test>\r\n"
           f"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"{boundary}\"\r\n"
           f"\r\n--{boundary}\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n".encode()]
    for ctype, disposition, body in parts:
        out.append(f"--{boundary}\r\n{ctype}\r\n{disposition}\r\n"
                   f"Content-Transfer-Encoding: base64\r\n\r\n".encode())
        out.append(base64.encodebytes(body).replace(b"\n", b"\r\n"))
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


def transport_of(processor: MultiModeProcessor, request: Any) -> Any:
    """The transport the delivery system resolves a queued request to, with the processor's
    rules (the first recipient's; the request itself holds only a reference)."""
    from dcrouter.delivery.transport import TransportResolver
    resolver = TransportResolver(processor.options, processor.domain_router,
                                 processor.context.state_dir)
    return resolver.resolve(request, request.recipients)[0].transport
