"""Python's cyclic garbage collector around a scan's big, long-lived data.

Python collects reference cycles in generations, and a collection of the oldest generation walks
every container the process holds. Reading a pallet creates millions of containers (a 25 MB
patchset of nested lists and dicts) and no cycle, yet the collections that its allocations
trigger walk all that has been read so far, again and again: 0.25 s of the 0.65 s it takes to read
the 1Lbb pallet. A worker holds the background workspace, jax and the compiled likelihood for its
whole life, and each full collection walked them all: 60–95 ms, three or four times per worker in
a 1Lbb scan, each one a pause between two fits.

* :func:`paused` — the collector off for a block (JSON parsing, imports), as it was after; what
  the block made is counted old, so that no collection walks it right after.
* :func:`settle` — for a process that only fits: what is alive now is left out of every later
  collection (``gc.freeze``); reference counting still frees it when it is dropped.

Standard library only: the client and the worker runtime both use it.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator

__all__ = ["paused", "settle"]


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Run the block with the cyclic collector off, and turn it back on after only if it was on.

    For blocks that allocate many containers and create no garbage cycles (parsing JSON).

    >>> with paused():
    ...     gc.isenabled()
    False
    >>> gc.isenabled()
    True
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            _age()
            gc.enable()


def _age() -> None:
    # What the block made is young, and the first collections after it would walk it all (0.07 s
    # after the 1Lbb patchset, twice: the young generation, then the middle one). It goes to the
    # oldest generation at once instead (O(1) list moves), where only the rare full collections
    # see it; and its arrival there does not count towards triggering one. Not in a process that
    # froze objects of its own: unfreezing would release those too.
    if gc.get_freeze_count() == 0:
        gc.freeze()
        gc.unfreeze()


def settle() -> None:
    """Leave every object alive now out of later collections (``gc.freeze``).

    Only for a process pyhf-dist runs for fits alone (a local worker, a Dask worker of a cluster
    it started): what it holds by then (the libraries, the workspace, the compiled likelihood)
    lives as long as the process, and what a fit allocates afterwards is still collected as
    usual. A frozen object that is dropped is still freed by reference counting; only one caught
    in a cycle would stay, which these are not.
    """
    gc.freeze()
