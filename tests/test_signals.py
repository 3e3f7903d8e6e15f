"""Signal points as data (``signals=``, ``--signals``): rows of yields against the patches a user
would write by hand, malformed rows and files, a killed scan resumed, and the journal written in
groups keeping every record reported.

The background is the built-in demo workspace (three channels: CR 1 bin, SRhigh 3, SRlow 2; POI
``mu_SIG``); fits are plain pyhf on numpy, a few points each, so that the file runs in seconds.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pyhf_dist
from pyhf_dist.demo import demo_workspace
from pyhf_dist.journal import Journal
from pyhf_dist.pallet import Pallet, Patch
from pyhf_dist.results import FitRecord
from pyhf_dist.signals import SignalPoints, SignalsError, load_template

POINTS = {  # name: (m1, m2, {channel: yields})
    "pt_300_0": (300, 0, {"CR": [0.4], "SRhigh": [5.0, 7.0, 8.0], "SRlow": [9.0, 6.0]}),
    "pt_400_100": (400, 100, {"CR": [0.2], "SRhigh": [2.1, 2.9, 3.4], "SRlow": [3.8, 2.5]}),
    "pt_500_100": (500, 100, {"CR": [0.1], "SRhigh": [1.0, 1.4, 1.6], "SRlow": [1.8, 1.2]}),
}
ERRORS = {"CR": [0.05], "SRhigh": [0.5, 0.6, 0.7], "SRlow": [0.8, 0.5]}
CHANNEL_ORDER = ["CR", "SRhigh", "SRlow"]
NORMSYS = {"name": "signal_theory", "hi": 1.1, "lo": 0.9}


def _write_csv(path: Path, points: dict, extra_rows: list[str] = ()) -> Path:
    bins = [f"{channel}[{i}]" for channel in CHANNEL_ORDER for i in range(len(POINTS["pt_300_0"][2][channel]))]
    lines = [",".join(["name", "m1", "m2", *bins])]
    for name, (m1, m2, yields) in points.items():
        lines.append(",".join([name, str(m1), str(m2), *(repr(v) for c in CHANNEL_ORDER for v in yields[c])]))
    path.write_text("\n".join([*lines, *extra_rows]) + "\n")
    return path


def _hand_patch(yields: dict, uncertainty: str | None = None) -> list:
    """The patch as a user writes it: the signal sample after the background, in every channel."""
    operations = []
    for index, channel in enumerate(CHANNEL_ORDER):
        modifiers = [{"name": "mu_SIG", "type": "normfactor", "data": None},
                     {"name": "signal_theory", "type": "normsys", "data": {"hi": 1.1, "lo": 0.9}}]
        if uncertainty == "staterror":
            modifiers.append({"name": f"staterror_{channel}", "type": "staterror", "data": ERRORS[channel]})
        operations.append({"op": "add", "path": f"/channels/{index}/samples/1",
                           "value": {"name": "signal", "data": yields[channel], "modifiers": modifiers}})
    return operations


def _hand_pallet(uncertainty: str | None = None) -> Pallet:
    patches = [Patch(name, (m1, m2), _hand_patch(yields, uncertainty)) for name, (m1, m2, yields) in POINTS.items()]
    return Pallet(demo_workspace(), patches, ["m1", "m2"])


def _assert_same(first, second) -> None:
    assert [record.name for record in first] == [record.name for record in second]
    for one, other in zip(first, second):
        assert one.ok and other.ok, (one.error, other.error)
        assert list(one.values) == list(other.values)
        for a, b in zip([one.CLs_obs, *one.CLs_exp], [other.CLs_obs, *other.CLs_exp]):
            assert abs(a - b) <= 1e-6, (one.name, a, b)


@pytest.fixture(scope="module")
def background(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("signals") / "BkgOnly.json"
    path.write_text(json.dumps(demo_workspace()))
    return path


def test_csv_rows_give_the_answers_of_the_same_patches_written_by_hand(background, tmp_path):
    csv_file = _write_csv(tmp_path / "yields.csv", POINTS)
    from_rows = pyhf_dist.map_fits(background, signals=csv_file, template={"normsys": NORMSYS},
                                   executor="sequential", backend="numpy")
    by_hand = pyhf_dist.map_fits(_hand_pallet(), executor="sequential", backend="numpy")
    _assert_same(from_rows, by_hand)
    frame = from_rows.to_pandas()  # the model parameters are columns
    assert list(frame.loc["pt_400_100", ["m1", "m2"]]) == [400, 100]


def test_parquet_rows_with_staterror_give_the_answers_of_hand_written_patches(background, tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    table = pyarrow.table({
        "name": list(POINTS),
        "m1": [m1 for m1, _, _ in POINTS.values()],
        "m2": [m2 for _, m2, _ in POINTS.values()],
        "yields": [json.dumps(yields) for _, _, yields in POINTS.values()],
        "uncertainties": [json.dumps(ERRORS)] * len(POINTS),
    })
    path = tmp_path / "yields.parquet"
    parquet.write_table(table, path, row_group_size=2)  # several row groups, read as a stream
    template = {"normsys": NORMSYS, "uncertainty": "staterror"}
    from_rows = pyhf_dist.map_fits(background, signals=path, template=template, executor="sequential", backend="numpy")
    by_hand = pyhf_dist.map_fits(_hand_pallet("staterror"), executor="sequential", backend="numpy")
    _assert_same(from_rows, by_hand)
    plain = pyhf_dist.map_fits(_hand_pallet(), executor="sequential", backend="numpy")
    assert from_rows["pt_500_100"].CLs_obs != pytest.approx(plain["pt_500_100"].CLs_obs, abs=1e-6), \
        "the uncertainties must reach the model"


def _json_row(name: str, yields: dict) -> str:
    return f'{name},1,2,"{json.dumps(yields).replace(chr(34), chr(34) * 2)}"'


def test_a_malformed_row_fails_that_point_alone_with_its_reason(background, tmp_path):
    good = POINTS["pt_400_100"][2]
    rows = {
        "ok_a": good,
        "wrong_bins": {**good, "SRhigh": [1.0, 2.0]},
        "negative": {**good, "SRlow": [1.0, -0.5]},
        "not_a_number": {**good, "CR": [float("nan")]},
        "unknown_channel": {**good, "SRmid": [1.0]},
        "ok_b": good,
    }
    path = tmp_path / "rows.csv"
    path.write_text("name,m1,m2,yields\n" + "\n".join(_json_row(name, yields)
                                                        for name, yields in rows.items()) + "\n")
    result = pyhf_dist.map_fits(background, signals=path, template={"normsys": NORMSYS},
                                executor="sequential", backend="numpy")
    errors = {record.name: record.error for record in result}
    assert result["ok_a"].ok and result["ok_b"].ok
    assert result["ok_a"].CLs_obs == pytest.approx(result["ok_b"].CLs_obs, abs=1e-12)
    assert errors["wrong_bins"] == "SRhigh has 2 yields, the workspace's SRhigh has 3 bins"
    assert errors["negative"] == "yield SRlow[1] is negative (-0.5)"
    assert errors["not_a_number"] == "yield CR[0] is nan (must be a finite number)"
    assert errors["unknown_channel"].startswith("unknown channel 'SRmid' in yields")
    for name in ("wrong_bins", "negative", "not_a_number", "unknown_channel"):
        assert not result[name].ok and "\n" not in errors[name]


def test_an_empty_cell_fails_its_point(background, tmp_path):
    path = _write_csv(tmp_path / "y.csv", {"fine": POINTS["pt_300_0"]}, ["holey,1,2,0.1,1,2,,4,5"])
    result = pyhf_dist.map_fits(background, signals=path, executor="sequential", backend="numpy")
    assert result["fine"].ok
    assert result["holey"].error == "yield SRhigh[2] is empty"


@pytest.mark.parametrize("template, message", [
    ({"chanels": ["SR"]}, "the template: unknown key 'chanels'"),
    ({"channels": ["SRmid"]}, "the template: no channel 'SRmid' in the workspace"),
    ({"uncertainty": "histosys"}, "the template: 'uncertainty' must be one of staterror, shapesys"),
    ({"normsys": {"name": "x", "hi": -1, "lo": 0.9}}, "the template: normsys 'hi' must be a positive number"),
    ({"sample": "background"}, "the template: channel 'CR' already has a sample 'background'"),
    ({"channels": ["SRhigh", "SRlow"]}, "the template: 'channels' leaves out 'CR', which the signals file has "
                                        "yield columns for"),
    ({"poi": "mu_X"}, "the template: 'poi' is 'mu_X', but the workspace's measurement 'demo' tests 'mu_SIG': "
                      "drop 'poi' or set it to 'mu_SIG'"),
])
def test_a_malformed_template_fails_the_scan_at_once(background, tmp_path, template, message):
    csv_file = _write_csv(tmp_path / "yields.csv", POINTS)
    began = time.monotonic()
    with pytest.raises(SignalsError) as caught:
        pyhf_dist.map_fits(background, signals=csv_file, template=template, executor="sequential", backend="numpy")
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert time.monotonic() - began < 5, "refused before fitting anything"


@pytest.mark.parametrize("text, message", [
    ("m1,CR[0]\n1,2\n", "has no 'name' column"),
    ("name;m1;CR[0]\na;1;2\n", "separates its columns with ';': write it with commas"),
    ("name\tm1\tCR[0]\na\t1\t2\n", "separates its columns with '\\t': write it with commas"),
    ("name,m1,SRmid[0]\na,1,2\n", "column 'SRmid[0]' names no channel of the workspace"),
    ("name,SRhigh[0],SRhigh[1]\na,1,2\n", "SRhigh needs bins 0..2 (3 columns), the file has bins 0, 1"),
    ("name,m1\na,1\n", "has no signal yields"),
    ("name,CR[0]\na,1\na,2\n", "rows 1 and 2 are both named 'a'"),
    ("", "is empty"),
    ("name,m1,CR[0]\n\xe9t\xe9,1,2\n", "is not UTF-8 text: save it as UTF-8"),
    ("name,m1,CR[0]\na,1,2\nb,1,2,7\n", "row 2 (line 3) has 4 values under a header of 3 columns"),
])
def test_a_malformed_file_fails_the_scan_at_once(background, tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text, encoding="latin-1")  # as a spreadsheet's plain "CSV" writes é
    with pytest.raises(SignalsError) as caught:
        pyhf_dist.map_fits(background, signals=path, executor="sequential", backend="numpy")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_points_are_made_one_row_at_a_time(background, tmp_path):
    """The points are a sized stream: the scan's ``todo`` is never a list of patches."""
    from pyhf_dist.signals import Pending, pending

    path = _write_csv(tmp_path / "y.csv", POINTS)
    points = SignalPoints(path, demo_workspace(), load_template(None))
    todo = pending([Pallet(demo_workspace(), points, points.labels)], [points], {(None, "pt_300_0"): None})
    assert isinstance(todo, Pending) and len(todo) == 2
    assert [patch.name for _, patch in todo] == ["pt_400_100", "pt_500_100"]


