"""How far a worker is through a chunk of toys, written where the scan's client reads it.

A toy scan gives each chunk's task a file on the client's machine (``task["progress"]``, in a
folder the client made for the scan). The worker writes there the fraction of the chunk done, as
text replaced whole, at most every :data:`INTERVAL` seconds, so that the progress bar moves
while chunks that take minutes run. A worker that cannot see that folder (another machine, with
no filesystem shared with the client) writes nothing: its chunks count as they finish.
"""

from __future__ import annotations

import os
import time

__all__ = ["INTERVAL", "ChunkReport", "read_fraction"]

#: Seconds between two writes of one chunk's fraction.
INTERVAL = 0.5


class ChunkReport:
    """``report(fraction)``: write the fraction (0 to 1) of a chunk done to ``path``.

    Args:
        path: The task's ``progress`` file; ``None``, or one in a folder this worker cannot see,
            writes nothing.

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> report = ChunkReport(os.path.join(folder, "0"))
    >>> report(0.25); read_fraction(os.path.join(folder, "0"))
    0.25
    >>> report.part(0.5, 0.5)(0.5); read_fraction(os.path.join(folder, "0"))  # too soon after the last
    0.25
    >>> ChunkReport(None)(0.5)  # nothing to write to
    """

    def __init__(self, path: str | None):
        self.path = path if path and os.path.isdir(os.path.dirname(path)) else None
        self._written = -float("inf")

    def __call__(self, fraction: float) -> None:
        now = time.monotonic()
        if self.path is None or now - self._written < INTERVAL:
            return
        self._written = now
        aside = f"{self.path}.{os.getpid()}"
        try:
            with open(aside, "w") as file:
                file.write(f"{min(max(float(fraction), 0.0), 1.0):.6f}")
            os.replace(aside, self.path)
        except OSError:  # the folder went away (the scan ended) or filled up: stop reporting
            self.path = None

    def part(self, first: float, share: float):
        """A report for a part of the chunk: its ``0..1`` becomes ``first..first + share``."""
        return lambda fraction: self(first + share * fraction)


def read_fraction(path: str) -> float | None:
    """The fraction a worker wrote to ``path``, or ``None`` (nothing written yet, or unreadable)."""
    try:
        with open(path) as file:
            value = float(file.read())
    except (OSError, ValueError):
        return None
    return value if 0.0 <= value <= 1.0 else None
