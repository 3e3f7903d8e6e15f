"""The likelihood's compiled executables, kept on disk and loaded without tracing.

jax's persistent compilation cache spares a cold worker the compilation, but not the tracing
and lowering that compute its key: for the 1Lbb likelihood (value and gradient, expected data,
Fisher diagonal) they take most of a worker's set-up, every time. Here the compiled executables
themselves are kept (``executables/`` in the pyhf-dist cache, :mod:`pyhf_dist.cache`), under a
digest of the layout's shapes, the interpolation codes, the likelihood's source
(:mod:`~pyhf_dist.runtime.fast.likelihood`: jax's cache keys on the traced program, which a changed
likelihood changes; here nothing is traced), the jax and jaxlib versions, the XLA flags and the
host CPU (a cache on a shared home directory serves machines of other CPUs), and loaded in a few
milliseconds.

An executable is kept only after a copy loaded back from its bytes gave the same numbers as the
compiled function; one that cannot be read or loaded is compiled again. A call with inputs of
other types or shapes than the executable's goes to the jitted function. :func:`for_layout` gives
a layout's functions to call, loaded or compiled once per process.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import logging
import os
import pickle
import platform
import threading
from pathlib import Path

import numpy as np

from pyhf_dist import cache

__all__ = ["COMPILED", "Loaded", "for_layout", "load"]

log = logging.getLogger(__name__)

#: The cache's folder of kept executables (:mod:`pyhf_dist.cache`).
FOLDER = "executables"
#: The functions of :class:`~pyhf_dist.runtime.fast.likelihood.Functions` every fit calls, and
#: which of ``(theta, main, aux, layout)`` each takes.
CALLS = {
    "value_and_grad": ("theta", "main", "aux", "layout"),
    "expected": ("theta", "layout"),
    "fisher_diagonal": ("theta", "layout"),
}


#: The functions to call per ``(caps, codes)`` compiled in this process.
COMPILED: dict = {}
_COMPILED_LOCK = threading.Lock()


def for_layout(caps, codes, functions, device, params, main):
    """The functions to call for ``caps``, compiled in this process once; on a machine, one worker compiles.

    Where the pyhf-dist cache is on, the executables kept on disk, loaded without tracing
    (:func:`load`; kept by the first worker to need them). Otherwise the jitted functions:
    workers that meet a layout not compiled yet take turns, the first compiles into jax's
    persistent cache, the others then load from it.
    """
    from pyhf_dist.runtime import timeouts
    from pyhf_dist.runtime.fast import likelihood

    found = COMPILED.get((caps, codes))
    if found is not None:  # every patch after the layout's first: no pause to report
        return found
    with timeouts.paused(), _COMPILED_LOCK:  # the worker's one-off cost, not the fit's: outside its timeout
        found = COMPILED.get((caps, codes))
        if found is not None:
            return found
        # The device arrays' names are part of the compiled function's signature.
        key = cache.digest(repr((caps, codes, sorted(device))), cache.versions("jax", "jaxlib"))
        cached = likelihood.persistent_cache() is not None
        loaded = None
        if cached:
            arguments = {"theta": params["init"], "main": main, "aux": params["aux"], "layout": device}
            loaded = load(functions, key, arguments)
        if loaded is None:
            first = cached and cache.recall("compiled", key) is None
            with cache.exclusive("compile-" + key) if first else contextlib.nullcontext():
                functions.value_and_grad(params["init"], main, params["aux"], device)
                functions.expected(params["init"], device)
                functions.fisher_diagonal(params["init"], device)
                if first:
                    cache.remember("compiled", key, "yes")
        COMPILED[(caps, codes)] = loaded or functions
        return COMPILED[(caps, codes)]


class Loaded:
    """:class:`~pyhf_dist.runtime.fast.likelihood.Functions` with the executables of one layout.

    ``value_and_grad``, ``expected`` and ``fisher_diagonal`` call the loaded executables, and
    ``logpdf`` through them; anything else (and a call they do not fit) is the jitted function's.
    """

    def __init__(self, functions, executables: dict):
        self._functions = functions
        for name, executable in executables.items():
            setattr(self, name, _with_fallback(executable, getattr(functions, name)))

    def __getattr__(self, name):
        return getattr(self._functions, name)

    def logpdf(self, theta, main, aux, L) -> float:
        """pyhf's ``log L`` (:meth:`~pyhf_dist.runtime.fast.likelihood.Functions.logpdf`) from the
        loaded ``value_and_grad``: the jitted one would compile the likelihood a second time."""
        return type(self._functions).logpdf(self, theta, main, aux, L)


def _with_fallback(executable, jitted):
    def call(*args):
        try:
            return executable(*args)
        except TypeError:  # inputs of other types or shapes than it was compiled for
            return jitted(*args)

    return call


def load(functions, key: str, arguments: dict) -> Loaded | None:
    """The executables of ``functions`` for the layout of ``arguments`` (``theta``, ``main``,
    ``aux``, ``layout``): read from the cache, or compiled now and kept. ``key`` names the layout
    and codes. ``None`` where the cache is off or the executables cannot be kept (the caller then
    uses the jitted functions, with jax's persistent cache)."""
    if cache.directory(FOLDER) is None:
        return None
    key = cache.digest(key, _source(), cache.versions("jax", "jaxlib"), os.environ.get("XLA_FLAGS", ""), _host())
    loaded = _read(key)
    if loaded is None:
        if cache.recall("unkept-executables", key) is not None:
            return None  # tried on this machine with these versions: the jitted functions it is
        with cache.exclusive("executables-" + key):
            loaded = _read(key) or _compile(functions, arguments, key)
        if loaded is None:
            cache.remember("unkept-executables", key, "yes")
    return None if loaded is None else Loaded(functions, loaded)


def _read(key: str) -> dict | None:
    """The executables kept under ``key``, loaded, or ``None`` (absent, damaged or not loadable)."""
    body = cache.recall("likelihood", key, FOLDER)
    if body is None:
        return None
    try:
        return {name: _deserialize(blob) for name, blob in pickle.loads(base64.b64decode(body)).items()}
    except Exception as error:  # noqa: BLE001 - a kept executable is only a shortcut
        log.info("compiled likelihood %s not loadable (%s): compiling it again", key, error)
        return None


def _compile(functions, arguments: dict, key: str) -> dict | None:
    """Compile each function anew (bypassing jax's in-memory and persistent caches, whose
    executables do not serialize into bytes that load back), check a copy loaded back from its
    bytes, and keep them under ``key``."""
    import jax
    from jax.experimental import serialize_executable
    from jax.experimental.compilation_cache import compilation_cache

    executables, blobs = {}, {}
    # Process-wide, for this block only: another thread compiling meanwhile (a toy batch) just
    # misses jax's cache once. jax decides whether its cache is used once per process, at its
    # first compilation, and keeps to that whatever the setting says later: the cache is reset
    # after the setting changes, both ways, so that jax decides again (where this block holds the
    # process's first compilation, the cache would otherwise stay off in it for good).
    enabled = jax.config.jax_enable_compilation_cache
    try:
        jax.config.update("jax_enable_compilation_cache", False)
        compilation_cache.reset_cache()
        for name, parameters in CALLS.items():
            args = [arguments[parameter] for parameter in parameters]
            compiled = _fresh(getattr(functions, name)).lower(*args).compile()
            blob = serialize_executable.serialize(compiled)
            copy = _deserialize(blob)
            if not all(np.array_equal(a, b) for a, b in zip(_flat(compiled(*args)), _flat(copy(*args)))):
                log.info("compiled likelihood not kept: %s loaded back gave other numbers", name)
                return None
            executables[name], blobs[name] = copy, blob
    except Exception as error:  # noqa: BLE001 - the jitted functions remain
        log.info("compiled likelihood not kept (%s)", error)
        return None
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()
    cache.remember("likelihood", key, base64.b64encode(pickle.dumps(blobs)).decode(), FOLDER)
    return executables


def _fresh(jitted):
    """A new jit of ``jitted``'s Python function, so that it is traced and compiled anew.

    ``jitted`` itself may already hold an executable in jax's in-memory caches, loaded from the
    persistent compilation cache; such an executable serializes into bytes that do not load back
    ("Function ... not found"), and the layout would be marked as one that cannot be kept.
    """
    import jax

    inner = jitted.__wrapped__

    @functools.wraps(inner)
    def call(*args):
        return inner(*args)

    return jax.jit(call)


def _deserialize(blob):
    from jax.experimental import serialize_executable

    return serialize_executable.deserialize_and_load(*blob)


def _flat(output) -> list:
    return [np.asarray(part) for part in (output if isinstance(output, tuple) else (output,))]


@functools.cache
def _source() -> bytes:
    """The source of the likelihood module, whose functions the executables were compiled from."""
    from pyhf_dist.runtime.fast import likelihood

    return Path(likelihood.__file__).read_bytes()


@functools.cache
def _host() -> str:
    """The host's CPU: its model and instruction-set flags (Linux), or what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as stream:
            lines = [line for line in stream if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
