"""`transferkit` command line: each command parses its options, calls one API function and prints.

The top floor: it may import every room, lazily inside each command so that `--help` stays fast; nothing
imports it.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import click

from transferkit.codes.params import EXTRACTOR
from transferkit.data.params import IMAGE_SIZE
from transferkit.finetune.params import FINETUNE
from transferkit.probe.params import PROBE
from transferkit.runtime.params import click_type  # the limits live in those tables (plain data: no torch)

DEFAULT_MODEL = "tf_efficientnet_lite0"  # kept literal so `--help` does not import torch


class _Group(click.Group):
    """Turn transferkit's own errors into one-line messages and exit code 1."""

    def invoke(self, ctx: click.Context):
        from transferkit.errors import TransferkitError

        try:
            return super().invoke(ctx)
        except TransferkitError as e:
            raise click.ClickException(str(e)) from e
        except OSError as e:
            raise click.ClickException(f"{e.strerror or e}: '{e.filename}'" if e.filename else str(e)) from e


@click.group(cls=_Group)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.version_option(package_name="transferkit")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Transfer learning from pretrained CNNs: CNN codes, linear-SVM probes and layer sweeps."""
    ctx.obj = {"progress": not quiet}
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("PIL", "matplotlib", "timm", "onnx_ir", "onnxscript", "torch.onnx"):  # exporters: ~100 INFO lines
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 2 else logging.DEBUG)


def model_options(f=None, *, table=FINETUNE, precision: str = "fp32",
                  help_precision: str = "bf16 autocast on CPU/GPU; fp16 needs CUDA."):
    """Options shared by every command that builds a backbone; their limits come from `table`."""
    if f is None:
        return lambda g: model_options(g, table=table, precision=precision, help_precision=help_precision)
    f = click.option("--precision", type=click_type(table["precision"]), default=precision,
                     show_default=True, help=help_precision)(f)
    f = click.option("--batch-size", type=click_type(table["batch_size"]), default=64, show_default=True)(f)
    f = click.option("--image-size", type=click_type(table["image_size"]), default=None,
                     help="Resize whole images to N x N instead of the model's pretrained size and crop.")(f)
    f = click.option("--weights", default="auto", show_default=True,
                     help="A .safetensors/.pth file, 'auto' (installed package, then timm hub), 'package', "
                          "'hub', or 'random'.")(f)
    f = click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Any timm model name.")(f)
    return f


@cli.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Feature directory to write.")
@model_options(table=EXTRACTOR, precision="auto",
               help_precision="auto, on a CPU with ONNX Runtime: int8 there (quantized once, "
               "calibrated on fixed photo crops, checked against fp32) when its file is cached or the data is large "
               "enough to repay it, else fp32 there likewise, else bf16 in torch on CPUs with native bf16 "
               "(AVX512-BF16/AMX); fp16 autocast on CUDA. fp32 turns reduced precision off.")
@click.option("--layer", default="pre_logits", show_default=True,
              help="pre_logits, a stage index or timm module name (see `transferkit layers`), 'all', "
                   "or 'auto' (every stage x pooling, then a sweep picks the best).")
@click.option("--pool", default="avg", show_default=True,
              help="avg, max, avgmax, a grid like 2x2 that keeps location, a comma list, or 'all'.")
@click.option("--per-class", type=click.IntRange(1), default=None, help="Keep the first N images of each class.")
@click.option("--num-workers", type=click_type(EXTRACTOR["num_workers"]), default=0, show_default=True,
              help="DataLoader workers.")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images, list them at the end and in meta.json.")
@click.option("--like", type=click.Path(exists=True, path_type=Path), default=None,
              help="Encode exactly like this feature directory (model, weights, size, best layer).")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="Reuse codes of images already encoded the same way (see `transferkit cache`).")
@click.option("--fold-bn/--no-fold-bn", default=True, show_default=True,
              help="Fold BatchNorm into the conv before it (checked against the unfolded output).")
@click.option("--engine", type=click_type(EXTRACTOR["engine"]), default="auto", show_default=True,
              help="What runs the network. auto: ONNX Runtime (exported once, cached, checked against torch) on CPU "
                   "when it is installed and the data is large enough to repay the export (see --precision), "
                   "else torch.")
@click.option("--profile", is_flag=True, help="First time decoding alone and the model alone on 256 images.")
def extract(data: Path, out: Path, model: str, weights: str, image_size: int | None, batch_size: int,
            precision: str, layer: str, pool: str, per_class: int | None, num_workers: int, skip_bad: bool,
            like: Path | None, cache: bool, fold_bn: bool, engine: str, profile: bool) -> None:
    """Write CNN codes of every image in DATA (folder, CSV manifest or IDX) to a feature directory."""
    from transferkit.jobs import extract_features

    if profile:
        from transferkit.codes.extract import profile as profile_extraction
        from transferkit.codes.extractor import FeatureExtractor
        from transferkit.jobs import load_data

        p = profile_extraction(FeatureExtractor(model, weights=weights, layer="all" if layer == "auto" else layer,
                                                pool="all" if layer == "auto" else pool, image_size=image_size,
                                                batch_size=batch_size, precision=precision, num_workers=num_workers,
                                                fold_bn=fold_bn, engine=engine), load_data(data, per_class=per_class))
        slower = "decoding" if p["decode_images_per_second"] < p["model_images_per_second"] else "the model"
        click.echo(f"profile on {p['images']} images: decoding {p['decode_images_per_second']:.0f} img/s "
                   f"({p['num_workers']} DataLoader workers), model {p['model_images_per_second']:.0f} img/s "
                   f"({p['engine']}, {p['precision']}); {slower} is the bottleneck")

    store = extract_features(
        data, out, model=model, weights=weights, layer=layer, pool=pool, image_size=image_size,
        batch_size=batch_size, precision=precision, num_workers=num_workers, per_class=per_class,
        skip_bad=skip_bad, like=like, cache=cache, fold_bn=fold_bn, engine=engine,
        progress=click.get_current_context().obj["progress"],
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


def _worker_rank() -> bool:
    """True on torchrun ranks other than 0 (extract has closed the process group it opened by now)."""
    import os

    return int(os.environ.get("RANK", "0")) != 0


def _print_sweep(features: Path) -> None:
    file = features / "sweep.json"
    if file.is_file():
        best = json.loads(file.read_text())["best"]
        click.echo(f"sweep: best codes {best['layer']}|{best['pool']} (dim {best['dim']}) "
                   f"at {100 * best['cv_accuracy']:.2f}% CV accuracy; plot {features / 'sweep.png'}")


@cli.command()
@click.argument("features", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--cv", type=click_type(PROBE["cv"]), default=3, show_default=True, help="Cross-validation folds.")
@click.option("--max-samples", type=click.IntRange(10), default=5000, show_default=True,
              help="Score on a stratified subset of at most this many training images.")
def sweep(features: Path, cv: int, max_samples: int) -> None:
    """Score every layer x pooling in FEATURES by cross-validated linear-SVM accuracy (training data only)."""
    from transferkit.codes.store import FeatureStore
    from transferkit.jobs import sweep_features

    result = sweep_features(FeatureStore(features), cv=cv, max_samples=max_samples)
    click.echo(result.table())
    _print_sweep(features)


@cli.command()
@click.argument("train", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Directory for the probe.")
@click.option("--test", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Feature directory to evaluate on (extract it with --like TRAIN).")
@click.option("--layer", default=None, help="Layer of the codes to use, or 'best' (from the sweep).")
@click.option("--pool", default=None, help="Pooling of the codes to use.")
@click.option("--C", "c", default="auto", show_default=True, help="SVM C, or 'auto' for cross-validation.")
@click.option("--scaling", type=click_type(PROBE["scaling"]), default="standard", show_default=True)
@click.option("--cv", type=click_type(PROBE["cv"]), default=5, show_default=True, help="Folds for choosing C.")
def probe(train: Path, out: Path, test: Path | None, layer: str | None, pool: str | None, c: str,
          scaling: str, cv: int) -> None:
    """Train a linear SVM on the codes in TRAIN; report accuracy on TEST."""
    from transferkit.jobs import train_probe

    C = c if c == "auto" else _number(c)  # LinearProbe checks its limits (PROBE["C"]) and names them
    report = train_probe(train, out, test=test, layer=layer, pool=pool, C=C, scaling=scaling, cv=cv)
    p = report.probe
    cv_text = "" if p.cv_score_ != p.cv_score_ else f", CV accuracy {100 * p.cv_score_:.2f}%"
    click.echo(f"probe on {report.key}: C={p.best_C_:g}{cv_text} -> {out}")
    if report.evaluation is not None:
        ev = report.evaluation
        click.echo(ev.report)
        click.echo(f"test accuracy: {100 * ev.accuracy:.2f}% ({int(ev.confusion.sum())} images); "
                   f"confusion matrix {out / 'confusion.png'}")


def _number(text: str) -> float | str:
    """A number as a float; anything else stays text, for the library to refuse with its allowed values."""
    try:
        return float(text)
    except ValueError:
        return text


@cli.command()
@click.argument("model_dir", metavar="MODEL")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--batch-size", type=click_type(EXTRACTOR["batch_size"]), default=64, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image.")
@click.option("--dense", is_flag=True,
              help="Score map of each image at its own size (any size): npz + heat map per image in --out.")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --dense: directory for IMAGE.npz and IMAGE-heatmap.png.")
@click.option("--window", is_flag=True, help="With --dense: each cell is the head on one training-size window.")
@click.option("--weights", default="auto", show_default=True, help="With --dense and a timm model name as MODEL.")
def predict(model_dir: str, images: tuple[Path, ...], batch_size: int, as_json: bool, dense: bool, out: Path | None,
            window: bool, weights: str) -> None:
    """Classify IMAGES (files or folders) with MODEL: a probe directory or a fine-tuning run directory.

    The score is the probe's SVM score, or the fine-tuned network's softmax probability. With --dense,
    MODEL may also be a converted directory (`transferkit convert`) or a timm model name (its ImageNet head),
    and each image is scored at every location: see docs/surgery.md.
    """
    if dense:
        from transferkit.jobs import image_files
        from transferkit.surgery.dense import dense_predict, load_classifier

        if out is not None:  # before the network loads: never into the images' folders
            from transferkit.runtime.outputs import check_output
            from transferkit.surgery.dense import DENSE_KIND

            check_output(out, DENSE_KIND, inputs=images)
        clf = load_classifier(model_dir, window=window, weights=weights)
        for path in image_files(list(images)):
            row = dense_predict(clf, path, out)
            if as_json:
                click.echo(json.dumps(row))
                continue
            best = ", ".join(f"{t['label']} {t['score']:.3f}" for t in row["top"][:3])
            f = row["field"]
            click.echo(f"{path}\t{row['map_size'][0]}x{row['map_size'][1]} cells (stride {f['jump'][0]:g} px, "
                       f"field {f['size'][0]:g} px)\t{best}")
        return
    from transferkit.jobs import predict_images

    if not Path(model_dir).is_dir():
        raise click.BadParameter(f"'{model_dir}' is not a directory (a timm model name needs --dense)",
                                 param_hint="MODEL")
    for row in predict_images(model_dir, list(images), batch_size=batch_size):
        click.echo(json.dumps(row) if as_json else f"{row['source']}\t{row['label']}\t{row['score']:.3f}")


@cli.command()
@click.argument("source", metavar="RUN_OR_MODEL")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for convert.json and fully_conv.safetensors.")
@click.option("--input-size", type=click_type(IMAGE_SIZE), default=None,
              help="The size the classifier was trained at (timm model names: their pretrained size).")
@click.option("--window", is_flag=True, help="Keep every global pool as a training-size sliding window.")
@click.option("--weights", default="auto", show_default=True, help="For a timm model name.")
def convert(source: str, out: Path, input_size: int | None, window: bool, weights: str) -> None:
    """Convert a classifier's FC layers to convolutions, so it takes images of any size and returns score maps.

    RUN_OR_MODEL: a fine-tuning run, a probe directory or a timm model name.
    """
    from transferkit.runtime.outputs import check_output
    from transferkit.surgery.dense import CONVERTED_KIND, load_classifier, save_converted

    check_output(out, CONVERTED_KIND, inputs=[source])  # before the work
    clf = load_classifier(source, input_size=input_size, window=window, weights=weights)
    save_converted(clf, out)
    click.echo(f"{out}: {len(clf.classes)} classes, trained at {clf.net.input_size[0]}x{clf.net.input_size[1]}, "
               f"parity error {clf.net.parity_error:.2g}; map mean = original logits at "
               f"{'every size' if clf.net.mean_is_logits else 'the training size'}")
    click.echo(str(clf.net.head))


@cli.command()
@click.argument("source", metavar="RUN_OR_MODEL")
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="File to write.")
@click.option("--weights", default="auto", show_default=True, help="For a timm model name.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Compare onnxruntime with torch at two input sizes.")
def export(source: str, fmt: str, out: Path, weights: str, check: bool) -> None:
    """Export the fully convolutional form of RUN_OR_MODEL (run, probe, converted dir, timm name), dynamic H x W."""
    from transferkit.runtime.outputs import check_output_file
    from transferkit.surgery.dense import load_classifier
    from transferkit.surgery.export import check_onnx, export_onnx, written_here

    check_output_file(out, written_here)  # before the work: replace only a file transferkit exported
    clf = load_classifier(source, weights=weights)
    export_onnx(clf, out)
    click.echo(f"wrote {out}")
    if check:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            click.echo("onnxruntime is not installed: not checked")
            return
        h, w = clf.net.input_size
        for row in check_onnx(clf, out, [(h, w), (h + 2 * h // 3 + 1, 2 * w - 3)]):
            click.echo(f"onnxruntime vs torch at {row['size'][0]}x{row['size'][1]} (map {row['map'][0]}x"
                       f"{row['map'][1]}): max |diff| {row['max_abs_diff']:.2g}")


@cli.command()
@click.argument("model_dir", metavar="MODEL", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Directory for report.txt, metrics.json and confusion.png.")
@click.option("--per-class", type=click.IntRange(1), default=None, help="Keep the first N images of each class.")
@click.option("--batch-size", type=click_type(EXTRACTOR["batch_size"]), default=64, show_default=True)
@click.option("--tta", is_flag=True, help="Fine-tuning runs: average each image with its mirror image.")
def evaluate(model_dir: Path, data: Path, out: Path | None, per_class: int | None, batch_size: int,
             tta: bool) -> None:
    """Score MODEL (a probe or a fine-tuning run directory) on labelled DATA (folder, CSV manifest or IDX).

    Classes are matched by name: DATA may lack some of the model's classes, but not add new ones.
    """
    from transferkit.jobs import evaluate_model

    ev = evaluate_model(model_dir, data, out=out, per_class=per_class, batch_size=batch_size,
                        progress=click.get_current_context().obj["progress"], tta=tta)
    click.echo(ev.report)
    plot = f"; confusion matrix {out / 'confusion.png'}" if out is not None else ""
    click.echo(f"accuracy: {100 * ev.accuracy:.2f}% ({int(ev.confusion.sum())} images){plot}")


@cli.command()
@click.argument("data", type=click.Path(path_type=Path), required=False)
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Run directory for checkpoints and metrics.")
@model_options
@click.option("--freeze-until", default="none", show_default=True,
              help="Train only stages from this one up: a stage name or index, 'head' (head only), 'none' (all).")
@click.option("--list-stages", "list_stages", is_flag=True, help="Print the stages of --model and exit.")
@click.option("--epochs", type=click_type(FINETUNE["epochs"]), default=5, show_default=True)
@click.option("--lr", type=click_type(FINETUNE["lr"]), default=3e-3, show_default=True,
              help="Learning rate of the head; lower layers get less (--layer-decay or --lr-range).")
@click.option("--layer-decay", type=click_type(FINETUNE["layer_decay"]), default=0.9, show_default=True,
              help="Geometric LR decay per layer group, from the head down (timm's param_groups_layer_decay).")
@click.option("--lr-range", default=None, help="LO:HI spread over the trainable stages (fastai's slice(lo, hi)).")
@click.option("--optimizer", type=click_type(FINETUNE["optimizer"]), default="adamw", show_default=True)
@click.option("--schedule", type=click_type(FINETUNE["schedule"]), default="cosine", show_default=True,
              help="Per-step: linear warmup then cosine, or one-cycle.")
@click.option("--warmup-epochs", type=click_type(FINETUNE["warmup_epochs"]), default=0.5, show_default=True)
@click.option("--weight-decay", type=click_type(FINETUNE["weight_decay"]), default=0.05, show_default=True,
              help="AdamW/SGD weight decay; never applied to norms and biases.")
@click.option("--label-smoothing", type=click_type(FINETUNE["label_smoothing"]), default=0.1, show_default=True)
@click.option("--clip-grad", type=click_type(FINETUNE["clip_grad"]), default=1.0, show_default=True,
              help="Max global gradient norm; 0 turns clipping off.")
@click.option("--head", type=click_type(FINETUNE["head"]), default="linear", show_default=True,
              help="local: LocallyConnected2d on the unpooled final map (then a fixed --image-size).")
@click.option("--train-bn", is_flag=True, help="Let BatchNorm in frozen stages update its running statistics.")
@click.option("--no-augment", is_flag=True, help="Train on the eval transform (no crop, flip or erasing).")
@click.option("--crop-scale", default="0.35:1", show_default=True,
              help="LO:HI share of the image area a random resized crop keeps (0 < LO <= HI <= 1).")
@click.option("--random-erasing", type=click_type(FINETUNE["random_erasing"]), default=0.25, show_default=True,
              help="Probability of timm's RandomErasing per training image.")
@click.option("--no-cache", is_flag=True, help="Recompute the frozen stages every step instead of caching them.")
@click.option("--val-fraction", type=click_type(FINETUNE["val_fraction"]), default=0.1, show_default=True,
              help="Stratified hold-out for validation when --val is not given.")
@click.option("--val", "val_data", type=click.Path(path_type=Path), default=None,
              help="Validation data: a folder, CSV manifest or IDX prefix.")
@click.option("--per-class", type=click.IntRange(1), default=None, help="Keep the first N images of each class.")
@click.option("--early-stop", type=click_type(FINETUNE["early_stop"]), default=None,
              help="Stop after N epochs without val gain.")
@click.option("--seed", type=click_type(FINETUNE["seed"]), default=0, show_default=True)
@click.option("--num-workers", type=click_type(FINETUNE["num_workers"]), default=0, show_default=True)
@click.option("--resume", "resume", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Continue the run in this directory from its last checkpoint; options not given are the run's.")
@click.option("--find-lr", is_flag=True, help="Run the LR range test, save lr_find.png to --out and exit.")
@click.pass_context
def finetune(ctx: click.Context, data: Path | None, out: Path | None, list_stages: bool, resume: Path | None,
             find_lr: bool, per_class: int | None, val_data: Path | None, **options) -> None:
    """Fine-tune --model on DATA, partly (--freeze-until) or whole, with per-layer learning rates.

    Runs as is under `torchrun --nproc-per-node N` (DistributedDataParallel; --batch-size is per process).
    """
    import timm

    from transferkit.finetune.loop import stage_table
    from transferkit.models.backbones import check_model_name

    if list_stages:
        check_model_name(options["model"])
        click.echo(stage_table(timm.create_model(options["model"], pretrained=False)))
        return
    if resume is not None:
        if out is not None and out.resolve() != resume.resolve():
            raise click.UsageError(f"--out '{out}' and --resume '{resume}' name different runs; give one")
        out = resume
    if data is None or out is None:
        raise click.UsageError("DATA and --out are required (or use --list-stages)")
    from transferkit.finetune import loop as ft
    from transferkit.finetune.rundir import read_run
    from transferkit.jobs import load_data

    config = _finetune_config(ctx, options, read_run(resume)["config"] if resume else None)
    train = load_data(data, per_class=per_class)
    progress = ctx.obj["progress"]
    if find_lr:
        result = ft.find_lr(train, out, config, progress=progress)
        click.echo(f"suggested --lr {result.suggestion:.2g} (a tenth of the lowest-loss LR); "
                   f"plot: {out / 'lr_find.png'}")
        return
    val = load_data(val_data) if val_data is not None else None
    result = ft.finetune(train, out, config, val=val, progress=progress, resume=resume is not None)
    click.echo(f"best epoch {result.best_epoch}: validation accuracy {100 * result.best_val_accuracy:.2f}% -> {out}")


def _finetune_config(ctx: click.Context, options: dict, saved: dict | None):
    """FinetuneConfig from the options; on --resume, from the run's config with the options given on top."""
    from transferkit.finetune.config import FinetuneConfig

    values = dict(options)
    values["augment"] = not values.pop("no_augment")
    values["cache"] = not values.pop("no_cache")
    values["lr_range"] = _lo_hi(values["lr_range"], "--lr-range", FINETUNE["lr_range"][0])
    values["crop_scale"] = _lo_hi(values["crop_scale"], "--crop-scale", FINETUNE["crop_scale"][0])
    values["clip_grad"] = values["clip_grad"] or None
    if saved is None:
        return FinetuneConfig(**values)
    import dataclasses

    param = {"augment": "no_augment", "cache": "no_cache"}
    given = {k: v for k, v in values.items()
             if ctx.get_parameter_source(param.get(k, k)) == click.core.ParameterSource.COMMANDLINE}
    return dataclasses.replace(FinetuneConfig.from_dict(saved), **given)  # a given option that differs is refused


