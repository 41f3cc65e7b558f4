"""`transferkit` command line: each command parses its options, calls one API function and prints.

One module per command group (`codes`, `probe`, `finetune`, `surgery`, `recipes`, `cache`, `audit`), each adding its
commands to the `cli` group defined here. The top floor: it may import every room, lazily inside each command so
that `--help` stays fast; nothing imports it.
"""

from __future__ import annotations

import logging
import re
import sys

import click

from transferkit.finetune.params import FINETUNE
from transferkit.runtime.params import click_type  # the limits live in those tables (plain data: no torch)

DEFAULT_MODEL = "tf_efficientnet_lite0"  # kept literal so `--help` does not import torch


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


@click.group(cls=_Group)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.version_option(package_name="transferkit")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Transfer learning from pretrained CNNs: CNN codes, linear-SVM probes and layer sweeps."""
    ctx.obj = {"progress": not quiet}
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("PIL", "matplotlib", "timm", "onnx_ir", "onnxscript", "torch.onnx"):  # exporters: ~100 INFO lines
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 2 else logging.DEBUG)


def model_options(f=None, *, table=FINETUNE, precision: str = "fp32",
                  help_precision: str = "bf16 autocast on CPU/GPU; fp16 needs CUDA."):
    """Options shared by every command that builds a backbone; their limits come from `table`."""
    if f is None:
        return lambda g: model_options(g, table=table, precision=precision, help_precision=help_precision)
    f = click.option("--precision", type=click_type(table["precision"]), default=precision,
                     show_default=True, help=help_precision)(f)
    f = click.option("--batch-size", type=click_type(table["batch_size"]), default=64, show_default=True)(f)
    f = click.option("--image-size", type=click_type(table["image_size"]), default=None,
                     help="Resize whole images to N x N instead of the model's pretrained size and crop.")(f)
    f = click.option("--weights", default="auto", show_default=True,
                     help="A .safetensors/.pth file, 'auto' (installed package, then timm hub), 'package', "
                          "'hub', or 'random'.")(f)
    f = click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Any timm model name.")(f)
    return f


def main() -> None:
    cli(prog_name="transferkit")


# each module registers its commands on `cli` (they import it from here, so they come last)
from transferkit.cli import audit, cache, codes, finetune, probe, recipes, surgery  # noqa: E402, F401
