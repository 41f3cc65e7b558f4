"""Data set checks on CNN codes: duplicates and train/test leakage (`duplicates`), likely label errors by confident
learning (`label_issues`), outliers and class balance (`outliers`), the report files (`report`), and the job that
runs them all (`run`; its limits in `params`).

A room above `jobs` (it encodes through `jobs.extract_features`, like `transferkit extract`) and below `recipes`:
it may import `jobs` and every room below; `recipes` and `cli` may import it, nothing below does.
"""

from __future__ import annotations

import sys
import types


class _CallableRoom(types.ModuleType):
    """This package, callable: `transferkit.audit(DATA, OUT, test=TEST)` runs `transferkit.audit.run.audit`.

    The name is both the room and its job, and importing any module of the room binds `transferkit.audit` to the
    package; so the package itself runs the job, lazily (`transferkit --help` reads `audit.params` without torch).
    """

    def __call__(self, *args, **kwargs):
        from transferkit.audit.run import audit

        return audit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableRoom
