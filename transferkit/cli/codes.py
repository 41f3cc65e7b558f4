"""`extract`, `sweep` and `layers`: CNN codes from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import click

from transferkit.cli import DEFAULT_MODEL, DataPath, ModelName, cli, model_options
from transferkit.codes.params import EXTRACTOR
from transferkit.probe.params import AUTO_BALANCED_RATIO, PROBE, SELECT_CANDIDATES, SELECT_MAX_VIEWS
from transferkit.runtime.params import click_type  # the limits live in those tables (plain data: no torch)


@cli.command()
@click.argument("data", type=DataPath())
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Codes directory to write.")
@model_options(table=EXTRACTOR, precision="auto",
               help_precision="auto, on a CPU with ONNX Runtime: int8 there (quantized once, "
               "calibrated on fixed photo crops, checked against fp32) when its file is cached or the data is large "
               "enough to repay it, else fp32 there likewise, else bf16 in torch on CPUs with native bf16 "
               "(AVX512-BF16/AMX); fp16 autocast on CUDA. fp32 turns reduced precision off.")
@click.option("--layer", default="pre_logits", show_default=True,
              help="A stage index or name as `transferkit layers` lists them (the same as finetune "
                   "--freeze-until; not 'head': its pooled output is pre_logits), pre_logits, a comma list, 'all' "
                   "(the stages marked * and pre_logits), or 'auto' (those x every pooling, then a sweep picks the "
                   "best; with --combine greedy selection may add views to it).")
@click.option("--pool", default="avg", show_default=True,
              help="avg, max, avgmax (their mean), catavgmax (both, concatenated), a grid like 2x2 that keeps "
                   "location, a comma list, or 'all'.")
@click.option("--views", default=None,
              help="A combination of views, side by side: a comma list of layer|pool pairs as codes are named, e.g. "
                   "'blocks.2|4x4,blocks.4|catavgmax' (quoted: | is a pipe to the shell). Instead of --layer/--pool; "
                   "--layer auto may choose one itself.")
@click.option("--combine", is_flag=True,
              help="With --layer auto: after the sweep, greedy forward selection may join up to "
                   f"{SELECT_MAX_VIEWS - 1} more of its {SELECT_CANDIDATES} best views to the winner, each only if it "
                   "adds CV accuracy; the codes are then that combination (as --views would name it).")
@click.option("--per-class", type=click.IntRange(1), default=None, help="Keep the first N images of each class.")
@click.option("--num-workers", type=click_type(EXTRACTOR["num_workers"]), default=0, show_default=True,
              help="DataLoader workers.")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images, list them at the end and in meta.json.")
@click.option("--like", type=click.Path(exists=True, path_type=Path), default=None,
              help="Encode exactly like this codes directory (model, weights, size, best layer).")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="Reuse codes of images already encoded the same way (see `transferkit cache`).")
@click.option("--fold-bn/--no-fold-bn", default=True, show_default=True,
              help="Fold BatchNorm into the conv before it (checked against the unfolded output).")
@click.option("--engine", type=click_type(EXTRACTOR["engine"]), default="auto", show_default=True,
              help="What runs the network. auto: ONNX Runtime (exported once, cached, checked against torch) on CPU "
                   "when it is installed and the data is large enough to repay the export (see --precision), "
                   "else torch.")
@click.option("--exact-decode", is_flag=True,
              help="Decode every image in full. By default a JPEG decodes at the smallest DCT scale still at least "
                   "twice the size the transform resizes to, and large images are box-reduced to twice that first.")
@click.option("--decode-threads", type=click_type(EXTRACTOR["decode_threads"]), default=None,
              help="Threads that decode images. Default: one per core when decoding the first batch took longer "
                   "than the model on it, else decoding in turn.")
@click.option("--mirror", is_flag=True,
              help="Codes of each image's horizontal mirror image (cached apart; a flip-augmented probe trains and "
                   "scores on both).")
@click.option("--profile", is_flag=True, help="First time decoding alone and the model alone on 256 images.")
def extract(data: Path, out: Path, model: str, weights: str, image_size: int | None, batch_size: int,
            precision: str, layer: str, pool: str, views: str | None, combine: bool, per_class: int | None,
            num_workers: int, skip_bad: bool, like: Path | None, cache: bool, fold_bn: bool, engine: str,
            exact_decode: bool, decode_threads: int | None, mirror: bool, profile: bool) -> None:
    """Write CNN codes of every image in DATA (folder, CSV manifest or IDX) to a codes directory."""
    if like is None:  # a layer the model is known not to have, a pooling that is none: refused before torch loads
        _refuse_early(model, layer, pool, views)
    elif views is not None:
        raise click.UsageError("--views names the codes itself: give it without --like")
    if combine and layer != "auto":
        raise click.UsageError("--combine grows a combination from the sweep's best view: give it with --layer auto")
    from transferkit.jobs import extract_features

    if profile:
        from transferkit.codes.extract import profile as profile_extraction
        from transferkit.codes.extractor import FeatureExtractor
        from transferkit.jobs import load_data

        p = profile_extraction(FeatureExtractor(model, weights=weights, layer="all" if layer == "auto" else layer,
                                                pool="all" if layer == "auto" else pool, image_size=image_size,
                                                batch_size=batch_size, precision=precision, num_workers=num_workers,
                                                fold_bn=fold_bn, engine=engine, exact_decode=exact_decode,
                                                decode_threads=decode_threads, mirror=mirror),
                               load_data(data, per_class=per_class))
        slower = "decoding" if p["decode_images_per_second"] < p["model_images_per_second"] else "the model"
        how = (f"so extract decodes in {p['decode_threads']} threads" if slower == "decoding"
               else "so extract decodes in turn")
        click.echo(f"profile on {p['images']} images: decoding {p['decode_images_per_second']:.0f} img/s in one "
                   f"thread, {p['parallel_decode_images_per_second']:.0f} in {p['decode_threads']} "
                   f"({'exactly' if p['exact_decode'] else 'at the size needed'}); model "
                   f"{p['model_images_per_second']:.0f} img/s ({p['engine']}, {p['precision']}); {slower} is the "
                   f"bottleneck, {how}")
        choice = p["engine_choice"]
        click.echo(f"engine: {choice['chosen']}: {choice['why']}")

    store = extract_features(
        data, out, model=model, weights=weights, layer=layer, pool=pool, views=views, image_size=image_size,
        batch_size=batch_size, precision=precision, num_workers=num_workers, per_class=per_class,
        skip_bad=skip_bad, like=like, combine=combine, cache=cache, fold_bn=fold_bn, engine=engine,
        exact_decode=exact_decode, decode_threads=decode_threads, progress=click.get_current_context().obj["progress"],
        mirror=mirror,
    )
    if _worker_rank():
        return  # under torchrun only rank 0 reports
    meta = store.meta
    cached = meta.get("cache") or {}
    reuse = f"; {cached['cached']} from the code cache, {cached['computed']} encoded" if cached.get("cached") else ""
    click.echo(f"{len(store)} images -> {out} ({', '.join(store.keys[:4])}{', ...' if len(store.keys) > 4 else ''}) "
               f"at {meta['images_per_second']} img/s{reuse}; weights {meta['weights']['source']} "
               f"sha256 {meta['weights']['sha256'][:12]}")
    _print_sweep(out)  # skipped images: extract logs one warning, meta.json lists them all


def _refuse_early(model: str, layer: str, pool: str, views: str | None) -> None:
    """Refuse, before torch loads, --layer/--pool/--views values the model is known not to have or that are none."""
    from transferkit.codes.params import as_views_error, parse_pools, parse_views
    from transferkit.errors import ParameterError
    from transferkit.models.vocabulary import refuse_early

    if views is None:
        refuse_early(model, "layer", layer)
        parse_pools(pool)
        return
    source = click.get_current_context().get_parameter_source
    if any(source(p).name != "DEFAULT" for p in ("layer", "pool")):
        raise click.UsageError("--views names the layers and pools itself: give it without --layer and --pool")
    for view_layer, _ in parse_views(views):
        try:
            refuse_early(model, "layer", view_layer)
        except ParameterError as err:
            raise as_views_error(err, views) from None


def _worker_rank() -> bool:
    """True on torchrun ranks other than 0 (extract has closed the process group it opened by now)."""
    import os

    return int(os.environ.get("RANK", "0")) != 0


def _print_sweep(features: Path) -> None:
    file = features / "sweep.json"
    if file.is_file():
        result = json.loads(file.read_text())
        best, metric = result["best"], result.get("metric", "accuracy").replace("_", " ")  # older: accuracy
        click.echo(f"sweep: best codes {best['layer']}|{best['pool']} (dim {best['dim']}) "
                   f"at {100 * best['cv_accuracy']:.2f}% CV {metric}; plot {features / 'sweep.png'}")
        steps = result.get("selection", {}).get("steps", [])
        if len(steps) > 1:
            chosen = "+".join(f"{la}|{p}" for la, p in steps[-1]["views"])
            click.echo(f"selection: views {chosen} at {100 * steps[-1]['cv_accuracy']:.2f}% CV {metric} (the codes "
                       "a probe trains on by default)")


@cli.command()
@click.argument("features", metavar="CODES", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--cv", type=click_type(PROBE["cv"]), default=3, show_default=True, help="Cross-validation folds.")
@click.option("--max-samples", type=click.IntRange(10), default=5000, show_default=True,
              help="Score on a stratified subset of at most this many training images (multi-label: random).")
@click.option("--metric", type=click_type(PROBE["metric"]), default="auto", show_default=True,
              help="CV score to rank by; auto: balanced_accuracy when the largest class is over "
                   f"{AUTO_BALANCED_RATIO:g}x the smallest; multi-label codes: mAP.")
def sweep(features: Path, cv: int, max_samples: int, metric: str) -> None:
    """Score every layer x pooling in CODES (a codes directory) by cross-validated linear-SVM accuracy (training
    data only)."""
    from transferkit.codes.store import FeatureStore
    from transferkit.jobs import sweep_features

    result = sweep_features(FeatureStore(features), cv=cv, max_samples=max_samples, metric=metric)
    click.echo(result.table())
    _print_sweep(features)


@cli.command()
@click.argument("model", type=ModelName(), default=DEFAULT_MODEL)
def layers(model: str) -> None:
    """List the stages of MODEL: the names and indices --layer and finetune --freeze-until accept (the same
    table as finetune --list-stages)."""
    import timm

    from transferkit.models.backbones import check_model_name
    from transferkit.models.layers import layer_table

    check_model_name(model)
    click.echo(layer_table(timm.create_model(model, pretrained=False)))
