"""Figures where a picture beats a table: confusion matrix, sweep, training curves, LR finder, dense heat maps.

Figures are drawn on a bare `matplotlib.figure.Figure` (Agg canvas), never through pyplot: nothing
opens a window, and the caller's pyplot backend and state are left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from transferkit.errors import DataError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

_MAX_ANNOTATED = 30  # beyond this many classes, numbers in the cells are unreadable


def plot_confusion(
    confusion: np.ndarray,
    labels: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    normalize: bool = True,
) -> Path:
    """Save a confusion-matrix heat map (rows: true class) as PNG; return its path.

    With `normalize`, cells show the % of each true class, so small classes read as clearly as big ones.
    """
    counts = np.asarray(confusion, dtype=float)
    n = len(labels)
    if counts.ndim != 2 or counts.shape != (n, n) or n == 0:
        raise DataError(f"Confusion matrix of shape {counts.shape} does not match {n} labels.")
    if normalize:
        totals = counts.sum(axis=1, keepdims=True)
        values = np.divide(100 * counts, totals, out=np.zeros_like(counts), where=totals > 0)
    else:
        values = counts
    fig = _figure(figsize=(max(4.0, 0.45 * n + 2.5), max(3.5, 0.45 * n + 2.0)))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=100 if normalize else max(values.max(), 1))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of true class" if normalize else "count")
    ax.set_xticks(range(n), [str(label) for label in labels], rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), [str(label) for label in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= _MAX_ANNOTATED:
        _annotate_cells(ax, values, counts, normalize)
    ax.set_title(title or ("Confusion matrix (row %)" if normalize else "Confusion matrix (counts)"))
    return _save(fig, path)


def plot_sweep(result_rows: Sequence[dict[str, Any]], path: str | Path, *, title: str = "",
               ylabel: str = "CV accuracy (%)") -> Path:
    """Save CV accuracy per layer (x, in the given order), one line per pooling, as PNG; return its path.

    The best view is starred and labelled: the figure answers "which layer and pooling should I use?".
    """
    if not result_rows:
        raise DataError("plot_sweep needs at least one sweep row.")
    layers = list(dict.fromkeys(str(row["layer"]) for row in result_rows))
    pools = list(dict.fromkeys(str(row["pool"]) for row in result_rows))
    fig = _figure(figsize=(max(5.0, 0.9 * len(layers) + 2.5), 4.0))
    ax = fig.add_subplot()
    for pool in pools:
        rows = [row for row in result_rows if str(row["pool"]) == pool]
        x = [layers.index(str(row["layer"])) for row in rows]
        acc = [100 * float(row["cv_accuracy"]) for row in rows]
        std = [100 * float(row.get("cv_std", 0.0)) for row in rows]
        ax.errorbar(x, acc, yerr=std, marker="o", capsize=3, label=pool)
    best = max(result_rows, key=lambda r: (float(r["cv_accuracy"]), -int(r.get("dim", 0))))
    bx, by = layers.index(str(best["layer"])), 100 * float(best["cv_accuracy"])
    ax.plot([bx], [by], marker="*", markersize=18, color="gold", markeredgecolor="black", zorder=5,
            linestyle="none")
    ax.annotate(f"best: {best['layer']}|{best['pool']} {by:.1f}%", (bx, by), xytext=(0, 14),
                textcoords="offset points", ha="center", fontsize=9)
    rotate = len(layers) > 6
    ax.set_xticks(range(len(layers)), layers, rotation=30 * rotate, ha="right" if rotate else "center")
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.margins(y=0.15)
    ax.grid(alpha=0.3)
    ax.legend(title="pooling", fontsize=8)
    ax.set_title(title or "Linear-probe accuracy by layer and pooling")
    return _save(fig, path)


def plot_curves(history: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Save loss (left) and accuracy (right) per epoch, train and validation, as PNG; return its path.

    Over- or under-fitting shows at a glance: the gap between the lines and where validation turns.
    """
    if not history:
        raise DataError("plot_curves needs at least one epoch.")
    epochs = [int(r["epoch"]) for r in history]
    fig = _figure(figsize=(9.0, 3.6))
    for k, (metric, label) in enumerate((("loss", "loss"), ("acc", "accuracy (%)"))):
        ax = fig.add_subplot(1, 2, k + 1)
        scale = 100 if metric == "acc" else 1
        for split in ("train", "val"):
            values = [scale * float(r[f"{split}_{metric}"]) for r in history]
            if not all(np.isnan(values)):
                ax.plot(epochs, values, marker="o", label=split)
        if metric == "acc" and any(not np.isnan(float(r["val_acc"])) for r in history):
            best = max(history, key=lambda r: float(r["val_acc"]))
            ax.annotate(f"best {100 * float(best['val_acc']):.2f}%", (int(best["epoch"]), 100 * float(best["val_acc"])),
                        xytext=(0, -16), textcoords="offset points", ha="center", fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "Fine-tuning curves")
    return _save(fig, path)


