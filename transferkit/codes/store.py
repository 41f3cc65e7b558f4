"""Feature files on disk: a directory of .npz shards plus meta.json, written atomically.

Layout of a feature directory::

    FEATURES/
      meta.json            # model, weights sha256, layers, pools, transform, classes, sources, shards
      shard-00000.npz      # 'labels' (n,), 'index' (n,), and one (n, D) float32 array per 'layer|pool'
      shard-00001.npz ...

Shards keep memory flat while extracting; the directory only appears (or replaces an older
feature directory, never anything transferkit did not write: transferkit.runtime.outputs) once every shard
and the metadata are written, so a failed run leaves what was there before untouched. No pickle
anywhere: arrays load with allow_pickle=False.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from transferkit.codes.params import RENAMED, view_keys
from transferkit.errors import DataError
from transferkit.runtime.atomic import naming, write_json_atomic
from transferkit.runtime.outputs import check_output, new_tmp, publish

FORMAT = "transferkit.features/2"  # 2: pools named as in timm (format 1's 'avgmax' is 'catavgmax')
FORMAT_1 = "transferkit.features/1"  # still read, its pools renamed on load (transferkit.codes.pooling.RENAMED)
META = "meta.json"
KIND = "features"  # the output kind in the directory's marker (transferkit.runtime.outputs)


class FeatureWriter:
    """Collect codes batch by batch; `commit(meta)` publishes the directory in one rename."""

    def __init__(self, out: str | Path, shard_size: int = 4096, *, tmp: str | Path | None = None,
                 prefix: str = "shard", inputs: Iterable[str | Path | None] = ()) -> None:
        """`tmp` and `prefix`: several processes (torchrun ranks) write their shards into one shared directory.
        `inputs`: paths `out` must not be, contain or lie inside (the images' folder); transferkit.runtime.outputs."""
        self.out, self.inputs = Path(out), list(inputs)
        check_output(self.out, KIND, inputs=self.inputs)
        self.shard_size, self.prefix = shard_size, prefix
        self.tmp = Path(tmp) if tmp is not None else new_tmp(self.out, KIND)
        self._owner = tmp is None  # a shared directory is removed by whoever commits it
        self.shards: list[dict] = []
        self._buf: dict[str, list[np.ndarray]] = {}
        self._rows = 0

    def add(self, codes: dict[str, np.ndarray], labels: np.ndarray, index: np.ndarray) -> None:
        for key, arr in {**codes, "labels": labels, "index": index}.items():
            self._buf.setdefault(key, []).append(arr)
        self._rows += len(labels)
        if self._rows >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        name = f"{self.prefix}-{len(self.shards):05d}.npz"
        arrays = {k: np.concatenate(v) for k, v in self._buf.items()}
        with naming(self.tmp / name), open(self.tmp / name, "wb") as f:
            np.savez(f, **arrays)
        self.shards.append({"file": name, "rows": self._rows})
        self._buf, self._rows = {}, 0

    def finish(self) -> list[dict]:
        """Write the last shard; return this writer's shards (another process commits the directory)."""
        self._flush()
        self._owner = False
        return self.shards

    def commit(self, meta: dict, shards: list[dict] | None = None) -> Path:
        """Write the last shard and meta.json (listing `shards`, default this writer's), then swap the new
        directory into place."""
        self._flush()
        self._owner = True
        write_json_atomic(self.tmp / META, {"format": FORMAT, **meta, "shards": self.shards if shards is None
                                            else shards})
        return publish(self.tmp, self.out, KIND, inputs=self.inputs)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if (self._owner or exc_type is not None) and self.tmp.exists():
            self.abort()


class FeatureStore:
    """Read side of a feature directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_file = self.path / META
        if not meta_file.is_file():
            raise DataError(f"'{self.path}' is not a codes directory (no {META}); see `transferkit extract`")
        try:
            self.meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"feature metadata '{meta_file}' is corrupt: {e}") from e
        if self.meta.get("format") not in (FORMAT, FORMAT_1):
            raise DataError(f"'{meta_file}' has format {self.meta.get('format')!r}, expected {FORMAT!r}")
        self._arrays: dict[str, str] = {}  # key -> its array's name in the shards, where the two differ
        if self.meta["format"] == FORMAT_1:
            self._rename_pools()
        self.keys: list[str] = list(self.meta["keys"])
        self.classes: list[str] = list(self.meta["classes"])
        self._labels: np.ndarray | None = None

    def _rename_pools(self) -> None:
        """Read a format-1 directory in today's pool names: its keys, code specs and pool list."""
        keys, specs = {}, self.meta.get("code_spec", {})
        for key, entry in self.meta["keys"].items():
            new = f"{entry['layer']}|{self.pool_name(entry['pool'])}"
            keys[new] = {**entry, "pool": self.pool_name(entry["pool"])}
            if key in specs:
                specs[new] = {**specs.pop(key), "pool": keys[new]["pool"]}
            if new != key:
                self._arrays[new] = key
        self.meta["keys"] = keys
        self.meta["pools"] = [self.pool_name(p) for p in self.meta.get("pools", [])]

    def pool_name(self, pool: str) -> str:
        """Today's name of a pool as this directory's files (meta.json, sweep.json) name it."""
        return RENAMED.get(pool, pool) if self.meta["format"] == FORMAT_1 else pool

    def __len__(self) -> int:
        return sum(s["rows"] for s in self.meta["shards"])

    def _column(self, key: str) -> np.ndarray:
        parts = []
        for shard in self.meta["shards"]:
            file = self.path / shard["file"]
            try:
                with np.load(file, allow_pickle=False) as z:
                    parts.append(z[self._arrays.get(key, key)])
            except (OSError, ValueError, KeyError) as e:
                raise DataError(f"feature shard '{file}' is missing or corrupt ({type(e).__name__}: {e})") from e
            if len(parts[-1]) != shard["rows"]:
                raise DataError(f"feature shard '{file}' has {len(parts[-1])} rows, meta.json says {shard['rows']}")
        return np.concatenate(parts) if parts else np.empty(0)

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            self._labels = self._column("labels").astype(np.int64)
        return self._labels

    @property
    def multilabel(self) -> bool:
        """Whether the labels are sets of classes: (n, n_classes) 0/1 rows (a manifest's 'labels' column)."""
        return bool(self.meta.get("multilabel", False))

    @property
    def sources(self) -> list[str]:
        return list(self.meta["sources"])

    def key(self, layer: str | None = None, pool: str | None = None) -> str:
        """The stored 'layer|pool' matching the request; with one key stored, no request is needed."""
        matches = [
            k for k in self.keys
            if (layer is None or k.split("|")[0] == layer) and (pool is None or k.split("|")[1] == pool)
        ]
        if len(matches) == 1:
            return matches[0]
        what = "matches" if not matches else "is ambiguous among"
        raise DataError(
            f"layer={layer!r} pool={pool!r} {what} the codes in '{self.path}': {', '.join(self.keys)}; "
            "name the layer and the pool"
        )

    def has(self, key: str) -> bool:
        """Whether `load(key)` finds these codes: one stored view, or a combination of stored views."""
        return all(k in self.keys for k in view_keys(key))

    @property
    def combination(self) -> str | None:
        """The key of the combination of views these codes were extracted as (`views`), if they were."""
        return next(iter(self.meta.get("combinations", {})), None)

    def load(self, key: str) -> np.ndarray:
        """(n, D) float32 codes for one 'layer|pool' key, or a combination's ('layer|pool+layer|pool': its views'
        codes side by side, as CodeSpec.combine describes them)."""
        if not self.has(key):
            raise DataError(f"'{self.path}' has no codes for '{key}'; it has: {', '.join(self.keys)}")
        parts = [self._column(k).astype(np.float32, copy=False) for k in view_keys(key)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
