"""The result of one patch (:class:`FitRecord`), and how results are written safely.

A record is JSON-able (:meth:`FitRecord.to_dict`, :func:`json_safe`); files are written
atomically (:func:`write_atomic`, :func:`written_aside`: a temporary file in the same directory,
then a rename), so an interrupted write never leaves half a file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["FitRecord", "write_atomic", "written_aside", "is_stream", "json_safe", "EXCLUSION_LEVEL", "COMBINATIONS"]

EXCLUSION_LEVEL = 0.05
#: Names of the combinations of several pallets; records of a combination carry it as ``pallet``.
COMBINATIONS = ("best-expected",)
#: Most distinct worker descriptions shared between records (:meth:`FitRecord.from_dict`).
SHARED_WORKERS = 4096
_WORKERS: dict = {}


@dataclasses.dataclass(slots=True)
class FitRecord:
    """The result of one patch.

    Attributes:
        name: Patch name.
        values: The patch's point in the signal plane (e.g. masses).
        status: ``"ok"`` or ``"failed"``.
        CLs_obs: Observed CLs at the tested POI value (hypotests).
        CLs_exp: Expected CLs, five values for -2σ, -1σ, median, +1σ, +2σ (hypotests).
        error: Why the fit failed (``None`` when ok).
        fit_seconds: Time spent computing on the worker (for points fitted together, their
            time divided among them).
        submitted: Unix time the task was submitted.
        started: Unix time the worker started it.
        finished: Unix time the worker finished it.
        worker: ``{"host", "pid", "slurm_job_id"}`` of the worker that ran it (and
            ``"fits_together": True`` where that worker fits a pack's patches together: a GPU).
        attempts: 1, plus once for every time the worker running it died (its retries).
        mu_up_obs: Observed upper limit on the signal strength (upper-limit scans).
        mu_up_exp: Expected upper limits, five values -2σ..+2σ (upper-limit scans).
        pallet: The pallet the patch belongs to, in a source that holds several (e.g.
            ``"Region-combined"``); ``None`` for the only pallet of its source. For a combination
            of pallets, the combination's name (``"best-expected"``).
        chosen_pallet: In a combination's record, the pallet whose result it took (``None`` when
            no pallet could be chosen: the record is then failed and ``error`` says why).
        engine: What fitted the patch: ``"fast"`` (the compiled fast path) or ``"pyhf"`` (plain
            pyhf on numpy); ``None`` for a failed record.
        fallback_reason: For ``engine="pyhf"`` on a scan that asked for the fast path: why the
            fast path declined the patch (one line); ``None`` otherwise.
        ntoys: Pseudo-experiments per hypothesis (toy-based records).
        seed: Random seed of the pseudo-experiments (toy-based records).
        converged: How the fits behind the numbers ended: ``True`` when every one is certified
            converged (the fast path checks each: projected gradient, a second start, the free
            fit not above any conditional one); ``False`` when one is not; ``None`` when they were
            not checked (plain pyhf's own fits, whose minimizer reports success even where it
            stalls).
        fits: The certificate of each fit (fast path): ``{name: {"twice_nll", "gradient",
            "converged", "start"}}``, names such as ``"observed free"``, ``"observed mu=1"``,
            ``"asimov mu=1"`` (the tested value in full where six digits do not give it exactly:
            :func:`~pyhf_dist.runtime.fast.fit.fit_name`); ``"other_starts"`` lists starts that
            ended on higher minima.
        pyhf_default: Where pyhf's default minimizer (SciPy's SLSQP) stalls at its starting
            point on the patch: ``{"stalls_at_start": True, "fit", "stops_above_minimum"}`` (how
            far, in -2 log L, above the minimum its fit stops); ``None`` otherwise.
        toy_summary: Toy-based records: the toys whose likelihood has no minimum, per hypothesis,
            and CLs with them treated otherwise (:func:`pyhf_dist.chunks.no_minimum_summary`).
    """

    name: str
    values: list = dataclasses.field(default_factory=list)
    status: str = "ok"
    CLs_obs: float | None = None
    CLs_exp: list | None = None
    error: str | None = None
    fit_seconds: float | None = None
    submitted: float | None = None
    started: float | None = None
    finished: float | None = None
    worker: dict | None = None
    attempts: int = 1
    mu_up_obs: float | None = None
    mu_up_exp: list | None = None
    pallet: str | None = None
    chosen_pallet: str | None = None
    engine: str | None = None
    fallback_reason: str | None = None
    ntoys: int | None = None
    seed: int | None = None
    converged: bool | None = None
    fits: dict | None = None
    pyhf_default: dict | None = None
    toy_summary: dict | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def key(self) -> tuple:
        """``(pallet, name)``: what identifies a record in a scan of several pallets."""
        return (self.pallet, self.name)

    @property
    def combined(self) -> bool:
        """Whether the record is a combination of pallets' records, not a fit of its own."""
        return self.pallet in COMBINATIONS

    @property
    def excluded(self) -> bool | None:
        """Whether the observed CLs excludes the point at 95% CL (``None`` when unknown)."""
        if not self.ok or self.CLs_obs is None:
            return None
        return self.CLs_obs < EXCLUSION_LEVEL

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fields(self) -> dict:
        """The record's fields as a dict, their values not copied (cheaper than :meth:`to_dict`;
        the same keys as :meth:`to_dict`)."""
        return {name: getattr(self, name) for name in _FIELD_NAMES}

    @classmethod
    def from_dict(cls, data: dict) -> "FitRecord":
        """Build a record from a dict; unknown keys are ignored, missing ones take defaults."""
        names = _FIELD_SET if cls is FitRecord else {field.name for field in dataclasses.fields(cls)}
        known = {key: value for key, value in data.items() if key in names}
        if "name" not in known:
            raise ValueError("a result record needs a 'name'")
        known["values"] = list(known.get("values") or [])
        known["worker"] = _shared_worker(known.get("worker"))
        return cls(**known)


