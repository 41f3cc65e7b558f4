"""The engine is chosen by timing the candidates on this machine (transferkit.codes.timing): the one predicted to
finish the run first, one-time costs included; timings kept per machine, trusted only when they are this
machine's, and a candidate built only when it could win."""

import json
import logging

import pytest

from transferkit.codes import timing
from transferkit.codes.cache import CodeCache
from transferkit.codes.extractor import FeatureExtractor
from transferkit.codes.timing import Timings, choose


class FakeEngine:
    """Candidates with known speeds and one-time costs, counting what gets built and timed."""

    def __init__(self, rates: dict[str, float], built: set[str]) -> None:
        self.rates, self.built, self.measured = rates, set(built), []

    def step_done(self, step: str) -> bool:
        return step in self.built

    def default(self, names):
        return names[0]

    def measure(self, name, timings):
        self.measured.append(name)
        self.built.update(timing.STEPS.get(name, ()))
        return self.rates[name]


RATES = {"torch fp32": 50.0, "torch bf16": 100.0, "onnxruntime fp32": 150.0, "onnxruntime int8": 300.0}
NAMES = list(RATES)


def test_a_short_run_builds_nothing_and_a_long_one_builds_what_wins(tmp_path, monkeypatch):
    monkeypatch.setattr(timing, "SETUP_PRIOR", {"export": 6.0, "quantize": 12.0})
    monkeypatch.setattr(timing, "TIME_FROM", 0)  # time even short runs
    short = FakeEngine(RATES, built=set())
    choice = choose(NAMES, 1000, 224, Timings(tmp_path, "a", 2), short)
    # bf16: 10 s; even at 2x bf16's speed ONNX Runtime fp32 would need 6 s + 5 s to build and run: not tried
    assert choice.name == "torch bf16" and short.measured == ["torch fp32", "torch bf16"]
    assert choice.predicted["torch bf16"]["predicted_seconds"] == 10.0
    assert "not built: onnxruntime fp32, onnxruntime int8" in choice.why
    long = FakeEngine(RATES, built=set())
    choice = choose(NAMES, 100_000, 224, Timings(tmp_path, "b", 2), long)
    assert choice.name == "onnxruntime int8" and long.measured == NAMES  # each built once it could win
    assert choice.predicted["onnxruntime int8"]["predicted_seconds"] == pytest.approx(100_000 / 300, abs=0.1)


def test_one_time_costs_count_until_paid_and_timings_are_reused(tmp_path):
    first = FakeEngine(RATES, built=set())
    choose(NAMES, 100_000, 224, Timings(tmp_path, "k", 2), first)
    saved = json.loads(next((tmp_path / "timings").glob("k-*.json")).read_text())
    assert saved["rates"] == RATES and saved["identity"]["threads"] == 2
    # the files are gone (cache cleaned) but the timings stay: quantizing again costs 12 s, known, nothing timed
    again = FakeEngine(RATES, built={"export"})
    again_timings = Timings(tmp_path, "k", 2)
    again_timings.setup = {"export": 6.0, "quantize": 12.0}
    choice = choose(NAMES, 3000, 224, again_timings, again)
    assert again.measured == [] and choice.name == "onnxruntime fp32"  # 20 s against int8's 12 + 10 s
    assert choose(NAMES, 30_000, 224, again_timings, again).name == "onnxruntime int8"  # 112 s vs 200 s
    assert not Timings(tmp_path, "k", 1).rates  # another thread count: not this file


def test_timings_of_another_machine_or_damaged_are_not_trusted(tmp_path, caplog):
    ours = Timings(tmp_path, "k", 2)
    ours.rates = {"torch fp32": 1.0}
    ours.save()
    data = json.loads(ours.path.read_text())
    data["identity"]["cpu"] = "another CPU"
    ours.path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        assert Timings(tmp_path, "k", 2).rates == {}
    ours.path.write_text('{"format": "transferkit.timings/1", "rates": [')
    assert Timings(tmp_path, "k", 2).rates == {} and "ignoring engine timings" in caplog.text


def test_the_extractor_times_this_machine_once_and_reuses_it(code_cache, monkeypatch):
    """Real timing of lite0 (32 px) on this CPU: measured on the first long run, read back on the next."""
    monkeypatch.setattr(timing, "BOUND", {"onnxruntime fp32": 1e-9, "onnxruntime int8": 1e-9})  # build nothing
    calls = []
    real = timing.time_calls
    monkeypatch.setattr("transferkit.codes.engine.time_calls", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = {"weights": "package", "image_size": 32, "precision": "fp32"}  # candidates: torch fp32, ORT fp32
    fe = FeatureExtractor(**kw).fit().plan(10**6)
    choice = fe.engine_choice_
    assert choice["chosen"] == "torch fp32" and calls == [1], choice
    assert choice["candidates"]["torch fp32"]["images_per_second"] > 0
    assert "not built: onnxruntime fp32" in choice["why"]
    assert not list(code_cache.rglob("*.onnx"))  # nothing was exported
    files = list((code_cache / "timings").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["identity"]["cpu"]
    again = FeatureExtractor(**kw).fit().plan(10**6)
    assert calls == [1] and again.engine_choice_["candidates"] == choice["candidates"]
    codes = again.transform(__import__("numpy").zeros((2, 32, 32, 3), "uint8"))
    assert codes.shape[0] == 2 and again.engine_ == "torch"
    CodeCache().clear()  # `cache clean` forgets the timings with the engines
    assert not (code_cache / "timings").exists()
