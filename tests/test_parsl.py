"""``executor="parsl"``: a real Parsl HighThroughputExecutor, local and on the local Slurm.

Checked against serial pyhf, and for the processes it leaves: no interchange or worker pool may
survive a finished, failed or interrupted scan.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

parsl = pytest.importorskip("parsl")

import pyhf_dist  # noqa: E402
from pyhf_dist.exceptions import ExecutorOptionError  # noqa: E402
from pyhf_dist.executors import get_executor, parsl_pools  # noqa: E402
from pyhf_dist.executors.parsl import ParslExecutor  # noqa: E402
from pyhf_dist.protocol import CompressedContext  # noqa: E402
from pyhf_dist.settings import FitSettings  # noqa: E402
from pyhf_dist.protocol import WorkerContext  # noqa: E402

from helpers import LBB_FEW, LBB_SAMPLE, assert_matches_reference, parsl_processes, serial_pyhf, slurm_partition  # noqa: E402

FEW = ["ERJR_100p0_20p0", "ERJR_200p0_100p0", "ERJR_300p0_150p0", "ERJR_500p0_0p0"]


def _assert_none_left(before: set[int], seconds: float = 15.0) -> None:
    import psutil

    deadline = time.time() + seconds
    while True:
        left = {pid for pid in parsl_processes() - before if psutil.pid_exists(pid)}
        if not left or time.time() > deadline:
            break
        time.sleep(0.2)
    assert not left, f"Parsl processes left behind: {sorted(left)}"


@pytest.fixture
def no_leftovers():
    before = parsl_processes()
    yield
    _assert_none_left(before)


def test_3L_eRJR_patches_match_and_nothing_is_left(erjr_pallet, erjr_sample_names, erjr_sample_reference, no_leftovers):
    info = {}
    began = time.perf_counter()
    result = pyhf_dist.map_fits(erjr_pallet, executor="parsl", workers=2, patches=erjr_sample_names, backend="numpy",
                                on_start=lambda meta: info.update(up=time.perf_counter() - began))
    elapsed = time.perf_counter() - began
    assert_matches_reference(result, erjr_sample_reference)
    assert result.metadata["executor"] == "parsl" and result.metadata["provider"] == "local"
    # Long-lived workers: at most two processes did all the fits.
    assert len({record.worker["pid"] for record in result}) <= 2
    print(f"\nparsl local: up in {info['up']:.2f} s, {len(result)} patches in {elapsed:.1f} s")


@pytest.mark.slow
def test_1lbb_sample_matches(lbb_pallet, lbb_reference, no_leftovers):
    result = pyhf_dist.map_fits(lbb_pallet, executor="parsl", workers=2, backend="numpy", patches=LBB_SAMPLE)
    assert_matches_reference(result, lbb_reference)


def test_a_failed_scan_leaves_no_process(erjr_pallet, no_leftovers):
    def explode(record):
        raise RuntimeError("the user's callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        pyhf_dist.map_fits(erjr_pallet, executor="parsl", workers=2, backend="numpy", patches=FEW, callback=explode)


def test_an_interrupted_scan_leaves_no_process(erjr_pallet, no_leftovers):
    def interrupt(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pyhf_dist.map_fits(erjr_pallet, executor="parsl", workers=2, backend="numpy", patches=FEW, callback=interrupt)


def test_a_worker_killed_while_waiting_for_a_task_stalls_no_scan(erjr_pallet, monkeypatch, tmp_path, caplog,
                                                                 no_leftovers):
    # A worker waiting for a task holds the lock of its pool's task queue; killed there, it takes
    # the lock with it and Parsl's pool hands out no task again. Both are killed here, idle between
    # two scans, so that the holder is among them.
    monkeypatch.setattr(parsl_pools.PoolWatch, "STALL", 5.0)
    with get_executor("parsl", workers=2, run_dir=str(tmp_path)) as executor:
        first = pyhf_dist.map_fits(erjr_pallet, executor=executor, backend="numpy", patches=FEW[:2])
        workers = {record.worker["pid"] for record in first}
        time.sleep(1.0)  # both idle now, waiting for a task
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        outcome: dict = {}

        def second_scan():
            outcome["result"] = pyhf_dist.map_fits(erjr_pallet, executor=executor, backend="numpy", patches=FEW[2:])

        scan = threading.Thread(target=second_scan, daemon=True)
        scan.start()
        scan.join(timeout=240)
        assert not scan.is_alive(), "the scan stalled behind the dead worker's lock"
    result = outcome["result"]
    # Each run's interchange keys go with it (its logs stay in its run directory).
    assert list(tmp_path.glob("*/*/interchange.log")) and not list(tmp_path.glob("*/*/certificates"))
    assert all(record.ok for record in result), [record.error for record in result if not record.ok]
    assert_matches_reference(result, serial_pyhf(erjr_pallet, FEW[2:]))
    assert all(record.attempts == 2 for record in result), [record.attempts for record in result]
    assert not {record.worker["pid"] for record in result} & workers
    notes = [entry.getMessage() for entry in caplog.records]
    restarts = [note for note in notes if "died while waiting for a task" in note and "Parsl was started afresh" in note]
    # The tasks in flight did not kill the waiting worker: sent again, no retry of theirs used up.
    assert restarts and all("again (no retry used up: their own workers did not fail)" in note for note in restarts)


def test_a_script_that_ends_without_shutdown_leaves_no_process(erjr_dir, tmp_path, no_leftovers):
    # Parsl only warns at exit: its interchange and pools would outlive the script, holding its
    # terminal, and a pipe reading the script's output would never end.
    script = tmp_path / "scan.py"
    script.write_text(
        "import pyhf_dist\n"
        "from pyhf_dist.executors import get_executor\n"
        "executor = get_executor('parsl', workers=1)\n"
        f"pyhf_dist.map_fits({str(erjr_dir)!r}, executor=executor, backend='numpy', patches=['ERJR_100p0_20p0'])\n"
        "raise SystemExit('the script ends here, without executor.shutdown()')\n"
    )
    finished = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90)
    assert finished.returncode == 1 and "without executor.shutdown()" in finished.stderr, finished.stderr[-2000:]


def test_a_users_parsl_config(erjr_pallet, tmp_path, no_leftovers):
    from parsl.executors import ThreadPoolExecutor

    config = parsl.Config(executors=[ThreadPoolExecutor(max_threads=2)], run_dir=str(tmp_path), initialize_logging=False)
    result = pyhf_dist.map_fits(erjr_pallet, executor="parsl", config=config, backend="numpy", patches=FEW)
    assert_matches_reference(result, serial_pyhf(erjr_pallet, FEW))
    assert result.metadata["provider"] == "custom"


def test_context_is_compressed_and_decompressed_lazily(erjr_pallet):
    context = WorkerContext.build(erjr_pallet.workspace, FitSettings(backend="numpy").to_dict())
    packed = CompressedContext.of(context)
    assert packed.key == context.key and packed.payload == context.payload
    assert len(packed.compressed) < len(context.payload) / 4
    import pickle

    assert pickle.loads(pickle.dumps(packed)).payload == context.payload


def test_options_are_checked(monkeypatch):
    # The pools inherit this process's thread limits; none set here, so the config sets them.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ExecutorOptionError, match="unknown Parsl provider 'pbs'"):
        get_executor("parsl", provider="pbs")
    with pytest.raises(ExecutorOptionError, match="max_blocks"):
        get_executor("parsl", max_blocks=0)
    with pytest.raises(ExecutorOptionError, match="config must be a parsl.Config"):
        get_executor("parsl", config={"executors": []})
    with pytest.raises(ExecutorOptionError, match="does not take"):
        get_executor("parsl", endpoint_id="x")
    executor = ParslExecutor(workers=3, provider="slurm", partition="compute", max_blocks=4, nodes_per_block=2,
                             account="abc", walltime="01:00:00")
    config = executor.build_config()
    htex = config.executors[0]
    provider = htex.provider
    assert type(provider).__name__ == "SlurmProvider" and type(provider.launcher).__name__ == "SrunLauncher"
    assert (provider.partition, provider.account, provider.max_blocks, provider.nodes_per_block) == ("compute", "abc", 4, 2)
    assert htex.max_workers_per_node == 3 and config.strategy_period == 0.2
    assert "OMP_NUM_THREADS=1" in provider.worker_init


@pytest.mark.slurm
def test_slurm_provider_matches_and_cancels_its_jobs(erjr_pallet, lbb_pallet, lbb_few_reference, tmp_path, no_leftovers):
    partition = slurm_partition()
    if partition is None:
        pytest.skip("no Slurm answers here (start one with executors/slurm/start-slurm.sh)")
    options = dict(executor="parsl", provider="slurm", partition=partition, workers=2, walltime="00:20:00",
                   address="127.0.0.1", run_dir=str(tmp_path / "parsl"), scheduler_options="#SBATCH --mem-per-cpu=1G",
                   backend="numpy")
    began = time.perf_counter()
    result = pyhf_dist.map_fits(erjr_pallet, patches=FEW, **options)
    assert_matches_reference(result, serial_pyhf(erjr_pallet, FEW))
    lbb = pyhf_dist.map_fits(lbb_pallet, patches=LBB_FEW, **options)
    assert_matches_reference(lbb, lbb_few_reference)
    job_ids = {record.worker["slurm_job_id"] for record in list(result) + list(lbb)}
    assert None not in job_ids
    deadline = time.time() + 30
    while time.time() < deadline:
        queued = set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split())
        if not job_ids & queued:
            break
        time.sleep(0.5)
    assert not job_ids & queued, f"Slurm jobs left behind: {job_ids & queued}"
    print(f"\nparsl slurm: 4 + 2 patches in {time.perf_counter() - began:.1f} s, jobs {sorted(job_ids)}")


def test_the_job_script_question_gets_the_answer_of_the_provider():
    with pytest.raises(ExecutorOptionError, match="submits no batch jobs"):
        get_executor("parsl", workers=1).job_script()
    with pytest.raises(ExecutorOptionError, match=r"Parsl writes the script of each Slurm job as it submits it, into "
                                                  r"the submit_scripts folder"):
        get_executor("parsl", provider="slurm").job_script()
