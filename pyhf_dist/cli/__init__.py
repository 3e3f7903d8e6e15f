"""The ``pyhf-dist`` command.

Errors the user can fix are printed as one line (``Error: ...``) with exit code 2; a failure of
the executor exits with 1; an interrupted scan exits with 130 and says how to resume. ``--debug``
shows the full traceback instead.
"""

from __future__ import annotations

import signal
import sys

import click

from pyhf_dist.cli.demo import demo
from pyhf_dist.cli.scan_command import fit
from pyhf_dist.cli.toys import merge_toys

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pyhf-dist")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(context: click.Context, debug: bool) -> None:
    """Fit every signal hypothesis of an LHC likelihood pallet across many workers.

    \b
    Examples:
      pyhf-dist demo                                   # a built-in pallet, no data needed
      pyhf-dist fit 1Lbb-likelihoods-hepdata.tar.gz --workers 2 -o results.json
      pyhf-dist fit BkgOnly.json --patchset patchset.json -p 'C1N2_Wh_hbb_7*' --executor dask
    """
    context.obj = {"debug": debug}


cli.add_command(fit)
cli.add_command(demo)
cli.add_command(merge_toys)


def _register_optional_commands() -> None:
    # Commands whose modules need optional packages register themselves when importable; their
    # own imports of heavy libraries stay inside the command functions.
    try:
        from pyhf_dist.cli.plot import plot
    except ImportError:
        return
    cli.add_command(plot)


_register_optional_commands()


def _notes_on_stderr() -> None:
    """What the library notes on the way (a worker lost and its task resubmitted, journal lines
    skipped, a compile cache given up) as one ``Note:`` line each on standard error."""
    import logging

    from pyhf_dist.progress import NoteHandler

    logger = logging.getLogger("pyhf_dist")
    if not logger.handlers:
        handler = NoteHandler()
        handler.setFormatter(logging.Formatter("Note: %(message)s"))
        handler.setLevel(logging.WARNING)
        logger.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    from pyhf_dist.exceptions import InputError, PyhfDistError

    _notes_on_stderr()
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    # A batch system stops jobs with SIGTERM: treat it like Ctrl-C so that finished results stay
    # in the journal and started clusters are shut down.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # So is a closed terminal or a dropped ssh session (SIGHUP), unless the user chose to ignore it
    # (nohup).
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
        signal.signal(signal.SIGHUP, signal.default_int_handler)
    try:
        # Outside standalone mode click returns (not raises) the code of a ``ctx.exit``/``Exit``.
        code = cli.main(args=argv, prog_name="pyhf-dist", standalone_mode=False)
    except BrokenPipeError:  # standard output's reader stopped early (| head): nothing went wrong here
        from pyhf_dist.cli.scan_command import silence_stdout

        silence_stdout()
        return 0
    except click.exceptions.Abort:
        return _interrupted()
    except KeyboardInterrupt:
        return _interrupted()
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except click.exceptions.Exit as exit_:
        return exit_.exit_code
    except PyhfDistError as error:
        if debug:  # the whole traceback, and the exit code a script tells input errors by
            import traceback

            traceback.print_exc()
        click.echo(f"Error: {error}", err=True)
        return 2 if isinstance(error, InputError) else 1
    return code if isinstance(code, int) and not isinstance(code, bool) else 0


def _interrupted() -> int:
    click.echo("\nInterrupted.", err=True)
    return 130
