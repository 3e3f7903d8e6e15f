"""The core: map_fits on the local executor (and user pools) against plain serial pyhf."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

import pyhf_dist
from pyhf_dist.executors.local import LocalExecutor
from helpers import CODE4, LBB_FEW, LBB_SAMPLE, assert_matches_reference, command_line, serial_pyhf


def test_local_matches_serial_pyhf_on_all_3L_eRJR_patches(erjr_dir, erjr_reference):
    result = pyhf_dist.map_fits(erjr_dir, executor="local", workers=2, backend="numpy")
    assert len(result) == 66
    assert_matches_reference(result, erjr_reference)
    assert result.metadata["executor"] == "local" and result.metadata["workers"] == 2
    assert all(record.worker["slurm_job_id"] is None for record in result)
    assert len({record.worker["pid"] for record in result}) == 2


@pytest.mark.slow
def test_local_matches_serial_pyhf_on_1Lbb_sample(lbb_tarball, lbb_reference):
    result = pyhf_dist.map_fits(
        lbb_tarball, patches=LBB_SAMPLE, executor="local", workers=2, backend="numpy", modifier_settings=CODE4
    )
    assert result.names() == [name for name in pyhf_dist.load_pallet(lbb_tarball).names() if name in LBB_SAMPLE]
    assert_matches_reference(result, lbb_reference)
    assert result["C1N2_Wh_hbb_1000_0"].values == [1000, 0]
    assert result.metadata["labels"] == ["m1", "m2"]


def test_user_thread_pool(erjr_dir, erjr_pallet):
    names = erjr_pallet.names()[:10]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        result = pyhf_dist.map_fits(erjr_dir, executor=pool, patches=names, backend="numpy")
        # The pool belongs to the user: the scan must leave it usable.
        assert pool.submit(sum, [1, 2]).result() == 3
    assert_matches_reference(result, serial_pyhf(erjr_pallet, names))


def test_user_process_pool(erjr_dir, erjr_pallet):
    import multiprocessing

    names = erjr_pallet.names()[-10:]
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        result = pyhf_dist.map_fits(erjr_dir, executor=pool, patches=names, backend="numpy")
    assert_matches_reference(result, serial_pyhf(erjr_pallet, names))


class _CountSetups:
    """A worker initializer that logs every construction of a worker state (in the worker)."""

    def __init__(self, log: str):
        self.log = log

    def __call__(self) -> None:
        from pyhf_dist.runtime import state as worker

        original = worker.WorkerState.__init__
        log = self.log

        def counting_init(self, *args, **kwargs):
            with open(log, "a") as stream:
                stream.write(f"{os.getpid()}\n")
            original(self, *args, **kwargs)

        worker.WorkerState.__init__ = counting_init


def test_worker_setup_runs_once_per_worker_not_per_task(erjr_dir, tmp_path):
    log = tmp_path / "setups.log"
    executor = LocalExecutor(workers=2, initializer=_CountSetups(str(log)))
    with executor:
        result = pyhf_dist.map_fits(erjr_dir, executor=executor, patches=["ERJR_1*"], backend="numpy")
    pids = {record.worker["pid"] for record in result}
    setups = log.read_text().split()
    assert len(result) > 10 and all(record.ok for record in result)
    assert sorted(setups) == sorted(str(pid) for pid in pids), "one setup per worker process"
    assert len(setups) == 2


def test_local_workers_start_before_the_context_exists(erjr_pallet):
    """prepare() spawns the workers (they import meanwhile); start() hands each the context once."""
    from pyhf_dist.settings import FitSettings
    from pyhf_dist.protocol import WorkerContext

    settings = FitSettings(backend="numpy").to_dict()
    context = WorkerContext.build(erjr_pallet.workspace, settings)
    names = [patch.name for patch in erjr_pallet.patches[:4]]
    with LocalExecutor(workers=2) as executor:
        executor.prepare(settings)
        deadline = time.time() + 120
        while len(executor.worker_pids()) < 2 and time.time() < deadline:  # up before any context
            time.sleep(0.05)
        spawned = set(executor.worker_pids())
        assert len(spawned) == 2
        executor.start(context)
        futures = [executor.submit({"name": p.name, "patch": p.operations, "context": context.key})
                   for p in erjr_pallet.patches[:4]]
        records = [future.result(timeout=300) for future in futures]
    assert {record["worker"]["pid"] for record in records} <= spawned
    assert_matches_reference(records, serial_pyhf(erjr_pallet, names))


class _SecondWorkerStartsLate:
    """A worker initializer: the second worker to start sleeps ``seconds`` first (in the worker)."""

    def __init__(self, marker: str, seconds: float):
        self.marker, self.seconds = marker, seconds

    def __call__(self) -> None:
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            time.sleep(self.seconds)


def test_the_first_tasks_go_to_different_workers_while_one_still_warms_up(erjr_pallet, tmp_path):
    """A worker still starting takes the next task: the two tasks of a scan of two long chunks
    ran one after the other on the worker that had warmed up first."""
    from pyhf_dist.settings import FitSettings
    from pyhf_dist.protocol import WorkerContext

    settings = FitSettings(backend="numpy").to_dict()
    context = WorkerContext.build(erjr_pallet.workspace, settings)
    marker = tmp_path / "first-worker"
    with LocalExecutor(workers=2, initializer=_SecondWorkerStartsLate(str(marker), 8.0)) as executor:
        executor.start(context)
        deadline = time.time() + 120
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(2.0)  # the first worker has started and warmed up; the second sleeps on
        patches = erjr_pallet.patches[:2]
        futures = [executor.submit({"name": p.name, "patch": p.operations, "context": context.key}) for p in patches]
        records = [future.result(timeout=300) for future in futures]
    assert all(record["status"] == "ok" for record in records)
    assert len({record["worker"]["pid"] for record in records}) == 2, "both tasks went to one worker"


def test_a_bad_pallet_stops_the_workers_started_for_it(tmp_path):
    import psutil

    from pyhf_dist.exceptions import PalletError

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(PalletError, match="does not exist"):
        pyhf_dist.map_fits(str(tmp_path / "missing.tar.gz"), executor="local", workers=2)
    # multiprocessing's resource tracker outlives every pool by design; workers must not.
    started = [p for p in psutil.Process().children(recursive=True)
               if p.pid not in before and "resource_tracker" not in command_line(p)]
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_tasks_carry_only_the_patch_not_the_workspace(erjr_pallet):
    sizes = []

    class Recording(LocalExecutor):
        def submit(self, task):
            sizes.append(len(json.dumps(task)))
            return super().submit(task)

    with Recording(workers=1) as executor:
        pyhf_dist.map_fits(erjr_pallet, executor=executor, patches=["ERJR_500*"], backend="numpy")
    workspace_size = len(json.dumps(erjr_pallet.workspace))
    assert sizes and max(sizes) < workspace_size / 2


def test_executor_by_name_and_unknown_names(erjr_pallet):
    result = pyhf_dist.map_fits(erjr_pallet, executor="sequential", patches=["ERJR_500p0_0p0"], backend="numpy")
    assert_matches_reference(result, serial_pyhf(erjr_pallet, ["ERJR_500p0_0p0"]))
    with pytest.raises(pyhf_dist.exceptions.UnknownExecutorError, match="choose one of .*local"):
        pyhf_dist.map_fits(erjr_pallet, executor="nowhere")
    with pytest.raises(pyhf_dist.exceptions.ExecutorOptionError, match="does not take memory"):
        pyhf_dist.map_fits(erjr_pallet, executor="local", memory="2GB")


def test_iter_fits_streams_and_callback_sees_every_record(demo_small):
    streamed = [record.name for record in pyhf_dist.iter_fits(demo_small, executor="sequential", backend="numpy")]
    assert sorted(streamed) == sorted(demo_small.names())
    seen = []
    result = pyhf_dist.map_fits(demo_small, executor="sequential", backend="numpy", callback=seen.append)
    assert [record.name for record in seen] == result.names() == demo_small.names()


def test_record_timing_and_worker_fields(demo_small):
    result = pyhf_dist.map_fits(demo_small, executor="local", workers=2, backend="numpy")
    for record in result:
        assert record.submitted <= record.started <= record.finished
        # fit_seconds on the monotonic clock, started and finished on the wall clock: they agree
        # to the microseconds between the readings.
        assert record.fit_seconds == pytest.approx(record.finished - record.started, abs=1e-3)
        assert set(record.worker) == {"host", "pid", "slurm_job_id"}
        assert record.attempts == 1
    assert result.metadata["pyhf_version"] and result.metadata["wall_seconds"] > 0
    assert result.metadata["settings"]["backend"] == "numpy"


@pytest.fixture(scope="module")
def demo_small():
    return pyhf_dist.demo_pallet(points=6)


def test_results_json_and_csv_round_trip(demo_small, tmp_path):
    result = pyhf_dist.map_fits(demo_small, executor="sequential", backend="numpy")
    path = result.to_json(tmp_path / "r.json") and tmp_path / "r.json"
    data = json.loads(path.read_text())
    assert set(data) == {"metadata", "results"} and len(data["results"]) == 6
    again = pyhf_dist.ScanResult.from_json(path)
    assert [r.to_dict() for r in again] == [r.to_dict() for r in result]
    assert again.metadata == result.metadata
    result.to_csv(tmp_path / "r.csv")
    table = pyhf_dist.ScanResult.from_csv(tmp_path / "r.csv")
    for a, b in zip(table, result):
        assert a.name == b.name and a.values == b.values and a.status == b.status
        assert a.CLs_obs == pytest.approx(b.CLs_obs, rel=1e-12) and a.CLs_exp == pytest.approx(b.CLs_exp, rel=1e-12)
    assert result[0] is result[result.names()[0]]
    with pytest.raises(KeyError):
        result["no such patch"]


def test_minimal_records_are_read(tmp_path):
    path = tmp_path / "minimal.json"
    path.write_text(json.dumps({"results": [{"name": "a", "values": [1, 2], "CLs_obs": 0.5,
                                             "CLs_exp": [0.1, 0.2, 0.3, 0.4, 0.5], "status": "ok"}]}))
    result = pyhf_dist.ScanResult.from_json(path)
    assert result["a"].CLs_exp[2] == 0.3 and result.metadata == {}


def test_written_files_get_the_permissions_a_new_file_gets(tmp_path):
    """Results and kept toys are written to a temporary file (readable by its owner only) and
    renamed: they must end with the permissions ``open()`` gives a new file under the umask, and
    a file they replace keeps its own, so results can be shared on a cluster's filesystem."""
    import stat

    from pyhf_dist import kept_toys
    from pyhf_dist.settings import FitSettings
    from pyhf_dist.signals.output import write_parquet

    source = tmp_path / "minimal.json"
    source.write_text(json.dumps({"results": [{"name": "a", "values": [1, 2], "CLs_obs": 0.5,
                                               "CLs_exp": [0.1, 0.2, 0.3, 0.4, 0.5], "status": "ok"}]}))
    result = pyhf_dist.ScanResult.from_json(source)
    toys = {(None, "a"): {"teststat": 1.0, "sb": [0.5, 2.0], "b": [0.0, 0.1]}}
    settings = FitSettings(calctype="toybased", ntoys=2, seed=1)

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    previous = os.umask(0o027)
    try:
        (tmp_path / "plain.txt").write_text("")
        result.to_json(tmp_path / "r.json")
        result.to_csv(tmp_path / "r.csv")
        kept_toys.write_kept(tmp_path / "toys.npz", toys, settings)
        written = ["r.json", "r.csv", "toys.npz"]
        if importlib.util.find_spec("pyarrow") is not None:  # the parquet extra: installed with all
            write_parquet(result, tmp_path / "r.parquet")
            written.append("r.parquet")
        assert mode(tmp_path / "plain.txt") == 0o640
        assert [mode(tmp_path / name) for name in written] == [0o640] * len(written)
        assert sorted(path.name for path in tmp_path.iterdir()) == sorted(written + ["minimal.json", "plain.txt"])
        for name in ("r.json", "toys.npz"):
            (tmp_path / name).chmod(0o664)
        result.to_json(tmp_path / "r.json")
        kept_toys.write_kept(tmp_path / "toys.npz", toys, settings)
        assert mode(tmp_path / "r.json") == mode(tmp_path / "toys.npz") == 0o664
    finally:
        os.umask(previous)
    assert kept_toys.read_kept(tmp_path / "toys.npz")[1][0]["name"] == "a"


