"""`transferkit audit` on real photos with planted problems (an exact copy, a leaked near-duplicate in TEST, a
mislabelled image), on Fashion-MNIST with planted label flips, and the bad inputs that must write nothing."""

from __future__ import annotations

import contextlib
import csv
import html
import json
import os
import re
import shutil
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferkit.auditing.params import NEAR_THRESHOLD
from transferkit.errors import ParameterError
from transferkit.runtime.outputs import MARKER

SIZE = 64  # px: the photo crops are 64 x 64
FILES = {"summary.json", "duplicates.csv", "label_issues.csv", "outliers.csv", "report.html", "cleaned.csv"}  # --fix


def plant(photos: Path, root: Path) -> dict[str, Path]:
    """Copy `photos` to root/data and plant: an exact copy of temple/0.png, a flower filed under temple, an image of
    noise among the flowers, and in root/test a near-duplicate of flower/3.jpg (resized to 75% and back, JPEG
    quality 70) beside an unrelated image."""
    data = root / "data"
    shutil.copytree(photos, data)
    shutil.copyfile(data / "temple" / "0.png", data / "temple" / "0-copy.png")
    shutil.move(data / "flower" / "5.jpg", data / "temple" / "5-flower.jpg")
    noise = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(noise).save(data / "flower" / "noise.png")
    test = root / "test"
    for cls in ("flower", "temple"):
        (test / cls).mkdir(parents=True)
    leak = test / "flower" / "leak.jpg"
    Image.open(data / "flower" / "3.jpg").convert("RGB").resize((48, 48)).resize((SIZE, SIZE)).save(leak, quality=70)
    Image.open(data / "temple" / "2.png").transpose(Image.Transpose.ROTATE_90).save(test / "temple" / "turned.png")
    return {"data": data, "test": test, "leak": leak, "leaked": data / "flower" / "3.jpg",
            "copy": data / "temple" / "0-copy.png", "original": data / "temple" / "0.png",
            "mislabelled": data / "temple" / "5-flower.jpg", "noise": data / "flower" / "noise.png"}


