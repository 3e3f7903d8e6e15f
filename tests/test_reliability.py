"""Faults survived, nothing lost: fault injection on the local executor and the command line.

Every test counts the results: each selected patch ends with exactly one record, ``ok`` or
``failed`` with a reason, none missing and none duplicated. Faults are real ones — worker processes
killed with SIGKILL, patches that make pyhf raise or fit for half a minute, the command line killed
or interrupted — not mocks of the executor. (The Dask-worker and Slurm-job faults are tested with
those executors.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import pyhf_dist
from pyhf_dist.scan import loop as scan_loop
from pyhf_dist.executors.local import LocalExecutor
from pyhf_dist.pallet import Pallet, Patch
from helpers import FAST_PATH_TOLERANCE, TaskSizes, assert_matches_reference, serial_pyhf

#: 14 patches of 3L-eRJR (ERJR_100*, ERJR_110*, ERJR_125*): about 0.3 s each on numpy.
ERJR_GLOB = "ERJR_1[0-2]*"


def _erjr_names(pallet) -> list[str]:
    import fnmatch

    return fnmatch.filter(pallet.names(), ERJR_GLOB)


def assert_one_record_each(records, names) -> dict:
    """Every name exactly once; every record ok, or failed with a reason. Returns records by name."""
    rows = [r if isinstance(r, dict) else r.to_dict() for r in records]
    seen = [row["name"] for row in rows]
    assert sorted(seen) == sorted(names), (
        f"missing {sorted(set(names) - set(seen))}, unexpected {sorted(set(seen) - set(names))}, "
        f"duplicated {sorted({n for n in seen if seen.count(n) > 1})}"
    )
    for row in rows:
        assert row["status"] in ("ok", "failed")
        if row["status"] == "failed":
            assert row["error"], f"{row['name']} failed without a reason"
    return {row["name"]: row for row in rows}


# ------------------------------------------------------------------------------ injected patches


def _broken_patches(pallet: Pallet) -> list[Patch]:
    """Two patches whose fit raises on the worker, each for an honest reason.

    ``no_such_channel`` is a jsonpatch whose operation cannot be applied to the background
    (channel 9 does not exist): pyhf's ``Workspace.model`` raises while patching. ``wrong_bins``
    applies cleanly but adds a one-bin signal to a three-bin channel: pyhf refuses the model.
    Neither is caught when the pallet is read (patches are applied on the workers).
    """
    good = pallet.patches[0].operations
    return [
        Patch("no_such_channel", (9.0, 9.0), [{"op": "replace", "path": "/channels/9/name", "value": "x"}]),
        Patch("wrong_bins", (8.0, 8.0), [
            {"op": "add", "path": "/channels/1/samples/-",
             "value": {"name": "signal", "data": [1.0], "modifiers": [
                 {"name": "mu_SIG", "type": "normfactor", "data": None}]}},
        ] + [op for op in good if op["path"] != "/channels/1/samples/1"]),
    ]


def _slow_patch(pallet: Pallet, parameters: int = 600, name: str = "slow_fit") -> Patch:
    """A patch whose fit takes about half a minute on the numpy backend (the "hanging" fit).

    It is an ordinary signal patch plus ``parameters`` extra normsys uncertainties on the signal:
    pyhf's numpy backend minimizes with finite-difference gradients, so the fit's cost grows like
    the square of the number of parameters (on an idle 2-core machine: 0.9 s with 60 extra ones,
    12 s with 400, ~25 s with 600; 0.2 s without). It stands
    for the real thing — a pathological model whose minimization never ends — without any test hook
    in the library.
    """
    operations = list(pallet.patches[0].operations) + [
        {"op": "add", "path": "/channels/1/samples/1/modifiers/-",
         "value": {"name": f"slow_{index}", "type": "normsys", "data": {"hi": 1.05, "lo": 0.95}}}
        for index in range(parameters)
    ]
    return Patch(name, (1.0, float(parameters)), operations)


@pytest.fixture(scope="module")
def demo():
    return pyhf_dist.demo_pallet(points=4)


# ------------------------------------------------------------------------------ local worker killed


class _PackingLocal(TaskSizes, LocalExecutor):
    """The local pool, packing short fits into tasks as the Dask clusters pyhf-dist starts do: a
    worker killed here takes a task of several patches with it."""

    pack_seconds = 0.25


def test_worker_killed_in_a_packed_task_every_patch_of_it_is_retried():
    pallet = pyhf_dist.demo_pallet()
    names = pallet.names()
    executor = _PackingLocal(workers=2)
    killed: list[int] = []

    def kill_a_worker_in_a_packed_task(record):
        if killed or max(executor.sizes) < 2:
            return
        busy = [pid for pid in executor.running_tasks() if pid in executor.worker_pids()]
        if busy:
            os.kill(busy[0], signal.SIGKILL)
            killed.append(busy[0])

    with executor:
        result = pyhf_dist.map_fits(pallet, executor=executor, backend="jax", callback=kill_a_worker_in_a_packed_task)
    assert killed, "no packed task was running"
    rows = assert_one_record_each(result, names)
    assert_matches_reference(result, serial_pyhf(pallet), FAST_PATH_TOLERANCE)
    assert all(row["status"] == "ok" for row in rows.values())
    assert killed[0] not in {row["worker"]["pid"] for row in rows.values() if row["attempts"] > 1}
    assert sum(executor.sizes) > len(names)  # the killed task's patches were submitted again


def test_local_worker_killed_mid_scan_is_retried_and_nothing_is_lost(erjr_pallet):
    """SIGKILL a worker while it fits: its task is resubmitted (charged one attempt), the tasks of
    the other workers are not disturbed, every patch ends ok."""
    names = _erjr_names(erjr_pallet)
    executor = LocalExecutor(workers=3)
    killed: dict = {}

    def kill_a_busy_worker(record):
        if killed:
            return
        busy = [pid for pid in executor.running_tasks() if pid in executor.worker_pids()]
        if len(busy) < 2:  # wait for a moment with a victim and a bystander
            return
        os.kill(busy[0], signal.SIGKILL)
        killed.update(pid=busy[0], at=time.time())
        time.sleep(0.2)
        # A killed worker cannot remove its mark: still listed means it died inside the task.
        killed.update(mid_task=busy[0] in executor.running_tasks())

    with executor:
        result = pyhf_dist.map_fits(erjr_pallet, executor=executor, patches=names, backend="numpy",
                                    callback=kill_a_busy_worker)
    assert killed, "never saw two workers busy at once"
    rows = assert_one_record_each(result, names)
    assert_matches_reference(result, serial_pyhf(erjr_pallet, names))
    assert all(row["finished"] < killed["at"] for row in rows.values() if row["worker"]["pid"] == killed["pid"])
    charged = sorted(row["attempts"] for row in rows.values())
    if killed["mid_task"]:
        # Exactly the task that was on the killed worker counts a second attempt.
        assert charged == [1] * (len(names) - 1) + [2], charged
    else:  # the fit ended in the instant before the kill: nothing (or that one task) charged
        assert sum(charged) <= len(names) + 1, charged


def test_worker_killed_on_every_attempt_ends_failed_with_reason(demo, tmp_path):
    """A patch whose worker dies on every attempt is recorded failed after ``retries`` resubmissions;
    the other patches still finish."""
    pallet = Pallet(demo.workspace, demo.patches + [_slow_patch(demo)], demo.labels)
    executor = LocalExecutor(workers=2)
    victims: list[int] = []
    stop = {"now": False}

    import threading

    def killer():
        # Kill whichever worker runs the slow patch, a second after it started it.
        while not stop["now"]:
            for pid, (name, began) in executor.running_tasks().items():
                if name == "slow_fit" and time.time() - began > 1 and pid not in victims:
                    victims.append(pid)
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    thread = threading.Thread(target=killer, daemon=True)
    with executor:
        thread.start()
        try:
            result = pyhf_dist.map_fits(pallet, executor=executor, backend="numpy", retries=2)
        finally:
            stop["now"] = True
            thread.join()
    rows = assert_one_record_each(result, pallet.names())
    slow = rows["slow_fit"]
    assert slow["status"] == "failed" and "worker lost 3 times" in slow["error"], slow
    assert slow["attempts"] == 3 and len(victims) == 3
    assert all(row["status"] == "ok" for name, row in rows.items() if name != "slow_fit")


# ------------------------------------------------------------------------------ fits that raise / hang


@pytest.mark.parametrize("executor", ["local", "sequential"])
def test_fit_that_raises_is_a_failed_record_and_the_scan_goes_on(demo, executor, tmp_path):
    pallet = Pallet(demo.workspace, demo.patches[:2] + _broken_patches(demo) + demo.patches[2:], demo.labels)
    journal = tmp_path / "journal.jsonl"
    options = {"workers": 2} if executor == "local" else {}
    result = pyhf_dist.map_fits(pallet, executor=executor, backend="numpy", journal=journal, **options)
    rows = assert_one_record_each(result, pallet.names())
    assert rows["no_such_channel"]["status"] == "failed"
    assert "JsonPointerException" in rows["no_such_channel"]["error"] or "Conflict" in rows["no_such_channel"]["error"]
    assert rows["wrong_bins"]["status"] == "failed" and rows["wrong_bins"]["error"]
    assert all(rows[p.name]["status"] == "ok" for p in demo.patches)
    assert all(row["attempts"] == 1 for row in rows.values()), "a failed fit is not retried"
    # The failures are in the journal too, with their reason.
    journaled = [json.loads(line)["record"] for line in journal.read_text().splitlines()]
    assert_one_record_each(journaled, pallet.names())


def test_fit_that_hangs_past_timeout_is_failed_and_frees_its_worker(demo):
    """The worker stops the fit at ``timeout`` (SIGALRM) and goes on with the next patch."""
    pallet = Pallet(demo.workspace, [_slow_patch(demo)] + demo.patches, demo.labels)
    began = time.time()
    with LocalExecutor(workers=1) as executor:  # one worker: the others can only run once it is freed
        result = pyhf_dist.map_fits(pallet, executor=executor, backend="numpy", timeout=3)
    elapsed = time.time() - began
    rows = assert_one_record_each(result, pallet.names())
    slow = rows["slow_fit"]
    assert slow["status"] == "failed" and slow["error"] == "timed out after 3 s"
    assert 3 <= slow["fit_seconds"] < 6
    assert all(rows[p.name]["status"] == "ok" for p in demo.patches)
    assert len({row["worker"]["pid"] for row in rows.values()}) == 1, "the same worker went on"
    assert elapsed < 25, f"the scan waited for the slow fit ({elapsed:.0f} s)"


def test_a_timeout_is_not_taken_for_an_error_that_a_fallback_catches():
    """The alarm lands anywhere in a fit, also where code falls back on any error of its own (the
    fast path handing a patch to plain pyhf): the fit must end there, not go on past its time."""
    from pyhf_dist.runtime.timeouts import FitTimeout, call_with_timeout

    def fit_with_a_fallback():
        try:
            time.sleep(5)
        except Exception:  # noqa: BLE001 - what the fallbacks of a fit do
            time.sleep(5)

    began = time.monotonic()
    with pytest.raises(FitTimeout):
        call_with_timeout(fit_with_a_fallback, 0.2)
    assert time.monotonic() - began < 1


def test_a_timeout_dropped_where_python_ignores_exceptions_goes_off_again():
    """The alarm can land in a garbage collector's callback or a finaliser, where Python prints the
    timeout and drops it: the fit must still end (the old one-shot alarm let it run to its end)."""
    from pyhf_dist.runtime.timeouts import FitTimeout, call_with_timeout

    class Finalised:
        def __del__(self):
            time.sleep(0.3)  # the alarm lands here, and Python drops what it raises

    def fit():
        Finalised()
        time.sleep(5)
        return "finished"

    began = time.monotonic()
    with pytest.raises(FitTimeout):
        call_with_timeout(fit, 0.1)
    assert time.monotonic() - began < 1


def test_the_time_of_a_paused_timeout_is_not_counted():
    from pyhf_dist.runtime.timeouts import FitTimeout, call_with_timeout, paused

    def compile_then_fit(fit_seconds):
        with paused():
            time.sleep(0.5)  # a compilation: the worker's, not the fit's
        time.sleep(fit_seconds)
        return "done"

    assert call_with_timeout(lambda: compile_then_fit(0.1), 0.3) == "done"
    began = time.monotonic()
    with pytest.raises(FitTimeout):
        call_with_timeout(lambda: compile_then_fit(5), 0.3)
    assert 0.7 < time.monotonic() - began < 1.5


def test_an_alarm_waits_for_the_import_it_lands_in(tmp_path, monkeypatch):
    """A fit timed out inside an import must not leave the module half made for the worker's
    later fits: the import ends, then the fit does."""
    import importlib

    from pyhf_dist.runtime.timeouts import FitTimeout, call_with_timeout

    (tmp_path / "slow_to_import.py").write_text("import time\ntime.sleep(0.6)\nmade = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "slow_to_import", raising=False)

    def import_then_fit():
        importlib.import_module("slow_to_import")
        time.sleep(5)

    began = time.monotonic()
    with pytest.raises(FitTimeout):
        call_with_timeout(import_then_fit, 0.2)
    assert 0.6 <= time.monotonic() - began < 3, "the fit went on past its time"
    assert sys.modules["slow_to_import"].made


def test_a_structures_check_against_pyhf_is_not_counted_in_the_fits_timeout(demo, monkeypatch):
    """The first patch of a structure is checked against pyhf's own model (importing pyhf where the
    worker has not yet, building the model): a one-off cost of the worker, like a compilation."""
    pytest.importorskip("jax")
    from pyhf_dist.runtime.fast import engine
    from pyhf_dist.runtime.timeouts import call_with_timeout

    build = engine.pyhf_model

    def slow_build(*args, **kwargs):
        time.sleep(1.5)  # a first `import pyhf`, a big model
        return build(*args, **kwargs)

    monkeypatch.setattr(engine, "pyhf_model", slow_build)
    fast = engine.FastHypotest(demo.workspace)
    fast.warm_up()
    result = call_with_timeout(lambda: fast.hypotest(demo.patches[0].operations), 1.0)
    assert 0 < result["CLs_obs"] < 1 and result["converged"]


def test_a_layouts_first_compilation_is_not_counted_in_the_fits_timeout(demo, tmp_path, monkeypatch):
    """On the default backend a patch of a new shape is compiled for first (~3 s for this one with
    an empty cache, its fits ~1 s): a 2 s timeout is the fit's, so the patch is fitted, not failed."""
    pytest.importorskip("jax")
    monkeypatch.setenv("PYHF_DIST_CACHE", str(tmp_path / "cache"))  # nothing compiled yet
    pallet = Pallet(demo.workspace, [_slow_patch(demo)] + demo.patches, demo.labels)
    with LocalExecutor(workers=1) as executor:
        result = pyhf_dist.map_fits(pallet, executor=executor, timeout=2)
    rows = assert_one_record_each(result, pallet.names())
    assert [(rows[name]["status"], rows[name]["engine"]) for name in pallet.names()] == [("ok", "fast")] * 5, [
        (name, rows[name]["status"], rows[name]["engine"], rows[name]["error"]) for name in pallet.names()]