def test_cli_matches_serial_pyhf(erjr_dir, erjr_sample_names, erjr_sample_reference, lbb_tarball, lbb_few_reference,
                                 tmp_path):
    output = tmp_path / "erjr.json"
    run = _cli("fit", str(erjr_dir), *_patch_options(erjr_sample_names), "--backend", "numpy", "--workers", "2",
               "-o", str(output))
    assert run.returncode == 0, run.stderr
    assert "Results written" in run.stdout and "patches" in run.stdout
    assert_matches_reference(json.loads(output.read_text())["results"], erjr_sample_reference)
    output = tmp_path / "lbb.json"
    run = _cli("fit", str(lbb_tarball), *_patch_options(LBB_FEW), "--backend", "numpy", "--interpcodes", "code4,code4p",
               "-o", str(output), "-q")
    assert run.returncode == 0, run.stderr
    assert_matches_reference(json.loads(output.read_text())["results"], lbb_few_reference)


def test_cli_background_plus_patchset_directory(erjr_dir, erjr_pallet, tmp_path):
    output = tmp_path / "r.csv"
    run = _cli("fit", str(erjr_dir / "BkgOnly.json"), "--patchset", str(erjr_dir), "-p", "ERJR_400*",
               "--backend", "numpy", "--executor", "sequential", "-o", str(output), "-q")
    assert run.returncode == 0, run.stderr
    table = pyhf_dist.ScanResult.from_csv(output)
    names = [name for name in erjr_pallet.names() if name.startswith("ERJR_400")]
    assert_matches_reference(table, serial_pyhf(erjr_pallet, names))


