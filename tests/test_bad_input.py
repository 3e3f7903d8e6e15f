"""Bad input is refused clearly: one line saying what is wrong and how to fix it, a non-zero exit
code, no traceback, and nothing written (no results file, no journal).

Most cases run the command line in this process (``pyhf_dist.cli.main``, what the ``pyhf-dist``
script calls): an exception escaping it would fail the test with its traceback. Cases that depend
on the environment (missing packages, PATH, credentials, the network) run it in a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

import pyhf_dist
from pyhf_dist.cli import main
from pyhf_dist.demo import demo_patchset, demo_workspace


class Run:
    def __init__(self, code: int, stdout: str, stderr: str, seconds: float):
        self.code, self.stdout, self.stderr, self.seconds = code, stdout, stderr, seconds

    def __repr__(self) -> str:
        return f"Run(code={self.code}, stderr={self.stderr!r})"


@pytest.fixture
def cli(capsys, tmp_path):
    """Run ``pyhf-dist ARGS -o <tmp>/out.json`` in this process; check nothing was written."""

    def run(*args: str, output: str | None = None) -> Run:
        output = output or str(tmp_path / "out.json")
        previous = _stop_handlers()
        began = time.time()
        try:
            code = main([*args, "-o", output, "-q"])
        finally:
            _restore(previous)
        captured = capsys.readouterr()
        result = Run(code, captured.out, captured.err, time.time() - began)
        _assert_refused(result, Path(output))
        return result

    return run


def _stop_handlers() -> dict:
    """The handlers of the signals the command line takes over (it runs in this process)."""
    return {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGHUP)}


def _restore(handlers: dict) -> None:
    for number, handler in handlers.items():
        signal.signal(number, handler)


def _assert_refused(result: Run, output: Path) -> None:
    from pyhf_dist.journal import journal_path_for

    assert result.code != 0, result
    assert "Traceback" not in result.stderr + result.stdout, result
    assert "Fitting" not in result.stderr, f"refused only after fitting started: {result}"
    if not output.is_dir():
        written = [path for path in (output, journal_path_for(output)) if path.exists()]
        assert written == [], f"half-written files: {written}"


def _subprocess_cli(tmp_path: Path, *args: str, env: dict | None = None, prelude: str = "",
                    timeout: float = 120) -> Run:
    """Run the command line in a fresh interpreter; ``prelude`` is Python run before it starts."""
    code = f"{prelude}\nimport sys\nfrom pyhf_dist.cli import main\nsys.exit(main())"
    began = time.time()
    run = subprocess.run(
        [sys.executable, "-c", code, *args, "-o", str(tmp_path / "out.json"), "-q"],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )
    result = Run(run.returncode, run.stdout, run.stderr, time.time() - began)
    _assert_refused(result, tmp_path / "out.json")
    return result


def _one_error_line(result: Run) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, result
    return errors[0]


# ------------------------------------------------------------------------------ small pallets


@pytest.fixture
def demo_dir(tmp_path) -> Path:
    """The demo pallet as published pallets come: BkgOnly.json + patchset.json (with digests)."""
    directory = tmp_path / "pallet"
    directory.mkdir()
    (directory / "BkgOnly.json").write_text(json.dumps(demo_workspace()))
    (directory / "patchset.json").write_text(json.dumps(demo_patchset()))
    return directory


# ------------------------------------------------------------------------------ paths and files


def test_path_missing(cli, tmp_path):
    run = cli("fit", str(tmp_path / "nowhere.tar.gz"))
    assert run.code == 2
    assert "nowhere.tar.gz does not exist: check the path" in _one_error_line(run)


def test_patchset_path_missing(cli, demo_dir, tmp_path):
    run = cli("fit", str(demo_dir / "BkgOnly.json"), "--patchset", str(tmp_path / "nope.json"))
    assert run.code == 2 and "nope.json does not exist" in _one_error_line(run)


def test_not_json(cli, demo_dir, tmp_path):
    path = tmp_path / "BkgOnly.json"
    path.write_text("this is not JSON\n")
    run = cli("fit", str(path), "--patchset", str(demo_dir / "patchset.json"))
    assert run.code == 2 and "is not valid JSON" in _one_error_line(run)


def test_binary_file_given_as_json(cli, demo_dir, tmp_path):
    path = tmp_path / "BkgOnly.json"
    path.write_bytes(bytes(range(256)) * 4)
    run = cli("fit", str(path), "--patchset", str(demo_dir / "patchset.json"))
    assert run.code == 2 and "BkgOnly.json is not" in _one_error_line(run)


def test_truncated_json(cli, demo_dir):
    background = demo_dir / "BkgOnly.json"
    background.write_text(background.read_text()[:500])
    run = cli("fit", str(demo_dir))
    line = _one_error_line(run)
    assert run.code == 2 and "is not valid JSON" in line and "truncated" in line


def test_truncated_patchset_json(cli, demo_dir):
    patchset = demo_dir / "patchset.json"
    patchset.write_text(patchset.read_text()[:-300])
    run = cli("fit", str(demo_dir))
    line = _one_error_line(run)
    assert run.code == 2 and "patchset.json is not valid JSON" in line and "truncated" in line


def test_truncated_tarball(cli, demo_dir, tmp_path):
    tarball = tmp_path / "pallet.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(demo_dir, arcname="pallet")
    data = tarball.read_bytes()
    tarball.write_bytes(data[: len(data) // 2])
    run = cli("fit", str(tarball))
    line = _one_error_line(run)
    assert run.code == 2 and "is truncated or corrupt" in line and "download it again" in line


def test_not_a_tarball(cli, tmp_path):
    path = tmp_path / "pallet.tar.gz"
    path.write_text("not a tarball")
    run = cli("fit", str(path))
    assert run.code == 2 and "pallet.tar.gz is" in _one_error_line(run)


def test_directory_without_background(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    run = cli("fit", str(tmp_path / "empty"))
    assert run.code == 2 and "holds no BkgOnly.json" in _one_error_line(run)


# ------------------------------------------------------------------------------ JSON that is not a workspace


def test_json_that_is_not_a_workspace(cli, demo_dir, tmp_path):
    path = tmp_path / "BkgOnly.json"
    path.write_text(json.dumps([1, 2, 3]))
    run = cli("fit", str(path), "--patchset", str(demo_dir / "patchset.json"))
    assert run.code == 2 and "is not a HistFactory workspace" in _one_error_line(run)


def test_workspace_schema_error_names_the_json_path(cli, demo_dir):
    spec = demo_workspace()
    spec["channels"][1]["samples"][0]["modifiers"][1]["data"]["hi"] = "high"
    (demo_dir / "BkgOnly.json").write_text(json.dumps(spec))
    # Patch files carry no digest of the background (a patchset would refuse it for that first).
    (demo_dir / "patchset.json").unlink()
    patch = demo_patchset()["patches"][0]
    (demo_dir / f"patch.{patch['metadata']['name']}.json").write_text(json.dumps(patch["patch"]))
    run = cli("fit", str(demo_dir), "--executor", "sequential")
    line = _one_error_line(run)
    assert run.code == 2 and "is not a valid HistFactory workspace" in line
    assert "/channels/1/samples/0/modifiers/1" in line, line


def test_patchset_that_is_not_a_patchset(cli, demo_dir):
    (demo_dir / "patchset.json").write_text(json.dumps({"metadata": {}, "patches": "none"}))
    run = cli("fit", str(demo_dir))
    assert run.code == 2 and "is not a valid pyhf patchset" in _one_error_line(run)


def test_patchset_digest_mismatch(cli, demo_dir):
    spec = demo_workspace()
    spec["observations"][0]["data"] = [900.0]  # another background than the patchset was made for
    (demo_dir / "BkgOnly.json").write_text(json.dumps(spec))
    run = cli("fit", str(demo_dir))
    line = _one_error_line(run)
    assert run.code == 2 and "was not made for this background workspace (its digest does not match)" in line


# ------------------------------------------------------------------------------ patch selection


def test_patch_name_matching_nothing_suggests_close_names(cli, demo_dir):
    run = cli("fit", str(demo_dir), "-p", "demo_300_1")
    line = _one_error_line(run)
    assert run.code == 2 and "no patch matches 'demo_300_1': did you mean " in line and "demo_300_0" in line


def test_glob_matching_nothing(cli, demo_dir):
    run = cli("fit", str(demo_dir), "-p", "C1N2_*")
    line = _one_error_line(run)
    assert run.code == 2 and "no patch matches 'C1N2_*'" in line and "e.g. demo_300_0" in line


def test_empty_selection(cli, demo_dir):
    run = cli("fit", str(demo_dir), "-p", "")
    assert run.code == 2 and "the patch selection is empty" in _one_error_line(run)
    with pytest.raises(pyhf_dist.exceptions.PatchSelectionError, match="selection is empty"):
        pyhf_dist.map_fits(demo_dir, patches=[], backend="numpy")


def test_pallet_without_patches(cli, demo_dir):
    patchset = demo_patchset()
    patchset["patches"] = []
    (demo_dir / "patchset.json").write_text(json.dumps(patchset))
    run = cli("fit", str(demo_dir))
    assert run.code == 2 and "patch" in _one_error_line(run)


# ------------------------------------------------------------------------------ executors


def test_unknown_executor_lists_the_choices(cli, demo_dir):
    run = cli("fit", str(demo_dir), "--executor", "kubernetes")
    line = _one_error_line(run)
    assert run.code == 2
    assert "unknown executor 'kubernetes': choose one of dask, funcx, globus-compute, local, parsl" in line


def test_unknown_executor_option(cli, demo_dir):
    run = cli("fit", str(demo_dir), "--option", "colour=blue")
    assert run.code == 2 and "does not take colour" in _one_error_line(run)


@pytest.mark.parametrize("module, executor, extra", [
    ("distributed", "dask", "dask"),
    ("dask_jobqueue", "slurm", "slurm"),
    ("globus_compute_sdk", "funcx", "funcx"),
    ("parsl", "parsl", "parsl"),
])
def test_missing_optional_extra_says_what_to_install(tmp_path, demo_dir, module, executor, extra):
    # A package set to None in sys.modules cannot be imported: as if it were not installed.
    run = _subprocess_cli(tmp_path, "fit", str(demo_dir), "--executor", executor,
                          prelude=f"import sys; sys.modules[{module!r}] = None")
    line = _one_error_line(run)
    assert run.code != 0 and f'pip install "pyhf-dist[{extra}]"' in line, run


def test_missing_jax_for_the_jax_backend(tmp_path, demo_dir):
    run = _subprocess_cli(tmp_path, "fit", str(demo_dir), "--backend", "jax",
                          prelude="import sys; sys.modules['jax'] = None")
    line = _one_error_line(run)
    assert run.code == 2 and 'pip install "pyhf-dist[jax]"' in line and "--backend numpy" in line


def test_dask_scheduler_refusing_connections_fails_fast(tmp_path, demo_dir):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    began = time.time()
    run = _subprocess_cli(tmp_path, "fit", str(demo_dir), "--executor", "dask", "--address", f"tcp://127.0.0.1:{port}")
    line = _one_error_line(run)
    assert run.code == 1 and f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}" in line
    assert time.time() - began < 20  # the refusal itself is immediate; the rest is starting Python


def test_dask_scheduler_that_never_answers_fails_within_10_seconds(tmp_path, demo_dir):
    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        try:
            run = _subprocess_cli(tmp_path, "fit", str(demo_dir), "--executor", "dask", "--address", address,
                                  timeout=25)
        except subprocess.TimeoutExpired:
            pytest.fail("no answer after 25 s")
    assert run.code == 1 and "Dask scheduler" in _one_error_line(run)
    assert run.seconds < 10 + 5  # 10 s for the connection, 5 s for starting Python


def test_slurm_commands_not_found(tmp_path, demo_dir):
    run = _subprocess_cli(tmp_path, "fit", str(demo_dir), "--executor", "slurm", env={"PATH": str(tmp_path)})
    line = _one_error_line(run)
    assert run.code == 1 and "sbatch" in line and "not found" in line


def test_globus_compute_without_endpoint_id(tmp_path, demo_dir):
    env = {"GLOBUS_COMPUTE_ENDPOINT_ID": "", "HOME": str(tmp_path)}
    run = _subprocess_cli(tmp_path, "fit", str(demo_dir), "--executor", "globus-compute", env=env)
    line = _one_error_line(run)
    assert run.code == 2 and "endpoint id" in line and "--endpoint-id" in line


def test_globus_compute_without_credentials(tmp_path, demo_dir):
    env = {"GLOBUS_COMPUTE_CLIENT_ID": "", "GLOBUS_COMPUTE_CLIENT_SECRET": "", "HOME": str(tmp_path),
           "GLOBUS_COMPUTE_USER_DIR": str(tmp_path / "compute")}
    run = _subprocess_cli(tmp_path, "fit", str(demo_dir), "--executor", "funcx",
                          "--endpoint-id", "4b116d3c-1703-4f8f-9f6f-39921e5864df", env=env)
    line = _one_error_line(run)
    assert run.code == 1 and "no Globus Compute login" in line and "GLOBUS_COMPUTE_CLIENT_ID" in line


# ------------------------------------------------------------------------------ settings


@pytest.mark.parametrize("codes, message", [
    ("code9,code4p", "invalid normsys interpolation code 'code9': choose one of code1, code4"),
    ("code4,code7", "invalid histosys interpolation code 'code7': choose one of code0, code2, code4p"),
    ("code4", "give two, normsys then histosys"),
])
def test_invalid_interpolation_code(cli, demo_dir, codes, message):
    run = cli("fit", str(demo_dir), "--interpcodes", codes)
    assert run.code == 2 and message in _one_error_line(run)


def test_invalid_backend(cli, demo_dir):
    run = cli("fit", str(demo_dir), "--backend", "torch")
    assert run.code == 2 and "Invalid value for '--backend': 'torch' is not one of 'numpy', 'jax'" in run.stderr
    with pytest.raises(pyhf_dist.exceptions.SettingsError, match="unknown backend 'torch': choose one of numpy, jax"):
        pyhf_dist.map_fits(demo_dir, backend="torch")


def test_invalid_test_statistic(cli, demo_dir):
    run = cli("fit", str(demo_dir), "--test-stat", "qmu")
    assert run.code == 2 and "Invalid value for '--test-stat': 'qmu' is not one of 'qtilde', 'q', 'q0'" in _one_error_line(run)
    with pytest.raises(pyhf_dist.exceptions.SettingsError, match="unknown test statistic 'qmu': choose one of qtilde"):
        pyhf_dist.map_fits(demo_dir, test_stat="qmu")


@pytest.mark.parametrize("keyword, meant", [
    ("toys", "ntoys"), ("test_statistic", "test_stat"), ("mu", "poi_test"), ("poi", "poi_test"), ("pallets", "pallet"),
])
def test_a_misspelt_keyword_names_the_setting_meant(demo_dir, keyword, meant):
    """A keyword no setting and not the executor takes is refused before any worker starts, naming
    the setting it resembles (by spelling, or as pyhf's users call it)."""
    began = time.monotonic()
    with pytest.raises(pyhf_dist.exceptions.SettingsError) as caught:
        pyhf_dist.map_fits(demo_dir, **{keyword: 1.0})
    assert str(caught.value) == f"unknown argument {keyword!r}: did you mean {meant}?"
    assert time.monotonic() - began < 5


@pytest.mark.parametrize("value, message", [
    ("-1", "POI value must be >= 0, got -1.0"),
    ("one", "POI value must be a number, got 'one'"),
    ("nan", "POI value must be a finite number"),
])
def test_invalid_poi_value(cli, demo_dir, value, message):
    run = cli("fit", str(demo_dir), f"--poi-test={value}")
    assert run.code == 2 and message in _one_error_line(run)


def test_upper_limits_with_the_discovery_statistic_are_refused(cli, demo_dir):
    """q0 tests mu = 0 and bounds no signal strength: the search for a limit would never end."""
    run = cli("fit", str(demo_dir), "--test-stat", "q0", "--upper-limit")
    assert run.code == 2 and "upper limits need the test statistic qtilde or q" in _one_error_line(run)
    assert run.seconds < 30
    with pytest.raises(pyhf_dist.exceptions.SettingsError, match="q0 tests the background-only hypothesis"):
        pyhf_dist.map_fits(demo_dir, test_stat="q0", calculation="upper_limit")


def test_invalid_retries_and_timeout(cli, demo_dir):
    assert "retries must be a non-negative integer" in _one_error_line(cli("fit", str(demo_dir), "--retries", "-1"))
    assert "timeout must be a positive number" in _one_error_line(cli("fit", str(demo_dir), "--timeout", "0"))


def test_zero_workers_are_refused_not_replaced_by_the_default(cli, demo_dir):
    """``--workers 0`` (local, Dask) and ``--jobs 0`` (Slurm) are numbers given, not flags left off."""
    for args, name in ((("--workers", "0"), "workers"), (("--executor", "dask", "--workers", "0"), "workers"),
                       (("--executor", "slurm", "--jobs", "0", "--show-job-script"), "jobs")):
        run = cli("fit", str(demo_dir), *args)
        assert run.code == 2 and f"{name} must be a positive integer, got 0" in _one_error_line(run), args


# ------------------------------------------------------------------------------ output


def test_output_directory_missing(cli, demo_dir, tmp_path):
    run = cli("fit", str(demo_dir), output=str(tmp_path / "no" / "such" / "dir" / "r.json"))
    assert run.code == 2 and "directory" in _one_error_line(run) and "does not exist (create it first)" in run.stderr
    assert not (tmp_path / "no").exists()


def test_output_is_a_directory(cli, demo_dir, tmp_path):
    (tmp_path / "outdir").mkdir()
    run = cli("fit", str(demo_dir), output=str(tmp_path / "outdir"))
    assert run.code == 2 and "is a directory: give a file name" in _one_error_line(run)
    assert list((tmp_path / "outdir").iterdir()) == []


def test_output_under_a_file(cli, demo_dir, tmp_path):
    (tmp_path / "outfile").write_text("x")
    run = cli("fit", str(demo_dir), output=str(tmp_path / "outfile" / "r.json"))
    assert run.code == 2 and "cannot write" in _one_error_line(run)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_output_in_a_read_only_directory(cli, demo_dir, tmp_path):
    locked = tmp_path / "outlocked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        run = cli("fit", str(demo_dir), output=str(locked / "r.json"))
    finally:
        locked.chmod(0o755)
    assert run.code == 2 and "cannot write" in _one_error_line(run) and "Permission denied" in run.stderr


def test_debug_shows_the_traceback(tmp_path):
    run = subprocess.run([sys.executable, "-m", "pyhf_dist", "--debug", "fit", str(tmp_path / "nowhere")],
                         capture_output=True, text=True, timeout=120)
    assert "Traceback" in run.stderr and "PalletError" in run.stderr
    # The exit code is still that of bad input, and the one line still ends it.
    assert run.returncode == 2 and run.stderr.splitlines()[-1].startswith("Error: "), run.stderr


def test_resume_with_a_journal_from_other_settings_or_not_a_journal(capsys, demo_dir, tmp_path):
    output = tmp_path / "r.json"
    journal = tmp_path / "r.journal.jsonl"
    previous = _stop_handlers()
    try:
        journal.write_text(json.dumps({"key": "0123456789abcdef", "record": {"name": "demo_300_0"}}) + "\n")
        code = main(["fit", str(demo_dir), "--resume", "--executor", "sequential", "-o", str(output), "-q"])
        err = capsys.readouterr().err
        assert code == 2 and "holds 1 results computed with other settings" in err and "Traceback" not in err
        journal.write_text("not a journal\n{}\n")
        code = main(["fit", str(demo_dir), "--resume", "--executor", "sequential", "-o", str(output), "-q"])
        err = capsys.readouterr().err
        assert code == 2 and "is not a journal (no line of it is a journal entry)" in err and "Traceback" not in err
    finally:
        _restore(previous)
    assert not output.exists() and journal.read_text() == "not a journal\n{}\n", "the journal is left as it was"


@pytest.mark.parametrize("extra, message", [
    ((), "needs toy-based hypotests"),
    (("--toys", "10"), "writes a .npz file"),
    (("--toys", "10", "--keep-toys", "no/such/folder/toys.npz"), "no folder"),
])
def test_keep_toys_refused_in_one_line(cli, tmp_path, extra, message):
    keep = tmp_path / "toys.txt" if "--keep-toys" not in extra else None
    args = ["fit", str(tmp_path / "missing-not-read.tar.gz"), *extra]
    if keep is not None:
        args += ["--keep-toys", str(keep)]
    result = cli(*args)
    assert result.code == 2 and message in result.stderr, result
    assert len(result.stderr.strip().splitlines()) == 1


def test_merge_toys_refuses_what_is_not_a_toy_file(capsys, tmp_path):
    (tmp_path / "a.npz").write_text("not toys")
    assert main(["merge-toys", str(tmp_path / "a.npz"), "-o", str(tmp_path / "m.npz")]) == 2
    err = capsys.readouterr().err
    assert "not a file of kept toys" in err and "Traceback" not in err
    assert not (tmp_path / "m.npz").exists()
    assert main(["merge-toys", str(tmp_path / "a.npz"), "-o", str(tmp_path / "none" / "m.npz")]) == 2
    err = capsys.readouterr().err
    assert f"Error: merge-toys: no folder {str(tmp_path / 'none')!r} to write m.npz in" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------ numbers a fit cannot use


def test_negative_observed_counts_are_refused_in_the_background_and_in_a_patch(cli, demo_dir):
    """A negative count gave 'ok', converged CLs on the fast path (and failed fits in pyhf)."""
    import pyhf

    workspace = json.loads((demo_dir / "BkgOnly.json").read_text())
    workspace["observations"][1]["data"][0] = -5.0
    (demo_dir / "BkgOnly.json").write_text(json.dumps(workspace))
    patchset = json.loads((demo_dir / "patchset.json").read_text())
    patchset["metadata"]["digests"] = {"sha256": pyhf.utils.digest(workspace)}  # made for this background
    (demo_dir / "patchset.json").write_text(json.dumps(patchset))
    line = _one_error_line(cli("fit", str(demo_dir)))
    assert "observed count -5.0 of channel" in line and "/observations/1/data/0" in line
    assert "counts of events must be finite and 0 or more" in line

    workspace["observations"][1]["data"][0] = 5.0
    (demo_dir / "BkgOnly.json").write_text(json.dumps(workspace))
    patchset["metadata"]["digests"] = {"sha256": pyhf.utils.digest(workspace)}
    patchset["patches"][2]["patch"].append({"op": "replace", "path": "/observations/0/data/0", "value": -1.0})
    (demo_dir / "patchset.json").write_text(json.dumps(patchset))
    line = _one_error_line(cli("fit", str(demo_dir)))
    assert f"(patch {patchset['patches'][2]['metadata']['name']}): observed count -1.0 at /observations/0/data/0" in line


def test_nan_in_a_pallet_file_is_refused_naming_the_file(cli, demo_dir):
    text = (demo_dir / "patchset.json").read_text()
    patchset = json.loads(text)
    patchset["patches"][0]["patch"][0]["value"]["data"][0] = float("nan")  # written as NaN, which JSON lacks
    (demo_dir / "patchset.json").write_text(json.dumps(patchset))
    line = _one_error_line(cli("fit", str(demo_dir)))
    assert line.endswith("patchset.json holds NaN where a number belongs: yields, uncertainties and data must be "
                         "finite numbers; fix the file")


def test_a_patch_name_given_twice_is_named_in_a_short_line(cli, demo_dir):
    patchset = json.loads((demo_dir / "patchset.json").read_text())
    patchset["patches"].append(patchset["patches"][0])
    (demo_dir / "patchset.json").write_text(json.dumps(patchset))
    line = _one_error_line(cli("fit", str(demo_dir)))
    name = patchset["patches"][0]["metadata"]["name"]
    assert f"patch name {name!r} is given to several patches: each patch needs its own name" in line
    assert len(line) < 300, "not pyhf's message, which holds the whole patch"


# ------------------------------------------------------------------------------ files a scan must not replace


def test_a_results_file_needs_a_results_ending(cli, demo_dir, tmp_path):
    line = _one_error_line(cli("fit", str(demo_dir), output=str(tmp_path / "r.txt")))
    assert "results are written as .json, .csv or .parquet" in line and "e.g." in line


def test_results_are_written_through_a_link_and_into_a_pipe_without_replacing_either(capsys, demo_dir, tmp_path):
    """A rename would put a plain file where the link or the pipe was (as root, even over /dev/null)."""
    import stat
    import threading

    target = tmp_path / "kept" / "results.json"
    target.parent.mkdir()
    target.write_text("earlier results")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    pipe = tmp_path / "results-pipe"
    os.mkfifo(pipe)
    received = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_text()))
    reader.start()
    previous = _stop_handlers()
    try:
        for output in (link, pipe):
            code = main(["fit", str(demo_dir), "-p", "demo_300_0", "--executor", "sequential", "--backend", "numpy",
                         "-o", str(output), "-q"])
            captured = capsys.readouterr()
            assert code == 0, captured.err
        # Results streamed (-o /dev/stdout) keep standard output to themselves: the summary goes to stderr.
        assert captured.out == "" and f"Results written to {pipe}" in captured.err
    finally:
        _restore(previous)
    reader.join(60)
    assert link.is_symlink() and json.loads(target.read_text())["results"][0]["name"] == "demo_300_0"
    assert stat.S_ISFIFO(os.stat(pipe).st_mode) and json.loads(received[0])["results"][0]["status"] == "ok"
    assert not (tmp_path / "results-pipe.journal.jsonl").exists()


