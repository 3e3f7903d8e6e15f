"""Faults of the machine itself: nothing finished is lost, and each is answered in one line.

Real faults, not mocks: a filesystem that is full (a small tmpfs, filled), an output folder made
read-only (the tmpfs remounted) or removed, a worker killed by the kernel's OOM killer (a memory
cgroup with a limit, and a fit that needs more), a journal with damaged lines, a compile cache
that cannot be written or holds damaged entries. Tests that need root (mounts, cgroups) say why
they skip elsewhere. The short chaos run (``benchmarks/chaos.py``) is here too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pyhf_dist
from pyhf_dist import cache
from pyhf_dist.executors.deaths import memory_cgroup
from pyhf_dist.executors.local import LocalExecutor
from pyhf_dist.pallet import Pallet, Patch
from helpers import REPOSITORY

#: 14 patches of 3L-eRJR: about 0.3 s each on numpy.
ERJR_GLOB = "ERJR_1[0-2]*"


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs (a filesystem that fills up)")
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                         text=True)
    if run.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A function mounting a tmpfs of a given size at ``tmp_path/<name>``; unmounted afterwards."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        path = tmp_path / name
        _mount_tmpfs(path, size)
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(directory: Path) -> Path:
    """Take every free byte of ``directory``'s filesystem; returns the filler file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as stream:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    stream.write(b"\1" * size)
            except OSError:
                pass
    return filler


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyhf_dist", *args], capture_output=True, text=True, timeout=timeout)


