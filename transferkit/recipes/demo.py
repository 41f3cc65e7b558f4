"""The offline demo: Fashion-MNIST (Debian package) with the packaged EfficientNet-Lite0."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from transferkit.errors import DataError
from transferkit.jobs import extract_features, load_data, train_probe
from transferkit.runtime.outputs import claim

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
DEMO_IMAGE_SIZE = 64  # 28x28 items upscaled; see docs/benchmarks.md for the size sweep


def fashion_mnist(split: str, data: Path | None = None, per_class: int | None = None):
    """Fashion-MNIST 'train' or 't10k' as an ImageDataset with its class names."""
    root = Path(data) if data is not None else FASHION_MNIST
    if not any(root.glob(f"{split}-images-idx3-ubyte*")):
        raise DataError(
            f"Fashion-MNIST not found in '{root}': apt-get install dataset-fashion-mnist, "
            "or set the 'data' parameter to a folder holding the IDX files (see data/README.md)"
        )
    return load_data(root / split, per_class=per_class)  # class names: transferkit.data.known_sets


def run_demo(
    out: str | Path,
    *,
    data: Path | None = None,
    per_class: int = 100,
    image_size: int | None = None,
    echo: Callable[[str], None] = lambda s: None,
    progress: bool = True,
) -> dict:
    """Extract every stage x pooling on the training slice, sweep, encode the test set alike, probe."""
    out, start = Path(out), time.perf_counter()
    size = image_size or DEMO_IMAGE_SIZE
    train = fashion_mnist("train", data, per_class)
    test = fashion_mnist("t10k", data)
    claim(out, "demo", inputs=[data])
    echo(f"Fashion-MNIST: {len(train)} training images ({per_class} per class), {len(test)} test images, "
         f"resized to {size}x{size}")
    train_store = extract_features(train, out / "train", layer="auto", image_size=size, progress=progress)
    extract_features(test, out / "test", like=train_store.path, progress=progress)
    report = train_probe(train_store, out / "probe", test=out / "test", layer="best")
    return {
        "test_accuracy": report.evaluation.accuracy,
        "evaluation": report.evaluation,
        "n_test": len(test),
        "n_train": len(train),
        "key": report.key,
        "seconds": time.perf_counter() - start,
    }
