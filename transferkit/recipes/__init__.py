"""The four cs231n scenarios as recipes (`recipe`: finding recipe files, running one; `schema`: the fields of a
recipe file, their types and limits, and validation), `advise` (which recipe suits a data set) and the offline `demo`.

`from transferkit import recipes` gives the recipe functions (`recipes.get`, `recipes.load`, ...): they load on
first use, so importing this package stays light. May import everything below it, and `transferkit.jobs`.
"""

from __future__ import annotations

import importlib

_MODULES = ("transferkit.recipes.recipe", "transferkit.recipes.schema")  # where `recipes.NAME` looks, in order


def __getattr__(name: str):
    for module in map(importlib.import_module, _MODULES):
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'transferkit.recipes' has no attribute {name!r}")
