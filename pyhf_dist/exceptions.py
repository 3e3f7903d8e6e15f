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
    "PalletSelectionError",
    "SettingsError",
    "UnknownExecutorError",
    "ExecutorOptionError",
    "OutputError",
    "JournalError",
    "StorageError",
    "StorageWarning",
    "DownloadError",
    "MissingDependencyError",
    "ExecutorError",
    "WorkerLostError",
    "PayloadTooLargeError",
    "FastPathRequired",
    "UpperLimitError",
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


class PalletSelectionError(PalletError):
    """A source with several pallets and no choice made, or a pallet name that names none of them."""


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


class StorageError(PyhfDistError, OSError):
    """The machine could not keep what a scan writes: a full disk, an exceeded quota, an output
    folder made read-only or removed.

    The scan stops (it would otherwise fit patches whose results it cannot keep). The message is
    one line saying what failed and what was kept; :attr:`kept` counts the whole records in the
    journal, which a scan run again with ``resume=True`` (``--resume``) skips.

    Attributes:
        path: The file that could not be written.
        kept: Whole records in the journal (``None``: no journal).
        journal: The journal holding them.
        errno: The operating system's error number (``errno.ENOSPC``...), when there is one.
    """

    def __init__(self, message: str, *, path=None, kept: int | None = None, journal=None, errno: int | None = None):
        super().__init__(message)
        self.path = path
        self.kept = kept
        self.journal = journal
        self.errno = errno

    def __str__(self) -> str:
        return self.args[0] if self.args else ""

    @property
    def remedy(self) -> str:
        """What to do before continuing, in a few words."""
        return self.remedy_for(self.errno)

    @staticmethod
    def remedy_for(errno: int | None) -> str:
        """What to do about a failed write with the operating system's error ``errno``.

        >>> import errno
        >>> StorageError.remedy_for(errno.ENOSPC)
        'free some space there'
        """
        import errno as codes

        return {
            codes.ENOSPC: "free some space there",
            codes.EDQUOT: "free some of your disk quota",
            codes.EROFS: "make that folder writable again",
            codes.EACCES: "make that folder writable again",
            codes.EPERM: "make that folder writable again",
        }.get(errno, "fix that")


class StorageWarning(UserWarning):
    """A file a scan writes besides its results (``keep_toys``) could not be written; the scan's
    records are returned all the same, and the message says where the missing data is kept.

    Attributes:
        path: The file that could not be written.
        errno: The operating system's error number, when there is one.
    """

    def __init__(self, message: str, *, path=None, errno: int | None = None):
        super().__init__(message)
        self.path = path
        self.errno = errno


class DownloadError(PyhfDistError, ConnectionError):
    """A pallet that could not be downloaded because its server cannot be reached: the network's
    fault, not the source's (a source the server does not know is a :class:`PalletError`)."""


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

    The scan retries such tasks on another worker, up to its ``retries``. A task lost with
    workers that were not its own (``bystander``: a stalled Parsl started afresh) is sent again
    without using up a retry.
    """

    def __init__(self, message: str = "", *, bystander: bool = False):
        super().__init__(message)
        self.bystander = bystander


class PayloadTooLargeError(ExecutorError):
    """A task is larger than the executor's transport allows."""


class FastPathRequired(PyhfDistError):
    """The fast path declined a patch of a scan with ``require_fast`` (``--require-fast``) on.

    Not raised to the caller of a scan: the patch's record fails with this message, which says
    why the fast path declined.
    """


class UpperLimitError(PyhfDistError, ValueError):
    """An upper limit pyhf's search cannot reach: it would test a POI value outside the POI's bounds.

    pyhf's ``upper_limit`` fails such a patch too (``ValueError``: an initial value outside its
    bounds); the message says which bound and how to widen it.
    """