def plot_lr_find(lrs: Sequence[float], losses: Sequence[float], path: str | Path, *, suggestion: float | None = None,
                 title: str = "") -> Path:
    """Save smoothed training loss against learning rate (log x) as PNG, the suggested LR marked."""
    if len(lrs) != len(losses) or not len(lrs):
        raise DataError(f"plot_lr_find needs as many losses as learning rates. Got {len(lrs)} and {len(losses)}.")
    fig = _figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    ax.plot(lrs, losses)
    ax.set_xscale("log")
    if suggestion is not None:
        ax.axvline(suggestion, color="red", linestyle="--", label=f"suggested lr {suggestion:.2g}")
        ax.legend(fontsize=8)
    ax.set_xlabel("head learning rate")
    ax.set_ylabel("training loss (smoothed)")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title or "Learning-rate finder")
    return _save(fig, path)


def plot_heatmap(image: np.ndarray, heat: np.ndarray, field: Any, path: str | Path | BinaryIO, *,
                 title: str = "") -> Path | BinaryIO:
    """Save the image with a per-cell score map over it; each cell drawn at its receptive field's centre.

    `field` is a transferkit.surgery.receptive_field.Field: cell (i, j) sits at start + jump * (i, j) in input pixels,
    so the map lines up with the image whatever the network's strides and padding.
    """
    return plot_heatmaps(image, [heat], [title or "score map"], field, path, label="")


