"""One contract, every executor: the checks :mod:`pyhf_dist.executors.base` promises, run on each.

Parametrized over the executors of this library that run here (sequential, local, a standard
``concurrent.futures`` pool, Dask, Parsl) and one written below against the contract alone, in
about thirty lines, and registered by name as a user would. (Slurm and Globus Compute have suites
of their own: a Slurm controller and the Globus stand-in.) Each check is a behaviour of the
contract:

* submit and shutdown: a task and a pack give their records; shutting down twice is harmless;
* a worker killed mid-fit: the scan resubmits its task and loses nothing (executors whose workers
  are processes);
* timeout and abandon: a fit past its timeout is a failed record; abandoning a task leaves the
  executor working;
* ``describe()``: the fields the scan and the command line read;
* ``supports()``: an executor that cannot run a calculation refuses the scan in one line, before
  anything starts.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import pytest

import pyhf_dist
from pyhf_dist.exceptions import SettingsError
from pyhf_dist.executors import Executor, get_executor, register_executor, unregister_executor
from pyhf_dist.executors.base import ExecutorFlag
from pyhf_dist.protocol import WorkerContext, make_pack, make_task, records_of
from pyhf_dist.runtime import run_task
from pyhf_dist.scan import loop
from pyhf_dist.settings import FitSettings


class ThreadsUnderTest(Executor):
    """An executor written against the contract alone: worker threads of this process."""

    name = "threads-under-test"
    flags = (ExecutorFlag("workers", "Worker threads.", int),)

    def __init__(self, workers: int = 2):
        super().__init__(workers=workers)
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None

    def supports(self, settings) -> str | None:
        if settings.calctype == "toybased":
            return "threads-under-test fits asymptotic hypotests only: drop --toys"
        return None

    def launch(self, context) -> None:
        self.pool = self.pool or concurrent.futures.ThreadPoolExecutor(self.workers)

    def submit(self, task) -> concurrent.futures.Future:
        return self.pool.submit(run_task, task, self.context)

    def shutdown(self, cancel_futures: bool = True) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=cancel_futures)
            self.pool = None


EXECUTORS = ["sequential", "local", "futures", "dask", "parsl", ThreadsUnderTest.name]
#: Executors whose workers are processes pyhf-dist can kill without killing the test.
PROCESS_WORKERS = {"local", "dask", "parsl"}


def make_executor(name: str, tmp_path) -> Executor:
    if name == "futures":
        return get_executor(concurrent.futures.ThreadPoolExecutor(2))
    if name == "dask":
        pytest.importorskip("distributed")
        return get_executor("dask", workers=2, dashboard_address=None)
    if name == "parsl":
        pytest.importorskip("parsl")
        return get_executor("parsl", workers=2, run_dir=str(tmp_path / "parsl"))
    return get_executor(name, workers=2) if name != "sequential" else get_executor(name)


@pytest.fixture(scope="module", autouse=True)
def registered():
    """The executor written here, registered by name as a user would (for this module only)."""
    register_executor(ThreadsUnderTest.name, ThreadsUnderTest)
    yield
    unregister_executor(ThreadsUnderTest.name)


@pytest.fixture(params=EXECUTORS)
def executor(request, tmp_path):
    runner = make_executor(request.param, tmp_path)
    yield runner
    runner.shutdown()


@pytest.fixture(scope="module")
def demo():
    return pyhf_dist.demo_pallet(points=6)


def started(runner: Executor, pallet) -> WorkerContext:
    context = WorkerContext.build(pallet.workspace, FitSettings(backend="numpy").to_dict())
    runner.start(context)
    return context


def test_a_task_and_a_pack_give_their_records_and_shutdown_is_idempotent(executor, demo):
    context = started(executor, demo)
    first, second, third = demo.patches[:3]
    single = executor.submit(make_task(first.name, first.operations, context.key))
    pack = executor.submit(make_pack([make_task(patch.name, patch.operations, context.key) for patch in (second, third)]))
    records = records_of(single.result(timeout=300), 1) + records_of(pack.result(timeout=300), 2)
    assert [record["name"] for record in records] == [first.name, second.name, third.name]
    assert all(record["status"] == "ok" and 0 <= record["CLs_obs"] <= 1 for record in records), records
    executor.shutdown()
    executor.shutdown()


def test_abandoning_a_task_past_its_timeout_leaves_the_executor_working(executor, demo):
    # The scan's backstop for a task its worker cannot stop: abandon() must not raise (Parsl's
    # futures cannot be cancelled), and the executor takes the next task.
    context = started(executor, demo)
    first, second = demo.patches[:2]
    abandoned = executor.submit(make_task(first.name, first.operations, context.key))
    executor.abandon(abandoned)
    following = executor.submit(make_task(second.name, second.operations, context.key))
    record, = records_of(following.result(timeout=300), 1)
    assert record["name"] == second.name and record["status"] == "ok"


def test_describe_gives_what_the_scan_and_command_line_read(executor, demo):
    started(executor, demo)
    description = executor.describe()
    assert isinstance(description["executor"], str) and description["executor"]
    assert description["workers"] is None or (isinstance(description["workers"], int) and description["workers"] >= 1)
    for optional in ("dashboard", "advice"):
        assert description.get(optional) is None or isinstance(description[optional], str)
    assert all(isinstance(flag, ExecutorFlag) for flag in type(executor).flags)


def test_every_executor_takes_the_standard_calculations(executor):
    for settings in (FitSettings(backend="numpy"), FitSettings(backend="numpy", calculation="upper_limit")):
        assert executor.supports(settings) is None


def test_an_unsupported_calculation_is_refused_in_one_line_before_anything_starts(demo):
    launched: list = []

    class Watched(ThreadsUnderTest):
        def launch(self, context):
            launched.append(context)
            super().launch(context)

    with pytest.raises(SettingsError) as refused:
        pyhf_dist.map_fits(demo, executor=Watched(), backend="numpy", calctype="toybased", ntoys=10)
    assert str(refused.value) == "threads-under-test fits asymptotic hypotests only: drop --toys"
    assert not launched


def test_a_fit_past_its_timeout_is_a_failed_record(executor, stau_low_mass, monkeypatch, request):
    # Workers stop a fit at its timeout where they can (SIGALRM in a worker's main thread); the
    # scan gives up on the others itself, after a grace period taken away here. The scan looks
    # about once a second, and sees a Dask task begin only when the scheduler shows it processing
    # (one look later): with the usual grace a 2-3 s fit could end first and be recorded "ok".
    if request.node.callspec.params["executor"] == "sequential":
        pytest.skip("fits run inside submit(), in this test process: only their own alarm can stop them, "
                    "which test_reliability checks in a process of its own")
    monkeypatch.setattr(loop, "TIMEOUT_GRACE", 0.0)
    # Plain pyhf takes seconds on a stau patch; a thread cannot be stopped, so the test waits for
    # its fit to end, which on a 1Lbb patch is a minute on a slow core.
    slow = stau_low_mass.patches[0].name
    result = pyhf_dist.map_fits(stau_low_mass, executor=executor, patches=[slow], backend="numpy", timeout=0.5)
    record = result[slow]
    assert record.status == "failed" and "timed out" in record.error, record.error
    assert record.fit_seconds is None or record.fit_seconds < 60, "the fit ran on long after its timeout"


def _fitting(pid: int) -> bool:
    """Whether process ``pid`` is busy: it used CPU time over a tenth of a second."""
    import psutil

    try:
        process = psutil.Process(pid)
        before = sum(process.cpu_times()[:2])
        time.sleep(0.1)
        return sum(process.cpu_times()[:2]) - before > 0.02
    except psutil.Error:
        return False


def test_a_worker_killed_mid_fit_is_retried_and_nothing_is_lost(executor, erjr_pallet, request):
    name = request.node.callspec.params["executor"]
    if name not in PROCESS_WORKERS:
        pytest.skip(f"{name}'s workers are this process or its threads: killing one kills the test")
    names = [patch.name for patch in erjr_pallet.patches[:10]]
    seen: list[int] = []
    killed: list[int] = []

    def kill_another_worker(record):
        # The worker that sent this record may be idle now; another one is killed only while it
        # fits (a worker killed idle loses no task, and in Parsl's pool can take the lock of its
        # task queue with it: test_parsl checks that case).
        pid = record.worker["pid"]
        others = [other for other in seen if other != pid]
        if others and not killed and _fitting(others[0]):
            os.kill(others[0], signal.SIGKILL)
            killed.extend([others[0], time.time()])
        seen.append(pid)

    result = pyhf_dist.map_fits(erjr_pallet, executor=executor, patches=names, backend="numpy",
                                callback=kill_another_worker)
    assert killed, "never saw two workers"
    assert sorted(record.name for record in result) == sorted(names)
    assert all(record.ok for record in result), [record.error for record in result if not record.ok]
    victim, at = killed
    assert all(record.finished < at for record in result if record.worker["pid"] == victim)
    if name != "dask":  # Dask reruns the task of a lost worker by itself: the scan sees no loss
        assert any(record.attempts == 2 for record in result), "no task was resubmitted"
