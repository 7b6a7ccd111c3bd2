"""A figure that came out NaN or ±Inf (a run that diverged), as the claims' words show it: "diverged", never a
number, and never part of a verdict. Shared by every claim's `section` and by the report.
"""

from __future__ import annotations

import math


class Diverged(float):
    """A figure that came out NaN or ±Inf (a run that diverged). It prints as "diverged" whatever the format, any
    arithmetic on it stays Diverged, and every comparison is False (it is a NaN), so no verdict counts it."""

    def __new__(cls, value=math.nan):
        return super().__new__(cls, math.nan)

    def __format__(self, spec: str) -> str:
        return "diverged"

    __str__ = __repr__ = lambda self: "diverged"


for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "radd", "rsub", "rmul", "rtruediv",
            "rfloordiv", "rmod", "rpow", "neg", "pos", "abs"):
    setattr(Diverged, f"__{_op}__", lambda self, *other: Diverged())


def shown(x):
    """`x` (figures: dicts, lists, numbers) with every NaN/Inf float as Diverged."""
    if isinstance(x, dict):
        return {k: shown(v) for k, v in x.items()}
    if isinstance(x, list):
        return [shown(v) for v in x]
    return Diverged() if isinstance(x, float) and not math.isfinite(x) else x


def finite(*xs) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)
