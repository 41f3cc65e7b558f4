"""A content-addressed cache of CNN codes, so the same image is never encoded twice by the same extractor.

Layout under the cache root (``$TRANSFERKIT_CACHE``, else ``~/.cache/transferkit``)::

    codes/<space>/spec.json          # what the codes are: model, weights sha256, layer, pool, transform, precision
    codes/<space>/part-<uuid>.npz    # 'hashes' (n, 16) uint8 image-content digests, 'codes' (n, D) float32

A *space* is one kind of codes: the digest of its CodeSpec (transferkit.codes.spec), so any change of model,
weights, layer, pooling, preprocessing, precision or folding lands in another space. Rows are keyed by the
image's content hash (`ImageDataset.content_hashes`), so renaming or moving files keeps their codes, and adding 100
images to a folder of 10,000 encodes only the 100. Parts are written under a temporary name and renamed,
so a reader never sees half of one; a part that fails to read (zip CRC, shapes) is reported, deleted and
its images are encoded again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transferkit.data.hashing import DIGEST
from transferkit.runtime.atomic import atomic_write, write_json_atomic
from transferkit.runtime.cache_root import default_root

if TYPE_CHECKING:
    from transferkit.codes.spec import CodeSpec

log = logging.getLogger(__name__)

VERSION = 1  # bump when the meaning of stored codes changes


def space_id(spec: Mapping) -> str:
    """A stable 32-hex id of a JSON-able spec (CodeSpec.digest and the engine files use it)."""
    return hashlib.sha256(json.dumps({"version": VERSION, **spec}, sort_keys=True).encode()).hexdigest()[:32]


class CodeSpace:
    """The cached codes of one kind: content hash -> (part, row). Only the hashes stay in memory."""

    def __init__(self, path: Path, spec: Mapping) -> None:
        self.path, self.spec = path, dict(spec)
        self._where: dict[bytes, tuple[str, int]] = {}
        self._parts: OrderedDict[str, np.ndarray] = OrderedDict()  # a few recently read parts' codes
        self.dim: int | None = None
        self.dropped: list[str] = []  # parts found corrupt and deleted while loading
        for part in sorted(path.glob("part-*.npz")) if path.is_dir() else ():
            try:
                with np.load(part, allow_pickle=False) as z:  # reading a member checks its zip CRC
                    hashes, codes = z["hashes"], z["codes"]
                if hashes.ndim != 2 or hashes.shape[1] != DIGEST or codes.ndim != 2 or len(codes) != len(hashes):
                    raise ValueError(f"shapes {hashes.shape} and {codes.shape} do not fit")
                if self.dim is not None and codes.shape[1] != self.dim:
                    raise ValueError(f"{codes.shape[1]} columns, other parts have {self.dim}")
                if not np.isfinite(codes).all():
                    raise ValueError("it holds codes that are NaN or infinite")
            except Exception as exc:  # noqa: BLE001 - any unreadable part is dropped and recomputed
                log.warning("code cache: %s is corrupt (%s); deleting it, its images will be encoded again", part, exc)
                part.unlink(missing_ok=True)
                self.dropped.append(part.name)
                continue
            self.dim = codes.shape[1]
            for row, h in enumerate(hashes):
                self._where[h.tobytes()] = (part.name, row)

    def __len__(self) -> int:
        return len(self._where)

    def has(self, hashes: Sequence[bytes | None]) -> np.ndarray:
        """Which of `hashes` are cached (None, an unreadable file, never is)."""
        return np.fromiter((h is not None and h in self._where for h in hashes), bool, len(hashes))

    def get(self, hashes: Sequence[bytes]) -> np.ndarray:
        """(n, D) float32 codes of cached images, in the order asked."""
        out = np.empty((len(hashes), self.dim or 0), np.float32)
        for i, h in enumerate(hashes):
            name, row = self._where[h]
            out[i] = self._part(name)[row]
        return out

    def _part(self, name: str) -> np.ndarray:
        if name not in self._parts:
            with np.load(self.path / name, allow_pickle=False) as z:
                self._parts[name] = z["codes"]
            while len(self._parts) > 4:  # parts are read in runs: keep memory to a few parts
                self._parts.popitem(last=False)
        return self._parts[name]

    def add(self, hashes: Sequence[bytes], codes: np.ndarray) -> None:
        """Store new rows as one part (already cached rows are skipped)."""
        keep = [i for i, h in enumerate(hashes) if h not in self._where]
        if not keep:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / "spec.json").exists():
            write_json_atomic(self.path / "spec.json", self.spec)
        digests = np.frombuffer(b"".join(hashes[i] for i in keep), np.uint8).reshape(-1, DIGEST)
        rows = np.ascontiguousarray(codes[keep], dtype=np.float32)
        name = f"part-{uuid.uuid4().hex}.npz"

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, hashes=digests, codes=rows)

        atomic_write(self.path / name, write)
        self.dim = rows.shape[1]
        for row, h in enumerate(digests):
            self._where[h.tobytes()] = (name, row)


class CodeCache:
    """Spaces of cached codes under one root directory."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()

    def space(self, spec: CodeSpec) -> CodeSpace:
        """The space of one kind of codes, named by the spec's digest (transferkit.codes.spec)."""
        return CodeSpace(self.root / "codes" / spec.digest(), spec.to_dict())

    def info(self) -> list[CacheEntry]:
        """Every space: its spec, rows and bytes on disk."""
        entries = []
        for path in sorted((self.root / "codes").glob("*")) if (self.root / "codes").is_dir() else ():
            spec = {}
            if (path / "spec.json").is_file():
                with contextlib.suppress(ValueError):
                    spec = json.loads((path / "spec.json").read_text())
            hashes = set()  # distinct images: two processes may have stored the same image's codes
            for part in path.glob("part-*.npz"):
                try:
                    with np.load(part, allow_pickle=False) as z:
                        hashes.update(h.tobytes() for h in z["hashes"])
                except Exception:  # noqa: BLE001 - counted as zero rows; a later read deletes it
                    pass
            entries.append(CacheEntry(path, spec, len(hashes), sum(p.stat().st_size for p in path.iterdir())))
        return entries

    def clear(self, model: str | None = None) -> list[CacheEntry]:
        """Delete every space (or those of one model); returns what was deleted.

        Without `model` the exported engines (`engines/*.onnx`, transferkit.codes.ort_engine) and their timings
        (`timings/`) go too; they are named by a hash only, so a per-model clean leaves them.
        """
        self.remove_stale()
        gone = [e for e in self.info() if model is None or e.spec.get("model") == model]
        for entry in gone:
            shutil.rmtree(entry.path, ignore_errors=True)
        if model is None:
            for path in self.engines():
                path.unlink(missing_ok=True)
                path.with_name(path.name + ".json").unlink(missing_ok=True)  # its record (ort_engine.record)
            shutil.rmtree(self.root / "timings", ignore_errors=True)  # engine timings (transferkit.codes.timing)
        return gone

    def remove_stale(self) -> list[Path]:
        """Delete temporary files that killed processes left under the root (`.NAME.PID.XXXX.tmp`, see
        transferkit.runtime.atomic); return them."""
        from transferkit.runtime.outputs import pid_alive

        gone = []
        for path in self.root.glob("*/**/.*.tmp") if self.root.is_dir() else ():
            pid = path.name.rsplit(".", 3)[-3] if path.name.count(".") >= 4 else ""
            if path.is_file() and pid.isdigit() and not pid_alive(int(pid)):
                path.unlink(missing_ok=True)
                gone.append(path)
        return gone

    def engines(self) -> list[Path]:
        """Exported ONNX Runtime engines (files written by FeatureExtractor, one per network x codes x size)."""
        return sorted((self.root / "engines").glob("*.onnx"))


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    spec: dict
    rows: int
    bytes: int