def test_records_hold_the_points_own_names_and_values_and_the_loop_keeps_nothing_per_point(
        background, tmp_path, monkeypatch):
    """What a scan keeps per point must not grow beyond its record: the records hold the names
    and parameter lists of the file's index (not copies), equal masses are one object, and the
    loop's bookkeeping is empty once every record is out."""
    from pyhf_dist.scan import loop as scan_loop

    points = {"pt_1000_500": (1000, 500, POINTS["pt_300_0"][2]), "pt_1000_600": (1000, 600, POINTS["pt_400_100"][2]),
              "pt_1100_600": (1100, 600, POINTS["pt_500_100"][2])}
    csv_file = _write_csv(tmp_path / "masses.csv", points)
    loops = []
    groups = scan_loop.Loop.groups

    def watched(self, todo):
        loops.append(self)
        yield from groups(self, todo)

    monkeypatch.setattr(scan_loop.Loop, "groups", watched)
    result = pyhf_dist.map_fits(background, signals=csv_file, executor="sequential", backend="numpy",
                                journal=tmp_path / "j.jsonl")
    (loop,) = loops
    assert [record.values for record in result] == [[1000, 500], [1000, 600], [1100, 600]]
    assert all(type(record.values) is list for record in result)
    for record in result:
        (key,) = [key for key in loop.values_by_key if key == record.key]
        assert record.values is loop.values_by_key[key] and record.name is key[1]
    first, second, third = result
    assert first.values[0] is second.values[0] and second.values[1] is third.values[1]
    assert not loop.expected and not loop.partial and not loop.first_submitted and not loop.attempts
    assert not loop.in_flight and not len(loop.queue)
    # Read back from the journal, the records are the same (values as lists).
    loaded = Journal(tmp_path / "j.jsonl", result.metadata["scan_key"]).load()
    assert {key: record.values for key, record in loaded.items()} == {record.key: record.values for record in result}


