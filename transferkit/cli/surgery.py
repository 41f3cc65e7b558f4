"""`convert`, `export` and `summary`: network surgery from the command line."""

from __future__ import annotations

from pathlib import Path

import click

from transferkit.cli import DEFAULT_MODEL, ImageSize, ModelName, cli
from transferkit.runtime.params import click_type  # the limits live in those tables (plain data: no torch)
from transferkit.surgery.params import EXPORT


@cli.command()
@click.argument("source", metavar="RUN_OR_MODEL", type=ModelName(paths=True))
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for convert.json and fully_conv.safetensors.")
@click.option("--image-size", type=ImageSize(), default=None,
              help="The size the classifier was trained at (timm model names: their pretrained size).")
@click.option("--input-size", type=ImageSize(), default=None, hidden=True,
              help="Deprecated name of --image-size.")
@click.option("--window", is_flag=True, help="Keep every global pool as a training-size sliding window.")
@click.option("--weights", default="auto", show_default=True, help="For a timm model name.")
def convert(source: str, out: Path, image_size: int | None, input_size: int | None, window: bool,
            weights: str) -> None:
    """Convert a classifier's FC layers to convolutions, so it takes images of any size and returns score maps.

    RUN_OR_MODEL: a fine-tuning run, a probe directory or a timm model name.
    """
    from transferkit.runtime.outputs import check_output
    from transferkit.surgery.dense import CONVERTED_KIND, load_classifier, save_converted

    if input_size is not None:  # the old name of the option, as every other command now says it
        if image_size is not None:
            raise click.UsageError("--input-size is the deprecated name of --image-size; give only --image-size")
        click.echo("Warning: --input-size is deprecated; use --image-size.", err=True)
        image_size = input_size
    check_output(out, CONVERTED_KIND, inputs=[source])  # before the work
    clf = load_classifier(source, image_size=image_size, window=window, weights=weights)
    save_converted(clf, out)
    click.echo(f"{out}: {len(clf.classes)} classes, trained at {clf.net.input_size[0]}x{clf.net.input_size[1]}, "
               f"parity error {clf.net.parity_error:.2g}; map mean = original logits at "
               f"{'every size' if clf.net.mean_is_logits else 'the training size'}")
    click.echo(str(clf.net.head))


@cli.command()
@click.argument("source", metavar="RUN_OR_MODEL", type=ModelName(paths=True))
@click.option("--format", "fmt", type=click_type(EXPORT["fmt"]), default="onnx", show_default=True)
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="File to write.")
@click.option("--input-format", type=click_type(EXPORT["input_format"]), default="float", show_default=True,
              help="What the file takes: float (B,3,H,W) normalised with the file's mean/std, or raw RGB pixels "
                   "as uint8 (B,3,H,W) or uint8-nhwc (B,H,W,3), scaling and normalisation inside the graph.")
@click.option("--weights", default="auto", show_default=True, help="For a timm model name.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Compare onnxruntime with torch at two input sizes before the file is written.")
@click.pass_context
def export(ctx: click.Context, source: str, fmt: str, out: Path, input_format: str, weights: str,
           check: bool) -> None:
    """Export the fully convolutional form of RUN_OR_MODEL (run, probe, converted dir, timm name), dynamic H x W.

    The file's metadata_props hold its classes, mean, std, input size and layout, and what its scores are.
    """
    from transferkit.runtime.outputs import check_output_file
    from transferkit.surgery.dense import load_classifier
    from transferkit.surgery.export import export_onnx, written_here

    check_output_file(out, written_here)  # before the work: replace only a file transferkit exported
    def stage(name: str) -> None:  # one line per stage on stderr (-q: none)
        if ctx.obj["progress"]:
            click.echo(f"export: {name}...", err=True)

    stage("loading")
    clf = load_classifier(source, weights=weights)
    done = export_onnx(clf, out, input_format=input_format, check=check, progress=stage,
                       verbose=ctx.find_root().params.get("verbose", 0) > 0)
    click.echo(f"wrote {out} ({len(clf.classes)} classes, input {input_format}, "
               f"{sum(done.seconds.values()):.1f} s)")
    for row in done.checks:
        click.echo(f"onnxruntime vs torch at {row['size'][0]}x{row['size'][1]} (batch {row['batch']}, map "
                   f"{row['map'][0]}x{row['map'][1]}): max |diff| {row['max_abs_diff']:.2g}")


@cli.command()
@click.argument("model", type=ModelName(paths=True), default=DEFAULT_MODEL)
@click.option("--image-size", type=ImageSize(pairs=True), default=None,
              help="Input size, N or HxW [default: the model's pretrained size, or the run's or probe's].")
def summary(model: str, image_size: int | tuple[int, int] | None) -> None:
    """Per layer of MODEL (a timm name, a fine-tuning run or a probe directory): output shape, parameters, MACs."""
    from transferkit.surgery.summary import summarize_model

    click.echo(summarize_model(model, image_size).table())
