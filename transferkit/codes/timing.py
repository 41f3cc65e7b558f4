"""Which engine runs a fitted extractor's codes fastest on this machine, for a run of n images: measured, not
assumed from another CPU.

The candidates (torch fp32 and, where the CPU has native bf16, bf16; ONNX Runtime fp32 and int8) are timed on a
few batches of the run's input size. A candidate whose engine file is not built yet also costs its one-time
work (export, quantization), so the run's length decides: `choose` predicts each candidate's time for the run
(one-time cost + images / speed) and takes the shortest. A candidate not built yet is built and timed only if,
even at an optimistic speed (BOUND), it could beat the best choice timed so far; otherwise the run does not pay
for it. Timings and one-time costs are kept in the code cache per machine (runtime.machine.identity: CPU model,
flags, thread count, library versions) and per network x codes x input size, so each machine pays for them
once and a faster engine file built later is timed and chosen when it pays.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from transferkit.runtime.atomic import write_json_atomic
from transferkit.runtime.machine import identity, identity_id

log = logging.getLogger(__name__)

FORMAT = "transferkit.timings/1"
# A run shorter than this (in images at 224 px, scaled by area) is not worth timing candidates on a machine with
# no timings yet: timing the two torch candidates costs ~2 s at 224 px, under 10% of a 2,000-image run (~20 s
# with start-up on an AVX-512 EPYC) and more than a wrong choice could lose on a shorter one. It runs the
# default: a cached engine file if there is one (int8 first), else torch at resolve_precision's choice.
TIME_FROM = 2000
# Optimistic speed of a candidate not built yet, as a multiple of the fastest one timed: it is built only if even
# this fast it would finish the run first. Measured (docs/speed.md, 224 px): ONNX Runtime fp32 1.45x torch bf16
# on an AVX-512 EPYC and 0.95x on an AMX Xeon; int8 1.9x ONNX Runtime fp32 and 2.8x torch bf16 on both.
# Looser bounds build engines that lose; tighter ones miss engines that win.
BOUND = {"onnxruntime fp32": 2.0, "onnxruntime int8": 3.0}
# One-time costs (s, at 224 px) until this machine has measured them: an AVX-512 EPYC took 6.7 s to export
# lite0 and 11.4 s to calibrate and quantize it on 32 crops, with another process running; on the low side, so
# a slower machine's first run errs towards trying (the measured cost is used from then on)
SETUP_PRIOR = {"export": 5.0, "quantize": 8.0}
STEPS = {"onnxruntime fp32": ("export",), "onnxruntime int8": ("export", "quantize")}  # the one-time work


class Timings:
    """The timings of one network x codes x input size on this machine, in a small JSON file that is only
    trusted when it says it is one (FORMAT) and was measured on this machine (same identity)."""

    def __init__(self, root: Path, stem: str, threads: int) -> None:
        self.identity = identity(threads)
        self.path = root / "timings" / f"{stem}-{identity_id(self.identity)}.json"
        self.rates: dict[str, float] = {}  # candidate -> images per second, model only
        self.setup: dict[str, float] = {}  # one-time step -> seconds
        self.unavailable: dict[str, str] = {}  # candidate -> why it could not be built here
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != FORMAT or data.get("identity") != self.identity:
                raise ValueError("not a timings file of this machine")
            self.rates = {k: float(v) for k, v in data["rates"].items() if _positive(v)}
            self.setup = {k: float(v) for k, v in data["setup"].items() if _positive(v)}
            self.unavailable = {str(k): str(v) for k, v in data.get("unavailable", {}).items()}
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # damaged: timed again, never trusted
            log.warning("ignoring engine timings %s (%s); timing again", self.path.name, exc)

    def save(self) -> None:
        """Keep the timings for later runs; a cache that cannot be written costs only the timing again."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, {"format": FORMAT, "identity": self.identity, "rates": self.rates,
                                          "setup": self.setup, "unavailable": self.unavailable})
        except OSError as exc:
            log.warning("could not keep the engine timings in %s (%s)", self.path.parent, exc.strerror or exc)

    def setup_of(self, name: str, done: Callable[[str], bool]) -> float:
        """Seconds of one-time work `name` still needs; `done(step)` says which steps' files exist."""
        return sum(self.setup.get(step, SETUP_PRIOR[step]) for step in STEPS.get(name, ()) if not done(step))


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def time_calls(run: Callable[[np.ndarray], object], x: np.ndarray, *, repeats: int = 2) -> float:
    """Images per second of `run` on batch `x`: one warm-up call (allocations, kernel choice), then the best of
    `repeats` timed calls (the least disturbed by whatever else this shared machine runs)."""
    run(x)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run(x)
        best = min(best, time.perf_counter() - start)
    return len(x) / max(best, 1e-9)