def test_cli_bad_template_is_one_line(background, tmp_path):
    csv_file = _write_csv(tmp_path / "yields.csv", POINTS)
    run = subprocess.run([sys.executable, "-m", "pyhf_dist", "fit", str(background), "--signals", str(csv_file),
                          "--template", '{"sample": 3}', "-o", str(tmp_path / "r.json"), "-q"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip() == "Error: the template: 'sample' must be a non-empty name, got 3", run.stderr


# ---------------------------------------------------------------------------- journal and resume


def _grid(count: int) -> dict:
    points = {}
    for index in range(count):
        m1 = 300 + 10 * index
        scale = (300 / m1) ** 3
        points[f"g_{m1}"] = (m1, 0, {channel: [round(v * scale, 6) for v in yields]
                                     for channel, yields in POINTS["pt_300_0"][2].items()})
    return points


def _journal_records(path: Path) -> list[dict]:
    records = []
    for line in path.read_bytes().split(b"\n")[:-1]:  # a last line without newline: cut by the kill
        records.append(json.loads(line)["record"])
    return records


def test_cli_killed_mid_signals_scan_then_resume_fits_every_point_once(background, tmp_path):
    points = _grid(40)
    csv_file = _write_csv(tmp_path / "grid.csv", points)
    output, journal = tmp_path / "grid.json", tmp_path / "grid.journal.jsonl"
    args = [sys.executable, "-m", "pyhf_dist", "fit", str(background), "--signals", str(csv_file),
            "--template", json.dumps({"normsys": NORMSYS}), "--backend", "numpy", "--workers", "2",
            "-o", str(output), "-q"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not journal.exists() or journal.read_bytes().count(b"\n") < 4:
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "the scan did not get going"
        time.sleep(0.02)
    process.kill()  # SIGKILL: nothing of the command line cleans up
    process.communicate()
    before = {record["name"]: record for record in _journal_records(journal)}
    assert 4 <= len(before) < len(points), len(before)

    run = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert f"Fitting {len(points) - len(before)} patches ({len(before)} already in the journal)" in run.stderr
    results = json.loads(output.read_text())["results"]
    assert sorted(record["name"] for record in results) == sorted(points), "every point exactly once"
    assert all(record["status"] == "ok" for record in results)
    rows = {record["name"]: record for record in results}
    for name, record in before.items():  # kept, not fitted again
        assert (rows[name]["started"], rows[name]["worker"]["pid"]) == (record["started"], record["worker"]["pid"])
        assert rows[name]["values"] == [points[name][0], 0]


def test_every_record_reported_is_already_in_the_journal(background, tmp_path):
    """Records journaled in groups: each one is on disk before the scan hands it out."""
    points = _grid(12)
    csv_file = _write_csv(tmp_path / "grid.csv", points)
    journal = tmp_path / "j.jsonl"
    seen = []
    for record in pyhf_dist.iter_fits(background, signals=csv_file, executor="local", workers=2, backend="numpy",
                                      journal=journal):
        on_disk = {entry["name"] for entry in _journal_records(journal)}
        assert record.name in on_disk
        seen.append(record.name)
    assert sorted(seen) == sorted(points)
    assert sorted(entry["name"] for entry in _journal_records(journal)) == sorted(points)


def test_write_many_keeps_every_record_of_every_group(tmp_path):
    path = tmp_path / "j.jsonl"
    journal = Journal(path, "k")
    journal.open(append=False)
    groups = [[FitRecord(f"r{g}_{i}", [g, i], CLs_obs=0.1 * i) for i in range(size)] for g, size in enumerate([1, 5, 17])]
    for group in groups:
        journal.write_many(group)
    journal.write_many([])
    journal.close()
    assert journal.kept == 23
    loaded = Journal(path, "k").load()
    assert sorted(name for _, name in loaded) == sorted(r.name for group in groups for r in group)
    assert loaded[(None, "r2_16")].values == [2, 16] and math.isclose(loaded[(None, "r2_16")].CLs_obs, 1.6)


def test_cli_writes_parquet_results_with_the_parameters_as_columns(background, tmp_path):
    parquet = pytest.importorskip("pyarrow.parquet")
    csv_file = _write_csv(tmp_path / "yields.csv", POINTS)
    output = tmp_path / "r.parquet"
    run = subprocess.run([sys.executable, "-m", "pyhf_dist", "fit", str(background), "--signals", str(csv_file),
                          "--executor", "sequential", "--backend", "numpy", "-o", str(output), "-q"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    table = parquet.read_table(output).to_pylist()
    assert [(row["name"], row["m1"], row["m2"]) for row in table] == [(n, m1, m2) for n, (m1, m2, _) in POINTS.items()]
    assert all(row["status"] == "ok" and 0 <= row["CLs_obs"] <= 1 for row in table)
    # The table reads back as the scan's results (records and metadata), and plots.
    from pyhf_dist.signals import read_parquet

    again = read_parquet(output)
    assert again.metadata["labels"] == ["m1", "m2"] and again.names() == list(POINTS)
    assert [(r.values, r.status, r.CLs_obs, r.CLs_exp, r.converged) for r in again] == [
        ([float(m1), float(m2)], "ok", row["CLs_obs"], [row[f"CLs_exp{s}"] for s in ("_m2", "_m1", "", "_p1", "_p2")],
         row["converged"]) for (_, (m1, m2, _)), row in zip(POINTS.items(), table)]
    pytest.importorskip("matplotlib")
    plot = subprocess.run([sys.executable, "-m", "pyhf_dist", "plot", str(output), "-o", str(tmp_path / "r.png")],
                          capture_output=True, text=True, timeout=300)
    assert plot.returncode == 0 and (tmp_path / "r.png").stat().st_size > 0, plot.stderr


def test_require_fast_holds_on_a_signals_scan(tmp_path):
    """The patches made from rows take the compiled fast path, and --require-fast is kept."""
    pytest.importorskip("jax")
    workspace = {
        "version": "1.0.0",
        "channels": [{"name": "SR", "samples": [{"name": "bkg", "data": [52.0, 27.0, 11.0], "modifiers": [
            {"name": "bkg_norm", "type": "normsys", "data": {"hi": 1.1, "lo": 0.9}},
            {"name": "staterror_SR", "type": "staterror", "data": [1.5, 1.1, 0.7]}]}]}],
        "observations": [{"name": "SR", "data": [55.0, 24.0, 13.0]}],
        "measurements": [{"name": "meas", "config": {"poi": "mu_SIG", "parameters": []}}],
    }
    background = tmp_path / "BkgOnly.json"
    background.write_text(json.dumps(workspace))
    rows = tmp_path / "y.csv"
    rows.write_text("name,m1,SR[0],SR[1],SR[2]\na,1,2.0,3.5,4.5\nb,2,0.5,0.9,1.1\n")
    template = {"normsys": {"name": "sig_xsec", "hi": 1.15, "lo": 0.85}}
    fast = pyhf_dist.map_fits(background, signals=rows, template=template, executor="sequential", backend="jax",
                              require_fast=True)
    assert [(record.status, record.engine) for record in fast] == [("ok", "fast"), ("ok", "fast")], fast.failed()
    plain = pyhf_dist.map_fits(background, signals=rows, template=template, executor="sequential", backend="numpy")
    for one, other in zip(fast, plain):
        assert abs(one.CLs_obs - other.CLs_obs) < 1e-4


def test_a_spreadsheets_csv_with_a_byte_order_mark_and_crlf_lines_reads_as_any_other(background, tmp_path):
    """A spreadsheet's "CSV UTF-8" export begins with a byte order mark and ends its lines with
    CRLF (and some editors begin a JSON template with one): its points are the plain file's, with
    the same answers."""
    plain = _write_csv(tmp_path / "yields.csv", POINTS)
    exported = tmp_path / "exported.csv"
    exported.write_bytes(b"\xef\xbb\xbf" + plain.read_text().replace("\n", "\r\n").encode())
    template = tmp_path / "template.json"  # saved by an editor that writes a byte order mark too
    template.write_bytes(b"\xef\xbb\xbf" + json.dumps({"normsys": NORMSYS}).encode())
    options = dict(executor="sequential", backend="numpy")
    _assert_same(pyhf_dist.map_fits(background, signals=exported, template=template, **options),
                 pyhf_dist.map_fits(background, signals=plain, template={"normsys": NORMSYS}, **options))


def test_a_resumed_scan_fits_again_the_points_whose_yields_or_template_changed(background, tmp_path, caplog):
    """The journal keeps a digest of each record's patch: a row whose yields changed, or a template
    that changed, is fitted again on --resume, as a fresh scan would; the other points are reused."""
    csv_file = _write_csv(tmp_path / "yields.csv", POINTS)
    journal = tmp_path / "j.jsonl"
    options = dict(executor="sequential", backend="numpy", journal=journal)
    first = {r.name: r for r in pyhf_dist.map_fits(background, signals=csv_file, template={"normsys": NORMSYS},
                                                   **options)}
    changed = dict(POINTS)
    m1, m2, yields = changed["pt_400_100"]
    changed["pt_400_100"] = (m1, m2, {channel: [10 * value for value in bins] for channel, bins in yields.items()})
    _write_csv(csv_file, changed)
    resumed = {r.name: r for r in pyhf_dist.map_fits(background, signals=csv_file, template={"normsys": NORMSYS},
                                                     resume=True, **options)}
    fresh = {r.name: r for r in pyhf_dist.map_fits(background, signals=csv_file, template={"normsys": NORMSYS},
                                                   executor="sequential", backend="numpy")}
    assert "1 patch changed since" in caplog.text and "(pt_400_100): fitted again" in caplog.text
    assert resumed["pt_400_100"].CLs_obs == pytest.approx(fresh["pt_400_100"].CLs_obs, abs=1e-9)
    assert resumed["pt_400_100"].CLs_obs != pytest.approx(first["pt_400_100"].CLs_obs, abs=1e-3)
    assert resumed["pt_300_0"].submitted == first["pt_300_0"].submitted, "an unchanged point is reused"
    # Another template changes every point; the journal now holds both fits of pt_400_100, the last counts.
    caplog.clear()
    other = pyhf_dist.map_fits(background, signals=csv_file, template={"normsys": {**NORMSYS, "hi": 1.3}},
                               resume=True, **options)
    assert "3 patches changed since" in caplog.text
    again = pyhf_dist.map_fits(background, signals=csv_file, template={"normsys": {**NORMSYS, "hi": 1.3}},
                               resume=True, **options)
    assert [r.submitted for r in again] == [r.submitted for r in other], "nothing is fitted a third time"
