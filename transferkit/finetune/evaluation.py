"""The best epoch's model on the validation set, at the end of a run: report.txt, confusion.png and the scores
config.json keeps (per-label thresholds for multi-label runs)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from transferkit.finetune.prefix_cache import bypassed
from transferkit.runtime.atomic import write_text_atomic
from transferkit.runtime.device import autocast

if TYPE_CHECKING:
    from transferkit.finetune.loop import Run
    from transferkit.probe.metrics import Evaluation, MultiLabelEvaluation


@torch.no_grad()
def evaluate_best(run: Run, val_loader, classes: list[str]) -> Evaluation | MultiLabelEvaluation:
    """Best model on the validation set: confusion.png and per-class scores (rank 0, whole val set)."""
    from transferkit.plots import plot_confusion
    from transferkit.probe.metrics import score_predictions

    run.model.eval()
    ys, preds = [], []  # multi-label: sigmoid scores, not predictions
    loader = val_loader
    if run.world.distributed:  # the sharded loader only covers this rank's part
        loader = torch.utils.data.DataLoader(val_loader.dataset, batch_size=val_loader.batch_size,
                                             collate_fn=val_loader.collate_fn)
    with bypassed(run.bypass):
        for x, y, _, _ in loader:
            if x is None:
                continue
            with autocast(run.config.precision, run.device):
                logits = run.model(x.to(run.device, memory_format=torch.channels_last)).float()
                preds.append((logits.sigmoid() if run.multilabel else logits.argmax(1)).cpu())
            ys.append(y)
    y, pred = torch.cat(ys).numpy(), torch.cat(preds).numpy()
    if run.multilabel:  # per-label thresholds chosen here, on the validation set, and kept in config.json
        from transferkit.probe.metrics import score_multilabel
        from transferkit.probe.multilabel import best_thresholds

        thresholds = best_thresholds(y, pred)  # on sigmoids: 2 never and 0 always predicts (JSON has no inf)
        ev = score_multilabel(y, pred, np.where(np.isfinite(thresholds), thresholds, np.where(thresholds > 0, 2, 0)),
                              classes)
        write_text_atomic(run.out / "report.txt", ev.report)
        return ev
    ev = score_predictions(y, pred, np.arange(len(classes)), classes)
    plot_confusion(ev.confusion, ev.labels, run.out / "confusion.png",
                   title=f"best model on validation: {100 * ev.accuracy:.2f}% "
                         f"(balanced {100 * ev.balanced_accuracy:.2f}%)")
    write_text_atomic(run.out / "report.txt", ev.report)
    return ev
