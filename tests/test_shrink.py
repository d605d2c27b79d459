"""ShrinkWatch: when a table that once was large should be rebuilt to give its memory back; and
the rebuilds, which keep the table object itself."""

from __future__ import annotations

import sys

from trio_fanout.backplane._shrink import (
    MIN_PEAK,
    SHRINK_RATIO,
    SMALLEST_TABLE_ITEMS,
    ShrinkWatch,
    rebuild_dict,
    rebuild_set,
)


def test_a_large_table_is_rebuilt_each_time_it_falls_to_a_quarter() -> None:
    watch = ShrinkWatch()
    table = {number: None for number in range(4 * MIN_PEAK)}
    rebuilt_at = []
    for number in range(4 * MIN_PEAK):
        del table[number]
        if watch.should_rebuild(len(table)):
            rebuilt_at.append(len(table))
            rebuild_dict(table)
    peak = 4 * MIN_PEAK - 1  # the size it had when the first removal was reported
    # Then it is below MIN_PEAK, not worth a copy, until it is empty and costs nothing.
    assert rebuilt_at == [peak // SHRINK_RATIO, 0]


def test_a_small_table_is_rebuilt_only_once_empty() -> None:
    watch = ShrinkWatch()
    assert not any(watch.should_rebuild(size) for size in range(MIN_PEAK - 1, 0, -1))
    assert watch.should_rebuild(0)


def test_a_table_that_never_outgrew_the_smallest_is_never_rebuilt() -> None:
    watch = ShrinkWatch()
    assert not any(watch.should_rebuild(size) for size in range(SMALLEST_TABLE_ITEMS, -1, -1))


def test_growing_again_moves_the_peak() -> None:
    watch = ShrinkWatch()
    assert not watch.should_rebuild(MIN_PEAK)
    assert not watch.should_rebuild(MIN_PEAK // 2)
    assert not watch.should_rebuild(8 * MIN_PEAK)  # grew: the new peak
    assert not watch.should_rebuild(4 * MIN_PEAK)
    assert watch.should_rebuild(2 * MIN_PEAK)


def test_rebuilding_gives_the_table_memory_back() -> None:
    # What the watch is for: CPython keeps an emptied dict's table until it is rebuilt.
    table = {number: None for number in range(100_000)}
    for number in range(99_000):
        del table[number]
    assert sys.getsizeof(dict(table)) * 10 < sys.getsizeof(table)


def test_a_rebuilt_dict_is_the_same_object_with_the_same_items_in_a_small_table() -> None:
    table = {number: str(number) for number in range(100_000)}
    for number in range(99_000):
        del table[number]
    survivors = dict(table)
    before = sys.getsizeof(table)
    kept = table
    rebuild_dict(table)
    assert table is kept and table == survivors
    assert sys.getsizeof(table) * 10 < before


def test_a_rebuilt_set_is_the_same_object_with_the_same_items_in_a_small_table() -> None:
    table = set(range(100_000))
    for number in range(99_000):
        table.discard(number)
    before = sys.getsizeof(table)
    kept = table
    rebuild_set(table)
    assert table is kept and table == set(range(99_000, 100_000))
    assert sys.getsizeof(table) * 10 < before


def test_an_emptied_table_lets_its_whole_table_go() -> None:
    table = {number: None for number in range(1000)}
    members = set(range(1000))
    table.clear()  # what an empty dict costs, to compare with
    smallest = sys.getsizeof(table)
    table.update((number, None) for number in range(1000))
    for number in range(1000):
        del table[number]
        members.discard(number)
    rebuild_dict(table)
    rebuild_set(members)
    assert sys.getsizeof(table) == smallest
    assert sys.getsizeof(members) == sys.getsizeof(set())
