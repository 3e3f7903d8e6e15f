"""``pyhf-dist demo``: a real scan on a built-in pallet, no data and no cluster needed."""

from __future__ import annotations

import click

__all__ = ["demo"]


@click.command()
@click.option("--workers", type=int, default=None, help="Worker processes (default: the machine's cores).")
@click.option("--executor", default="local", show_default=True, help="Where to fit: local, sequential, dask, parsl...")
@click.option("--backend", type=click.Choice(["numpy", "jax"]), default=None,
              help="pyhf backend on the workers (default: jax when installed, else numpy).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Also write the results (JSON).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def demo(workers, executor, backend, output, quiet):
    """Fit the built-in demo pallet (28 signal points, 3 channels) and print the table.

    The pallet is built in code: a background with normsys, histosys, staterror and lumi
    uncertainties in two signal regions and a control region, and a grid of signal hypotheses
    in an (m1, m2) plane.
    """
    import pyhf_dist
    from pyhf_dist.cli.scan_command import check_output, print_table

    if output:
        check_output(output)
    pallet = pyhf_dist.demo_pallet()
    click.echo(f"Fitting {len(pallet)} signal points of the demo pallet on the {executor!r} executor...", err=True)
    options = {"workers": workers} if workers is not None else {}
    result = pyhf_dist.map_fits(pallet, executor=executor, backend=backend, progress=not quiet, **options)
    print_table(result, points=True)
    if output:
        result.to_json(output)
        click.echo(f"Results written to {output}")
