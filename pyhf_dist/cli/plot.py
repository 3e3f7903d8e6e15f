"""``pyhf-dist plot``: the exclusion plot of a results file."""

from __future__ import annotations

import click

__all__ = ["plot"]


@click.command()
@click.argument("results", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", "outputs", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="Figure to write, .png or .pdf (repeatable).")
@click.option("--pallet", metavar="NAME",
              help="Pallet to draw from results of several (e.g. Region-combined, or best-expected).")
@click.option("--title", help="Title above the plot.")
@click.option("--labels", help='Axis titles, "X,Y" [default: the pallet\'s labels].')
@click.option("--quantity", type=click.Choice(["auto", "CLs", "mu_up"]), default="auto", show_default=True,
              help="CLs = 0.05 contours, or mu_up = 1 from upper-limit results.")
@click.option("--no-points", is_flag=True, help="Do not mark the fitted points (failed ones always are).")
@click.option("--style", default="auto", show_default=True,
              help="auto (mplhep ATLAS style if installed), none, or an mplhep/matplotlib style name.")
@click.option("--dpi", type=int, default=150, show_default=True, help="Resolution of PNG output.")
def plot(results, outputs, pallet, title, labels, quantity, no_points, style, dpi):
    """Draw the exclusion contours of RESULTS (a pyhf-dist results .json, .csv or .parquet).

    The observed CLs = 0.05 contour, the expected contour with its ±1σ band, and the fitted
    points, in the plane of the patches' values. Results of several pallets need --pallet (a
    pallet's name, or best-expected for their combination). Needs pip install "pyhf-dist[plot]".
    """
    from pyhf_dist.plotting import plot_exclusion

    axis_titles = [part.strip() for part in labels.split(",")] if labels else None
    if axis_titles is not None and len(axis_titles) != 2:
        raise click.BadParameter('give two axis titles, e.g. --labels "m(C1/N2) [GeV],m(N1) [GeV]"')
    for output in outputs:
        plot_exclusion(results, output, pallet=pallet, title=title, labels=axis_titles, quantity=quantity,
                       show_points=not no_points, style=None if style == "none" else style, dpi=dpi)
        click.echo(f"Exclusion plot written to {output}")
