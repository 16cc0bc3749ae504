"""Connection caps of the SMTP server: concurrent sessions in total and per client IP.

As Postfix's anvil does (``smtpd_client_connection_count_limit`` with
``smtpd_client_event_limit_exceptions = $mynetworks``), the per-IP cap does not
apply to the clients in :class:`LimitExceptions` - by default ``relay_networks``,
the MTAs and applications that relay through dcrouter and open many sessions
on purpose - while the total cap (``max_connections``) applies to everyone.

A slot is held from the moment a session is admitted until it is released, once:
when the connection is gone, or earlier when the cap is reached and a session
of that address turns out to be finished already (it answered QUIT, or its
client closed and the end of stream waits unread - see
:attr:`ConnectionTracker.reclaim`). So a client that opens and
closes sessions one after the other never sees its own closed sessions counted.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Hashable, Iterable, Optional


def _address(ip: str) -> Optional[Any]:
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class LimitExceptions:
    """Client networks exempt from the per-IP connection and message rate limits."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]

    def covers(self, ip: str) -> bool:
        """Is ``ip`` (IPv4-mapped IPv6 as IPv4) inside one of the networks?"""
        if not self.networks:
            return False
        address = _address(ip)
        return address is not None and any(address in n for n in self.networks)


#: Finds finished sessions of an address (None: of any address) and releases them.
Reclaim = Callable[[Optional[str]], int]


class ConnectionTracker:
    """Counts open sessions and admits new ones within the global and per-IP caps."""

    def __init__(self, max_total: int, max_per_ip: int,
                 exceptions: Optional[LimitExceptions] = None) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.exceptions = exceptions or LimitExceptions(())
        self.total = 0
        self.per_ip: dict[str, int] = {}
        #: Holders of a slot: key -> (ip, counted per IP).
        self._holders: dict[Hashable, tuple[str, bool]] = {}
        self._pending: Optional[tuple[str, bool]] = None
        #: Set by the server: releases finished sessions when a cap is reached.
        self.reclaim: Optional[Reclaim] = None

    def admit(self, ip: str) -> str:
        """Count a new session: '' when admitted, else 'global' or 'per_ip' (the cap hit).

        At a cap, :attr:`reclaim` first releases the slots of sessions that are
        over but not yet gone; the new session is refused only if that frees
        none. The slot is bound to its session by :meth:`bind` right after.
        """
        exempt = self.exceptions.covers(ip)
        reclaim = self.reclaim
        if self.total >= self.max_total and reclaim is not None:
            reclaim(None)
        if self.total >= self.max_total:
            return "global"
        if not exempt and self.per_ip.get(ip, 0) >= self.max_per_ip:
            if reclaim is not None:
                reclaim(ip)
            if self.per_ip.get(ip, 0) >= self.max_per_ip:
                return "per_ip"
        self.total += 1
        if not exempt:
            self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        self._pending = (ip, not exempt)
        return ""

    def bind(self, key: Hashable, ip: str) -> None:
        """The slot admitted last belongs to ``key`` (the session)."""
        pending, self._pending = self._pending, None
        if pending is None or pending[0] != ip:
            # admitted without admit() (never happens in the server): count it now
            exempt = self.exceptions.covers(ip)
            self.total += 1
            if not exempt:
                self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
            pending = (ip, not exempt)
        self._holders[key] = pending

    def holds(self, key: Hashable) -> bool:
        """Does ``key`` still hold a slot?"""
        return key in self._holders

    def release(self, key: Hashable) -> bool:
        """``key``'s session is over: free its slot (once; False when it held none)."""
        held = self._holders.pop(key, None)
        if held is None:
            return False
        ip, per_ip = held
        self.total -= 1
        if per_ip:
            left = self.per_ip.get(ip, 1) - 1
            if left > 0:
                self.per_ip[ip] = left
            else:
                self.per_ip.pop(ip, None)
        return True

    def reconfigure(self, max_total: int, max_per_ip: int,
                    exceptions: LimitExceptions) -> None:
        """New caps and exceptions; sessions already admitted keep their slots as counted."""
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.exceptions = exceptions


__all__ = ["ConnectionTracker", "LimitExceptions", "Reclaim"]
