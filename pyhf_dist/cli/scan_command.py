"""``pyhf-dist fit``: fit the patches of a pallet and write the results.

Its options are derived from the declarations of the scan's options
(:mod:`pyhf_dist.scan.options`, :class:`~pyhf_dist.settings.FitSettings`) and, for the executor
chosen with ``--executor``, from that executor's :attr:`~pyhf_dist.executors.base.Executor.flags`
(``pyhf-dist fit --executor slurm --help`` lists Slurm's).
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import warnings
from pathlib import Path

import click

from pyhf_dist.exceptions import (
    MissingDependencyError,
    OutputError,
    StorageError,
    StorageWarning,
)
from pyhf_dist.executors import executor_flags
from pyhf_dist.records import is_stream
from pyhf_dist.scan.options import ScanOptions
from pyhf_dist.settings import PATH, FitSettings, declared

__all__ = ["fit", "check_output", "print_table", "silence_stdout"]

#: What a results file may end with (anything else is refused: it would be JSON under another name).
RESULT_SUFFIXES = (".json", ".csv", ".parquet")


def check_output(path: str | os.PathLike) -> None:
    """Fail now, before any fit, if ``path`` cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output {path} is a directory: give a file name, e.g. {path / 'results.json'}")
    if is_stream(path):  # written in place (no file beside it): only the device or pipe must take it
        if not os.access(path, os.W_OK):
            raise OutputError(f"cannot write {path}: permission denied")
        return
    if path.suffix.lower() not in RESULT_SUFFIXES:
        raise OutputError(f"output {path}: results are written as .json, .csv or .parquet; give the file one of "
                          f"these endings, e.g. {path.with_suffix('.json')}")
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


def check_journal(journal: Path, output: str | os.PathLike) -> None:
    """Fail now if the journal is the results file itself: writing the results would replace it,
    and a finished scan removes its journal."""
    from pyhf_dist.journal import journal_path_for

    if os.path.realpath(journal) == os.path.realpath(output):
        raise OutputError(f"--journal {journal} is the results file (-o) itself: give the journal another name, "
                          f"e.g. {journal_path_for(output)}")


def _check_compile_cache() -> None:
    """Say once, here, that the compile cache cannot be used, and keep the workers off it.

    Workers started on this machine inherit the environment: with the cache off they compile in
    memory without each saying so again. (Workers elsewhere check their own cache.)
    """
    from pyhf_dist import cache
    from pyhf_dist.runtime.fast.likelihood import CACHE_ENV

    directory = os.environ.get(CACHE_ENV)
    if not directory:
        folder = cache.directory("jax")  # None: off, or a cache that cannot be used (said once, here)
        if folder is None:
            os.environ[CACHE_ENV] = "off"
            return
        directory = str(folder)
    if directory.lower() == "off":
        return
    reason = cache.usable(directory)
    if reason:
        click.echo(f"Note: compile cache {directory} unusable ({reason}): compiling in memory instead", err=True)
        os.environ[CACHE_ENV] = "off"


def print_table(result, points: bool = False, err: bool = False) -> None:
    """Print per-point results (optional) and the summary table (``err``: on standard error)."""
    if points:
        labels = result.metadata.get("labels") or []
        head = "".join(f"{label:>10}" for label in labels)
        click.echo(f"{'patch':<24}{head}{'CLs_obs':>12}{'CLs_exp':>12}  status", err=err)
        for record in result:
            values = "".join(f"{value:>10g}" for value in record.values)
            observed = f"{record.CLs_obs:12.4g}" if record.CLs_obs is not None else f"{'-':>12}"
            expected = f"{record.CLs_exp[2]:12.4g}" if record.CLs_exp else f"{'-':>12}"
            excluded = record.excluded and not result.discovery  # a small p0 is an excess
            status = ("excluded" if excluded else "ok") if record.ok else f"FAILED: {record.error}"
            click.echo(f"{record.name:<24}{values}{observed}{expected}  {status}", err=err)
        click.echo("", err=err)
    click.echo(result.summary(), err=err)


def _parse_option(text: str) -> tuple[str, object]:
    import yaml

    if "=" not in text:
        raise click.BadParameter(f"{text!r} is not KEY=VALUE (e.g. --option log_directory=logs)")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), yaml.safe_load(value)


