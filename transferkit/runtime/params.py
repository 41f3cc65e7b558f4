"""Parameter limits written once, as data: the library validates with them, the CLI and the recipe files read them.

A table maps a Python parameter to a list of constraints, exactly like scikit-learn's `_parameter_constraints`
(sklearn/utils/_param_validation.py): a value is valid if it satisfies any of them. The entries are sklearn's own
constraint spellings (`None`, a type, "boolean", "random_state", ...) plus three light stand-ins defined here:
`Interval` and `StrOptions` take sklearn's arguments and become sklearn's classes in `sklearn_constraints`;
`Pair` (a (lo, hi) range) has no sklearn counterpart. They exist because importing sklearn costs ~0.8 s, which
`transferkit --help` must not pay just to list choices; this module imports neither sklearn nor click at import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from transferkit.errors import ParameterError

# every precision transferkit knows: codes take them all (int8 in ONNX Runtime), fine-tuning fp32, bf16 and fp16
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


@dataclass(frozen=True)
class Interval:
    """sklearn's `Interval(type, left, right, closed=...)` as plain data (None: unbounded)."""

    type: type  # numbers.Integral or numbers.Real
    left: float | None
    right: float | None
    closed: str = "left"  # 'left', 'right', 'both' or 'neither', as in sklearn

    def __contains__(self, value: Any) -> bool:
        return self.sklearn().is_satisfied_by(value)

    def sklearn(self):
        from sklearn.utils._param_validation import Interval as SkInterval

        return SkInterval(self.type, self.left, self.right, closed=self.closed)


@dataclass(frozen=True)
class StrOptions:
    """sklearn's `StrOptions` as plain data; a tuple, so the CLI and the messages list the options in this order."""

    options: tuple[str, ...]

    def sklearn(self):
        from sklearn.utils._param_validation import StrOptions as SkStrOptions

        return SkStrOptions(dict.fromkeys(self.options).keys())  # an ordered set: messages list them in this order


@dataclass(frozen=True)
class Pair:
    """A (lo, hi) pair of numbers with low < lo <= hi (<= high when given): a range such as crop_scale."""

    low: float
    high: float | None = None

    def __contains__(self, value: Any) -> bool:
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            return False
        if not all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in value):
            return False
        lo, hi = value
        return self.low < lo <= hi and (self.high is None or hi <= self.high)

    def __str__(self) -> str:
        return f"a pair (lo, hi) with {self.low:g} < lo <= hi" + (f" <= {self.high:g}" if self.high is not None else "")

    def sklearn(self):
        from sklearn.utils._param_validation import Options

        pair = self

        class _Pair(Options):  # sklearn has no pair constraint and takes only its own classes: an Options subclass
            def __init__(self):
                super().__init__(tuple, set())

            def is_satisfied_by(self, val):
                return val in pair

            def __str__(self):
                return str(pair)

        return _Pair()


Constraints = Mapping[str, Sequence[Any]]


def sklearn_constraints(table: Constraints) -> dict[str, list]:
    """The table with the stand-ins turned into sklearn's classes: an estimator's `_parameter_constraints`."""
    return {name: [c.sklearn() if isinstance(c, (Interval, StrOptions, Pair)) else c for c in allowed]
            for name, allowed in table.items()}


def validate(table: Constraints, params: Mapping[str, Any], owner: str, *, error: type[Exception] = ParameterError,
             noun: str = "parameter") -> None:
    """Check `params` against `table` with sklearn's `validate_parameter_constraints`; raise `error`, naming the
    parameter, what it must be and what it got (sklearn's wording; `noun` 'field' for recipe files). A
    ParameterError also carries the parameter's name (`param`), for the CLI to name its flag."""
    from sklearn.utils._param_validation import InvalidParameterError, validate_parameter_constraints

    constraints = sklearn_constraints(table)
    for name, value in params.items():  # one at a time: the error knows which parameter it is about
        try:
            validate_parameter_constraints({name: constraints.get(name, "no_validation")}, {name: value},
                                           caller_name=owner)
        except InvalidParameterError as e:
            text = str(e) if noun == "parameter" else str(e).replace(" parameter of ", f" {noun} of ", 1)
            must, _, got = text.rpartition(" Got ")
            if len(got) > 100:  # a 5,000-digit number must not flood a one-line error
                got = f"{got[:80]}... ({len(got) - len(' instead.')} characters) instead."
            named = {"param": name} if issubclass(error, ParameterError) else {}
            raise error(f"{must} Got {got}", **named) from None


def choices(allowed: Sequence[Any]) -> tuple[str, ...]:
    """The options of the first StrOptions in a constraint list (what a CLI flag offers)."""
    return next(c.options for c in allowed if isinstance(c, StrOptions))


def click_type(allowed: Sequence[Any]):
    """A click type for a constraint list: click.Choice for StrOptions, IntRange/FloatRange for an Interval."""
    import click

    for c in allowed:
        if isinstance(c, StrOptions):
            return click.Choice(c.options)
        if isinstance(c, Interval):
            rng = click.IntRange if c.type is Integral else click.FloatRange
            return rng(c.left, c.right, min_open=c.closed in ("right", "neither"),
                       max_open=c.closed in ("left", "neither"))
    raise TypeError(f"no click type for {allowed!r}")
