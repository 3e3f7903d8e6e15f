"""What a machine remembers between scans: compiled likelihoods and checks already passed.

Three things are costly on every cold start and depend only on their inputs:

* compiling the fast path's likelihood (``executables/``: the compiled executables themselves,
  loaded without tracing, :mod:`pyhf_dist.runtime.fast.executables`; ``jax/``: jax's own
  persistent compilation cache, for the other compiled functions);
* pyhf's JSON-schema validation of a background workspace and of a patchset (``checks/``:
  about two seconds for the 1Lbb pallet, pyhf's import included);
* the fast path's comparison of a model structure with ``pyhf.Model`` (``checks/``: it makes
  every worker import pyhf and build a model).

A check is remembered under a digest of the exact input and of the versions of the packages that
ran it, so an answer is reused only where the check would run again on the same bytes with the
same code. The directory is ``$PYHF_DIST_CACHE``, by default ``$XDG_CACHE_HOME/pyhf-dist``
(``~/.cache/pyhf-dist``); ``PYHF_DIST_CACHE=off`` disables all of it. Deleting the directory is
always safe.

A cache that falls over never fails a scan. Each remembered answer carries a digest of itself, so
a truncated or damaged entry reads as absent and is computed again. A compile cache that cannot
be written (full disk, quota, read-only, not a directory) or holds damaged entries is given up for
the process, with one note: the likelihood is then compiled in memory (:func:`usable`,
:func:`guard_compile_cache`).

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
import threading
import time
from pathlib import Path

__all__ = [
    "CACHE_ENV", "NOTED_ENV", "root", "directory", "check", "digest", "versions", "recall", "remember", "exclusive",
    "usable", "guard_compile_cache",
]

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
        _note_disabled(base, path, error)
        return None
    return path


#: The cache root this process has reported unusable. Set in its environment, so that the
#: processes it starts afterwards (a scan's local workers) inherit it and do not report it again.
NOTED_ENV = "PYHF_DIST_CACHE_NOTED"


def _note_disabled(base: Path, path: Path, error: OSError) -> None:
    """One note per unusable cache root, for this process and the ones it starts."""
    if os.environ.get(NOTED_ENV) == str(base):
        log.debug("pyhf-dist cache disabled: cannot use %s (%s)", path, error)
        return
    os.environ[NOTED_ENV] = str(base)
    log.warning("pyhf-dist cache disabled: cannot use %s (%s): point %s at a writable folder, or set it to off",
                path, error.strerror or error, CACHE_ENV)


def check() -> None:
    """Say now, once, if the cache cannot be used: before a scan starts its local workers, which
    then inherit that it was said (:data:`NOTED_ENV`) instead of each saying it again."""
    directory("checks")


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


#: First line of every remembered answer: ``<digest of the answer>``, then the answer.
_SEAL = "sealed "


def recall(kind: str, key: str, folder: str = "checks") -> str | None:
    """The answer remembered for check ``kind`` under ``key`` (in ``folder`` of the cache), or
    ``None`` (also for an entry that is damaged or cut short: it no longer matches its digest)."""
    path = directory(folder)
    if path is None:
        return None
    try:
        text = (path / f"{kind}-{key}").read_text()
    except (OSError, UnicodeDecodeError):
        return None
    head, newline, answer = text.partition("\n")
    if not newline or not head.startswith(_SEAL) or head[len(_SEAL):] != digest(answer):
        return None
    return answer


def remember(kind: str, key: str, answer: str, folder: str = "checks") -> None:
    """Keep ``answer`` for check ``kind`` under ``key`` in ``folder`` of the cache (atomically;
    silently skipped if impossible)."""
    path = directory(folder)
    if path is None:
        return
    temporary = None
    try:
        # Workers of one scan may write the same answer at once: write aside, then rename.
        handle, temporary = tempfile.mkstemp(dir=path, prefix=f".{kind}-")
        with os.fdopen(handle, "w") as stream:
            stream.write(f"{_SEAL}{digest(answer)}\n{answer}")
        os.replace(temporary, path / f"{kind}-{key}")
    except OSError as error:
        log.debug("could not remember %s check: %s", kind, error)
        if temporary is not None:  # a full disk must not also keep the half-written file
            with contextlib.suppress(OSError):
                os.unlink(temporary)


def usable(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot serve as a cache directory now, or ``None`` when it can.

    It must exist (or be creatable) and take a small file written and synced: a full disk, an
    exceeded quota, a read-only filesystem or a file in the way all fail here, before any
    compilation tries to use it.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=path, prefix=".probe-")
    except OSError as error:
        return error.strerror or type(error).__name__
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(b"\0" * 4096)
            stream.flush()
            os.fsync(stream.fileno())
    except OSError as error:
        return error.strerror or type(error).__name__
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)
    return None


_GUARD_LOCK = threading.Lock()
_GUARDED = False


def guard_compile_cache(path: str) -> None:
    """Give jax's persistent compilation cache at ``path`` up at its first error, saying so once.

    jax itself only warns when it cannot read or write an entry — on every compilation, each a
    long ``UserWarning`` — and goes on compiling. Here the first such warning turns the cache off
    for this process (compiling in memory from then on) and becomes one note; later ones are
    silenced.
    """
    global _GUARDED
    import warnings

    with _GUARD_LOCK:
        if _GUARDED:
            return
        _GUARDED = True
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if "persistent compilation cache entry" not in text:
            return shown(message, category, filename, lineno, file, line)
        give_up_compile_cache(path, text.split(": ", 1)[-1])

    warnings.showwarning = showwarning


_GIVEN_UP = False


def give_up_compile_cache(path: str, reason: str) -> None:
    """Turn jax's persistent compilation cache off for this process, with one note (the first time)."""
    global _GIVEN_UP
    with _GUARD_LOCK:
        if _GIVEN_UP:
            return
        _GIVEN_UP = True
    try:
        import jax
        from jax.experimental.compilation_cache import compilation_cache

        jax.config.update("jax_enable_compilation_cache", False)
        compilation_cache.reset_cache()
    except Exception as error:  # a jax without these: its own warnings go on, fits are unaffected
        log.debug("could not turn the compilation cache off: %s", error)
    log.warning("compile cache %s unusable (%s): compiling in memory instead", path, reason)


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
