"""ShrinkWatch: when a table that once was large should be rebuilt to give its memory back."""

from __future__ import annotations

import sys

from trio_fanout.backplane._shrink import MIN_PEAK, SHRINK_RATIO, ShrinkWatch


def test_a_large_table_is_rebuilt_each_time_it_falls_to_a_quarter() -> None:
    watch = ShrinkWatch()
    table = {number: None for number in range(4 * MIN_PEAK)}
    rebuilt_at = []
    for number in range(4 * MIN_PEAK):
        del table[number]
        if watch.should_rebuild(len(table)):
            rebuilt_at.append(len(table))
            table = dict(table)
    peak = 4 * MIN_PEAK - 1  # the size it had when the first removal was reported
    assert rebuilt_at == [peak // SHRINK_RATIO]  # then it is below MIN_PEAK: not worth it


def test_a_small_table_is_never_rebuilt() -> None:
    watch = ShrinkWatch()
    assert not any(watch.should_rebuild(size) for size in range(MIN_PEAK - 1, -1, -1))


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
