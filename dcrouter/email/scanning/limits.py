"""Budgets of the built-in content scan, after ClamAV's MaxScanSize/MaxFiles/MaxRecursion.

A :class:`Budget` is charged as the scan goes (every decoded or unpacked
chunk, every MIME part or archive member, every level of nesting) and
raises as soon as one limit is passed, so the work done on a hostile
message is bounded by the limits, never by what the message claims:

* :class:`LimitExceeded` - a size, count, depth or ratio limit was passed
  (ClamAV's ``Heuristics.Limits.Exceeded.*``): a verdict about the message.
* :class:`Unscannable` - the content cannot be read as what it says it is
  (a broken or overlapping ZIP): a verdict too.
* :class:`ScanTimeExceeded` - the deadline passed: not a verdict (the load
  of the machine decides it as much as the message), a scanner error.

A limit of 0 means "no limit" (as in clamd.conf), except ``max_recursion``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping

#: Unpacked bytes a member may have before the compression ratio is looked at
#: (small files of zeros compress by 1000:1 and are harmless).
RATIO_GRACE = 1024 * 1024


class ScanVerdict(Exception):
    """The content got a verdict without being fully read."""

    def __init__(self, signature: str, detail: str) -> None:
        super().__init__(f"{signature}: {detail}")
        self.signature = signature
        self.detail = detail


class LimitExceeded(ScanVerdict):
    """A scan limit was passed (``Heuristics.Limits.Exceeded.MaxScanSize`` ...)."""


class Unscannable(ScanVerdict):
    """The content is malformed in a way that hides what it holds (``Heuristics.Zip.*``)."""


class ScanTimeExceeded(Exception):
    """The scan ran past its deadline."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """The numbers a :class:`Budget` enforces (see ``[email.scan_limits]``)."""

    max_scan_size: int = 100 * 1024 * 1024
    max_file_size: int = 25 * 1024 * 1024
    max_files: int = 10000
    max_recursion: int = 16
    max_ratio: float = 100.0

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "Limits":
        """From a dict with (some of) the field names; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (what the parent sends to a scan worker)."""
        return dataclasses.asdict(self)


def limit_name(field: str) -> str:
    """``max_scan_size`` -> ``MaxScanSize`` (the clamd.conf spelling used in signatures)."""
    return "".join(word.capitalize() for word in field.split("_"))


class Budget:
    """What one scan may still spend; every ``charge_*`` raises when a limit is passed."""

    def __init__(self, limits: Limits, timeout: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self.deadline = clock() + timeout if timeout > 0 else 0.0
        self.bytes = 0
        self.files = 0
        self.depth = 0

    def exceeded(self, field: str, detail: str) -> LimitExceeded:
        """The LimitExceeded for limit ``field`` (``max_files``) with ``detail``."""
        return LimitExceeded("Heuristics.Limits.Exceeded." + limit_name(field), detail)

    def check_time(self) -> None:
        """Raise :class:`ScanTimeExceeded` once the deadline has passed."""
        if self.deadline and self.clock() > self.deadline:
            raise ScanTimeExceeded("content scan ran out of time")

    def charge_bytes(self, count: int, where: str) -> None:
        """``count`` more decoded or unpacked bytes (MaxScanSize), and a time check."""
        self.bytes += count
        limit = self.limits.max_scan_size
        if limit and self.bytes > limit:
            raise self.exceeded("max_scan_size", f"{where}: more than {limit} bytes to scan")
        self.check_time()

    def charge_file(self, where: str) -> None:
        """One more MIME part or archive member (MaxFiles)."""
        self.files += 1
        limit = self.limits.max_files
        if limit and self.files > limit:
            raise self.exceeded("max_files", f"{where}: more than {limit} parts and members")

    def files_left(self) -> int:
        """Members that may still be charged (a large number when unlimited)."""
        if not self.limits.max_files:
            return 1 << 62
        return max(0, self.limits.max_files - self.files)

    def enter(self, depth: int, where: str) -> None:
        """Nesting level ``depth`` reached (MaxRecursion: MIME, attached messages, archives)."""
        self.depth = max(self.depth, depth)
        if depth > self.limits.max_recursion:
            raise self.exceeded("max_recursion",
                                 f"{where}: nested deeper than {self.limits.max_recursion}")

    def check_file_size(self, size: int, where: str) -> None:
        """A member's (declared or actual) unpacked size (MaxFileSize)."""
        limit = self.limits.max_file_size
        if limit and size > limit:
            raise self.exceeded("max_file_size", f"{where}: {size} bytes unpacked, more "
                                 f"than {limit}")

    def check_ratio(self, unpacked: int, packed: int, where: str) -> None:
        """Unpacked / packed bytes of a member so far (the zip bomb signature)."""
        limit = self.limits.max_ratio
        if not limit or unpacked <= RATIO_GRACE:
            return
        if unpacked > limit * max(packed, 1):
            raise self.exceeded("max_ratio", f"{where}: compression ratio over {limit:g}:1 "
                                 f"({unpacked} bytes from {packed})")

    def summary(self) -> dict[str, int]:
        """What was spent (for the log and the report)."""
        return {"bytes": self.bytes, "files": self.files, "depth": self.depth}


__all__ = ["Budget", "LimitExceeded", "Limits", "RATIO_GRACE", "ScanTimeExceeded",
           "ScanVerdict", "Unscannable", "limit_name"]
