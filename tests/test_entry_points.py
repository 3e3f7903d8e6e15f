"""Wherever a physicist writes Python, a scan works: scripts, piped code, -c, IPython, Jupyter.

Each test runs the same few lines (``map_fits`` on three 3L-eRJR patches, two local workers) the
way users run code, in a fresh process with a time limit so that a hang fails the test instead of
blocking the suite, and checks the CLs against plain serial pyhf.
"""

from __future__ import annotations

import json
import sys

import pytest

from helpers import LIMIT, NAMES, assert_clean_run, assert_matches_reference, run, scan_code, serial_pyhf

def test_script_without_main_guard(erjr_dir, erjr_pallet, tmp_path):
    output = tmp_path / "results.json"
    (tmp_path / "scan.py").write_text(scan_code(erjr_dir, output))
    assert_clean_run(run([sys.executable, "scan.py"], tmp_path), output, erjr_pallet)


def test_code_piped_to_python_stdin(erjr_dir, erjr_pallet, tmp_path):
    output = tmp_path / "results.json"
    assert_clean_run(run([sys.executable, "-"], tmp_path, stdin=scan_code(erjr_dir, output)), output, erjr_pallet)


def test_python_dash_c(erjr_dir, erjr_pallet, tmp_path):
    output = tmp_path / "results.json"
    assert_clean_run(run([sys.executable, "-c", scan_code(erjr_dir, output)], tmp_path), output, erjr_pallet)


def test_ipython_shell(erjr_dir, erjr_pallet, tmp_path):
    pytest.importorskip("IPython")
    output = tmp_path / "results.json"
    # Lines typed into an interactive IPython shell (its own __main__, no file behind it).
    command = [sys.executable, "-m", "IPython", "--quick", "--no-banner", "--simple-prompt", "--colors=NoColor"]
    done = run(command, tmp_path, stdin=scan_code(erjr_dir, output) + "\nexit()\n")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stdout + done.stderr, done.stdout
    assert_matches_reference(json.loads(output.read_text())["results"], serial_pyhf(erjr_pallet, NAMES))


def test_jupyter_kernel(erjr_dir, erjr_pallet, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    output = tmp_path / "results.json"
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell(scan_code(erjr_dir, output)),
        nbformat.v4.new_code_cell("results"),  # the notebook display of a ScanResult
    ]
    client = nbclient.NotebookClient(notebook, timeout=LIMIT, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = notebook.cells[0].outputs
    assert not [out for out in outputs if out.get("output_type") == "error"], outputs
    assert any("fitted 3" in out.get("text", "") for out in outputs)
    display = notebook.cells[1].outputs[0]["data"]
    assert "text/html" in display and "ERJR_100p0_20p0" in display["text/html"]
    assert_matches_reference(json.loads(output.read_text())["results"], serial_pyhf(erjr_pallet, NAMES))


@pytest.mark.parametrize("how", ["script", "stdin"])
def test_parsl_from_a_script_and_from_stdin(erjr_dir, erjr_pallet, tmp_path, how):
    pytest.importorskip("parsl")
    output = tmp_path / "results.json"
    code = scan_code(erjr_dir, output, executor="parsl")
    if how == "script":
        (tmp_path / "scan.py").write_text(code)
        done = run([sys.executable, "scan.py"], tmp_path)
    else:
        done = run([sys.executable, "-"], tmp_path, stdin=code)
    assert done.returncode == 0, done.stderr
    assert "fitted 3" in done.stdout
    assert_matches_reference(json.loads(output.read_text())["results"], serial_pyhf(erjr_pallet, NAMES))
