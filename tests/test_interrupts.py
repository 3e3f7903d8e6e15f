"""Ctrl-C and SIGTERM (and SIGHUP) stop a scan within two seconds in every phase, and leave nothing behind.

The phases are made deterministic with named pipes, not timing: a scan whose patchset is a pipe
nobody writes is "reading the pallet" for as long as the test wants (its workers start meanwhile),
and one whose journal is such a pipe is "writing" when it blocks opening it. Each test checks the
exit (code 130 from the command line), the time it took, that no worker process is left, that
stderr has no traceback or shutdown noise, and that the journal holds whole records only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

#: What "within 2 s" allows, measured from the signal to the exit of the process.
STOP_SECONDS = 2.0
NOISE = ("Traceback", "Exception ignored", "leaked semaphore", "resource_tracker", "KeyboardInterrupt")


def start(args: list[str], **options) -> subprocess.Popen:
    # In a session of its own, as in a terminal: Ctrl-C there signals the whole process group.
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **options)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def wait_for(condition, limit: float = 180, what: str = "condition") -> None:
    deadline = time.time() + limit
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def stop(process: subprocess.Popen, sig: int = signal.SIGINT) -> tuple[float, str]:
    """Signal the process group; returns (seconds until the process exited, its stderr)."""
    workers = descendants(process.pid)
    os.killpg(process.pid, sig)
    began = time.time()
    _, stderr = process.communicate(timeout=60)
    elapsed = time.time() - began
    _, alive = psutil.wait_procs(workers, timeout=10)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes left behind: {[(p.pid, p.cmdline()) for p in alive]}"
    return elapsed, stderr


def assert_clean_interruption(process, elapsed: float, stderr: str) -> None:
    assert process.returncode == 130, stderr
    assert "Interrupted" in stderr
    assert not [marker for marker in NOISE if marker in stderr], stderr
    assert elapsed <= STOP_SECONDS, f"took {elapsed:.2f} s to stop"


def whole_records(journal: Path) -> int:
    """Records in a journal; fails on any line that is not one whole record."""
    if not journal.exists() or journal.is_fifo():
        return 0
    lines = journal.read_text().splitlines()
    for line in lines:
        assert json.loads(line)["record"]["name"], line
    return len(lines)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyhf_dist", *args]


@pytest.mark.parametrize("moment", ["while the workers start", "while the pallet is read"])
def test_ctrl_c_before_the_first_fit(erjr_dir, tmp_path, moment):
    pipe = tmp_path / "patchset.json"
    os.mkfifo(pipe)  # never written: reading the pallet blocks here
    process = start(cli("fit", str(erjr_dir / "BkgOnly.json"), "--patchset", str(pipe), "--backend", "numpy",
                        "--workers", "2", "-o", str(tmp_path / "r.json"), "-q"))
    wait_for(lambda: len(descendants(process.pid)) >= 2, what="the workers to start")
    if moment == "while the pallet is read":
        time.sleep(4)  # the workers have imported what they need and wait; the client still reads
    elapsed, stderr = stop(process)
    assert_clean_interruption(process, elapsed, stderr)
    assert not (tmp_path / "r.json").exists()
    # Nothing finished: no promise of kept results, no --resume to add.
    assert "Interrupted before any fit finished: nothing to keep; run the same command to start again." in stderr
    assert "--resume" not in stderr and "kept" not in stderr.replace("nothing to keep", "")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_ctrl_c_and_sigterm_while_fitting_keep_the_journal(erjr_dir, tmp_path, sig):
    """SIGHUP: the terminal closed, or the ssh session dropped."""
    journal = tmp_path / "r.journal.jsonl"
    process = start(cli("fit", str(erjr_dir), "-p", "ERJR_1*", "--backend", "numpy", "--workers", "2",
                        "-o", str(tmp_path / "r.json"), "-q"))
    wait_for(lambda: whole_records(journal) >= 2, what="two finished fits")
    elapsed, stderr = stop(process, sig)
    assert_clean_interruption(process, elapsed, stderr)
    assert whole_records(journal) >= 2 and "--resume" in stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_a_parsl_scan_whose_interchange_they_reach(erjr_dir, tmp_path, sig):
    # Ctrl-C signals the terminal's whole process group, and the end of a Slurm job every process
    # of the job: Parsl's interchange among them. An interchange that died left Parsl's cleanup
    # waiting for ever for its answer.
    pytest.importorskip("parsl")
    journal = tmp_path / "r.journal.jsonl"
    process = start(cli("fit", str(erjr_dir), "-p", "ERJR_1*", "--backend", "numpy", "--executor", "parsl",
                        "--workers", "2", "-o", str(tmp_path / "r.json"), "-q"))
    wait_for(lambda: whole_records(journal) >= 2, what="two finished fits")
    elapsed, stderr = stop(process, sig)
    assert_clean_interruption(process, elapsed, stderr)
    assert whole_records(journal) >= 2 and "--resume" in stderr


def test_ctrl_c_while_writing(erjr_dir, tmp_path):
    journal = tmp_path / "journal.jsonl"
    os.mkfifo(journal)  # nobody reads it: opening it for writing blocks
    process = start(cli("fit", str(erjr_dir), "-p", "ERJR_1*", "--backend", "numpy", "--workers", "2",
                        "--journal", str(journal), "-o", str(tmp_path / "r.json"), "-q"))
    wait_for(lambda: len(descendants(process.pid)) >= 2, what="the workers to start")
    time.sleep(4)  # the executor is up and the scan waits to open its journal
    elapsed, stderr = stop(process)
    assert_clean_interruption(process, elapsed, stderr)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_script_stopped_leaves_no_process_and_no_noise(erjr_dir, tmp_path, sig):
    """The library in code piped to ``python -`` (a batch job): Ctrl-C, or SIGTERM at the job's
    time limit, reaches the code as KeyboardInterrupt (Python's usual report) after the scan has
    cleaned up; no shutdown noise follows it."""
    journal = tmp_path / "j.jsonl"
    code = textwrap.dedent(f"""\
        import pyhf_dist
        pyhf_dist.map_fits({str(erjr_dir)!r}, patches=["ERJR_1*"], backend="numpy", workers=2,
                           journal={str(journal)!r})
    """)
    (tmp_path / "code.py").write_text(code)
    with open(tmp_path / "code.py") as stdin:
        process = start([sys.executable, "-"], cwd=tmp_path, stdin=stdin)
    wait_for(lambda: whole_records(journal) >= 2, what="two finished fits")
    elapsed, stderr = stop(process, sig)
    assert process.returncode != 0 and stderr.rstrip().endswith("KeyboardInterrupt"), stderr
    assert not [marker for marker in NOISE[1:4] if marker in stderr], stderr
    assert elapsed <= STOP_SECONDS, f"took {elapsed:.2f} s to stop"
    assert whole_records(journal) >= 2


def test_two_scans_on_one_output_do_not_interleave(erjr_dir, erjr_pallet, tmp_path):
    output = tmp_path / "r.json"
    journal = tmp_path / "r.journal.jsonl"
    first = start(cli("fit", str(erjr_dir), "-p", "ERJR_1*", "--backend", "numpy", "--workers", "2",
                      "-o", str(output), "-q"))
    wait_for(lambda: whole_records(journal) >= 1, what="the first scan's first fit")
    began = time.time()
    second = subprocess.run(cli("fit", str(erjr_dir), "--backend", "numpy", "-o", str(output), "-q"),
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"another scan (pid {first.pid})" in lines[0] and "-o" in lines[0], second.stderr
    assert time.time() - began < 30
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    results = json.loads(output.read_text())["results"]
    names = [name for name in erjr_pallet.names() if name.startswith("ERJR_1")]
    assert sorted(r["name"] for r in results) == sorted(names)
    assert all(r["status"] == "ok" for r in results)
    assert not journal.exists() and not Path(str(journal) + ".lock").exists()


def test_ctrl_c_while_the_interpreter_exits_after_a_finished_scan(erjr_dir, tmp_path):
    """The scan is done and written; a Ctrl-C in the interpreter's own exit (here from the last atexit
    handler to run, where Python still raises it; at the very end Python has put back the default
    handler, which kills by SIGINT without a word) leaves the finished scan's exit code and no noise."""
    code = textwrap.dedent("""\
        import atexit, os, signal, time
        atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.5)))
        from pyhf_dist.__main__ import program
        program()
    """)
    output = tmp_path / "r.json"
    run = subprocess.run([sys.executable, "-c", code, "fit", str(erjr_dir), "-p", "ERJR_100p0_20p0", "--backend",
                          "numpy", "--executor", "sequential", "-o", str(output), "-q"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert not [marker for marker in NOISE if marker in run.stderr], run.stderr
    assert [record["status"] for record in json.loads(output.read_text())["results"]] == ["ok"]


def test_ctrl_c_while_the_command_is_imported(tmp_path):
    """Before the command's modules are imported nothing has started: one line, exit 130, no
    traceback of an import. (The import of the command is held here until the test signals.)"""
    imported = tmp_path / "importing"
    code = textwrap.dedent(f"""\
        import builtins, pathlib, time
        real_import = builtins.__import__

        def held_import(name, *args, **kwargs):
            if name == "pyhf_dist.cli":
                pathlib.Path({str(imported)!r}).touch()
                time.sleep(60)
            return real_import(name, *args, **kwargs)

        builtins.__import__ = held_import
        from pyhf_dist.__main__ import program
        program()
    """)
    process = start([sys.executable, "-c", code, "--version"])
    wait_for(imported.exists, what="the command's import")
    elapsed, stderr = stop(process)
    assert_clean_interruption(process, elapsed, stderr)


def test_ctrl_c_inside_a_garbage_collector_callback_still_stops_the_scan(erjr_dir, tmp_path):
    """Python cannot raise a KeyboardInterrupt out of a gc callback (Dask's client registers one):
    it prints "Exception ignored" and the scan would go on as if nobody had pressed Ctrl-C. Here a
    gc callback sends the Ctrl-C itself and goes on running, so that Python handles it there; the
    scan's callback runs a collection in the main thread once two fits are journaled."""
    journal = tmp_path / "r.journal.jsonl"
    code = textwrap.dedent(f"""\
        import gc, os, signal, sys
        import pyhf_dist
        sent = []

        def ctrl_c_inside(phase, info):
            if phase == "start" and len(seen) >= 2 and not sent:
                sent.append(True)
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(100000):  # Python handles the signal here, inside the callback
                    pass

        seen = []
        gc.callbacks.append(ctrl_c_inside)
        try:
            pyhf_dist.map_fits({str(erjr_dir)!r}, patches=["ERJR_*"], backend="numpy", workers=2,
                               journal={str(journal)!r}, callback=lambda record: (seen.append(record), gc.collect()))
        except KeyboardInterrupt:
            sys.exit(5)
    """)
    process = start([sys.executable, "-c", code])
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 5, stderr
    assert not [marker for marker in NOISE if marker in stderr], stderr
    assert whole_records(journal) >= 2
