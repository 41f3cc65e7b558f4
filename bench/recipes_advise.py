"""The four recipes and `advise` on Fashion-MNIST at 10, 100, 1,000 per class and all 60,000, and on a small
natural-photo set: does advise pick the recipe that wins (or one within 1 point of it)?

Every recipe runs as shipped (`transferkit run RECIPE DATA --test TEST`), scored on the official 10,000
Fashion-MNIST test images; advise sees only the training subset. Figures are kept per (size, recipe) as JSON in
--results (committed: a new checkout keeps them; delete a file to measure it again), the runs' outputs in --work,
and the section 'recipes-advise' of docs/benchmarks.md is rewritten from all kept figures.

    python bench/recipes_advise.py                      # everything, ~1 h on 2 cores
    python bench/recipes_advise.py --sizes 10,100       # some sizes only
    python bench/recipes_advise.py --sizes photos       # the natural-photo case (needs scikit-image)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_lines, write_section  # noqa: E402

from transferkit import recipes  # noqa: E402
from transferkit.data.datasets import ImageDataset  # noqa: E402
from transferkit.jobs import load_data  # noqa: E402
from transferkit.recipes.advise import advise  # noqa: E402
from transferkit.recipes.demo import fashion_mnist  # noqa: E402

SIZES = ("10", "100", "1000", "full", "photos")
RECIPES = ("small-similar", "small-different", "large-similar", "large-different")
# skimage.data photos whose subject is an ImageNet-like object, plus scikit-learn's two
PHOTOS = {"cat": "chelsea", "coffee": "coffee", "astronaut": "astronaut", "rocket": "rocket"}


def photo_set(root: Path, per_class: int, seed: int) -> Path:
    """An ImageFolder of random square crops (40-80% of the short side, random flips) of six real photos.

    Classes are the photos, so this is small and easy: a sanity case for 'similar', not a benchmark of skill.
    """
    from PIL import Image
    from skimage import data as skdata
    from sklearn.datasets import load_sample_images

    images = {cls: Image.fromarray(getattr(skdata, name)()).convert("RGB") for cls, name in PHOTOS.items()}
    sk = load_sample_images()
    sk = {Path(f).name: Image.fromarray(a) for f, a in zip(sk.filenames, sk.images)}
    images.update(temple=sk["china.jpg"], flower=sk["flower.jpg"])
    rng = np.random.default_rng(seed)
    if root.exists():
        shutil.rmtree(root)
    for cls, img in images.items():
        (root / cls).mkdir(parents=True)
        short = min(img.size)
        for i in range(per_class):
            side = int(short * rng.uniform(0.4, 0.8))
            x, y = rng.integers(0, img.width - side + 1), rng.integers(0, img.height - side + 1)
            crop = img.crop((x, y, x + side, y + side)).resize((96, 96))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop.save(root / cls / f"{i:03d}.png")
    return root


def datasets(size: str, work: Path) -> tuple[ImageDataset, ImageDataset]:
    if size == "photos":
        return (load_data(photo_set(work / "photos-data" / "train", 20, 0)),
                load_data(photo_set(work / "photos-data" / "test", 20, 1)))
    return fashion_mnist("train", per_class=None if size == "full" else int(size)), fashion_mnist("t10k")


def measure(size: str, work: Path, results: Path, quiet: bool) -> None:
    """Advise, then all four recipes, for one training size; each one's figures kept as JSON in RESULTS/SIZE."""
    train, test = datasets(size, work)
    out, figures = work / size, results / size
    out.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    if not (figures / "advise.json").exists():
        start = time.perf_counter()
        advice = advise(train, progress=not quiet)
        row = {**advice.to_dict(), "wall_s": time.perf_counter() - start, "machine": machine_lines()}
        (figures / "advise.json").write_text(json.dumps(row, indent=1, default=str))
        print(advice.report(), flush=True)
    for name in RECIPES:
        if (figures / f"{name}.json").exists():
            continue
        print("\n".join(machine_lines()), flush=True)
        if (out / name).exists():
            shutil.rmtree(out / name)
        result = recipes.get(name).run(train, test, out / name, progress=not quiet)
        row = {**result.to_dict(), "n_train": len(train), "n_test": len(test), "machine": machine_lines()}
        (figures / f"{name}.json").write_text(json.dumps(row, indent=1, default=str))
        print(result.summary(), flush=True)


