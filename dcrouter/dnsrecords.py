"""Records other parts of dcrouter want the DNS server to publish.

A part that needs a record in a served zone (MTA-STS and TLS-RPT TXT records,
a verification TXT, ...) calls ``context.dns_records.set(source, records)``
with absolute names; the DNS server adds them to the zone containing each
name (records the operator configured at the same name and type win, as for
the email records) and republishes whenever a source changes its set.  The
TLSA records of the SMTP certificate go the same way (the DNS server's own
source ``dane``, :mod:`dcrouter.dns.dane`).
"""

from __future__ import annotations

from typing import Callable, Iterable

from zope.interface import implementer

from dcrouter.config.dns import RecordOptions
from dcrouter.interfaces import IPublishedRecords


@implementer(IPublishedRecords)
class PublishedRecords:
    """Named sets of records to publish (``context.dns_records``)."""

    def __init__(self) -> None:
        self._sets: dict[str, tuple[RecordOptions, ...]] = {}
        self._listeners: list[Callable[[], None]] = []

    def set(self, source: str, records: Iterable[RecordOptions]) -> None:
        """Replace the records of ``source`` (names absolute, ending in '.'); listeners are
        told when the set changed."""
        new = tuple(records)
        if self._sets.get(source, ()) == new:
            return
        if new:
            self._sets[source] = new
        else:
            self._sets.pop(source, None)
        for callback in list(self._listeners):
            callback()

    def records(self) -> list[RecordOptions]:
        """Every source's records, sources in name order."""
        return [r for source in sorted(self._sets) for r in self._sets[source]]

    def add_listener(self, callback: Callable[[], None]) -> None:
        """``callback()`` after any source changed its records (reactor thread)."""
        self._listeners.append(callback)
