"""Scratch folders of a running scan, and the ones a killed scan left behind.

While it runs, a scan keeps a few files in folders of the system's temporary directory (the local
executor's context and its workers' process ids, the progress of running chunks of toys), and it
removes them as it ends. A scan killed outright (``kill -9``, the out-of-memory killer, a batch
system's SIGKILL after its SIGTERM) cannot. Each folder names the process of its scan; the next
scan that makes one of its kind removes those whose process is gone and that have not changed for
:data:`STALE_SECONDS` (a folder in use changes as its scan's tasks come and go).

>>> folder = make("example")
>>> os.path.exists(folder), owner(folder) == os.getpid()
(True, True)
>>> shutil.rmtree(folder)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

__all__ = ["STALE_SECONDS", "make", "owner", "sweep"]

#: A folder whose scan is gone is removed once it has not changed for this long.
STALE_SECONDS = 600.0
_OWNER = ".scan-pid"


def make(kind: str) -> str:
    """A new scratch folder ``pyhf-dist-<kind>-*`` of this process, after removing the stale ones
    of that kind (:func:`sweep`)."""
    sweep(kind)
    folder = tempfile.mkdtemp(prefix=f"pyhf-dist-{kind}-")
    try:
        Path(folder, _OWNER).write_text(str(os.getpid()))
    except OSError:  # a folder without its owner is only never swept
        pass
    return folder


def owner(folder: str | os.PathLike) -> int | None:
    """The process id of the scan that made ``folder``, or ``None`` (not one of :func:`make`'s)."""
    try:
        return int(Path(folder, _OWNER).read_text())
    except (OSError, ValueError):
        return None


def sweep(kind: str) -> None:
    """Remove the scratch folders of ``kind`` whose scan is gone and that are stale."""
    try:
        folders = list(Path(tempfile.gettempdir()).glob(f"pyhf-dist-{kind}-*"))
    except OSError:
        return
    now = time.time()
    for folder in folders:
        pid = owner(folder)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        try:
            if now - folder.stat().st_mtime < STALE_SECONDS:
                continue
        except OSError:
            continue
        shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (PermissionError), or no way to tell
        return True
    return True
