"""The command line of the physics outputs: --upper-limit, --toys, and the plot command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pyhf_dist.demo import demo_patchset, demo_workspace


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("demo")
    (directory / "BkgOnly.json").write_text(json.dumps(demo_workspace()))
    (directory / "patchset.json").write_text(json.dumps(demo_patchset()))
    return directory


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pyhf_dist", *args], capture_output=True, text=True, timeout=600)


def test_upper_limits_from_the_command_line(demo_dir, tmp_path):
    output = tmp_path / "limits.json"
    run = _cli("fit", str(demo_dir), "-p", "demo_[68]00_0", "--upper-limit", "--scan", "0,3,16",
               "--backend", "numpy", "--executor", "sequential", "-o", str(output), "-q")
    assert run.returncode == 0, run.stderr
    records = {r["name"]: r for r in json.loads(output.read_text())["results"]}
    assert set(records) == {"demo_600_0", "demo_800_0"}
    # The lighter point is excluded (mu_up < 1), the heavier one is not.
    assert records["demo_600_0"]["mu_up_obs"] < 1 < records["demo_800_0"]["mu_up_obs"]
    assert all(len(r["mu_up_exp"]) == 5 and r["CLs_obs"] is None for r in records.values())
    assert json.loads(output.read_text())["metadata"]["settings"]["upper_limit_scan"] == [0.0, 3.0, 16]


def test_toys_from_the_command_line(demo_dir, tmp_path):
    output = tmp_path / "toys.json"
    run = _cli("fit", str(demo_dir), "-p", "demo_700_150", "--toys", "40", "--seed", "7", "--backend", "numpy",
               "--workers", "2", "-o", str(output), "-q")
    assert run.returncode == 0, run.stderr
    (record,) = json.loads(output.read_text())["results"]
    settings = json.loads(output.read_text())["metadata"]["settings"]
    assert record["status"] == "ok" and 0 <= record["CLs_obs"] <= 1 and len(record["CLs_exp"]) == 5
    assert settings["calctype"] == "toybased" and settings["ntoys"] == 40 and settings["seed"] == 7
    # So few toys hardly tell CLs near 0.05: the command line says how coarse it is.
    assert "40 toys per hypothesis: a CLs near 0.05 rests on about 1 toy, a statistical error of about 100%" in run.stderr


def test_bad_physics_options_are_one_line_errors(demo_dir, tmp_path):
    for args, message in (
        (["--toys", "10", "--upper-limit"], "toy-based upper limits are not supported"),
        (["--scan", "0,5,21"], "(--scan) goes with calculation='upper_limit' (--upper-limit)"),
        (["--upper-limit", "--scan", "0,5"], "is not START,STOP,N"),
        (["--toys", "0"], "ntoys (--toys) must be a positive integer"),
        (["--seed", "3"], "--seed seeds the toys of --toys N: add --toys, or drop --seed"),
        (["--workers", "3", "--option", "workers=1"], "workers is given twice, as --workers 3 and --option workers=1"),
        (["--option", "workers=1", "--option", "workers=2"], "as --option workers=1 and --option workers=2"),
    ):
        run = _cli("fit", str(demo_dir), *args, "-o", str(tmp_path / "r.json"))
        assert run.returncode == 2, (args, run.stderr)
        assert message in run.stderr and "Traceback" not in run.stderr
        assert not (tmp_path / "r.json").exists()


def test_plot_command_writes_png_and_pdf(demo_dir, tmp_path):
    results = tmp_path / "results.json"
    run = _cli("fit", str(demo_dir), "--backend", "numpy", "--workers", "2", "-o", str(results), "-q")
    assert run.returncode == 0, run.stderr
    png, pdf = tmp_path / "exclusion.png", tmp_path / "exclusion.pdf"
    run = _cli("plot", str(results), "-o", str(png), "-o", str(pdf), "--title", "demo")
    assert run.returncode == 0, run.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"
    run = _cli("plot", str(results), "-o", str(tmp_path / "x.png"), "--labels", "only-one")
    assert run.returncode == 2 and "two axis titles" in run.stderr


def test_a_reader_that_stops_early_is_no_failure(demo_dir, tmp_path):
    """`pyhf-dist fit ... | head -1`: standard output's reader is gone before the summary comes. The
    results are written, the exit code is the scan's, and nothing but the scan's own lines is said."""
    output = tmp_path / "r.json"
    run = subprocess.Popen([sys.executable, "-m", "pyhf_dist", "fit", str(demo_dir), "-p", "demo_[68]00_0",
                            "--backend", "numpy", "--executor", "sequential", "-o", str(output), "-q"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run.stdout.close()  # as head does once it has its lines
    stderr = run.stderr.read()
    assert run.wait(timeout=600) == 0, stderr
    assert "Traceback" not in stderr and "Error" not in stderr and "Exception" not in stderr, stderr
    assert len(json.loads(output.read_text())["results"]) == 2
