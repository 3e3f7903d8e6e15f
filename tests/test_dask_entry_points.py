"""``executor="dask"`` wherever a physicist writes Python: scripts, piped code, -c, IPython, Jupyter.

The same user code as ``test_entry_points.py`` (``map_fits`` on three 3L-eRJR patches, two
workers, no main guard), with the cluster pyhf-dist starts itself, in a fresh process with a time
limit so that a hang fails the test; CLs are checked against plain serial pyhf. Until Dask's own
worker processes were spawned by ``multiprocessing``, a script without a main guard and code
piped to ``python -`` ended in "Nanny failed to start": each worker re-ran the caller's
``__main__``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("distributed")

from helpers import LIMIT, NAMES, assert_clean_run, assert_matches_reference, run, scan_code, serial_pyhf  # noqa: E402


def test_script_without_main_guard(erjr_dir, erjr_pallet, tmp_path):
    output = tmp_path / "results.json"
    (tmp_path / "scan.py").write_text(scan_code(erjr_dir, output, executor="dask"))
    assert_clean_run(run([sys.executable, "scan.py"], tmp_path), output, erjr_pallet)


def test_code_piped_to_python_stdin(erjr_dir, erjr_pallet, tmp_path):
    output = tmp_path / "results.json"
    done = run([sys.executable, "-"], tmp_path, stdin=scan_code(erjr_dir, output, executor="dask"))
    assert_clean_run(done, output, erjr_pallet)


def test_python_dash_c(erjr_dir, erjr_pallet, tmp_path):
    output = tmp_path / "results.json"
    done = run([sys.executable, "-c", scan_code(erjr_dir, output, executor="dask")], tmp_path)
    assert_clean_run(done, output, erjr_pallet)


def test_ipython_shell(erjr_dir, erjr_pallet, tmp_path):
    pytest.importorskip("IPython")
    output = tmp_path / "results.json"
    command = [sys.executable, "-m", "IPython", "--quick", "--no-banner", "--simple-prompt", "--colors=NoColor"]
    done = run(command, tmp_path, stdin=scan_code(erjr_dir, output, executor="dask") + "\nexit()\n")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stdout + done.stderr, done.stdout
    assert "fitted 3" in done.stdout
    assert_matches_reference(json.loads(output.read_text())["results"], serial_pyhf(erjr_pallet, NAMES))


def test_jupyter_kernel(erjr_dir, erjr_pallet, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    output = tmp_path / "results.json"
    notebook = nbformat.v4.new_notebook()
    # Two scans in one kernel, as cells are re-run: the second starts a cluster of its own again.
    notebook.cells = [nbformat.v4.new_code_cell(scan_code(erjr_dir, output, executor="dask"))] * 2
    client = nbclient.NotebookClient(notebook, timeout=LIMIT, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    for cell in notebook.cells:
        assert not [out for out in cell.outputs if out.get("output_type") == "error"], cell.outputs
        assert any("fitted 3" in out.get("text", "") for out in cell.outputs), cell.outputs
    assert_matches_reference(json.loads(output.read_text())["results"], serial_pyhf(erjr_pallet, NAMES))


def test_a_worker_that_cannot_start_is_one_line_within_seconds(erjr_dir, tmp_path):
    # A worker preload module that does not exist: every worker process exits at start.
    code = scan_code(erjr_dir, tmp_path / "results.json", executor="dask")
    environment = dict(os.environ, DASK_DISTRIBUTED__WORKER__PRELOAD="['pyhf_dist_no_such_module']")
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=environment, capture_output=True,
                          text=True, timeout=LIMIT)
    assert time.monotonic() - began < 60
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "could not start" in line]
    assert errors, done.stderr
    assert "Dask worker" in errors[-1] and "pyhf_dist_no_such_module" in errors[-1], errors[-1]
    assert not (tmp_path / "results.json").exists()
