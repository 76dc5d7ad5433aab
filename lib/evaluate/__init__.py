"""04 evaluate and 05 plot: how the tuned model compares with the base, and every figure of a run.

Run by notebooks 04_evaluate_perplexity and 05_plot_metrics, and `python -m lib evaluate`, `plot`,
`summary` and `compare`. `evaluation` is stage 04 (perplexity base vs tuned, generated answers and their
scores); `verdict` answers "did it help?" (task scores base vs tuned, paired 95% intervals, verdicts);
`scoring` perplexity over the answer tokens; `forgetting` the base model's general answers scored by both;
`plots` stage 05 (every figure as PNG); `summary` the before/after in words; `compare` runs side by side.

Public steps:

    from lib.evaluate import run_evaluate, verdict_table, verdict_line      # did it help? (eval/verdict.json)
    from lib.evaluate import metrics_table, metrics_verdict, predictions_table, forgetting_table
    from lib.evaluate import run_plots
    from lib.evaluate import compare_runs, settings_diff, results_table, answers_table, curves_figure, status_lines
    from lib.evaluate import run_compare, before_after            # the CLI's compare and summary
"""

from lib.evaluate.compare import (
    answers_table,
    compare_runs,
    curves_figure,
    results_table,
    run_compare,
    settings_diff,
    status_lines,
)
from lib.evaluate.evaluation import metrics_table, metrics_verdict, predictions_table, run_evaluate
from lib.evaluate.forgetting import forgetting_table
from lib.evaluate.plots import run_plots
from lib.evaluate.summary import before_after
from lib.evaluate.verdict import verdict_line, verdict_table

__all__ = ["answers_table", "before_after", "compare_runs", "curves_figure", "forgetting_table", "metrics_table",
           "metrics_verdict", "predictions_table", "results_table", "run_compare", "run_evaluate", "run_plots",
           "settings_diff", "status_lines", "verdict_line", "verdict_table"]
