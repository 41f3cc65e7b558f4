"""Hostile input to the parsers: every input gives a result or a TransferkitError, never another exception.

Property-based (hypothesis): random bytes and text, and near-valid inputs (right shape, wrong details) for the
recipe reader, the CSV manifest reader and the IDX reader. Each parser gets 1,000 derandomized examples, so CI
sees the same inputs every run. Files go to one directory per test, rewritten per example (hypothesis runs
many examples inside one call of the test function, so pytest's function-scoped tmp_path would be shared anyway).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import shutil
import struct
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transferkit import recipes
from transferkit.data.datasets import open_dataset
from transferkit.errors import TransferkitError
from transferkit.finetune.config import FinetuneConfig
from transferkit.jobs import image_files

FUZZ = settings(
    max_examples=1000,
    deadline=None,  # file I/O on a shared machine: timing varies, the property does not
    derandomize=True,  # the same inputs every run, so CI is reproducible
    database=None,  # nothing written to .hypothesis/ in the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],  # the autouse code_cache
)


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def fresh(folder: Path) -> Path:
    """An empty `folder`: what one example leaves behind must not leak into the next."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def parses_or_refuses(parse, folder: Path):
    """`parse()`'s result, or None if it raised a TransferkitError that names a file in `folder`."""
    try:
        return parse()
    except TransferkitError as e:
        assert str(folder) in str(e), f"the error does not name the file: {e}"
        return None


# -- values: what a hostile file holds --------------------------------------------------------------------------

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)  # no lone surrogates: not encodable
HUGE = st.sampled_from([2**63, -(2**63) - 1, 10**400, -(10**400), 2**1024])
SCALARS = st.one_of(
    st.booleans(), st.integers(-(2**63), 2**63 - 1), HUGE,
    st.floats(allow_nan=True, allow_infinity=True), TEXT,
    st.sampled_from(["auto", "none", "all", "avg", "max", "2x2", "9x9", "٣x٣", "pre_logits", "blocks.5", "fp16",
                     "sgd", "onecycle", "mlp", "local", "head", "1" * 5000, "x" * 5000, "", " ", "\x00", "../.."]),
)
EDGE_NUMBERS = st.one_of(HUGE, st.sampled_from([0, -1, 1, 0.0, -0.0, 1e-320, 1e308, math.nan, math.inf, -math.inf]),
                         st.lists(HUGE | st.floats(), min_size=2, max_size=2))  # pairs: lr_range, crop_scale
VALUES = SCALARS | st.lists(SCALARS, max_size=3) | st.dictionaries(TEXT, SCALARS, max_size=2)
FIELDS = {"probe": [f.name for f in fields(recipes.ProbeSettings)],
          "finetune": [f.name for f in fields(FinetuneConfig)]}


