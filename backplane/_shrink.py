"""Giving memory back when a large dict or set has emptied.

CPython never shrinks a dict's or a set's table when items are removed: a table that once held
100,000 rooms keeps its size (megabytes) after everyone has left, and so does the process. The
owner of such a table asks a :class:`ShrinkWatch` after removals whether to rebuild it, which
copies the survivors into a table of their size, in place (:func:`rebuild_dict`,
:func:`rebuild_set`). Rebuilding when the table has fallen to a
quarter of its peak keeps the cost amortised: each rebuild copies at most a quarter of the items
removed since the last one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Any

# Tables that never held more than this are too small to be worth a rebuild.
MIN_PEAK = 4096

# Rebuild once the table holds this many times fewer items than at its peak.
SHRINK_RATIO = 4

# What the smallest table of a dict or a set holds. A table that held more and is now empty is
# rebuilt whatever its peak (which costs nothing: an empty one just lets its table go), so that
# a process whose rooms are all gone comes back to the size it started at.
SMALLEST_TABLE_ITEMS = 5


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, where there is one (elsewhere, nothing to do)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] | None = getattr(ctypes.CDLL(name), "malloc_trim", None)
    except OSError:
        return None
    return trim


_malloc_trim = _load_malloc_trim()


def give_back_freed_memory() -> None:
    """Ask the C allocator to return freed memory to the system.

    A rebuilt table frees the old one inside the C heap, where glibc keeps it (it only returns
    the heap's top on its own). Called after rebuilds, not per removal: it walks the heap.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


def rebuild_dict(table: dict[Any, Any]) -> None:
    """Copy ``table``'s items into a table of their size, in place.

    In place, not by replacing the dict: a new dict made during a burst of removals would live
    on among the blocks the removed items had, and keep their memory from going back to the
    system. An empty dict just lets its table go.
    """
    if table:
        survivors = dict(table)
        table.clear()
        dict.update(table, survivors)
    else:
        table.clear()


def rebuild_set(table: set[Any]) -> None:
    """Copy ``table``'s items into a table of their size, in place (see :func:`rebuild_dict`)."""
    if table:
        survivors = set(table)
        table.clear()
        table |= survivors
    else:
        table.clear()


class ShrinkWatch:
    """Remembers a table's peak size and says when rebuilding it would give memory back."""

    __slots__ = ("_peak",)

    def __init__(self) -> None:
        self._peak = 0

    def should_rebuild(self, size: int) -> bool:
        """Call after removing from the table, with its size now; True means: rebuild it."""
        if size > self._peak:
            self._peak = size
            return False
        if (self._peak >= MIN_PEAK and size * SHRINK_RATIO <= self._peak) or (
            size == 0 and self._peak > SMALLEST_TABLE_ITEMS
        ):
            self._peak = size
            return True
        return False