def table(results: Path) -> str:
    lines = [
        "Each recipe as shipped (`recipes/*.toml`, `tf_efficientnet_lite0` with the packaged ImageNet weights),",
        "trained on the first N images per class of the Fashion-MNIST training set and scored on the official",
        "10,000 test images; `advise` sees only the training images. 'pick ok' = advise's recipe is the best",
        "measured one or within 1 point of it. Photos: crops of six real photos (scikit-image's chelsea, coffee,",
        "astronaut, rocket; scikit-learn's china and flower), 20 per class for training and 20 other random",
        "crops per class for testing: small and easy, a sanity case for 'similar', not a measure of skill.",
        "",
        "| train | advise: gap (z) | max-softmax | domain | pick | small-similar | small-different | large-similar "
        "| large-different | best | pick ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    details = []
    for size in SIZES:
        out = results / size
        if not (out / "advise.json").exists():
            continue
        adv = json.loads((out / "advise.json").read_text())
        accs, cells = {}, []
        for name in RECIPES:
            path = out / f"{name}.json"
            if path.exists():
                row = json.loads(path.read_text())
                accs[name] = row["accuracy"]
                cells.append(f"{100 * row['accuracy']:.2f}% ({row['seconds']['total'] / 60:.1f} min)")
            else:
                cells.append("-")
        best = max(accs, key=accs.get) if accs else None
        ok = "-"
        if best and adv["recipe"] in accs and len(accs) == len(RECIPES):
            ok = "yes" if accs[best] - accs[adv["recipe"]] <= 0.01 else (
                f"no ({100 * (accs[best] - accs[adv['recipe']]):.2f} behind)")
        n = json.loads((out / f"{best}.json").read_text())["n_train"] if best else adv["n_images"]
        label = {"photos": f"photos ({n})", "full": f"{n:,} (all)"}.get(size, f"{n:,} ({size}/class)")
        lines.append(
            f"| {label} | {adv['gap_points']:+.2f} ({adv['gap_z']:.1f}) | {adv['max_softmax']:.3f} | {adv['domain']} "
            f"| **{adv['recipe']}** | " + " | ".join(cells) + f" | {best or '-'} | {ok} |")
        runs = sorted({m.split("date: ")[1] for name in accs
                       for m in json.loads((out / f"{name}.json").read_text())["machine"] if m.startswith("- date: ")})
        details.append(f"- **{size}**: advise took {adv['wall_s']:.0f} s, estimated the pick at "
                       f"{adv['estimate_seconds'] / 60:.1f} min; best earlier stage {adv['best_earlier']}; "
                       + "; ".join(m[2:] for m in adv["machine"])
                       + (f"; recipes run {runs[0]}" + (f" to {runs[-1]}" if len(runs) > 1 else "") if runs else ""))
        figures = {name: json.loads((out / f"{name}.json").read_text()) for name in ["advise", *accs]}
        details += [f"  - **Note** ({name}: {row['note']})" for name, row in figures.items()
                    if "note" in row]  # added by hand: what disturbed a run
    lines += ["", "Cells: test accuracy (wall time of the whole recipe run, codes or training plus testing).", "",
              "Machine and date:", "", *details]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated: " + ", ".join(SIZES))
    parser.add_argument("--work", type=Path, default=Path("bench/.work/recipes"), help="the runs' outputs")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "recipes-advise",
                        help="the figures (JSON), one file per size and recipe")
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--table-only", action="store_true", help="only rewrite the docs from the kept figures")
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    if set(sizes) - set(SIZES):
        parser.error(f"unknown --sizes {', '.join(sorted(set(sizes) - set(SIZES)))}")
    torch.set_flush_denormal(True)
    args.work.mkdir(parents=True, exist_ok=True)
    for size in [] if args.table_only else sizes:
        measure(size, args.work, args.results, args.quiet)
    body = "## Recipes and advise\n\n" + table(args.results)
    write_section(args.doc, "recipes-advise", body)
    print(body)


if __name__ == "__main__":
    main()