def _click_type(kind):
    """The click type of a declared option's or an executor flag's ``type``."""
    if kind == PATH:
        return click.Path(dir_okay=False)
    if kind == "file":
        return click.Path(exists=True, dir_okay=False)
    if isinstance(kind, tuple):
        return click.Choice([str(choice) for choice in kind])
    return kind


def _declared_options() -> list[click.Option]:
    """One click option per declared scan option or fit setting that has a flag."""
    options = []
    for cls in (FitSettings, ScanOptions):
        for field in declared(cls):
            flag = field.metadata["flag"]
            if flag is None:
                continue
            kwargs = dict(flag.click)
            kwargs.setdefault("help", field.metadata["help"])
            if "type" in kwargs:
                kwargs["type"] = _click_type(kwargs["type"])
            kwargs.setdefault("default", field.default if kwargs.get("show_default") else None)
            options.append(click.Option([*flag.flags, field.name], **kwargs))
    return options


def _scan_options(values: dict) -> dict:
    """The map_fits options of the parsed declared flags (``values`` loses them)."""
    options: dict = {}
    for cls in (FitSettings, ScanOptions):
        for field in declared(cls):
            flag = field.metadata["flag"]
            if flag is None:
                continue
            value = values.pop(field.name)
            if flag.to_options is not None:
                options.update(flag.to_options(value))
            elif value is not None:
                options[field.name] = value
    return options


class _ExecutorFlag(click.Option):
    """A flag an executor declares (:class:`~pyhf_dist.executors.base.ExecutorFlag`)."""

    def __init__(self, declared_flag):
        self.declared_flag = declared_flag
        flag = declared_flag.flag or "--" + declared_flag.name.replace("_", "-")
        kind = declared_flag.type
        super().__init__([flag, declared_flag.name], help=declared_flag.help, is_flag=declared_flag.is_flag,
                         type=None if declared_flag.is_flag else _click_type(kind), default=None)

    def value_of(self, text):
        kind = self.declared_flag.type
        return type(kind[0])(text) if isinstance(kind, tuple) and text is not None else text


def _executor_named(args: list[str]) -> str:
    for index, arg in enumerate(args):
        if arg == "--executor" and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith("--executor="):
            return arg.split("=", 1)[1]
    return "local"


class _FitCommand(click.Command):
    """``pyhf-dist fit``, with the flags of the executor ``--executor`` names."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            flags = executor_flags(_executor_named(args))
        except MissingDependencyError:
            flags = ()  # the scan says which package to install, in one line
        self.params = [param for param in self.params if not isinstance(param, _ExecutorFlag)]
        self.params[-1:-1] = [_ExecutorFlag(flag) for flag in flags]
        return super().parse_args(ctx, args)


def fit_parameters() -> list[click.Parameter]:
    """The parameters of ``pyhf-dist fit`` before its executor's flags."""
    return [
        click.Argument(["source"]),
        click.Option(["--patchset"], help="Patches for a BkgOnly.json SOURCE: patchset.json or a directory of patch files."),
        click.Option(["--executor"], default="local", show_default=True,
                     help="local, sequential, dask, slurm, funcx (globus-compute) or parsl; "
                          "`--executor NAME --help` lists its options."),
        *_declared_options(),
        click.Option(["-o", "--output"], default="results.json", show_default=True, type=click.Path(),
                     help="Results file (.json, or .csv or .parquet for a table)."),
        click.Option(["--show-job-script"], is_flag=True, help="Print the batch script of a batch executor and exit."),
        click.Option(["--option", "extra_options"], multiple=True, metavar="KEY=VALUE",
                     help="Any other executor keyword argument (repeatable), "
                          "e.g. --executor slurm --option log_directory=logs."),
        click.Option(["-q", "--quiet"], is_flag=True, help="No progress bar."),
    ]


