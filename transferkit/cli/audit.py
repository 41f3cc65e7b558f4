"""`audit`: duplicates, train/test leakage, likely label errors and outliers of a data set, from the command line."""

from __future__ import annotations

from pathlib import Path

import click

from transferkit.auditing.params import AUDIT, CV, NEAR_CANDIDATES, NEAR_THRESHOLD, NEIGHBORS, OUTLIER_MADS
from transferkit.cli import DataPath, cli, model_options
from transferkit.codes.params import EXTRACTOR
from transferkit.runtime.params import click_type  # the limits live in those tables (plain data: no torch)


@cli.command()
@click.argument("data", type=DataPath())
@click.option("--test", type=DataPath(min_classes=1), default=None,
              help="A test set (folder, CSV or IDX) to look for leaked copies of DATA's images in.")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Folder for report.html, duplicates.csv, label_issues.csv, outliers.csv and summary.json.")
@model_options(table=EXTRACTOR, precision="auto", help_precision="As for `transferkit extract`.")
@click.option("--layer", default="auto", show_default=True,
              help="Codes to audit on: 'auto' (the layer and pooling the sweep picks on DATA, as extract --layer "
                   "auto), pre_logits, or a stage index or name.")
@click.option("--pool", default="avg", show_default=True, help="Pooling of a named --layer's codes, as for extract.")
@click.option("--near-threshold", type=click_type(AUDIT["near_threshold"]), default=NEAR_THRESHOLD,
              show_default=True, help="Copy score (correlation of aligned 32 px grayscale thumbnails, best crop or "
              "blur) from which two images are near-duplicates.")
@click.option("--near-candidates", type=click_type(AUDIT["near_candidates"]), default=NEAR_CANDIDATES,
              show_default=True, help="Candidate near-duplicates per image: its nearest by codes and by thumbnails.")
@click.option("--neighbors", type=click_type(AUDIT["neighbors"]), default=NEIGHBORS, show_default=True,
              help="Nearest neighbours per image for the outlier score.")
@click.option("--outlier-mads", type=click_type(AUDIT["outlier_mads"]), default=OUTLIER_MADS, show_default=True,
              help="An outlier is farther from its class than the class's median + this many MADs.")
@click.option("--cv", type=click_type(AUDIT["cv"]), default=CV, show_default=True,
              help="Folds of the out-of-fold probabilities that label errors are found with.")
@click.option("--max-rows", type=click_type(AUDIT["max_rows"]), default=100, show_default=True,
              help="Rows per section of report.html (the CSV files list every finding).")
@click.option("--fix", type=click_type(AUDIT["fix"]), default=None,
              help="Also write OUT/cleaned.csv, a manifest of DATA without its duplicates and its images leaked into "
                   "TEST, its likely label errors dropped or given the suggested label (relabel). DATA is not touched.")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="Reuse codes of images already encoded the same way, and the result of the same sweep "
                   "(see `transferkit cache`).")
def audit(data: Path, test: Path | None, out: Path, model: str, weights: str, image_size: int | None,
          batch_size: int, precision: str, layer: str, pool: str, near_threshold: float, near_candidates: int,
          neighbors: int, outlier_mads: float, cv: int, max_rows: int, fix: str | None, cache: bool) -> None:
    """Find what is wrong with DATA (folder, CSV manifest or IDX): duplicates, images leaked into TEST, likely
    label errors and outliers, from its CNN codes. Writes OUT/report.html (self-contained) and CSV files."""
    from transferkit.codes.params import parse_pools
    from transferkit.models.vocabulary import refuse_early

    refuse_early(model, "layer", layer)  # before torch loads, as extract
    parse_pools(pool)
    from transferkit.auditing.run import audit as run_audit

    result = run_audit(data, out, test=test, model=model, weights=weights, layer=layer, pool=pool,
                       image_size=image_size, batch_size=batch_size, precision=precision,
                       near_threshold=near_threshold, near_candidates=near_candidates, neighbors=neighbors,
                       outlier_mads=outlier_mads, cv=cv, max_rows=max_rows, fix=fix, cache=cache,
                       progress=click.get_current_context().obj["progress"])
    s = result.summary
    d = s["duplicates"]
    noise = s["label_issues"]["noise"].get("estimated_noise_rate")
    click.echo(f"audit of {s['n_data']} images" + (f" and {s['n_test']} test images" if s["n_test"] else "")
               + f" on {s['codes']['key']}: {d['leakage']} leaked pair(s) ({d['exact_leakage']} exact), "
               f"{d['within']} duplicate pair(s) within a set, {s['label_issues']['flagged']} likely label error(s)"
               + (f" (estimated noise {100 * noise:.1f}%)" if noise is not None else "")
               + f", {s['outliers']['flagged']} outlier(s) -> {out / 'report.html'}")
    if fix is not None:
        f = s["fix"]
        click.echo(f"cleaned manifest: {f['kept']} of {f['images']} images kept, {f['relabelled']} relabelled "
                   f"-> {out / f['file']}")
