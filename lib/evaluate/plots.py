"""Plots of a run (notebook 05): every figure of lib/run/figures.py saved as PNG under plots/.

    python -m lib plot --run demo

    from lib.evaluate.plots import run_plots
    paths = run_plots("demo")         # [plots/metrics_plot.png (the overview), plots/loss.png, ...]
"""

from __future__ import annotations

import io
from pathlib import Path

from lib.run.figures import OWN_FILE, PANELS, has_data, load_inputs, overview_figure, panel_figure
from lib.run.paths import run_paths
from lib.run.rundir import inputs, install, remove_leftovers, run_lock, staging, write_atomic


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    write_atomic(path, buf.getvalue())
    return path


def run_plots(run: str) -> list[Path]:
    """Entry point of notebook 05 and `python -m lib plot`: write plots/*.png, return their paths.

    plots/metrics_plot.png (the overview) comes first; then one PNG per panel that has data.
    """
    paths = run_paths(run)
    with run_lock(paths, "plot"):
        data = load_inputs(run)
        sources = inputs(paths, "prepare", "train", "evaluate", "merge")
        # drawn into a staging folder that replaces plots/ as a whole (panels of an earlier run go with it)
        remove_leftovers(paths.root, r"\.plots-staging-\w{8}|\.plots-old-\d+")
        with staging(paths.root, ".plots-staging-") as staged:
            names = ["metrics_plot"] + [n for n in PANELS + OWN_FILE if has_data(n, data)]
            _save(overview_figure(data), staged / "metrics_plot.png")
            for name in names[1:]:
                _save(panel_figure(name, data), staged / f"{name}.png")
            install(paths, "plot", {paths.plots: staged}, [f"{paths.plots.name}/metrics_plot.png"], sources)
    written = [paths.plots / f"{n}.png" for n in names]
    print(f"wrote {len(written)} plots to {paths.plots}")
    return written
