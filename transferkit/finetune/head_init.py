"""LP-FT (Kumar et al., ICLR 2022): start fine-tuning from a fitted linear probe instead of a random head.

A random head sends large, arbitrary gradients into the pretrained features in the first steps and distorts them
before the head is any good; on data unlike ImageNet that costs accuracy. Here the head starts as a logistic
regression on the network's own pooled pre-logits codes of the training images (eval transform), its C chosen by
cross-validation, and fine-tuning starts from there.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from transferkit.data.datasets import ImageDataset
from transferkit.errors import ParameterError
from transferkit.finetune.config import FinetuneConfig
from transferkit.finetune.loaders import eval_loader
from transferkit.runtime.device import autocast

log = logging.getLogger(__name__)

CS = (0.01, 0.1, 1.0)  # on codes scaled to unit overall variance; cross-validated on at most CV_IMAGES images
CV_IMAGES = 5000  # enough to pick C; the final fit uses every image


@torch.no_grad()
def pre_logits(model: nn.Module, dataset: ImageDataset, config: FinetuneConfig,
               device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(codes (n, features), targets) of `dataset`'s readable images: what the linear head sees, in eval mode."""
    model.eval()
    codes, targets = [], []
    for x, y, _, _ in eval_loader(model, dataset, config):
        if x is None:
            continue
        with autocast(config.precision, device):
            feats = model.forward_head(model.forward_features(x.to(device, memory_format=torch.channels_last)),
                                       pre_logits=True)  # (B, C, H, W) -> (B, features)
        codes.append(feats.float().cpu().numpy())
        targets.append(y.numpy())
    return np.concatenate(codes), np.concatenate(targets)


def fit_probe(codes: np.ndarray, targets: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Multinomial logistic regression on centred codes scaled by one number (their overall standard deviation), C by
    3-fold CV; returns (weight (classes, features), bias (classes,), info) for raw codes, the scaling folded in.

    Not per-feature standardisation: a feature nearly constant on the clean training images would get a huge weight
    and blow up the logits as soon as augmented images move it."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    mean, scale = codes.mean(0), float(codes.std()) or 1.0
    z = (codes - mean) / scale
    with threadpool_limits(1):  # these small solves spin-wait on BLAS threads: 50x slower on 2 busy cores (measured)
        best_c, cv_accuracy = _choose_c(z, targets, seed)
        clf = LogisticRegression(C=best_c, max_iter=1000).fit(z, targets)
    coef, intercept = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # two classes: sklearn keeps one row (the second class's logit minus the first's)
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    weight = coef / scale  # w.(x - mean) / scale = (w / scale).x - (w / scale).mean
    bias = intercept - weight @ mean
    info = {"C": best_c, "cv_accuracy": cv_accuracy, "train_accuracy": float(clf.score(z, targets)),
            "n": len(z), "classes": [int(c) for c in clf.classes_]}
    return weight.astype(np.float32), bias.astype(np.float32), info


def _choose_c(z: np.ndarray, targets: np.ndarray, seed: int) -> tuple[float, float]:
    """(C, its CV accuracy) over CS on at most CV_IMAGES images; CS[1] when a class has a single image."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, train_test_split

    if len(z) > CV_IMAGES:
        z, _, targets, _ = train_test_split(z, targets, train_size=CV_IMAGES, stratify=targets, random_state=seed)
    folds = min(3, int(np.unique(targets, return_counts=True)[1].min()))
    if folds < 2:
        return CS[1], float("nan")
    search = GridSearchCV(LogisticRegression(max_iter=1000), {"C": list(CS)}, cv=folds).fit(z, targets)
    return search.best_params_["C"], float(search.best_score_)


def init_head_from_probe(model: nn.Module, train: ImageDataset, config: FinetuneConfig,
                         device: torch.device) -> dict:
    """Set the linear head of `model` (in place) to a logistic regression fitted on its pre-logits codes of
    `train`; returns what was fitted (C, cross-validated and training accuracy) for config.json."""
    head = model.get_classifier()  # head='linear' (FinetuneConfig.validate)
    if train.multilabel:
        raise ParameterError("The 'head_init' parameter 'probe' fits one softmax over the classes; multi-label "
                             "data needs one sigmoid per label. Use head_init='prior'.", param="head_init")
    codes, targets = pre_logits(model, train, config, device)
    weight, bias, info = fit_probe(codes, targets, config.seed)
    rows = torch.tensor(info["classes"])  # a class with no training image keeps its prior head
    with torch.no_grad():
        head.weight[rows] = torch.from_numpy(weight).to(head.weight)
        head.bias[rows] = torch.from_numpy(bias).to(head.bias)
    log.info("head from a linear probe on %d pre-logits codes: C %g, CV accuracy %.3f, training accuracy %.3f",
             info["n"], info["C"], info["cv_accuracy"], info["train_accuracy"])
    return info
