"""`neighbors`: the most similar images of a codes directory, from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import click

from transferkit.auditing.params import RETRIEVAL
from transferkit.cli import CodesPath, cli
from transferkit.codes.params import EXTRACTOR
from transferkit.runtime.params import click_type  # the limits live in those tables (plain data: no torch)


@cli.command()
@click.argument("features", type=CodesPath())
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...", type=click.Path(path_type=Path))
@click.option("-k", "k", type=click_type(RETRIEVAL["k"]), default=5, show_default=True,
              help="Most similar images listed per query image.")
@click.option("--layer", default=None,
              help="Which of FEATURES' codes to compare: a layer as `transferkit layers` names it (pre_logits, "
                   "blocks.4 or its index 5), or 'layer|pool'. Default: the layer sweep's pick if FEATURES was swept, "
                   "else its only kind of codes.")
@click.option("--batch-size", type=click_type(EXTRACTOR["batch_size"]), default=64, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per query image.")
def neighbors(features: Path, images: tuple[Path, ...], k: int, layer: str | None, batch_size: int,
              as_json: bool) -> None:
    """The K images of FEATURES (a codes directory from `transferkit extract`) most similar to each IMAGE (files
    or folders), by cosine similarity of codes made exactly as FEATURES' were. Prints each query, then one line
    per neighbour: similarity, label, source."""
    from transferkit.auditing.retrieval import neighbors as find_neighbors

    rows = find_neighbors(features, list(images), k=k, layer=layer, batch_size=batch_size,
                          progress=click.get_current_context().obj["progress"])
    for row in rows:
        if as_json:
            click.echo(json.dumps(row))
            continue
        click.echo(row["source"])
        for n in row["neighbors"]:
            click.echo(f"  {n['similarity']:.4f}\t{n['label']}\t{n['source']}")
