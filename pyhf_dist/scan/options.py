"""The options of a scan, each declared once: :class:`ScanOptions` here, :class:`FitSettings` for
what every worker applies to every patch.

:func:`~pyhf_dist.map_fits` and :func:`~pyhf_dist.iter_fits` take every declared option as a
keyword argument (their signatures and documentation are derived from the declarations, and so
are the options of ``pyhf-dist fit``); any other keyword goes to the executor. A new option is
one declaration, in :class:`ScanOptions` when it concerns the scan (what to fit, bookkeeping,
callbacks), in :class:`~pyhf_dist.settings.FitSettings` when it changes a fit.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
from typing import Any, Callable

from pyhf_dist.exceptions import InputError, SettingsError
from pyhf_dist.settings import CHOICE, PATH, FitSettings, declared, option

__all__ = ["ScanOptions", "split_options", "signature", "options_doc"]


def _many(name: str):
    """``--patch A --patch B`` as a list (``None``: all), ``--pallet X`` as one name."""
    def to_options(values: tuple) -> dict:
        if not values:
            return {}
        if name == "pallet" and len(values) == 1:
            return {name: values[0]}
        return {name: list(values)}
    return to_options


def _true(name: str):
    return lambda value: {name: True} if value else {}


@dataclasses.dataclass(frozen=True)
class ScanOptions:
    """What a scan fits and how it keeps its results (the statistics are in :class:`FitSettings`)."""

    patches: Any = option(None, "Patch names or shell-style patterns to fit; None fits all.", "-p", "--patch",
                          to_options=_many("patches"), multiple=True, metavar="NAME",
                          help="Patch name or glob to fit (repeatable; default: all).")
    pallet: Any = option(
        None, "Which pallets of a source that holds several (an archive with Region-combined/, "
        "Region-lowMass/... folders): a name, a list of names, a shell-style pattern, or 'all'. Required when "
        "there are several. Records carry their pallet's name (None for a single-pallet source).",
        "--pallet", to_options=_many("pallet"), multiple=True, metavar="NAME",
        help="Pallet to fit in a SOURCE that holds several, e.g. Region-combined (repeatable, or 'all').")
    signals: str | os.PathLike | None = option(
        None, "Signal points as data: a .csv or .parquet file, one row per point (name, model parameters, "
        "yields per channel bin), fitted instead of a patchset; workspace is then the background workspace "
        "(pyhf_dist.signals).", "--signals", type=PATH,
        help="Signal points as data: a .csv or .parquet file, one row per point (name, parameters, yields per bin).")
    template: Any = option(
        None, "With signals: how a row becomes a patch, a pyhf_dist.signals.Template, its dict, or a JSON file "
        "(channels, sample, normsys, staterror or shapesys); None: the defaults.", "--template",
        help="With --signals: how a row becomes a patch, a JSON file or JSON text (channels, sample, normsys, "
             "uncertainty).")
    combine: str | None = option(
        None, "'best-expected': also, per signal point, the record of the pallet with the smallest median "
        "expected CLs (pallet='best-expected', naming the chosen_pallet); needs two pallets or more.",
        "--combine", type=CHOICE(("best-expected",)),
        help="Also combine the pallets: per point, the one with the smallest median expected CLs.")
    journal: str | os.PathLike | None = option(
        None, "A JSON-lines file every finished record is appended to as it arrives.", "--journal", type=PATH,
        help="Journal of finished results [default: <output>.journal.jsonl beside the output].")
    resume: bool = option(False, "Skip the patches whose record in the journal is ok (failed ones are fit again).",
                          "--resume", to_options=_true("resume"), is_flag=True)
    retries: int = option(2, "Resubmissions of a task whose worker died.", "--retries", type=int, show_default=True)
    timeout: float | None = option(None, "Seconds per fit, after which it is recorded as failed.", "--timeout",
                                   type=float)
    keep_toys: str | os.PathLike | None = option(
        None, "Write every patch's toy distributions to this .npz file (files of runs with other seeds merge "
        "with pyhf_dist.kept_toys.merge_kept, or pyhf-dist merge-toys).", "--keep-toys", type=PATH,
        help="With --toys: write the toy distributions to this .npz (merge runs with pyhf-dist merge-toys).")
    metadata: dict | None = option(None, "A dict filled with the scan's metadata as soon as it is known.")
    on_start: Callable[[dict], None] | None = option(None, "Called with the scan's metadata once the executor is up.")
    on_chunk: Callable[[dict], None] | None = option(
        None, "Called with every finished chunk of toys (its record as the worker returned it).")
    on_toy_progress: Callable[[int], None] | None = option(
        None, "Called, about every second while toys are fitted, with the toys of each hypothesis fitted so "
        "far in this run: finished chunks, and what running ones report where their workers share this "
        "machine's filesystem.")

    def __post_init__(self):
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or self.retries < 0:
            raise InputError(f"retries must be a non-negative integer, got {self.retries!r}")
        if self.timeout is not None and (not isinstance(self.timeout, (int, float)) or self.timeout <= 0):
            raise InputError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        for name in ("journal", "keep_toys"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise InputError(f"{name} must be a file path (a str or pathlib.Path), got {value!r}")
        if not isinstance(self.resume, bool):
            raise InputError(f"resume must be True or False, got {self.resume!r}")


#: Keyword arguments of map_fits only (its collector), declared here with the others.
COLLECTOR = {
    "callback": "Called with each FitRecord as it arrives.",
    "progress": "Show a progress bar on standard error (for toys, with toys per second).",
}


def split_options(options: dict) -> tuple[FitSettings, ScanOptions, dict]:
    """Route keyword arguments: the fit settings, the scan's options, and the executor's options
    (everything else, checked by the executor)."""
    fit_names = {field.name for field in declared(FitSettings)}
    scan_names = {field.name for field in declared(ScanOptions)}
    settings = FitSettings(**{name: value for name, value in options.items() if name in fit_names})
    scan = ScanOptions(**{name: value for name, value in options.items() if name in scan_names})
    rest = {name: value for name, value in options.items() if name not in fit_names | scan_names}
    return settings, scan, rest


#: Names physicists give the settings that spelling alone does not lead to.
SYNONYMS = {"mu": "poi_test", "poi": "poi_test", "poi_value": "poi_test", "mu_test": "poi_test",
            "calculator": "calctype", "teststat": "test_stat", "test_statistic": "test_stat"}


def misspelt(options: dict) -> None:
    """Raise one line naming the option an unknown keyword most resembles, if any does.

    >>> misspelt({"mu": 1.0})
    Traceback (most recent call last):
    ...
    pyhf_dist.exceptions.SettingsError: unknown argument 'mu': did you mean poi_test?
    """
    names = [field.name for cls in (FitSettings, ScanOptions) for field in declared(cls)] + list(COLLECTOR)
    for given in options:
        if given in COLLECTOR:  # given to iter_fits, which yields the records instead
            raise SettingsError(f"{given!r} is an argument of map_fits; iter_fits yields each record as it arrives "
                                "and takes none")
        close = [SYNONYMS[given]] if given in SYNONYMS else difflib.get_close_matches(given, names, n=1, cutoff=0.75)
        if close:
            raise SettingsError(f"unknown argument {given!r}: did you mean {close[0]}?")


def signature(*leading: inspect.Parameter, collector: bool = False) -> inspect.Signature:
    """The signature of a scan function: ``leading`` parameters, then every declared option as a
    keyword, then ``**executor_options``."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    parameters = list(leading)
    for cls in (FitSettings, ScanOptions):
        parameters += [inspect.Parameter(field.name, keyword, default=field.default) for field in declared(cls)]
    if collector:
        parameters += [inspect.Parameter("callback", keyword, default=None),
                       inspect.Parameter("progress", keyword, default=False)]
    parameters.append(inspect.Parameter("executor_options", inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(parameters)


def options_doc(collector: bool = False, indent: str = "        ") -> str:
    """The declared options as the ``Args`` lines of a Google-style docstring."""
    lines = []
    entries = [(field.name, field.metadata["help"]) for cls in (FitSettings, ScanOptions) for field in declared(cls)]
    if collector:
        entries += list(COLLECTOR.items())
    for name, text in entries:
        lines.append(f"{indent}{name}: {text}")
    return "\n".join(lines)
