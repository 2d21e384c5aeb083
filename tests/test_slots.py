"""Slot layouts and the slot cache (nanochat/megacontext/slots.py); the cache against full forwards is
tested through the sessions that use it (tests/test_runtime.py)."""

from nanochat.megacontext.slots import Plan, common_slots, item_cost, slot_items
from nanochat.megacontext.working_context import Entry, WorkingContext


def test_common_slots_and_plan_layout():
    a = [Entry(1, 0, 32), Entry(0, 32, 64), Entry(0, 64, 70)]
    b = [Entry(1, 0, 32), Entry(0, 32, 64), Entry(0, 64, 75)]
    assert common_slots(a, b) == 1 + 32 + 6
    assert common_slots(a, [Entry(0, 0, 32)] + b[1:]) == 0
    wc = WorkingContext(b)
    assert slot_items(wc, 64) == [Entry(1, 0, 32), Entry(0, 32, 64), Plan(64), Entry(0, 64, 75)]
    assert slot_items(WorkingContext(b[:2]), 64)[-1] == Plan(64)
    assert common_slots(slot_items(wc, 64), b) == 33


def test_memory_entries_come_first_and_a_plan_goes_into_the_session_only():
    ck = WorkingContext([Entry(1, 0, 32), Entry(0, 32, 64)])
    wc = WorkingContext.joined([ck, WorkingContext([Entry(0, 0, 32), Entry(0, 32, 40)])])
    items = slot_items(wc, None)
    assert items == [Entry(1, 0, 32, 0), Entry(0, 32, 64, 0), Entry(0, 0, 32, 1), Entry(0, 32, 40, 1)]
    assert [item_cost(it) for it in items] == [1, 32, 32, 8] and item_cost(Plan(64)) == 1
    # the CK's block [32, 64) is not the session's: the plan for the session's block at 32 goes there
    assert slot_items(wc, 32) == items[:3] + [Plan(32)] + items[3:]
    # the same block in two memories is two different slots
    assert common_slots([Entry(0, 0, 32, 0)], [Entry(0, 0, 40, 1)]) == 0
