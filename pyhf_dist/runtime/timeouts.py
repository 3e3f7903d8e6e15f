"""The per-fit ``timeout`` on a worker: an alarm that ends a fit wherever it is.

A timed-out fit must free its worker. SIGALRM interrupts the fit between two Python-level steps;
it can only be used from a process's main thread, which is where process-pool, Parsl and Globus
Compute workers run their tasks. Elsewhere (Dask's threads) a fit that ran past its time is failed
as it ends, and one that never ends is given up by the scan's client-side timeout.
Compiling the likelihood for a layout is a one-off cost of the worker, not of the fit that meets
it first: the alarm waits meanwhile (:func:`paused`), so a timeout shorter than a compilation
does not fail every patch of a new layout on a machine whose cache is empty. Nor does the alarm
cut an import short (:func:`_on_alarm`): a package left half made would fail every later fit of the
worker.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time

__all__ = ["FitTimeout", "call_with_timeout", "paused", "reporting", "timed_out"]


class FitTimeout(BaseException):
    """A fit ran past the scan's per-fit ``timeout``.

    Not an :class:`Exception`, as :class:`KeyboardInterrupt` is not: the alarm lands anywhere in
    the fit, and code that falls back on any error of its own (the fast path handing a patch to
    plain pyhf, a kept executable given up for a fresh compilation) must not take the end of the
    fit's time for such an error and go on fitting past it.
    """


#: Seconds after which an alarm that landed in an import, or whose timeout was dropped, goes off again.
RETRY = 0.05


def _on_alarm(signum, frame):
    # Armed again before anything else: the timeout is raised wherever the alarm lands, and where
    # that is a garbage collector's callback (jax keeps one) or an object's finaliser, Python prints
    # "Exception ignored" and drops it, and a one-shot alarm would leave the fit running past its
    # time (seen: a 10 ms timeout never ending 0.1 s fits). The alarm goes off until the timeout
    # gets through; the end of the fit disarms it.
    signal.setitimer(signal.ITIMER_REAL, RETRY)
    if _importing(frame):
        # Python drops a module whose import raised, but not what it had set up meanwhile: a worker
        # whose first fit timed out inside `import pyhf` went on with a pyhf lacking
        # `default_backend`, failing every later patch. The import ends first; then the fit does.
        return
    raise FitTimeout()


def _importing(frame) -> bool:
    """Whether ``frame`` runs inside Python's import machinery (a module's body being executed)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def timed_out(error: BaseException) -> bool:
    """Whether ``error`` is a :class:`FitTimeout`, or a library's exception around one.

    The alarm raises wherever the fit is: inside a library that turns every exception into its own
    (jsonschema, resolving the schema of a slow-to-build model, raises ``_RefResolutionError`` from
    it), the timeout arrives wrapped, and is still a timeout.

    >>> try:
    ...     try:
    ...         raise FitTimeout()
    ...     except FitTimeout as error:
    ...         raise ValueError("a library's own error") from error
    ... except ValueError as error:
    ...     timed_out(error), timed_out(ValueError("no timeout"))
    (True, False)
    """
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, FitTimeout):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


#: The fit under way on this thread: ``seconds`` held by :func:`paused` so far, ``depth`` of the
#: pauses open now, and ``report``, whom :func:`reporting` names to hear of them.
_fit = threading.local()


def call_with_timeout(function, timeout: float | None):
    """``function()``, ended by :class:`FitTimeout` after ``timeout`` seconds.

    In the main thread the alarm ends it. In another (a Dask worker runs its tasks in threads) no
    alarm can: the fit runs to its end, and one that took longer than ``timeout`` (time held by
    :func:`paused` aside) raises :class:`FitTimeout` then, so that a scan's records are the same on
    every executor. A fit that never ends there is the scan's to give up (its client-side timeout).
    """
    if not timeout:
        return function()
    _fit.seconds = 0.0
    if threading.current_thread() is not threading.main_thread():
        began = time.monotonic()
        result = function()
        if time.monotonic() - began - _fit.seconds > timeout:
            raise FitTimeout()
        return result
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, float(timeout))
    try:
        return function()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def paused():
    """Hold the alarm of the fit under way (if any) while the body runs, then give the fit the
    rest of its time. Whoever :func:`reporting` names hears of it as the clock stops and starts."""
    depth = getattr(_fit, "depth", 0)
    _fit.depth = depth + 1
    report = getattr(_fit, "report", None) if depth == 0 else None
    main = threading.current_thread() is threading.main_thread()
    remaining = signal.setitimer(signal.ITIMER_REAL, 0)[0] if main else 0.0
    began = time.monotonic()
    if report is not None:
        report(getattr(_fit, "seconds", 0.0), time.time())
    try:
        yield
    finally:
        _fit.depth = depth
        if depth == 0:
            _fit.seconds = getattr(_fit, "seconds", 0.0) + time.monotonic() - began
            if report is not None:
                report(_fit.seconds, None)
        if remaining:
            signal.setitimer(signal.ITIMER_REAL, remaining)


@contextlib.contextmanager
def reporting(report):
    """Within the block, call ``report(held, since)`` as a fit on this thread holds its clock
    (``since``: the Unix time it stopped) and starts it again (``since`` ``None``); ``held`` is
    the seconds held before. For a worker whose client must hear of it: the client's backstop
    for a stuck fit (:meth:`~pyhf_dist.executors.base.Executor.held_seconds`) does not count
    a compilation either.
    """
    before = getattr(_fit, "report", None)
    _fit.report, _fit.seconds = report, 0.0
    try:
        yield
    finally:
        _fit.report = before