def _lo_hi(text: str | None, option: str, pair) -> tuple[float, float] | None:
    """'LO:HI' -> (lo, hi) within `pair` (a runtime.params.Pair from the table); None stays None."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        lo = hi = math.nan
    if (lo, hi) not in pair:
        bound = f" <= {pair.high:g}" if pair.high is not None else ""
        raise click.BadParameter(f"must be LO:HI with {pair.low:g} < LO <= HI{bound}. Got {text!r}.",
                                 param_hint=option)
    return lo, hi


@cli.command()
@click.argument("model", default=DEFAULT_MODEL)
def layers(model: str) -> None:
    """List the layers of MODEL that --layer accepts."""
    import timm

    from transferkit.models.backbones import check_model_name, layer_table

    check_model_name(model)
    click.echo(layer_table(timm.create_model(model, pretrained=False)))


@cli.command()
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--image-size", type=(click.IntRange(1), click.IntRange(1)), default=None, metavar="H W",
              help="Input height and width [default: the model's pretrained size, or the run's image size].")
def summary(model: str, image_size: tuple[int, int] | None) -> None:
    """Per layer of MODEL (a timm name or a fine-tuning run directory): output shape, parameters, MACs."""
    from transferkit.surgery.summary import summarize_model

    click.echo(summarize_model(model, image_size).table())


@cli.command()
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("transferkit-demo"), show_default=True)
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Folder with Fashion-MNIST's IDX files [default: the Debian package's].")
@click.option("--per-class", type=click.IntRange(1), default=100, show_default=True,
              help="Training images per class (first N in file order).")
@click.option("--image-size", type=click_type(IMAGE_SIZE), default=None, help="[default: the demo's tuned size]")
def demo(out: Path, data: Path | None, per_class: int, image_size: int | None) -> None:
    """Offline demo: Fashion-MNIST + packaged EfficientNet-Lite0: extract -> sweep -> probe -> test accuracy."""
    from transferkit.recipes.demo import run_demo

    result = run_demo(out, data=data, per_class=per_class, image_size=image_size, echo=click.echo,
                      progress=click.get_current_context().obj["progress"])
    click.echo(f"test accuracy: {100 * result['test_accuracy']:.2f}% on {result['n_test']} test images "
               f"({result['key']}, {result['n_train']} training images, {result['seconds']:.0f} s)")


@cli.command("recipes")
def recipes_command() -> None:
    """List the packaged recipes (the four cs231n scenarios), one line each."""
    from transferkit import recipes

    for name, description in recipes.list():
        click.echo(f"{name:<16} {description}")


@cli.command()
@click.argument("recipe")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--test", type=click.Path(path_type=Path), default=None, help="Labelled test data to score on.")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for everything the run writes [default: ./RECIPE_NAME].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field; VALUE is a TOML scalar (epochs=5, lr=1e-3, augment=false). Repeatable.")
@click.option("--per-class", type=click.IntRange(1), default=None, help="Keep the first N training images per class.")
def run(recipe: str, data: Path, test: Path | None, out: Path | None, overrides: tuple[str, ...],
        per_class: int | None) -> None:
    """Run RECIPE (a name from `transferkit recipes` or a .toml file) on DATA end to end; score on --test."""
    from transferkit import recipes
    from transferkit.jobs import load_data

    chosen = recipes.resolve(recipe).replace(**recipes.parse_overrides(overrides))
    result = chosen.run(load_data(data, per_class=per_class), test, out or Path(chosen.name),
                        progress=click.get_current_context().obj["progress"])
    if result.evaluation is not None:
        click.echo(result.evaluation.report)
    click.echo(result.summary())


@cli.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--per-class", type=click.IntRange(1), default=None, help="Keep the first N images of each class.")
@click.option("--threshold", "thresholds", multiple=True, metavar="NAME=VALUE",
              help="Override a threshold of the rule: large_per_class, gap_points, gap_z, max_softmax. Repeatable.")
@click.option("--sample", type=click.IntRange(10), default=2000, show_default=True,
              help="Images (stratified) in the similarity pass.")
@click.option("--run", "run_it", is_flag=True, help="Then run the recommended recipe on DATA.")
@click.option("--test", type=click.Path(path_type=Path), default=None, help="With --run: test data to score on.")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --run: output directory [default: ./RECIPE_NAME].")
def advise(data: Path, per_class: int | None, thresholds: tuple[str, ...], sample: int, run_it: bool,
           test: Path | None, out: Path | None) -> None:
    """Measure DATA's size and similarity to ImageNet and recommend a recipe, with the numbers behind it."""
    from transferkit.jobs import load_data
    from transferkit.recipes.advise import advise as advise_data
    from transferkit.recipes.advise import parse_thresholds

    progress = click.get_current_context().obj["progress"]
    train = load_data(data, per_class=per_class)
    advice = advise_data(train, thresholds=parse_thresholds(thresholds), sample=sample, progress=progress)
    click.echo(advice.report())
    if run_it:
        result = advice.run(train, test, out or Path(advice.recipe), progress=progress)
        click.echo(result.summary())
    else:
        subset = f" --per-class {per_class}" if per_class else ""
        click.echo(f"run it: transferkit run {advice.recipe} {data}{subset} --test {test or 'TEST'}")