def _extent(field: Any, shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """Where an (h, w) map of `field`'s cells lies on the image: left, right, bottom, top in pixels."""
    h, w = shape
    (y0, x0), (jy, jx) = (field.y.start, field.x.start), (field.y.jump, field.x.jump)
    return x0 - jx / 2, x0 + jx * (w - 0.5), y0 + jy * (h - 0.5), y0 - jy / 2


def _under_image(ax: Any, image: np.ndarray) -> None:
    ax.imshow(image)
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(image.shape[0] - 0.5, -0.5)


def _grid_text(field: Any, shape: tuple[int, int]) -> str:
    return (f"{shape[0]}x{shape[1]} cells, stride {field.y.jump:.4g}x{field.x.jump:.4g} px, receptive field "
            f"{field.y.size:.4g}x{field.x.size:.4g} px")


def plot_heatmaps(image: np.ndarray, heats: Sequence[np.ndarray], titles: Sequence[str], field: Any,
                  path: str | Path | BinaryIO, *, label: str = "probability per cell") -> Path | BinaryIO:
    """Save one panel per map (a class's probability per cell over the image), up to 3 across; `label` says what
    the values are. Colours run from 0 to the map's own maximum: a flat map looks flat, a peak stands out."""
    n = len(heats)
    cols = min(n, 3)
    rows = -(-n // cols)
    aspect = image.shape[0] / max(1, image.shape[1])
    fig = _figure(figsize=(min(7.0, 14.0 / cols) * cols, (min(7.0, 14.0 / cols) * aspect + 0.8) * rows + 0.4))
    for i, (heat, title) in enumerate(zip(heats, titles)):
        ax = fig.add_subplot(rows, cols, i + 1)
        _under_image(ax, image)
        vmax = max(float(np.nanmax(heat)), 1e-6) if label else None
        shown = ax.imshow(heat, cmap="jet", alpha=0.45, extent=_extent(field, heat.shape), interpolation="nearest",
                          vmin=0 if label else None, vmax=vmax)
        fig.colorbar(shown, ax=ax, fraction=0.035)
        ax.set_title(f"{title} (max {vmax:.3g})" if label else title, fontsize=10)
        ax.set_xlabel(_grid_text(field, heat.shape), fontsize=8)
    if label:
        fig.suptitle(label, fontsize=9)
    return _save(fig, path)


_MAX_LEGEND = 9  # classes with their own colour in a class map (tab10 without its grey); the rest share grey


def plot_class_map(image: np.ndarray, top_class: np.ndarray, classes: Sequence[str], field: Any,
                   path: str | Path | BinaryIO, *, title: str = "most probable class per cell") -> Path | BinaryIO:
    """Save the image with each cell coloured by its most probable class, and a legend: the classes covering
    most cells (with their share of cells) in their own colour, any others in grey."""
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    ids, counts = np.unique(top_class, return_counts=True)
    ranked = ids[np.argsort(-counts, kind="stable")]
    shown = ranked[:_MAX_LEGEND]
    palette = [c for i, c in enumerate(colormaps["tab10"].colors) if i != 7]  # 7 is grey: kept for the rest
    colour = {int(k): palette[i] for i, k in enumerate(shown)}
    rgba = np.zeros((*top_class.shape, 4))
    for (i, j), k in np.ndenumerate(top_class):
        rgba[i, j] = (*colour.get(int(k), (0.5, 0.5, 0.5)), 0.5)
    fig = _figure(figsize=(9.0, 6.0 * image.shape[0] / max(1, image.shape[1]) + 1.0))
    ax = fig.add_subplot()
    _under_image(ax, image)
    ax.imshow(rgba, extent=_extent(field, top_class.shape), interpolation="nearest")
    share = dict(zip(ids.tolist(), (100 * counts / top_class.size).tolist()))
    handles = [Patch(color=colour[int(k)], label=f"{classes[k]} ({share[int(k)]:.0f}%)") for k in shown]
    if len(ranked) > len(shown):
        rest = sum(share[int(k)] for k in ranked[len(shown):])
        handles.append(Patch(color=(0.5, 0.5, 0.5), label=f"{len(ranked) - len(shown)} others ({rest:.0f}%)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, title="class (% of cells)")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(_grid_text(field, top_class.shape), fontsize=8)
    return _save(fig, path)


def _figure(figsize: tuple[float, float]) -> Figure:
    from matplotlib.figure import Figure  # lazy: keep `transferkit --help` fast

    return Figure(figsize=figsize, dpi=100)


def _annotate_cells(ax: Any, values: np.ndarray, counts: np.ndarray, normalize: bool) -> None:
    """Write each cell's % (or count) in it: white on dark cells, grey for empty ones so errors stand out."""
    threshold = (100 if normalize else values.max()) / 2
    for (i, j), value in np.ndenumerate(values):
        text = f"{value:.0f}" if normalize else f"{counts[i, j]:.0f}"
        color = "white" if value > threshold else "black" if counts[i, j] else "lightgrey"
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)


def _save(fig: Figure, path: str | Path | BinaryIO) -> Path | BinaryIO:
    """PNG to `path`, or into a binary file object (for a caller that publishes the bytes atomically)."""
    fig.tight_layout()
    if hasattr(path, "write"):
        fig.savefig(path, format="png")
        return path
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    logger.debug("wrote %s", path)  # often inside a folder not yet published: the command names the final one
    return path
