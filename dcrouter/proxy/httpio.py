"""Writes of the HTTP relays that skip a reactor round when the socket can take them.

Twisted's TCP transport queues every ``write`` and sends it on the next
reactor iteration, after registering the socket for writability (two
``epoll_ctl`` calls and a loop turn per write).  For a relay answering small
requests on kept-alive connections that is a large share of the work, so
:func:`write_now` sends at once with ``socket.send`` when nothing is queued
on the transport (as asyncio's transports do), and hands only what the
kernel did not take to ``transport.write``, which keeps its usual flow
control (a full buffer pauses the registered producer).

Only plain TCP transports qualify; TLS transports, transports with queued
bytes, closing ones and anything else get a plain ``transport.write``.
"""

from __future__ import annotations

from typing import Any, Union

from twisted.internet import tcp

_PLAIN = (tcp.Server, tcp.Client)


def write_now(transport: Any, data: Union[bytes, memoryview]) -> None:
    """Send ``data`` on ``transport``, at once when possible (see the module docstring)."""
    if type(transport) in _PLAIN and not transport.TLS and transport.connected \
            and not transport.disconnecting and not transport._tempDataLen \
            and transport.offset == len(transport.dataBuffer) \
            and not transport._writeDisconnected:
        try:
            sent = transport.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = 0                # the transport's own write finds and reports the error
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data if isinstance(data, bytes) else bytes(data))
