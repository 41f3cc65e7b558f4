"""`extract`: every image's codes into a feature directory, reusing cached codes, in one process or several.

Under ``torchrun --nproc-per-node N`` each rank encodes one contiguous block of the images (so the rows
come out in the same order as in one process) into a shared temporary directory; rank 0 gathers what
each rank wrote and publishes the directory with one rename. Codes already in the code cache
(transferkit.codes.cache) are read instead of encoded, per rank.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from transferkit.codes.cache import CodeCache, CodeSpace
from transferkit.codes.extractor import FeatureExtractor
from transferkit.codes.pooling import pooled_dim
from transferkit.codes.spec import key_name
from transferkit.codes.store import KIND, FeatureStore, FeatureWriter
from transferkit.data.datasets import ImageDataset
from transferkit.data.decode import collate, threaded_batches
from transferkit.errors import DataError
from transferkit.runtime.distributed import World, close_world, init_world
from transferkit.runtime.outputs import check_output, new_tmp

log = logging.getLogger(__name__)


def extract(
    data: ImageDataset,
    out: str | Path,
    extractor: FeatureExtractor | None = None,
    *,
    skip_bad: bool = False,
    shard_size: int = 4096,
    cache: CodeCache | bool = True,
) -> FeatureStore:
    """Write the codes of every image in `data` to a feature directory (see transferkit.codes.store).

    Memory stays flat: codes go to disk a shard at a time. A bad image stops the run with the
    file named (nothing is published) unless `skip_bad`, which records it in the metadata.
    With `cache` (True: the default CodeCache) only images whose codes are not cached yet are encoded.
    """
    out = check_output(out, KIND, inputs=[data.root])  # before any work: never the user's data or folders
    extractor = extractor if extractor is not None else FeatureExtractor()
    if not hasattr(extractor, "backbone_"):
        extractor.fit()
    world = init_world(extractor.device_)
    try:
        return _extract(data, out, extractor, world, skip_bad, shard_size, cache)
    finally:
        close_world(world)  # the process group opened here closes here


def _extract(data: ImageDataset, out: Path, extractor: FeatureExtractor, world: World, skip_bad: bool,
             shard_size: int, cache: CodeCache | bool) -> FeatureStore:
    """extract's work, on each rank of `world`."""
    if not world.main:
        extractor.set_params(progress=False)  # one progress bar, rank 0's
    data = data.with_transform(None)
    data.skip_bad = skip_bad
    lo, hi = len(data) * world.rank // world.size, len(data) * (world.rank + 1) // world.size
    mine = data.select(np.arange(lo, hi)) if world.distributed else data
    start = time.perf_counter()
    cache = CodeCache() if cache is True else cache or None
    if world.main:  # engine and precision (part of the cache key) for the whole run: timed once, on rank 0
        extractor.plan(len(data))
    choice = _from_main(world, extractor.engine_choice_)
    if not world.main:  # every rank makes the same codes
        extractor.adopt(choice)
    spaces = code_spaces(extractor, cache)
    counts = {"cached": 0, "computed": 0}
    batches = _cached_batches(extractor, mine, spaces, shard_size, counts) if spaces else extractor.iter_batches(mine)
    tmp = _shared_tmp(out, world)
    skipped, kept = [], []
    with FeatureWriter(out, shard_size=shard_size, tmp=tmp, prefix=f"shard-r{world.rank}" if tmp else "shard",
                       inputs=[data.root]) as w:
        for codes, labels, index, bad in batches:
            skipped += [{"source": data.sources[lo + i], "error": msg} for i, msg in bad]
            if len(index):
                w.add(codes, labels, index + lo)
                kept += (index + lo).tolist()
        mine_done = {"shards": w.finish() if world.distributed else None, "kept": kept, "skipped": skipped,
                     "counts": counts, "seconds": time.perf_counter() - start}
        parts = _gather(world, mine_done)
        published = False
        try:
            if world.main:
                kept = [i for p in parts for i in p["kept"]]
                skipped = [s for p in parts for s in p["skipped"]]
                if not kept:
                    raise DataError(f"no image of '{data.root}' could be read ({len(skipped)} bad)")
                seconds = max(p["seconds"] for p in parts)
                total = {k: sum(p["counts"][k] for p in parts) for k in counts}
                cached = None if not spaces else {"root": str(cache.root), **total}
                meta = _meta(extractor, data, kept, skipped, seconds, cached, world)
                w.commit(meta, [s for p in parts for s in p["shards"]] if world.distributed else None)
                published = True
        finally:
            published = bool(_from_main(world, published))  # every rank returns (or fails) once rank 0 has finished
        if not published:
            raise DataError(f"rank 0 could not publish '{out}' (see its error)")
    if world.main and skipped:  # one line however many: the full list is in meta.json
        first = "; ".join(f"{item['source']}: {item['error']}" for item in skipped[:3])
        log.warning("skipped %d unreadable image(s) (%s%s); all are listed under 'skipped' in %s", len(skipped),
                    first, "; ..." if len(skipped) > 3 else "", out / "meta.json")
    return FeatureStore(out)