@click.pass_context
def _fit(context: click.Context, source, patchset, executor, output, show_job_script, extra_options, quiet, **values):
    """Fit the signal patches of SOURCE and write the results.

    SOURCE is a pallet (a HEPData .tar.gz, a directory with BkgOnly.json and patchset.json or
    patch.<name>.json files, or a HEPData DOI), or a BkgOnly.json given with --patchset or
    --signals. A SOURCE that holds several pallets (one per folder) needs --pallet.
    """
    from pyhf_dist.journal import journal_path_for

    executor_options = {param.name: param.value_of(values.pop(param.name)) for param in context.command.params
                        if isinstance(param, _ExecutorFlag)}
    # Identity, not equality: a switch left off is False, but a number 0 (``--workers 0``) is given
    # and goes to the executor, which refuses it in one line rather than using its default.
    executor_options = {name: value for name, value in executor_options.items()
                        if value is not None and value is not False}
    given = {key: f"--{key.replace('_', '-')} {value}" for key, value in executor_options.items()}
    for text in extra_options:
        key, value = _parse_option(text)
        if key in executor_options and executor_options[key] != value:
            raise click.BadParameter(f"{key} is given twice, as {given[key]} and --option {text.strip()}: give it once",
                                     param_hint="--option")
        executor_options[key], given[key] = value, f"--option {text.strip()}"
    if show_job_script:
        from pyhf_dist.executors import get_executor

        click.echo(get_executor(executor, **executor_options).job_script())
        return
    if context.get_parameter_source("seed") is click.core.ParameterSource.COMMANDLINE and values.get("ntoys") is None:
        raise click.BadParameter("--seed seeds the toys of --toys N: add --toys, or drop --seed", param_hint="--seed")
    options = _scan_options(values)
    check_output(output)
    if options.get("backend") != "numpy":
        _check_compile_cache()
    journal_path = Path(options.get("journal") or journal_path_for(output))
    check_journal(journal_path, output)
    options["journal"] = journal_path
    if options.get("resume") and not journal_path.exists():
        click.echo(f"No journal at {journal_path}: starting from the beginning.", err=True)
    resume_command = " ".join(shlex.quote(arg) for arg in ["pyhf-dist", *sys.argv[1:]] if arg != "--resume")
    result = _run(source, patchset, executor, options, executor_options, quiet, journal_path, resume_command)
    _write(result, output, journal_path, resume_command)


fit = _FitCommand("fit", callback=_fit, params=fit_parameters(), help=_fit.__doc__,
                  context_settings={"max_content_width": 100})


def _started(metadata: dict) -> None:
    where = metadata.get("executor")
    fitted = metadata.get("pallets")
    todo = metadata["patches"] - metadata["resumed"]
    click.echo(
        f"Fitting {todo} patch{'' if todo == 1 else 'es'}"
        + (f" of {len(fitted)} pallets ({', '.join(f'{name} {count}' for name, count in fitted.items())})"
           if fitted and len(fitted) > 1 else f" of pallet {next(iter(fitted))}" if fitted else "")
        + (f" ({metadata['resumed']} already in the journal)" if metadata["resumed"] else "")
        + (f" ({metadata['toys_resumed']:,} toys of each hypothesis already in the journal)"
           if metadata.get("toys_resumed") else "")
        + f" on {where} with {metadata.get('workers')} worker{'' if metadata.get('workers') == 1 else 's'}, "
          f"backend {metadata['settings']['backend']}",
        err=True,
    )
    if metadata.get("dashboard"):
        click.echo(f"Dask dashboard: {metadata['dashboard']}", err=True)
    if metadata.get("advice"):
        click.echo(f"Note: {metadata['advice']}", err=True)
    settings = metadata["settings"]
    if settings.get("optimizer") == "minuit" and settings.get("backend") == "jax":
        click.echo("Note: --optimizer minuit is plain pyhf's minimizer: it fits the patches the fast path declines; "
                   "for every patch add --backend numpy (the fast path runs L-BFGS-B, and MINUIT where a fit needs it)",
                   err=True)
    if settings.get("calctype") == "toybased" and settings["ntoys"] < FEW_TOYS:
        click.echo(f"Note: {_toy_precision(settings['ntoys'])}", err=True)


#: Toys per hypothesis below which the command line tells how coarse a CLs near 0.05 is.
FEW_TOYS = 1000


