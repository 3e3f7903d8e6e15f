"""Exclusion plots: figures are produced, with contours at the right levels and in the right place."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import pyhf_dist
from pyhf_dist.exceptions import InputError, MissingDependencyError, OutputError

pytest.importorskip("matplotlib")

from pyhf_dist import plotting  # noqa: E402

LOG_005 = math.log10(0.05)


@pytest.fixture(scope="module")
def demo_results(tmp_path_factory) -> Path:
    """The demo pallet's scan (it has an excluded region), written as a results file."""
    result = pyhf_dist.map_fits(pyhf_dist.demo_pallet(), executor="sequential", backend="numpy")
    path = tmp_path_factory.mktemp("plot") / "demo.json"
    result.to_json(path)
    return path


def vertices(contour) -> np.ndarray:
    """All vertices of a contour set's lines, as one (n, 2) array."""
    segments = [segment for level in contour.allsegs for segment in level if len(segment)]
    return np.concatenate(segments) if segments else np.empty((0, 2))


def reach(contour, y_max: float) -> float:
    """How far in x the contour goes at y <= y_max (the 'reach at low m(N1)')."""
    points = vertices(contour)
    return float(points[points[:, 1] <= y_max, 0].max())


def minimal(name, x, y, cls, expected=None, status="ok") -> dict:
    record = {"name": name, "values": [x, y], "CLs_obs": cls, "status": status}
    if expected is not None:
        record["CLs_exp"] = expected
    return record


def synthetic_grid() -> list[dict]:
    """CLs falling exponentially with x; expected band a factor 3 either side of the median."""
    records = []
    for x in range(100, 1001, 100):
        for y in range(0, x - 99, 100):
            observed = 10 ** (-(x - 100) / 300)
            median = 10 ** (-(x - 50) / 300)
            band = [median / 9, median / 3, median, median * 3, median * 9]
            records.append(minimal(f"p_{x}_{y}", x, y, observed, band))
    return records


# ------------------------------------------------------------------------------------ demo pallet


def test_demo_exclusion_png_and_pdf(demo_results, tmp_path):
    for suffix, magic in (("png", b"\x89PNG"), ("pdf", b"%PDF")):
        output = tmp_path / f"exclusion.{suffix}"
        figure = plotting.plot_exclusion(demo_results, output, title="demo")
        assert output.read_bytes()[:4] == magic and output.stat().st_size > 5000
    contours = figure.exclusion_contours
    assert contours["quantity"] == "CLs" and contours["level"] == 0.05
    assert contours["observed"].levels.tolist() == pytest.approx([LOG_005])
    assert contours["expected"].levels.tolist() == pytest.approx([LOG_005])
    # The band is a filled region ending at 0 in its "inside" field (see plotting._band).
    assert contours["band"].levels[-1] == 0.0 and len(vertices(contours["band"])) > 0
    axes = figure.axes[0]
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("m1", "m2")
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert any(label.startswith("Observed") for label in legend)
    assert any("1\\sigma" in label for label in legend)
    assert "Fitted points (28)" in legend


def test_demo_contour_is_interpolated_linearly_in_log_cls(demo_results):
    figure = plotting.plot_exclusion(demo_results, style=None)
    records = {record.name: record for record in pyhf_dist.ScanResult.from_json(demo_results)}
    # On the grid's bottom edge (m2 = 0) the observed line crosses the 700-800 edge where the
    # straight line in log10(CLs) between the two points reaches log10(0.05).
    low, high = math.log10(records["demo_700_0"].CLs_obs), math.log10(records["demo_800_0"].CLs_obs)
    expected_x = 700 + 100 * (LOG_005 - low) / (high - low)
    points = vertices(figure.exclusion_contours["observed"])
    on_edge = points[np.isclose(points[:, 1], 0.0)]
    assert on_edge[:, 0] == pytest.approx([expected_x], abs=1e-6)
    # Every vertex of the observed line is between an excluded and an allowed point.
    assert 600 < points[:, 0].min() and points[:, 0].max() < 800


