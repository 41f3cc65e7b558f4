"""`CodeSpec`: what makes two sets of codes interchangeable, defined once.

Two codes of the same image are interchangeable when they come from the same model and weights, at the same
layer and pooling, after the same preprocessing, in the same precision (and int8 recipe), with BatchNorm folded
or not alike. The code cache's space ids (`CodeSpec.digest`), the fields meta.json records per key
(``code_spec``), ``extract --like``, a probe's stored spec and the probe-vs-test check all derive from it; the
ONNX Runtime engine key adds the runtime facts a graph file depends on, in `engine_file` alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferkit.codes import ort_engine
from transferkit.codes.cache import space_id
from transferkit.codes.params import COMBINED, view_keys
from transferkit.errors import DataError
from transferkit.runtime.cache_root import default_root

if TYPE_CHECKING:
    from transferkit.codes.extractor import FeatureExtractor

UNRECORDED = "fold_bn"  # the one field feature directories written before CodeSpec did not record (None there)
# Fields whose difference only rounds the codes: a float precision (fp32, bf16, fp16) and BatchNorm folding (exact
# algebra, parity-checked). The cache and the engines keep such codes apart; a probe may score one with the other,
# as it always could. int8 is another matter: its own field (the quantisation recipe) always counts.
ROUNDING = ("precision", "fold_bn")
# How a combination joins its views. 'concat': side by side, as extracted; the probe then standardises every
# column (LinearProbe scaling 'standard'), which bench/multilayer.py measured against scaling each view to the
# same total variance.
VIEW_SCALINGS = ("concat",)


def key_name(layer: str, pool: str) -> str:
    """How a (layer, pool) pair is named in feature files."""
    return f"{layer}|{pool}"


@dataclass(frozen=True)
class CodeSpec:
    """The identity of one kind of codes: equal specs give interchangeable codes of the same image."""

    model: str
    weights_sha256: str
    layer: str
    pool: str
    transform: dict  # describe_transform's dict: input size, interpolation, mean, std, crop
    precision: str  # the resolved one ('fp32', 'bf16', 'fp16', 'int8'), never 'auto'
    int8: dict | None = None  # ort_engine.INT8, the quantization recipe, for int8 codes only
    fold_bn: bool | None = True  # None: not recorded (feature directories written before CodeSpec)
    views: list | None = None  # a combination's [[layer, pool], ...] in column order; None: one view
    scaling: str | None = None  # how a combination joins its views (VIEW_SCALINGS); None: one view

    __hash__ = None  # the dict fields are mutable: compare specs, do not hash them

    @property
    def key(self) -> str:
        """The 'layer|pool' name of these codes in feature files ('layer|pool+layer|pool' for a combination)."""
        if self.views:
            return COMBINED.join(key_name(la, p) for la, p in self.views)
        return key_name(self.layer, self.pool)

    def parts(self) -> list[CodeSpec]:
        """The single views these codes are made of, in column order (the code cache keeps each apart)."""
        if not self.views:
            return [self]
        return [replace(self, layer=la, pool=p, views=None, scaling=None) for la, p in self.views]

    @classmethod
    def combine(cls, specs: Iterable[CodeSpec], scaling: str = VIEW_SCALINGS[0]) -> CodeSpec:
        """The spec of several views' codes joined (`scaling`) in this order; one view's spec is itself."""
        specs = [p for s in specs for p in s.parts()]
        if scaling not in VIEW_SCALINGS:
            raise ValueError(f"scaling must be one of {', '.join(VIEW_SCALINGS)}; got {scaling!r}")
        if len(specs) == 1:
            return specs[0]
        first = specs[0]
        if apart := [s.key for s in specs if set(first.differences(s)) - {"layer", "pool"}]:
            raise ValueError(f"views of one combination must differ only in layer and pool: {first.key} and "
                             f"{apart[0]} differ in {first.describe_differences(specs[1])}")
        if len({s.key for s in specs}) < len(specs):
            raise ValueError(f"a combination names each view once; got {', '.join(s.key for s in specs)}")
        return replace(first, layer=COMBINED.join(s.layer for s in specs), pool=COMBINED.join(s.pool for s in specs),
                       views=[[s.layer, s.pool] for s in specs], scaling=scaling)

    @property
    def exact_decode(self) -> bool:
        """Whether the images were decoded in full (else no larger than the transform needs: data.decode)."""
        return "decode" not in self.transform

    @property
    def pool_id(self) -> str:
        """The pool as the cache and engine keys name it. 'avgmax' (timm's mean of avg and max) is named apart
        from the concatenation that name meant before transferkit followed timm (now 'catavgmax'): caches and
        engine files of those codes still exist and must never answer for the mean."""
        return "avgmax=mean" if self.pool == "avgmax" else self.pool

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as the code cache's spec.json stores it (no 'int8' entry unless int8: the space ids
        of caches written before CodeSpec stay the same)."""
        d = asdict(self)
        for name in ("int8", "views", "scaling"):  # absent when unused: single-view space ids stay as they were
            if d[name] is None:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CodeSpec:
        names = {f.name for f in fields(cls)}
        spec = cls(**{k: v for k, v in d.items() if k in names})
        return replace(spec, views=[list(v) for v in spec.views]) if spec.views else spec

    def digest(self) -> str:
        """The code cache's space id of these codes (transferkit.codes.cache)."""
        return space_id({**self.to_dict(), "pool": self.pool_id})

    def differences(self, other: CodeSpec) -> list[str]:
        """The fields in which `other` makes different codes; an unrecorded fold_bn differs from nothing."""
        diff = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name == UNRECORDED and (mine is None or theirs is None):
                continue
            if mine != theirs:
                diff.append(f.name)
        return diff

    def scoring_differences(self, other: CodeSpec) -> list[str]:
        """The fields in which `other` differs too much for a probe trained on these codes to score those:
        `differences` less float rounding (ROUNDING)."""
        return [f for f in self.differences(other) if f not in ROUNDING]

    def describe_differences(self, other: CodeSpec, names: tuple[str, str] = ("here", "there"),
                             only: Iterable[str] | None = None) -> str:
        """"precision 'fp32' (here) vs 'bf16' (there); ..." for error messages ('' when interchangeable).

        Dicts show only their differing entries, so a transform reads "transform.input_size [3, 32, 32] ...".
        """
        parts = []
        for n in self.differences(other) if only is None else only:
            mine, theirs = getattr(self, n), getattr(other, n)
            if isinstance(mine, dict) and isinstance(theirs, dict):
                parts += [f"{n}.{k} {mine.get(k)!r} ({names[0]}) vs {theirs.get(k)!r} ({names[1]})"
                          for k in dict.fromkeys([*mine, *theirs]) if mine.get(k) != theirs.get(k)]
            else:
                parts.append(f"{n} {mine!r} ({names[0]}) vs {theirs!r} ({names[1]})")
        return "; ".join(parts)

    @classmethod
    def from_extractor(cls, extractor: FeatureExtractor, layer: str, pool: str,
                       precision: str | None = None) -> CodeSpec:
        """The spec of a fitted extractor's `layer`/`pool` codes (`precision`: another than its own, e.g. the
        fp32 engine an int8 one is quantized from)."""
        from transferkit.data.transforms import describe_transform

        precision = precision or extractor.precision_
        return cls(
            model=extractor.model, weights_sha256=extractor.backbone_.weights_info.sha256, layer=layer, pool=pool,
            transform=describe_transform(extractor.data_config_, extractor.image_size,
                                         exact_decode=extractor.exact_decode), precision=precision,
            int8=ort_engine.int8_recipe(extractor.side_) if precision == "int8" else None,
            fold_bn=bool(extractor.fold_bn),
        )

    @classmethod
    def per_key(cls, extractor: FeatureExtractor, precision: str | None = None) -> dict[str, CodeSpec]:
        """{'layer|pool': spec} for every pair a fitted extractor makes, in its order."""
        return {key_name(la.name, p): cls.from_extractor(extractor, la.name, p, precision)
                for la, p in extractor.pairs_}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], key: str) -> CodeSpec:
        """The spec of `key`'s codes in a feature directory's meta.json, also one written before CodeSpec
        (then fold_bn is known only where BatchNorms were folded, else None). A combination's key
        ('layer|pool+layer|pool') combines its views' specs, joined as meta.json's 'combinations' records."""
        if COMBINED in key:
            scaling = meta.get("combinations", {}).get(key, {}).get("scaling", VIEW_SCALINGS[0])
            return cls.combine([cls.from_meta(meta, k) for k in view_keys(key)], scaling)
        if "code_spec" in meta:
            if key not in meta["code_spec"]:
                raise DataError(f"meta.json has no codes for '{key}' (it has {', '.join(meta['code_spec'])})")
            return cls.from_dict(meta["code_spec"][key])
        if key not in meta["keys"]:
            raise DataError(f"meta.json has no codes for '{key}' (it has {', '.join(meta['keys'])})")
        entry, int8 = meta["keys"][key], meta.get("int8")
        return cls(
            model=meta["model"], weights_sha256=meta["weights"]["sha256"], layer=entry["layer"], pool=entry["pool"],
            transform=meta["transform"], precision=meta["precision"],
            int8={k: v for k, v in int8.items() if k in ort_engine.INT8} if int8 else None,
            fold_bn=True if meta.get("folded_batchnorms") else None,
        )

    @classmethod
    def from_probe(cls, extra: Mapping[str, Any]) -> CodeSpec:
        """The spec a saved probe was trained on (its `extra_`), also a probe saved before CodeSpec."""
        if "code_spec" in extra:
            return cls.from_dict(extra["code_spec"])
        precision = extra["precision"]
        return cls(model=extra["model"], weights_sha256=extra["weights"]["sha256"], layer=extra["layer"],
                   pool=extra["pool"], transform=extra["transform"], precision=precision,
                   int8=dict(ort_engine.INT8) if precision == "int8" else None, fold_bn=None)


def engine_file(specs: Iterable[CodeSpec], side: int) -> Path:
    """Where the ONNX Runtime engine making all of `specs` (one graph, inputs `side` px square) is cached.

    Besides the codes' identity the file depends on which keys share the graph, the input side and the
    torch/opset (export) and, for int8, onnxruntime (quantizer) versions. Preprocessing happens outside the
    graph, so only the side of the transform matters.
    """
    import torch

    specs = list(specs)
    first = specs[0]
    if any((s.model, s.weights_sha256, s.precision, s.fold_bn) != (first.model, first.weights_sha256,
                                                                    first.precision, first.fold_bn) for s in specs):
        raise ValueError("one engine graph makes codes of one model, weights, precision and folding")
    key = {"model": first.model, "weights_sha256": first.weights_sha256,
           "keys": [key_name(s.layer, s.pool_id) for s in specs], "side": side, "fold_bn": first.fold_bn,
           "torch": torch.__version__, "opset": ort_engine.OPSET}
    if first.precision == "int8":
        import onnxruntime

        key.update(int8=first.int8, onnxruntime=onnxruntime.__version__)
        return default_root() / "engines" / f"{space_id(key)}-int8.onnx"
    return default_root() / "engines" / f"{space_id(key)}.onnx"