def _toy_precision(ntoys: int) -> str:
    """How precisely ``ntoys`` toys per hypothesis fix a CLs near 0.05.

    There CLs_b is about 0.5, so CLs_s+b is about 0.025: about ``0.025 * ntoys`` toys decide it,
    with a binomial relative error of ``1 / sqrt(0.025 * ntoys)``.

    >>> for part in _toy_precision(100).split("; "):
    ...     print(part)
    100 toys per hypothesis: a CLs near 0.05 rests on about 2.5 toys, a statistical error of about 63% of itself
    1,000 toys give 20%, 10,000 give 6%
    """
    tail = 0.025 * ntoys
    toys = f"{ntoys:,} toy{'s' * (ntoys != 1)} per hypothesis"
    better = "1,000 toys give 20%, 10,000 give 6%"
    if tail < 1:
        return (f"{toys}: less than one is expected in the tail that decides a CLs near 0.05, so CLs cannot tell an "
                f"exclusion; {better}")
    return (f"{toys}: a CLs near 0.05 rests on about {tail:.2g} toy{'s' * (tail != 1)}, a statistical error of about "
            f"{tail**-0.5:.0%} of itself; {better}")


def silence_stdout() -> None:
    """Send what is left for standard output nowhere: its reader is gone (a closed pipe), and
    Python's own flush at exit would fail on it once more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _holds_anything(journal: Path) -> bool:
    """Whether the journal holds something a resumed scan keeps (it may not exist yet)."""
    try:
        return journal.stat().st_size > 0
    except OSError:
        return False


def _run(source, patchset, executor, options, executor_options, quiet, journal_path, resume_command):
    """The scan, with its interruptions and storage faults told in one line and what continues it."""
    import pyhf_dist

    try:
        with warnings.catch_warnings():
            # Told below in one line with what to do (_write), not as a Python warning.
            warnings.simplefilter("ignore", StorageWarning)
            return pyhf_dist.map_fits(source, patchset, executor=executor, progress=not quiet, on_start=_started,
                                      **options, **executor_options)
    except KeyboardInterrupt:
        if _holds_anything(journal_path):
            click.echo(f"\nInterrupted. Finished results are kept in {journal_path}; to fit the rest run:\n"
                       f"  {resume_command} --resume", err=True)
        else:
            click.echo("\nInterrupted before any fit finished: nothing to keep; run the same command to start again.",
                       err=True)
        raise click.exceptions.Exit(130) from None
    except StorageError as error:
        # The machine's fault, not the user's input: one line, what was kept, the command that continues.
        go_on = (f"{error.remedy}, then run: {resume_command} --resume" if error.kept
                 else f"{error.remedy}, then run: {resume_command}")
        click.echo(f"\nError: {error}; {go_on}", err=True)
        raise click.exceptions.Exit(1) from None


def _write(result, output, journal_path: Path, resume_command: str) -> None:
    """Write the results file, drop the journal when nothing failed, and print the summary."""
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

        click.echo(
            f"\nError: cannot write the results {output}: {describe_errno(error)}; all {len(result)} records are kept "
            f"in {journal_path}; {StorageError.remedy_for(error.errno)}, then run: {resume_command} --resume "
            "(it fits nothing again)",
            err=True,
        )
        raise click.exceptions.Exit(1) from None
    unkept = result.metadata.get("keep_toys_error")
    if not result.failed() and not unkept:
        journal_path.unlink(missing_ok=True)
    # Results written into a pipe or a device (-o /dev/stdout) keep standard output to themselves.
    streamed = is_stream(output)
    try:
        print_table(result, err=streamed)
        click.echo(f"Results written to {output}", err=streamed)
    except BrokenPipeError:  # its reader stopped early (| head): the results are written all the same
        silence_stdout()
    if result.failed():
        click.echo(
            f"{len(result.failed())} fits failed (see 'error' in the results); "
            f"'{resume_command} --resume' refits only those.",
            err=True,
        )
    if unkept:
        remedy = StorageError.remedy_for(result.metadata.get("keep_toys_errno"))
        click.echo(
            f"Error: {unkept}; the toys are kept in {journal_path}; {remedy}, then run: {resume_command} "
            "--resume (it fits nothing again)",
            err=True,
        )
        raise click.exceptions.Exit(1)
