"""Notebook 03's live view of training: one small table, updated in place at every log, instead of
transformers' notebook progress table (which gets a row only at evaluations and says "Epoch 0/1" under
max_steps).

    from lib.train.progress import LiveProgress
    trainer.add_callback(LiveProgress())      # lib.train.trainer.build_trainer does it inside a notebook

A line on top says the step, the time taken and the time left; below it one row per logged step, the
training loss and the evaluation loss of the same step side by side (the rows logs/training_metrics.csv holds,
merged), numbers rounded as lib.run.formatting writes them. The display is updated in place (an IPython display
handle), at most twice a second between logs, so it costs nothing next to a training step.
"""

from __future__ import annotations

import html
import time

from transformers import TrainerCallback

from lib.run.formatting import num

COLUMNS = {"loss": "train loss", "eval_loss": "eval loss", "learning_rate": "learning rate",
           "grad_norm": "grad norm"}
SHOWN_ROWS = 12  # the latest logged steps shown; the whole history is in logs/training_metrics.csv


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class LiveProgress(TrainerCallback):
    """A progress line and the loss table of the steps logged so far, in one display updated in place."""

    training_bar = None  # what GuardedSFTTrainer._close_bars looks for: nothing to close here

    def __init__(self):
        self.rows: dict[int, dict] = {}
        self.handle = None
        self._shown_at = 0.0
        self._start = None

    def on_train_begin(self, args, state, control, **kw):
        from IPython.display import HTML, display

        self._start, self._first_step = time.perf_counter(), state.global_step
        self.handle = display(HTML(self._html(state)), display_id=True)

    def on_step_end(self, args, state, control, **kw):
        if time.perf_counter() - self._shown_at > 0.5:
            self._show(state)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and ("loss" in logs or "eval_loss" in logs):
            row = self.rows.setdefault(state.global_step, {})
            row.update({k: logs[k] for k in COLUMNS if k in logs})
            self._show(state)

    def on_train_end(self, args, state, control, **kw):
        self._show(state, done=True)

    def _show(self, state, done: bool = False):
        if self.handle is not None:
            from IPython.display import HTML

            self.handle.update(HTML(self._html(state, done)))
            self._shown_at = time.perf_counter()

    def _html(self, state, done: bool = False) -> str:
        step, total = state.global_step, state.max_steps
        took = time.perf_counter() - self._start if self._start else 0.0
        line = f"<b>step {step:,} of {total:,}</b> &middot; {_clock(took)} elapsed"
        trained = step - getattr(self, "_first_step", 0)
        if done:
            line += " &middot; done"
        elif trained > 0 and total > step:
            line += f" &middot; about {_clock(took / trained * (total - step))} left"
        head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in ["step", *COLUMNS.values()])
        body = "".join(
            "<tr>" + f"<td>{s:,}</td>" + "".join(f"<td>{num(r.get(k), 4)}</td>" for k in COLUMNS) + "</tr>"
            for s, r in sorted(self.rows.items())[-SHOWN_ROWS:])
        more = len(self.rows) - SHOWN_ROWS
        note = f"<div>{more} earlier logged steps: logs/training_metrics.csv</div>" if more > 0 else ""
        return f"<div>{line}</div><table><tr>{head}</tr>{body}</table>{note}"