def _meta(extractor: FeatureExtractor, data: ImageDataset, kept: list[int], skipped: list[dict], seconds: float,
          cache: dict | None, world: World) -> dict:
    import timm

    from transferkit import __version__

    specs = extractor.code_specs()
    spec = next(iter(specs.values()))  # what every key shares: model, weights, transform, precision
    combined = extractor.code_spec()
    return {
        "model": spec.model,
        "weights": extractor.backbone_.weights_info.to_dict(),
        "layers": [asdict(la) for la in dict.fromkeys(la for la, _ in extractor.pairs_)],
        "pools": extractor.pools_,
        "keys": {
            key_name(la.name, p): {"layer": la.name, "pool": p, "dim": pooled_dim(la, p)}
            for la, p in extractor.pairs_
        },
        "code_spec": {key: s.to_dict() for key, s in specs.items()},  # CodeSpec.from_meta reads it
        # a combination asked for by views: its views and how they are joined (CodeSpec.from_meta reads it)
        "combinations": {} if extractor.views is None else {combined.key: {
            "views": combined.views, "scaling": combined.scaling, "dim": extractor.n_features_out_}},
        "transform": spec.transform,
        "image_size": extractor.image_size,
        "precision": spec.precision,
        "int8": None if spec.int8 is None else {**spec.int8, "mean_cosine_to_fp32": extractor.int8_cosine_},
        "engine": extractor.engine_,  # None: every code came from the cache, the network never ran
        "engine_choice": extractor.engine_choice_,  # chosen, why, each candidate's timing (codes.timing)
        "folded_batchnorms": extractor.folded_,
        "decode_threads": extractor.decode_threads_,  # after the first batch; 0: DataLoader workers
        "batch_size": extractor.batch_size,
        "dataset": {"root": str(data.root), "kind": data.kind, "n_items": len(data)},
        "classes": list(data.classes),
        "multilabel": data.multilabel,  # labels: (n, n_classes) 0/1 rows instead of (n,) class indices
        "sources": [data.sources[i] for i in kept],
        "skipped": skipped,
        "cache": cache,
        "processes": world.size,
        "seconds": round(seconds, 3),
        "images_per_second": round(len(kept) / seconds, 1) if seconds > 0 else None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"transferkit": __version__, "timm": timm.__version__, "torch": torch.__version__},
    }


def _shared_tmp(out: Path, world: World) -> Path | None:
    """One temporary directory for all ranks, named by rank 0 (None in one process: the writer picks one)."""
    if not world.distributed:
        return None
    import torch.distributed as dist

    name = [new_tmp(out, KIND).name if world.main else None]
    dist.broadcast_object_list(name, src=0)
    return out.with_name(name[0])


def _gather(world: World, obj: dict) -> list[dict]:
    """Every rank's `obj`, in rank order, on rank 0 ([obj] in one process)."""
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    parts = [None] * world.size if world.main else None
    dist.gather_object(obj, parts, dst=0)
    return parts or []


def _from_main(world: World, value):
    """Rank 0's `value` (any picklable object) on every rank."""
    if not world.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]

def code_spaces(extractor: FeatureExtractor, cache: CodeCache | None) -> dict[str, CodeSpace]:
    """The cache space of each 'layer|pool' the extractor makes ({} without a cache): one per CodeSpec."""
    if cache is None:
        return {}
    return {key: cache.space(spec) for key, spec in extractor.code_specs().items()}


