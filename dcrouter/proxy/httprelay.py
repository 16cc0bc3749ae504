"""Per-request HTTP/1.1 relaying (HAProxy's keep-alive mode) for HTTP routes.

One :class:`HttpRelay` serves one client connection on a plain HTTP port, or
the plain side of a terminated TLS connection whose route adds forwarded
headers.  Each request head read by :class:`~dcrouter.proxy.httpstream.RequestFramer`
is routed on its own (``Host`` and path; a terminated connection keeps the
route its SNI chose) and re-rendered with ``X-Forwarded-For``/``-Proto`` when
its route asks, so a forged header on a later request never reaches a
backend unchanged.

A request for the route of the current backend connection goes out on it at
once (pipelining allowed; the methods wait in a FIFO that frames the
responses).  A request for another route, or one the proxy answers itself
(404, redirect, ACME, 400), waits until every outstanding response of the
current backend is complete; then the old connection is closed and its
admission ticket released, and the new route is admitted
(:mod:`dcrouter.proxy.limits`) and connected.

Bodies are never collected: client and backend transports are registered
as each other's producers (as in :mod:`dcrouter.proxy.tunnel`), and while a
request waits the client is paused.  ``101 Switching Protocols`` turns the
connection into a plain bidirectional tunnel.  A response the proxy cannot
frame closes both sides (logged, counted as ``bad_response``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.python.failure import Failure

from dcrouter.logsetup import get_logger
from dcrouter.proxy import http as httpmod
from dcrouter.proxy import httptimers
from dcrouter.proxy.httpio import write_now
from dcrouter.proxy.httplink import BackendLink
from dcrouter.proxy.httpchecks import (MISDIRECTED, REQUEST_TIMEOUT, ROUTE_ERRORS, misdirected,
                                       request_timeouts)
from dcrouter.proxy.httpstream import (BODY, COMPLETE, DATA, END, HEAD, UPGRADE, FramingError,
                                       RequestFramer, wants_close)
from dcrouter.proxy.routes import Route
from dcrouter.proxy.stats import RouteStats
from dcrouter.proxy.tunnel import close_write, forget_paused_producer
from dcrouter.proxy.httptimers import RequestTimers

if TYPE_CHECKING:  # pragma: no cover
    from dcrouter.proxy.balancer import Target
    from dcrouter.proxy.frontend import Connection
    from dcrouter.proxy.limits import IPAddress

log = get_logger("proxy.http")

BAD_REQUEST = httpmod.response(400, "Bad Request", b"bad request\n")
BAD_GATEWAY = httpmod.response(502, "Bad Gateway", b"no target reachable\n")
NOT_FOUND = httpmod.response(404, "Not Found", b"no route\n")
#: Seconds a connection we closed may take to go away before it is aborted.
CLOSE_GRACE = 5.0


class HttpRelay:
    """Relays one client connection request by request (see the module docstring)."""

    def __init__(self, core: Any, client: Any, proto: str, port: int, client_ip: "IPAddress",
                 client_addr: tuple[str, int], local_addr: tuple[str, int],
                 admit: Callable[[Route], Optional["Connection"]],
                 on_first_head: Callable[[], None],
                 fixed: Optional["Connection"] = None) -> None:
        self.core = core
        self.client = client
        self.proto = proto
        self.port = port
        self.client_ip = client_ip
        self.client_addr = client_addr
        self.local_addr = local_addr
        self.admit = admit
        self.on_first_head = on_first_head
        self.fixed = fixed
        self.framer = RequestFramer()
        self.link: Optional[BackendLink] = None
        self.last_stats: Optional[RouteStats] = fixed.stats if fixed is not None else None
        self.pending_head: Optional[httpmod.RequestHead] = None
        self.pending_reply: Optional[tuple[str, bytes]] = None
        self.blocked = False
        self.barrier = False
        self.upgraded = False
        self.closing = False
        self.close_after = False        # the client's last request said Connection: close
        self.client_open = True
        self.client_eof = False
        self.first = True
        self.idle_timeout = fixed.route.options.connection_timeout if fixed is not None else 0.0
        self.last_activity = core.reactor.seconds()
        self._idle_call: Any = None
        self._close_call: Any = None
        self.last_route: Optional[Route] = fixed.route if fixed is not None else None
        self.timers = RequestTimers(core.reactor, self._head_timed_out, self._keep_alive_ended)
        self._timeouts_for: Any = None
        self._timeouts = (0.0, 0.0)
        if fixed is not None:
            self._arm_idle()

    # -- client side -------------------------------------------------------------
    def client_data(self, data: bytes) -> None:
        """Bytes from the client."""
        if self.closing:
            return
        self.last_activity = self.core.reactor.seconds()
        if self.upgraded:
            if self.link is not None and not self.link.ended:
                self.link.write(data)
            return
        self.framer.feed(data)
        self._pump()

    def _pump(self) -> None:
        self._pump_events()
        self._update_timers()

    def _pump_events(self) -> None:
        while not self.blocked and not self.closing and not self.upgraded:
            try:
                event = self.framer.next_event()
            except FramingError as e:
                self._bad_request(str(e))
                return
            if event is None:
                break
            kind, value = event
            if kind == HEAD:
                assert isinstance(value, httpmod.RequestHead)
                if self.close_after:            # requests after "Connection: close"
                    self.framer.take_buffer()
                    break
                self._on_head(value)
            elif kind == BODY:
                assert isinstance(value, bytes)
                if self.link is not None:
                    self.link.write(value)
            elif kind == END and self.barrier and self.link is not None and self.link.busy:
                self._block()
        self._maybe_finish()

    def _on_head(self, head: httpmod.RequestHead) -> None:
        if self.first:
            self.first = False
            self.on_first_head()
        route = self._route_for(head)
        if route is None:
            return
        link = self.link
        if link is not None and link.route is route and not link.ended:
            self._send_head(head)
            return
        if link is not None and link.busy:
            self.pending_head = head            # switch once its responses are complete
            self._block()
            return
        self._switch(head, route)

    def _route_for(self, head: httpmod.RequestHead) -> Optional[Route]:
        """The route of ``head``; None after arranging a local answer (404, ACME...)."""
        if self.fixed is not None:
            if misdirected(head, self.core.table, self.port, self.client_ip, self.fixed.route):
                self._answer_locally("misdirected", MISDIRECTED)
                return None
            return self.fixed.route
        token = httpmod.acme_token(head.path)
        if token is not None:
            answer = self.core.acme_answer(token)
            if answer is not None:
                self._answer_locally("", httpmod.response(200, "OK", answer.encode("ascii")))
                return None
        route = self.core.table.match(self.port, head.host, self.client_ip, head.path)
        if route is None:
            self._answer_locally("no_route", NOT_FOUND)
            return None
        if route.options.redirect_to_https:
            if self.link is not None and self.link.busy:
                self.pending_head = head
                self._block()
                return None
            self._drop_link()
            connection = self.admit(route)          # refused clients are closed by admit
            if connection is None:
                self.closing = True
                return None
            connection.release()
            self._reply_and_close(httpmod.redirect_to_https(head))
            return None
        return route

    def _answer_locally(self, kind: str, reply: bytes) -> None:
        """Answer and close, after the outstanding responses of the current backend."""
        if kind in ROUTE_ERRORS and self.last_stats is not None:
            self.last_stats.error(kind)
        elif kind:
            self.core.count_unrouted(kind)
        if self.link is not None and self.link.busy:
            self.pending_reply = (kind, reply)
            self._block()
            return
        self._reply_and_close(reply)

    def _bad_request(self, reason: str) -> None:
        log.debug("bad request from {client}: {reason}", client=self.client_addr[0],
                  reason=reason)
        link = self.link
        if self.framer.in_message:
            # the error is inside a body already partly sent: nothing clean can follow
            if link is not None:
                link.stats.error("bad_http")
            self._close_all()
            return
        self._answer_locally("bad_http", BAD_REQUEST)

    def _send_head(self, head: httpmod.RequestHead) -> None:
        link = self.link
        assert link is not None
        if link.route.options.add_forwarded_headers:
            raw = httpmod.render_head(head, self.client_addr[0], self.proto)
        else:
            raw = httpmod.render_head(head)
        link.methods.append(head.method)
        link.sent += 1
        link.stats.requests += 1
        close = not head.keep_alive if head.keep_alive is not None \
            else wants_close(head.version, head.headers)
        if close:
            self.close_after = True
            link.last_request = link.sent
        upgrade = head.upgrade if head.upgrade is not None else head.header("upgrade") is not None
        if head.method == "CONNECT" or upgrade:
            self.barrier = True                 # no HTTP parsing until its answer
        link.write(raw)

    def _switch(self, head: httpmod.RequestHead, route: Route) -> None:
        self._drop_link()
        connection = self.fixed if self.fixed is not None else self.admit(route)
        if connection is None:
            self.closing = True                 # admit refused and closed the client
            return
        link = BackendLink(self, connection, owned=self.fixed is None)
        self.link = link
        self.last_stats = link.stats
        self.last_route = route
        self.idle_timeout = route.options.connection_timeout
        self._arm_idle()
        self._send_head(head)
        self._block()
        d = connection.connect(link, self.client_addr, self.local_addr)
        d.addCallbacks(lambda result: self._connected(link, *result),
                       lambda failure: self._connect_failed(link, failure))

    def _connected(self, link: BackendLink, target: "Target", protocol: Any) -> None:
        if link is not self.link or not self.client_open or self.closing:
            protocol.transport.loseConnection()
            return
        link.connection.use_target(target)
        link.connecting = False
        link.transport = protocol.transport
        data = b"".join(link.pending)
        link.pending = []
        if data:
            link.transport.write(data)
        link.transport.registerProducer(self.client, True)
        forget_paused_producer(self.client)
        self.client.registerProducer(link.transport, True)
        self._unblock()

    def _connect_failed(self, link: BackendLink, failure: Failure) -> None:
        link.stats.error("connect")
        log.warn("route {route}: no target reachable: {error}", route=link.route.key,
                 error=failure.getErrorMessage())
        link.ended = True
        if link is self.link:
            self._reply_and_close(BAD_GATEWAY)

    def _drop_link(self) -> None:
        """Close the current backend connection (it is idle) and release its route."""
        link, self.link = self.link, None
        if link is None:
            return
        link.ended = True
        if link.transport is not None:
            self.client.unregisterProducer()
            link.transport.unregisterProducer()
            link.transport.loseConnection()
        if link.owned:
            link.connection.release()

    # -- flow of waiting -----------------------------------------------------------
    def _block(self) -> None:
        if not self.blocked:
            self.blocked = True
            self.client.pauseProducing()

    def _unblock(self) -> None:
        """The current backend is connected and idle enough: continue with the client."""
        if not self.blocked or self.closing:
            return
        link = self.link
        if link is not None and link.connecting:
            return
        if link is not None and link.busy and (
                self.pending_head is not None or self.pending_reply is not None
                or (self.barrier and not self.framer.in_message)):
            return
        self.blocked = False
        if link is None or not link.busy:
            self.barrier = False
        self.client.resumeProducing()
        if self.pending_reply is not None:
            reply = self.pending_reply[1]
            self.pending_reply = None
            self._reply_and_close(reply)
            return
        if self.pending_head is not None:
            head, self.pending_head = self.pending_head, None
            self._on_head(head)
        self._pump()

    # -- backend side ----------------------------------------------------------------
    def backend_data(self, link: BackendLink, data: bytes) -> None:
        """Bytes from a backend: relayed as framed; completes responses."""
        if link is not self.link or not self.client_open:
            return
        self.last_activity = self.core.reactor.seconds()
        if self.upgraded:
            link.stats.bytes_out += len(data)
            write_now(self.client, data)
            return
        out: list[bytes] = []                   # one write for what this read completes
        for kind, raw in link.framer.feed(data):
            if kind == DATA:
                out.append(raw)
                continue
            if out:
                self._to_client(link, out)
                out = []
            if kind == UPGRADE:
                self._upgrade(link)
            elif kind == COMPLETE:
                link.answered += 1
                if raw == b"close" or link.answered == link.last_request:
                    self._close_all()           # after relaying it, as announced
                    return
        if out:
            self._to_client(link, out)
        if link.framer.error:
            link.stats.error("bad_response")
            log.warn("route {route}: unparseable response: {error}", route=link.route.key,
                     error=link.framer.error)
            self._close_all()
            return
        if self.blocked and not link.busy:
            self._unblock()
        self._maybe_finish()
        self._update_timers()

    def _to_client(self, link: BackendLink, pieces: list[bytes]) -> None:
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        link.stats.bytes_out += len(data)
        write_now(self.client, data)

    def _upgrade(self, link: BackendLink) -> None:
        """101 / CONNECT answered: from now on bytes pass both ways unparsed."""
        self.upgraded = True
        self.barrier = False
        leftover = self.framer.take_buffer()
        if leftover:
            link.write(leftover)
        if self.blocked:
            self.blocked = False
            self.client.resumeProducing()
        if self.client_eof:
            close_write(link.transport)

    def backend_eof(self, link: BackendLink) -> None:
        """A backend half-closed: pass it on in tunnel mode, else end its connection."""
        if link is not self.link:
            return
        if self.upgraded:
            link.eof = True
            if self.client_open:
                close_write(self.client)
            if self.client_eof:
                self._close_all()
            return
        if link.transport is not None:
            link.transport.loseConnection()
        self.backend_gone(link)

    def backend_gone(self, link: BackendLink) -> None:
        """A backend connection ended (EOF or lost)."""
        if link.ended:
            return
        link.ended = True
        if link is not self.link:
            return
        if self.upgraded:
            self._close_all()
            return
        close_delimited = link.framer.close_delimited
        clean = link.framer.backend_closed()
        if link.connecting or not clean or self.framer.in_message:
            if not clean:
                link.stats.error("backend_closed")
            self._close_all()               # a cut response, or a request it did not take
            return
        # idle: a close-delimited response ended, or the backend ended keep-alive
        self.client.unregisterProducer()
        self.link = None
        if link.owned:
            link.connection.release()
        if close_delimited or link.framer.close_after or self.close_after:
            self._close_client()            # the client learns the end by our close
            return
        if self.blocked:
            self._unblock()
        self._maybe_finish()
        self._update_timers()

    # -- ending --------------------------------------------------------------------
    def client_read_closed(self) -> None:
        """The client sent EOF."""
        self.client_eof = True
        if self.upgraded:
            if self.link is not None and self.link.transport is not None:
                close_write(self.link.transport)
                if self.link.eof:
                    self._close_all()
            return
        if self.framer.in_message and not self.blocked:
            self._close_all()                   # a request cut short can never be answered
            return
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        """After the client's EOF, close once nothing is outstanding."""
        if not self.client_eof or self.closing or self.upgraded or self.blocked:
            return
        if self.link is not None and self.link.busy:
            return
        self._close_all()

    def _reply_and_close(self, reply: bytes) -> None:
        self._drop_link()
        self.closing = True
        if self.client_open:
            self.client.write(reply)
            self.client.loseConnection()
            self._bound_close()

    def _close_client(self) -> None:
        self.closing = True
        if self.client_open:
            self.client.loseConnection()
            self._bound_close()

    def _bound_close(self) -> None:
        """After our close: read again (a paused transport never notices the client's close,
        and what it sends is now dropped), and abort if the client is still there after
        :data:`CLOSE_GRACE` seconds (TLS waits for the client's close_notify)."""
        if self.blocked:
            self.blocked = False
            self.client.resumeProducing()
        if self._close_call is None:
            self._close_call = self.core.reactor.callLater(CLOSE_GRACE, self.abort)

    def _close_all(self) -> None:
        self.closing = True
        link = self.link
        if link is not None and not link.ended:
            link.ended = True               # its close is ours, not news
            if link.transport is not None:
                link.transport.loseConnection()
        if self.client_open:
            self.client.loseConnection()
            self._bound_close()

    def client_lost(self) -> None:
        """The client connection is gone: close the backend, release everything."""
        self.client_open = False
        self.closing = True
        self._cancel_idle()
        self.timers.cancel()
        if self._close_call is not None and self._close_call.active():
            self._close_call.cancel()
        self._close_call = None
        link, self.link = self.link, None
        if link is not None:
            if link.transport is not None and not link.ended:
                link.transport.loseConnection()
            link.ended = True
            if link.owned:
                link.connection.release()
        if self.fixed is not None:
            self.fixed.release()

    def abort(self) -> None:
        """Close both sides now (shutdown deadline, idle timeout)."""
        self.timers.cancel()
        link = self.link
        for transport in (self.client, link.transport if link is not None else None):
            if transport is not None:
                abort = getattr(transport, "abortConnection", None)
                (abort or transport.loseConnection)()

    # -- per-request timeouts (dcrouter.proxy.httptimers) -------------------------------
    def _waiting_for(self) -> str:
        """Which wait the connection is in: a request head, the next request, or neither."""
        if self.closing or self.upgraded or not self.client_open or self.blocked \
                or self.framer.in_message:
            return httptimers.NONE
        if self.link is not None and self.link.busy:
            # a response is due: a next head the client pipelined waits its turn, and its
            # http_request_timeout starts when it is the current request (as HAProxy's)
            return httptimers.NONE
        if self.framer.buffer:
            return httptimers.HEAD
        if self.first:
            return httptimers.NONE          # the first wait is initial_data_timeout's
        return httptimers.IDLE

    def _update_timers(self) -> None:
        key = (self.core.table, self.last_route)
        if key != self._timeouts_for:           # the table is swapped whole on reload
            self._timeouts_for = key
            self._timeouts = request_timeouts(self.core.table, self.port, self.last_route)
        self.timers.enter(self._waiting_for(), *self._timeouts)

    def _head_timed_out(self) -> None:
        """``http_request_timeout``: the head did not complete; 408 and close."""
        if self._waiting_for() != httptimers.HEAD:
            return
        log.debug("request head from {client} timed out", client=self.client_addr[0])
        self.framer.take_buffer()
        self._answer_locally("request_timeout", REQUEST_TIMEOUT)

    def _keep_alive_ended(self) -> None:
        """``http_keep_alive_timeout``: no next request; close both sides."""
        if self._waiting_for() == httptimers.IDLE:
            self._close_all()

    # -- idle timeout ------------------------------------------------------------------
    def _arm_idle(self) -> None:
        if self._idle_call is None and self.idle_timeout > 0:
            self._idle_call = self.core.reactor.callLater(self.idle_timeout, self._check_idle)

    def _cancel_idle(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def _check_idle(self) -> None:
        self._idle_call = None
        if not self.client_open:
            return
        idle = self.core.reactor.seconds() - self.last_activity
        if idle >= self.idle_timeout:
            if self.last_stats is not None:
                self.last_stats.error("idle_timeout")
            self.abort()
            return
        self._idle_call = self.core.reactor.callLater(self.idle_timeout - idle, self._check_idle)
