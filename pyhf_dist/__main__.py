"""``python -m pyhf_dist`` is the ``pyhf-dist`` command; the ``pyhf-dist`` script calls :func:`program`.

Only the standard library is imported here, so that :func:`program` answers a Ctrl-C from the
interpreter's first moments to its last.
"""

import os
import signal
import sys
import threading

__all__ = ["program"]

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def program() -> None:
    """The ``pyhf-dist`` program: :func:`pyhf_dist.cli.main`, guarded against a Ctrl-C while its
    modules are imported and while the interpreter exits.

    While the command's modules are imported (a quarter of a second) nothing has started that
    could be kept: a Ctrl-C ends the program with one line, not with the traceback of an import.
    When ``main`` returns every result is written; the interpreter's own exit that follows (joining
    threads, atexit handlers) would take a Ctrl-C as a traceback, and at its very end, where Python
    has put back the default handlers, as death by SIGINT without a word: the scan would look
    interrupted although it finished. So the stop signals are ignored from then on.
    """
    guarded = threading.current_thread() is threading.main_thread()
    if guarded:
        signal.signal(signal.SIGINT, _interrupted_while_starting)
    from pyhf_dist.cli import main

    if guarded:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    code = 130
    try:
        code = main()
        _ignore_stop_signals(guarded)
    except KeyboardInterrupt:  # in the instant between main's return and the line above
        _ignore_stop_signals(guarded)
    sys.exit(code)


def _interrupted_while_starting(number, frame) -> None:
    sys.stderr.write("\nInterrupted.\n")
    sys.stderr.flush()
    os._exit(130)  # nothing to clean up yet; and no import half done may catch a SystemExit


def _ignore_stop_signals(guarded: bool) -> None:
    if guarded:
        for number in STOP_SIGNALS:
            signal.signal(number, signal.SIG_IGN)


if __name__ == "__main__":
    program()
