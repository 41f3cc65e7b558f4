"""`neighbors`: the images of a codes directory most similar to some query images, for a quick look at a data set
(what does the model think looks like this?) and for retrieval.

The queries are encoded exactly as the directory's codes were made: the extractor is rebuilt from the directory's
CodeSpecs (`jobs.like_options`, as `extract --like`) and checked against them (`jobs.check_like`) before any image
is encoded, so the similarities compare like with like. Similarity is the cosine of the codes, as for
near-duplicates (`duplicates.l2_normalise`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from transferkit.auditing.nearest import l2_normalise
from transferkit.auditing.params import RETRIEVAL
from transferkit.codes.store import FeatureStore
from transferkit.errors import ParameterError
from transferkit.runtime.params import validate

log = logging.getLogger(__name__)


def neighbors(features: str | Path | FeatureStore, images: Sequence[str | Path], *, k: int = 5,
              layer: str | None = None, batch_size: int = 64, progress: bool = False) -> list[dict]:
    """For each query image (files, or folders of images), the `k` images of the codes directory `features` whose
    codes are most similar (cosine), most similar first: [{'source', 'neighbors': [{'source', 'label',
    'similarity'}, ...]}, ...].

    `layer`: which of the directory's codes to compare: a layer as `transferkit layers` names it ('pre_logits',
    'blocks.4', or its stage index '5'), or 'layer|pool'; default the layer sweep's pick if the directory was swept,
    else its only kind of codes.
    """
    validate(RETRIEVAL, {"k": k}, "neighbors")  # batch_size: FeatureExtractor checks it
    if isinstance(images, (str, Path)) or not images:
        raise ParameterError("The 'images' parameter of neighbors must be a list of image files or folders. "
                             f"Got {images!r} instead.", param="images")
    if missing := [str(p) for p in images if not Path(p).exists()]:
        raise ParameterError(f"The 'images' parameter of neighbors must name existing image files or folders: "
                             f"'{missing[0]}' does not exist.", param="images")
    store = features if isinstance(features, FeatureStore) else FeatureStore(features)
    key = pick_key(store, layer)  # every check so far before torch loads: a wrong argument is refused at once
    from transferkit.codes.extractor import FeatureExtractor
    from transferkit.jobs import check_like, image_files, like_options

    files = image_files(list(images))
    chosen, pool = key.split("|")
    extractor = FeatureExtractor(**{**like_options(store), "layer": chosen, "pool": pool}, batch_size=batch_size,
                                 progress=progress).fit()
    check_like(extractor, store)  # the rebuilt extractor makes the directory's codes, or nothing is encoded
    log.info("codes: %s of %s (%d images)", key, store.path, len(store))
    similarity = l2_normalise(extractor.transform(files)) @ l2_normalise(store.load(key)).T  # (queries, stored)
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]  # ties: the first stored image first
    sources, labels = store.sources, _label_names(store)
    return [{"source": f, "neighbors": [{"source": sources[j], "label": labels[j],
                                         "similarity": round(float(min(similarity[q, j], 1.0)), 6)} for j in row]}
            for q, (f, row) in enumerate(zip(files, order))]


def pick_key(store: FeatureStore, layer: str | None) -> str:
    """The 'layer|pool' key of `store` named by `layer` (a layer or a key); None: the sweep's pick, else the only
    key. Anything else is a ParameterError listing the directory's keys."""
    keys = ", ".join(store.keys)
    if layer is None:
        from transferkit.jobs import read_sweep  # (torch: only when no layer is named)

        if best := read_sweep(store):
            return best
        if len(store.keys) == 1:
            return store.keys[0]
        raise ParameterError(f"The 'layer' parameter of neighbors must name the codes to compare: '{store.path}' "
                             f"holds several ({keys}) and no layer sweep chose one.", param="layer")
    name, _, pool = str(layer).partition("|")
    name = name.strip()
    if name not in {key.split("|")[0] for key in store.keys}:  # '5' -> 'blocks.4', as the directory recorded it
        name = _layer_names(store).get(name, name)
    matches = [key for key in store.keys if key.split("|")[0] == name and (not pool or key.split("|")[1] == pool)]
    if len(matches) == 1:
        return matches[0]
    several = f" (layer {layer!r} has several poolings: name one as 'layer|pool')" if matches else ""
    raise ParameterError(f"The 'layer' parameter of neighbors must be one of the codes in '{store.path}': {keys}"
                         f"{several}. Got {layer!r} instead.", param="layer")


def _layer_names(store: FeatureStore) -> dict[str, str]:
    """Every way `transferkit layers` names a layer of the directory (stage index, timm module), to the name its
    keys use: meta.json records each layer's stage and module, so no network is needed."""
    names = {"pre-logits": "pre_logits"}
    for entry in store.meta.get("layers", []):
        for alias in (entry.get("stage"), entry.get("module")):
            if alias is not None:
                names[str(alias)] = entry["name"]
    return names


def _label_names(store: FeatureStore) -> list[str]:
    """Each stored image's class, or its labels joined by ';' (multi-label codes)."""
    labels, names = store.labels, np.asarray(store.classes)
    if labels.ndim == 2:
        return [";".join(names[row == 1]) for row in labels]
    return [str(names[c]) for c in labels]