def test_demo_command_runs_a_real_scan():
    run = _cli("demo", "--backend", "numpy", "--workers", "2", "-q")
    assert run.returncode == 0, run.stderr
    assert "demo_300_0" in run.stdout and "excluded" in run.stdout
    assert "failed                      0" in run.stdout
    assert "%|" not in run.stderr, "-q: no progress bar"


def test_help_is_clear():
    for args in (["--help"], ["fit", "--help"], ["demo", "--help"]):
        run = _cli(*args)
        assert run.returncode == 0 and "Usage: pyhf-dist" in run.stdout


def test_importing_pyhf_dist_imports_no_optional_backend():
    code = (
        "import sys, pyhf_dist, pyhf_dist.cli;"
        "heavy = [m for m in ('jax', 'dask', 'distributed', 'dask_jobqueue', 'parsl', 'globus_compute_sdk',"
        " 'matplotlib') if m in sys.modules]; print(heavy)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


def _patch_options(names) -> list[str]:
    """``-p NAME`` for each of ``names``: the command line's selection of those patches."""
    return [arg for name in names for arg in ("-p", name)]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyhf_dist", *args], capture_output=True, text=True, timeout=600)


def test_more_local_workers_than_cores_are_advised_against():
    """Each worker fits on one thread: more workers than cores take turns (64 on 2 cores: 23x slower)."""
    from pyhf_dist.executors.base import default_workers

    cores = default_workers()
    assert "advice" not in LocalExecutor(workers=cores).describe()
    advice = LocalExecutor(workers=cores + 1).describe()["advice"]
    assert advice.startswith(f"{cores + 1} workers on {cores} cores take turns") and f"--workers {cores}" in advice


def test_a_note_written_while_the_progress_bar_is_drawn_gets_a_line_of_its_own(monkeypatch):
    """The command line's notes (a worker lost and its patches sent again, say) come while the bar
    is drawn: each must be a line of its own, not glued to the bar's."""
    import io
    import logging
    import types

    from pyhf_dist.progress import NoteHandler, ProgressBar

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    handler = NoteHandler()
    handler.setFormatter(logging.Formatter("Note: %(message)s"))
    logger = logging.getLogger("pyhf_dist.test_notes")
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "propagate", False)
    try:
        bar = ProgressBar(total=2)
        bar.update(types.SimpleNamespace(ok=True))
        bar._flush(time.monotonic())
        logger.warning("a worker was lost: demo_700_150 again (attempt 2 of 3)")
        bar.update(types.SimpleNamespace(ok=True))
        bar.close()
    finally:
        logger.removeHandler(handler)
    lines = [line.strip() for line in stream.getvalue().replace("\r", "\n").splitlines()]
    assert "Note: a worker was lost: demo_700_150 again (attempt 2 of 3)" in lines, stream.getvalue()
    assert any("2/2" in line for line in lines)