@cli.group()
def cache() -> None:
    """The code cache: codes of images already encoded, keyed by model, weights, layer, pooling, transform
    and image content ($TRANSFERKIT_CACHE, default ~/.cache/transferkit)."""


@cache.command("info")
def cache_info() -> None:
    """List what is cached: one line per kind of codes, with rows and size."""
    from transferkit.codes.cache import CodeCache

    store = CodeCache()
    entries = store.info()
    for e in entries:
        s = e.spec
        click.echo(f"{e.path.name[:12]}  {s.get('model', '?')}  {s.get('layer', '?')}|{s.get('pool', '?')}  "
                   f"{(s.get('transform') or {}).get('input_size', '?')}  {s.get('precision', '?')}  "
                   f"{e.rows} images  {e.bytes / 2**20:.1f} MiB")
    click.echo(f"{len(entries)} kind(s) of codes, {sum(e.rows for e in entries)} rows, "
               f"{sum(e.bytes for e in entries) / 2**20:.1f} MiB in {store.root}")
    engines = store.engines()
    click.echo(f"{len(engines)} exported ONNX Runtime engine(s), "
               f"{sum(p.stat().st_size for p in engines) / 2**20:.1f} MiB in {store.root / 'engines'}")


@cache.command("clean")
@click.option("--model", default=None, help="Only the codes of this model.")
def cache_clean(model: str | None) -> None:
    """Delete cached codes (all, or one model's); without --model the exported engines too."""
    from transferkit.codes.cache import CodeCache

    store = CodeCache()
    engines = [] if model else store.engines()
    gone = store.clear(model)
    click.echo(f"deleted {len(gone)} kind(s) of codes, {sum(e.bytes for e in gone) / 2**20:.1f} MiB, and "
               f"{len(engines)} engine(s) from {store.root}")


def main() -> None:
    cli(prog_name="transferkit")
