"""Under `pytest --nbval notebooks/`: after the last cell of each notebook, its outputs as nbval collected them
are rendered to HTML (nbconvert) and held to tests/rendered.py's rules (no stderr over 20 lines, no number with
more than 6 significant digits in a table or printed line, no name cut with "…" in a table cell). A break
fails that last cell, naming the rule; nothing is executed twice.
"""

from __future__ import annotations

import copy

import pytest

_executed: dict[str, list] = {}  # notebook path -> its cells with the outputs of this run


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when != "call" or not hasattr(item, "test_outputs") or not hasattr(item, "cell"):
        return
    cell = copy.deepcopy(item.cell)
    cell.outputs = list(item.test_outputs or [])
    cells = _executed.setdefault(str(item.parent.fspath), [])
    cells.append(cell)
    report = outcome.get_result()
    code_cells = [c for c in item.parent.nb.cells if c.cell_type == "code"]
    if report.passed and cell.get("id") == code_cells[-1].get("id"):  # the notebook's last cell: check the page
        import nbformat

        from tests.rendered import problems

        nb = copy.deepcopy(item.parent.nb)
        by_id = {c.get("id"): c for c in cells}
        nb.cells = [by_id.get(c.get("id"), c) for c in nb.cells]
        found = problems(nbformat.from_dict(nb))
        if found:
            report.outcome = "failed"
            report.longrepr = "the rendered notebook breaks the reading rules (tests/rendered.py):\n" + "\n".join(found)
