"""Exclusion plots from scan results: the CLs = 0.05 (or μ_up = 1) contours in the signal plane.

:func:`plot_exclusion` reads a results file (or a :class:`~pyhf_dist.results.ScanResult`) and
draws, in the plane of the patches' first two ``values``:

* the observed contour (solid) and the expected one (dashed) with its ±1σ band (filled);
* every fitted point; failed points as red crosses, points fitted without a finite value
  (e.g. CLs = 0/0) as orange plus signs.

Signal grids are irregular (diagonal edges, denser rows near the kinematic limit), so the contours
come from a Delaunay triangulation of the points with the statistic interpolated linearly on each
triangle in ``log10`` (CLs falls roughly exponentially with the mass: linear in log is the natural
interpolation, and it keeps tiny CLs values from flattening the contour). The triangulation is done
in coordinates scaled to the unit square, so that a 1000 GeV-wide, 400 GeV-high grid does not get
needle-like triangles, and needle triangles left on the hull are masked.

matplotlib is imported only when a plot is made (the ``plot`` extra); mplhep's style is used when
it is installed.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

from pyhf_dist.exceptions import InputError, MissingDependencyError, OutputError
from pyhf_dist.results import EXCLUSION_LEVEL, FitRecord, ScanResult

__all__ = ["plot_exclusion", "load_results", "choose_pallet", "exclusion_points", "FORMATS"]

#: Output formats the plot command is documented for (any matplotlib format works).
FORMATS = ("png", "pdf", "svg")

# Values at or below this are clipped before the log (toy-based CLs can be exactly 0).
_FLOOR = 1e-12
# How finely each triangle is subdivided to draw the ±1σ band (see _band).
_BAND_SUBDIVISIONS = 3
_COLORS = {"observed": "#c00000", "expected": "#1f3b8f", "band": "#ffd700", "points": "0.35", "failed": "#e00000",
           "missing": "#ff8c00"}


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        import matplotlib.tri  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("matplotlib", "plot", "plotting") from None
    return Figure


def load_results(results: Any) -> ScanResult:
    """A :class:`ScanResult` from a path (JSON, CSV or Parquet), JSON text, a dict, records, or a ScanResult.

    >>> load_results([{"name": "a", "values": [1, 2], "CLs_obs": 0.5, "status": "ok"}])["a"].CLs_obs
    0.5
    """
    if isinstance(results, ScanResult):
        return results
    if isinstance(results, dict):
        return ScanResult.from_dict(results)
    if isinstance(results, (list, tuple)):
        return ScanResult([r if isinstance(r, FitRecord) else FitRecord.from_dict(r) for r in results])
    if str(results).lower().endswith(".csv"):
        return ScanResult.from_csv(results)
    if str(results).lower().endswith(".parquet"):
        from pyhf_dist.signals.output import read_parquet

        return read_parquet(results)
    return ScanResult.from_json(results)


def choose_pallet(result: ScanResult, pallet: str | None) -> ScanResult:
    """The records of one pallet of ``result`` (all of them when ``pallet`` is ``None`` and the
    results hold one pallet).

    Raises:
        PalletSelectionError: The results hold several pallets and none was chosen, or not the
            one asked for.
    """
    from pyhf_dist.exceptions import PalletSelectionError
    from pyhf_dist.results import COMBINATIONS

    if pallet is not None:
        return result.for_pallet(pallet)
    available = result.pallets()
    if len(available) > 1:
        fitted = [name for name in available if name not in COMBINATIONS]
        combined = [name for name in COMBINATIONS if name in available or len(fitted) > 1]
        their = f" and their combination {', '.join(combined)}" if combined else ""
        raise PalletSelectionError(
            f"the results hold {len(fitted)} pallets ({', '.join(fitted)}){their}; choose one to draw with "
            "--pallet NAME (pallet= in Python)"
        )
    return result


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _band_of(values) -> list | None:
    if isinstance(values, (list, tuple)) and len(values) == 5 and all(_finite(v) for v in values):
        return [float(v) for v in values]
    return None


def exclusion_points(result: ScanResult, quantity: str = "auto", axes: tuple[int, int] = (0, 1)) -> dict:
    """The numbers a plot is made of, as plain lists.

    Args:
        result: The scan's results.
        quantity: ``"CLs"``, ``"mu_up"``, or ``"auto"`` (CLs when present, else upper limits).
        axes: Which two entries of each record's ``values`` span the plane.

    Returns:
        ``{"quantity", "level", "x", "y", "observed", "expected" (5 per point or None), "failed",
        "missing"}``: one entry per point with a usable observed value; failed points, and points
        whose fit succeeded without a finite observed value (e.g. CLs = 0/0), are listed as
        ``(x, y, name)`` in ``failed`` and ``missing``.

    >>> r = load_results([{"name": "a", "values": [1, 2], "CLs_obs": 0.5, "status": "ok"},
    ...                   {"name": "b", "values": [3, 2], "status": "failed"}])
    >>> p = exclusion_points(r); p["quantity"], p["x"], p["failed"], p["missing"]
    ('CLs', [1.0], [(3.0, 2.0, 'b')], [])
    """
    records = list(result)
    if (result.metadata.get("settings") or {}).get("test_stat") == "q0":
        raise InputError("these results are discovery p-values (test statistic q0), not CLs: an exclusion plot "
                         "needs a scan with qtilde or q (the default), or upper limits")
    if quantity == "auto":
        if any(r.ok and _finite(r.CLs_obs) for r in records):
            quantity = "CLs"
        elif any(r.ok and _finite(r.mu_up_obs) for r in records):
            quantity = "mu_up"
        else:
            raise InputError("the results hold no observed CLs and no upper limits: nothing to plot")
    if quantity not in ("CLs", "mu_up"):
        raise InputError(f"unknown quantity {quantity!r}: choose CLs, mu_up or auto")
    fields = ("CLs_obs", "CLs_exp") if quantity == "CLs" else ("mu_up_obs", "mu_up_exp")
    need = max(axes) + 1
    points: dict = {"quantity": quantity, "level": EXCLUSION_LEVEL if quantity == "CLs" else 1.0,
                    "x": [], "y": [], "observed": [], "expected": [], "failed": [], "missing": []}
    for record in records:
        if len(record.values) < need:
            raise InputError(
                f"patch {record.name!r} has values {list(record.values)}: an exclusion plot needs "
                f"{need} values per patch (a two-dimensional signal grid)"
            )
        x, y = float(record.values[axes[0]]), float(record.values[axes[1]])
        observed = getattr(record, fields[0])
        if not record.ok:
            points["failed"].append((x, y, record.name))
            continue
        if not _finite(observed):
            points["missing"].append((x, y, record.name))
            continue
        points["x"].append(x)
        points["y"].append(y)
        points["observed"].append(float(observed))
        points["expected"].append(_band_of(getattr(record, fields[1])))
    if not points["x"] and points["missing"]:  # e.g. --quantity CLs on the results of --upper-limit
        other = "mu_up" if quantity == "CLs" else "CLs"
        raise InputError(
            f"the results hold no {'observed CLs' if quantity == 'CLs' else 'upper limits (mu_up)'} to plot: "
            f"plot them with --quantity {other} or auto"
        )
    return points


def _triangulation(x, y):
    """Delaunay triangulation of (x, y) made in unit-square coordinates, needle triangles masked."""
    import numpy as np
    from matplotlib.tri import TriAnalyzer, Triangulation

    x, y = np.asarray(x, float), np.asarray(y, float)
    span_x, span_y = np.ptp(x) or 1.0, np.ptp(y) or 1.0
    try:
        scaled = Triangulation((x - x.min()) / span_x, (y - y.min()) / span_y)
    except (ValueError, RuntimeError):  # fewer than 3 points, or all on one line
        return None
    mask = TriAnalyzer(scaled).get_flat_tri_mask(min_circle_ratio=0.01)
    triangulation = Triangulation(x, y, triangles=scaled.triangles)
    if mask.all():
        return None
    triangulation.set_mask(mask)
    return triangulation


def _unique(points: dict, index_filter) -> tuple:
    """x, y and indices of the points selected by ``index_filter``, duplicates dropped (first kept)."""
    seen, keep = set(), []
    for index, (x, y) in enumerate(zip(points["x"], points["y"])):
        if index_filter(index) and (x, y) not in seen:
            seen.add((x, y))
            keep.append(index)
    return [points["x"][i] for i in keep], [points["y"][i] for i in keep], keep


def _log(values):
    import numpy as np

    return np.log10(np.clip(np.asarray(values, float), _FLOOR, None))


def _line(ax, triangulation, values, level, **style):
    """One contour line at ``level`` (in log10), or ``None`` when the level is not crossed."""
    import numpy as np

    z = _log(values)
    log_level = math.log10(level)
    if triangulation is None or not (np.min(z) < log_level < np.max(z)):
        return None
    return ax.tricontour(triangulation, z, levels=[log_level], **style)


def _band(ax, triangulation, low, high, level, **style):
    """Fill where the optimistic edge is below ``level`` and the pessimistic one above it.

    Both edges are interpolated linearly (in log10) on the triangulation, refined a few times so
    that the fill follows both contour lines closely: within one refined triangle the region is
    that of ``max(low - L, L - high) < 0``.
    """
    import numpy as np
    from matplotlib.tri import LinearTriInterpolator, UniformTriRefiner

    if triangulation is None:
        return None
    log_level = math.log10(level)
    refiner = UniformTriRefiner(triangulation)
    fields = []
    for values in (low, high):
        z = _log(values)
        refined, refined_z = refiner.refine_field(
            z, triinterpolator=LinearTriInterpolator(triangulation, z), subdiv=_BAND_SUBDIVISIONS
        )
        fields.append(refined_z)
    inside = np.maximum(fields[0] - log_level, log_level - fields[1])
    inside = np.ma.filled(inside, np.inf)
    if not np.isfinite(inside).any() or np.nanmin(inside) >= 0:
        return None
    return ax.tricontourf(refined, inside, levels=[float(np.nanmin(inside)) - 1.0, 0.0], **style)


def _style_context(style):
    import contextlib

    import matplotlib.style

    if style is None or style is False:
        return contextlib.nullcontext()
    if style == "auto":
        try:
            import mplhep
        except ImportError:
            return contextlib.nullcontext()
        return matplotlib.style.context(mplhep.style.ATLAS)
    if isinstance(style, str):
        try:
            import mplhep

            if hasattr(mplhep.style, style.upper()):
                return matplotlib.style.context(getattr(mplhep.style, style.upper()))
        except ImportError:
            pass
    return matplotlib.style.context(style)


def _labels(result: ScanResult, labels, axes) -> tuple[str, str]:
    if labels is None:
        labels = result.metadata.get("labels")
    usable = isinstance(labels, (list, tuple)) and len(labels) > max(axes)
    if usable and all(isinstance(label, str) and label for label in labels):
        return labels[axes[0]], labels[axes[1]]
    return f"value {axes[0] + 1}", f"value {axes[1] + 1}"


def plot_exclusion(
    results: Any,
    output: str | os.PathLike | None = None,
    *,
    pallet: str | None = None,
    title: str | None = None,
    labels: list[str] | None = None,
    quantity: str = "auto",
    axes: tuple[int, int] = (0, 1),
    show_points: bool = True,
    style: Any = "auto",
    ax: Any = None,
    dpi: int = 150,
):
    """Draw the exclusion contours of a scan; optionally save them.

    Args:
        results: A results file path (``.json`` or ``.csv``), a :class:`ScanResult`, its dict, or
            a list of records (at least ``name``, ``values``, ``status``, ``CLs_obs``; ``CLs_exp``
            for the expected contour; or ``mu_up_obs``/``mu_up_exp`` for limits).
        output: File to write (``.png``, ``.pdf``, ``.svg``...; format from the suffix).
        pallet: Which pallet's records to draw, for results of several pallets (required there): a
            pallet name, or ``"best-expected"`` for their combination (made from the pallets'
            records when the results do not hold it).
        title: Title above the axes.
        labels: Axis titles; default: the results' ``metadata["labels"]``, else ``value 1/2``.
        quantity: ``"CLs"`` (contour at CLs = 0.05), ``"mu_up"`` (contour at μ_up = 1), or
            ``"auto"``: CLs when the results have it, else upper limits.
        axes: Which two entries of ``values`` are x and y.
        show_points: Mark the fitted points (failed ones are always marked).
        style: ``"auto"`` (mplhep's ATLAS style if installed), ``None`` (matplotlib defaults), an
            mplhep style name (``"CMS"``...) or anything ``matplotlib.style.context`` accepts.
        ax: Draw into these axes instead of a new figure.
        dpi: Resolution of raster output.

    Returns:
        The ``matplotlib.figure.Figure``. Its ``exclusion_contours`` attribute holds
        ``{"observed", "expected", "band"}`` (matplotlib contour sets, ``None`` when the level is
        not crossed in the grid), ``"quantity"``, ``"level"`` (0.05 or 1) and ``"log_level"``
        (the contour value: the plot is made in log10 of the quantity).

    Raises:
        MissingDependencyError: matplotlib is not installed.
        InputError: The results cannot be read, have nothing to plot, or hold several pallets
            and ``pallet`` chooses none of them.
        OutputError: ``output`` cannot be written.

    Example:
        >>> import pyhf_dist, pyhf_dist.plotting as plotting
        >>> records = [{"name": f"p{i}", "values": [x, y], "status": "ok", "CLs_obs": 10 ** (-x / 100)}
        ...            for i, (x, y) in enumerate([(0, 0), (200, 0), (0, 100), (200, 100)])]
        >>> figure = plotting.plot_exclusion(records, style=None)
        >>> figure.exclusion_contours["observed"].levels.tolist() == [figure.exclusion_contours["log_level"]]
        True
    """
    Figure = _matplotlib()
    result = choose_pallet(load_results(results), pallet)
    points = exclusion_points(result, quantity, tuple(axes))
    level = points["level"]
    output_path = _check_output(output) if output is not None else None
    xlabel, ylabel = _labels(result, labels, axes)

    with _style_context(style), warnings.catch_warnings():
        # Flat-triangle and font warnings from matplotlib/mplhep are noise for the user here.
        warnings.simplefilter("ignore", UserWarning)
        if ax is None:
            figure = Figure(figsize=(8, 6), layout="constrained")
            ax = figure.add_subplot()
        else:
            figure = ax.figure
        contours = _draw(ax, points, level)
        _decorate(ax, points, contours, xlabel, ylabel, title, show_points)
        figure.exclusion_contours = {**contours, "quantity": points["quantity"], "level": level,
                                     "log_level": math.log10(level)}
        if output_path is not None:
            try:
                figure.savefig(output_path, dpi=dpi)
            except OSError as error:
                raise OutputError(f"cannot write the plot to {output_path}: {error.strerror or error}") from None
    return figure


def _check_output(output) -> Path:
    path = Path(output)
    suffix = path.suffix.lower().lstrip(".")
    if not suffix:
        raise OutputError(f"{path}: give the plot file a suffix that names its format ({', '.join(FORMATS)})")
    from matplotlib.backend_bases import FigureCanvasBase

    if suffix not in FigureCanvasBase.get_supported_filetypes():
        raise OutputError(f"{path}: unknown plot format {suffix!r}; use one of {', '.join(FORMATS)}")
    if not path.parent.is_dir():
        raise OutputError(f"cannot write the plot to {path}: directory {path.parent} does not exist")
    return path


def _draw(ax, points: dict, level: float) -> dict:
    all_x, all_y, keep = _unique(points, lambda i: True)
    observed_tri = _triangulation(all_x, all_y)
    observed = _line(ax, observed_tri, [points["observed"][i] for i in keep], level,
                     colors=_COLORS["observed"], linewidths=2.5, linestyles="solid", zorder=4)
    ex, ey, with_band = _unique(points, lambda i: points["expected"][i] is not None)
    expected = band = None
    if with_band:
        expected_tri = _triangulation(ex, ey)
        bands = [points["expected"][i] for i in with_band]
        band = _band(ax, expected_tri, [min(b[1], b[3]) for b in bands], [max(b[1], b[3]) for b in bands], level,
                     colors=[_COLORS["band"]], alpha=0.9, zorder=2)
        expected = _line(ax, expected_tri, [b[2] for b in bands], level,
                         colors=_COLORS["expected"], linewidths=2.0, linestyles="dashed", zorder=3)
    return {"observed": observed, "expected": expected, "band": band}


def _decorate(ax, points, contours, xlabel, ylabel, title, show_points) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    symbol = "CL$_s$ = 0.05" if points["quantity"] == "CLs" else r"$\mu_{\mathrm{up}}$ = 1"
    handles = []
    if contours["observed"] is not None:
        handles.append(Line2D([], [], color=_COLORS["observed"], lw=2.5, label=f"Observed ({symbol})"))
    if contours["expected"] is not None:
        handles.append(Line2D([], [], color=_COLORS["expected"], lw=2.0, ls="--", label=f"Expected ({symbol})"))
    if contours["band"] is not None:
        handles.append(Patch(facecolor=_COLORS["band"], label=r"Expected $\pm 1\sigma$"))
    if show_points and points["x"]:
        ax.scatter(points["x"], points["y"], s=12, color=_COLORS["points"], zorder=5, linewidths=0)
        handles.append(Line2D([], [], ls="", marker="o", ms=4, color=_COLORS["points"],
                              label=f"Fitted points ({len(points['x'])})"))
    value = "CL$_s$" if points["quantity"] == "CLs" else r"$\mu_{\mathrm{up}}$"
    for kind, marker, label in (("failed", "x", "Failed"), ("missing", "+", f"No {value} value")):
        if points[kind]:
            fx, fy = [p[0] for p in points[kind]], [p[1] for p in points[kind]]
            ax.scatter(fx, fy, s=80, marker=marker, color=_COLORS[kind], linewidths=2.0, zorder=6)
            handles.append(Line2D([], [], ls="", marker=marker, ms=8, mew=2, color=_COLORS[kind],
                                  label=f"{label} ({len(points[kind])})"))
    others = points["failed"] + points["missing"]
    xs = points["x"] + [p[0] for p in others]
    ys = points["y"] + [p[1] for p in others]
    if xs:
        pad_x, pad_y = 0.04 * ((max(xs) - min(xs)) or 1.0), 0.04 * ((max(ys) - min(ys)) or 1.0)
        ax.set_xlim(min(xs) - pad_x, max(xs) + pad_x)
        # Room above the grid for the legend.
        ax.set_ylim(min(ys) - pad_y, max(ys) + 0.45 * ((max(ys) - min(ys)) or 1.0))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if contours["observed"] is None and contours["expected"] is None and points["x"]:
        excluded = sum(value < points["level"] for value in points["observed"])
        if excluded in (0, len(points["x"])):
            message = f"{'no point' if excluded == 0 else 'every point'} excluded\n(no {symbol} crossing in this grid)"
        else:
            message = "too few points for a contour"
        ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", color="0.4")
    if handles:
        ax.legend(handles=handles, loc="upper left", frameon=False, fontsize="small",
                  title="95% CL exclusion", title_fontsize="small", ncols=2)
