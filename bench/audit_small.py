"""Small-scale measurements behind `transferkit audit`'s defaults (docs/audit.md): planted label flips on
Fashion-MNIST (which classifier gives cleanlab the better out-of-fold probabilities) and planted near-duplicates
(where the near-duplicate threshold goes). Usage: python bench/audit_small.py [PER_CLASS] [IMAGE_SIZE]."""

from __future__ import annotations

import io
import sys
import time

import numpy as np
from PIL import Image


def codes_of(images, size: int) -> np.ndarray:
    from transferkit.codes.extractor import FeatureExtractor

    return FeatureExtractor(layer="pre_logits", pool="avg", image_size=size, progress=False).fit().transform(images)


def label_noise(codes: np.ndarray, y: np.ndarray, rate: float, seed: int = 0) -> dict:
    """Precision and recall of cleanlab's flags on `rate` planted flips, for each out-of-fold classifier."""
    from cleanlab.filter import find_label_issues
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    from transferkit.auditing.label_issues import out_of_fold_probabilities

    rng = np.random.default_rng(seed)
    flip = rng.choice(len(y), int(rate * len(y)), replace=False)
    noisy = y.copy()
    noisy[flip] = (y[flip] + rng.integers(1, 10, len(flip))) % 10  # another class, uniformly
    svc = make_pipeline(StandardScaler(), CalibratedClassifierCV(LinearSVC(C=0.01), cv=3))
    found = {}
    for name, probs in (
        ("logistic", lambda: out_of_fold_probabilities(codes, noisy, cv=5)),
        ("calibrated_svc", lambda: cross_val_predict(svc, codes, noisy, method="predict_proba",
                                                     cv=StratifiedKFold(5, shuffle=True, random_state=0))),
    ):
        start = time.perf_counter()
        flagged = find_label_issues(noisy, probs())
        hit = flagged[flip].sum()
        found[name] = {"flagged": int(flagged.sum()), "precision": round(hit / max(flagged.sum(), 1), 3),
                       "recall": round(hit / len(flip), 3), "seconds": round(time.perf_counter() - start, 1)}
    return found


def transformed(img: Image.Image, rng) -> Image.Image:
    """A near-duplicate: resized down to 60-90% and back up, re-encoded as JPEG at quality 60-90."""
    w, h = img.size
    f = rng.uniform(0.6, 0.9)
    img = img.resize((max(1, round(w * f)), max(1, round(h * f)))).resize((w, h))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=int(rng.integers(60, 91)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def near_duplicates(train, codes: np.ndarray, size: int, n: int = 100) -> dict:
    """Cosine similarity of planted copies to their originals vs of each copy's closest other training image."""
    from transferkit.auditing.nearest import l2_normalise

    rng = np.random.default_rng(1)
    pick = rng.choice(len(train), n, replace=False)
    copies = l2_normalise(codes_of([transformed(train.image(int(i)), rng) for i in pick], size))
    unit = l2_normalise(codes)
    sim = copies @ unit.T  # (n, N)
    planted = sim[np.arange(n), pick]
    sim[np.arange(n), pick] = -1
    others = np.sort(unit @ unit.T, axis=1)[:, -2]  # each training image's closest other training image
    return {"planted_min": round(float(planted.min()), 4), "planted_p5": round(float(np.percentile(planted, 5)), 4),
            "planted_median": round(float(np.median(planted)), 4),
            "copy_to_other_max": round(float(sim.max()), 4),
            "train_closest_other_p99": round(float(np.percentile(others, 99)), 4),
            "train_closest_other_max": round(float(others.max()), 4)}


def main(per_class: int = 100, size: int = 64) -> None:
    from transferkit.recipes.demo import fashion_mnist

    train = fashion_mnist("train", per_class=per_class)
    start = time.perf_counter()
    codes = codes_of(train, size)
    print(f"{len(train)} Fashion-MNIST images at {size} px: codes in {time.perf_counter() - start:.1f} s")
    for rate in (0.05, 0.20):
        print(f"label flips {rate:.0%}:", label_noise(codes, np.asarray(train.targets), rate))
    print("near-duplicates:", near_duplicates(train, codes, size))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