def _block_alarm() -> None:
    # A worker that cannot be interrupted (as if stuck in compiled code): SIGALRM stays blocked.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})


def _block_alarm_and_pace() -> None:
    """As :func:`_block_alarm`, and the fits of patches named ``paced_*`` take at least half a
    second of wall time, however fast this machine fits: the worker beside the stuck one stays busy
    for a known time."""
    _block_alarm()
    from pyhf_dist.runtime import calculations

    compute = calculations.compute

    def paced(state, task):
        if task.get("name", "").startswith("paced_"):
            time.sleep(0.5)
        return compute(state, task)

    calculations.compute = paced


def _slow_compilations() -> None:
    """Every layout this worker compiles takes 4 s longer (a busy machine, a big layout, an empty cache)."""
    from pyhf_dist.runtime import timeouts
    from pyhf_dist.runtime.fast import executables

    compile_layout = executables.for_layout

    def slowly(caps, codes, *args):
        if (caps, codes) not in executables.COMPILED:
            with timeouts.paused():
                time.sleep(4)
        return compile_layout(caps, codes, *args)

    executables.for_layout = slowly


@pytest.mark.parametrize("hangs", [False, True], ids=["compiles", "compilation-hangs"])
def test_the_backstop_does_not_count_a_compilation_the_worker_held_its_clock_for(demo, monkeypatch, hangs):
    """A worker compiling a patch's layout holds the fit's clock; the scan's backstop for stuck
    workers leaves that time out too, instead of giving up on a worker that is compiling. Up to
    a limit: a compilation that hangs is given up like a fit that does."""
    pytest.importorskip("jax")
    monkeypatch.setattr(scan_loop, "TIMEOUT_GRACE", 1.0)
    if hangs:  # the 4 s compilation stands for one that never ends
        monkeypatch.setattr(scan_loop, "HELD_LIMIT", 1.0)
    pallet = Pallet(demo.workspace, [_slow_patch(demo, parameters=20)] + demo.patches[:1], demo.labels)
    with LocalExecutor(workers=1, initializer=_slow_compilations) as executor:
        result = pyhf_dist.map_fits(pallet, executor=executor, timeout=1)
    rows = assert_one_record_each(result, pallet.names())
    outcomes = [(row["status"], row["engine"], row["error"]) for row in rows.values()]
    if hangs:
        assert outcomes[0] == ("failed", None, "timed out after 1 s (worker did not respond)"), outcomes
        assert outcomes[1][0] == "ok", outcomes
    else:
        assert outcomes == [("ok", "fast", None)] * 2
        assert len({row["worker"]["pid"] for row in rows.values()}) == 1, "the worker was kept"


