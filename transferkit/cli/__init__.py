"""`transferkit` command line: each command parses its options, calls one API function and prints.

One module per command group (`codes`, `probe`, `finetune`, `surgery`, `recipes`, `cache`, `audit`, `retrieval`),
each adding its commands to the `cli` group defined here. The top floor: it may import every room, lazily inside
each command so that `--help` stays fast; nothing imports it.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import click

from transferkit.data.params import IMAGE_SIZE
from transferkit.finetune.params import FINETUNE
from transferkit.models.params import DEFAULT_MODEL
from transferkit.runtime.params import click_type  # the limits live in those tables (plain data: no torch)


class _Group(click.Group):
    """Turn transferkit's own errors into one-line messages and exit code 1."""

    group_class = type  # nested groups (`transferkit cache ...`) are _Groups too: the innermost names the flag

    def invoke(self, ctx: click.Context):
        from transferkit.errors import ParameterError, TransferkitError

        try:
            return super().invoke(ctx)
        except ParameterError as e:
            command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            raise click.ClickException(_in_flags(e, command)) from e
        except TransferkitError as e:
            raise click.ClickException(str(e)) from e
        except OSError as e:
            raise click.ClickException(f"{e.strerror or e}: '{e.filename}'" if e.filename else str(e)) from e


def _in_flags(error, command: click.Command | None) -> str:
    """A ParameterError in the terms of the command that ran: "The 'precision' parameter of X must be ..." ->
    "Invalid value for '--precision': must be ..." when one of its options binds that parameter."""
    params = command.params if command is not None and error.param else []
    bound = next((p for p in params if p.name == error.param), None)
    if bound is None:
        return str(error)
    longs = [o for o in bound.opts if o.startswith("--")]  # '--out', not '-o'
    name = (longs or bound.opts)[0] if isinstance(bound, click.Option) else bound.human_readable_name
    problem = re.sub(rf"^The '{re.escape(error.param)}' parameter( of [\w.]+)? ", "", str(error))
    return f"Invalid value for '{name}': {problem}"


class _LogFormat(logging.Formatter):
    """Plain lines for a user: the message alone, 'warning: ' or 'error: ' before problems; module names and
    levels only at -vv, where they help find the code that spoke."""

    def __init__(self, with_names: bool) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s" if with_names else "%(message)s")
        self.with_names = with_names

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.with_names or record.levelno < logging.WARNING:
            return text
        return f"{'warning' if record.levelno == logging.WARNING else 'error'}: {text}"


