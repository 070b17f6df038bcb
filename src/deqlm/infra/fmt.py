"""The one number formatter: a figure printed in a console line or a table goes through `number`, so the same
value reads the same wherever it appears; `as_number` is the one reader of a figure that may be missing."""

from __future__ import annotations

import math
from typing import Any

MISSING = "-"


def as_number(value: Any) -> float | None:
    """A finite float, or None for missing / non-numeric / NaN / inf values (log and JSON fields)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def mean_of_known(values) -> float | None:
    """The mean of the values that are finite numbers (`as_number`), None when there are none: a missing or
    diverged figure is left out of a mean rather than poisoning it."""
    known = [v for v in map(as_number, values) if v is not None]
    return math.fsum(known) / len(known) if known else None


def number(value: Any, digits: int = 4, *, fixed: bool = False) -> str:
    """`value` as text for a table cell or a console line.

    Missing values (None, "") print as "-" and bools as yes / no. Integers get thousands separators, since
    counts such as parameters are read by their order of magnitude. Floats get `digits` significant digits,
    switching to exponent notation below 1e-2 and from 1e6 on, where fixed notation would hide the digits
    that matter (residuals, learning rates, large perplexities); `fixed=True` gives `digits` decimals instead,
    for columns of one unit (GiB, ratios, ms) that read best aligned on the point. Anything else prints as
    text, with "|" replaced so a markdown table keeps its columns.
    """
    if value is None or value == "":
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if fixed:
            return f"{value:.{digits}f}"
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e6):
            return f"{value:.{max(digits - 1, 0)}e}"
        return f"{value:.{digits}g}"
    return str(value).replace("|", "/")
