"""`transferkit neighbors` / `transferkit.neighbors`: the most similar images of a codes directory, with the queries
encoded exactly as the directory's codes were (real weights, real photo crops)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from transferkit.errors import ParameterError

SIZE = 64  # px: the photo crops are 64 x 64


@pytest.fixture(scope="module")
def codes(tmp_path_factory, shared_photo_folder, cli_run):
    """The photo crops encoded at two layers (pre_logits and stage 5, blocks.4), not swept: a directory of two
    kinds of codes. Its own code cache: module fixtures run outside the per-test one."""
    root = tmp_path_factory.mktemp("retrieval")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERKIT_CACHE", str(root / "cache"))
        cli_run("-q", "extract", shared_photo_folder, "-o", root / "codes", "--image-size", SIZE,
                "--layer", "pre_logits,5")
    return root / "codes"


def test_an_image_of_the_directory_finds_itself_first_and_a_flipped_copy_finds_it(codes, shared_photo_folder,
                                                                                  tmp_path):
    import transferkit

    query = shared_photo_folder / "flower" / "3.jpg"
    flipped = tmp_path / "flipped.jpg"
    Image.open(query).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped, quality=90)
    found = transferkit.neighbors(codes, [query, flipped], k=3, layer="pre_logits")
    assert [r["source"] for r in found] == [str(query), str(flipped)]
    itself, other = found[0]["neighbors"], found[1]["neighbors"]
    assert len(itself) == len(other) == 3
    assert itself[0]["source"] == str(query) and itself[0]["label"] == "flower"
    assert itself[0]["similarity"] > 0.999 > itself[1]["similarity"]  # codes made alike: the same image is ~1
    assert other[0]["source"] == str(query) and other[0]["similarity"] < 0.999  # not the same bytes, still closest
    sims = [n["similarity"] for n in other]
    assert sims == sorted(sims, reverse=True)


def test_the_sweeps_pick_is_the_default(codes, shared_photo_folder, tmp_path, cli_run):
    from transferkit.auditing.retrieval import pick_key
    from transferkit.codes.store import FeatureStore
    from transferkit.jobs import read_sweep, sweep_features

    swept = tmp_path / "swept"
    shutil.copytree(codes, swept)
    sweep_features(FeatureStore(swept), progress=False)
    best = read_sweep(FeatureStore(swept))
    assert pick_key(FeatureStore(swept), None) == best
    for named in ("5", "blocks.4", "5|avg", "blocks.4|avg"):  # as `transferkit layers` names it, from meta.json
        assert pick_key(FeatureStore(codes), named) == "blocks.4|avg", named
    assert pick_key(FeatureStore(codes), "pre-logits") == "pre_logits|avg"
    with pytest.raises(ParameterError, match=re.escape("Got '5|max'")):
        pick_key(FeatureStore(codes), "5|max")
    query = shared_photo_folder / "temple" / "2.png"
    result = cli_run("-q", "neighbors", swept, query, "-k", "2", "--json")
    row = json.loads(result.output.strip().splitlines()[-1])
    assert row["neighbors"][0]["source"] == str(query) and row["neighbors"][0]["similarity"] > 0.999
    assert row["neighbors"][0]["label"] == "temple"


@pytest.mark.parametrize("case", ["missing_image", "unknown_layer", "no_layer_among_several", "k_zero"])
def test_bad_input_is_one_line_naming_the_argument(case, codes, shared_photo_folder, tmp_path, cli_run):
    query = shared_photo_folder / "flower" / "3.jpg"
    args, code, expected = {
        "missing_image": ([query, tmp_path / "absent.jpg", "--layer", "pre_logits"], 1,
                          ["Invalid value for 'IMAGE...'", "absent.jpg' does not exist"]),
        "unknown_layer": ([query, "--layer", "3"], 1,  # stage 3 is not in the directory (5 is: blocks.4)
                          ["Invalid value for '--layer'", "blocks.4|avg, pre_logits|avg", "Got '3'"]),
        "no_layer_among_several": ([query], 1, ["Invalid value for '--layer'", "holds several (blocks.4|avg, "
                                                                              "pre_logits|avg)"]),
        "k_zero": ([query, "-k", "0"], 2, ["Invalid value for '-k'"]),
    }[case]
    result = cli_run("neighbors", codes, *args, ok=False)
    assert result.exit_code == code, result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("Error: ") and all(e in message for e in expected), result.output


def test_python_errors_name_the_parameter(codes, tmp_path):
    import transferkit

    for kwargs, param in (({"images": [tmp_path / "absent.jpg"]}, "images"),
                          ({"images": [codes / "meta.json"], "layer": "nope"}, "layer"),
                          ({"images": [codes / "meta.json"], "k": 0}, "k")):
        with pytest.raises(ParameterError) as err:
            transferkit.neighbors(codes, **kwargs)
        assert err.value.param == param, err.value


def test_a_wrong_argument_is_refused_before_torch_loads(codes, shared_photo_folder, tmp_path):
    """A layer the directory lacks, in a fresh process: the one-line error comes before torch (and timm) import."""
    code = ("import sys\nfrom transferkit.cli import main\nsys.argv = ['transferkit', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "print('HEAVY', [m for m in ('torch', 'timm') if m in sys.modules], code)")
    args = ["neighbors", codes, shared_photo_folder / "flower" / "3.jpg", "--layer", "nope"]
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "HEAVY [] 1", done
    assert "Invalid value for '--layer'" in done.stderr
