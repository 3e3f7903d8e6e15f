"""``executor="slurm"``: Dask workers in real Slurm jobs.

The tests marked ``slurm`` need a running Slurm (``bash executors/slurm/start-slurm.sh`` as root
starts a single-node one); they are skipped, with the reason, when ``sinfo`` does not answer. The
others check the options and the batch script without submitting anything.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("dask_jobqueue")

import dask  # noqa: E402

import pyhf_dist  # noqa: E402
from pyhf_dist.exceptions import ExecutorError, ExecutorOptionError  # noqa: E402
from pyhf_dist.executors import get_executor  # noqa: E402
from pyhf_dist.protocol import WorkerContext  # noqa: E402

from helpers import LBB_FEW, REPOSITORY, assert_matches_reference  # noqa: E402


def _slurm_answers() -> str | None:
    """Why Slurm tests cannot run here, or ``None`` when they can."""
    if shutil.which("sinfo") is None:
        return "no Slurm here (sinfo not found): run 'sudo bash executors/slurm/start-slurm.sh' to start one"
    try:
        output = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 15 s: is slurmctld running? (executors/slurm/start-slurm.sh)"
    states = output.stdout.split()
    if output.returncode != 0 or not any(state.startswith(("idle", "mix", "alloc")) for state in states):
        return f"Slurm has no usable node (sinfo: {(output.stderr or output.stdout).strip()[:200]!r})"
    return None


_NO_SLURM = _slurm_answers()
requires_slurm = pytest.mark.skipif(_NO_SLURM is not None, reason=_NO_SLURM or "")


def _our_jobs(job_name: str, states: str = "all") -> dict[str, str]:
    """``{job id: state}`` of the jobs named ``job_name`` that squeue shows."""
    command = ["squeue", "-h", "-o", "%i %T", "--name", job_name]
    if states != "all":
        command += ["-t", states]
    output = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    return dict(line.split() for line in output.stdout.splitlines() if line.strip())


def _assert_no_jobs_left(job_name: str, within: float = 30.0) -> None:
    # Cancelled at once: none pending or running. They pass through COMPLETING for a few seconds
    # (KillWait) before squeue drops them.
    assert not _our_jobs(job_name, states="PENDING,RUNNING"), f"jobs not cancelled: {_our_jobs(job_name)}"
    deadline = time.monotonic() + within
    while _our_jobs(job_name) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _our_jobs(job_name), f"jobs left in squeue: {_our_jobs(job_name)}"


@pytest.fixture
def slurm_options(tmp_path, request):
    """Options for one scan: its own job name, logs out of the working tree, the loopback interface."""
    return dict(
        jobs=2, cores=1, memory="1GB", walltime="00:10:00", interface="lo",
        log_directory=str(tmp_path / "slurm-logs"), job_name=f"pdt-{request.node.name[5:20]}-{os.getpid()}",
    )


# --- without Slurm: options and the batch script --------------------------------------------------


def test_job_script_passes_options_through():
    executor = get_executor(
        "slurm", jobs=3, cores=4, memory="8GB", walltime="01:30:00", queue="short", account="atlas",
        job_script_prologue=["module load python", "source ~/venv/bin/activate"],
        job_extra_directives=["--constraint=haswell"], job_name="pyhf-scan",
    )
    script = executor.job_script()
    for line in ("#SBATCH -J pyhf-scan", "#SBATCH -p short", "#SBATCH -A atlas", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --mem=8G", "#SBATCH -t 01:30:00", "#SBATCH --constraint=haswell", "module load python",
                 "source ~/venv/bin/activate"):
        assert line in script
    # One single-threaded worker per core: pyhf fits hold the GIL.
    assert "--nworkers 4" in script and "--nthreads 1" in script
    assert executor.workers == 12
    assert executor.describe()["queue"] == "short"


def test_defaults_come_from_dask_config_and_keywords_win(tmp_path):
    with dask.config.set({"jobqueue.slurm.walltime": "02:00:00", "jobqueue.slurm.queue": "long",
                          "jobqueue.slurm.cores": 2, "jobqueue.slurm.memory": "3GB"}):
        script = get_executor("slurm").job_script()
        assert "#SBATCH -t 02:00:00" in script and "#SBATCH -p long" in script
        assert "--cpus-per-task=2" in script and "--mem=3G" in script
        script = get_executor("slurm", walltime="00:05:00").job_script()
        assert "#SBATCH -t 00:05:00" in script and "#SBATCH -p long" in script


def test_cluster_config_file(tmp_path):
    dask_style = tmp_path / "jobqueue.yaml"
    dask_style.write_text(
        "jobqueue:\n  slurm:\n    queue: gpu\n    walltime: '00:20:00'\n"
        "    job-extra-directives: ['--exclusive']\n    name: site-scan\n"
    )
    script = get_executor("slurm", cluster_config=str(dask_style), walltime="00:07:00").job_script()
    assert "#SBATCH -p gpu" in script and "#SBATCH --exclusive" in script and "#SBATCH -J site-scan" in script
    assert "#SBATCH -t 00:07:00" in script  # the keyword wins over the file
    flat = tmp_path / "cluster.yaml"
    flat.write_text("account: cms\njob_script_prologue: ['module load root']\n")
    script = get_executor("slurm", cluster_config=str(flat)).job_script()
    assert "#SBATCH -A cms" in script and "module load root" in script
    bad = tmp_path / "bad.yaml"
    bad.write_text("queue: short\nqueu: typo\n")
    with pytest.raises(ExecutorOptionError, match="queu"):
        get_executor("slurm", cluster_config=str(bad))
    with pytest.raises(ExecutorOptionError, match="cannot read"):
        get_executor("slurm", cluster_config=str(tmp_path / "missing.yaml"))


def test_bad_options():
    with pytest.raises(ExecutorOptionError, match="unknown SLURMCluster option"):
        get_executor("slurm", partition="short")
    with pytest.raises(ExecutorOptionError, match="not both"):
        get_executor("slurm", jobs=2, adapt=(1, 2))
    with pytest.raises(ExecutorOptionError, match="adapt"):
        get_executor("slurm", adapt=(3, 1))
    with pytest.raises(ExecutorOptionError, match="processes"):
        get_executor("slurm", cores=1, processes=2)
    for memory in (4, "4", "lots"):  # dask-jobqueue's own message: "not all arguments converted..."
        with pytest.raises(ExecutorOptionError, match=r"memory must be a size with its unit, e.g. '4GB'"):
            get_executor("slurm", memory=memory)


def test_one_line_given_for_a_list_option_is_one_line_of_the_script(tmp_path):
    """As --option KEY=VALUE, a YAML file or Python give it: not one #SBATCH line, shell command or
    worker argument per character."""
    from click.testing import CliRunner

    from pyhf_dist.cli import cli

    result = CliRunner().invoke(cli, [
        "fit", str(tmp_path), "--executor", "slurm", "--show-job-script",
        "--option", "job_extra_directives=--constraint=haswell", "--option", "worker_extra_args=--lifetime=1h",
        "--option", "job_script_prologue=source ~/venv/bin/activate"])
    assert result.exit_code == 0, result.output
    config = tmp_path / "cluster.yaml"
    config.write_text("job-script-prologue: module load root\njob-extra-directives: --exclusive\n")
    from_file = get_executor("slurm", cluster_config=str(config)).job_script()
    from_python = get_executor("slurm", job_script_prologue="module load root").job_script()
    for script, lines in ((result.output, ["#SBATCH --constraint=haswell", "source ~/venv/bin/activate"]),
                          (from_file, ["#SBATCH --exclusive", "module load root"]),
                          (from_python, ["module load root"])):
        for line in lines:
            assert line in script.splitlines(), script
        assert "#SBATCH -\n" not in script and "\ns\no\n" not in script, script
    assert result.output.rstrip().splitlines()[-1].endswith(" --lifetime=1h"), result.output


def test_without_slurm_commands_the_error_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    executor = get_executor("slurm", jobs=1)
    with pytest.raises(ExecutorError) as error:
        executor.start(WorkerContext.build({"channels": []}, {}))
    assert "sbatch" in str(error.value) and "\n" not in str(error.value)


def test_cli_show_job_script(tmp_path):
    from click.testing import CliRunner

    from pyhf_dist.cli import cli

    result = CliRunner().invoke(cli, ["fit", str(tmp_path), "--executor", "slurm", "--show-job-script",
                                      "--jobs", "2", "--cores", "2", "--memory", "4GB", "--walltime", "00:15:00",
                                      "--queue", "short", "--account", "atlas"])
    assert result.exit_code == 0, result.output
    for line in ("#SBATCH -p short", "#SBATCH -A atlas", "#SBATCH -t 00:15:00", "--cpus-per-task=2", "--mem=4G"):
        assert line in result.output


# --- with a real Slurm ------------------------------------------------------------------------------


@pytest.mark.slurm
@requires_slurm
def test_slurm_matches_serial_pyhf_inside_slurm_jobs(erjr_pallet, erjr_sample_names, erjr_sample_reference,
                                                     slurm_options):
    job_name = slurm_options["job_name"]
    seen_running: dict[str, str] = {}

    def watch_squeue(record):
        # While the scan runs, Slurm itself lists the jobs the fits run in.
        seen_running.update(_our_jobs(job_name, states="RUNNING"))

    result = pyhf_dist.map_fits(erjr_pallet, executor="slurm", patches=erjr_sample_names, backend="numpy",
                                callback=watch_squeue, **slurm_options)
    assert_matches_reference(result, erjr_sample_reference)
    job_ids = {record.worker["slurm_job_id"] for record in result}
    assert None not in job_ids, "a fit ran outside Slurm"
    assert job_ids <= set(seen_running), f"fits ran in {job_ids}, squeue showed {seen_running}"
    assert result.metadata["executor"] == "slurm" and result.metadata["job_name"] == job_name
    _assert_no_jobs_left(job_name)


@pytest.mark.slurm
@requires_slurm
def test_slurm_matches_serial_pyhf_on_1lbb(lbb_pallet, lbb_few_reference, slurm_options):
    result = pyhf_dist.map_fits(lbb_pallet, executor="slurm", patches=LBB_FEW, backend="numpy", **slurm_options)
    assert_matches_reference(result, lbb_few_reference)
    assert all(record.worker["slurm_job_id"] for record in result)
    _assert_no_jobs_left(slurm_options["job_name"])


@pytest.mark.slurm
@requires_slurm
def test_scancel_of_a_worker_job_mid_scan(erjr_pallet, erjr_sample_names, erjr_sample_reference, slurm_options):
    options = dict(slurm_options)
    options.pop("jobs")
    cancelled: list[str] = []

    def cancel_one_job(record):
        if not cancelled and len(result_names) >= 5:
            job_id = record.worker["slurm_job_id"]
            subprocess.run(["scancel", job_id], check=True, timeout=30)
            cancelled.append(job_id)
        result_names.append(record.name)

    result_names: list[str] = []
    # Adaptive scaling replaces a lost job once Dask declares its worker lost.
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1s"}):
        result = pyhf_dist.map_fits(erjr_pallet, executor="slurm", adapt=(2, 2), patches=erjr_sample_names,
                                    backend="numpy", callback=cancel_one_job, **options)
    assert cancelled
    names = [record.name for record in result]
    assert len(names) == len(set(names)) == len(erjr_sample_names), "patches lost or duplicated"
    assert_matches_reference(result, erjr_sample_reference)
    jobs = {record.worker["slurm_job_id"] for record in result}
    assert cancelled[0] in jobs and len(jobs) >= 2
    _assert_no_jobs_left(options["job_name"])


@pytest.mark.slurm
@requires_slurm
def test_failed_scan_leaves_no_jobs(erjr_pallet, slurm_options):
    class Boom(Exception):
        pass

    def fail(record):
        raise Boom("the caller's callback failed")

    with pytest.raises(Boom):
        pyhf_dist.map_fits(erjr_pallet, executor="slurm", backend="numpy", callback=fail, **slurm_options)
    _assert_no_jobs_left(slurm_options["job_name"])


@pytest.mark.slurm
@requires_slurm
def test_sigint_interrupted_cli_scan_leaves_no_jobs(erjr_dir, slurm_options, tmp_path):
    job_name = slurm_options["job_name"]
    command = [
        # A shell that started us in the background may have left SIGINT ignored: restore Ctrl-C.
        sys.executable, "-c", "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from pyhf_dist.cli import main; sys.exit(main())",
        "fit", str(erjr_dir), "--executor", "slurm", "--backend", "numpy", "--jobs", "2", "--cores", "1",
        "--memory", "1GB", "--walltime", "00:10:00", "-o", str(tmp_path / "results.json"), "-q",
        "--option", "interface=lo", "--option", f"job_name={job_name}",
        "--option", f"log_directory={slurm_options['log_directory']}",
    ]
    process = subprocess.Popen(command, cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Interrupt once the jobs run and fits have started coming back.
        deadline = time.monotonic() + 120
        journal = tmp_path / "results.journal.jsonl"
        while time.monotonic() < deadline and process.poll() is None:
            running = _our_jobs(job_name, states="RUNNING")
            if len(running) == 2 and journal.exists() and journal.read_text().count("\n") >= 3:
                break
            time.sleep(0.3)
        assert process.poll() is None, f"scan ended before it could be interrupted: {process.communicate()}"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "Interrupted" in stderr
    _assert_no_jobs_left(job_name)


@pytest.mark.slurm
@requires_slurm
def test_ctrl_c_while_sbatch_submits_a_job_stops_the_scan_as_interrupted(erjr_dir, slurm_options, tmp_path):
    """A Ctrl-C at the terminal signals its whole process group, sbatch included when it runs: the
    scan still stops as interrupted (130, one message, no traceback) and leaves no job behind."""
    job_name = slurm_options["job_name"]
    submitting = tmp_path / "submitting"
    # An sbatch that holds each real submission for a while, so that the Ctrl-C lands while it runs.
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    (wrappers / "sbatch").write_text(
        f'#!/bin/sh\ncase "$1" in --test-only) ;; *) touch {submitting}; sleep 3 ;; esac\n'
        f'exec {shutil.which("sbatch")} "$@"\n')
    (wrappers / "sbatch").chmod(0o755)
    command = [sys.executable, "-m", "pyhf_dist", "fit", str(erjr_dir), "--executor", "slurm", "--backend", "numpy",
               "--jobs", "1", "--cores", "1", "--memory", "1GB", "-o", str(tmp_path / "results.json"), "-q",
               "--option", "interface=lo", "--option", f"job_name={job_name}",
               "--option", f"log_directory={slurm_options['log_directory']}"]
    environment = {**os.environ, "PATH": f"{wrappers}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen(command, cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=environment, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not submitting.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert submitting.exists(), f"no job was submitted: {process.communicate()}"
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    assert "Interrupted" in stderr and "Traceback" not in stderr, stderr
    _assert_no_jobs_left(job_name)


@pytest.mark.slurm
@requires_slurm
def test_a_job_slurm_refuses_fails_the_scan_at_once_in_one_line(erjr_pallet, slurm_options):
    options = dict(slurm_options, queue="no-such-partition")
    started = time.monotonic()
    with pytest.raises(ExecutorError) as error:
        pyhf_dist.map_fits(erjr_pallet, executor="slurm", backend="numpy", **options)
    assert time.monotonic() - started < 30
    assert "no-such-partition" in str(error.value) or "partition" in str(error.value)
    assert "\n" not in str(error.value)
    assert not _our_jobs(slurm_options["job_name"])


# --- the settings of the clusters pyhf-dist starts ---------------------------------------------------


def test_job_script_exports_our_dask_settings_before_the_sites_prologue(monkeypatch):
    from pyhf_dist.executors.dask import TUNING

    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "XLA_FLAGS"):
        monkeypatch.delenv(name, raising=False)

    script = get_executor("slurm", job_script_prologue=["module load python"]).job_script()
    lines = script.splitlines()
    exports = [line for line in lines if line.startswith("export DASK_")]
    assert len(exports) == len(TUNING)
    assert "export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False" in exports
    # The site's lines come after ours, so that they can change them.
    assert lines.index(exports[-1]) < lines.index("module load python")
    # One thread per numerical library, also before the site's lines.
    for line in ("export OMP_NUM_THREADS=1", "export OPENBLAS_NUM_THREADS=1",
                 "export XLA_FLAGS='--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'"):
        assert lines.index(line) < lines.index("module load python")
    # A limit the job inherits from the submitting shell is the user's: kept.
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert "OMP_NUM_THREADS" not in get_executor("slurm").job_script()
    # A value the user set in their Dask config is theirs: not exported, not overridden.
    with dask.config.set({"distributed.admin.tick.interval": "50ms"}):
        script = get_executor("slurm").job_script()
    assert "TICK__INTERVAL" not in script and "PROFILE__ENABLED=False" in script


def test_one_worker_per_job_runs_without_a_nanny_unless_asked():
    assert "--no-nanny" in get_executor("slurm").job_script()
    assert "--nanny " in get_executor("slurm", nanny=True).job_script()
    with dask.config.set({"jobqueue.slurm.nanny": True}):  # the site's choice is kept
        assert "--nanny " in get_executor("slurm").job_script()
    # Several workers in one job are started by Nannies: Dask's command line has no other way.
    assert "--nanny " in get_executor("slurm", cores=2).job_script()
    with pytest.raises(ExecutorOptionError, match="nanny=False needs one worker process per job"):
        get_executor("slurm", cores=2, nanny=False)


@pytest.mark.slurm
@requires_slurm
def test_our_dask_settings_reach_the_workers_in_slurm_jobs(erjr_pallet, slurm_options, monkeypatch):
    from pyhf_dist.executors.dask import TUNING
    from pyhf_dist.settings import FitSettings

    # What a Dask Nanny started earlier in this process leaves behind; jobs inherit our environment.
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    inside = lambda: {  # noqa: E731  (a lambda: pickled by value, no test module needed on workers)
        "MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
        "config": {key: __import__("dask").config.get(key, default=None) for key in TUNING},
        "frozen": __import__("gc").get_freeze_count(),
        "job": os.environ.get("SLURM_JOB_ID"),
        "threads": {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
        "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
        "nanny": __import__("distributed").get_worker().nanny,
    }
    context = WorkerContext.build(erjr_pallet.workspace, FitSettings(backend="numpy").to_dict())
    config_before = {key: dask.config.get(key, default=None) for key in TUNING}
    with get_executor("slurm", **slurm_options) as executor:
        executor.start(context)
        executor.client.wait_for_workers(2, timeout=120)
        workers = sorted(executor.client.scheduler_info()["workers"])
        facts = [executor.client.submit(inside, workers=[address], pure=False).result() for address in workers]
    assert {key: dask.config.get(key, default=None) for key in TUNING} == config_before
    assert len({f["job"] for f in facts}) == 2 and None not in {f["job"] for f in facts}
    for f in facts:
        assert f["MALLOC_TRIM_THRESHOLD_"] is None
        assert f["config"] == TUNING
        assert f["frozen"] > 0
        assert f["threads"] == {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        assert "--xla_cpu_multi_thread_eigen=false" in f["XLA_FLAGS"]
        assert f["nanny"] is None  # the job runs the worker itself
    _assert_no_jobs_left(slurm_options["job_name"])


@pytest.mark.slurm
@requires_slurm
def test_a_worker_killed_inside_its_job_is_replaced_by_a_new_job(erjr_pallet, erjr_reference, slurm_options, caplog):
    """The job's only process is the worker: when it dies, the job ends, and a fixed-size scan
    submits a new one in its place (there is no Nanny to restart it). Its worker had joined (it
    fitted): the job is not reported as one that ended before its worker joined."""
    names = [patch.name for patch in erjr_pallet.patches[:12]]
    options = dict(slurm_options, jobs=1)
    killed: list[dict] = []

    def kill_the_worker(record):
        if not killed and len(seen) >= 1:  # soon after it joined
            os.kill(record.worker["pid"], signal.SIGKILL)
            killed.append(record.worker)
        seen.append(record.name)

    seen: list[str] = []
    # Dask waits lost-worker-timeout (15 s by default) for a lost worker to come back.
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1s"}):
        result = pyhf_dist.map_fits(erjr_pallet, executor="slurm", patches=names, backend="numpy",
                                    callback=kill_the_worker, **options)
    assert killed
    assert sorted(record.name for record in result) == sorted(names)
    assert_matches_reference(result, {name: erjr_reference[name] for name in names})
    jobs = {record.worker["slurm_job_id"] for record in result}
    assert killed[0]["slurm_job_id"] in jobs and len(jobs) == 2
    assert "ended before its worker joined" not in caplog.text
    _assert_no_jobs_left(options["job_name"])


@pytest.mark.slurm
@requires_slurm
def test_a_job_that_ends_before_its_worker_joins_is_replaced(erjr_pallet, erjr_reference, slurm_options, tmp_path,
                                                             caplog):
    """A job that ends before its worker ever joined (killed as it starts, a node that fails) is
    invisible to Dask, which would count it as running forever: the scan submits another instead."""
    names = [patch.name for patch in erjr_pallet.patches[:4]]
    marker = tmp_path / "first-job-ended"
    # The first job to run ends before it starts its worker; the jobs after it run as usual.
    options = dict(slurm_options, jobs=1, job_script_prologue=[f"if mkdir {marker} 2>/dev/null; then exit 1; fi"])
    with caplog.at_level("WARNING", logger="pyhf_dist"):
        result = pyhf_dist.map_fits(erjr_pallet, executor="slurm", patches=names, backend="numpy", **options)
    assert marker.is_dir()
    assert_matches_reference(result, {name: erjr_reference[name] for name in names})
    notes = [record.getMessage() for record in caplog.records if "ended before its worker joined" in record.getMessage()]
    assert len(notes) == 1, caplog.text
    first_job = notes[0].split()[2]
    (job,) = {record.worker["slurm_job_id"] for record in result}
    assert job != first_job
    _assert_no_jobs_left(options["job_name"])


@pytest.mark.slurm
@requires_slurm
def test_jobs_that_never_start_a_worker_fail_the_scan_in_one_line(erjr_pallet, slurm_options):
    """Where no job can start its worker (here every job exits at once), the scan stops after a few
    replacements and says where the last job's output is, instead of waiting forever."""
    options = dict(slurm_options, jobs=1, job_script_prologue=["echo 'module: command not found' >&2; exit 3"])
    began = time.monotonic()
    result = pyhf_dist.map_fits(erjr_pallet, executor="slurm", patches=["ERJR_100p0_20p0"], backend="numpy",
                                retries=0, **options)
    assert time.monotonic() - began < 120
    (record,) = result.records
    assert record.status == "failed" and "Slurm jobs ended before their Dask worker joined" in record.error, record
    error_file = record.error.split(" is in ")[1].split(" (and")[0].replace(".out", ".err")
    assert "module: command not found" in open(error_file).read()
    _assert_no_jobs_left(options["job_name"])