def _one_error_line(stderr: str) -> str:
    """The single ``Error:`` line of a stopped scan (asserting there is one, and no traceback)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def _whole_records(journal: Path) -> dict[str, dict]:
    records = {}
    for line in journal.read_bytes().split(b"\n")[:-1]:
        record = json.loads(line)["record"]
        records[record["name"]] = record
    return records


def _resume_command(error: str) -> list[str]:
    """The command an error line says to run, as arguments for ``_cli``."""
    import shlex

    command = shlex.split(error.split("then run: ", 1)[1].split(" (it fits", 1)[0])
    assert command[0] == "pyhf-dist"
    return command[1:]


def _names(result_file: Path) -> list[str]:
    return [record["name"] for record in json.loads(result_file.read_text())["results"]]


# ------------------------------------------------------------------------------ full disk


def test_disk_full_on_the_journal_stops_in_one_line_and_resume_loses_nothing(erjr_dir, erjr_pallet, small_disk):
    """A 8 kB filesystem fills after a few records: one line says what was kept and the command that
    continues; after freeing space that command fits only the rest."""
    import fnmatch

    names = fnmatch.filter(erjr_pallet.names(), ERJR_GLOB)
    disk = small_disk("small", "8k")
    output = disk / "res.json"
    run = _cli("fit", str(erjr_dir), "-p", ERJR_GLOB, "--backend", "numpy", "--workers", "2", "-o", str(output), "-q")
    assert run.returncode == 1, run.stderr
    error = _one_error_line(run.stderr)
    assert "No space left on device (disk full)" in error and "free some space there" in error, error
    kept = int(re.search(r"; (\d+) finished records? (are|is) kept", error).group(1))
    journal = disk / "res.journal.jsonl"
    before = _whole_records(journal)
    assert len(before) == kept and 0 < kept < len(names), (kept, len(names))
    assert not output.exists()

    subprocess.run(["mount", "-o", "remount,size=1m", str(disk)], check=True)
    command = _resume_command(error)
    assert command[-1] == "--resume"
    resumed = _cli(*command)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Fitting {len(names) - kept} patches ({kept} already in the journal)" in resumed.stderr
    results = {record["name"]: record for record in json.loads(output.read_text())["results"]}
    assert sorted(_names(output)) == sorted(names) and all(r["status"] == "ok" for r in results.values())
    assert all(results[name]["started"] == record["started"] for name, record in before.items()), "refitted"


def test_results_file_on_a_full_disk_keeps_every_record_in_the_journal(erjr_dir, small_disk, tmp_path):
    """The fits are done but the results cannot be written: the journal keeps all of them, and the
    command the line gives writes the results without fitting anything again."""
    disk = small_disk("out", "64k")
    output, journal = disk / "res.json", tmp_path / "res.journal.jsonl"
    filler = _fill(disk)
    run = _cli("fit", str(erjr_dir), "-p", ERJR_GLOB, "--backend", "numpy", "--workers", "2", "-o", str(output),
               "--journal", str(journal), "-q")
    assert run.returncode == 1, run.stderr
    error = _one_error_line(run.stderr)
    assert f"cannot write the results {output}: No space left on device (disk full)" in error, error
    assert f"all 14 records are kept in {journal}" in error and error.endswith("(it fits nothing again)"), error
    assert len(_whole_records(journal)) == 14 and not output.exists()

    filler.unlink()
    resumed = _cli(*_resume_command(error))
    assert resumed.returncode == 0, resumed.stderr
    assert "Fitting 0 patches (14 already in the journal)" in resumed.stderr
    assert len(set(_names(output))) == 14 and not journal.exists()


def test_kept_toys_on_a_full_disk_cost_that_file_not_the_results(erjr_dir, small_disk, tmp_path):
    """The toys are fitted but ``--keep-toys`` cannot be written: the results are written and the
    journal kept, one line says so, and its command writes the file from the journal, fitting
    nothing again. In Python the result is returned with a StorageWarning."""
    from pyhf_dist import kept_toys
    from pyhf_dist.exceptions import StorageWarning

    disk = small_disk("toys", "64k")
    kept, output, journal = disk / "toys.npz", tmp_path / "res.json", tmp_path / "res.journal.jsonl"
    filler = _fill(disk)
    toys = ("-p", "ERJR_350p0_200p0", "--toys", "200", "--seed", "1", "--workers", "2")
    run = _cli("fit", str(erjr_dir), *toys, "-o", str(output), "--keep-toys", str(kept), "-q")
    assert run.returncode == 1, run.stderr
    error = _one_error_line(run.stderr)
    assert f"cannot write the kept toys {kept}: No space left on device (disk full)" in error, error
    assert f"the toys are kept in {journal}; free some space there" in error, error
    assert _names(output) == ["ERJR_350p0_200p0"] and journal.exists() and not kept.exists()

    filler.unlink()
    resumed = _cli(*_resume_command(error))
    assert resumed.returncode == 0, resumed.stderr
    assert "Fitting 0 patches (1 already in the journal)" in resumed.stderr
    record = json.loads(output.read_text())["results"][0]
    _, parts, distributions = kept_toys.read_kept(kept)
    assert parts[0]["name"] == "ERJR_350p0_200p0" and len(distributions[0]["sb"]) == len(distributions[0]["b"]) == 200
    assert kept_toys.cls_from_kept(kept)["ERJR_350p0_200p0"]["CLs_obs"] == record["CLs_obs"]
    assert not journal.exists()

    saved = shutil.copy(kept, tmp_path / "saved.npz")
    kept.unlink()
    filler = _fill(disk)
    warned = r"cannot write the kept toys .*\(disk full\); the records are returned, their toys are not kept"
    with pytest.warns(StorageWarning, match=warned):
        result = pyhf_dist.map_fits(erjr_dir, patches=["ERJR_350p0_200p0"], calctype="toybased", ntoys=200, seed=1,
                                    keep_toys=kept)
    assert result["ERJR_350p0_200p0"].CLs_obs == record["CLs_obs"] and "disk full" in result.metadata["keep_toys_error"]

    merged = _cli("merge-toys", str(saved), "-o", str(disk / "merged.npz"))
    assert merged.returncode == 1 and _one_error_line(merged.stderr) == (
        f"Error: cannot write the merged toys {disk / 'merged.npz'}: No space left on device (disk full); free some "
        "space there, then run merge-toys again (the files merged are unchanged)")
    assert [path.name for path in disk.iterdir()] == ["filler"]


# ------------------------------------------------------------------------------ read-only or removed output


def test_output_folder_made_read_only_mid_scan(erjr_dir, small_disk, tmp_path):
    """The output's filesystem turns read-only while the scan fits: one line, every record kept in
    the journal (elsewhere), and the same command with --resume writes the results once it is
    writable again."""
    disk = small_disk("out", "1m")
    output, journal = disk / "res.json", tmp_path / "res.journal.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "pyhf_dist", "fit", str(erjr_dir), "-p", ERJR_GLOB, "--backend", "numpy",
         "--workers", "2", "-o", str(output), "--journal", str(journal), "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (journal.exists() and journal.read_bytes().count(b"\n") >= 1):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.02)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr
    error = _one_error_line(stderr)
    assert "Read-only file system (read-only filesystem)" in error and "make that folder writable again" in error
    assert len(_whole_records(journal)) == 14

    subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
    resumed = _cli(*_resume_command(error))
    assert resumed.returncode == 0, resumed.stderr
    assert len(set(_names(output))) == 14


def test_output_folder_removed_mid_scan_is_written_again_and_the_scan_goes_on(tmp_path, caplog):
    pallet = pyhf_dist.demo_pallet(points=3)
    folder = tmp_path / "out"
    journal = folder / "scan.journal.jsonl"
    removed = []

    def remove_the_folder(record):
        if not removed:
            shutil.rmtree(folder)
            removed.append(record.name)

    with caplog.at_level(logging.WARNING, logger="pyhf_dist"):
        result = pyhf_dist.map_fits(pallet, executor="sequential", backend="numpy", journal=journal,
                                    callback=remove_the_folder)
    assert removed and result.counts()["failed"] == 0
    lines = _whole_records(journal)
    assert sorted(lines) == sorted(pallet.names()), "each record once, none lost with the folder"
    assert len(journal.read_bytes().split(b"\n")) == len(pallet.names()) + 1
    notes = [r.getMessage() for r in caplog.records if "removed mid-scan" in r.getMessage()]
    # Noticed at the next record written (the first went with the folder).
    assert len(notes) == 1 and "written again with the 2 records finished" in notes[0], notes
    again = pyhf_dist.map_fits(pallet, executor="sequential", backend="numpy", journal=journal, resume=True)
    assert again.metadata["resumed"] == len(pallet.names())


# ------------------------------------------------------------------------------ damaged journal


def test_damaged_journal_lines_are_skipped_named_and_their_patches_fitted_again(tmp_path, caplog):
    pallet = pyhf_dist.demo_pallet(points=6)
    names = pallet.names()
    journal = tmp_path / "j.jsonl"
    first = pyhf_dist.map_fits(pallet, executor="sequential", backend="numpy", journal=journal, patches=names)
    assert first.counts()["ok"] == 6
    lines = journal.read_bytes().split(b"\n")[:-1]
    damaged = {json.loads(lines[1])["record"]["name"], json.loads(lines[3])["record"]["name"]}
    lines[1] = b"\0" * 40 + lines[1][40:]  # a block the disk lost
    lines[3] = lines[3][: len(lines[3]) // 2]  # a line cut in the middle, with more after it
    journal.write_bytes(b"\n".join(lines) + b"\n" + lines[4][:30])  # and a last line cut by a crash
    started = {record.name: record.started for record in first}

    with caplog.at_level(logging.WARNING, logger="pyhf_dist"):
        result = pyhf_dist.map_fits(pallet, executor="sequential", backend="numpy", journal=journal, resume=True,
                                    patches=names)
    notes = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(notes) == 1 and "skipped lines 2, 4 (not journal entries" in notes[0], notes
    assert result.metadata["journal_skipped"] == [2, 4] and result.metadata["resumed"] == 4
    assert sorted(record.name for record in result) == sorted(names)
    refit = {record.name for record in result if record.started != started[record.name]}
    assert refit == damaged


def test_a_file_that_is_no_journal_at_all_is_refused(tmp_path):
    journal = tmp_path / "j.jsonl"
    journal.write_text('{"metadata": {}, "results": []}\nnot json either\n')
    with pytest.raises(pyhf_dist.exceptions.JournalError, match="is not a journal"):
        pyhf_dist.map_fits(pyhf_dist.demo_pallet(points=3), executor="sequential", backend="numpy", journal=journal,
                           resume=True)


# ------------------------------------------------------------------------------ OOM-killed worker


def _child_memory_cgroup(name: str, limit: int) -> Path:
    """A memory cgroup under this process's own, limited to ``limit`` bytes (skips where impossible)."""
    parent = memory_cgroup(os.getpid())
    if os.geteuid() != 0 or parent is None:
        pytest.skip("needs root and a memory cgroup of this process to limit a worker's memory")
    group = parent / name
    try:
        group.mkdir(exist_ok=True)
        if (group / "memory.max").exists():  # v2
            (group / "memory.max").write_text(str(limit))
            (group / "memory.swap.max").write_text("0") if (group / "memory.swap.max").exists() else None
        else:  # v1
            (group / "memory.limit_in_bytes").write_text(str(limit))
            if (group / "memory.memsw.limit_in_bytes").exists():
                (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
    except OSError as error:
        pytest.skip(f"cannot make a memory cgroup under {parent}: {error.strerror}")
    return group


def _join_cgroup_and_hunger() -> None:
    """Worker initializer: join the test's limited memory cgroup; fits of patches named ``hungry*``
    then take memory until the kernel's OOM killer ends the worker."""
    Path(os.environ["PYHF_DIST_TEST_CGROUP"], "cgroup.procs").write_text(str(os.getpid()))
    from pyhf_dist.runtime import calculations

    compute = calculations.compute
    kept = []

    def hungry(state, task):
        if task.get("name", "").startswith("hungry"):
            for _ in range(200):
                kept.append(b"\1" * (20 * 1024**2))  # written, so resident
                time.sleep(0.03)  # slowly enough for the executor to see it grow
        return compute(state, task)

    calculations.compute = hungry


def test_worker_killed_by_the_oom_killer_is_named_with_its_memory(monkeypatch):
    demo = pyhf_dist.demo_pallet(points=3)
    limit = 600 * 1024**2
    group = _child_memory_cgroup(f"pyhf-dist-test-{os.getpid()}", limit)
    monkeypatch.setenv("PYHF_DIST_TEST_CGROUP", str(group))
    pallet = Pallet(demo.workspace, [Patch("hungry_fit", (1.0, 1.0), demo.patches[0].operations)] + demo.patches[:3],
                    demo.labels)
    try:
        with LocalExecutor(workers=1, initializer=_join_cgroup_and_hunger) as executor:
            result = pyhf_dist.map_fits(pallet, executor=executor, backend="numpy", retries=0)
    finally:
        for _ in range(50):  # the killed and stopped workers leave it as they are reaped
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    rows = {record.name: record for record in result}
    hungry = rows["hungry_fit"]
    assert hungry.status == "failed"
    assert re.search(r"worker lost 1 times: worker \d+ was killed by the kernel's OOM killer \(.*"
                     r"memory cgroup .*1 OOM kill, limit 629 MB.*\); its memory last seen \d+ MB", hungry.error), hungry.error
    assert all(rows[patch.name].ok for patch in demo.patches[:3]), "the replacement worker fitted the rest"


# ------------------------------------------------------------------------------ compile cache


def test_a_damaged_remembered_answer_reads_as_absent(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    cache.remember("toys", "key", "00" * 64)
    assert cache.recall("toys", "key") == "00" * 64
    entry = tmp_path / "checks" / "toys-key"
    entry.write_text(entry.read_text()[:-7])  # cut short
    assert cache.recall("toys", "key") is None


def _jax_scan(erjr_dir, output: Path, cache_directory: Path, kept: str = "off") -> subprocess.CompletedProcess:
    # The demo pallet: every patch of it on the fast path (3L-eRJR's are declined), one worker.
    # ``kept``: the pyhf-dist cache (off: the likelihood goes through jax's compile cache too).
    environment = dict(os.environ, PYHF_DIST_JAX_CACHE=str(cache_directory), PYHF_DIST_CACHE=kept)
    return subprocess.run(
        [sys.executable, "-m", "pyhf_dist", "demo", "--backend", "jax", "--workers", "1", "-o", str(output)],
        capture_output=True, text=True, timeout=300, env=environment)


def _fast_results(run: subprocess.CompletedProcess, output: Path) -> list:
    assert run.returncode == 0, run.stderr
    assert "Warning" not in run.stderr and "Traceback" not in run.stderr, run.stderr
    results = json.loads(output.read_text())["results"]
    assert results and all(record["status"] == "ok" and record["engine"] == "fast" for record in results)
    return [(record["name"], record["CLs_obs"], record["CLs_exp"]) for record in results]


def _assert_compiled_in_memory_once(run: subprocess.CompletedProcess, output: Path) -> None:
    notes = [line for line in run.stderr.splitlines() if "compile cache" in line]
    assert len(notes) == 1 and notes[0].endswith("compiling in memory instead"), run.stderr
    _fast_results(run, output)


def _cut_short(entries: list) -> None:
    assert entries
    for entry in entries:
        data = entry.read_bytes()
        entry.write_bytes(data[: len(data) // 2])


def test_an_unusable_compile_cache_never_fails_a_scan(erjr_dir, tmp_path, monkeypatch):
    """A compile cache that cannot be written (here a file where its folder should be) and one with
    damaged entries (cut short, as a full disk leaves them): the scan compiles in memory and says so
    once. Damaged kept executables are compiled again and kept whole, silently."""
    from pyhf_dist.runtime.fast import executables

    in_the_way = tmp_path / "not-a-folder"
    in_the_way.write_text("")
    run = _jax_scan(erjr_dir, tmp_path / "a.json", in_the_way)
    _assert_compiled_in_memory_once(run, tmp_path / "a.json")

    directory = tmp_path / "jax-cache"
    answers = _fast_results(_jax_scan(erjr_dir, tmp_path / "b.json", directory), tmp_path / "b.json")
    _cut_short([entry for entry in directory.iterdir() if entry.is_file()])
    run = _jax_scan(erjr_dir, tmp_path / "c.json", directory)
    _assert_compiled_in_memory_once(run, tmp_path / "c.json")

    kept = tmp_path / "pyhf-dist-cache"
    run = _jax_scan(erjr_dir, tmp_path / "d.json", tmp_path / "jax-cache-2", str(kept))
    assert _fast_results(run, tmp_path / "d.json") == answers
    entries = list((kept / "executables").iterdir())
    _cut_short(entries)
    run = _jax_scan(erjr_dir, tmp_path / "e.json", tmp_path / "jax-cache-2", str(kept))
    assert _fast_results(run, tmp_path / "e.json") == answers
    assert "compile cache" not in run.stderr
    monkeypatch.setenv(cache.CACHE_ENV, str(kept))
    for entry in entries:  # whole again
        assert cache.recall("likelihood", entry.name.removeprefix("likelihood-"), executables.FOLDER) is not None


# ------------------------------------------------------------------------------ the short chaos run


def test_short_chaos_run_loses_and_duplicates_nothing(tmp_path):
    """Ten random faults (worker SIGKILL, client SIGKILL then --resume, Ctrl-C then --resume, a full
    disk for a few seconds where root can mount one) on the local executor.

    Faults come 1.5 s or more after a start: earlier, a Ctrl-C can land while the interpreter itself
    is still importing (Python's own traceback, before any handler of ours exists), and a SIGKILL of
    the client can leave loky workers that were being spawned waiting for it.
    """
    run = subprocess.run(
        [sys.executable, str(REPOSITORY / "benchmarks" / "chaos.py"), "--faults", "10", "--executors", "local",
         "--patches", ERJR_GLOB, "--per-scan", "3", "--gap", "1.5", "3", "--minutes", "4", "--run-timeout", "120",
         "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads((tmp_path / "chaos.json").read_text())["rows"]
    assert sum(row["faults"] for row in rows) >= 10
    assert all(row["completed"] and row["lost"] == 0 and row["duplicated"] == 0 for row in rows), rows
    assert all(row["max_dcls"] == 0 for row in rows)
    assert all(row["tracebacks"] == 0 for row in rows)
    # Every stop says what happened in one line (or is a SIGKILL, which cannot).
    assert all(row["stops"] == row["stops_clean"] for row in rows), rows
    assert "| **all** |" in (tmp_path / "chaos.md").read_text()


# ------------------------------------------------------------------------------ Dask worker killed as it starts


def test_dask_worker_killed_while_its_cluster_starts_does_not_stop_the_scan(caplog):
    """A worker process of pyhf-dist's own Dask cluster killed before it joined (an operator, the OOM
    killer): the cluster is started again and the scan fits every patch once."""
    pytest.importorskip("distributed")
    import signal

    from pyhf_dist.executors.dask import DaskExecutor
    from pyhf_dist.settings import FitSettings

    demo = pyhf_dist.demo_pallet(points=4)
    executor = DaskExecutor(workers=2, dashboard_address=":0")
    executor.prepare(FitSettings(backend="numpy").to_dict())  # starts the cluster in the background
    victim, deadline = None, time.time() + 60
    while victim is None and time.time() < deadline:
        workers = list(getattr(executor.cluster, "workers", {}).values()) if executor.cluster is not None else []
        process = next((getattr(worker, "process", None) for worker in workers
                        if getattr(worker, "process", None) is not None), None)
        if process is not None and process.returncode is None:
            victim = process.pid
        time.sleep(0.005)
    assert victim, "no worker process appeared"
    os.kill(victim, signal.SIGKILL)
    with caplog.at_level(logging.WARNING, logger="pyhf_dist"), executor:
        result = pyhf_dist.map_fits(demo, executor=executor, backend="numpy")
    assert sorted(record.name for record in result) == sorted(demo.names())
    assert all(record.ok for record in result) and victim not in {record.worker["pid"] for record in result}
    notes = [r.getMessage() for r in caplog.records]
    assert any("starting it again" in note for note in notes), notes
