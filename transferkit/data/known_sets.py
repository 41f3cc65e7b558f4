"""Class names of well-known IDX data sets, found by content, so their reports, plots and JSON read 'Sneaker'
rather than '7' without a `classes.txt` beside the files (which, when present, wins)."""

from __future__ import annotations

import hashlib

import numpy as np

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

# sha256 of the label bytes (after the IDX header; the same gzipped or not) -> the set's class names
KNOWN_LABELS = {
    "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7": FASHION_MNIST_CLASSES,  # train, 60,000
    "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9": FASHION_MNIST_CLASSES,  # t10k, 10,000
}


def known_class_names(labels: np.ndarray) -> tuple[str, ...] | None:
    """The class names of a known set whose labels these are (uint8, file order), else None."""
    digest = hashlib.sha256(np.ascontiguousarray(labels, dtype=np.uint8).tobytes()).hexdigest()
    return KNOWN_LABELS.get(digest)
