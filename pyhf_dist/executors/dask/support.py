"""What the Dask executor needs around its engine: futures handed on, errors told apart, logs
quieted, a scheduler address checked."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging

from pyhf_dist.exceptions import ExecutorError
from pyhf_dist.protocol import first_line

__all__ = ["transfer", "killed_while_starting", "lost_worker_errors", "quiet_dask_logs", "check_reachable",
           "drop_lost_connection_reports", "hold_gc_diagnosis"]


def transfer(outer: concurrent.futures.Future, inner) -> None:
    """Hand the outcome of a Dask future on to the ``concurrent.futures`` future of the scan.

    Runs in Dask's callback thread, racing the scan: at shutdown the scan cancels ``outer``, and
    Dask may cancel ``inner``, between any two lines here. Either way nothing waits for the outcome.
    """
    if outer.done():
        return
    try:
        error = inner.exception() if inner.status == "error" else None
        outcome = inner.result() if error is None else None
    except concurrent.futures.CancelledError as cancelled:  # Dask's FutureCancelledError included
        if getattr(cancelled, "reason", None) != SCHEDULER_LOST:
            _cancel(outer)
            return
        # Not the scan's doing: every task the client held is cancelled with this reason.
        error = ExecutorError(_SCHEDULER_LOST_MESSAGE)
    except Exception as failure:  # fetching the result failed (the scheduler went away meanwhile)
        # Raised here it would stay in Dask's callback thread, and the scan would wait for ever.
        client = getattr(inner, "client", None)
        error = failure if getattr(client, "status", "running") == "running" else ExecutorError(_SCHEDULER_LOST_MESSAGE)
    try:
        if error is None:
            outer.set_result(outcome)
        else:
            outer.set_exception(error)
    except concurrent.futures.InvalidStateError:  # cancelled by the scan meanwhile
        pass


#: Why Dask cancels every future of a client whose connection to the scheduler broke.
SCHEDULER_LOST = "scheduler-connection-lost"
_SCHEDULER_LOST_MESSAGE = ("the connection to the Dask scheduler was lost (it stopped, or the network failed): fit "
                           "this patch again once the scheduler is back (--resume fits only what failed)")


def _cancel(outer: concurrent.futures.Future) -> None:
    if outer.cancel():
        outer.set_running_or_notify_cancel()  # wakes up whoever waits on it


def killed_while_starting(error: BaseException, executor) -> bool:
    """Whether a failed start was a worker process (or batch job) lost, not a worker unable to start."""
    if isinstance(error, lost_worker_errors()):
        return True
    text = str(error)
    return "killed by SIG" in text or (isinstance(error, ExecutorError) and "CommClosedError" in text)


def lost_worker_errors() -> tuple[type[BaseException], ...]:
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    return (KilledWorker, CommClosedError)


@contextlib.contextmanager
def quiet_dask_logs(quiet: bool, level: int = logging.ERROR):
    """Dask's loggers at ``level`` for the duration (their own level, not their handlers', which a
    closing SpecCluster resets), when ``quiet``."""
    logger = logging.getLogger("distributed")
    previous = logger.level
    if quiet:
        logger.setLevel(max(previous, level))
    try:
        yield
    finally:
        if quiet:
            logger.setLevel(previous)


class _LostConnectionReports(logging.Filter):
    """asyncio's "exception was never retrieved" report (with its traceback) of a Dask task
    that failed on a closed connection: a message the scheduler sent to a worker that had just died,
    as when it broadcasts our worker plugin. Dask handles the loss itself, and the scan says in one
    line what was lost; the report is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        # "Task exception ..." from the task itself; "Future exception ..." from Dask's ``All``,
        # which watches the other messages of a broadcast once one has failed.
        if error is None or "exception was never retrieved" not in str(record.msg):
            return True
        from distributed.comm.core import CommClosedError

        return not isinstance(error, CommClosedError)


class _SchedulerLossReports(logging.Filter):
    """A client that lost its scheduler logs its attempts to reconnect with a traceback, then that
    it gave up. The scan's records say what it means for them (each patch not finished fails with
    the reason); here one note replaces Dask's reports."""

    def filter(self, record: logging.LogRecord) -> bool:
        import asyncio

        error = record.exc_info[1] if record.exc_info else None
        if record.levelno >= logging.ERROR and isinstance(error, asyncio.CancelledError):
            return False  # the reconnecting task, cancelled as the client closes
        if str(record.msg).startswith("Failed to reconnect to scheduler"):
            logging.getLogger("pyhf_dist").warning(
                "lost the connection to the Dask scheduler: the patches not yet finished fail; once it is back, "
                "--resume fits them")
            return False
        return True


def drop_lost_connection_reports() -> None:
    """Install :class:`_LostConnectionReports` on asyncio's logger and
    :class:`_SchedulerLossReports` on Dask's client's (once per process)."""
    for name, kind in (("asyncio", _LostConnectionReports), ("distributed.client", _SchedulerLossReports)):
        logger = logging.getLogger(name)
        if not any(isinstance(each, kind) for each in logger.filters):
            logger.addFilter(kind())


def hold_gc_diagnosis() -> None:
    """Switch on Dask's garbage-collection diagnosis from this thread, once, for the process's life.

    A Dask scheduler or worker switches it on as it starts and off as it closes. Ours start on
    Dask's event-loop thread, while the scan's thread reads the pallet. If the switch lands in the
    middle of a full collection on the scan's thread (a finalizer lets the loop thread run), Dask's
    callback sees the collection's end without its start, and Python prints its failed assertion
    with a traceback. Held on from here, outside any collection, a scheduler's switch only counts.
    """
    global _gc_diagnosis_held
    if not _gc_diagnosis_held:
        from distributed.gc import enable_gc_diagnosis

        enable_gc_diagnosis()
        _gc_diagnosis_held = True


_gc_diagnosis_held = False


def check_reachable(address: str, timeout: float) -> None:
    """Fail at once, in one line, when nothing listens at a ``tcp://host:port`` address.

    Without this, a ``Client`` retries a refused connection until its timeout and leaves behind
    a half-built client that blocks the interpreter's exit for another ten seconds.
    """
    import socket
    import urllib.parse

    parsed = urllib.parse.urlsplit(address if "://" in address else f"tcp://{address}")
    if parsed.scheme != "tcp" or parsed.hostname is None:
        return  # tls://, ws://, inproc://: let the Client handle them
    try:
        port = parsed.port or 8786
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except (OSError, ValueError) as error:
        raise ExecutorError(
            f"cannot reach the Dask scheduler at {address} ({first_line(error)}): "
            "is it running, and is the address right?"
        ) from None