@pytest.fixture(scope="module")
def audited(tmp_path_factory, shared_photo_folder, cli_run):
    """The planted set audited once through the CLI (no code cache: module fixtures run outside code_cache), with
    --fix relabel; paths['before']: DATA's and TEST's files (and bytes) before the audit."""
    root = tmp_path_factory.mktemp("audit")
    paths = plant(shared_photo_folder, root)
    paths["before"] = (tree(paths["data"]), tree(paths["test"]))
    out = root / "out"
    result = cli_run("-q", "audit", paths["data"], "--test", paths["test"], "-o", out, "--image-size", SIZE,
                     "--no-cache", "--fix", "relabel")  # the default near-duplicate threshold
    return paths, out, result.output


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root`, by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_audit_finds_the_planted_leak_first_and_the_exact_copy(audited):
    paths, out, output = audited
    pairs = rows(out / "duplicates.csv")
    first = pairs[0]
    assert (first["scope"], first["set_a"], first["set_b"]) == ("leakage", "data", "test"), pairs[:3]
    assert {first["source_a"], first["source_b"]} == {str(paths["leaked"]), str(paths["leak"])}
    assert float(first["similarity"]) >= NEAR_THRESHOLD
    assert [p["scope"] for p in pairs].count("leakage") == 1, pairs[:3]  # the turned image leaks nothing
    exact = [p for p in pairs if p["kind"] == "exact"]
    assert [{p["source_a"], p["source_b"]} for p in exact] == [{str(paths["copy"]), str(paths["original"])}]
    assert exact[0]["scope"] == "within"
    assert "1 leaked pair(s)" in output and "report.html" in output


def test_audit_flags_the_mislabelled_image(audited):
    paths, out, _ = audited
    issues = rows(out / "label_issues.csv")
    assert issues, "no label issue found"
    top = issues[0]
    assert (top["source"], top["given_label"], top["suggested_label"]) == (str(paths["mislabelled"]), "temple",
                                                                           "flower")
    summary = json.loads((out / "summary.json").read_text())
    noise = summary["label_issues"]["noise"]
    assert noise["top_pairs"][0]["given"] == "temple" and noise["top_pairs"][0]["true"] == "flower"
    assert 0 < noise["estimated_noise_rate"] < 0.2
    assert summary["class_balance"]["counts"] == {"flower": 8, "temple": 10}
    assert summary["class_balance"]["imbalance_ratio"] == pytest.approx(10 / 8, abs=1e-3)


def test_audit_finds_the_image_of_noise_far_from_its_class(audited):
    paths, out, _ = audited
    outliers = rows(out / "outliers.csv")  # farthest first
    assert outliers[0]["source"] == str(paths["noise"]), outliers
    assert len(outliers) <= 3, outliers  # on the sweep's codes the flower filed under temple is far from it too
    assert outliers[0]["label"] == "flower" and float(outliers[0]["score"]) > float(outliers[0]["threshold"])


def test_audit_writes_every_file_and_a_self_contained_report(audited):
    paths, out, _ = audited
    marker = json.loads((out / MARKER).read_text())
    assert marker["kind"] == "audit" and set(marker["files"]) == FILES  # the scratch codes are gone
    page = (out / "report.html").read_text()
    for heading in ("Leakage", "Duplicates within a set", "Likely label errors", "Outliers", "Class counts"):
        assert f"<h2>{heading}" in page
    assert "http://" not in page and "https://" not in page and " src=" not in page.replace(" src='data:", "")
    assert page.count("<script") == 1 and "<script>" in page  # one inline script (sorting): opens offline
    assert page.count("data:image/jpeg;base64,") >= 4  # both leak images, the copy pair, the mislabelled image
    assert str(paths["leak"]) in page and str(paths["mislabelled"]) in page
    assert str(paths["noise"]) in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")  # Debian's package: .ci/install
# Appended to a copy of report.html: sorts every table by each sortable column (twice: up, then down), records the
# rows each time in <pre id='probe'>, then throws a planted error, which shows that uncaught errors are reported.
PROBE = """<script>
var found = [];
document.querySelectorAll("table").forEach(function (table, t) {
  var rows = function () {
    return Array.prototype.map.call(table.tBodies[0].rows, function (r) {
      return Array.prototype.map.call(r.cells, function (c) { return c.textContent.trim(); });
    });
  };
  var before = rows();
  table.querySelectorAll("th button").forEach(function (b) {
    var th = b.parentNode, seen = {table: t, col: th.cellIndex, before: before};
    b.click(); seen.up = rows(); seen.up_sort = th.getAttribute("aria-sort");
    b.click(); seen.down = rows(); seen.down_sort = th.getAttribute("aria-sort");
    found.push(seen);
  });
});
var pre = document.createElement("pre");
pre.id = "probe";
pre.textContent = JSON.stringify(found);
document.body.appendChild(pre);
throw new Error("planted-by-the-test");
</script>"""


def chromium(page: Path, profile: Path) -> tuple[str, list[str]]:
    """Load `page` in headless Chromium: the DOM after its scripts ran, and the console lines (console messages and
    uncaught exceptions, which Chromium logs to stderr as '...:CONSOLE...] "message", source: URL (line)')."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()]
    home = {v: str(profile) for v in ("HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}  # crash reports, caches: not ~
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **home})
    try:
        dom, log = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the browser's helpers, if any outlived it
        proc.communicate()
    assert proc.returncode == 0 and "</html>" in dom, log[-2000:]
    return dom, [line for line in log.splitlines() if ":CONSOLE" in line]


class _Tables(HTMLParser):
    """The rendered tables of a DOM, by the <h2> heading before each: lists of rows of cell texts."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.tables, self.heading, self.text, self.row = {}, "", None, None
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in ("h2", "td", "th"):
            self.text = ""
        elif tag == "tr":
            self.row = []
        elif tag == "table":
            self.tables[self.heading] = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2":
            self.heading = self.text.split(" (")[0]
        elif tag in ("td", "th"):
            self.row.append(self.text.strip())
        elif tag == "tr" and self.row is not None:
            self.tables[self.heading].append(self.row)
        if tag in ("h2", "td", "th"):
            self.text = None

    def handle_data(self, data: str) -> None:
        if self.text is not None:
            self.text += data


@pytest.mark.skipif(CHROMIUM is None, reason="needs a headless browser: Debian's chromium package (.ci/install)")
def test_report_renders_in_chromium_without_errors_and_sorts(audited, tmp_path):
    """report.html as a browser shows it: no console message or uncaught error, the planted leak, exact copy and
    mislabelled image in their tables; every sortable column sorts up then down, numbers numerically."""
    paths, out, _ = audited
    dom, console = chromium(out / "report.html", tmp_path / "profile")
    assert console == [], console
    tables = _Tables(dom).tables
    leak = tables["Leakage: the same image in DATA and TEST"]
    assert [(r[1], r[3]) for r in leak[1:]] == [(f"data: {paths['leaked']}", f"test: {paths['leak']}")], leak
    within = tables["Duplicates within a set"]
    copies = {f"data: {paths['original']}", f"data: {paths['copy']}"}
    assert [r[4:] for r in within if {r[1], r[3]} == copies] == [["exact", "1.0000"]], within
    issues = tables["Likely label errors"]
    assert issues[1][1:4] == [str(paths["mislabelled"]), "temple", "flower"], issues
    assert tables["Class counts"][1:] == [["flower", "8"], ["temple", "10"]]

    probed = tmp_path / "probed.html"
    probed.write_text((out / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    dom, console = chromium(probed, tmp_path / "profile")
    assert len(console) == 1 and "Uncaught Error: planted-by-the-test" in console[0], console  # errors are seen
    found = json.loads(html.unescape(re.search(r"<pre id=\"probe\">(.*?)</pre>", dom, re.S).group(1)))
    assert len(found) == len(dom.split("<button")) - 1 > 10  # every sortable column was probed
    for seen in found:
        col, up, down = seen["col"], seen["up"], seen["down"]
        assert sorted(up) == sorted(seen["before"]) == sorted(down), seen  # rows move whole
        assert (seen["up_sort"], seen["down_sort"]) == ("ascending", "descending")
        values = [r[col] for r in up]
        assert [r[col] for r in down] == values[::-1], seen
        if all(re.fullmatch(r"[0-9.]+", v) for v in values):
            assert values == sorted(values, key=float), seen
    counts = [s for s in found if s["up"][0][0] in ("flower", "temple") and s["col"] == 1]
    assert [[r[1] for r in s["up"]] for s in counts] == [["8", "10"]]  # as numbers: as text, "10" < "8"


def test_fix_relabel_writes_a_manifest_without_copies_and_leaks_touching_no_image(audited):
    """cleaned.csv loads as a data set: the second image of each duplicate pair within DATA and the leaked DATA
    image are left out, the likely label errors carry the suggested label, the rest their own; DATA and TEST are
    as they were."""
    from transferkit.data.datasets import open_dataset

    paths, out, output = audited
    assert (tree(paths["data"]), tree(paths["test"])) == paths["before"]
    cleaned = open_dataset(out / "cleaned.csv")
    label = {s: cleaned.classes[t] for s, t in zip(cleaned.sources, cleaned.targets)}
    pairs = rows(out / "duplicates.csv")
    gone = {p["source_b"] for p in pairs if p["scope"] == "within" and p["set_b"] == "data"} | \
        {p["source_a"] for p in pairs if p["scope"] == "leakage"}
    assert str(paths["leaked"]) in gone and not gone & set(label)
    assert [s for s in (paths["copy"], paths["original"]) if str(s) in label] != [], "both copies left out"
    assert str(paths["copy"]) not in label or str(paths["original"]) not in label, "both copies kept"
    assert label[str(paths["mislabelled"])] == "flower"  # filed under temple, relabelled as suggested
    suggested = {r["source"]: r["suggested_label"] for r in rows(out / "label_issues.csv")}
    assert label == {s: suggested.get(s, Path(s).parent.name) for s in map(str, sorted(paths["data"].rglob("*.*")))
                     if s not in gone}
    fixed = json.loads((out / "summary.json").read_text())["fix"]
    assert (fixed["fix"], fixed["kept"], fixed["images"]) == ("relabel", len(label), len(label) + len(gone))
    assert fixed["relabelled"] == len(set(suggested) - gone) >= 1
    assert f"{len(label)} of {len(label) + len(gone)} images kept" in output


def test_fix_drop_leaves_the_likely_label_errors_out(audited, tmp_path):
    """The same findings with fix 'drop' (cleaning.write_cleaned, fed the audit's CSVs): the relabelled images
    are left out instead; nothing else changes."""
    from transferkit.auditing.cleaning import write_cleaned
    from transferkit.data.datasets import open_dataset

    paths, out, _ = audited
    data, test = open_dataset(paths["data"]), open_dataset(paths["test"])
    index = {s: i for i, s in enumerate([*data.sources, *test.sources])}
    pairs = [{"scope": p["scope"], "a": index[p["source_a"]], "b": index[p["source_b"]]}
             for p in rows(out / "duplicates.csv")]
    issues = [{"index": index[r["source"]], "suggested": r["suggested_label"]} for r in rows(out / "label_issues.csv")]
    fixed = write_cleaned(tmp_path, data, pairs, issues, "drop")
    dropped, relabelled = open_dataset(tmp_path / "cleaned.csv"), open_dataset(out / "cleaned.csv")
    flagged = {data.sources[r["index"]] for r in issues}
    assert str(paths["mislabelled"]) in flagged and str(paths["mislabelled"]) not in dropped.sources
    assert dropped.sources == [s for s in relabelled.sources if s not in flagged]
    assert all(dropped.classes[t] == Path(s).parent.name for s, t in zip(dropped.sources, dropped.targets))
    assert fixed["kept"] == len(dropped) and fixed["relabelled"] == 0 and fixed["left_out"]["label_issues"] >= 1


def test_fix_is_refused_for_idx_and_unknown_values_writing_nothing(photo_folder, tmp_path, cli_run):
    import transferkit

    result = cli_run("audit", photo_folder, "-o", tmp_path / "out", "--fix", "remove", ok=False)
    assert result.exit_code == 2 and "'--fix'" in result.output
    with pytest.raises(ParameterError) as err:
        transferkit.audit(photo_folder, tmp_path / "out", fix="remove")
    assert err.value.param == "fix"
    idx = Path("/usr/share/datasets/fashion-mnist/t10k")  # IDX images have no file for a manifest to list
    if idx.with_name("t10k-images-idx3-ubyte.gz").exists():  # dataset-fashion-mnist
        result = cli_run("audit", idx, "-o", tmp_path / "out", "--fix", "drop", ok=False)
        assert result.exit_code == 1 and "Invalid value for '--fix'" in result.output.strip().splitlines()[-1]
        assert "IDX" in result.output
    assert not (tmp_path / "out").exists()


def test_a_failed_audit_leaves_the_previous_output_as_it_was(audited, tmp_path, cli_run):
    paths, out, _ = audited
    before = {f: (out / f).read_bytes() for f in FILES}
    broken = tmp_path / "data"
    shutil.copytree(paths["data"], broken)
    (broken / "flower" / "broken.jpg").write_bytes(b"not a jpeg")
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    result = cli_run("-q", "audit", broken, "-o", copy, "--image-size", SIZE, ok=False)
    assert result.exit_code == 1 and "broken.jpg" in result.output
    assert {f: (copy / f).read_bytes() for f in FILES} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]  # no half-written sibling


@pytest.mark.parametrize("case", ["test_has_a_class_data_lacks", "one_class", "empty_folder", "not_ours"])
def test_bad_input_is_one_line_and_writes_nothing(case, photo_folder, tmp_path, cli_run):
    data, test, out = photo_folder, None, tmp_path / "out"
    expected = {"test_has_a_class_data_lacks": "'dog' that", "one_class": "need at least 2",
                "empty_folder": "0 class folder(s)", "not_ours": "not written by transferkit"}[case]
    if case == "test_has_a_class_data_lacks":
        test = tmp_path / "test"
        shutil.copytree(photo_folder / "flower", test / "dog")
    elif case == "one_class":
        data = tmp_path / "one"
        shutil.copytree(photo_folder / "flower", data / "flower")
    elif case == "empty_folder":
        data = tmp_path / "empty"
        data.mkdir()
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli_run("audit", data, *(["--test", test] if test else []), "-o", out, "--image-size", SIZE, ok=False)
    assert result.exit_code == 1, result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("Error: ") and expected in message, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert case != "not_ours" or [p.name for p in out.iterdir()] == ["notes.txt"]


def test_limits_name_the_flag_and_the_parameter(photo_folder, tmp_path, cli_run):
    import transferkit

    result = cli_run("audit", photo_folder, "-o", tmp_path / "out", "--near-threshold", "1.5", ok=False)
    assert result.exit_code == 2 and "--near-threshold" in result.output
    with pytest.raises(ParameterError) as err:
        transferkit.audit(photo_folder, tmp_path / "out", near_threshold=0)
    assert err.value.param == "near_threshold"
    result = cli_run("audit", photo_folder, "-o", tmp_path / "out", "--pool", "all", ok=False)
    assert "Invalid value for '--pool'" in result.output
    assert not (tmp_path / "out").exists()


def test_multilabel_data_gets_label_issues_per_label(photo_folder, tmp_path):
    """A manifest with a 'labels' column: a flower labelled 'temple' is flagged; the noise is estimated per label."""
    import transferkit

    lines = ["path,labels"]
    for cls in ("flower", "temple"):
        for k, f in enumerate(sorted((photo_folder / cls).iterdir())):
            labels = {"flower": "flower;plant" if k % 2 else "flower", "temple": "temple"}[cls]
            lines.append(f"{f},{'temple' if f.name == '5.jpg' and cls == 'flower' else labels}")
    manifest = tmp_path / "labels.csv"
    manifest.write_text("\n".join(lines) + "\n")
    result = transferkit.audit(manifest, tmp_path / "out", image_size=SIZE, cv=3, layer="pre_logits",
                               progress=False)  # the codes this planted set was made on ('auto' sweeps 18 images)
    assert result.summary["multilabel"]
    assert set(result.summary["label_issues"]["noise"]["estimated_noise_rate_per_label"]) == {"flower", "plant",
                                                                                             "temple"}
    flagged = [result.sources[r["index"]] for r in result.label_issues]
    assert str(photo_folder / "flower" / "5.jpg") in flagged
    assert rows(tmp_path / "out" / "label_issues.csv")[0]["source"] == flagged[0]


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs dataset-fashion-mnist")
def test_planted_label_flips_in_fashion_mnist_are_found(tmp_path):
    """5% of 200 Fashion-MNIST labels flipped to another class (seeded): cleanlab's flags on out-of-fold
    probabilities catch most flips, at several times the 5% base rate of flips among the flagged.

    Measured 2026-11-27 (64 px, pre_logits avg, seeds 0-2): recall 0.7-0.9, precision 0.23-0.31 (seed 0: 0.7,
    0.26; with the calibrated SVM and cleanlab's default filter before: recall 0.7-0.8, precision 0.17-0.19); the
    out-of-fold classifier is right on ~70% of 200 images, so true confusions (shirt / T-shirt / pullover) are
    flagged too. Floors: recall 0.6, precision 0.12. The issue's bar is for 10,000 images (bench/audit_labels.py)."""
    import transferkit
    from transferkit.recipes.demo import fashion_mnist

    data = fashion_mnist("train", per_class=20)
    rng = np.random.default_rng(0)
    flip = rng.choice(len(data), 10, replace=False)
    data.targets = data.targets.copy()
    data.targets[flip] = (data.targets[flip] + rng.integers(1, 10, len(flip))) % 10
    result = transferkit.audit(data, tmp_path / "out", image_size=SIZE, progress=False)
    flagged = {r["index"] for r in result.label_issues}
    hits = len(flagged & set(flip.tolist()))
    assert hits / len(flip) >= 0.6 and hits / len(flagged) >= 0.12, (hits, len(flagged))
    assert result.summary["label_issues"]["noise"]["estimated_noise_rate"] > 0.05


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs dataset-fashion-mnist")
def test_out_of_fold_probabilities_rank_planted_flips_below_clean_labels():
    """The label step's own ranking (cleanlab's self-confidence on `out_of_fold_probabilities`), without the audit
    around it: 15 of 300 Fashion-MNIST labels flipped (seeded), pre_logits codes at 64 px.

    Measured 2026-11-27: ROC AUC of the flips against the clean labels, lowest quality first, 0.934 (seed 0; seed 1:
    0.959; the calibrated SVM used before: 0.934, 0.953). Floor 0.85: a classifier that ranked by chance scores 0.5."""
    from cleanlab.rank import get_label_quality_scores
    from sklearn.metrics import roc_auc_score

    from transferkit.auditing.label_issues import out_of_fold_probabilities
    from transferkit.codes.extractor import FeatureExtractor
    from transferkit.recipes.demo import fashion_mnist

    data = fashion_mnist("train", per_class=30)
    codes = FeatureExtractor(image_size=SIZE).fit().transform(data)
    y = np.asarray(data.targets)
    rng = np.random.default_rng(0)
    flip = rng.choice(len(y), 15, replace=False)
    noisy = y.copy()
    noisy[flip] = (y[flip] + rng.integers(1, 10, len(flip))) % 10
    probs = out_of_fold_probabilities(codes, noisy)
    assert probs.shape == (300, 10) and np.allclose(probs.sum(1), 1)
    auc = roc_auc_score(noisy != y, -get_label_quality_scores(noisy, probs))
    assert auc >= 0.85, auc
