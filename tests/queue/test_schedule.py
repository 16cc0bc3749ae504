"""The due schedule: O(log n) order, and a busy destination's backlog cannot starve others."""

from __future__ import annotations

from dcrouter.message import Destination, Route
from dcrouter.queue.item import QueueItem
from dcrouter.queue.schedule import DueSchedule


def _item(n: int, destination: str, when: float) -> QueueItem:
    return QueueItem(id=f"{n:06d}", mode="mta", rule_pattern="*@x", mail_from="a@x",
                     recipients=[], via=Destination.to(Route(kind="mx")), body_ref="b",
                     next_attempt=when, destination=destination)


def test_due_items_come_in_time_order():
    schedule = DueSchedule()
    items = {i.id: i for i in (_item(n, "d", when) for n, when in enumerate([5, 1, 3, 9]))}
    for item in items.values():
        schedule.schedule(item)
    taken = schedule.pop_due(6, items.get, 10)
    assert [i.next_attempt for i in taken] == [1, 3, 5]
    assert schedule.pop_due(6, items.get, 10) == []


def test_backlog_of_a_busy_destination_does_not_starve_another():
    schedule = DueSchedule()
    items = {}
    for n in range(5000):
        item = _item(n, "busy.test", 1.0)
        items[item.id] = item
        schedule.schedule(item)
    other = _item(99999, "free.test", 2.0)
    items[other.id] = other
    schedule.schedule(other)
    looked_at = []

    def accept(item: QueueItem) -> bool:
        looked_at.append(item.id)
        return item.destination != "busy.test"

    calls = 0
    taken: list[QueueItem] = []
    while not taken:
        calls += 1
        before = len(looked_at)
        taken = schedule.pop_due(10.0, items.get, 5, accept)
        assert len(looked_at) - before <= 64 + 1      # bounded work per call
        assert calls < 200
    assert [i.id for i in taken] == [other.id]
    # the refused items are all still due, none lost
    assert sum(1 for i in items.values() if i.sched) == 5000