class _CountingAbandons(LocalExecutor):
    abandoned: list

    def abandon(self, future):
        self.abandoned = getattr(self, "abandoned", []) + [(time.time(), self.running_tasks())]
        super().abandon(future)


def test_timeout_backstop_replaces_only_the_stuck_worker(demo, monkeypatch):
    """When a worker ignores the timeout, the scan gives up on its task and the executor replaces
    that worker alone: the fits running beside it go on undisturbed, nothing is resubmitted."""
    monkeypatch.setattr(scan_loop, "TIMEOUT_GRACE", 1.0)
    # The stuck fit (~25 s) first, then 30 paced fits of at least half a second each (well under
    # the 8 s timeout even on a busy machine) that keep the other worker busy until and after the
    # scan gives up on the stuck one (at ~9 s), then the plain demo patches.
    paced = [Patch(f"paced_{index}", (2.0, float(index)), demo.patches[0].operations) for index in range(30)]
    pallet = Pallet(demo.workspace, [_slow_patch(demo)] + paced + demo.patches, demo.labels)
    began = time.time()
    with _CountingAbandons(workers=2, initializer=_block_alarm_and_pace) as executor:
        result = pyhf_dist.map_fits(pallet, executor=executor, backend="numpy", timeout=8)
    elapsed = time.time() - began
    rows = assert_one_record_each(result, pallet.names())
    assert rows["slow_fit"]["status"] == "failed"
    assert "timed out after 8 s (worker did not respond)" in rows["slow_fit"]["error"]
    others = [row for name, row in rows.items() if name != "slow_fit"]
    assert all(row["status"] == "ok" and row["attempts"] == 1 for row in others), [
        (row["name"], row["status"], row["error"], row["attempts"]) for row in others]
    assert len(executor.abandoned) == 1
    abandoned_at, running = executor.abandoned[0]
    stuck = [pid for pid, (name, _) in running.items() if name == "slow_fit"]
    assert stuck, f"expected the stuck fit among the running tasks, got {running}"
    # The other worker was not replaced: the process that fitted beside the stuck one until the
    # scan gave up on it went on fitting after (the scan may give up between two of its fits).
    before = {row["worker"]["pid"] for row in others if row["finished"] <= abandoned_at}
    after = {row["worker"]["pid"] for row in others if row["started"] >= abandoned_at}
    assert len(before) == 1 and before <= after and not before & set(stuck), (before, after, stuck)
    # Later fits ran on that worker and on the stuck one's replacement: two pids, not the stuck one.
    assert len(after) == 2 and not after & set(stuck)
    assert elapsed < 60, f"the scan waited for the stuck fit ({elapsed:.0f} s)"


