"""Answers during training: a few fixed eval prompts answered (greedy) at step 0 and at every evaluation (at the
last step instead when there are no evaluations), into logs/samples.jsonl, with their scores in the metrics CSV.

    from lib.train.samples import SamplesCallback, samples_table, read_samples
    trainer = build_sft_trainer(plan, model, tokenizer, train_ds, eval_ds)   # adds SamplesCallback itself
    samples_table("demo", styled=True)       # each prompt's answer at the first, middle and last step

The prompts are the first `eval.sample_prompts` eval prompts (the training ones when there is no eval
split), answered with the run's own stop tokens and `cfg.generation` made greedy, at most
`eval.sample_max_new_tokens` new tokens (lib/model/generation.py). Their scores (stop rate, the Socratic style
score, BLEU and ROUGE-L against the reference) come from lib/data/textmetrics.py, the very functions evaluation
uses, and go into logs/training_metrics.csv as `sample_*` columns, one row a sampled step; so does the
run's task score (`sample_task_score`: the first of eval.scores, or the one chosen from the eval references,
lib/data/scores.py), which notebook 05 plots per step and names the best step of. The model is
put in eval mode under torch.no_grad for the answers and back in train mode after. Only the main process
samples; under FSDP (the weights sharded over processes) nothing is sampled. In a notebook the latest
answers are shown in a table under the progress bar, updated in place.

A resumed training drops the rows after the checkpoint it resumes from (they are trained again), as the
metrics CSV does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from transformers import TrainerCallback

from lib.data.readers import read_examples
from lib.data.scores import choose_scores, score_answers
from lib.data.textmetrics import generation_metrics
from lib.model.generation import eval_conversations, eval_tools, generate_answers
from lib.run.errors import ConfigError, SFTError
from lib.run.formatting import table
from lib.run.paths import require, run_paths
from lib.run.rundir import is_main_rank, read_text, write_jsonl
from lib.run.trainer_args import BEST_METRICS
from lib.train.trainer import SAMPLE_COLUMNS

PREVIEW_CHARACTERS = 300  # of an answer in the live table


def sample_prompts(paths, n: int) -> tuple[list[tuple], list[str]]:
    """(index, prompt messages, reference, tools) of the first `n` eval conversations (training ones without
    an eval split), and the references of all of them (the task score is chosen from those, as evaluation does)."""
    if n <= 0:
        return [], []
    for source in (paths.eval_data, paths.train_data):
        examples = read_examples(source) if source.exists() else []
        every = eval_conversations(examples)
        chosen = every[:n]
        if chosen:
            tools = eval_tools(examples, chosen)
            return [(i, p, r, t) for (i, p, r), t in zip(chosen, tools)], [r for _, _, r in every]
    return [], []


def task_score_name(cfg, references: list[str]) -> str | None:
    """The run's first task score (eval.scores, else chosen from the references: lib/data/scores.py), the one
    the sampled answers are scored with while training; None when none fits."""
    names = list(cfg.eval.scores) if cfg.eval.scores is not None else choose_scores(references)[0]
    return names[0] if names else None


def check_task_score_metric(name: str | None, references: list) -> None:
    """train.best_metric=task_score needs sampled prompts and a task score that fits their references: else one line."""
    if not references:
        raise ConfigError("train.best_metric=task_score needs eval prompts answered while training: set "
                          "eval.sample_prompts above 0 (and give data with answers to score)")
    if name is None:
        raise ConfigError("train.best_metric=task_score: no task score fits the eval references (free text); set "
                          "eval.scores, or keep train.best_metric=eval_loss")
    if all(v is None for v in score_answers([name], references, references)[name]):
        raise ConfigError(f"train.best_metric=task_score: the task score {name} fits none of the "
                          f"{len(references)} sampled eval references; set eval.scores to one that does, or raise "
                          "eval.sample_prompts")


SAMPLE_FIELDS = {"step": int, "index": int, "prompt": str, "reference": (str, type(None)), "answer": str,
                 "stopped": bool}


def read_samples(path) -> list[dict]:
    """The rows of logs/samples.jsonl ([] when there is none); a torn last line (a killed run) is skipped. The file
    is read through the run-directory reader (a FIFO or folder in its place is refused, never waited on), and a
    row that is not an object with SAMPLE_FIELDS is one SFTError naming the file and line."""
    path = Path(path)
    if not os.path.lexists(path):
        return []
    lines = read_text(path).splitlines()
    rows = []
    for n, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            if n == len(lines):
                continue  # torn by a kill while it was written
            raise SFTError(f"{path}: line {n}: not JSON; delete the line or the file (the samples are redrawn "
                           "at the next evaluation)") from None
        bad = [k for k, t in SAMPLE_FIELDS.items() if not isinstance(row, dict) or not isinstance(row.get(k), t)]
        if bad:
            raise SFTError(f"{path}: line {n}: not a sample row ({bad[0]} missing or of another type); delete "
                           "the line or the file")
        rows.append(row)
    return rows


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class SamplesCallback(TrainerCallback):
    """Answers the sample prompts at step 0 and at every evaluation (see the module)."""

    def __init__(self, cfg, tokenizer, paths, resume_step: int | None = None, metrics=None, live: bool | None = None):
        self.cfg, self.tokenizer, self.path, self.metrics = cfg, tokenizer, paths.samples, metrics
        self.prompts, references = sample_prompts(paths, cfg.eval.sample_prompts)
        self.task_score = task_score_name(cfg, references)
        self.task_by_step: dict[int, float | None] = {}
        if cfg.train.best_metric == "task_score":
            check_task_score_metric(self.task_score, [r for _, _, r, _ in self.prompts])
        self.settings = dataclasses.replace(cfg.generation, do_sample=False,
                                            max_new_tokens=cfg.eval.sample_max_new_tokens)
        self.live = _in_notebook() if live is None else live
        self.seconds = 0.0  # spent answering, for the training summary
        self._handle, self._shown = None, None
        kept = [] if resume_step is None else [r for r in read_samples(self.path) if r.get("step", 0) <= resume_step]
        if self.prompts or self.path.exists():
            write_jsonl(self.path, kept)  # a fresh start, or the rows before the resumed checkpoint
        self.done = {r["step"] for r in kept}

    def _sample(self, args, state, model) -> None:
        step = state.global_step
        if not self.prompts or model is None or step in self.done or not is_main_rank() or args.fsdp:
            return
        started = time.perf_counter()
        tools = [t for *_, t in self.prompts]
        answers = generate_answers(model, self.tokenizer, [p for _, p, _, _ in self.prompts], self.settings,
                                   self.cfg.eval.batch_size, progress=False, max_length=self.cfg.train.max_length,
                                   tools=tools if any(tools) else None)
        epoch = round(state.epoch or 0.0, 4)
        refs = [r for _, _, r, _ in self.prompts]
        task = (score_answers([self.task_score], [a["text"] for a in answers], refs)[self.task_score]
                if self.task_score else [None] * len(answers))
        rows = [{"step": step, "epoch": epoch, "index": i, "prompt": p[-1]["content"], "reference": r,
                 "answer": a["text"], "stopped": a["stopped"], "task_score": self.task_score, "score": v}
                for (i, p, r, _), a, v in zip(self.prompts, answers, task)]
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        scores = generation_metrics(answers, refs)
        applies = [v for v in task if v is not None]
        scores["task_score"] = sum(applies) / len(applies) if applies else None
        self.task_by_step[step] = scores["task_score"]
        if self.metrics is not None:
            self.metrics.append({"step": step, "epoch": epoch,
                                 **{c: scores.get(c.removeprefix("sample_")) for c in SAMPLE_COLUMNS}})
        self.done.add(step)
        self.seconds += time.perf_counter() - started
        self._shown = rows
        if self.live:
            self._show()

    def _show(self) -> None:
        """The latest answers as a table, shown once the progress bar is there and updated in place."""
        if self._shown is None:
            return
        from IPython.display import display

        table = answers_frame(self._shown)
        if self._handle is None:
            self._handle = display(table, display_id=True)
        else:
            self._handle.update(table)

    def on_train_begin(self, args, state, control, model=None, **kw):
        if state.global_step == 0:
            self.live, live = False, self.live  # shown under the progress bar, which comes after this callback
            self._sample(args, state, model)
            self.live = live

    def on_step_begin(self, args, state, control, **kw):
        if self.live and self._handle is None:
            self._show()

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kw):
        self._sample(args, state, model)
        if metrics is not None and args.metric_for_best_model == BEST_METRICS["task_score"]:
            # train.best_metric=task_score: the best checkpoint and early stopping read it from these metrics
            value = self.task_by_step.get(state.global_step)
            metrics[BEST_METRICS["task_score"]] = float("-inf") if value is None else value

    def on_step_end(self, args, state, control, model=None, **kw):
        # without evaluations, the last step is sampled too (with them, the evaluations are the points: cheaper)
        if args.eval_strategy == "no" and state.max_steps and state.global_step >= state.max_steps:
            self._sample(args, state, model)


def answers_frame(rows: list[dict]):
    """One sampled step's answers as a DataFrame: prompt, answer (shortened), whether it stopped."""
    import pandas as pd

    def short(text: str) -> str:
        text = text or "(empty answer)"
        return text if len(text) <= PREVIEW_CHARACTERS else text[:PREVIEW_CHARACTERS] + " ..."

    step = rows[0]["step"] if rows else "-"
    return pd.DataFrame({"prompt": [short(r["prompt"]) for r in rows],
                         f"answer at step {step}": [short(r["answer"]) for r in rows],
                         "stopped": ["yes" if r["stopped"] else "no" for r in rows]})


