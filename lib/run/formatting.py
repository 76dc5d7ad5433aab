"""How numbers and cut text read in the notebooks' tables and status lines, one rule for every stage.

    from lib.run.formatting import num, mark_cut, CUT_AT_MAX_NEW_TOKENS
    num(7074.0)            # '7,074': a whole number with thousands separators
    num(3.7159759998)      # '3.716': 4 significant digits
    mark_cut("... a sort of", True, CUT_AT_MAX_NEW_TOKENS.format(n=96))   # '... a sort of [… cut at ...]'

Whether a text was cut is decided from its token ids by the code that generated or encoded it (no stop
token and the length limit reached), never guessed from the text; this module only writes the mark.
"""

from __future__ import annotations

import math

CUT_AT_MAX_NEW_TOKENS = "cut at max_new_tokens={n}: did not stop"
CUT_AT_MAX_LENGTH = "cut at max_length={n}: longer than what training sees"


def mark_cut(text: str, cut: bool, why: str) -> str:
    """`text` with a trailing ' [… why]' when it was cut by a length limit, else as it is."""
    return f"{text.rstrip()} [… {why}]" if cut else text


def num(value, digits: int = 4) -> str:
    """A number as a reader wants it: whole numbers with thousands separators, others to `digits`
    significant digits (no exponent between 1e-4 and 1e6), None and NaN as '-'."""
    if value is None or isinstance(value, bool):
        return "-" if value is None else str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "-" if math.isnan(value) else str(value)
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    if 1e-4 <= abs(value) < 1e6:
        text = f"{value:,.{digits}g}" if abs(value) < 10 ** digits else f"{value:,.0f}"
        return text
    return f"{value:.{max(digits - 1, 1)}e}"


def pct(value, digits: int = 1) -> str:
    """A share (0.125) as a percentage ('12.5%'); None as '-'."""
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value * 100:.{digits}f}%".replace(".0%", "%")


def table(df, digits: int = 4, index: bool = True):
    """A DataFrame as a notebook shows it: numbers through `num` (thousands separators, `digits` significant
    digits, no '1.000000'), text wrapped (never cut with '…'), everything left-aligned and top-aligned.

    Every cell, row label and column label is HTML-escaped: the text comes from data (answers, prompts, field
    and run names), and pandas' Styler writes it into the page as it is, so `<img onerror=...>` would run."""
    import numbers

    def cell(v):
        return num(v, digits) if isinstance(v, numbers.Number) else ("" if v is None else v)

    sty = df.style.format(cell, na_rep="-", escape="html")
    sty = sty.format_index(escape="html", axis=0).format_index(escape="html", axis=1)
    sty = sty.set_properties(**{"white-space": "pre-wrap", "text-align": "left", "vertical-align": "top"})
    sty = sty.set_table_styles([{"selector": "th", "props": [("text-align", "left")]}])
    return sty if index else sty.hide(axis="index")