class Candidates(Protocol):
    """What `choose` needs of an engine: which steps are done, a default, and timing one candidate."""

    def step_done(self, step: str) -> bool: ...

    def default(self, names: Sequence[str]) -> str: ...

    def measure(self, name: str, timings: Timings) -> float | None: ...


@dataclass
class Choice:
    """The engine and precision of a run, and why: what meta.json and --profile show."""

    name: str  # 'torch bf16', 'onnxruntime int8', ...
    why: str
    predicted: dict[str, dict[str, float]] = field(default_factory=dict)  # candidate -> speed, setup, seconds

    @property
    def engine(self) -> str:
        return self.name.split()[0]

    @property
    def precision(self) -> str:
        return self.name.split()[1]

    def to_dict(self) -> dict:
        return {"chosen": self.name, "why": self.why, "candidates": self.predicted}


def choose(names: Sequence[str], n_images: int | None, side: int, timings: Timings, engine: Candidates) -> Choice:
    """The candidate that finishes `n_images` images soonest on this machine, one-time costs included."""
    if len(names) == 1:
        return Choice(names[0], "the only candidate for the precision and engine asked for")
    n = n_images or 0
    timed = [name for name in names if name in timings.rates]
    if len(timed) < len(names) and n * side ** 2 < TIME_FROM * 224 ** 2:
        name = engine.default(names)
        return Choice(name, f"{n} images at {side} px are too few to time the candidates on a machine without "
                            f"timings (from {TIME_FROM} at 224 px); the default")
    unavailable = [name for name in names if name in timings.unavailable]
    names = [name for name in names if name not in timings.unavailable]
    for name in names:  # what costs nothing to build is timed now
        if name not in timings.rates and timings.setup_of(name, engine.step_done) == 0:
            _measure(name, timings, engine)
    while True:
        seconds = {name: timings.setup_of(name, engine.step_done) + n / timings.rates[name]
                   for name in names if name in timings.rates}
        if not seconds:  # nothing timed yet (e.g. engine 'onnxruntime' asked for, no file built): the first
            left = [name for name in names if name not in timings.unavailable]
            if not left:
                return Choice(engine.default(names), "no candidate could be built here (see the warnings)")
            _measure(left[0], timings, engine)
            continue
        best = min(seconds, key=seconds.get)
        top = max(timings.rates[name] for name in seconds)
        hopeful = [name for name in names if name not in timings.rates and name not in timings.unavailable
                   and timings.setup_of(name, engine.step_done) + n / (BOUND[name] * top) < seconds[best]]
        if not hopeful:
            break
        _measure(hopeful[0], timings, engine)  # builds it (the one-time cost is paid and recorded)
    predicted = {name: {"images_per_second": round(timings.rates[name], 1),
                        "setup_seconds": round(timings.setup_of(name, engine.step_done), 1),
                        "predicted_seconds": round(seconds[name], 1)} for name in seconds}
    others = ", ".join(f"{name} {seconds[name]:.1f} s" for name in sorted(seconds, key=seconds.get)[1:])
    why = (f"fastest predicted for {n} images at {side} px on this machine: {seconds[best]:.1f} s "
           f"({timings.rates[best]:.0f} img/s" + (f" + {timings.setup_of(best, engine.step_done):.1f} s to build"
                                                  if timings.setup_of(best, engine.step_done) else "") + ")"
           + (f"; {others}" if others else ""))
    skipped = [name for name in names if name not in seconds] + unavailable
    if skipped:
        why += "; not built: " + ", ".join(skipped)
    return Choice(best, why, predicted)


def _measure(name: str, timings: Timings, engine: Candidates) -> None:
    rate = engine.measure(name, timings)
    if rate is None:
        timings.unavailable[name] = "could not be built here (see the warning)"
    else:
        timings.rates[name] = rate
    timings.save()