def _cached_batches(extractor: FeatureExtractor, data: ImageDataset, spaces: dict[str, CodeSpace], chunk: int,
                    counts: dict[str, int]) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, list]]:
    """iter_batches' rows in item order, cached ones read from `spaces`, only the rest encoded (and cached).

    At most about `chunk` rows are held at a time, whatever the mix of cached and new images.
    """
    hashes = data.content_hashes()
    cached = np.logical_and.reduce([space.has(hashes) for space in spaces.values()])
    todo = np.flatnonzero(~cached)
    counts.update(cached=int(cached.sum()), computed=0)
    log.info("code cache: %d of %d images cached, encoding %d", counts["cached"], len(data), len(todo))

    def from_cache(idx: np.ndarray):
        for part in np.array_split(idx, max(1, math.ceil(len(idx) / chunk))) if len(idx) else ():
            hs = [hashes[i] for i in part]
            yield {k: space.get(hs) for k, space in spaces.items()}, data.targets[part], part, []

    done = 0  # items before this position are emitted
    writable = True  # the cache only saves time: a full or read-only cache disk never stops a run
    batches = extractor.iter_batches(data.select(todo)) if len(todo) else ()
    for codes, labels, index, bad in batches:
        bad = [(int(todo[i]), msg) for i, msg in bad]
        index = todo[index]
        if not len(index):
            yield codes, labels, index, bad
            continue
        try:
            for key, space in spaces.items():
                if writable:
                    space.add([hashes[i] for i in index], codes[key])
        except OSError as e:
            writable = False
            log.warning("code cache: cannot write to %s (%s); going on without storing codes", e.filename or
                        space.path, e.strerror or e)
        counts["computed"] += len(index)
        before = np.flatnonzero(cached[done:index[0]]) + done
        yield from from_cache(before)
        between = np.flatnonzero(cached[index[0]:index[-1]]) + index[0]
        if len(between):  # cached items inside this batch's span: merge them in, in item order
            hs = [hashes[i] for i in between]
            order = np.argsort(np.concatenate([index, between]), kind="stable")
            codes = {k: np.concatenate([v, spaces[k].get(hs)])[order] for k, v in codes.items()}
            labels = np.concatenate([labels, data.targets[between]])[order]
            index = np.concatenate([index, between])[order]
        done = int(index[-1]) + 1
        yield codes, labels, index, bad
    yield from from_cache(np.flatnonzero(cached[done:]) + done)


def profile(extractor: FeatureExtractor, data: ImageDataset, n: int = 256) -> dict:
    """Images/s of decoding alone (in one thread, and in one thread per core) and of the model alone, on `n`
    images, and what extract would do with them.

    When decoding is the slower one, extract decodes in parallel threads (FeatureExtractor._decoded); when
    the model is, only a faster model path helps. The engine is the one extract would pick for all of `data`.
    """
    extractor.prepare(len(data))
    sample = data.select(np.arange(min(n, len(data)))).with_transform(extractor.decode_, extractor.decode_target_)
    sample.skip_bad = True
    size = extractor.batch_size
    index = [range(i, min(i + size, len(sample))) for i in range(0, len(sample), size)]
    threads = extractor.decode_threads or os.cpu_count() or 1
    start = time.perf_counter()
    batches = [extractor.normalize(b[0]) for b in (collate([sample[i] for i in idx]) for idx in index)
               if b[0] is not None]
    decode = sum(len(x) for x in batches) / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in threaded_batches(sample, index, threads):
        pass
    parallel = sum(len(x) for x in batches) / (time.perf_counter() - start)
    extractor.model_codes(batches[0])  # warm-up
    start = time.perf_counter()
    for x in batches:
        extractor.model_codes(x)
    model = sum(len(x) for x in batches) / (time.perf_counter() - start)
    return {"images": sum(len(x) for x in batches), "decode_images_per_second": decode,
            "parallel_decode_images_per_second": parallel, "decode_threads": threads,
            "model_images_per_second": model, "engine": extractor.engine_, "precision": extractor.precision_,
            "engine_choice": extractor.engine_choice_, "exact_decode": extractor.exact_decode}