_KEPT: list = []


def _grow_with_each_fit() -> None:
    """Each fit in this worker keeps 200 MB more memory, as compiled engines and toy batches do."""
    from pyhf_dist.runtime import calculations

    compute = calculations.compute

    def growing(state, task):
        _KEPT.append(b"\x01" * (200 * 1024**2))  # written, so resident (zeroed pages would not be)
        time.sleep(1.1)  # loky looks at a worker's memory at most once a second
        return compute(state, task)

    calculations.compute = growing


def test_a_worker_whose_memory_grows_is_kept(demo, recwarn):
    """loky replaces a worker that grew by 300 MB as leaking (and warns); a pyhf-dist worker grows by
    design and keeps its compiled state: the same process fits every patch, silently."""
    with LocalExecutor(workers=1, initializer=_grow_with_each_fit) as executor:
        result = pyhf_dist.map_fits(demo, executor=executor, backend="numpy", patches=demo.names()[:4])
    assert result.counts()["failed"] == 0
    assert len({record.worker["pid"] for record in result}) == 1
    assert not [warning for warning in recwarn if "memory" in str(warning.message)]


# ------------------------------------------------------------------------------ resume


def test_resume_skips_ok_records_and_refits_failed_ones(demo, tmp_path):
    journal = tmp_path / "j.jsonl"
    first = pyhf_dist.map_fits(demo, executor="sequential", backend="numpy", journal=journal, patches=demo.names()[:2])
    # Simulate an earlier failure of the third patch in the journal.
    with open(journal, "a") as stream:
        stream.write(json.dumps({"key": first.metadata["scan_key"],
                                 "record": {"name": demo.names()[2], "status": "failed", "error": "boom"}}) + "\n")
    result = pyhf_dist.map_fits(demo, executor="sequential", backend="numpy", journal=journal, resume=True)
    rows = assert_one_record_each(result, demo.names())
    assert all(row["status"] == "ok" for row in rows.values())
    assert result.metadata["resumed"] == 2
    for record in first:  # not fit again: same timestamps and worker
        assert rows[record.name]["started"] == record.started
    # A journal from other settings is refused, not mixed in.
    with pytest.raises(pyhf_dist.exceptions.JournalError, match="other settings"):
        pyhf_dist.map_fits(demo, executor="sequential", backend="numpy", journal=journal, resume=True, poi_test=2.0)


