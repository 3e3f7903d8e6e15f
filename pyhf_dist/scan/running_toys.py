"""The toys of a scan fitted so far, counted while its chunks run (for the progress bar).

Each chunk's task gets a file in a folder made for the scan (``task["progress"]``), where its
worker writes the fraction of the chunk done (:mod:`pyhf_dist.runtime.reports`); the scan's loop
reads them whenever it waits for results (about every second). A chunk of 10,000 toys takes
minutes: without this the bar would stand still until it finished. Workers that cannot see the
folder (another machine, no shared filesystem) write nothing, and their chunks count as they finish.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
from typing import Callable

from pyhf_dist import scratch
from pyhf_dist.runtime.reports import read_fraction

__all__ = ["RunningToys"]


class RunningToys:
    """Counts a scan's toys of each hypothesis: finished chunks, plus what running ones report.

    Args:
        on_progress: Called with the count whenever it grows (it never shrinks: a chunk whose
            worker died keeps what it had shown until its retry passes it).
    """

    def __init__(self, on_progress: Callable[[int], None]):
        self.on_progress = on_progress
        try:
            self.folder: str | None = scratch.make("toys")
        except OSError:  # no temporary folder: chunks count as they finish
            self.folder = None
        self.finished = 0
        self._chunks: dict[str, int] = {}  # progress file -> its chunk's toys per hypothesis (submitted)
        self._reported: dict[str, float] = {}  # progress file -> the toys its running chunk has fitted
        self._serial = itertools.count()
        self._shown = 0

    def path_for(self, chunk: dict) -> str | None:
        """The progress file of a chunk about to be submitted (``None``: no folder)."""
        if self.folder is None:
            return None
        path = os.path.join(self.folder, str(next(self._serial)))
        self._chunks[path] = int(chunk["stop"]) - int(chunk["start"])
        return path

    def forget(self, path: str | None) -> None:
        """A chunk no longer runs under ``path`` (finished, failed, or submitted again)."""
        if path is not None and self._chunks.pop(path, None) is not None:
            self._reported.pop(path, None)
            with contextlib.suppress(OSError):
                os.remove(path)

    def done(self, path: str | None, chunk: dict, fitted: bool) -> None:
        """A chunk ended; its toys count if it was ``fitted`` (the others' reports are not read again)."""
        self.forget(path)
        if fitted:
            self.finished += int(chunk["stop"]) - int(chunk["start"])
        self._show()

    def poll(self) -> None:
        """Read what the running chunks report; call ``on_progress`` if the count grew.

        Only the files in the folder are read: those of chunks that have begun (a scan of many
        patches submits far more chunks than run at once).
        """
        if self.folder is not None:
            with contextlib.suppress(OSError):
                for entry in os.scandir(self.folder):
                    toys = self._chunks.get(entry.path)  # not a worker's file being written
                    fraction = read_fraction(entry.path) if toys is not None else None
                    if fraction is not None:
                        self._reported[entry.path] = toys * fraction
        self._show()

    def _show(self) -> None:
        count = self.finished + int(sum(self._reported.values()))
        if count > self._shown:
            self._shown = count
            self.on_progress(count)

    def close(self) -> None:
        """Remove the folder (a late write from a chunk given up on lands in nothing)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
