"""`finetune`: fine-tuning runs from the command line."""

from __future__ import annotations

import math
from pathlib import Path

import click

from transferkit.cli import DataPath, ImageSize, cli, model_options
from transferkit.finetune.params import FINETUNE
from transferkit.runtime.params import click_type  # the limits live in those tables (plain data: no torch)


@cli.command()
@click.argument("data", type=DataPath(), required=False)
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Run directory for checkpoints and metrics.")
@model_options
@click.option("--freeze-until", default="none", show_default=True,
              help="Train only stages from this one up: a stage name or index as --list-stages prints them (the "
                   "same as extract --layer), 'head' (head only), 'none' (all).")
@click.option("--start-size", type=ImageSize(FINETUNE["start_size"]), default=None,
              help="Progressive resizing: train epoch 1 at N x N, growing linearly to --image-size (needed) at the "
                   "last epoch; early epochs cost less.")
@click.option("--list-stages", "list_stages", is_flag=True,
              help="Print the stages of --model (the table `transferkit layers` prints) and exit.")
@click.option("--epochs", type=click_type(FINETUNE["epochs"]), default=5, show_default=True,
              help="With --resume: more than the run's extends it by a new warmup+cosine cycle over the added epochs.")
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
@click.option("--class-weight", type=click_type(FINETUNE["class_weight"]), default=None,
              help="balanced: weight the loss of each class by n / (n_classes x its count), for imbalanced classes.")
@click.option("--sampler", type=click_type(FINETUNE["sampler"]), default=None,
              help="balanced: draw training images class-balanced (with replacement) instead of shuffling.")
@click.option("--ema-decay", type=click_type(FINETUNE["ema_decay"]), default=None,
              help="Validate and save an exponential moving average of the weights, at most this decay per step "
                   "(timm ModelEmaV3 with warmup); e.g. 0.999.")
@click.option("--mixup", type=click_type(FINETUNE["mixup"]), default=0.0, show_default=True,
              help="Mixup alpha (timm): train on blends of image pairs with blended targets; 0: off.")
@click.option("--cutmix", type=click_type(FINETUNE["cutmix"]), default=0.0, show_default=True,
              help="CutMix alpha (timm): paste a box of another image, targets by area; with --mixup, half the "
                   "batches each.")
@click.option("--head-init", type=click_type(FINETUNE["head_init"]), default="prior", show_default=True,
              help="probe: start the head as a logistic regression fitted on the frozen network's codes (LP-FT); "
                   "prior: random weights, biases the log class prior.")
@click.option("--no-cache", is_flag=True, help="Recompute the frozen stages every step instead of caching them.")
@click.option("--val-fraction", type=click_type(FINETUNE["val_fraction"]), default=0.1, show_default=True,
              help="Stratified hold-out for validation when --val is not given.")
@click.option("--val", "val_data", type=DataPath(), default=None,
              help="Validation data: a folder, CSV manifest or IDX prefix.")
@click.option("--per-class", type=click.IntRange(1), default=None, help="Keep the first N images of each class.")
@click.option("--early-stop", type=click_type(FINETUNE["early_stop"]), default=None,
              help="Stop after N epochs without val gain.")
@click.option("--seed", type=click_type(FINETUNE["seed"]), default=0, show_default=True)
@click.option("--num-workers", type=click_type(FINETUNE["num_workers"]), default=0, show_default=True)
@click.option("--resume", "resume", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Continue the run in this directory from its last checkpoint, exactly as if never stopped; DATA "
                   "and options not given are the run's. With a larger --epochs, extend a finished run (--lr, "
                   "--warmup-epochs and --early-stop may then change too).")
