"""``pyhf-dist fit``: fit the patches of a pallet and write the results."""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from pathlib import Path

import click

from pyhf_dist.exceptions import OutputError, StorageError

__all__ = ["fit", "check_output", "print_table"]


def check_output(path: str | os.PathLike) -> None:
    """Fail now, before any fit, if ``path`` cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output {path} is a directory: give a file name, e.g. {path / 'results.json'}")
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise OutputError(f"cannot write {path}: directory {directory} does not exist (create it first)")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".pyhf-dist-check-"):
            pass
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror} in {directory}") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"cannot write {path}: the file is read-only")


def _check_compile_cache() -> None:
    """Say once, here, that the compile cache cannot be used, and keep the workers off it.

    Workers started on this machine inherit the environment: with the cache off they compile in
    memory without each saying so again. (Workers elsewhere check their own cache.)
    """
    from pyhf_dist import cache
    from pyhf_dist.fast.likelihood import CACHE_ENV

    base = cache.root()
    directory = os.environ.get(CACHE_ENV) or (str(base / "jax") if base is not None else "off")
    if directory.lower() == "off":
        return
    reason = cache.usable(directory)
    if reason:
        click.echo(f"Note: compile cache {directory} unusable ({reason}): compiling in memory instead", err=True)
        os.environ[CACHE_ENV] = "off"


def print_table(result, points: bool = False) -> None:
    """Print per-point results (optional) and the summary table."""
    if points:
        labels = result.metadata.get("labels") or []
        head = "".join(f"{label:>10}" for label in labels)
        click.echo(f"{'patch':<24}{head}{'CLs_obs':>12}{'CLs_exp':>12}  status")
        for record in result:
            values = "".join(f"{value:>10g}" for value in record.values)
            observed = f"{record.CLs_obs:12.4g}" if record.CLs_obs is not None else f"{'-':>12}"
            expected = f"{record.CLs_exp[2]:12.4g}" if record.CLs_exp else f"{'-':>12}"
            status = ("excluded" if record.excluded else "ok") if record.ok else f"FAILED: {record.error}"
            click.echo(f"{record.name:<24}{values}{observed}{expected}  {status}")
        click.echo("")
    click.echo(result.summary())


def _calculation_options(upper_limit: bool, scan_grid: str | None, toys: int | None, seed: int) -> dict:
    """The map_fits arguments of --upper-limit, --scan, --toys and --seed."""
    options: dict = {}
    if upper_limit:
        options["calculation"] = "upper_limit"
    if scan_grid is not None:
        if not upper_limit:
            raise click.UsageError("--scan goes with --upper-limit")
        parts = scan_grid.split(",")
        try:
            start, stop, points = float(parts[0]), float(parts[1]), int(parts[2])
        except (ValueError, IndexError):
            raise click.BadParameter(f"{scan_grid!r} is not START,STOP,N (e.g. --scan 0,5,21)") from None
        options["upper_limit_scan"] = (start, stop, points)
    if toys is not None:
        options.update(calctype="toybased", ntoys=toys, seed=seed)
    return options


def _parse_option(text: str) -> tuple[str, object]:
    import yaml

    if "=" not in text:
        raise click.BadParameter(f"{text!r} is not KEY=VALUE (e.g. --option processes=2)")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), yaml.safe_load(value)


@click.command(context_settings={"max_content_width": 100})
@click.argument("source")
@click.option("--patchset", help="Patches for a BkgOnly.json SOURCE: patchset.json or a directory of patch files.")
@click.option("--signals", type=click.Path(dir_okay=False),
              help="Signal points as data: a .csv or .parquet file, one row per point (name, parameters, yields per bin).")
@click.option("--template", help="With --signals: how a row becomes a patch, a JSON file or JSON text (channels, sample, normsys, uncertainty).")
@click.option("-p", "--patch", "patches", multiple=True, help="Patch name or glob to fit (repeatable; default: all).")
@click.option("--pallet", "pallets", multiple=True, metavar="NAME",
              help="Pallet to fit in a SOURCE that holds several, e.g. Region-combined (repeatable, or 'all').")
@click.option("--combine", type=click.Choice(["best-expected"]),
              help="Also combine the pallets: per point, the one with the smallest median expected CLs.")
@click.option("--executor", default="local", show_default=True,
              help="local, sequential, dask, slurm, funcx (globus-compute) or parsl.")
@click.option("--workers", type=int, help="Number of workers (local, dask, parsl).")
@click.option("--backend", type=click.Choice(["numpy", "jax"]),
              help="numpy: plain pyhf; jax: compiled fast path (default when jax is installed).")
@click.option("--poi-test", default="1.0", show_default=True, help="Signal strength to test.")
@click.option("--test-stat", default="qtilde", show_default=True, help="qtilde, q or q0.")
@click.option("--interpcodes", default="code4,code4p", show_default=True,
              help="Interpolation codes for normsys,histosys.")
@click.option("--upper-limit", is_flag=True,
              help="Compute observed and expected 95% CL upper limits on mu instead of CLs at --poi-test.")
@click.option("--scan", "scan_grid", metavar="START,STOP,N",
              help="With --upper-limit: scan a grid of mu values instead of root-finding.")
@click.option("--toys", type=int, help="Use N pseudo-experiments per patch (split across workers) instead of asymptotics.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed of the pseudo-experiments.")
@click.option("--keep-toys", type=click.Path(dir_okay=False),
              help="With --toys: write the toy distributions to this .npz (merge runs with pyhf-dist merge-toys).")
@click.option("--require-fast", is_flag=True,
              help="Fail each patch the compiled fast path declines (saying why) instead of fitting it with pyhf.")
@click.option("--match-pyhf", is_flag=True,
              help="Reproduce pyhf's own numbers, stalled fits included, instead of certified converged fits.")
@click.option("--optimizer", type=click.Choice(["scipy", "minuit"]), default="scipy", show_default=True,
              help="Plain pyhf's minimizer (backend numpy, and patches the fast path declines).")
@click.option("-o", "--output", default="results.json", show_default=True, type=click.Path(),
              help="Results file (.json, or .csv or .parquet for a table).")
@click.option("--journal", type=click.Path(dir_okay=False),
              help="Journal of finished results [default: <output>.journal.jsonl beside the output].")
@click.option("--resume", is_flag=True,
              help="Skip the patches already fit successfully in the journal; failed ones are fit again.")
@click.option("--retries", default=2, show_default=True, type=int, help="Resubmissions of a task whose worker died.")
@click.option("--timeout", type=float, help="Seconds after which a single fit is recorded as failed.")
@click.option("--jobs", type=int, help="[slurm] Batch jobs to start.")
@click.option("--cores", type=int, help="[slurm] Cores per job.")
@click.option("--memory", help="[slurm] Memory per job, e.g. 2GB.")
@click.option("--walltime", help="[slurm] Wall time per job, e.g. 00:30:00.")
@click.option("--queue", help="[slurm] Partition.")
@click.option("--account", help="[slurm] Account to charge.")
@click.option("--cluster-config", type=click.Path(exists=True, dir_okay=False),
              help="[slurm] YAML file of further SLURMCluster arguments.")
@click.option("--show-job-script", is_flag=True, help="[slurm] Print the batch script and exit without fitting.")
@click.option("--address", help="[dask] Address of a running scheduler, e.g. tcp://host:8786.")
@click.option("--endpoint-id", help="[funcx] Globus Compute endpoint id [default: $GLOBUS_COMPUTE_ENDPOINT_ID].")
@click.option("--batch-size", type=int, help="[funcx] Most tasks per submission (lowered to stay under 10 MB).")
@click.option("--amqp-port", type=click.Choice(["443", "5671", "5672"]), help="[funcx] Port of the result stream.")
@click.option("--provider", type=click.Choice(["local", "slurm"]), help="[parsl] Where worker pools run.")
@click.option("--max-blocks", type=int, help="[parsl] Most blocks (batch jobs, or local worker pools).")
@click.option("--option", "extra_options", multiple=True, metavar="KEY=VALUE",
              help="Any other executor keyword argument (repeatable), e.g. --option processes=2.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def fit(source, patchset, signals, template, patches, pallets, combine, executor, workers, backend, poi_test, test_stat, interpcodes,
        upper_limit, scan_grid, toys, seed, keep_toys, require_fast, match_pyhf, optimizer, output,
        journal, resume, retries, timeout, jobs, cores, memory, walltime, queue, account, cluster_config,
        show_job_script, address, endpoint_id, batch_size, amqp_port, provider, max_blocks, extra_options, quiet):
    """Fit the signal patches of SOURCE and write the results.

    SOURCE is a pallet (a HEPData .tar.gz, a directory with BkgOnly.json and patchset.json or
    patch.<name>.json files, or a HEPData DOI), or a BkgOnly.json given with --patchset or --signals. A SOURCE
    that holds several pallets (one per folder) needs --pallet.
    """
    import pyhf_dist
    from pyhf_dist.executors import get_executor
    from pyhf_dist.journal import journal_path_for
    from pyhf_dist.settings import parse_interpcodes

    options = {
        name: value
        for name, value in dict(
            workers=workers, jobs=jobs, cores=cores, memory=memory, walltime=walltime, queue=queue,
            account=account, cluster_config=cluster_config, address=address, endpoint_id=endpoint_id,
            batch_size=batch_size, amqp_port=int(amqp_port) if amqp_port else None, provider=provider,
            max_blocks=max_blocks,
        ).items()
        if value is not None
    }
    options.update(_parse_option(text) for text in extra_options)
    if show_job_script:
        click.echo(get_executor(executor, **options).job_script())
        return
    modifier_settings = parse_interpcodes(interpcodes)
    calculation_options = _calculation_options(upper_limit, scan_grid, toys, seed)
    if require_fast:
        calculation_options["require_fast"] = True
    if match_pyhf:
        calculation_options["match_pyhf"] = True
    if optimizer != "scipy":
        calculation_options["optimizer"] = optimizer
    if signals is not None or template is not None:  # points as data (pyhf_dist.signals)
        calculation_options.update(signals=signals, template=template)
    check_output(output)
    if backend != "numpy":
        _check_compile_cache()
    journal_path = Path(journal) if journal else journal_path_for(output)
    if resume and not journal_path.exists():
        click.echo(f"No journal at {journal_path}: starting from the beginning.", err=True)
    resume_command = " ".join(shlex.quote(arg) for arg in ["pyhf-dist", *sys.argv[1:]] if arg != "--resume")

    def started(metadata: dict) -> None:
        where = metadata.get("executor")
        fitted = metadata.get("pallets")
        click.echo(
            f"Fitting {metadata['patches'] - metadata['resumed']} patches"
            + (f" of {len(fitted)} pallets ({', '.join(f'{name} {count}' for name, count in fitted.items())})"
               if fitted and len(fitted) > 1 else f" of pallet {next(iter(fitted))}" if fitted else "")
            + (f" ({metadata['resumed']} already in the journal)" if metadata["resumed"] else "")
            + f" on {where} with {metadata.get('workers')} workers, backend {metadata['settings']['backend']}",
            err=True,
        )
        if metadata.get("dashboard"):
            click.echo(f"Dask dashboard: {metadata['dashboard']}", err=True)
        if metadata.get("advice"):
            click.echo(f"Note: {metadata['advice']}", err=True)

    try:
        result = pyhf_dist.map_fits(
            source, patchset, executor=executor, patches=list(patches) or None,
            pallet=None if not pallets else pallets[0] if len(pallets) == 1 else list(pallets), combine=combine,
            poi_test=poi_test,
            test_stat=test_stat, backend=backend, modifier_settings=modifier_settings, journal=journal_path,
            resume=resume, retries=retries, timeout=timeout, progress=not quiet, on_start=started, keep_toys=keep_toys,
            **calculation_options, **options,
        )
    except KeyboardInterrupt:
        click.echo(
            f"\nInterrupted. Finished results are kept in {journal_path}; to fit the rest run:\n"
            f"  {resume_command} --resume",
            err=True,
        )
        raise click.exceptions.Exit(130) from None
    except StorageError as error:
        # The machine's fault, not the user's input: one line, what was kept, the command that continues.
        go_on = (f"{error.remedy}, then run: {resume_command} --resume" if error.kept
                 else f"{error.remedy}, then run: {resume_command}")
        click.echo(f"\nError: {error}; {go_on}", err=True)
        raise click.exceptions.Exit(1) from None
    try:
        if str(output).lower().endswith(".csv"):
            result.to_csv(output)
        elif str(output).lower().endswith(".parquet"):  # a table with the parameters as columns
            from pyhf_dist.signals.output import write_parquet

            write_parquet(result, output)
        else:
            result.to_json(output)
    except OSError as error:
        from pyhf_dist.journal import describe_errno

        fault = StorageError("", errno=error.errno)
        click.echo(
            f"\nError: cannot write the results {output}: {describe_errno(error)}; all {len(result)} records are kept "
            f"in {journal_path}; {fault.remedy}, then run: {resume_command} --resume (it fits nothing again)",
            err=True,
        )
        raise click.exceptions.Exit(1) from None
    if not result.failed():
        journal_path.unlink(missing_ok=True)
    print_table(result)
    click.echo(f"Results written to {output}")
    if result.failed():
        click.echo(
            f"{len(result.failed())} fits failed (see 'error' in the results); "
            f"'{resume_command} --resume' refits only those.",
            err=True,
        )
