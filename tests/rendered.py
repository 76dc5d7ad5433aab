"""What a reader of an executed notebook sees, checked on its HTML page (nbconvert), three rules:

- no cell with more than 20 lines of stderr (a tool's log on Jupyter's pink background reads as a failure; a
  cell's stderr pieces, kept apart by papermill, show as one block);
- no number printed with more than 6 significant digits in a table cell or a printed line
  ("3.7159759998321533", "7074.000000");
- no name cut with "…" (or "...") inside a table cell (long names wrap); the cut marks of lib/run/formatting.py
  ("[… cut at max_new_tokens=N: ...]") say why a text ends and are allowed.

    from tests.rendered import problems
    problems(executed_notebook_node)        # -> ["cell 12: stderr output of 790 lines", ...]

Used by notebooks/conftest.py on every notebook the nbval run executes, and by tests/test_notebooks.py on the
notebook it runs through papermill.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

MAX_STDERR_LINES = 20
MAX_SIGNIFICANT_DIGITS = 6
# a decimal number, not part of a version ("2.13.0"), an identifier or a longer dotted run
FLOAT = re.compile(r"(?<![\w.])[-+]?\d[\d,]*\.\d+(?:[eE][-+]?\d+)?(?![\w.]*\.\d)(?!\w)")
CUT_MARK = "[… cut at"


def significant_digits(number: str) -> int:
    mantissa = re.split(r"[eE]", number.lstrip("+-"))[0].replace(",", "")
    digits = mantissa.replace(".", "").lstrip("0")
    return len(digits)


def long_numbers(text: str) -> list[str]:
    return [m.group(0) for m in FLOAT.finditer(text) if significant_digits(m.group(0)) > MAX_SIGNIFICANT_DIGITS]


class _Cells(HTMLParser):
    """The text of every table cell (td, th) of a page, and of every plain-text output (printed lines)."""

    def __init__(self):
        super().__init__()
        self.cells: list[str] = []
        self.stdout: list[str] = []
        self._stack: list[tuple[str, list[str]]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        mime = a.get("data-mime-type", "")
        if tag in ("td", "th"):
            self._stack.append(("cell", []))
        elif mime == "text/plain":  # printed lines (stdout) and plain-text results
            self._stack.append(("stdout", []))
        elif self._stack:
            self._stack.append(("", []))  # a nested tag: its text goes to the enclosing block

    def handle_endtag(self, tag):
        if not self._stack:
            return
        kind, parts = self._stack.pop()
        if kind == "" and self._stack:
            self._stack[-1][1].extend(parts)
        elif kind:
            {"cell": self.cells, "stdout": self.stdout}[kind].append("".join(parts))

    def handle_data(self, data):
        if self._stack:
            self._stack[-1][1].append(data)


def page(nb) -> str:
    """The notebook as the HTML page nbconvert writes."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nb)
    return body


def problems(nb) -> list[str]:
    """Every break of the three rules on the notebook's HTML page, one line each."""
    found = _Cells()
    found.feed(page(nb))
    out = []
    for i, cell in enumerate(nb.cells):  # a cell's stderr pieces (papermill keeps each write) show as one block
        text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("name") == "stderr")
        n = len(text.strip("\n").splitlines())
        if n > MAX_STDERR_LINES:
            out.append(f"cell {i}: stderr output of {n} lines: {text.strip()[:200]!r}")
    for text in found.cells + found.stdout:
        for number in long_numbers(text):
            out.append(f"{number} printed with more than {MAX_SIGNIFICANT_DIGITS} significant digits in "
                       f"{text.strip()[:120]!r}")
    for text in found.cells:
        rest = text.replace(CUT_MARK, "")
        if "…" in rest or rest.rstrip().endswith("..."):
            out.append(f"a table cell cut with an ellipsis: {text.strip()[:120]!r}")
    return out
