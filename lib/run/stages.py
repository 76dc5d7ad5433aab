"""The stage registry: every stage of the pipeline, its notebook, command, inputs and outputs, in one table.

    from lib.run.stages import STAGES, stage, pipeline_stages
    stage("evaluate").notebook          # '04_evaluate_perplexity'
    stage("evaluate").rerun("demo")     # 'rerun notebook 04_evaluate_perplexity (or `python -m lib evaluate --run demo`)'

This is the one place that names stages and notebooks: the run layout (`lib/run/paths.py` declares each
file), the "run notebook NN first" messages, the manifests and freshness checks (`lib/run/rundir.py`),
the CLI dispatch and the pipeline order (`lib/__main__.py`) all read it. A stage's `outputs` are the
run-relative paths it alone writes (`tests/test_architecture.py` checks that no stage writes another
stage's files); `inputs` are the stages whose results it reads (its freshness depends on them); `run`
names the function that runs it (`module:function`, imported only when the stage runs, so that this
table imports nothing).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str  # the manifest name: outputs/<run>/stages/<name>.json
    notebook: str  # the notebook that runs it
    command: str  # the CLI command that runs it (`python -m lib <command> --run NAME`)
    inputs: tuple[str, ...]  # the stages whose results it reads
    outputs: tuple[str, ...]  # run-relative files and folders only it writes
    run: str  # "module:function" of the entry point
    in_pipeline: bool = True  # run by `python -m lib pipeline`, in table order
    args: str = ""  # the command's other required arguments, for messages

    def rerun(self, run: str, extra: str = "") -> str:
        """How to (re)make this stage's results, for messages."""
        return f"rerun notebook {self.notebook} (or `python -m lib {self.command} --run {run}{self.args}{extra}`)"

    def first(self, run: str) -> str:
        """How to make this stage's results when they are missing, for messages."""
        return f"run notebook {self.notebook} first (or `python -m lib {self.command} --run {run}{self.args}`)"


STAGES: tuple[Stage, ...] = (
    Stage("prepare", "01_prepare_data", "prepare", (), ("data/train.jsonl", "data/eval.jsonl", "data/report.json"),
          "lib.data:run_prepare", args=" --data PATH"),
    Stage("configure", "02_configure_qlora_model", "train", ("prepare",), ("model/summary.json",),
          "lib.model:configure", in_pipeline=False),
    Stage("train", "03_train_sft", "train", ("prepare",),
          ("checkpoints", "adapter", "logs/training_metrics.csv", "logs/training_summary.json", "logs/samples.jsonl",
           "logs/tensorboard"),
          "lib.train:run_train"),
    Stage("evaluate", "04_evaluate_perplexity", "evaluate", ("prepare", "train"),
          ("eval/verdict.json", "eval/null_control.json", "eval/perplexity.json", "eval/predictions.jsonl",
           "eval/generation_metrics.json", "eval/forgetting.json", "eval/forgetting_base.jsonl"),
          "lib.evaluate:run_evaluate"),
    Stage("plot", "05_plot_metrics", "plot", ("prepare", "train", "evaluate", "merge"), ("plots",),
          "lib.evaluate:run_plots"),
    Stage("merge", "06_merge_and_chat", "merge", ("prepare", "train"), ("merged",), "lib.ship:run_merge"),
    Stage("export", "06_merge_and_chat", "export", ("merge",), ("export", "logs/export.log"),
          "lib.ship:run_export", in_pipeline=False),
    Stage("push", "06_merge_and_chat", "push", ("train", "merge", "export"), ("push",), "lib.ship:run_push",
          in_pipeline=False, args=" --repo USER/NAME"),
)
_BY_NAME = {s.name: s for s in STAGES}
# Files and folders of the run directory that belong to no single stage: the configuration (prepare writes
# it, notebook 02 and `--set` update it) and the stages' manifests.
SHARED_OUTPUTS = ("config.yaml", "stages")


def stage(name: str) -> Stage:
    """The stage called `name` (KeyError naming the known ones otherwise)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no stage {name!r} (stages: {', '.join(_BY_NAME)})") from None


def pipeline_stages() -> list[Stage]:
    """The stages `python -m lib pipeline` runs, in order."""
    return [s for s in STAGES if s.in_pipeline]


def owner(relative_path: str) -> Stage | None:
    """The stage whose outputs hold `relative_path` (a path inside the run directory), or None."""
    rel = relative_path.strip("/")
    for s in STAGES:
        for out in s.outputs:
            if rel == out or rel.startswith(out + "/"):
                return s
    return None