def test_a_journal_with_results_or_a_file_that_is_no_journal_is_never_emptied(capsys, demo_dir, tmp_path):
    """Without --resume a scan starts its journal afresh. Over an earlier run's results (forgotten
    --resume), another scan's, an input given as --journal by mistake, or the results file itself,
    it stops at once instead: it would have emptied the file, and a finished scan removes it."""
    output = tmp_path / "r.json"
    journal = tmp_path / "r.journal.jsonl"
    pyhf_dist.map_fits(demo_dir, executor="sequential", backend="numpy", journal=journal, patches=["demo_300_0"])
    earlier = journal.read_bytes()
    background = (demo_dir / "BkgOnly.json").read_bytes()

    def fit(*args: str) -> tuple[int, str]:
        previous = _stop_handlers()
        try:
            code = main(["fit", str(demo_dir), "--executor", "sequential", "--backend", "numpy", "-o", str(output),
                         "-q", *args])
        finally:
            _restore(previous)
        return code, capsys.readouterr().err

    code, err = fit()
    assert code == 2 and "holds results of an earlier run of this scan: add --resume" in err, err
    code, err = fit("--poi-test", "2")
    assert code == 2 and "holds results of an earlier scan with other settings" in err, err
    code, err = fit("--journal", str(demo_dir / "BkgOnly.json"))
    assert code == 2 and "BkgOnly.json exists and is not a journal of pyhf-dist" in err, err
    code, err = fit("--journal", str(output))
    assert code == 2 and "is the results file (-o) itself" in err, err
    assert "Traceback" not in err and not output.exists()
    assert journal.read_bytes() == earlier and (demo_dir / "BkgOnly.json").read_bytes() == background
    code, err = fit("--resume")
    assert code == 0 and len(json.loads(output.read_text())["results"]) == len(demo_patchset()["patches"]), err


