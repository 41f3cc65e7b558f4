"""`probe`, `ensemble`, `predict` and `evaluate`: linear probes and any model folder from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import click

from transferkit.cli import CodesPath, DataPath, cli
from transferkit.codes.params import EXTRACTOR
from transferkit.probe.params import AUGMENT_COPIES, AUTO_BALANCED_RATIO, PROBE
from transferkit.runtime.params import click_type  # the limits live in those tables (plain data: no torch)
from transferkit.surgery.params import DEFAULT_HEATMAPS, DENSE, MAX_MEGAPIXELS


@cli.command()
@click.argument("train", type=CodesPath())
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Directory for the probe.")
@click.option("--test", type=CodesPath(), default=None,
              help="Codes directory to evaluate on (extract it with --like TRAIN).")
@click.option("--layer", default=None,
              help="Layer of the codes to use, or 'best' (the layer sweep's choice; sweeps first if none was run) "
                   "[default: the only one, or the sweep's best].")
@click.option("--pool", default=None, help="Pooling of the codes to use.")
@click.option("--C", "C", default="auto", show_default=True,
              help="The head's regularisation C, or 'auto' for cross-validation.")
@click.option("--head", type=click_type(PROBE["head"]), default="svm", show_default=True,
              help="Linear SVM, multinomial logistic regression, cosine nearest-class-mean (ncm, no C), or auto: "
                   "cross-validation chooses the head with its C.")
@click.option("--scaling", type=click_type(PROBE["scaling"]), default="standard", show_default=True)
@click.option("--cv", type=click_type(PROBE["cv"]), default=5, show_default=True, help="Folds for choosing C.")
@click.option("--class-weight", type=click_type(PROBE["class_weight"]), default=None,
              help="balanced: weight each class's errors by n / (n_classes x its count), for imbalanced classes.")
@click.option("--metric", type=click_type(PROBE["metric"]), default="auto", show_default=True,
              help="CV score that chooses C; auto: balanced_accuracy when the largest class is over "
                   f"{AUTO_BALANCED_RATIO:g}x the smallest.")
@click.option("--max-iter", type=click_type(PROBE["max_iter"]), default=5000, show_default=True,
              help="Iterations per SVM or logistic regression fit; raise it if fits do not converge.")
@click.option("--flip", is_flag=True,
              help="Train on TRAIN's codes and those of their mirror images, and score every image (TEST's, and "
                   "later predict's and evaluate's) by the mean over it and its mirror. The mirror codes are made "
                   "from the images TRAIN and TEST were extracted from, through the code cache; C is chosen on "
                   "TRAIN's own codes.")
@click.option("--augment", type=click_type(AUGMENT_COPIES), default=0, show_default=True, metavar="N",
              help="Also train on the codes of N randomly shifted copies of each TRAIN image (up to a tenth of "
                   "the side each way, half of them mirrored), made through the code cache; C is chosen on "
                   "TRAIN's own codes. Test images are scored as they are.")
def probe(train: Path, out: Path, test: Path | None, layer: str | None, pool: str | None, C: str,
          head: str, scaling: str, cv: int, class_weight: str | None, metric: str, max_iter: int,
          flip: bool, augment: int) -> None:
    """Train a linear classifier (an SVM unless --head) on the codes in TRAIN; report accuracy, balanced accuracy
    and macro-F1 on TEST."""
    from transferkit.codes.params import parse_pools

    if pool is not None:
        parse_pools(pool)  # before torch loads
    from transferkit.jobs import train_probe

    C = C if C == "auto" else _number(C)  # LinearProbe checks its limits (PROBE["C"]); its error names the flag
    report = train_probe(train, out, test=test, layer=layer, pool=pool, C=C, scaling=scaling, cv=cv,
                         class_weight=class_weight, metric=metric, max_iter=max_iter, head=head, flip=flip,
                         augment=augment, progress=click.get_current_context().obj["progress"])
    p = report.probe
    multilabel = hasattr(p, "thresholds_")
    cv_text = ("" if p.cv_score_ != p.cv_score_ else f", CV mAP {p.cv_score_:.4f}" if multilabel else
               f", CV {p.metric_.replace('_', ' ')} {100 * p.cv_score_:.2f}%")
    C_text = "" if p.best_C_ is None else f" C={p.best_C_:g}"  # nearest class mean: no C
    flip_text = (", flip-averaged" if flip else "") + (f", {augment} shifted copies" if augment else "")
    click.echo(f"probe on {report.key}: {p.head_}{C_text}{cv_text}{flip_text} -> {out}")
    if report.evaluation is not None and multilabel:
        click.echo(report.evaluation.report)
        click.echo(f"test {report.evaluation.summary()}")
    elif report.evaluation is not None:
        ev = report.evaluation
        click.echo(ev.report)
        click.echo(f"test {ev.summary()}; confusion matrix {out / 'confusion.png'}")


@cli.command()
@click.argument("probes", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Directory for the ensemble.")
def ensemble(probes: tuple[Path, ...], out: Path) -> None:
    """Join PROBES (two or more probe directories of the same classes, e.g. each on another backbone's codes) into
    one model that scores an image by the mean of their calibrated probabilities. predict and evaluate take it as
    MODEL; each member makes its own codes of the images, through the code cache."""
    from transferkit.jobs import ensemble_probes

    ensemble_probes(list(probes), out)
    click.echo(f"ensemble of {len(probes)} probes ({', '.join(str(p) for p in probes)}) -> {out}")


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
@click.option("--topk", type=click.IntRange(1), default=1, show_default=True,
              help="List the K most probable classes (multi-label: in --json's 'top'; the text lists those found).")
@click.option("--raw", is_flag=True, help="Raw scores instead of probabilities: a probe's SVM scores, a run's logits.")
@click.option("--dense", is_flag=True,
              help="Probability map of each image (any size): npz, heat maps and a class map per image in --out.")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --dense: directory for IMAGE.npz, IMAGE-heatmap.png and IMAGE-classes.png.")
@click.option("--window", is_flag=True, help="With --dense: each cell is the head on one training-size window.")
@click.option("--scale", type=click_type(DENSE["scale"]), multiple=True,
              help="With --dense: resize each image by this factor first; repeat for several scales, averaged; "
                   f"each at most {MAX_MEGAPIXELS} megapixels [default: its own size].")
@click.option("--short-side", type=click_type(DENSE["short_side"]), multiple=True, metavar="N",
              help="With --dense: resize each image so its shorter side is N px; repeatable, averaged with --scale.")
@click.option("--class", "classes", multiple=True, metavar="NAME",
              help=f"With --dense: draw this class's heat map; repeatable [default: the top {DEFAULT_HEATMAPS}].")
@click.option("--weights", default="auto", show_default=True, help="With --dense and a timm model name as MODEL.")
def predict(model_dir: str, images: tuple[Path, ...], batch_size: int, as_json: bool, topk: int, raw: bool,
            dense: bool, out: Path | None, window: bool, scale: tuple[float, ...], short_side: tuple[int, ...],
            classes: tuple[str, ...], weights: str) -> None:
    """Classify IMAGES (files or folders) with MODEL: a probe, ensemble or fine-tuning run directory.

    Prints each image's most probable class and its probability (--topk K: the K most probable): the probe's
    calibrated probability or the fine-tuned network's softmax; --raw prints the scores before that. With --dense,
    MODEL may also be a converted directory (`transferkit convert`) or a timm model name (its ImageNet head),
    and each image gets a probability per location, at its own size or at the sizes --scale and --short-side
    give: see docs/surgery.md.
    """
    if dense:
        _predict_dense(model_dir, images, as_json, out, window, weights,
                       {"scale": list(scale), "short_side": list(short_side), "classes": list(classes)})
        return
    if scale or short_side or classes:
        raise click.UsageError("--scale, --short-side and --class need --dense")
    from transferkit.jobs import predict_images

    if not Path(model_dir).is_dir():
        raise click.BadParameter(f"'{model_dir}' is not a directory (a timm model name needs --dense)",
                                 param_hint="MODEL")
    for row in predict_images(model_dir, list(images), batch_size=batch_size, topk=topk, raw=raw):
        if as_json:
            click.echo(json.dumps(row))
        elif "labels" in row:  # multi-label: every label found, or '-' for none
            found = "; ".join(f"{x['label']} {x['score']:.3f}" for x in row["labels"]) or "-"
            click.echo(f"{row['source']}\t{found}")
        else:  # the source, then label and score of each of the top K
            click.echo("\t".join([row["source"], *(f"{t['label']}\t{t['score']:.3f}" for t in row["top"])]))


def _predict_dense(model_dir: str, images: tuple[Path, ...], as_json: bool, out: Path | None, window: bool,
                   weights: str, options: dict) -> None:
    """`predict --dense`: one line per image (the map's size and geometry in the image's pixels, the most
    probable classes), what the probabilities are once, and a hint when the image dwarfs the training size."""
    from transferkit.jobs import image_files
    from transferkit.surgery.dense import dense_predict, load_classifier

    if out is not None:  # before the network loads: never into the images' folders
        from transferkit.runtime.outputs import check_output
        from transferkit.surgery.dense import DENSE_KIND

        check_output(out, DENSE_KIND, inputs=images)
    clf = load_classifier(model_dir, window=window, weights=weights)
    hinted = False
    for i, path in enumerate(image_files(list(images))):
        row = dense_predict(clf, path, out, **options)
        if as_json:
            click.echo(json.dumps(row))
            continue
        if i == 0:
            click.echo(f"# probabilities: {row['probability']}")
        best = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in row["top"][:3])
        if "labels" in row:  # multi-label: every label found, or '-' for none
            best = "; ".join(f"{t['label']} {t['probability']:.3f}" for t in row["labels"]) or "-"
        f, n = row["field"], len(row["scales"])
        at = f" at {n} scales (finest: " if n > 1 else " ("
        click.echo(f"{path}\t{row['map_size'][0]}x{row['map_size'][1]} cells{at}stride {f['jump'][0]:.4g} px, "
                   f"field {f['size'][0]:.4g} px)\t{best}")
        hinted = hinted or _scale_hint(row, options)


def _scale_hint(row: dict, options: dict) -> bool:
    """Say once when an image's short side is over 4x the training size and no scale was asked for: objects
    much larger than the training items give flat maps (issue 18); return whether it was said."""
    train, side = min(row["train_size"]), min(row["image_size"])
    if options["scale"] or options["short_side"] or side <= 4 * train:
        return False
    sides = [s for s in (train, 2 * train, 4 * train) if s < side]
    click.echo(f"hint: {row['source']} is {side} px on its shorter side, {side / train:.0f}x the {train} px the "
               "classifier was trained at; if its objects are much larger than that, the map may be flat: try "
               + " ".join(f"--short-side {s}" for s in sides), err=True)
    return True


@cli.command()
@click.argument("model_dir", metavar="MODEL", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("data", type=DataPath())
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Directory for report.txt, metrics.json and confusion.png.")
@click.option("--per-class", type=click.IntRange(1), default=None, help="Keep the first N images of each class.")
@click.option("--batch-size", type=click_type(EXTRACTOR["batch_size"]), default=64, show_default=True)
@click.option("--tta", is_flag=True, help="Fine-tuning runs: average each image with its mirror image (a probe "
              "trained with --flip always does).")
def evaluate(model_dir: Path, data: Path, out: Path | None, per_class: int | None, batch_size: int,
             tta: bool) -> None:
    """Score MODEL (a probe, ensemble or fine-tuning run directory) on labelled DATA (folder, CSV manifest or IDX).

    Classes are matched by name: DATA may lack some of the model's classes, but not add new ones.
    """
    from transferkit.jobs import evaluate_model

    ev = evaluate_model(model_dir, data, out=out, per_class=per_class, batch_size=batch_size,
                        progress=click.get_current_context().obj["progress"], tta=tta)
    click.echo(ev.report)
    if hasattr(ev, "mAP"):  # multi-label: no confusion matrix
        click.echo(ev.summary())
        return
    plot = f"; confusion matrix {out / 'confusion.png'}" if out is not None else ""
    click.echo(f"{ev.summary()}{plot}")
