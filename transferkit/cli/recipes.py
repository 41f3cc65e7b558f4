"""`demo`, `recipes`, `run` and `advise`: the scenario recipes from the command line."""

from __future__ import annotations

from pathlib import Path

import click

from transferkit.cli import DataPath, ImageSize, cli


@cli.command()
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("transferkit-demo"), show_default=True)
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Folder with Fashion-MNIST's IDX files [default: the Debian package's].")
@click.option("--per-class", type=click.IntRange(1), default=100, show_default=True,
              help="Training images per class (first N in file order).")
@click.option("--image-size", type=ImageSize(), default=None, help="[default: the demo's tuned size]")
def demo(out: Path, data: Path | None, per_class: int, image_size: int | None) -> None:
    """Offline demo: Fashion-MNIST + packaged EfficientNet-Lite0: extract -> sweep -> probe -> test accuracy."""
    from transferkit.recipes.demo import run_demo

    result = run_demo(out, data=data, per_class=per_class, image_size=image_size, echo=click.echo,
                      progress=click.get_current_context().obj["progress"])
    click.echo(f"test {result['evaluation'].summary()} "
               f"({result['key']}, {result['n_train']} training images, {result['seconds']:.0f} s)")


@cli.command("recipes")
def recipes_command() -> None:
    """List the packaged recipes (the four cs231n scenarios), one line each."""
    from transferkit import recipes

    for name, description in recipes.list():
        click.echo(f"{name:<16} {description}")


@cli.command()
@click.argument("recipe")
@click.argument("data", type=DataPath())
@click.option("--test", type=DataPath(), default=None, help="Labelled test data to score on.")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for everything the run writes [default: ./RECIPE_NAME].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field; VALUE is a TOML scalar (epochs=5, lr=1e-3, augment=false). Repeatable.")
@click.option("--per-class", type=click.IntRange(1), default=None, help="Keep the first N training images per class.")
@click.option("--test-per-class", type=click.IntRange(1), default=None, help="Keep the first N test images per class.")
@click.option("--image-size", type=ImageSize(), default=None, help="Input size N (same as --set image_size=N).")
def run(recipe: str, data: Path, test: Path | None, out: Path | None, overrides: tuple[str, ...],
        per_class: int | None, test_per_class: int | None, image_size: int | None) -> None:
    """Run RECIPE (a name from `transferkit recipes` or a .toml file) on DATA end to end; score on --test."""
    from transferkit import recipes

    changes = recipes.parse_overrides(overrides)
    if image_size is not None:
        if changes.get("image_size", image_size) != image_size:
            raise click.UsageError("--image-size and --set image_size= disagree; give one")
        changes["image_size"] = image_size
    if test_per_class is not None and test is None:
        raise click.UsageError("--test-per-class needs --test")
    chosen = recipes.resolve(recipe).replace(**changes)  # a bad field or value: refused before torch loads
    from transferkit.jobs import load_data

    test_data = None if test is None else load_data(test, per_class=test_per_class)
    result = chosen.run(load_data(data, per_class=per_class), test_data, out or Path(chosen.name),
                        progress=click.get_current_context().obj["progress"])
    if result.evaluation is not None:
        click.echo(result.evaluation.report)
    click.echo(result.summary())


@cli.command()
@click.argument("data", type=DataPath())
@click.option("--per-class", type=click.IntRange(1), default=None, help="Keep the first N images of each class.")
@click.option("--threshold", "thresholds", multiple=True, metavar="NAME=VALUE",
              help="Override a threshold of the rule: large_per_class, gap_points, gap_z, max_softmax, imbalance. "
                   "Repeatable.")
@click.option("--sample", type=click.IntRange(10), default=2000, show_default=True,
              help="Images (stratified) in the similarity pass.")
@click.option("--run", "run_it", is_flag=True, help="Then run the recommended recipe on DATA.")
@click.option("--test", type=DataPath(), default=None, help="With --run: test data to score on.")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --run: output directory [default: ./RECIPE_NAME].")
@click.option("--image-size", type=ImageSize(), default=None,
              help="Input size N of the similarity pass and of the recommended run [default: 64 for the pass, "
                   "the recipe's for the run].")
def advise(data: Path, per_class: int | None, thresholds: tuple[str, ...], sample: int, run_it: bool,
           test: Path | None, out: Path | None, image_size: int | None) -> None:
    """Measure DATA's size and similarity to ImageNet and recommend a recipe, with the numbers behind it."""
    from transferkit.jobs import load_data
    from transferkit.recipes.advise import advise as advise_data
    from transferkit.recipes.advise import parse_thresholds

    progress = click.get_current_context().obj["progress"]
    train = load_data(data, per_class=per_class)
    sized = {} if image_size is None else {"image_size": image_size}
    advice = advise_data(train, thresholds=parse_thresholds(thresholds), sample=sample, progress=progress, **sized)
    click.echo(advice.report())
    if run_it:
        recipe = advice.recipe_to_run().replace(**sized)
        result = recipe.run(train, test, out or Path(advice.recipe), progress=progress)
        click.echo(result.summary())
    else:
        subset = f" --per-class {per_class}" if per_class else ""
        subset += f" --image-size {image_size}" if image_size else ""
        weighted = "".join(f" --set {k}={v}" for k, v in advice.balancing().items())
        click.echo(f"run it: transferkit run {advice.recipe} {data}{subset}{weighted} --test {test or 'TEST'}")
