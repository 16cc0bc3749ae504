"""Checks of relayed HTTP requests that depend on the route table, and the answers they give.

* :func:`misdirected` - on a terminated TLS connection the route was chosen
  by SNI; a request whose ``Host`` selects another route of the port (or no
  route at all) is answered ``421 Misdirected Request`` (RFC 9110 15.5.20),
  as nginx and HAProxy (``strict-sni``) do, so a client cannot reach one
  name's backend - around its ``allowed_ips`` - through another name's TLS
  connection.  A request without ``Host`` (HTTP/1.0) stays on the SNI's route.
* :func:`request_timeouts` - the ``http_request_timeout`` and
  ``http_keep_alive_timeout`` that apply to a connection (see
  :mod:`dcrouter.proxy.httptimers`).

Target and ``Host`` syntax (absolute-form, authority-form) is checked while
the head is parsed, by :func:`dcrouter.proxy.http.normalize_request_target`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from dcrouter.proxy import http as httpmod

if TYPE_CHECKING:  # pragma: no cover
    from dcrouter.proxy.routes import Route, RouteTable

MISDIRECTED = httpmod.response(421, "Misdirected Request",
                               b"this connection's TLS name does not serve that Host\n")
REQUEST_TIMEOUT = httpmod.response(408, "Request Timeout", b"request head timed out\n")

#: Local answers counted in the errors of the connection's route (else as unrouted).
ROUTE_ERRORS = frozenset({"bad_http", "misdirected", "request_timeout"})

#: When a port has no route (it cannot happen for a listener, but stay defined).
DEFAULT_TIMEOUT = 10.0


def misdirected(head: httpmod.RequestHead, table: "RouteTable", port: int, client_ip: Any,
                route: "Route") -> bool:
    """Whether ``head`` asks, by ``Host``, for another route than ``route`` (the SNI's)."""
    host = head.host
    if host is None:
        return False
    chosen = table.match(port, host, client_ip)
    return chosen is None or chosen.key != route.key


def request_timeouts(table: "RouteTable", port: int,
                     route: Optional["Route"]) -> tuple[float, float]:
    """``(http_request_timeout, http_keep_alive_timeout)`` for a connection on ``port``.

    A request head is read before it is routed, so on a plain port the
    smallest ``http_request_timeout`` of the port's routes applies (as the
    ``initial_data_timeout`` does); a terminated connection has its route.
    The keep-alive wait follows a response, so it is the last route's.
    """
    if route is not None and route.tls:
        return route.options.http_request_timeout, route.options.http_keep_alive_timeout
    routes = table.by_port.get(port, ())
    head = min((r.options.http_request_timeout for r in routes), default=DEFAULT_TIMEOUT)
    if route is not None:
        return head, route.options.http_keep_alive_timeout
    idle = min((r.options.http_keep_alive_timeout for r in routes), default=DEFAULT_TIMEOUT)
    return head, idle