@click.group(cls=_Group)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.version_option(package_name="transferkit")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Transfer learning from pretrained CNNs: CNN codes, linear-SVM probes and layer sweeps."""
    ctx.obj = {"progress": not quiet, "verbose": verbose}
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormat(with_names=verbose > 1))
    logging.basicConfig(level=level, handlers=[handler])
    for noisy in ("PIL", "matplotlib", "timm", "onnx_ir", "onnxscript", "torch.onnx"):  # exporters: ~100 INFO lines
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 2 else logging.DEBUG)


class DataPath(click.Path):
    """A data set argument (folder, CSV, IDX file or IDX prefix), refused in a fraction of a second if it is none
    of them, or a folder with fewer than `min_classes` class folders or a class without images, before a command
    imports torch (open_dataset checks the rest later)."""

    def __init__(self, min_classes: int = 2) -> None:
        super().__init__(path_type=Path)
        self.min_classes = min_classes

    def convert(self, value, param, ctx) -> Path:
        from transferkit.data.params import ACCEPTED_FORMS, could_be_data

        if not could_be_data(value):
            self.fail(f"'{value}': no such file, folder or IDX prefix. Expected {ACCEPTED_FORMS}.", param, ctx)
        path = super().convert(value, param, ctx)
        if Path(path).is_dir():
            from transferkit.data.folders import check_folder
            from transferkit.errors import DataError

            try:
                check_folder(Path(path), self.min_classes)
            except DataError as e:  # as open_dataset would say it later: not a usage error
                raise click.ClickException(str(e)) from e
        return path


class ModelName(click.ParamType):
    """A timm model name, refused before torch loads if the names shipped for this timm version lack it
    (models.vocabulary); with `paths`, an existing file or folder (a run, a probe) is taken as it is."""

    name = "model"

    def __init__(self, paths: bool = False) -> None:
        self.paths = paths

    def convert(self, value, param, ctx) -> str:
        from transferkit.errors import ModelError
        from transferkit.models.vocabulary import refuse_unknown_model

        if self.paths and not Path(value).exists() and "/" in str(value) and ":" not in str(value):
            raise click.ClickException(f"'{value}': no such run, probe or converted model (nor a timm model name)")
        if not (self.paths and Path(value).exists()):
            try:
                refuse_unknown_model(str(value))
            except ModelError as e:  # as create_backbone would say it later
                raise click.ClickException(str(e)) from e
        return str(value)


class CodesPath(click.Path):
    """A codes directory (`transferkit extract`'s output), refused before torch loads if it is none."""

    def __init__(self) -> None:
        super().__init__(exists=True, file_okay=False, path_type=Path)

    def convert(self, value, param, ctx) -> Path:
        from transferkit.codes.store import FeatureStore
        from transferkit.errors import DataError

        path = super().convert(value, param, ctx)
        try:
            FeatureStore(path)
        except DataError as e:  # as the command would say it later
            raise click.ClickException(str(e)) from e
        return path


class ImageSize(click.ParamType):
    """`--image-size`, one form in every command: N (N x N pixels); also HxW where a command takes rectangles
    (`pairs`). Each side has the limits of the library's table (`allowed`, default data.params.IMAGE_SIZE)."""

    name = "image size"

    def __init__(self, allowed=IMAGE_SIZE, *, pairs: bool = False) -> None:
        self.side, self.pairs = click_type(allowed), pairs

    def get_metavar(self, param, ctx=None) -> str:
        return "N|HxW" if self.pairs else "N"

    def convert(self, value, param, ctx) -> int | tuple[int, int]:
        if isinstance(value, (int, tuple)):
            return value
        parts = str(value).strip().lower().split("x")
        if not (len(parts) == 1 or (self.pairs and len(parts) == 2)):
            self.fail(f"'{value}' is not {'N or HxW (e.g. 224 or 224x320)' if self.pairs else 'a whole number N'}.",
                      param, ctx)
        sides = [self.side.convert(p, param, ctx) for p in parts]
        return sides[0] if len(sides) == 1 else (sides[0], sides[1])


def model_options(f=None, *, table=FINETUNE, precision: str = "fp32",
                  help_precision: str = "bf16 autocast on CPU/GPU; fp16 needs CUDA."):
    """Options shared by every command that builds a backbone; their limits come from `table`."""
    if f is None:
        return lambda g: model_options(g, table=table, precision=precision, help_precision=help_precision)
    f = click.option("--precision", type=click_type(table["precision"]), default=precision,
                     show_default=True, help=help_precision)(f)
    f = click.option("--batch-size", type=click_type(table["batch_size"]), default=64, show_default=True)(f)
    f = click.option("--image-size", type=ImageSize(table["image_size"]), default=None,
                     help="Resize whole images to N x N instead of the model's pretrained size and crop.")(f)
    f = click.option("--weights", default="auto", show_default=True,
                     help="A .safetensors/.pth file, 'auto' (installed package, then timm hub), 'package', "
                          "'hub', or 'random'.")(f)
    f = click.option("--model", type=ModelName(), default=DEFAULT_MODEL, show_default=True,
                     help="Any timm model name.")(f)
    return f


def main() -> None:
    cli(prog_name="transferkit")


# each module registers its commands on `cli` (they import it from here, so they come last)
from transferkit.cli import audit, cache, codes, finetune, probe, recipes, retrieval, surgery  # noqa: E402, F401
