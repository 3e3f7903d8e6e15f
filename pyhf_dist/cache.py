"""What a machine remembers between scans: compiled likelihoods and checks already passed.

Three things are costly on every cold start and depend only on their inputs:

* compiling the fast path's likelihood (``jax/``: jax's own persistent compilation cache);
* pyhf's JSON-schema validation of a background workspace and of a patchset (``checks/``:
  about two seconds for the 1Lbb pallet, pyhf's import included);
* the fast path's comparison of a model structure with ``pyhf.Model`` (``checks/``: it makes
  every worker import pyhf and build a model).

A check is remembered under a digest of the exact input and of the versions of the packages that
ran it, so an answer is reused only where the check would run again on the same bytes with the
same code. The directory is ``$PYHF_DIST_CACHE``, by default ``$XDG_CACHE_HOME/pyhf-dist``
(``~/.cache/pyhf-dist``); ``PYHF_DIST_CACHE=off`` disables all of it. Deleting the directory is
always safe.

>>> key = digest("example", b"bytes")
>>> len(key)
40
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

__all__ = ["CACHE_ENV", "root", "directory", "digest", "versions", "recall", "remember", "exclusive"]

log = logging.getLogger(__name__)

CACHE_ENV = "PYHF_DIST_CACHE"


def root() -> Path | None:
    """The cache directory (``None`` when disabled)."""
    configured = os.environ.get(CACHE_ENV)
    if configured is not None and configured.strip().lower() == "off":
        return None
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "pyhf-dist"


def directory(kind: str) -> Path | None:
    """The cache's subdirectory ``kind``, created on demand (``None``: disabled or not writable)."""
    base = root()
    if base is None:
        return None
    path = base / kind
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        log.warning("pyhf-dist cache disabled: cannot use %s (%s)", path, error)
        return None
    return path


def digest(*parts: bytes | str) -> str:
    """A short hex digest of ``parts`` (bytes or text), each length-prefixed so they cannot run together."""
    hasher = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else bytes(part)
        hasher.update(len(data).to_bytes(8, "little"))
        hasher.update(data)
    return hasher.hexdigest()[:40]


@functools.lru_cache(maxsize=None)
def versions(*packages: str) -> str:
    """``"name=version;..."`` of installed packages, without importing them."""
    from importlib import metadata

    found = []
    for package in ("pyhf-dist",) + packages:
        try:
            found.append(f"{package}={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            found.append(f"{package}=?")
    return ";".join(found)


def recall(kind: str, key: str) -> str | None:
    """The answer remembered for check ``kind`` under ``key``, or ``None``."""
    path = directory("checks")
    if path is None:
        return None
    try:
        return (path / f"{kind}-{key}").read_text()
    except (OSError, UnicodeDecodeError):
        return None


def remember(kind: str, key: str, answer: str) -> None:
    """Keep ``answer`` for check ``kind`` under ``key`` (atomically; silently skipped if impossible)."""
    path = directory("checks")
    if path is None:
        return
    try:
        # Workers of one scan may write the same answer at once: write aside, then rename.
        handle, temporary = tempfile.mkstemp(dir=path, prefix=f".{kind}-")
        with os.fdopen(handle, "w") as stream:
            stream.write(answer)
        os.replace(temporary, path / f"{kind}-{key}")
    except OSError as error:
        log.debug("could not remember %s check: %s", kind, error)


@contextlib.contextmanager
def exclusive(name: str, timeout: float = 120.0):
    """Hold the machine-wide lock ``name`` for the ``with`` block.

    The workers of a scan start together and would each compile the same likelihood and run the
    same check: under this lock one does it and the others then find the result in the cache.
    After ``timeout`` seconds of waiting (a stuck holder), or where locking is impossible, the
    block runs anyway; the lock only saves work, it never guards correctness.
    """
    path = directory("locks")
    try:
        import fcntl

        handle = open(path / f"{name}.lock", "a") if path is not None else None
    except (ImportError, OSError):
        handle = None
    if handle is None:
        yield
        return
    with handle:
        locked = False
        deadline = time.monotonic() + timeout
        while not locked:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except OSError:
                if time.monotonic() > deadline:
                    log.warning("waited %.0f s for the lock %s: going on without it", timeout, name)
                    break
                time.sleep(0.02)
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)
