"""Connection caps of the SMTP server: concurrent sessions in total and per client IP."""

from __future__ import annotations


class ConnectionTracker:
    """Counts open sessions and admits new ones within the global and per-IP caps."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: dict[str, int] = {}

    def admit(self, ip: str) -> str:
        """Count a new session: '' when admitted, else 'global' or 'per_ip' (the cap hit)."""
        if self.total >= self.max_total:
            return "global"
        if self.per_ip.get(ip, 0) >= self.max_per_ip:
            return "per_ip"
        self.total += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return ""

    def release(self, ip: str) -> None:
        """A counted session ended."""
        self.total -= 1
        left = self.per_ip.get(ip, 1) - 1
        if left > 0:
            self.per_ip[ip] = left
        else:
            self.per_ip.pop(ip, None)
