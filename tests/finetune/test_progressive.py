"""Progressive resizing (`start_size`, `finetune --start-size`): training images grow from start_size at epoch 1 to
image_size at the last epoch (sizes between on multiples of 8); validation stays at image_size."""

from __future__ import annotations

import json

import pytest

from transferkit.data.datasets import open_dataset
from transferkit.errors import ParameterError
from transferkit.finetune import loop
from transferkit.finetune.config import FinetuneConfig
from transferkit.finetune.loaders import epoch_size

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run faster on one thread


@pytest.mark.parametrize(("start", "end", "epochs", "sizes"), [
    (32, 64, 5, [32, 40, 48, 56, 64]), (32, 48, 3, [32, 40, 48]), (32, 64, 1, [64]), (48, 48, 2, [48, 48]),
    (33, 64, 4, [33, 40, 56, 64]), (32, 64, 18, [32, 32, 32, 40, 40, 40, 40, 48, 48, 48, 48, 56, 56, 56, 56, 64,
                                                  64, 64])])
def test_sizes_grow_linearly_to_image_size(start, end, epochs, sizes):
    config = FinetuneConfig(image_size=end, start_size=start, epochs=epochs).validate()
    assert [epoch_size(config, e) for e in range(1, epochs + 1)] == sizes
    assert epoch_size(FinetuneConfig(image_size=end, epochs=epochs), 1) is None


def test_a_run_trains_each_epoch_at_its_size_and_validates_at_image_size(tmp_path, photo_folder, monkeypatch):
    seen, epoch = [], loop._epoch

    def spy(run, loader, *args):  # the size of the first batch each pass over a loader yields
        seen.append((args[0] if args else 0, tuple(next(iter(loader))[0].shape[-2:])))
        return epoch(run, loader, *args)

    monkeypatch.setattr(loop, "_epoch", spy)
    config = FinetuneConfig(weights="package", image_size=48, start_size=32, epochs=3, batch_size=4,
                            freeze_until="blocks.5", val_fraction=0.25)
    result = loop.finetune(open_dataset(photo_folder), tmp_path / "run", config, progress=False)
    train = [size for e, size in seen if e > 0]
    assert train == [(32, 32), (40, 40), (48, 48)]
    assert {size for e, size in seen if e == 0} == {(48, 48)} and len(seen) == 6  # a validation after each epoch
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["train_sizes"] == [32, 40, 48] and meta["config"]["start_size"] == 32
    assert meta["transform"]["input_size"] == [3, 48, 48] and meta["cached_prefix"] == []  # no cache: sizes change
    assert len(result.history) == 3 and all(0 < h["train_loss"] < 10 for h in result.history)


@pytest.mark.parametrize("settings", [dict(start_size=32), dict(start_size=64, image_size=32),
                                      dict(start_size=16, image_size=32, head="local")])
def test_bad_start_sizes_are_refused_naming_the_parameter(settings):
    with pytest.raises(ParameterError, match="'start_size'") as err:
        FinetuneConfig(**settings).validate()
    assert err.value.param == "start_size"


def test_cli_start_size_is_checked_before_anything_is_written(tmp_path, photo_folder, cli_run):
    result = cli_run("finetune", photo_folder, "-o", tmp_path / "run", "--weights", "package", "--image-size", "32",
                     "--start-size", "64", ok=False)
    assert result.exit_code != 0 and "--start-size" in result.output and "64" in result.output
    assert not (tmp_path / "run").exists()
    result = cli_run("finetune", photo_folder, "-o", tmp_path / "run", "--start-size", "4", ok=False)
    assert result.exit_code == 2 and "--start-size" in result.output