def test_in_python_a_note_during_the_bar_gets_a_line_of_its_own_too(monkeypatch):
    """A script or a notebook configures no logging: Python's last resort prints the notes, glued
    to the bar's line. While the bar is drawn, pyhf-dist prints them on lines of their own."""
    import io
    import logging
    import types

    from pyhf_dist.progress import ProgressBar

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(logging, "lastResort", logging._StderrHandler(logging.WARNING))  # reads sys.stderr
    # As in a fresh script: pytest adds handlers of its own, and a test before this one may have run
    # the command line in this process, which adds its own to pyhf-dist's logger.
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(logging.getLogger("pyhf_dist"), "handlers", [])
    assert not logging.getLogger("pyhf_dist").hasHandlers()
    bar = ProgressBar(total=2)
    bar.update(types.SimpleNamespace(ok=True))
    bar._flush(time.monotonic())
    logging.getLogger("pyhf_dist.scan.loop").warning("a worker was lost: demo_700_150 again (attempt 2 of 3)")
    bar.update(types.SimpleNamespace(ok=True))
    bar.close()
    lines = [line.strip() for line in stream.getvalue().replace("\r", "\n").splitlines()]
    assert "a worker was lost: demo_700_150 again (attempt 2 of 3)" in lines, stream.getvalue()
    assert not logging.getLogger("pyhf_dist").hasHandlers(), "the bar's handler goes with the bar"


