"""Which of the four recipes fits a dataset: measure its size and its similarity to ImageNet, then decide.

Size is counted. Similarity is measured by two signals from one forward pass of the pretrained
network over a stratified sample of the images:

- the layer gap: cross-validated linear-probe accuracy of the best earlier stage's codes minus that of
  the top-layer (pre-logits) codes. On data like ImageNet's the top layer is the best; on data unlike
  it, more generic earlier stages win (cs231n; Yosinski et al. 2014).
- the ImageNet classifier's confidence: mean max-softmax and mean entropy of its 1000-class output.
  Images like ImageNet's get confident predictions; unlike ones get flat, uncertain ones.

The rule and its thresholds are in `Thresholds`; docs/recipes.md explains them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferkit import recipes
from transferkit.codes.extractor import FeatureExtractor
from transferkit.data.datasets import ImageDataset
from transferkit.data.decode import collate
from transferkit.data.transforms import build_transform, describe_transform
from transferkit.errors import DataError
from transferkit.finetune.config import FinetuneConfig
from transferkit.jobs import SWEEP_SAMPLES, load_data
from transferkit.models.backbones import create_backbone
from transferkit.models.params import DEFAULT_MODEL, PRE_LOGITS
from transferkit.models.stages import freeze_until, replace_head, resolve_stage, set_train_mode
from transferkit.probe.linear import LinearProbe
from transferkit.probe.params import SELECT_MAX_VIEWS
from transferkit.probe.sweep import sweep

TOP = f"{PRE_LOGITS}|avg"  # the top-layer codes small-similar probes


@dataclass(frozen=True)
class Thresholds:
    """The decision rule's cut-offs (see docs/recipes.md for where each value comes from).

    large:     median images per class >= large_per_class
    different: the best earlier stage beats the top layer by more than gap_points (CV accuracy, points)
               with McNemar's z above gap_z, OR the ImageNet classifier's mean max-softmax is below max_softmax
    weighted:  largest class / smallest class > imbalance: the recipe runs with class_weight='balanced'
    Multi-label data: a class's count is the images carrying its label, and CV mAP stands for CV accuracy.
    """

    large_per_class: int = 2500  # measured: the probe won at 1,000/class, fine-tuning at 6,000 (docs/benchmarks.md)
    gap_points: float = 1.0  # below the 5-9 points the sweep gains on Fashion-MNIST (docs/benchmarks.md)
    gap_z: float = 2.0  # and the gap must stand out of its noise: McNemar's z on the same CV predictions
    max_softmax: float = 0.5  # model- and size-specific: Lite0 at 64 px gives 0.77-0.83 on FMNIST and photos alike
    # measured (docs/benchmarks.md, long-tailed Fashion-MNIST, probe, 1,000 images in the largest class): class
    # weighting raised balanced accuracy by +0.35 points at ratio 3 (noise), +1.0 at 10 and +3.0 at 100 (+0.7 and
    # +2.1 with 6,000), and never lowered it; so weight above 3, where the gain starts to show
    imbalance: float = 3.0

    def replace(self, **overrides: Any) -> Thresholds:
        """A copy with some thresholds changed; unknown names and non-numbers fail, naming them."""
        allowed = [f.name for f in dataclasses.fields(self)]
        for key, value in overrides.items():
            if key not in allowed:
                raise DataError(f"unknown threshold '{key}'. Thresholds: {', '.join(allowed)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise DataError(f"The '{key}' threshold must be a number >= 0. Got {value!r} instead.")
        return dataclasses.replace(self, **overrides)

    def text(self) -> str:
        return (f"large if median images per class >= {self.large_per_class}; different if the best earlier "
                f"stage beats the top layer by > {self.gap_points:g} points with z > {self.gap_z:g}, or mean "
                f"max-softmax < {self.max_softmax:g}; class weighting if largest/smallest class > "
                f"{self.imbalance:g}")


@dataclass(frozen=True)
class Advice:
    """The recommended recipe and the numbers behind it."""

    recipe: str
    size: str  # "small" or "large"
    domain: str  # "similar" or "different"
    reasons: tuple[str, ...]
    data: str
    n_images: int
    n_classes: int
    per_class_min: int
    per_class_median: float
    per_class_max: int
    imbalance: float  # largest class / smallest class
    class_counts: dict[str, int]  # images per class name (multi-label: images with the label), the class order
    class_weight: str | None  # 'balanced' when imbalance > thresholds.imbalance: the recipe runs weighted
    n_sampled: int  # images in the similarity pass
    image_size: int  # of the similarity pass
    cv: int
    cv_metric: str  # what the sweep scored: accuracy, or balanced_accuracy on imbalanced classes
    top_accuracy: float  # CV accuracy (cv_metric) of the pre-logits codes
    best_earlier: str  # 'layer|pool' of the best earlier stage
    best_earlier_accuracy: float
    gap_points: float  # 100 * (best_earlier_accuracy - top_accuracy)
    wins: int  # images the best earlier stage gets right and the top layer wrong, same CV folds
    losses: int  # ... and the reverse
    gap_z: float  # McNemar's z = (wins - losses) / sqrt(wins + losses): the gap in units of its noise
    stage_accuracy: dict[str, float]  # best CV accuracy per stage (any pooling), network order
    max_softmax: float  # mean over images of the ImageNet classifier's top probability
    entropy: float  # mean entropy of its 1000-class output, in nats
    max_entropy: float  # ln(number of ImageNet classes): the entropy of a uniform guess
    thresholds: Thresholds
    images_per_second: float  # forward pass throughput measured in the pass
    pass_seconds: float
    estimate_seconds: float  # of the recommended recipe on all images, on this machine
    estimate: str  # how the estimate is made up
    multilabel: bool = False  # several labels per image: mAP, one SVM or sigmoid per label

    def report(self) -> str:
        """What `transferkit advise` prints."""
        best = self.stage_accuracy
        lines = [
            f"data: {self.data}: {self.n_images} images, {self.n_classes} classes; per class min {self.per_class_min}, "
            f"median {self.per_class_median:g}, max {self.per_class_max} (imbalance {self.imbalance:.1f}x)",
            ("  images per label (multi-label): " if self.multilabel else "  class counts: ")
            + ", ".join(f"{name} {n}" for name, n in self.class_counts.items()),
            f"similarity to ImageNet: one pass over {self.n_sampled} images at {self.image_size} px "
            f"({self.images_per_second:.0f} img/s, {self.pass_seconds:.0f} s), {self.cv}-fold CV linear SVM",
            f"  top layer {TOP}: {100 * self.top_accuracy:.2f}% CV {self.cv_metric.replace('_', ' ')}; "
            "best earlier stage "
            f"{self.best_earlier}: {100 * self.best_earlier_accuracy:.2f}% -> gap {self.gap_points:+.2f} points",
            f"  same CV folds, image by image: the earlier stage alone is right on {self.wins}, the top layer alone "
            f"on {self.losses}: McNemar z = {self.gap_z:.2f}",
            "  per stage: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in best.items()),
            f"  ImageNet classifier: mean max-softmax {self.max_softmax:.3f}, mean entropy {self.entropy:.2f} nats "
            f"(uniform: {self.max_entropy:.2f})",
            f"thresholds: {self.thresholds.text()}",
            f"size: {self.size}; domain: {self.domain} ({'; '.join(self.reasons)})",
            f"recommended recipe: {self.recipe} - {recipes.get(self.recipe).description}"
            + (f"; with {', '.join(f'{k}={v}' for k, v in self.balancing().items())} (imbalance "
               f"{self.imbalance:.1f}x > {self.thresholds.imbalance:g})" if self.class_weight else ""),
            f"estimated run time on this machine: {_duration(self.estimate_seconds)} ({self.estimate})",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run(self, train: str | Path | ImageDataset, test: str | Path | ImageDataset | None, out: str | Path,
            *, progress: bool = True) -> recipes.RecipeResult:
        """Run the recommended recipe (see Recipe.run), class-weighted when the classes are imbalanced."""
        return self.recipe_to_run().run(train, test, out, progress=progress)

    def balancing(self) -> dict[str, str]:
        """The settings that balance the classes in the recommended recipe ({} when they are balanced enough):
        the SVM's class_weight for a probe recipe; for fine-tuning a class-balanced sampler, which beat the
        weighted loss on long-tailed Fashion-MNIST (ratio 100: balanced accuracy 85.11% against 79.68%, plain
        79.84%; one seed, bench/longtail.py --finetune, docs/benchmarks.md). Multi-label data has no one class
        per image to balance draws by: fine-tuning weighs each label's positives (class_weight, BCE's pos_weight)."""
        if not self.class_weight:
            return {}
        if recipes.get(self.recipe).kind == "finetune" and not self.multilabel:
            return {"sampler": "balanced"}
        return {"class_weight": self.class_weight}

    def recipe_to_run(self) -> recipes.Recipe:
        """The recommended recipe with the class balancing this dataset needs (`balancing`)."""
        return recipes.get(self.recipe).replace(**self.balancing())


def advise(
    data: str | Path | ImageDataset,
    *,
    per_class: int | None = None,
    thresholds: Thresholds | Mapping[str, float] | None = None,
    model: str = DEFAULT_MODEL,
    weights: str = "auto",
    image_size: int | None = 64,
    sample: int = SWEEP_SAMPLES,
    batch_size: int = 64,
    progress: bool = True,
) -> Advice:
    """Measure `data`'s size and similarity to ImageNet and recommend one of the four recipes.

    The similarity pass sees a stratified sample of at most `sample` images at `image_size` (None:
    the model's pretrained size), with `model`'s ImageNet weights and classifier.
    """
    if not isinstance(thresholds, Thresholds):
        thresholds = Thresholds().replace(**(thresholds or {}))
    dataset = data if isinstance(data, ImageDataset) else load_data(data, per_class=per_class)
    all_counts = dataset.class_counts()
    class_counts = {name: int(n) for name, n in zip(dataset.classes, all_counts, strict=True) if n > 0}
    counts = all_counts[all_counts > 0]
    imbalance = float(counts.max() / counts.min())
    subset = _stratified(dataset, sample)
    signals, internals = _similarity(subset, model, weights, image_size, batch_size, progress)
    median = float(np.median(counts))
    size = "large" if median >= thresholds.large_per_class else "small"
    reasons = [f"median {median:g} per class {'>=' if size == 'large' else '<'} {thresholds.large_per_class}"]
    by_gap = signals["gap_points"] > thresholds.gap_points and signals["gap_z"] > thresholds.gap_z
    by_confidence = signals["max_softmax"] < thresholds.max_softmax
    reasons.append(f"gap {signals['gap_points']:+.2f} points, z {signals['gap_z']:.2f}: "
                   f"{'above' if by_gap else 'not above'} {thresholds.gap_points:g} points and z {thresholds.gap_z:g}")
    reasons.append(f"max-softmax {signals['max_softmax']:.3f} {'<' if by_confidence else '>='} "
                   f"{thresholds.max_softmax:g}")
    domain = "different" if by_gap or by_confidence else "similar"
    name = f"{size}-{domain}"
    seconds, how = _estimate(recipes.get(name), len(dataset), len(counts), subset, {**signals, **internals})
    return Advice(
        recipe=name, size=size, domain=domain, reasons=tuple(reasons), data=str(dataset.root),
        n_images=len(dataset), n_classes=len(counts), per_class_min=int(counts.min()), per_class_median=median,
        per_class_max=int(counts.max()), imbalance=imbalance, class_counts=class_counts,
        class_weight="balanced" if imbalance > thresholds.imbalance else None, thresholds=thresholds,
        estimate_seconds=seconds, estimate=how, multilabel=dataset.multilabel, **signals,
    )


def _stratified(dataset: ImageDataset, n: int) -> ImageDataset:
    """At most `n` images, every class in proportion (all of them if there are no more than `n`; multi-label:
    a random sample)."""
    if len(dataset) <= n:
        return dataset
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(dataset))
    try:
        idx, _ = train_test_split(idx, train_size=n, random_state=0,
                                  stratify=None if dataset.multilabel else dataset.targets)
    except ValueError:  # a class too small to stratify: a plain random sample
        idx = np.random.default_rng(0).choice(idx, n, replace=False)
    return dataset.select(np.sort(idx))


def _similarity(dataset: ImageDataset, model: str, weights: str, image_size: int | None, batch_size: int,
                progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """One pass: every stage x pooling and the pre-logits codes, and the ImageNet logits from the same codes.

    Returns the signals (Advice's fields) and what the run-time estimate needs.
    """
    counts = dataset.class_counts()
    cv = min(3, len(dataset)) if dataset.multilabel else int(min(3, counts[counts > 0].min()))  # KFold: any label
    if cv < 2:
        raise DataError(f"advise needs at least 2 images in every class of '{dataset.root}' to cross-validate; "
                        f"the smallest has {counts[counts > 0].min()}")
    # fp32: the thresholds and the measurements in docs/recipes.md were made with fp32 codes
    extractor = FeatureExtractor(model, weights=weights, layer="all", pool="all", image_size=image_size,
                                 batch_size=batch_size, precision="fp32", progress=progress).fit()
    keys = [k for k in extractor.keys_ if not k.startswith(f"{PRE_LOGITS}|")] + [TOP]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    labels, max_p, entropy = [], [], []
    classifier = extractor.backbone_.get_classifier()
    start = time.perf_counter()
    for codes, y, _, _ in extractor.iter_batches(dataset):
        for k in keys:
            parts[k].append(codes[k])
        labels.append(y)
        with torch.inference_mode():
            top = torch.from_numpy(codes[TOP]).to(extractor.device_, next(classifier.parameters()).dtype)
            logits = classifier(top)  # (B, 1280) -> (B, 1000)
            logp = logits.float().log_softmax(1)
        n_outputs = logp.shape[1]
        max_p.append(logp.max(1).values.exp().cpu().numpy())
        entropy.append(-(logp.exp() * logp).sum(1).cpu().numpy())
    seconds = time.perf_counter() - start
    y = np.concatenate([part for part in labels if len(part)])  # a batch of unreadable images yields none
    views = {tuple(k.split("|")): np.concatenate(parts[k]) for k in keys}
    start = time.perf_counter()
    result = sweep(views, y, cv=cv, max_samples=None, progress=progress)
    sweep_seconds = time.perf_counter() - start
    rows = {f"{r['layer']}|{r['pool']}": r for r in result.rows}
    earlier = max((r for k, r in rows.items() if k != TOP), key=lambda r: (r["cv_accuracy"], -r["dim"]))
    stage_accuracy: dict[str, float] = {}
    for r in result.rows:
        if r["layer"] != PRE_LOGITS:
            stage_accuracy[r["layer"]] = max(stage_accuracy.get(r["layer"], 0.0), r["cv_accuracy"])
    top = rows[TOP]["cv_accuracy"]
    wins, losses = _paired(views, y, rows[TOP], earlier, cv)
    side = describe_transform(extractor.data_config_, image_size)["input_size"][-1]
    return {
        "n_sampled": len(y), "image_size": side, "cv": cv, "cv_metric": result.metric, "top_accuracy": top,
        "best_earlier": f"{earlier['layer']}|{earlier['pool']}", "best_earlier_accuracy": earlier["cv_accuracy"],
        "gap_points": 100 * (earlier["cv_accuracy"] - top), "wins": wins, "losses": losses,
        "gap_z": (wins - losses) / math.sqrt(wins + losses) if wins + losses else 0.0,
        "stage_accuracy": stage_accuracy,
        "max_softmax": float(np.concatenate(max_p).mean()), "entropy": float(np.concatenate(entropy).mean()),
        "max_entropy": math.log(n_outputs), "images_per_second": len(y) / seconds,
        "pass_seconds": seconds,
    }, {"model": model, "weights": weights, "sweep_seconds": sweep_seconds, "top_seconds": rows[TOP]["seconds"],
        "side": side, "candidate_seconds": [r["seconds"] for r in result.candidates()]}


def _paired(views: dict, y: np.ndarray, top: dict, earlier: dict, cv: int) -> tuple[int, int]:
    """Images the earlier stage gets right and the top layer wrong (wins), and the reverse (losses).

    Same folds, C and solver settings as the sweep, so these are the sweep's own CV predictions. Multi-label:
    each image's yes/no on each label (out-of-fold scores at thresholds chosen on them) counts as one decision.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    right = []
    if y.ndim == 2:
        from transferkit.probe.multilabel import MultiLabelProbe, best_thresholds

        for row in (top, earlier):
            probe = MultiLabelProbe(C=row["C"], cv=cv, max_iter=1000, tol=1e-2)  # the sweep's looser fit
            _, oof, _, _ = probe._cv_path(views[row["layer"], row["pool"]], y, log_each=False)
            right.append(((oof >= best_thresholds(y, oof)) == y).ravel())
        return int((right[1] & ~right[0]).sum()), int((right[0] & ~right[1]).sum())
    folds = StratifiedKFold(n_splits=cv, shuffle=True, random_state=0)
    for row in (top, earlier):
        probe = LinearProbe(C=row["C"], max_iter=1000, tol=1e-2)  # the sweep's looser fit (transferkit.probe.sweep)
        right.append(cross_val_predict(probe, views[row["layer"], row["pool"]], y, cv=folds) == y)
    return int((right[1] & ~right[0]).sum()), int((right[0] & ~right[1]).sum())


def _estimate(recipe: recipes.Recipe, n: int, n_classes: int, sample: ImageDataset,
              signals: dict[str, Any]) -> tuple[float, str]:
    """Seconds the recipe would take on all `n` images here, from throughput measured on this machine."""
    s = recipe.settings
    side = s.image_size or signals["side"]
    rate = signals["images_per_second"] * (signals["side"] / side) ** 2  # a forward pass costs ~ pixels
    if recipe.kind == "probe":
        parts = [f"extract {n} images at ~{rate:.0f} img/s"]
        seconds = n / rate
        if s.layer == "auto":
            seconds += signals["sweep_seconds"] + (min(n, SWEEP_SAMPLES) / rate if n > SWEEP_SAMPLES else 0)
            parts.append(f"layer sweep ~{signals['sweep_seconds']:.0f} s")
            if s.combine and not sample.multilabel:
                select = _selection_seconds(signals["candidate_seconds"]) * min(n, SWEEP_SAMPLES) / signals["n_sampled"]
                seconds += select
                parts.append(f"view selection up to ~{select:.0f} s")
        fit = signals["top_seconds"] * (s.cv + 1) / signals["cv"] * n / signals["n_sampled"]
        parts.append(f"SVM fit ~{fit:.0f} s (scaled from the pass's CV)")
        ran = s.for_labels(sample.multilabel)
        if copies := ran.flip + ran.augment:  # the mirror images' and copies' codes, and a refit on all the rows
            extra = copies * n / rate + fit * (1 + copies) / (s.cv + 1)
            seconds += extra
            what = ["mirror codes"] * ran.flip + [f"codes of {ran.augment} shifted copies"] * bool(ran.augment)
            parts.append(f"{' and '.join(what)} and refit ~{extra:.0f} s")
        return seconds + fit, "; ".join(parts)
    n_val = max(round(s.val_fraction * n), n_classes) if s.val_fraction else 0
    # a fresh fp32 network: the pass's own is folded (no BatchNorm) and perhaps bf16, unlike a training run
    train_rate = _training_rate(create_backbone(signals["model"], signals["weights"]), sample, s)
    seconds = s.epochs * ((n - n_val) / train_rate + n_val / rate)
    how = (f"{s.epochs} epochs x {n - n_val} training images at {train_rate:.0f} img/s (measured over a few steps) "
           f"+ validation of {n_val} images per epoch")
    if s.freeze_until != "none" and not s.augment and s.cache:
        how += "; an upper bound: the frozen-prefix cache computes the frozen stages once, not every epoch"
    return seconds, how


# a combination's CV over its views' CV times summed: it needs more iterations and C steps. Measured on Fashion-MNIST
# (100 per class, 64 px, 2026-11-27): selection 116 s against 67 s summed
COMBINED_COST = 1.7


def _selection_seconds(candidates: Sequence[float]) -> float:
    """Greedy selection's CV time at most (jobs.extract: every step runs), from its candidates' sweep times
    (best first): a combination's CV costs COMBINED_COST x the sum of its views'."""
    chosen, rest, total = candidates[0], list(candidates[1:]), 0.0
    for _ in range(SELECT_MAX_VIEWS - 1):
        if not rest:
            break
        total += sum(chosen + r for r in rest)
        chosen += rest.pop(0)  # the next best view joins (an estimate: selection picks by CV)
    return COMBINED_COST * total


def _training_rate(backbone: torch.nn.Module, dataset: ImageDataset, config: FinetuneConfig, steps: int = 3) -> float:
    """Training images/s of the recipe's setup (head, freezing, image size, batch), timed over a few steps."""
    import timm.data

    model = backbone
    replace_head(model, len(dataset.classes), head=config.head, image_size=config.image_size)
    freeze_until(model, resolve_stage(model, config.freeze_until))
    set_train_mode(model, config.train_bn)
    transform = build_transform(timm.data.resolve_model_data_config(model), config.image_size)
    batch = max(2, min(config.batch_size, len(dataset)))
    loader = torch.utils.data.DataLoader(dataset.with_transform(transform), batch_size=batch, shuffle=True,
                                         drop_last=True, collate_fn=collate, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    seen, seconds = 0, 0.0
    with torch.inference_mode(False), torch.enable_grad():
        for step, (x, y, _, _) in enumerate(_cycle(loader, steps + 1)):
            start = time.perf_counter()
            x = x.to(next(model.parameters()).device, memory_format=torch.channels_last)
            logits, y = model(x), y.to(x.device)
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, y.float()) if y.ndim == 2 else
                    torch.nn.functional.cross_entropy(logits, y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step:  # the first step pays for allocation and kernel selection
                seen, seconds = seen + len(y), seconds + time.perf_counter() - start
    return seen / seconds


def _cycle(loader, n: int):
    """`n` batches, going round `loader` as often as needed."""
    while n > 0:
        for batch in loader:
            yield batch
            n -= 1
            if n == 0:
                return


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


def parse_thresholds(items: Sequence[str]) -> Thresholds:
    """`name=value` strings (as `--threshold` takes them) -> Thresholds."""
    return Thresholds().replace(**recipes.parse_overrides(items, option="--threshold"))