def test_band_lies_between_its_edges_and_contains_the_median():
    records = synthetic_grid()
    figure = plotting.plot_exclusion(records, style=None)
    # With CLs = 10^(-(x - 50)/300) the median crosses 0.05 at x = 50 + 300*1.301 = 440.3, the
    # ±1σ edges (factor 3) at 440.3 -/+ 300*log10(3) = 297.2 and 583.4: straight vertical lines.
    median_x = 50 - 300 * LOG_005
    edge = 300 * math.log10(3)
    expected = vertices(figure.exclusion_contours["expected"])
    assert expected[:, 0] == pytest.approx(np.full(len(expected), median_x), abs=1e-6)
    band = vertices(figure.exclusion_contours["band"])
    assert band[:, 0].min() == pytest.approx(median_x - edge, abs=1.0)
    assert band[:, 0].max() == pytest.approx(median_x + edge, abs=1.0)
    observed = vertices(figure.exclusion_contours["observed"])
    assert observed[:, 0] == pytest.approx(np.full(len(observed), 100 - 300 * LOG_005), abs=1e-6)


# ------------------------------------------------------------------------------------- 3L-eRJR


def test_erjr_plot_from_serial_reference(erjr_pallet, erjr_reference, tmp_path):
    """3L-eRJR at mu = 1: nothing is excluded (CLs ~ 1 everywhere), three points have CLs = 0/0."""
    records = [minimal(p.name, *p.values, *erjr_reference[p.name]) for p in erjr_pallet.patches]
    for record in records:  # as written to JSON: NaN becomes null
        record["CLs_obs"] = None if not math.isfinite(record["CLs_obs"]) else record["CLs_obs"]
    output = tmp_path / "erjr.png"
    figure = plotting.plot_exclusion({"metadata": {}, "results": records}, output)
    assert output.stat().st_size > 5000
    contours = figure.exclusion_contours
    assert contours["observed"] is None and contours["expected"] is None
    axes = figure.axes[0]
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("value 1", "value 2")
    missing = sum(record["CLs_obs"] is None for record in records)
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert f"Fitted points ({66 - missing})" in legend
    if missing:
        assert any(label.startswith("No CL") and f"({missing})" in label for label in legend)
    assert any("no point excluded" in text.get_text() for text in axes.texts)


# --------------------------------------------------------------------------------- upper limits


def test_mu_up_contour_from_upper_limit_records():
    records = []
    for x in range(100, 801, 100):
        for y in (0, 100, 200):
            mu = 10 ** ((x - 450) / 300)
            records.append({"name": f"p_{x}_{y}", "values": [x, y], "status": "ok", "mu_up_obs": mu,
                            "mu_up_exp": [mu / 4, mu / 2, mu * 1.2, mu * 2.4, mu * 4.8]})
    figure = plotting.plot_exclusion(records, style=None)
    contours = figure.exclusion_contours
    assert contours["quantity"] == "mu_up" and contours["level"] == 1.0 and contours["log_level"] == 0.0
    assert contours["observed"].levels.tolist() == [0.0]
    assert vertices(contours["observed"])[:, 0] == pytest.approx(450.0, abs=1e-6)
    assert contours["band"] is not None
    # When CLs and limits are both present, CLs is the default and limits are asked for by name.
    for record in records:
        record["CLs_obs"] = 0.5
    assert plotting.plot_exclusion(records, style=None).exclusion_contours["quantity"] == "CLs"
    assert plotting.plot_exclusion(records, style=None, quantity="mu_up").exclusion_contours["quantity"] == "mu_up"


# ------------------------------------------------------------------------ minimal and odd inputs


