"""03 train with TRL's SFTTrainer: the adapter trained on the answers, resumable, watched while it learns.

Run by notebook 03_train_sft (one step a cell) and `python -m lib train` (`run_train` wires the same steps).
`training` holds the steps; `trainer` the SFTTrainer with its guards and collator; `checkpoints` what to
resume from; `nodes` a lost process or node ending the others in one line; `samples` the answers sampled
at each evaluation; `progress` the live loss table; `lmhead` the CPU's compact LM head; `report` the metrics
table, loss figure and summary table; `modelcard` the adapter's README.

Public steps:

    from lib.train import plan_training, load_model, attach_lora, build_datasets, show_batch
    from lib.train import build_sft_trainer, train, save_adapter, run_train
    from lib.train import loss_figure, metrics_table, samples_table, summary_table
"""

from lib.train.report import loss_figure, metrics_table, summary_table
from lib.train.samples import samples_table
from lib.train.trainer import show_batch
from lib.train.training import (
    attach_lora,
    build_datasets,
    build_sft_trainer,
    load_model,
    plan_training,
    run_train,
    save_adapter,
    train,
)

__all__ = ["attach_lora", "build_datasets", "build_sft_trainer", "load_model", "loss_figure", "metrics_table",
           "plan_training", "run_train", "samples_table", "save_adapter", "show_batch", "summary_table", "train"]