def test_a_scan_that_cannot_start_leaves_the_journal_alone(demo, tmp_path):
    journal = tmp_path / "j.jsonl"
    pyhf_dist.map_fits(demo, executor="sequential", backend="numpy", journal=journal, patches=demo.names()[:1])
    before = journal.read_bytes()
    with pytest.raises(pyhf_dist.exceptions.ExecutorError):
        pyhf_dist.map_fits(demo, executor="dask", address="tcp://127.0.0.1:9", backend="numpy", journal=journal,
                           resume=True)
    assert journal.read_bytes() == before


# ------------------------------------------------------------------------------ the command line


def _start_cli(*args: str) -> subprocess.Popen:
    # In a session of its own, as in a terminal: Ctrl-C there signals the whole process group.
    return subprocess.Popen([sys.executable, "-m", "pyhf_dist", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _journal_lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.endswith("}"))
    except FileNotFoundError:
        return 0


def _wait_for_records(process: subprocess.Popen, journal: Path, count: int, limit: float = 180) -> None:
    deadline = time.time() + limit
    while _journal_lines(journal) < count:
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "the scan did not get going"
        time.sleep(0.05)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _assert_gone(processes: list[psutil.Process], within: float = 10.0) -> None:
    _, alive = psutil.wait_procs(processes, timeout=within)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"stray processes left behind: {[(p.pid, p.cmdline()) for p in alive]}"


def test_cli_killed_mid_scan_then_resume_fits_only_the_rest(erjr_dir, erjr_pallet, tmp_path):
    names = _erjr_names(erjr_pallet)
    output = tmp_path / "results.json"
    journal = tmp_path / "results.journal.jsonl"
    args = ["fit", str(erjr_dir), "-p", ERJR_GLOB, "--backend", "numpy", "--workers", "2", "-o", str(output), "-q"]
    process = _start_cli(*args)
    _wait_for_records(process, journal, 4)
    workers = _descendants(process.pid)
    process.kill()  # SIGKILL: no cleanup of any kind in the command line
    process.communicate()
    _assert_gone(workers)  # the workers notice their parent is gone and leave
    assert not output.exists(), "no results file from a killed scan"
    before = {}
    for line in journal.read_text().splitlines():
        try:
            record = json.loads(line)["record"]
        except json.JSONDecodeError:  # the line being written at the kill
            continue
        before[record["name"]] = record
    assert 4 <= len(before) < len(names)

    run = subprocess.run([sys.executable, "-m", "pyhf_dist", *args, "--resume"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    assert f"Fitting {len(names) - len(before)} patches ({len(before)} already in the journal)" in run.stderr
    results = json.loads(output.read_text())["results"]
    rows = assert_one_record_each(results, names)
    refit = [name for name, record in before.items()
             if (rows[name]["started"], rows[name]["worker"]["pid"]) != (record["started"], record["worker"]["pid"])]
    assert refit == [], f"fit again after resuming: {refit}"
    assert_matches_reference(results, serial_pyhf(erjr_pallet, names))  # equal to a clean run
    assert not journal.exists(), "the journal is removed once every fit is ok"


def test_cli_interrupted_exits_130_keeps_the_journal_and_leaves_no_process(erjr_dir, tmp_path):
    output = tmp_path / "r.json"
    journal = tmp_path / "r.journal.jsonl"
    process = _start_cli("fit", str(erjr_dir), "-p", ERJR_GLOB, "--backend", "numpy", "--workers", "2",
                         "-o", str(output), "-q")
    _wait_for_records(process, journal, 2)
    workers = _descendants(process.pid)
    assert workers, "expected worker processes"
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: the command line and its workers
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Interrupted" in stderr and "--resume" in stderr and str(journal) in stderr
    assert "Traceback" not in stderr
    assert _journal_lines(journal) >= 2 and not output.exists()
    _assert_gone(workers)


def test_cli_sigterm_is_handled_like_ctrl_c(demo, tmp_path):
    output = tmp_path / "r.json"
    process = _start_cli("demo", "--backend", "numpy", "--workers", "2", "-o", str(output))
    deadline = time.time() + 120
    while len(_descendants(process.pid)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    workers = _descendants(process.pid)
    process.terminate()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Interrupted" in stderr and "Traceback" not in stderr
    _assert_gone(workers)


def test_journal_line_cut_by_a_crash_is_dropped_before_appending(demo, tmp_path):
    journal = tmp_path / "j.jsonl"
    pyhf_dist.map_fits(demo, executor="sequential", backend="numpy", journal=journal, patches=demo.names()[:2])
    text = journal.read_text()
    journal.write_text(text + text.splitlines()[0][:40])  # a write interrupted by SIGKILL
    result = pyhf_dist.map_fits(demo, executor="sequential", backend="numpy", journal=journal, resume=True)
    assert result.metadata["resumed"] == 2
    assert_one_record_each(result, demo.names())
    # The journal reads back whole: two records from the first run, two from the second.
    lines = journal.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["record"]["status"] == "ok" for line in lines)


def test_ctrl_c_while_workers_start_prints_no_worker_traceback(tmp_path):
    """Ctrl-C reaches the whole process group, also workers still importing pyhf: they must ignore it
    (the command line decides), so the terminal shows one message and no worker tracebacks."""
    process = _start_cli("demo", "--backend", "numpy", "--workers", "2", "-o", str(tmp_path / "r.json"))
    deadline = time.time() + 120
    while len(_descendants(process.pid)) < 3 and time.time() < deadline:  # resource tracker + 2 workers
        time.sleep(0.01)
    workers = _descendants(process.pid)
    time.sleep(0.3)  # the workers are importing now
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Interrupted" in stderr and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert not (tmp_path / "r.json").exists()
    _assert_gone(workers)


def test_a_resumed_toy_scan_fits_again_a_patch_that_changed_and_drops_its_old_toys(tmp_path):
    """A patchset edited between a run and its --resume (a record re-packed, say): its record in the
    journal, and the chunks of toys of a patch whose record never came (a kill before the merge),
    are of another patch. Both are fitted again: the CLs are a fresh scan's, bit for bit."""
    from pyhf_dist.demo import demo_patchset, demo_workspace

    pallet = tmp_path / "pallet"
    pallet.mkdir()
    (pallet / "BkgOnly.json").write_text(json.dumps(demo_workspace()))
    patchset = demo_patchset()
    patchset["patches"] = patchset["patches"][:3]
    (pallet / "patchset.json").write_text(json.dumps(patchset))
    names = [patch["metadata"]["name"] for patch in patchset["patches"]]
    journal = tmp_path / "j.jsonl"
    toys = dict(calctype="toybased", ntoys=200, seed=1, workers=2, progress=False)
    first = {record.name: record for record in pyhf_dist.map_fits(pallet, journal=journal, **toys)}
    # The third patch's record lost, its chunks kept: as a scan killed just before it merged them.
    lines = journal.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not ('"record": {' in line and f'"name": "{names[2]}"' in line
                                           and '"chunk"' not in line)]
    assert len(kept) == len(lines) - 1 and any(names[2] in line for line in kept)
    journal.write_text("".join(kept))
    for patch in patchset["patches"][1:]:  # weaker signals: CLs away from 0
        for operation in patch["patch"]:
            operation["value"]["data"] = [0.05 * value for value in operation["value"]["data"]]
    (pallet / "patchset.json").write_text(json.dumps(patchset))
    resumed = {record.name: record for record in pyhf_dist.map_fits(pallet, journal=journal, resume=True, **toys)}
    fresh = {record.name: record for record in pyhf_dist.map_fits(pallet, **toys)}
    assert resumed[names[0]].submitted == first[names[0]].submitted, "the unchanged patch is reused"
    for name in names[1:]:
        assert resumed[name].ok and fresh[name].ok and 0.1 < fresh[name].CLs_obs < 0.9
        assert [resumed[name].CLs_obs, *resumed[name].CLs_exp] == [fresh[name].CLs_obs, *fresh[name].CLs_exp], name
        assert resumed[name].CLs_obs != first[name].CLs_obs, name


class _LosingExecutor:
    """An executor whose every task is lost at once, as a bystander (its pool started afresh) for
    the first ``bystander_rounds`` submissions of each patch, then as its own worker's death."""

    name, workers, max_pending, pack_seconds = "losing", 2, None, 0.0

    def __init__(self, bystander_rounds: int):
        self.bystander_rounds, self.seen = bystander_rounds, {}

    def submit(self, task):
        import concurrent.futures

        from pyhf_dist.exceptions import WorkerLostError

        count = self.seen[task["name"]] = self.seen.get(task["name"], 0) + 1
        future = concurrent.futures.Future()
        future.set_exception(WorkerLostError("pool started afresh", bystander=count <= self.bystander_rounds))
        return future

    def is_worker_lost(self, error):
        return True

    def explain_loss(self, future, error):
        return str(error)

    def started_at(self, future):
        return None


def test_tasks_lost_as_bystanders_use_up_no_retry_and_are_told_in_one_line(caplog):
    """Three rounds lost with a pool started afresh, then three of the patch's own: the retries
    (2) are used by the latter only, and each round is one note for all its patches."""
    from pyhf_dist.demo import demo_pallet
    from pyhf_dist.protocol import WorkerContext
    from pyhf_dist.settings import FitSettings

    pallet = demo_pallet(points=3)
    settings = FitSettings(backend="numpy")
    runner = _LosingExecutor(bystander_rounds=3)
    loop = scan_loop.Loop(runner, WorkerContext.build(pallet.workspace, settings.to_dict()), settings, 2, None,
                          {(None, patch.name): list(patch.values) for patch in pallet.patches})
    records = [record for group in loop.groups([(None, patch) for patch in pallet.patches]) for record in group]
    assert len(records) == 3 and all(record.error.startswith("worker lost 3 times") for record in records)
    assert all(count == 6 for count in runner.seen.values()), runner.seen
    notes = [entry.getMessage() for entry in caplog.records]
    assert sum("no retry used up" in note for note in notes) == 3, notes
    assert sum("(attempt" in note for note in notes) == 2, notes


def test_the_scratch_folder_of_a_killed_scan_is_removed_by_the_next_scan(tmp_path):
    """kill -9 of a scan leaves its local executor's folder (the workspace's context, its workers'
    ids) in the temporary directory; the next scan removes it once stale. Folders of a live scan,
    fresh ones and folders of unknown origin are left alone."""
    from pyhf_dist import scratch

    environment = dict(os.environ, TMPDIR=str(tmp_path))
    killed = subprocess.Popen([sys.executable, "-m", "pyhf_dist", "demo", "--backend", "numpy", "-o",
                               str(tmp_path / "a.json")], env=environment, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(tmp_path.glob("pyhf-dist-local-*/context-*.json")):
        time.sleep(0.05)
    workers = psutil.Process(killed.pid).children(recursive=True)
    killed.kill()
    killed.wait(timeout=30)
    (left,) = tmp_path.glob("pyhf-dist-local-*")
    assert scratch.owner(left) == killed.pid
    # Its workers end by themselves (their parent is gone); one still starting would touch the folder.
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, f"workers of the killed scan still run: {alive}"
    others = {}
    for name, pid in (("live", os.getpid()), ("fresh", killed.pid), ("unknown", None)):
        folder = others[name] = tmp_path / f"pyhf-dist-local-{name}"
        folder.mkdir()
        if pid is not None:
            (folder / ".scan-pid").write_text(str(pid))
    old = time.time() - 2 * scratch.STALE_SECONDS
    for folder in (left, others["live"], others["unknown"]):
        os.utime(folder, (old, old))
    run = subprocess.run([sys.executable, "-m", "pyhf_dist", "demo", "--backend", "numpy", "-o",
                          str(tmp_path / "b.json")], env=environment, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert not left.exists()
    assert all(folder.exists() for folder in others.values())