def test_minimal_records_failed_points_and_generic_labels(tmp_path):
    records = synthetic_grid()
    for record in records:
        record.pop("CLs_exp")
    records[3] = {"name": records[3]["name"], "values": records[3]["values"], "status": "failed",
                  "CLs_obs": None, "CLs_exp": None}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"metadata": {}, "results": records}))
    figure = plotting.plot_exclusion(str(path), tmp_path / "out.png", style=None)
    contours = figure.exclusion_contours
    assert contours["observed"] is not None and contours["expected"] is None and contours["band"] is None
    axes = figure.axes[0]
    assert axes.get_xlabel() == "value 1"
    assert "Failed (1)" in [text.get_text() for text in axes.get_legend().get_texts()]
    # Labels from the metadata, or given explicitly.
    labeled = plotting.plot_exclusion({"metadata": {"labels": ["mass_C1N2", "mass_N1"]}, "results": records})
    assert labeled.axes[0].get_xlabel() == "mass_C1N2"
    relabeled = plotting.plot_exclusion(records, labels=["m(C1/N2) [GeV]", "m(N1) [GeV]"], style=None)
    assert relabeled.axes[0].get_ylabel() == "m(N1) [GeV]"


def test_csv_results_and_zero_cls_are_plotted(demo_results, tmp_path):
    csv_path = tmp_path / "demo.csv"
    pyhf_dist.ScanResult.from_json(demo_results).to_csv(csv_path)
    figure = plotting.plot_exclusion(csv_path, style=None)
    assert figure.exclusion_contours["observed"] is not None
    records = synthetic_grid()
    records[0]["CLs_obs"] = 0.0  # toys can give exactly 0: clipped before the log, not dropped
    figure = plotting.plot_exclusion(records, style=None)
    assert f"Fitted points ({len(records)})" in [t.get_text() for t in figure.axes[0].get_legend().get_texts()]


def test_a_results_table_saved_again_by_a_spreadsheet_reads_back_and_plots(demo_results, tmp_path, capsys):
    """A results CSV opened in a spreadsheet and saved as "CSV UTF-8" (a byte order mark, CRLF
    lines) reads back as written; a table that is not one, or not text, is refused in one line."""
    from pyhf_dist.cli import main

    original = pyhf_dist.ScanResult.from_json(demo_results)
    csv_path = tmp_path / "demo.csv"
    original.to_csv(csv_path)
    resaved = tmp_path / "resaved.csv"
    resaved.write_bytes(b"\xef\xbb\xbf" + csv_path.read_text().replace("\n", "\r\n").encode())
    back = pyhf_dist.ScanResult.from_csv(resaved)
    assert [(r.name, r.values, r.CLs_obs, r.CLs_exp) for r in back] == \
        [(r.name, list(r.values), r.CLs_obs, r.CLs_exp) for r in pyhf_dist.ScanResult.from_csv(csv_path)]
    assert main(["plot", str(resaved), "-o", str(tmp_path / "resaved.png")]) == 0
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    (tmp_path / "binary.csv").write_bytes(bytes(range(128, 256)))
    for name, message in (("other.csv", "is not a results table of pyhf-dist: it has no column 'name'"),
                          ("binary.csv", "is not a results table (not UTF-8 text)")):
        capsys.readouterr()
        assert main(["plot", str(tmp_path / name), "-o", str(tmp_path / "x.png")]) != 0
        error = capsys.readouterr().err.strip()
        assert message in error and "\n" not in error and "Traceback" not in error


def test_draws_into_given_axes():
    from matplotlib.figure import Figure

    figure = Figure()
    axes = figure.add_subplot()
    assert plotting.plot_exclusion(synthetic_grid(), ax=axes, style=None) is figure


@pytest.mark.parametrize("records, message", [
    ([{"name": "a", "values": [1], "CLs_obs": 0.1, "status": "ok"}], "two-dimensional"),
    ([{"name": "a", "values": [1, 2], "status": "failed"}], "nothing to plot"),
])
def test_bad_results_are_input_errors(records, message):
    with pytest.raises(InputError, match=message):
        plotting.plot_exclusion(records)