def test_python_arguments_of_the_wrong_kind_are_refused_in_one_line(demo_dir):
    with pytest.raises(pyhf_dist.exceptions.InputError, match="journal must be a file path"):
        pyhf_dist.map_fits(demo_dir, executor="sequential", journal=123)
    with pytest.raises(pyhf_dist.exceptions.InputError, match="resume must be True or False, got 'yes'"):
        pyhf_dist.map_fits(demo_dir, executor="sequential", resume="yes")
    with pytest.raises(pyhf_dist.exceptions.SettingsError,
                       match="'progress' is an argument of map_fits; iter_fits yields each record"):
        next(pyhf_dist.iter_fits(demo_dir, executor="sequential", progress=False))


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_a_tested_value_beyond_the_poi_bounds_fails_with_the_poi_named(demo_dir, backend):
    """pyhf's own error named the parameter's index (``index: 29``), on every record."""
    if backend == "jax":
        pytest.importorskip("jax")
    result = pyhf_dist.map_fits(demo_dir, executor="sequential", backend=backend, poi_test=1e6,
                                patches=["demo_300_0"])
    assert result["demo_300_0"].status == "failed"
    assert result["demo_300_0"].error.startswith(
        "ValueError: the tested POI value 1e+06 lies outside the bounds of mu_SIG, [0, 10]: test a value within")


def test_minuit_on_the_fast_path_says_where_it_applies(capsys, demo_dir, tmp_path):
    """--optimizer minuit without --backend numpy changed no fast-path fit, and said nothing."""
    pytest.importorskip("jax")
    previous = _stop_handlers()
    try:
        code = main(["fit", str(demo_dir), "-p", "demo_300_0", "--executor", "sequential", "--optimizer", "minuit",
                     "-o", str(tmp_path / "r.json"), "-q"])
    finally:
        _restore(previous)
    err = capsys.readouterr().err
    assert code == 0 and "Note: --optimizer minuit is plain pyhf's minimizer" in err and "--backend numpy" in err