@click.option("--find-lr", is_flag=True, help="Run the LR range test, save lr_find.png to --out and exit.")
@click.pass_context
def finetune(ctx: click.Context, data: Path | None, out: Path | None, list_stages: bool, resume: Path | None,
             find_lr: bool, per_class: int | None, val_data: Path | None, **options) -> None:
    """Fine-tune --model on DATA, partly (--freeze-until) or whole, with per-layer learning rates.

    Runs as is under `torchrun --nproc-per-node N` (DistributedDataParallel; --batch-size is per process).

    `finetune --resume RUN` continues a killed run; `finetune --resume RUN --epochs N` trains a finished one on to
    epoch N: the added epochs get their own warmup and cosine to 0 at --lr (the run's unless given), like fastai's
    `fit` after `fine_tune`, instead of a stretched cosine that would jump the LR back up. The best epoch may stay
    one of the earlier ones.
    """
    if list_stages:
        import timm

        from transferkit.models.backbones import check_model_name
        from transferkit.models.layers import layer_table

        check_model_name(options["model"])
        click.echo(layer_table(timm.create_model(options["model"], pretrained=False)))
        return
    out = _check_arguments(data, out, resume, per_class, options)
    from transferkit.finetune import loop as ft
    from transferkit.finetune import lr_finder
    from transferkit.finetune import resume as rs
    from transferkit.finetune.rundir import read_run
    from transferkit.jobs import load_data

    train = load_data(data, per_class=per_class) if data is not None else None
    val = load_data(val_data) if val_data is not None else None
    progress = ctx.obj["progress"]
    if resume is not None and not find_lr:
        result = rs.resume_run(out, train=train, val=val, progress=progress, **_given(ctx, _config_values(options)))
    else:
        meta = read_run(resume) if resume is not None else None
        config = _finetune_config(ctx, options, meta)
        if train is None:  # --find-lr on a run, without DATA
            train, recorded_val = rs.run_data(resume, meta)
            val = val if val is not None else recorded_val
        if find_lr:
            result = lr_finder.find_lr(train, out, config, progress=progress)
            click.echo(f"suggested --lr {result.suggestion:.2g} (a tenth of the lowest-loss LR); "
                       f"plot: {out / 'lr_find.png'}")
            return
        result = ft.finetune(train, out, config, val=val, progress=progress)
    if result.evaluation is not None:
        click.echo(result.evaluation.report)
        click.echo(f"best epoch {result.best_epoch}: validation {result.evaluation.summary()} -> {out}")
    else:
        click.echo(f"best epoch {result.best_epoch} (no validation set) -> {out}")


def _check_arguments(data: Path | None, out: Path | None, resume: Path | None, per_class: int | None,
                     options: dict) -> Path:
    """Everything that can be refused before torch and the data load; returns the run directory."""
    if resume is not None:
        if out is not None and out.resolve() != resume.resolve():
            raise click.UsageError(f"--out '{out}' and --resume '{resume}' name different runs; give one")
        if per_class is not None and data is None:
            raise click.UsageError("--per-class applies to DATA: give DATA too, or neither (the run's data is used)")
        out = resume
    elif data is None or out is None:
        raise click.UsageError("DATA and --out are required (or use --resume RUN, or --list-stages)")
    _config_values(options)  # LO:HI pairs
    if resume is None:  # a stage the model is known not to have (models.vocabulary)
        from transferkit.models.vocabulary import refuse_early

        refuse_early(options["model"], "freeze_until", options["freeze_until"])
    return out


def _config_values(options: dict) -> dict:
    """The options as FinetuneConfig fields (flags turned into values, LO:HI pairs parsed)."""
    values = dict(options)
    values["augment"] = not values.pop("no_augment")
    values["cache"] = not values.pop("no_cache")
    values["lr_range"] = _lo_hi(values["lr_range"], "--lr-range", FINETUNE["lr_range"][0])
    values["crop_scale"] = _lo_hi(values["crop_scale"], "--crop-scale", FINETUNE["crop_scale"][0])
    values["clip_grad"] = values["clip_grad"] or None
    return values


def _given(ctx: click.Context, values: dict) -> dict:
    """The fields whose options were given on the command line: on --resume, the rest are the run's."""
    param = {"augment": "no_augment", "cache": "no_cache"}
    return {k: v for k, v in values.items()
            if ctx.get_parameter_source(param.get(k, k)) == click.core.ParameterSource.COMMANDLINE}


def _finetune_config(ctx: click.Context, options: dict, meta: dict | None):
    """FinetuneConfig from the options; on --resume, from the run's config with the options given on top."""
    from transferkit.finetune.config import FinetuneConfig

    values = _config_values(options)
    if meta is None:
        return FinetuneConfig(**values)
    from transferkit.finetune.resume import run_config

    return run_config(meta, _given(ctx, values))  # a given option that differs is refused when the run starts


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
