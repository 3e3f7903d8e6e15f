"""Every error pyhf-dist raises on purpose.

All derive from :class:`PyhfDistError`. Errors caused by what the user gave us (a path, a
setting, a patch name) also derive from :class:`InputError`; their message is one line that
says what is wrong and how to fix it, and the command-line tool prints exactly that line.
"""

from __future__ import annotations

__all__ = [
    "PyhfDistError",
    "InputError",
    "PalletError",
    "WorkspaceError",
    "PatchSelectionError",
    "SettingsError",
    "UnknownExecutorError",
    "ExecutorOptionError",
    "OutputError",
    "JournalError",
    "MissingDependencyError",
    "ExecutorError",
    "WorkerLostError",
    "PayloadTooLargeError",
    "first_line",
]


class PyhfDistError(Exception):
    """Base class of every error raised by pyhf-dist."""


class InputError(PyhfDistError, ValueError):
    """Something the user gave us is wrong; the message says how to fix it."""


class PalletError(InputError):
    """A pallet, workspace or patchset could not be found or read."""


class WorkspaceError(InputError):
    """JSON that is not a valid HistFactory workspace or patch (the message names the JSON path)."""


class PatchSelectionError(InputError):
    """Patch names or patterns that select nothing, or an empty selection."""


class SettingsError(InputError):
    """An invalid fit setting: POI value, test statistic, backend, interpolation code..."""


class UnknownExecutorError(InputError):
    """An executor name that is not registered; the message lists the valid ones."""


class ExecutorOptionError(InputError):
    """A keyword argument the chosen executor does not accept."""


class OutputError(InputError):
    """An output path that cannot be written."""


class JournalError(InputError):
    """A journal that cannot be resumed (unreadable, or written with other settings)."""


class MissingDependencyError(PyhfDistError, ImportError):
    """An optional backend is not installed; the message gives the ``pip install`` to run."""

    def __init__(self, package: str, extra: str, purpose: str):
        self.package = package
        self.extra = extra
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed: "
            f'pip install "pyhf-dist[{extra}]"'
        )


class ExecutorError(PyhfDistError, RuntimeError):
    """An executor could not start, reach its scheduler, or run tasks."""


class WorkerLostError(ExecutorError):
    """The worker running a task died (process killed, batch job cancelled, node lost).

    The scan retries such tasks on another worker.
    """


class PayloadTooLargeError(ExecutorError):
    """A task is larger than the executor's transport allows."""


def first_line(error: BaseException, *, with_type: bool = False) -> str:
    """The first line of an error's message, for one-line reports (its type name if it has none).

    Args:
        error: The exception.
        with_type: Prefix the exception's type name (``"KeyError: 'x'"``), for errors whose
            message alone does not say what went wrong.

    >>> first_line(ValueError("bad value:\\nmore detail"))
    'bad value'
    >>> first_line(KeyError("x"), with_type=True)
    "KeyError: 'x'"
    >>> first_line(RuntimeError())
    'RuntimeError'
    """
    lines = str(error).strip().splitlines()
    text = lines[0].rstrip(":").strip() if lines else ""
    if not text:
        return type(error).__name__
    return f"{type(error).__name__}: {text}" if with_type else text