def sampled_steps(rows: list[dict]) -> list[int]:
    return sorted({r["step"] for r in rows})


def samples_table(run: str, steps: list[int] | None = None, styled: bool = False):
    """Each sample prompt's answer at the first, middle and last sampled step (or `steps`), side by side."""
    import pandas as pd

    paths = run_paths(run)
    require(paths, "metrics_csv")
    rows = read_samples(paths.samples)
    every = sampled_steps(rows)
    if steps is None:
        steps = sorted({every[0], every[len(every) // 2], every[-1]}) if every else []
    by = {(r["step"], r["index"]): r for r in rows}
    indices = sorted({r["index"] for r in rows}, key=lambda i: next(k for k, r in enumerate(rows) if r["index"] == i))
    out = []
    for i in indices:
        first = next(r for r in rows if r["index"] == i)
        row = {"prompt": first["prompt"], "reference": first["reference"]}
        for s in steps:
            r = by.get((s, i))
            row[f"step {s}"] = "" if r is None else (r["answer"] or "(empty answer)") + ("" if r["stopped"] else " [...]")
        out.append(row)
    df = pd.DataFrame(out, columns=["prompt", "reference", *[f"step {s}" for s in steps]])
    if not styled:
        return df
    return (table(df, index=False)
            .set_caption("[...]: cut at eval.sample_max_new_tokens (did not stop)"))
