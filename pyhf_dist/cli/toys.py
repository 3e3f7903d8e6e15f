"""``pyhf-dist merge-toys``: merge the toy files of runs with different seeds (``fit --keep-toys``)."""

from __future__ import annotations

import click

__all__ = ["merge_toys"]


@click.command("merge-toys")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The merged .npz file.")
def merge_toys(files, output):
    """Merge kept toy FILES (pyhf-dist fit --toys N --seed S --keep-toys FILE) into one file, and print
    each patch's CLs from all their toys.

    Toys of one seed found in several files are kept once; files of other test settings are refused.
    """
    from pathlib import Path

    from pyhf_dist.exceptions import InputError, StorageError
    from pyhf_dist.journal import describe_errno
    from pyhf_dist.kept_toys import merge_kept

    if not str(output).endswith(".npz"):
        raise InputError(f"merge-toys writes a .npz file, not {output!r}")
    if not Path(output).parent.is_dir():
        raise InputError(f"merge-toys: no folder {str(Path(output).parent)!r} to write {Path(output).name} in")
    try:
        results = merge_kept(list(files), output)
    except OSError as error:  # the machine's fault (a full disk...), not the files': they are unchanged
        raise StorageError(
            f"cannot write the merged toys {output}: {describe_errno(error)}; {StorageError.remedy_for(error.errno)}, "
            "then run merge-toys again (the files merged are unchanged)", path=output, errno=error.errno,
        ) from None
    for name, result in results.items():
        expected = ", ".join(f"{value:.4g}" for value in result["CLs_exp"])
        click.echo(f"{name}: {result['ntoys']} toys per hypothesis (seeds {result['seeds']}), "
                   f"CLs_obs {result['CLs_obs']:.4g}, CLs_exp [{expected}]")
    click.echo(f"Merged toys written to {output}")
