"""Text output of ``dcrouterctl``: tables, durations, flattened figures, ``postqueue -p``.

Kept apart from :mod:`dcrouter.api.ctl` (the client and the commands), which
re-exports these names.
"""

from __future__ import annotations

import time
from typing import Any, Sequence


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain left-aligned text table."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value) or "-"
    return str(value)


def duration(seconds: float) -> str:
    """``3d 4h``, ``5m 2s``..."""
    seconds = int(seconds or 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Dotted keys of nested dicts with their leaf values."""
    if isinstance(data, dict):
        out: list[tuple[str, Any]] = []
        for key, value in data.items():
            out.extend(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        return [row for i, value in enumerate(data) for row in flatten(value, f"{prefix}[{i}]")]
    return [(prefix, "-" if data == "" else data)]


def _first(item: dict, *keys: str, default: Any = None) -> Any:
    for key in keys:
        if item.get(key) not in (None, ""):
            return item[key]
    return default


def _recipients(item: dict) -> list[str]:
    raw = _first(item, "recipients", "rcpt_to", "to", default=[])
    if isinstance(raw, str):
        return [raw]
    out = []
    for r in raw:
        out.append(str(r.get("address") or r.get("recipient") or r) if isinstance(r, dict)
                   else str(r))
    return out


def _arrival(item: dict) -> str:
    value = _first(item, "created_at", "arrival_time", "enqueued_at", "received_at", "created")
    if isinstance(value, (int, float)):
        return time.strftime("%a %b %d %H:%M:%S", time.localtime(value))
    return str(value or "")


def format_queue(items: list[dict]) -> str:
    """``postqueue -p`` style: id (``*`` active, ``!`` held), size, arrival, sender, reason,
    recipients, then a total line."""
    if not items:
        return "Mail queue is empty"
    lines = ["-Queue ID-            --Size-- ----Arrival Time---- -Sender/Recipient-------"]
    total = 0
    for item in items:
        status = str(item.get("status", ""))
        mark = "*" if status in ("active", "processing", "delivering", "leased", "in_flight") else \
            "!" if status in ("held", "hold", "paused") else " "
        size = int(_first(item, "size", "message_size", default=0) or 0)
        total += size
        queue_id = str(_first(item, "id", "queue_id", default="?"))
        sender = _first(item, "mail_from", "sender", default="") or "MAILER-DAEMON"
        lines.append(f"{queue_id + mark:<21} {size:>8} {_arrival(item):<20} {sender}")
        error = _first(item, "last_error", "error", "reason")
        if error:
            lines.append(f"{'':<31}({error})")
        for recipient in _recipients(item):
            lines.append(f"{'':<51}{recipient}")
        lines.append("")
    kbytes = (total + 1023) // 1024
    noun = "Request" if len(items) == 1 else "Requests"
    lines.append(f"-- {kbytes} Kbytes in {len(items)} {noun}.")
    return "\n".join(lines)