def toml_value(v) -> str:
    """`v` as a TOML value (inline tables and arrays for nesting); NaN and infinities as TOML spells them."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return ("nan" if math.isnan(v) else ("-inf" if v < 0 else "inf") if math.isinf(v) else repr(v))
    if isinstance(v, str):
        return json.dumps(v)  # JSON's escapes are TOML's basic-string escapes
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def rarely(draw, one_in: int = 4) -> bool:
    """True about once in `one_in` draws. Hypothesis draws 0 far more often than other integers (small values
    find bugs), so the rare branch must not be the one taken on 0."""
    return draw(st.integers(1, one_in)) == one_in


@st.composite
def near_valid_recipes(draw) -> dict:
    """A recipe's shape: usually the required fields and a valid kind, then that kind's fields (or unknown ones)
    with any values, numbers at the edges of their type most often."""
    kind = draw(st.sampled_from(["probe", "finetune"]))
    data = {}
    for key, usual in (("name", "mine"), ("kind", kind), ("model", "test_resnet")):
        if not rarely(draw, 20):  # mostly valid: a bad required field hides every other field
            data[key] = draw(VALUES) if rarely(draw, 10) else usual
    for _ in range(draw(st.integers(0, 4))):  # known fields and numbers at their edges most often
        key = draw(TEXT if rarely(draw) else st.sampled_from(FIELDS[kind]))
        data[key] = draw(VALUES if rarely(draw, 3) else EDGE_NUMBERS)
    return data


def recipe_text(data: dict) -> str:
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in data.items())


RECIPE_FILES = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    near_valid_recipes().map(recipe_text).map(str.encode),
    near_valid_recipes().map(recipe_text).map(lambda t: b"\xef\xbb\xbf" + t.encode()),  # BOM: not TOML
    near_valid_recipes().map(recipe_text).map(lambda t: t.encode("latin-1", "replace")),
)


@FUZZ
@given(content=RECIPE_FILES)
def test_fuzz_recipe_file(fuzz_root, content):
    folder = fuzz_root / "recipe"
    file = fresh(folder) / "r.toml"
    file.write_bytes(content)
    recipe = parses_or_refuses(lambda: recipes.load(file), folder)
    if recipe is not None:
        assert recipe.kind in recipes.KINDS and recipe.source == str(file)
        assert recipe.replace().to_dict() == recipe.to_dict()  # what it records reads back the same


@FUZZ
@given(data=near_valid_recipes())
def test_fuzz_recipe_dict(fuzz_root, data):
    folder = fuzz_root / "recipe-dict"  # nothing on disk: named in errors through `where`
    recipe = parses_or_refuses(lambda: recipes.from_dict(data, where=f"recipe '{folder}'"), folder)
    if recipe is not None:
        assert recipe.to_dict()["name"] == data["name"]


# -- CSV manifests ----------------------------------------------------------------------------------------------

GOOD_PATHS = ["a.png", "b.png", "sub/c.png", "./a.png", "sub/../b.png", " a.png "]
HOSTILE_CELLS = st.one_of(
    st.sampled_from(["missing.png", "sub", "", "/nonexistent/x.png", "a.png\x00", "x" * 300 + ".png", '"a.png"',
                     "y/" * 200 + "z.png", "a.png\n", "../images/a.png", "\ufeffpath", "label,with,commas",
                     "1" * 5000]),
    TEXT,
)
LABELS = st.sampled_from(["cat", "dog", "é ☕", "label,with,comma", ' "quoted" ', "0", "-1"]) | TEXT
LABEL_SETS = st.sampled_from(["cat;dog", "cat", "", "dog; cat ", "cat;;dog", "cat;cat", '"cat;dog"', 'c"at', ";"])
LABEL_SETS = LABEL_SETS | TEXT
GOOD_HEADERS = [["path", "label"], ["label", "path"], ["id", "path", "label", "note"], ["path", "labels"]]
BAD_HEADERS = [["path"], ["label"], [], ["path", "path", "label"], ["Path", "Label"], [" path", "label "],
               ["path", "label", ""], ["\ufeffpath", "label"], ["path", "label", "labels"], ["labels"]]


@st.composite
def manifests(draw) -> bytes:
    """Mostly valid manifests with a defect or two: a bad header, hostile cells, short or long rows, broken quoting,
    another encoding; valid ones among them, so the fuzzer also walks the paths past the checks."""
    header = draw(st.sampled_from(BAD_HEADERS if rarely(draw) else GOOD_HEADERS))
    rows = []
    for _ in range(draw(st.integers(0, 6))):
        row = {"id": "7", "path": draw(st.sampled_from(GOOD_PATHS)), "label": draw(LABELS), "note": "",
               "labels": draw(LABEL_SETS)}
        cells = [row.get(col, "") for col in header]
        defect = draw(st.sampled_from(["none", "none", "none", "cell", "short", "long"]))
        if defect == "cell" and cells:  # one hostile cell
            k = draw(st.integers(0, len(cells) - 1))
            cells[k] = draw(HOSTILE_CELLS)
        elif defect == "short":
            cells = cells[: draw(st.integers(0, max(len(cells) - 1, 0)))]
        elif defect == "long":
            cells.append(draw(HOSTILE_CELLS))
        rows.append(cells)
    style = draw(st.sampled_from(["csv", "csv", "naive"]))
    if style == "csv":  # proper quoting
        buf = io.StringIO()
        csv.writer(buf, lineterminator=draw(st.sampled_from(["\n", "\r\n"]))).writerows([header, *rows])
        text = buf.getvalue()
    else:  # naive joins: stray quotes, embedded newlines and commas break the structure
        sep = draw(st.sampled_from([",", ";", "\t"]))
        text = "\n".join(sep.join(r) for r in [header, *rows]) + draw(st.sampled_from(["", "\n", "\n\n", "\r"]))
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    return text.encode(encoding, "replace")


@pytest.fixture(scope="module")
def manifest_images(fuzz_root, sample_images) -> Path:
    """Real images the manifests can point at: a.png, b.png and sub/c.png (never rewritten by the examples)."""
    folder = fuzz_root / "images"
    (folder / "sub").mkdir(parents=True)
    photo = sample_images["china.jpg"]
    for k, name in enumerate(("a.png", "b.png", "sub/c.png")):
        photo.crop((40 * k, 0, 40 * k + 32, 32)).save(folder / name)
    return folder


@FUZZ
@given(content=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode), manifests(), manifests()))
def test_fuzz_csv_manifest(manifest_images, content):
    file = manifest_images / "m.csv"
    file.write_bytes(content)
    ds = parses_or_refuses(lambda: open_dataset(file), manifest_images)
    if ds is not None:
        assert len(ds) == len(ds.targets) > 0 and len(ds.classes) >= 2
        assert all(Path(s).is_file() for s in ds.sources)
        if ds.multilabel:  # 0/1 rows over the classes; an empty row is an image with no label
            assert ds.targets.shape == (len(ds), len(ds.classes)) and set(np.unique(ds.targets)) <= {0, 1}
        else:
            assert ds.targets.min() >= 0 and ds.targets.max() < len(ds.classes)


# -- IDX --------------------------------------------------------------------------------------------------------

U32 = st.one_of(st.integers(0, 6), st.sampled_from([2**16, 2**31, 2**32 - 1, 3 * 2**30]), st.integers(0, 2**32 - 1))
WRAPPING_DIMS = [(2**31, 2**31, 4), (2**21, 2**21, 2**22), (2**32 - 1, 2**32 - 1, 2**32 - 1), (2**31, 2**31, 2)]
MAGICS = st.sampled_from([0x803, 0x801, 0x802, 0x804, 0x0803FF, 0x0D03, 0]) | st.integers(0, 2**32 - 1)
DEFECTS = ["magic", "dims", "overflow", "empty", "count", "truncate", "extra", "random", "gzip-flip", "gzip-cut"]


def idx_bytes(magic: int, dims: tuple[int, ...], body: bytes) -> bytes:
    return struct.pack(f">I{len(dims)}I", magic, *dims) + body


@st.composite
def damaged(draw, magic: int, dims: tuple[int, ...], body: bytes, defects: set[str]) -> tuple[bytes, bool]:
    """One IDX file with `defects` applied, and whether it is gzipped."""
    if "magic" in defects:
        magic = draw(MAGICS)
    if "dims" in defects:
        dims = tuple(draw(st.lists(U32, max_size=4)))
    if "overflow" in defects:
        dims = draw(st.sampled_from(WRAPPING_DIMS))
    if "empty" in defects and dims:
        dims = (*dims[:-1], 0)  # images of H x 0 pixels, or no labels
    if "count" in defects and dims:
        dims = (draw(st.integers(0, 9)), *dims[1:])  # e.g. more labels than images
    if defects & {"dims", "overflow", "empty", "count"}:  # a body that fits the new header, so it gets past that
        size = math.prod(dims)
        body = bytes(k % 251 for k in range(size)) if size <= 4096 else b""  # (2**31, 2**31, 4): 0 in int64
    data = idx_bytes(magic, dims, body)
    if "truncate" in defects:
        data = data[: draw(st.integers(0, len(data)))]  # the header included
    if "extra" in defects:
        data += draw(st.binary(min_size=1, max_size=8))
    if "random" in defects:
        data = draw(st.binary(max_size=80))
    gz = draw(st.booleans()) or "gzip-flip" in defects or "gzip-cut" in defects
    if gz:
        data = bytearray(gzip.compress(data, mtime=0))
        if "gzip-flip" in defects:
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        if "gzip-cut" in defects:
            data = data[: draw(st.integers(0, len(data) - 1))]
    return bytes(data), gz


@st.composite
def idx_sets(draw) -> dict[str, bytes]:
    """File name -> bytes: a valid images/labels pair with up to two defects in each, sometimes no labels file,
    sometimes a classes.txt (too short, not UTF-8)."""
    n, h, w = draw(st.integers(1, 5)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    labels = bytes(draw(st.lists(st.integers(0, 12) | st.just(255), min_size=n, max_size=n)))
    files = {}
    images, gz = draw(damaged(0x803, (n, h, w), bytes(k % 251 for k in range(n * h * w)),
                              draw(st.sets(st.sampled_from(DEFECTS), max_size=2))))
    files["t-images-idx3-ubyte" + (".gz" if gz else "")] = images
    if not rarely(draw, 10):
        labels, gz = draw(damaged(0x801, (n,), labels, draw(st.sets(st.sampled_from(DEFECTS), max_size=2))))
        files["t-labels-idx1-ubyte" + (".gz" if gz else "")] = labels
    if rarely(draw):
        names = draw(st.lists(st.sampled_from(["cat", "dog", "", " ", "é"]) | TEXT, max_size=14))
        files["classes.txt"] = draw(st.sampled_from([b"\xff\xfe\x00bad", "\n".join(names).encode()]))
    return files


@FUZZ
@given(files=idx_sets(), by_prefix=st.booleans())
def test_fuzz_idx(fuzz_root, files, by_prefix):
    folder = fresh(fuzz_root / "idx")
    for name, content in files.items():
        (folder / name).write_bytes(content)
    images_file = next(folder / n for n in files if "images" in n)
    ds = parses_or_refuses(lambda: open_dataset(folder / "t" if by_prefix else images_file), folder)
    if ds is not None:
        assert ds.kind == "idx" and len(ds) == len(ds.targets) > 0
        assert ds.targets.max() < len(ds.classes)
        img = np.asarray(ds.image(len(ds) - 1))  # pixels that open must decode
        assert img.ndim == 3 and img.shape[2] == 3 and img.size > 0


@pytest.mark.parametrize("name", ["x" * 300, "x" * 240, "x" * 300 + ".csv", "a\x00b", "missing.csv", "m.csv/x"])
def test_unusable_dataset_paths_are_data_errors(tmp_path, name):
    """A name the OS refuses (too long; 240 characters plus IDX's '-images-idx3-ubyte' is) is a DataError."""
    (tmp_path / "m.csv").write_text("path,label\n")
    with pytest.raises(TransferkitError, match="cannot open dataset"):
        open_dataset(tmp_path / name)


# -- a recipe's name is a directory name ------------------------------------------------------------------------

BAD_NAMES = ["", "  ", ".", "..", "../../x", "{elsewhere}", "a/b", "a\\b", "nul\x00", "-rf"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_recipe_name_must_be_a_plain_name(tmp_path, name):
    """`transferkit run` writes to ./NAME without -o: a path there would write outside the working directory."""
    name = name.format(elsewhere=tmp_path / "elsewhere")
    data = {"name": name, "kind": "probe", "model": "test_resnet"}
    with pytest.raises(TransferkitError, match=r"The 'name' field of recipe file '.*r\.toml' must be a plain name"):
        recipes.from_dict(data, where=f"recipe file '{tmp_path / 'r.toml'}'")
    with pytest.raises(TransferkitError, match="The 'name' field of recipe 'mine' must be a plain name"):
        recipes.from_dict({**data, "name": "mine"}).replace(name=name)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_run_refuses_a_recipe_named_like_a_path(tmp_path, photo_folder, monkeypatch, name, cli_run):
    name = name.format(elsewhere=tmp_path / "elsewhere")
    work = tmp_path / "a" / "b"  # '../../x' would land in tmp_path
    work.mkdir(parents=True)
    recipe = work / "r.toml"
    recipe.write_text(recipe_text({"name": name, "kind": "probe", "model": "test_resnet", "image_size": 32}))
    monkeypatch.chdir(work)
    before = sorted(tmp_path.rglob("*"))
    result = cli_run("run", recipe, photo_folder, ok=False, catch=True)
    assert result.exit_code == 1, result.output
    assert f"The 'name' field of recipe file '{recipe}' must be a plain name" in result.output
    assert sorted(tmp_path.rglob("*")) == before, "nothing is written, in the working directory or elsewhere"


@pytest.mark.parametrize("name", ["mine", "small-different", "v1.2", "café ☕", "a b"])
def test_plain_recipe_names_pass(name):
    assert recipes.from_dict({"name": name, "kind": "probe", "model": "test_resnet"}).name == name


# -- symlinks in an ImageFolder tree ----------------------------------------------------------------------------


@pytest.fixture()
def three_images(tmp_path, sample_images) -> Path:
    """data/even/a.png, data/even/b.png, data/odd/c.png: real photo crops."""
    root = tmp_path / "data"
    for k, name in enumerate(("even/a.png", "even/b.png", "odd/c.png")):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        sample_images["flower.jpg"].crop((50 * k, 0, 50 * k + 48, 48)).save(root / name)
    return root


def scan_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "transferkit.data.folders" and r.levelname == "WARNING"]


def test_symlink_loop_in_a_class_folder_lists_each_image_once(three_images, caplog):
    """`ln -s .. data/odd/up` made 3 images 123 rows, 121 of them labelled 'odd'."""
    root = three_images
    os.symlink("..", root / "odd" / "up")
    os.symlink("../odd", root / "even" / "sibling")  # another class: its images keep their own label
    ds = open_dataset(root)
    assert ds.classes == ["even", "odd"] and ds.targets.tolist() == [0, 0, 1]
    assert ds.sources == [str(root / "even" / "a.png"), str(root / "even" / "b.png"), str(root / "odd" / "c.png")]
    [message] = scan_warnings(caplog)
    assert "skipped 2 folder link(s)" in message and str(root / "even" / "sibling") in message
    assert image_files([root]) == ds.sources  # predict's folder scan is the same scan


def test_a_file_linked_twice_is_listed_once(three_images, caplog):
    root = three_images
    os.symlink("c.png", root / "odd" / "copy.png")
    os.link(root / "even" / "a.png", root / "even" / "hard.png")
    ds = open_dataset(root)
    assert [Path(s).name for s in ds.sources] == ["a.png", "b.png", "c.png"] and ds.targets.tolist() == [0, 0, 1]
    [message] = scan_warnings(caplog)
    assert "2 file(s) reached twice" in message and "hard.png" in message


def test_a_symlink_to_a_folder_elsewhere_still_works(three_images, tmp_path, sample_images, caplog):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for k in range(2):
        sample_images["china.jpg"].crop((0, 60 * k, 48, 60 * k + 48)).save(elsewhere / f"e{k}.jpg")
    os.symlink(elsewhere, three_images / "odd" / "more")
    os.symlink(elsewhere / "e0.jpg", three_images / "even" / "e0.jpg")  # a file linked once is a file
    ds = open_dataset(three_images)
    assert [Path(s).name for s in ds.sources] == ["a.png", "b.png", "e0.jpg", "c.png", "e0.jpg", "e1.jpg"]
    assert ds.targets.tolist() == [0, 0, 0, 1, 1, 1] and not scan_warnings(caplog)
    assert ds.image(4).size == (48, 48)


# -- hostile file names -----------------------------------------------------------------------------------------

HOSTILE_NAMES = ["with space.png", "café ☕.png", "-rf.png", "100%.png", "50%s%d.jpg", "it's \"quoted\".png",
                 "semi;colon,comma.png", "back\\slash.png", "new\nline.png", "tab\there.png", "x" * 196 + ".png"]


def test_extract_hostile_file_names(tmp_path, sample_images, monkeypatch, code_cache, cli_run):
    """Every image gets a row whatever its name; meta.json lists the sources exactly; nothing lands elsewhere."""
    root = tmp_path / "data"
    names = {}
    for cls, photo in (("temple", "china.jpg"), ("flower", "flower.jpg")):
        (root / cls).mkdir(parents=True)
        for k, name in enumerate(HOSTILE_NAMES):
            try:
                sample_images[photo].crop((30 * k, 30 * k, 30 * k + 64, 30 * k + 64)).save(root / cls / name)
            except OSError:  # a file system that refuses a newline or a backslash: test the rest
                continue
            names.setdefault(cls, []).append(name)
    assert len(names["temple"]) >= len(HOSTILE_NAMES) - 2
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # '-rf.png' or '%' must not turn into options, or files in the working directory
    before = sorted(tmp_path.rglob("*"))
    out = tmp_path / "codes"
    result = cli_run("extract", root, "-o", out, "--image-size", "32", "--precision", "fp32", "--engine", "torch",
                     "--batch-size", "8")
    expected = [str(root / cls / name) for cls in ("flower", "temple") for name in sorted(names[cls])]
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["sources"] == expected and meta["classes"] == ["flower", "temple"]
    assert f"{len(expected)} images" in result.output
    created = sorted(set(tmp_path.rglob("*")) - set(before))
    assert created and all(p == out or out in p.parents for p in created), created
    stems = [Path(n).stem for listed in names.values() for n in listed]
    assert not [p for p in code_cache.rglob("*") if any(stem in p.name for stem in stems)]  # content-keyed only


@pytest.mark.parametrize("pool", ["\u0663x\u0663", "\u0663", "2x\uff12"])
def test_grid_pools_take_ascii_digits_only(pool):
    """'٣x٣' (Arabic-Indic digits) passed as a 3x3 grid: int() reads any Unicode digit."""
    from transferkit.codes.params import parse_pools
    from transferkit.errors import ModelError

    with pytest.raises(ModelError):
        parse_pools(pool)
