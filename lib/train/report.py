"""What a training shows when it is done, as notebook 03 shows it: the metrics of each step as a table, the
loss figure, the training summary as a table.

    from lib.train.report import metrics_table, loss_figure, summary_table
    metrics_table("demo")          # the last 8 steps of logs/training_metrics.csv
"""

from __future__ import annotations

from lib.run.figures import load_inputs, panel_figure
from lib.run.formatting import table
from lib.run.paths import require, run_paths


def metrics_frame(run: str):
    """logs/training_metrics.csv as a pandas DataFrame, one row per step (a step's training and evaluation logs
    merged)."""
    import pandas as pd

    paths = run_paths(run)
    require(paths, "metrics_csv")
    return pd.read_csv(paths.metrics_csv).groupby("step", as_index=False, sort=True).first()


def metrics_table(run: str, last: int = 8):
    """The last `last` steps of metrics_frame, as notebook 03 shows them (lib.run.formatting.table)."""
    return table(metrics_frame(run).tail(last).set_index("step"))


def loss_figure(run: str):
    """Training and evaluation loss against the step (the loss panel of notebook 05, as a Figure)."""
    return panel_figure("loss", load_inputs(run))


def summary_table(summary: dict):
    """logs/training_summary.json as notebook 03 shows it: one row a figure (library versions left out),
    numbers rounded (lib.run.formatting.table)."""
    import pandas as pd

    return table(pd.Series({k: v for k, v in summary.items() if k != "versions"}, name="value").to_frame())
