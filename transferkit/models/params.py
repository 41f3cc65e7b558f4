"""Limits of the parameters that shape a network, as plain data (transferkit.runtime.params): `replace_head`,
fine-tuning, the CLI and the recipe files read them. Light: no torch, no sklearn."""

from __future__ import annotations

from transferkit.runtime.params import StrOptions

HEADS = ("linear", "mlp", "local")
HEAD = [StrOptions(HEADS)]