def _shared_worker(worker):
    """One dict for equal worker descriptions: a scan's records name a few workers many times
    (on a 10^5-point scan, ~180 bytes per record). Records' worker dicts are for reading."""
    if not isinstance(worker, dict):
        return worker
    try:
        key = tuple(worker.items())
        found = _WORKERS.get(key)
    except TypeError:  # an unhashable value: kept as it is
        return worker
    if found is None:
        if len(_WORKERS) >= SHARED_WORKERS:
            return worker
        found = _WORKERS[key] = worker
    return found


_FIELD_NAMES = tuple(field.name for field in dataclasses.fields(FitRecord))
# Made once: from_dict runs for every record a scan receives.
_FIELD_SET = frozenset(_FIELD_NAMES)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (:func:`written_aside`)."""
    with written_aside(path) as temporary, open(temporary, "w", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        if stat.S_ISREG(os.fstat(stream.fileno()).st_mode):  # a device or a pipe keeps nothing to sync
            os.fsync(stream.fileno())


def is_stream(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a device or a pipe (``/dev/stdout``, ``/dev/null``, a named pipe),
    through any link: a file written in place, never replaced. ``False`` where nothing is there."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


@contextlib.contextmanager
def written_aside(path: str | os.PathLike, suffix: str = ".tmp"):
    """A temporary file's name beside ``path`` to write the file to; renamed to ``path`` when the
    block ends, removed if it raises, so a kill leaves the previous file or the new one. Where
    ``path`` is a link, the file it names is replaced; where it is a device or a pipe, the name
    given is ``path`` itself, written in place.

    The file gets the permissions ``open(path, "w")`` would have given it: a temporary file is
    readable by its owner only, but a results file is for sharing, so it gets those of the file it
    replaces, or those the umask gives a new file.
    """
    path = Path(path)
    if is_stream(path):
        # Written in place: a rename would put a plain file where the device was (as root, even in /dev).
        yield str(path)
        return
    if path.is_symlink():
        # The file the link names is replaced, and the link kept (a rename would replace the link).
        path = Path(os.path.realpath(path))
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent or ".")
    os.close(handle)
    try:
        yield temporary
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            mode = 0o666 & ~_umask()
        # A filesystem that keeps no permissions (some network and Windows shares) refuses chmod:
        # the file is written all the same.
        with contextlib.suppress(OSError):
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _umask() -> int:
    """This process's umask, read without setting it (``os.umask`` sets it, for every thread)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def json_safe(value: Any) -> Any:
    """The value with every non-finite float replaced by ``None`` (JSON has no NaN)."""
    # JSON has no NaN or infinity; a failed number is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value
