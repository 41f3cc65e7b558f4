"""Likely label errors: out-of-fold predicted probabilities of a linear classifier on the codes, ranked by confident
learning (cleanlab: Northcutt et al., "Confident Learning", JAIR 2021), with its estimate of the label noise per
class pair. Multi-label data: per label, with cleanlab's multi-label functions.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np

from transferkit.errors import DataError
from transferkit.probe.linear import check_xy

log = logging.getLogger(__name__)

# Multinomial logistic regression on standardised codes, C = N_C / n images: the penalty keeps its weight against
# the data whatever the size (sklearn's loss sums over the images). Measured on 10,000 Fashion-MNIST images with 5%
# planted flips (docs/audit.md): C = 0.003 (N_C 30) gave precision 0.94 at recall 0.7 of the flips on blocks.2|4x4
# codes and 0.90 on pre_logits, where a linear SVM's scores with one temperature gave 0.86 and 0.57, in a ninth of
# the time; C = 0.001-0.01 ranked alike (0.95-0.92).
N_C = 30.0
MULTILABEL_C = 0.01  # one logistic regression per label (multi-label data)
TOP_PAIRS = 10  # class pairs with the most estimated noise listed in summary.json (the full matrix is there too)


def out_of_fold_probabilities(codes: np.ndarray, labels: np.ndarray, *, cv: int = 5,
                              random_state: int = 0) -> np.ndarray:
    """(n, n_classes) probabilities of each image's classes from a model that never saw the image: a multinomial
    logistic regression on standardised codes, by stratified `cv`-fold cross_val_predict (multi-label (n,
    n_classes) 0/1 labels: one logistic regression per label, plain k-fold).

    Why logistic regression: trained on log-loss, its probabilities rank doubtful labels well as they are, and
    one lbfgs fit per fold is fast (a 70,000-image audit). A linear SVM needed a calibration on top (a temperature,
    or CalibratedClassifierCV's 4x the fits) and ranked planted flips worse (N_C above).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if labels.ndim == 2:
        folds = KFold(min(cv, len(labels)), shuffle=True, random_state=random_state)
        clf = OneVsRestClassifier(LogisticRegression(C=MULTILABEL_C, max_iter=1000))
    else:
        check_xy(codes, labels, for_cv=True)  # every class needs 2 images: "... too few: class k."
        folds = StratifiedKFold(min(cv, int(np.bincount(labels).min())), shuffle=True, random_state=random_state)
        clf = LogisticRegression(C=N_C / len(labels), max_iter=1000)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(did not converge|number of members).*")  # small sets: ranks alike
        try:
            return cross_val_predict(make_pipeline(StandardScaler(), clf), codes, labels, cv=folds,
                                     method="predict_proba")
        except ValueError as e:  # multi-label: a label with no positive (or no negative) image in a training fold
            raise DataError(f"too few images of some label for {folds.n_splits}-fold out-of-fold probabilities "
                            f"({e})") from e


def find_issues(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> tuple[list[dict], dict]:
    """The images whose given label confident learning doubts, most doubtful first, and the noise estimate.

    Rows: index, given, suggested, quality (cleanlab's self-confidence: the probability of the given label; for
    multi-label, its aggregate over labels). Noise: the estimated joint distribution of given and true labels.
    """
    if labels.ndim == 2:
        return _find_multilabel(labels, probs, classes)
    from cleanlab.count import estimate_joint
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    if len(np.unique(labels)) < len(classes):
        raise DataError("every class needs images for confident learning")  # open_dataset refuses such folders
    flagged = find_label_issues(labels, probs, filter_by="low_self_confidence",  # the ranking's top num_label_issues
                                return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(labels, probs)
    rows = [{"index": int(i), "given": classes[labels[i]], "suggested": classes[int(probs[i].argmax())],
             "quality": round(float(quality[i]), 6)} for i in flagged]
    joint = estimate_joint(labels, probs)  # (K given, K true), sums to 1
    return rows, _noise_summary(joint, classes)


def _noise_summary(joint: np.ndarray, classes: Sequence[str]) -> dict:
    """The estimated share of mislabelled images, and the class pairs that carry most of it."""
    off = [(float(joint[g, t]), g, t) for g in range(len(classes)) for t in range(len(classes)) if g != t]
    top = [{"given": classes[g], "true": classes[t], "fraction": round(f, 6)}
           for f, g, t in sorted(off, reverse=True)[:TOP_PAIRS] if f > 0]
    return {"estimated_noise_rate": round(float(1 - np.trace(joint)), 6), "top_pairs": top,
            "joint": np.round(joint, 6).tolist(), "joint_axes": ["given", "true"]}


def _find_multilabel(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> tuple[list[dict], dict]:
    """find_issues for (n, n_classes) 0/1 labels: an image is flagged when any of its labels looks wrong."""
    from cleanlab.count import estimate_joint
    from cleanlab.multilabel_classification.filter import find_label_issues
    from cleanlab.multilabel_classification.rank import get_label_quality_scores

    given = [list(np.flatnonzero(row)) for row in labels]
    flagged = find_label_issues(given, probs, return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(given, probs)
    names = np.asarray(classes)
    rows = [{"index": int(i), "given": ";".join(names[labels[i] == 1]), "suggested": ";".join(names[probs[i] >= 0.5]),
             "quality": round(float(quality[i]), 6)} for i in flagged]
    joint = estimate_joint(given, probs, multi_label=True)  # (K, 2 given, 2 true) per label
    per_label = {c: {"missing": round(float(j[0, 1]), 6), "wrong": round(float(j[1, 0]), 6)}
                 for c, j in zip(classes, joint)}  # given 0 but true 1 / given 1 but true 0, as shares of images
    return rows, {"estimated_noise_rate_per_label": per_label}
