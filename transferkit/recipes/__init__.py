"""The four cs231n scenarios as recipes (`recipe`: recipe files, validation, running one), `advise` (which recipe
suits a data set) and the offline `demo`.

`from transferkit import recipes` gives the recipe functions (`recipes.get`, `recipes.load`, ...): they load on
first use, so importing this package stays light. May import everything below it, and `transferkit.jobs`.
"""

from __future__ import annotations

import importlib


def __getattr__(name: str):
    module = importlib.import_module("transferkit.recipes.recipe")
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module 'transferkit.recipes' has no attribute {name!r}") from None
