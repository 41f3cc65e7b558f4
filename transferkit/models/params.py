"""Limits of the parameters that shape a network, as plain data (transferkit.runtime.params): `replace_head`,
fine-tuning, the CLI and the recipe files read them. Light: no torch, no sklearn."""

from __future__ import annotations

from transferkit.runtime.params import StrOptions

DEFAULT_MODEL = "tf_efficientnet_lite0"
PRE_LOGITS = "pre_logits"  # the layer name of the pooled features before the classifier

HEADS = ("linear", "mlp", "local")
HEAD = [StrOptions(HEADS)]
