"""Ctrl-C, SIGTERM and SIGHUP during a scan: a ``KeyboardInterrupt`` in the main thread, never lost.

Python raises ``KeyboardInterrupt`` wherever the main thread is when the signal is handled. Inside
a garbage-collector callback (Dask's client registers one that times collections) the exception
cannot propagate: Python prints it as "Exception ignored" with a traceback, and the scan goes on
as if nobody had pressed Ctrl-C. :func:`stop_signals_as_interrupt` installs a handler that raises it
only outside such callbacks, and raises it again a moment later otherwise.
"""

from __future__ import annotations

import _thread
import contextlib
import gc
import signal
import threading

__all__ = ["stop_signals_as_interrupt"]

#: What stops a scan as Ctrl-C does: Ctrl-C, a batch system's SIGTERM, a closed terminal's SIGHUP.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
#: Seconds after which an interrupt that landed in a gc callback is raised again.
RETRY_SECONDS = 0.05


def _interrupt(number: int, frame) -> None:
    if _in_gc_callback(frame):
        threading.Timer(RETRY_SECONDS, _thread.interrupt_main, args=(number,)).start()
        return
    raise KeyboardInterrupt


def _in_gc_callback(frame) -> bool:
    codes = {getattr(getattr(callback, "__func__", callback), "__code__", None) for callback in gc.callbacks}
    codes.discard(None)
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def stop_signals_as_interrupt():
    """While the scan runs: Ctrl-C raises ``KeyboardInterrupt`` (outside gc callbacks), and so does
    SIGTERM, as a batch job at its time limit gets (by default Python would die of it on the spot,
    leaving the workers and clusters it started to notice by themselves).

    Only for handlers nobody chose (Python's own, or the default for SIGTERM), and only in the main
    thread, where handlers can be set; they are put back afterwards.
    """
    replaced = {}
    if threading.current_thread() is threading.main_thread():
        for number in STOP_SIGNALS:
            # Python's own handler counts as nobody's choice (the command line sets it for SIGTERM
            # and SIGHUP), and so does the default for SIGTERM and SIGHUP (a closed terminal).
            previous = signal.getsignal(number)
            if previous is signal.default_int_handler or (number != signal.SIGINT and previous is signal.SIG_DFL):
                replaced[number] = previous
                signal.signal(number, _interrupt)
    try:
        yield
    finally:
        for number, previous in replaced.items():
            if signal.getsignal(number) is _interrupt:
                signal.signal(number, previous)