def test_the_summary_says_how_many_of_the_workers_asked_for_fitted():
    """--jobs 4 on a Slurm that runs 2 (its node full): "4 workers" alone misleads."""
    from pyhf_dist.results import ScanResult

    records = [{"name": f"p{i}", "values": [i, 0], "status": "ok", "CLs_obs": 0.5, "submitted": 100.0 + i,
                "worker": {"host": "node", "pid": 10 + i % 2, "slurm_job_id": str(i % 2)}} for i in range(6)]
    result = ScanResult.from_dict({"metadata": {"executor": "slurm", "workers": 4, "started": 99.0},
                                   "results": records})
    assert "slurm (4 workers, 2 of them fitted)" in result.summary()
    everyone = ScanResult.from_dict({"metadata": {"executor": "slurm", "workers": 2, "started": 99.0},
                                     "results": records})
    assert "slurm (2 workers)\n" in everyone.summary() + "\n"


def test_limits_at_the_top_of_a_scan_grid_are_called_lower_bounds():
    """Where CLs stays above 0.05 up to the grid's last value, pyhf's interpolation returns that
    value: a record reads mu_up = 5 for a limit that may be far above."""
    from pyhf_dist.results import ScanResult

    records = [
        {"name": "low", "values": [1, 0], "status": "ok", "mu_up_obs": 1.3, "mu_up_exp": [0.5, 0.6, 0.9, 1.3, 1.9]},
        {"name": "high", "values": [2, 0], "status": "ok", "mu_up_obs": 5.0, "mu_up_exp": [1.9, 2.7, 4.3, 5.0, 5.0]},
    ]
    grid = ScanResult.from_dict({"metadata": {"settings": {"upper_limit_scan": [0.0, 5.0, 21]}}, "results": records})
    assert "at the --scan grid top      1 (a limit of 5 there is only a lower bound: widen --scan)" in grid.summary()
    roots = ScanResult.from_dict({"metadata": {"settings": {"upper_limit_scan": None}}, "results": records})
    assert "grid top" not in roots.summary()