def test_a_quantity_the_results_do_not_hold_is_an_input_error():
    """--quantity CLs on upper limits (or mu_up on CLs) reached the triangulation with no point."""
    limits = [{"name": f"p_{x}_{y}", "values": [x, y], "status": "ok", "mu_up_obs": 1.0, "mu_up_exp": [1.0] * 5}
              for x in (1, 2, 3) for y in (1, 2)]
    with pytest.raises(InputError, match="hold no observed CLs to plot: plot them with --quantity mu_up or auto"):
        plotting.plot_exclusion(limits, quantity="CLs")
    hypotests = [{**record, "mu_up_obs": None, "mu_up_exp": None, "CLs_obs": 0.1} for record in limits]
    with pytest.raises(InputError, match=r"hold no upper limits \(mu_up\) to plot: plot them with --quantity CLs"):
        plotting.plot_exclusion(hypotests, quantity="mu_up")


def test_discovery_p_values_are_counted_as_excesses_not_exclusions(tmp_path):
    """A q0 scan's p0 sit in CLs_obs: below 0.05 they are an excess. The summary, the command
    line's table and the plot must not call them excluded points."""
    from pyhf_dist.results import ScanResult

    records = [{"name": f"p_{x}_{y}", "values": [x, y], "status": "ok", "CLs_obs": p0, "CLs_exp": [p0] * 5}
               for (x, y), p0 in zip([(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)],
                                     [0.3, 0.01, 1e-3, 1e-5, 1e-8, 0.5])]
    discovery = ScanResult.from_dict({"metadata": {"settings": {"test_stat": "q0"}}, "results": records})
    summary = discovery.summary()
    assert "excluded" not in summary, summary
    assert "excess 3 sigma (p0<1.35e-3) 3" in summary and "excess 5 sigma (p0<2.87e-7) 1" in summary, summary
    exclusion = ScanResult.from_dict({"metadata": {"settings": {"test_stat": "qtilde"}}, "results": records})
    assert "excluded (CLs_obs < 0.05)   4" in exclusion.summary()
    path = tmp_path / "q0.json"
    discovery.to_json(path)
    with pytest.raises(InputError, match=r"discovery p-values \(test statistic q0\), not CLs"):
        plotting.plot_exclusion(path)


def test_bad_outputs_are_output_errors(tmp_path):
    with pytest.raises(OutputError, match="suffix"):
        plotting.plot_exclusion(synthetic_grid(), tmp_path / "exclusion")
    with pytest.raises(OutputError, match="unknown plot format"):
        plotting.plot_exclusion(synthetic_grid(), tmp_path / "exclusion.docx")
    with pytest.raises(OutputError, match="does not exist"):
        plotting.plot_exclusion(synthetic_grid(), tmp_path / "missing" / "exclusion.png")


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "pyhf-dist\[plot\]"'):
        plotting.plot_exclusion(synthetic_grid())


# -------------------------------------------------------------------------------------- 1Lbb


@pytest.mark.skipif(not os.environ.get("PYHF_DIST_LBB_RESULTS"), reason="set PYHF_DIST_LBB_RESULTS to a full 1Lbb scan")
def test_lbb_full_scan_reproduces_published_reach(tmp_path):
    """The published 1Lbb exclusion: observed reach to m(C1/N2) ~ 740 GeV at low m(N1)."""
    result = pyhf_dist.ScanResult.from_json(os.environ["PYHF_DIST_LBB_RESULTS"])
    assert len(result) == 125
    figure = plotting.plot_exclusion(result, tmp_path / "1Lbb.pdf")
    contours = figure.exclusion_contours
    assert contours["observed"].levels.tolist() == pytest.approx([LOG_005])
    assert 700 <= reach(contours["observed"], y_max=50) <= 780
    assert contours["expected"] is not None and contours["band"] is not None
